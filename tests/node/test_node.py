"""In-process nodes on 127.0.0.1: real libp2p hosts, real weights, nothing mocked."""

import os
import stat

import msgpack
import pytest
import torch
import trio
from libp2p.peer.id import ID

from node.client import InferenceClient
from node.identity import load_or_create_identity
from node.model import LocalModel, format_chat
from node.testing import node_config, raw_host, start_node, start_swarm
from node.weights import prepare_model
from node.wire import FramedStream
from protocol.announce import SpanAnnouncement
from protocol.codec import HEADER, encode_frame
from protocol.signing import Signer
from protocol.versions import ANNOUNCE_TOPIC



PROMPT = "Name three primary colours."


def test_identity_persists(tmp_path):
    kp1, s1 = load_or_create_identity(tmp_path)
    kp2, s2 = load_or_create_identity(tmp_path)
    assert s1.peer_id == s2.peer_id
    assert ID.from_pubkey(kp1.public_key).to_bytes() == s1.peer_id
    assert stat.S_IMODE(os.stat(tmp_path / "identity.key").st_mode) == 0o600


async def test_node_restart_keeps_peer_id(tmp_path, model_cache):
    ids = []
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, node_config(model_cache, span=(0, 2)), tmp_path / "n")
            ids.append(node.peer_id)
            nursery.cancel_scope.cancel()
    assert ids[0] == ids[1]
    assert not (tmp_path / "n" / "node.json").exists()


async def test_three_spans_equal_local(tmp_path, model_cache):
    converted, _ = prepare_model(model_cache)
    local = LocalModel.load(converted)
    tok = converted.load_tokenizer()
    ids = tok.encode(format_chat(converted.chat_template, PROMPT), add_special_tokens=False).ids
    expected = local.generate(ids, 8)
    async with trio.open_nursery() as nursery:
        nodes = await start_swarm(nursery, model_cache, tmp_path, [(0, 10), (10, 20), (20, 30)])
        client = await start_node(
            nursery, node_config(model_cache, serve=False, bootstrap=(nodes[0].p2p.listen_addrs()[0],)),
            tmp_path / "client")
        await client.client.wait_ready(20)
        result = await client.client.generate(PROMPT, 8)
        assert result.tokens == expected
        assert [(h["start"], h["end"]) for h in result.route] == [(0, 10), (10, 20), (20, 30)]
        stats = [n.server.statistics() for n in nodes]
        assert all(s.sessions_total == 1 and s.sessions_open == 0 for s in stats)
        nursery.cancel_scope.cancel()


async def test_forged_announcement_dropped(tmp_path, model_cache):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config(model_cache, span=(0, 2)), tmp_path / "n")
        victim, forger = Signer.generate(), Signer.generate()
        now = int(trio.current_time() * 0) or __import__("time").time_ns() // 1_000_000
        rec = SpanAnnouncement(victim.peer_id, node.client.model_id, 2, 30, ("/ip4/127.0.0.1/tcp/1",), now,
                               now + 30_000)
        forged = rec.signed(victim)
        forged = SpanAnnouncement(**{**forged.__dict__, "signature": forger.sign(b"poolai/announce/1", rec.signing_bytes())})
        async with raw_host() as peer:
            await peer.connect(node.p2p.listen_addrs()[0])
            # Through the direct exchange: the forged record is refused, the node answers anyway.
            stream = await peer.new_stream(node.p2p.peer_id, ["/poolai/swarm/1"])
            framed = FramedStream(stream, 3 * 512 * 1024)
            await framed.send({"t": "records", "records": [forged.encode()]}, 3 * 512 * 1024)
            reply = await framed.receive(5)
            assert reply["t"] == "records"
            # Through gossip, published by a peer that is not the record's author.
            await peer.pubsub.subscribe(ANNOUNCE_TOPIC)
            await trio.sleep(1.5)
            await peer.pubsub.publish(ANNOUNCE_TOPIC, rec.signed(victim).encode())
            await trio.sleep(1.0)
        assert victim.peer_id not in {a.peer_id for a in node.swarm.map.records()}
        assert node.swarm.statistics().rejected >= 2
        nursery.cancel_scope.cancel()


async def test_other_major_version_refused(tmp_path, model_cache):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config(model_cache, span=(0, 2)), tmp_path / "n")
        async with raw_host() as peer:
            await peer.connect(node.p2p.listen_addrs()[0])
            stream = await peer.new_stream(node.p2p.peer_id, ["/poolai/infer/2"])
            reply = await FramedStream(stream).receive(5)
        assert reply["t"] == "error" and reply["code"] == "version"
        assert "/poolai/infer/1" in reply["message"] and "/poolai/infer/2" in reply["message"]
        nursery.cancel_scope.cancel()


