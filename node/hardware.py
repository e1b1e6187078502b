"""What this machine can offer the swarm: its device, free memory, and measured block speed.

`probe_device` asks NVML (package nvidia-ml-py, imported as `pynvml`) for the first GPU; without the
library, a driver or a GPU it reports the CPU and the memory the kernel says is available.
`measure_throughput` times single-token steps through one block of the model, in block-steps per second,
the unit that span announcements carry (x1000). `plan_capacity` combines both with the memory rule of
`protocol.placement.blocks_for_memory` into the figures a node starts with.

Plain functions: they block (NVML calls, reading files, a ~0.5 s benchmark); a trio caller runs them in
a worker thread.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.announce import MAX_DEVICE_CHARS
from protocol.placement import blocks_for_memory

from .model import ConvertedModel, LlamaConfig, SpanModel

log = logging.getLogger("poolai.hardware")

MEMINFO = Path("/proc/meminfo")
# cgroup v2 limit of the container we may run in; /proc/meminfo shows the host's memory, not ours.
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_MEMORY_CURRENT = Path("/sys/fs/cgroup/memory.current")

# Positions filled before timing: decode steps then attend over a short, realistic context.
BENCH_PREFILL_TOKENS = 8
# Untimed steps first: the first calls pay for lazy allocations and kernel selection.
BENCH_WARMUP_STEPS = 2
# At least this many timed steps even on a slow machine, so one scheduler hiccup is not the figure...
BENCH_MIN_STEPS = 8
# ...and at most this many on a fast one, so the work done is bounded whatever the clock says.
BENCH_MAX_STEPS = 5000
# A fixed seed for the benchmark's hidden states: the same work on every run and every node.
BENCH_SEED = 0


@dataclass(frozen=True)
class DeviceInfo:
    """The device a node would serve on: `kind` is "cpu" or "cuda", `name` fits an announcement's
    device field (<= 64 chars), memory figures are bytes."""

    kind: str
    name: str
    total_bytes: int
    free_bytes: int


def probe_device() -> DeviceInfo:
    """The first GPU NVML reports; the CPU when NVML is missing, fails, or sees no GPU."""
    try:
        import pynvml
    except ImportError as e:
        log.debug("no NVML bindings (%s); serving on CPU", e)
        return cpu_device()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.debug("NVML unavailable (%s); serving on CPU", e)
        return cpu_device()
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            log.debug("NVML sees no GPU; serving on CPU")
            return cpu_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # bindings before 11.5 return bytes
            name = name.decode(errors="replace")
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return DeviceInfo("cuda", _short(f"cuda {name}"), int(memory.total), int(memory.free))
    except pynvml.NVMLError as e:
        log.debug("NVML query failed (%s); serving on CPU", e)
        return cpu_device()
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def cpu_device() -> DeviceInfo:
    """The CPU, with the memory available to this process (the container's limit when lower)."""
    total, free = _meminfo()
    limit = _cgroup_limit()
    if limit is not None:
        used = _read_int(CGROUP_MEMORY_CURRENT) or 0
        total, free = min(total, limit), min(free, max(0, limit - used))
    return DeviceInfo("cpu", _short(f"cpu ({_cores()} cores)"), total, free)


def device_label(info: DeviceInfo) -> str:
    """For logs and the TUI: 'cpu (2 cores), 5.1 of 7.8 GiB free'."""
    gib = 1024**3
    return f"{info.name}, {info.free_bytes / gib:.1f} of {info.total_bytes / gib:.1f} GiB free"


def _short(name: str) -> str:
    name = " ".join(name.split())
    return name if len(name) <= MAX_DEVICE_CHARS else name[: MAX_DEVICE_CHARS - 1] + "…"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _meminfo() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo, else from sysconf."""
    try:
        fields = {}
        for line in MEMINFO.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        total = fields["MemTotal"]
        return total, fields.get("MemAvailable", fields.get("MemFree", total))
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_limit() -> int | None:
    return _read_int(CGROUP_MEMORY_MAX)  # "max" (no limit) reads as None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Speed and size of a block


def measure_throughput(converted: ConvertedModel, *, block: int = 0, seconds: float = 0.5,
                       max_length: int = 64) -> float:
    """Block-steps per second of single-token decode steps through block `block`, timed for about
    `seconds` (between `BENCH_MIN_STEPS` and `BENCH_MAX_STEPS` steps) after a short prefill."""
    if max_length <= BENCH_PREFILL_TOKENS + 1:
        raise ValueError(f"max_length must exceed {BENCH_PREFILL_TOKENS + 1}, got {max_length}")
    span = SpanModel.load(converted, block, block + 1)
    cache = span.new_cache(max_length)
    gen = torch.Generator().manual_seed(BENCH_SEED)
    hidden = torch.randn(1, BENCH_PREFILL_TOKENS + 1, span.config.hidden, generator=gen)
    token = hidden[:, -1:]
    span.forward(hidden[:, :BENCH_PREFILL_TOKENS], cache, 0)

    def step() -> None:
        if cache.length >= max_length:
            cache.truncate(BENCH_PREFILL_TOKENS)
        span.forward(token, cache, cache.length)

    for _ in range(BENCH_WARMUP_STEPS):
        step()
    steps = 0
    began = time.perf_counter()
    elapsed = 0.0
    while steps < BENCH_MAX_STEPS and (steps < BENCH_MIN_STEPS or elapsed < seconds):
        step()
        steps += 1
        elapsed = time.perf_counter() - began
    return steps / max(elapsed, 1e-9)


def block_bytes(converted: ConvertedModel, block: int = 0) -> int:
    """Bytes of one block's weights: its fp32 safetensors file, which is what it takes in memory."""
    return converted.block_path(block).stat().st_size


def cache_bytes_per_token_per_block(config: LlamaConfig, dtype_bytes: int = 4) -> int:
    """KV cache bytes one token takes in one block: a key and a value per KV head."""
    return 2 * config.n_kv_heads * config.head_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------
# The plan a node starts with


@dataclass(frozen=True)
class CapacityReport:
    """What a node offers: its device, measured block-steps per second, how many blocks fit in free
    memory, and the KV cache budget (tokens) those blocks were sized for."""

    device: DeviceInfo
    throughput: float
    blocks: int
    cache_tokens: int


def plan_capacity(converted: ConvertedModel, config_cache_tokens: int, n_blocks: int, *,
                  device: DeviceInfo | None = None, seconds: float = 0.5) -> CapacityReport:
    """Probe the device (unless given), measure a block, and size the span to free memory."""
    device = device if device is not None else probe_device()
    throughput = measure_throughput(converted, seconds=seconds)
    blocks = blocks_for_memory(device.free_bytes, block_bytes(converted),
                               cache_bytes_per_token_per_block(converted.config), config_cache_tokens, n_blocks)
    report = CapacityReport(device, throughput, blocks, config_cache_tokens)
    log.info("%s: %.0f block-steps/s, room for %d of %d blocks with %d cache tokens",
             device_label(device), throughput, blocks, n_blocks, config_cache_tokens)
    return report
