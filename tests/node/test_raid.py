"""Placement and concurrency with in-process nodes on 127.0.0.1 (real hosts, real weights)."""

import torch
import trio

from node.model import LocalModel, format_chat
from node.testing import node_config, start_node
from node.weights import prepare_model

PROMPT = "Tell me a fact about the sea."
TOKENS = 12


async def test_joining_node_takes_the_single_replica_blocks(tmp_path, model_cache):
    async with trio.open_nursery() as nursery:
        first = await start_node(nursery, node_config(model_cache, span=(0, 15)), tmp_path / "a")
        boot = (first.p2p.listen_addrs()[0],)
        await start_node(nursery, node_config(model_cache, span=(0, 15), bootstrap=boot), tmp_path / "b")
        await start_node(nursery, node_config(model_cache, span=(15, 30), bootstrap=boot), tmp_path / "c")
        joiner = await start_node(nursery, node_config(model_cache, blocks=15, bootstrap=boot), tmp_path / "d")
        assert (joiner.server.span.start, joiner.server.span.end) == (15, 30)
        nursery.cancel_scope.cancel()


async def test_eight_concurrent_sessions_and_the_ninth_is_routed_to_a_mirror(tmp_path, model_cache):
    converted, _ = prepare_model(model_cache)
    local = LocalModel.load(converted)
    ids = converted.load_tokenizer().encode(format_chat(converted.chat_template, PROMPT), add_special_tokens=False).ids
    max_length = len(ids) + TOKENS
    seeds = list(range(9))
    expected = {s: local.generate(ids, TOKENS, temperature=0.8, top_p=0.95,
                                  generator=torch.Generator().manual_seed(s), stop_ids=()) for s in seeds}
    assert len({tuple(v) for v in expected.values()}) > 1  # the seeds really differ
    async with trio.open_nursery() as nursery:
        fast = await start_node(nursery, node_config(model_cache, span=(0, 30), cache_tokens=8 * max_length,
                                                     throughput=1000.0), tmp_path / "fast")
        boot = (fast.p2p.listen_addrs()[0],)
        mirror = await start_node(nursery, node_config(model_cache, span=(0, 30), throughput=10.0, bootstrap=boot),
                                  tmp_path / "mirror")
        client = await start_node(nursery, node_config(model_cache, serve=False, bootstrap=boot), tmp_path / "c")
        await client.client.wait_ready(20)
        results = {}

        async def one(seed):
            r = await client.client.generate(PROMPT, TOKENS, temperature=0.8, top_p=0.95, seed=seed,
                                             stop_at_eos=False)
            results[seed] = r

        async with trio.open_nursery() as gens:
            for s in seeds:
                gens.start_soon(one, s)
        nursery.cancel_scope.cancel()
    for s in seeds:
        assert results[s].tokens == expected[s], f"seed {s}"
    fs, ms = fast.server.statistics(), mirror.server.statistics()
    assert fs.sessions_total == 8 and fs.sessions_refused == 1
    assert ms.sessions_total == 1
    routed_to_mirror = [s for s in seeds if results[s].route[0]["peer"] == mirror.peer_id]
    assert len(routed_to_mirror) == 1 and len(results[routed_to_mirror[0]].failovers) == 0


async def test_status_over_the_control_socket(tmp_path, model_cache):
    from node.control import ControlClient
    from node.format import format_status

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config(model_cache, span=(0, 15)), tmp_path / "a")
        boot = (a.p2p.listen_addrs()[0],)
        await start_node(nursery, node_config(model_cache, span=(0, 15), bootstrap=boot), tmp_path / "b")
        c = await start_node(nursery, node_config(model_cache, span=(15, 30), bootstrap=boot), tmp_path / "c")
        with trio.fail_after(10):
            while a.swarm.map.missing_blocks(a.client.model_id, 30):
                await trio.sleep(0.1)
        async with ControlClient(tmp_path / "a") as ctl:
            info = {"status": await ctl.call("status"), "swarm": await ctl.call("swarm"),
                    "sessions": await ctl.call("sessions")}
        nursery.cancel_scope.cancel()
    assert info["status"]["peer_id"] == a.peer_id and info["status"]["span"] == [0, 15]
    assert info["swarm"]["replicas"] == [2] * 15 + [1] * 15
    assert info["swarm"]["runs"] == [{"start": 0, "end": 15, "replicas": 2}, {"start": 15, "end": 30, "replicas": 1}]
    text = format_status(info)
    assert "coverage 222222222222222111111111111111" in text
    assert c.peer_id[-12:] in text and "my span  0:15 (online)" in text


async def test_a_moving_node_drains_and_its_sessions_finish(tmp_path, model_cache):
    converted, _ = prepare_model(model_cache)
    local = LocalModel.load(converted)
    ids = converted.load_tokenizer().encode(format_chat(converted.chat_template, PROMPT), add_special_tokens=False).ids
    expected = local.generate(ids, 24, stop_ids=())
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config(model_cache, span=(0, 15), throughput=1000.0), tmp_path / "a")
        boot = (a.p2p.listen_addrs()[0],)
        # The mover joins first and takes the gap 15:30 ...
        mover = await start_node(nursery, node_config(model_cache, blocks=15, throughput=1000.0, bootstrap=boot,
                                                      rebalance_period_s=1.0), tmp_path / "mover")
        assert (mover.server.span.start, mover.server.span.end) == (15, 30)
        client = await start_node(nursery, node_config(model_cache, serve=False, bootstrap=boot), tmp_path / "c")
        await client.client.wait_ready(20)
        result = {}

        async def generate():
            result["r"] = await client.client.generate(PROMPT, 24, stop_at_eos=False)

        nursery.start_soon(generate)
        await trio.sleep(0.3)  # the generation holds a session on the mover's 15:30
        # ... then two more servers of 15:30 arrive: 0:15 is now the weakest, and the mover should move there.
        for name in ("d", "e"):
            await start_node(nursery, node_config(model_cache, span=(15, 30), throughput=1000.0, bootstrap=boot),
                             tmp_path / name)
        with trio.fail_after(30):
            while (mover.server.span.start, mover.server.span.end) != (0, 15) or "r" not in result:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert result["r"].tokens == expected and not result["r"].failovers
    assert mover.balancer.statistics().moves == 1
    assert mover.server.state == "online"
