import os
import time
from types import SimpleNamespace

import pynvml
import pytest
import trio

from node import hardware
from node.balancer import Balancer
from node.hardware import (
    DeviceInfo,
    block_bytes,
    cache_bytes_per_token_per_block,
    device_label,
    measure_throughput,
    plan_capacity,
    probe_device,
)
from protocol.announce import MAX_DEVICE_CHARS, SpanAnnouncement

GIB = 1024**3


def test_probe_device_reports_this_cpu():
    info = probe_device()  # no GPU (nor NVML library) on the test machine
    assert info.kind == "cpu" and info.name.startswith("cpu (") and len(info.name) <= MAX_DEVICE_CHARS
    assert 0 < info.free_bytes <= info.total_bytes < 1 << 50
    assert "GiB free" in device_label(info)


def test_nvml_error_falls_back_to_cpu(monkeypatch, caplog):
    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    with caplog.at_level("DEBUG", logger="poolai.hardware"):
        assert probe_device().kind == "cpu"
    assert "NVML unavailable" in caplog.text


def fake_nvml(monkeypatch, *, count=1, name=b"NVIDIA H200", memory_error=False):
    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: count)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("gpu", i))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: name)

    def memory(h):
        if memory_error:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(total=140 * GIB, free=139 * GIB, used=GIB)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory)
    return calls


def test_nvml_gpu_is_reported_and_nvml_shut_down(monkeypatch):
    calls = fake_nvml(monkeypatch)
    assert probe_device() == DeviceInfo("cuda", "cuda NVIDIA H200", 140 * GIB, 139 * GIB)
    assert calls == ["init", "shutdown"]
    fake_nvml(monkeypatch, name="NVIDIA " + "X" * 100)  # newer bindings return str; long names are cut
    assert len(probe_device().name) == MAX_DEVICE_CHARS


@pytest.mark.parametrize("kwargs", [{"count": 0}, {"memory_error": True}])
def test_nvml_without_usable_gpu_falls_back_to_cpu(monkeypatch, kwargs):
    calls = fake_nvml(monkeypatch, **kwargs)
    assert probe_device().kind == "cpu"
    assert calls == ["init", "shutdown"]


def test_cpu_memory_without_proc_meminfo_uses_sysconf(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "MEMINFO", tmp_path / "missing")
    info = hardware.cpu_device()
    assert info.total_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture(scope="module")
def converted(model_cache):
    from node.weights import prepare_model

    return prepare_model(model_cache)[0]


def test_measure_throughput_is_positive_and_quick(converted):
    began = time.perf_counter()
    steps_per_s = measure_throughput(converted, seconds=0.3)
    assert time.perf_counter() - began < 3.0
    assert 10 < steps_per_s < 1e6  # one block of a 135M model: ~1 ms a step on a slow core


def test_block_and_cache_sizes(converted):
    c = converted.config
    params = (c.hidden * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.hidden
              + 3 * c.hidden * c.intermediate + 2 * c.hidden)
    assert 4 * params <= block_bytes(converted) < 4 * params + 4096  # fp32 weights plus a small header
    assert cache_bytes_per_token_per_block(c) == 2 * 3 * 64 * 4 == 1536
    assert cache_bytes_per_token_per_block(c, dtype_bytes=2) == 768


def test_plan_capacity_sizes_blocks_to_memory(converted):
    small = DeviceInfo("cpu", "cpu (2 cores)", 2 * GIB, GIB)
    report = plan_capacity(converted, 16384, 30, device=small, seconds=0.05)
    assert report.device == small and report.throughput > 0 and report.cache_tokens == 16384
    assert report.blocks == 20  # 768 MiB after the 256 MiB reserve, 39.3 MB per block with its cache
    big = DeviceInfo("cuda", "cuda NVIDIA H200", 140 * GIB, 139 * GIB)
    assert plan_capacity(converted, 16384, 30, device=big, seconds=0.05).blocks == 30


# -- the balancer on a fake swarm -------------------------------------------------------------------

N = 30
ME = bytes([1]) * 38
PERIOD = 60.0


class FakeSwarm:
    """Peers 1..n with spans; peer 1 is us. `move` replaces our span like the runtime would."""

    def __init__(self, spans: dict[int, tuple[int, int]]) -> None:
        self.spans = spans
        self.moves: list[tuple[int, int]] = []

    def servers(self) -> list[SpanAnnouncement]:
        return [SpanAnnouncement(bytes([i]) * 38, b"m" * 32, a, b, (), 0, 1, throughput=100_000)
                for i, (a, b) in self.spans.items()]

    async def move(self, span: tuple[int, int]) -> None:
        self.moves.append(span)
        await trio.sleep(5.0)  # drain and reload take a while; no check runs meanwhile
        self.spans[1] = span

    def balancer(self) -> Balancer:
        import random

        return Balancer(self.servers, N, ME, lambda: self.spans[1], 100.0, self.move, period_s=PERIOD,
                        rng=random.Random(7))


async def run_periods(balancer: Balancer, periods: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        await trio.sleep(periods * PERIOD)
        nursery.cancel_scope.cancel()


async def test_balancer_moves_once_when_it_helps(autojump_clock):
    swarm = FakeSwarm({1: (0, 15), 2: (0, 15), 3: (0, 15), 4: (15, 30)})
    balancer = swarm.balancer()
    await run_periods(balancer, 10)
    assert swarm.moves == [(15, 30)] and swarm.spans[1] == (15, 30)
    st = balancer.statistics()
    assert st.moves == 1 and 8 <= st.checks <= 12
    assert st.last_decision is None and st.last_check_min_throughput == 200.0  # 2+2 replicas of 100


async def test_balanced_swarm_never_moves(autojump_clock):
    swarm = FakeSwarm({1: (0, 15), 2: (0, 15), 3: (15, 30), 4: (15, 30)})
    balancer = swarm.balancer()
    await run_periods(balancer, 10)
    st = balancer.statistics()
    assert swarm.moves == [] and st.moves == 0 and 8 <= st.checks <= 12
    assert st.last_check_at is not None and st.last_check_at <= 10 * PERIOD
