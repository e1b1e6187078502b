"""Failover with real processes and real kills: 4 nodes, two stripes of two mirrors (RAID-10 of layers).

The servers run as separate `poolai node` processes for the whole module; each test runs its own
client node in the test's trio loop, kills servers with SIGKILL and restarts them afterwards.
"""

import random
import time

import pytest
import trio

from node.config import NodeConfig
from node.demo import LocalSwarm
from node.errors import GenerationError
from node.model import LocalModel, format_chat
from node.testing import node_config, start_node
from node.weights import prepare_model
from protocol.signing import b58encode

PROMPT = "Write a short story about a robot who learns to paint."
TOKENS = 48
SPANS = [(0, 15), (0, 15), (15, 30), (15, 30)]


@pytest.fixture(scope="module")
def reference(model_cache):
    converted, _ = prepare_model(model_cache)
    model = LocalModel.load(converted)
    ids = converted.load_tokenizer().encode(format_chat(converted.chat_template, PROMPT),
                                            add_special_tokens=False).ids
    return model.generate(ids, TOKENS, stop_ids=())


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("raid10")
    s = LocalSwarm(root, NodeConfig(announce_interval_s=2.0, announce_ttl_s=30.0), SPANS, model_cache)
    try:
        trio.run(s.start)
        yield s
    finally:
        s.stop()


def restart_dead(swarm: LocalSwarm) -> None:
    async def go():
        for i, p in enumerate(swarm.procs):
            if p.poll() is not None:
                swarm.start_node(i, swarm.bootstrap_addrs()[:1] if i else swarm.bootstrap_addrs()[1:2])
                swarm.states[i] = await swarm.wait_state(i)
    trio.run(go)


@pytest.fixture
def live_swarm(swarm):
    restart_dead(swarm)
    yield swarm
    restart_dead(swarm)


async def client_node(nursery, swarm, model_cache, tmp_path):
    node = await start_node(nursery, node_config(model_cache, serve=False, bootstrap=tuple(swarm.bootstrap_addrs())),
                            tmp_path / "client")
    await node.client.wait_ready(30)
    return node


def index_of(swarm, peer_id: bytes) -> int:
    return next(i for i, s in enumerate(swarm.states) if s["peer_id"] == b58encode(peer_id))


def killer(swarm, node, span_start: int, at_step: int, killed: list):
    """An on_token callback that SIGKILLs the server of the hop starting at `span_start` after `at_step` tokens."""
    def on_token(token, text):
        if len(killed) == 0 and on_token.count == at_step:
            hop = next(h for h in node.client.last_route if h.start == span_start)
            i = index_of(swarm, hop.peer_id)
            swarm.kill(i)
            killed.append((i, time.perf_counter()))
        on_token.count += 1
    on_token.count = 0
    return on_token


@pytest.mark.parametrize("span_start", [0, 15])
async def test_kill_at_random_step_gives_identical_tokens(live_swarm, model_cache, tmp_path, reference, span_start):
    at = random.Random().randrange(1, TOKENS - 1)
    killed: list = []
    async with trio.open_nursery() as nursery:
        node = await client_node(nursery, live_swarm, model_cache, tmp_path)
        result = await node.client.generate(PROMPT, TOKENS, stop_at_eos=False,
                                            on_token=killer(live_swarm, node, span_start, at, killed))
        nursery.cancel_scope.cancel()
    assert killed, "the kill did not happen"
    assert result.tokens == reference, f"kill at step {at}"
    assert len(result.failovers) == 1
    f = result.failovers[0]
    assert f.blocks == (span_start, span_start + 15) and f.replayed_steps == at + 1
    assert f.failed_peer == live_swarm.states[killed[0][0]]["peer_id"]
    assert [(h["start"], h["end"]) for h in result.route] == [(0, 15), (15, 30)]
    assert f.failed_peer not in {h["peer"] for h in result.route}


async def test_kill_at_prefill(live_swarm, model_cache, tmp_path, reference):
    killed = []
    async with trio.open_nursery() as nursery:
        node = await client_node(nursery, live_swarm, model_cache, tmp_path)
        through = node.client._through

        async def kill_before_prefill(hs, hidden):
            if not killed and hs.hop.start == 15 and hidden.shape[1] > 1:
                i = index_of(live_swarm, hs.hop.peer_id)
                live_swarm.kill(i)
                killed.append(i)
            return await through(hs, hidden)

        node.client._through = kill_before_prefill
        result = await node.client.generate(PROMPT, TOKENS, stop_at_eos=False)
        nursery.cancel_scope.cancel()
    assert killed and result.tokens == reference
    assert len(result.failovers) == 1 and result.failovers[0].step == 0
    assert result.failovers[0].replayed_steps == 0


async def test_both_mirrors_killed_fails_naming_blocks(live_swarm, model_cache, tmp_path):
    async with trio.open_nursery() as nursery:
        node = await client_node(nursery, live_swarm, model_cache, tmp_path)

        def kill_both(token, text):
            if kill_both.done:
                return
            for i, (a, b) in enumerate(SPANS):
                if a == 15:
                    live_swarm.kill(i)
            kill_both.done = time.monotonic()
        kill_both.done = 0.0
        with pytest.raises(GenerationError) as e:
            await node.client.generate(PROMPT, TOKENS, stop_at_eos=False, on_token=kill_both)
        failed_after = time.monotonic() - kill_both.done
        nursery.cancel_scope.cancel()
    assert "blocks 15-29" in str(e.value)
    assert failed_after < 20, f"took {failed_after:.1f} s to give up"