async def test_bad_frames_reset_and_node_keeps_serving(tmp_path, model_cache):
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config(model_cache, span=(0, 30)), tmp_path / "n")
        async with raw_host() as peer:
            await peer.connect(node.p2p.listen_addrs()[0])
            # 1. A header announcing 2 GiB: refused at the header.
            s = await peer.new_stream(node.p2p.peer_id, ["/poolai/infer/1"])
            await s.write(HEADER.pack(2**31))
            reply = await FramedStream(s).receive(5)
            assert reply["t"] == "error" and "over the" in reply["message"]
            # 2. Garbage that is not msgpack.
            s = await peer.new_stream(node.p2p.peer_id, ["/poolai/infer/1"])
            await s.write(HEADER.pack(4) + b"\xc1\xc1\xc1\xc1")
            reply = await FramedStream(s).receive(5)
            assert reply["t"] == "error" and reply["code"] == "bad_request"
            # 3. A well-formed open with a wrongly typed field.
            s = await peer.new_stream(node.p2p.peer_id, ["/poolai/infer/1"])
            await s.write(encode_frame({"t": "open", "v": 0, "session": "not bytes", "model": b"", "start": 0,
                                        "end": 1, "max_length": 8}))
            reply = await FramedStream(s).receive(5)
            assert reply["t"] == "error" and "'session'" in reply["message"]
        assert node.server.statistics().protocol_errors == 3
        # The node still serves a real generation.
        result = await node.client.generate(PROMPT, 4)
        assert len(result.tokens) == 4
        nursery.cancel_scope.cancel()


async def test_ping_measures_rtt_to_a_server(tmp_path, model_cache):
    from node.latency import Pinger

    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, node_config(model_cache, span=(0, 2)), tmp_path / "a")
        b = await start_node(nursery, node_config(model_cache, span=(2, 4), bootstrap=(a.p2p.listen_addrs()[0],)),
                             tmp_path / "b")
        pinger = Pinger(b.p2p, b.swarm, b.client.latency, b.client.model_id)
        rtt = await pinger.ping(a.p2p.peer_id)
        nursery.cancel_scope.cancel()
    assert 0 < rtt < 0.5


@pytest.mark.parametrize("protocol, request_", [
    ("/poolai/swarm/1", {"t": "records", "records": []}),
    ("/poolai/ledger-sync/1", {"t": "heads", "heads": [], "proofs": []}),
])
async def test_a_peer_that_resets_before_the_answer_is_still_served(tmp_path, model_cache, protocol, request_):
    """py-libp2p stops taking streams on a connection whose handler raised: a peer resetting a request
    before the answer was written used to be cut off for good (every later stream timed out)."""
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config(model_cache, span=(0, 2)), tmp_path / "n")
        async with raw_host() as peer:
            await peer.connect(node.p2p.listen_addrs()[0])
            for _ in range(3):
                s = await peer.new_stream(node.p2p.peer_id, [protocol])
                await s.write(encode_frame(request_))
                await s.reset()
            await trio.sleep(0.5)
            with trio.fail_after(5):
                s = await peer.new_stream(node.p2p.peer_id, ["/poolai/swarm/1"])
                framed = FramedStream(s, 1 << 20)
                await framed.send({"t": "records", "records": []})
                assert (await framed.receive(5))["t"] == "records"
        nursery.cancel_scope.cancel()


async def test_a_refused_session_ends_its_stream_at_once(tmp_path, model_cache):
    """After a refusal the server closes its side: the client reads the end of the stream, not a timeout."""
    from node.wire import StreamClosed

    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config(model_cache, span=(0, 2)), tmp_path / "n")
        async with raw_host() as peer:
            await peer.connect(node.p2p.listen_addrs()[0])
            s = await peer.new_stream(node.p2p.peer_id, ["/poolai/infer/1"])
            framed = FramedStream(s, 1 << 20)
            await framed.send({"t": "open", "v": 1, "session": b"s" * 16, "model": b"\0" * 32, "start": 0,
                               "end": 2, "max_length": 8})
            reply = await framed.receive(5)
            assert reply["t"] == "error" and reply["code"] == "unknown_model"
            with trio.fail_after(2), pytest.raises(StreamClosed):
                await framed.receive()
        nursery.cancel_scope.cancel()
