"""The overlay service on real libp2p hosts on 127.0.0.1, many in one process (node/overlay.py).

No model: each node is a bare host (node.p2p.open_p2p) with an OverlayService. Stabilisation rounds
are driven by the test (period_s is huge), so "after the stabilisation rounds" is a count, not a
sleep. Expected answers are computed from all live positions with protocol.overlay.closest_peers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.overlay import OverlayService
from node.p2p import open_p2p
from node.testing import LOOPBACK, raw_host
from node.wire import FramedStream
from protocol.codec import HEADER, encode_frame
from protocol.overlay import RECORD_REPLICAS, abs_distance, closest_peers, rank, ring_position
from protocol.ring import (
    MAX_VALUE_BYTES,
    RING_PROTOCOL,
    RingRecord,
    decode_reply,
    find_request,
    found_reply,
    key_position,
    make_record,
    store_request,
)
from protocol.signing import Signer, peer_id_from_public_key

# Driven by hand; the run loop never fires during a test.
NEVER = 1e9


@dataclass
class Member:
    svc: OverlayService
    scope: trio.CancelScope
    alive: bool = True

    @property
    def peer(self) -> bytes:
        return self.svc.me


async def _run_member(seed: bytes, cls, rng_seed: int, period_s: float, *,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    key_pair = create_new_key_pair(seed)
    signer = Signer.from_seed(key_pair.private_key.to_bytes())
    with trio.CancelScope() as scope:
        async with open_p2p(key_pair, [LOOPBACK]) as p2p:
            svc = cls(p2p, signer, period_s=period_s, rng=random.Random(rng_seed))
            async with trio.open_nursery() as nursery:
                await nursery.start(svc.run)
                task_status.started(Member(svc, scope))
                await trio.sleep_forever()


async def start_ring(nursery, n: int, seed: int, cls_for=lambda i: OverlayService,
                     period_s: float = NEVER) -> list[Member]:
    """n members with identities fixed by `seed`, started together, joining in waves of 1, 2, 4, 8..."""
    members: list[Member | None] = [None] * n

    async def start(i: int) -> None:
        members[i] = await nursery.start(_run_member, random.Random(seed * 1000 + i).randbytes(32), cls_for(i),
                                         seed + i, period_s)

    async with trio.open_nursery() as starting:
        for i in range(n):
            starting.start_soon(start, i)
    # Joins in waves, each through a member of the ring so far, concurrently within a wave.
    joined = 1
    while joined < n:
        wave = range(joined, min(n, 2 * joined))

        async def join(i: int) -> None:
            boot = members[i % joined]
            await members[i].svc.p2p.connect(boot.svc.p2p.listen_addrs()[0])
            assert await members[i].svc.join([boot.peer])

        async with trio.open_nursery() as joining:
            for i in wave:
                joining.start_soon(join, i)
        joined = wave.stop
    return members


async def rounds(members: list[Member], count: int) -> None:
    for _ in range(count):
        async with trio.open_nursery() as nursery:
            for m in members:
                if m.alive:
                    nursery.start_soon(m.svc.stabilise_once)


def live(members: list[Member]) -> dict[bytes, int]:
    return {m.peer: ring_position(m.peer) for m in members if m.alive}


async def check_lookups(members: list[Member], keys: list[int], honest: dict[bytes, int] | None = None) -> int:
    """Every live member looks up every key; each answer's first peer must be the true owner."""
    positions = live(members) if honest is None else honest
    wrong: list[str] = []
    hops = 0

    async def one(m: Member) -> None:
        nonlocal hops
        for key in keys:
            res = await m.svc.lookup(key)
            expect = closest_peers(key, positions, 1)[0]
            hops += res.hops
            if res.peers[0] != expect:
                wrong.append(f"{key:016x} from {m.svc.position:016x}")

    async with trio.open_nursery() as nursery:
        for m in members:
            if m.alive and (honest is None or m.peer in honest):
                nursery.start_soon(one, m)
    assert not wrong, f"{len(wrong)} lookups ended away from the owner, e.g. {wrong[:3]}"
    return hops


async def test_24_nodes_lookups_records_and_30_percent_killed():
    rng = random.Random(7)
    keys = [rng.getrandbits(64) for _ in range(100)]
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            members = await start_ring(nursery, 24, seed=7)
            await rounds(members, 2)
            everyone = live(members)
            for m in members:
                st = m.svc.statistics()
                assert st.successors == 8 and st.predecessors == 8, st
                # Short lists are exactly the 8 nearest on each side among all 24.
                ordered = sorted(everyone, key=lambda p: (everyone[p] - m.svc.position) % (1 << 64))
                assert set(m.svc.table.successors) == set(ordered[1:9])
                assert set(m.svc.table.predecessors) == set(ordered[-8:])
                assert 12 <= st.n_hat <= 48
                assert st.k == 8
                # Every neighbour is a live libp2p connection (what gossipsub meshes over).
                conns = {p.to_bytes() for p in m.svc.p2p.connected_peers()}
                assert set(m.svc.table.neighbours()) <= conns
            assert sum(len(m.svc.table.long_links) for m in members) > 0
            assert all(len(m.svc.table.inbound) <= 16 for m in members)

            hops = await check_lookups(members, keys)
            assert hops > 0  # some lookups did leave the asking node

            # Records: put from one node, read from another; then held by the R nodes closest to the key.
            written = []
            for i in range(12):
                writer, reader = members[i], members[(i * 7 + 5) % 24]
                key, value = f"record-{i}".encode(), rng.randbytes(64)
                assert await writer.svc.put(key, value) == RECORD_REPLICAS
                got = await reader.svc.get(key)
                assert [(r.author, r.value) for r in got] == [(writer.peer, value)]
                written.append((key, writer.peer, value))
            for key, _, _ in written:
                holders = {m.peer for m in members if any(k == key for k, _ in m.svc.records)}
                assert holders == set(closest_peers(key_position(key), everyone, RECORD_REPLICAS))

            # Kill 30% (7 of 24) at once: their hosts close.
            victims = random.Random(11).sample(range(24), 7)
            for i in victims:
                members[i].alive = False
                members[i].scope.cancel()
            await trio.sleep(0.5)  # let the hosts finish closing
            await rounds(members, 3)
            survivors = live(members)
            await check_lookups(members, keys)
            for key, author, value in written:
                holders = {m.peer for m in members if m.alive and any(k == key for k, _ in m.svc.records)}
                # Re-replicated: the R closest live nodes hold it again.
                assert set(closest_peers(key_position(key), survivors, RECORD_REPLICAS)) <= holders, key
                reader = members[[i for i in range(24) if i not in victims][len(key) % 17]]
                got = await reader.svc.get(key)
                assert [(r.author, r.value) for r in got] == [(author, value)]
            st = members[[i for i in range(24) if i not in victims][0]].svc.statistics()
            assert st.lookups_made >= 200 and st.hop_histogram and st.records_held > 0
            assert all(n.distance > 0 for n in st.neighbours)
            assert not {bytes(ID.from_base58(n.peer_id).to_bytes()) for n in st.neighbours} & {
                members[i].peer for i in victims}
            nursery.cancel_scope.cancel()


class Liar(OverlayService):
    """Answers every lookup hop with the farthest peer it knows (mode 'far'), a made-up peer closer to
    the key ('fake'), or claims to own every key ('owner')."""

    mode = "far"

    def answer_find(self, key_pos: int) -> dict:
        known = self.table.neighbours()
        if self.mode == "far":
            far = max(known, key=lambda p: abs_distance(known[p], key_pos))
            return found_reply((far, self.addr_book.get(far, ())), [], self.table.n_hat)
        if self.mode == "fake":
            # A made-up peer ID that hashes closer to the key than the liar (so the hop check passes).
            rng = random.Random(key_pos)
            for _ in range(5000):
                fake = peer_id_from_public_key(rng.randbytes(32))
                if rank(ring_position(fake), key_pos) < rank(self.position, key_pos):
                    break
            # Half of them with an address nobody listens on (a failed dial, ~0.7 s), half with none.
            addrs = ("/ip4/127.0.0.1/tcp/1",) if key_pos % 2 else ()
            return found_reply((fake, addrs), [(fake, addrs)], self.table.n_hat)
        return found_reply(None, [(self.me, self.my_addrs())], self.table.n_hat)


@pytest.mark.parametrize("mode", ["far", "fake", "owner"])
async def test_lying_peer_does_not_break_routing(mode, caplog):
    caplog.set_level(logging.WARNING, logger="poolai.overlay")
    liar_index = 3

    class ModeLiar(Liar):
        pass

    ModeLiar.mode = mode
    rng = random.Random(5)
    # A made-up peer with an address costs the asker a failed dial (~0.7 s), hence fewer keys there.
    keys = [rng.getrandbits(64) for _ in range(6 if mode == "fake" else 20)]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            members = await start_ring(nursery, 8, seed=5,
                                       cls_for=lambda i: ModeLiar if i == liar_index else OverlayService)
            await rounds(members, 2)
            liar = members[liar_index].peer
            honest = {p: q for p, q in live(members).items() if p != liar}
            wrong: list[tuple] = []

            async def ask(m: Member) -> None:
                for key in keys:
                    # A lookup that starts at the liar (as a joining node's would).
                    res = await m.svc._route(key, 1, first=liar)
                    # Caught lying ('far'): ignored, so the owner among the honest nodes; not caught
                    # (a made-up closer peer that cannot be dialled, a false claim of ownership that
                    # the asker's own table contradicts): the true owner, which may be the liar itself.
                    expect = closest_peers(key, honest if mode == "far" else live(members), 1)[0]
                    if res.peers[0] != expect:
                        wrong.append((m.svc.position, key))

            async with trio.open_nursery() as asking:  # concurrently: failed dials mostly wait
                for m in members:
                    if m.peer != liar:
                        asking.start_soon(ask, m)
            assert not wrong, wrong[:3]
            penalties = sum(m.svc.statistics().penalties for m in members if m.peer != liar)
            if mode == "far":
                assert penalties > 0
                assert "no closer to the key than itself" in caplog.text
            # Routing still works after all that: a liar caught lying is ignored (owner among the honest
            # nodes); one that is not caught still owns its own keys.
            await check_lookups(members, keys, honest if mode == "far" else None)
            nursery.cancel_scope.cancel()


async def _raw_request(p2p, peer: ID, data: bytes) -> dict | None:
    stream = await p2p.new_stream(peer, [RING_PROTOCOL])
    framed = FramedStream(stream)
    await stream.write(data)
    try:
        return await framed.receive(10)
    except Exception:
        return None
    finally:
        await framed.close()


async def test_bad_input_is_dropped_and_node_keeps_running(caplog):
    caplog.set_level(logging.INFO, logger="poolai.overlay")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            members = await start_ring(nursery, 3, seed=9)
            await rounds(members, 1)
            target = members[0].svc
            async with raw_host() as raw:
                await raw.connect(target.p2p.listen_addrs()[0])
                pid = target.p2p.peer_id
                # Malformed ring messages: not msgpack, unknown type, bad field, oversized frame header.
                assert await _raw_request(raw, pid, HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1") is None
                assert await _raw_request(raw, pid, encode_frame({"t": "hello", "a": []})) is None
                assert await _raw_request(raw, pid, encode_frame({"t": "find", "key": -1, "a": []})) is None
                assert await _raw_request(raw, pid, encode_frame({"t": "stab", "n": float("nan"), "a": []})) is None
                assert await _raw_request(raw, pid, HEADER.pack(50 * 1024 * 1024) + b"\0" * 16) is None
                assert target.statistics().malformed == 5
                assert caplog.text.count("reset a ring stream") == 5

                # Records: oversized, badly signed, expired, under a foreign author: each dropped alone.
                signer = Signer.generate()
                now = target.wall_ms()
                good = make_record(signer, b"k", b"v", now, 60_000)
                big = RingRecord(signer.peer_id, b"k2", b"x" * (MAX_VALUE_BYTES + 1), now, now + 60_000).signed(signer)
                forged = RingRecord(signer.peer_id, b"k3", b"v", now, now + 60_000, good.signature)
                expired = RingRecord(signer.peer_id, b"k4", b"v", now - 120_000, now - 60_000).signed(signer)
                stolen = RingRecord(Signer.generate().peer_id, b"k5", b"v", now, now + 60_000, good.signature)
                raws = [good.encode(), big.encode(), forged.encode(), expired.encode(), stolen.encode(), b"\x93"]
                reply = await _raw_request(raw, pid, encode_frame(store_request(raws, ()), 1 << 20))
                assert decode_reply(reply, "store") == 1
                assert set(target.records) == {(b"k", signer.peer_id)}
                st = target.statistics()
                assert st.records_rejected == 5
                for reason in ("over the", "bad signature", "expired"):
                    assert reason in caplog.text
                with pytest.raises(ValueError):
                    await target.put(b"k", b"x" * (MAX_VALUE_BYTES + 1))
                with pytest.raises(ValueError):
                    await target.put(b"", b"v")

                # Another major version: a refusal naming both.
                stream = await raw.new_stream(pid, ["/poolai/ring/2"])
                framed = FramedStream(stream)
                refusal = await framed.receive(10)
                assert refusal["t"] == "error" and "/poolai/ring/1" in refusal["msg"] and "/poolai/ring/2" in refusal["msg"]
                await framed.close()

                # Still serving: a valid lookup hop and a whole lookup from another member.
                reply = await _raw_request(raw, pid, encode_frame(find_request(12345, ())))
                assert decode_reply(reply, "find").n_hat >= 1
                res = await members[1].svc.lookup(ring_position(target.me))
                assert res.peers[0] == target.me
            nursery.cancel_scope.cancel()


async def test_run_loop_joins_and_repairs_on_its_own():
    """The periodic loop (short period) keeps the ring right without the test driving rounds."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            members = await start_ring(nursery, 6, seed=3, period_s=0.3)
            # The first members joined a tiny ring; the loop must bring every list to the full 5 others.
            while not all(len(m.svc.table.successors) == 5 for m in members):
                await trio.sleep(0.1)
            members[2].alive = False
            members[2].scope.cancel()
            gone = members[2].peer
            while any(gone in m.svc.table.neighbours() for m in members if m.alive):
                await trio.sleep(0.1)
            await check_lookups(members, [random.Random(i).getrandbits(64) for i in range(20)])
            nursery.cancel_scope.cancel()
