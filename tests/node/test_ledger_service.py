"""node.ledger.LedgerService over real libp2p hosts on 127.0.0.1: heads gossip, anti-entropy, fraud, policy."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node.ledger import SYNC_PROTOCOL, make_receipt, open_ledger_node, verify_store
from node.ledger_store import LedgerStore
from node.testing import raw_host
from node.wire import FramedStream
from protocol.ledger import CREDIT, DEBIT, FREE_TIER_UNITS, EquivocationProof, LedgerState, balances
from protocol.signing import Signer
from protocol.versions import LEDGER_HEADS_TOPIC

MODEL = bytes(range(32))
SPAN = (0, 3)
START_MS = int(time.time() * 1000) - 1000
WAIT_S = 30.0  # generous: the machine is shared; the conditions usually hold within a second


def now_ms() -> int:
    return int(time.time() * 1000)


def receipt(client, server, sid: bytes, seq: int, tokens: int):
    return make_receipt(client, server, sid, seq, tokens, model_id=MODEL, span=SPAN, started_ms=START_MS,
                        last_ms=now_ms())


async def served(client_node, server_node, tokens: int, sid: bytes | None = None, seq: int = 1):
    r = receipt(client_node.signer, server_node.signer, sid or os.urandom(16), seq, tokens)
    await client_node.service.record(r, DEBIT)
    await server_node.service.record(r, CREDIT)
    return r


async def wait_until(pred, timeout: float = WAIT_S) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def all_balances(nodes) -> list[dict]:
    return [await n.service.current_balances() for n in nodes]


async def test_heads_gossip_and_sync_converge_and_duplicates_count_once(tmp_path: Path):
    async with open_ledger_node(tmp_path / "a") as a, open_ledger_node(tmp_path / "b") as b, \
            open_ledger_node(tmp_path / "c") as c:
        await b.p2p.connect(a.addr())
        await c.p2p.connect(b.addr())  # a line: a - b - c, so c learns a's chain through b
        sid = os.urandom(16)
        r1 = await served(a, b, 10, sid, 1)
        r2 = await served(a, b, 25, sid, 2)  # the same session, cumulative: 25 tokens in all
        # Repeating receipts, old or current, records nothing and counts once.
        assert await a.service.record(r1, DEBIT) is None
        assert await b.service.record(r2, CREDIT) is None
        assert a.service.statistics().duplicates == 1 and b.service.statistics().duplicates == 1
        await served(c, a, 4)
        await wait_until(lambda: all(n.service.holds(x.peer_id, 2) for n in (a, b, c) for x in (a, b)))
        await wait_until(lambda: all(n.service.holds(c.peer_id, 1) and n.service.holds(a.peer_id, 3)
                                     for n in (a, b, c)))
        views = await all_balances([a, b, c])
        assert views[0] == views[1] == views[2]
        units = 3  # blocks in SPAN
        assert views[0] == {a.peer_id: -25 * units + 4 * units, b.peer_id: 25 * units, c.peer_id: -4 * units}
        assert sum(views[0].values()) == 0
        for n in (a, b, c):
            assert (await n.service.verify())["ok"]
        summary = await a.service.summary()
        assert summary["balance"] == -21 * units and summary["entries"] == 3
        assert {p["sessions"] for p in summary["counterparties"]} == {1}


async def test_late_joiner_gets_everything_by_anti_entropy(tmp_path: Path):
    async with open_ledger_node(tmp_path / "a", sync_interval_s=0.3) as a, \
            open_ledger_node(tmp_path / "b", sync_interval_s=0.3) as b:
        await b.p2p.connect(a.addr())
        for tokens in (5, 6, 7):
            await served(a, b, tokens)
        await wait_until(lambda: b.service.holds(a.peer_id, 3))
        # d arrives after every head was published: only anti-entropy can bring it the chains.
        async with open_ledger_node(tmp_path / "d", sync_interval_s=0.3) as d:
            await d.p2p.connect(b.addr())
            await wait_until(lambda: d.service.holds(a.peer_id, 3) and d.service.holds(b.peer_id, 3))
            assert d.service.statistics().syncs >= 1
            assert await d.service.current_balances() == await a.service.current_balances()


async def test_equivocation_is_caught_by_a_third_node_and_frozen_everywhere(tmp_path: Path):
    kp = create_new_key_pair()
    async with open_ledger_node(tmp_path / "x", key_pair=kp) as x, open_ledger_node(tmp_path / "s") as s, \
            open_ledger_node(tmp_path / "t") as t, open_ledger_node(tmp_path / "w") as w:
        await s.p2p.connect(x.addr())
        await t.p2p.connect(s.addr())
        await w.p2p.connect(t.addr())
        first = await served(x, s, 10)
        await wait_until(lambda: all(n.service.holds(x.peer_id, 1) for n in (s, t, w)))
        # x signs a second, different entry at seq 1 in another store with the same key (its "clone").
        clone = LedgerStore.open(tmp_path / "clone.sqlite", x.signer)
        other = receipt(x.signer, t.signer, os.urandom(16), 1, 99)
        forged = clone.append_own(DEBIT, other, now_ms())
        clone.close()
        assert forged.seq == 1 and forged.entry_hash() != (await trio.to_thread.run_sync(x.store.head)).entry_hash()
        # t is handed the forged entry (as if x had sent it to t alone): t holds another entry at seq 1.
        await t.service.add_entries([forged])
        await wait_until(lambda: all(n.service.is_frozen(x.peer_id) for n in (s, t, w)))
        assert t.service.statistics().fraud_published >= 1
        proof = (await trio.to_thread.run_sync(w.store.proofs))[0]
        # The proof stands on its own: decoded from bytes, checked with nothing but x's peer ID.
        again = EquivocationProof.decode(proof.encode())
        again.verify()
        assert again.author == x.peer_id and again.seq == 1
        views = await all_balances([s, t, w])
        assert views[0] == views[1] == views[2]
        assert views[0].get(x.peer_id, 0) == 0 and sum(views[0].values()) == 0  # x's seq >= 1 counts for nobody
        assert not w.service.may_serve(x.peer_id)
        del first


async def test_forged_heads_are_dropped_by_the_validator(tmp_path: Path):
    async with open_ledger_node(tmp_path / "b") as b, raw_host() as peer:
        # A bare pubsub host without the ledger's validator publishes an entry authored by someone
        # else, and garbage: b's validator refuses both.
        await peer.connect(b.addr())
        await peer.pubsub.subscribe(LEDGER_HEADS_TOPIC)
        victim = Signer.generate()
        store = LedgerStore.open(tmp_path / "victim.sqlite", victim)
        entry = store.append_own(CREDIT, receipt(b.signer, victim, os.urandom(16), 1, 3), now_ms())
        store.close()
        with trio.fail_after(WAIT_S):
            while b.service.statistics().heads_rejected < 2:
                await peer.pubsub.publish(LEDGER_HEADS_TOPIC, entry.encode())
                await peer.pubsub.publish(LEDGER_HEADS_TOPIC, b"\x93not an entry")
                await trio.sleep(0.3)
        assert not b.service.holds(victim.peer_id, 1)
        assert "published by its author" in b.service.statistics().last_error or \
            "not valid msgpack" in b.service.statistics().last_error


async def test_sybil_ring_gains_nothing_from_honest_nodes(tmp_path: Path):
    sybils = [Signer.generate() for _ in range(5)]
    async with open_ledger_node(tmp_path / "h0") as h0, open_ledger_node(tmp_path / "h1") as h1, \
            open_ledger_node(tmp_path / "ring") as ring:
        await h1.p2p.connect(h0.addr())
        await ring.p2p.connect(h0.addr())
        stores = [LedgerStore.open(tmp_path / f"s{i}.sqlite", s) for i, s in enumerate(sybils)]
        try:
            # Fake work among the ring: sybil 0 "serves" each of the others, a lot, and they one another.
            for i, client in enumerate(sybils):
                for j, server in enumerate(sybils):
                    if i != j and (j == 0 or (i + 1) % 5 == j):
                        r = receipt(client, server, os.urandom(16), 1, 100_000 if j == 0 else 7_000)
                        stores[i].append_own(DEBIT, r, now_ms())
                        stores[j].append_own(CREDIT, r, now_ms())
            # One real session with an outsider: h0 served sybil 0 for 40 tokens.
            real = receipt(sybils[0], h0.signer, os.urandom(16), 1, 40)
            stores[0].append_own(DEBIT, real, now_ms())
            await h0.service.record(real, CREDIT)
            chains = [s.entries(p.peer_id, 1, None, 100) for s, p in zip(stores, sybils)]
        finally:
            for s in stores:
                s.close()
        for chain in chains:  # the ring host spreads all five chains
            assert await ring.service.add_entries(chain) == len(chain)
        await wait_until(lambda: all(h1.service.holds(p.peer_id, len(c)) for p, c in zip(sybils, chains)))
        view = await h1.service.current_balances()
        ring_total = sum(view.get(p.peer_id, 0) for p in sybils)
        assert ring_total == -40 * 3  # exactly what the ring consumed from the honest node, nothing more
        assert view[h0.peer_id] == 40 * 3 and view.get(h1.peer_id, 0) == 0
        assert max(view[p.peer_id] for p in sybils) > FREE_TIER_UNITS  # fake credit moved inside the ring
        assert sum(view.values()) == 0
        assert view == balances(LedgerState.trusted(await trio.to_thread.run_sync(h1.store.chains)))


async def test_credit_policy_refuses_below_the_free_tier(tmp_path: Path):
    async with open_ledger_node(tmp_path / "a", credit_limit=300) as a, \
            open_ledger_node(tmp_path / "b", credit_limit=300) as b:
        await b.p2p.connect(a.addr())
        assert b.service.may_serve(a.peer_id)
        await served(a, b, 100)  # 300 units: a now sits exactly at -L
        await wait_until(lambda: b.service.balance(a.peer_id) == -300)
        assert not b.service.may_serve(a.peer_id)
        assert a.service.may_serve(b.peer_id)


async def test_bad_sync_messages_get_an_error_and_the_node_keeps_running(tmp_path: Path):
    async with open_ledger_node(tmp_path / "a") as a, raw_host() as peer:
        await peer.connect(a.addr())
        stream = await peer.new_stream(a.p2p.peer_id, [SYNC_PROTOCOL])
        framed = FramedStream(stream)
        await framed.send({"t": "heads", "heads": [[b"short", 1, b"x"]], "proofs": []})
        answer = await framed.receive(10)
        assert answer["t"] == "error" and "head is" in answer["message"]
        await framed.close()
        async with open_ledger_node(tmp_path / "b") as b:
            await b.p2p.connect(a.addr())
            await served(b, a, 2)
            await wait_until(lambda: b.service.holds(a.peer_id, 1))
        assert a.service.statistics().sync_failures >= 1


async def test_verify_reports_a_tampered_store(tmp_path: Path):
    async with open_ledger_node(tmp_path / "a") as a, open_ledger_node(tmp_path / "b") as b:
        await served(a, b, 5)
        await served(a, b, 6)
        assert (await a.service.verify())["ok"]
        path = a.store.path
    conn = sqlite3.connect(path)
    conn.execute("UPDATE entries SET balance_after = balance_after + 1 WHERE seq = 2")
    conn.commit()
    conn.close()
    store = LedgerStore.open(path)
    try:
        report = verify_store(store)
    finally:
        store.close()
    assert not report["ok"] and any("columns disagree" in f for f in report["faults"])


def test_config_default_credit_limit_is_the_free_tier():
    from node.config import NodeConfig, config_from_dict

    assert NodeConfig().ledger_credit_limit == FREE_TIER_UNITS
    c = config_from_dict({"ledger": {"credit_limit": 5, "sync_interval_s": 0.5}}, "t.toml")
    assert (c.ledger_credit_limit, c.ledger_sync_interval_s) == (5, 0.5)


async def test_generation_through_a_swarm_settles_countersigned_receipts(tmp_path: Path, model_cache):
    """Real weights, real hosts: a generation leaves a DEBIT per hop in the client's chain and the
    matching CREDIT in each server's; balances agree everywhere and sum to zero; past the (small) free
    tier the servers refuse the client with a clear answer."""
    from node.errors import GenerationError
    from node.testing import node_config, start_node

    spans = [(0, 14), (14, 30)]
    limit = 1000  # units: one short generation through both spans takes the client below -limit
    async with trio.open_nursery() as nursery:
        first = await start_node(nursery, node_config(model_cache, span=spans[0], ledger_credit_limit=limit,
                                                      ledger_sync_interval_s=0.5), tmp_path / "s0")
        boot = (first.p2p.listen_addrs()[0],)
        second = await start_node(nursery, node_config(model_cache, span=spans[1], bootstrap=boot,
                                                       ledger_credit_limit=limit, ledger_sync_interval_s=0.5),
                                  tmp_path / "s1")
        client = await start_node(nursery, node_config(model_cache, serve=False, bootstrap=boot,
                                                       ledger_sync_interval_s=0.5), tmp_path / "c")
        await client.client.wait_ready(30)
        result = await client.client.generate("Name three primary colours.", 20)
        fed = result.prompt_tokens + len(result.tokens) - 1  # tokens each hop computed
        expected = {first.swarm.signer.peer_id: fed * 14, second.swarm.signer.peer_id: fed * 16}
        me = client.swarm.signer.peer_id
        nodes = [first, second, client]
        await wait_until(lambda: all(n.ledger.holds(m.swarm.signer.peer_id, 2 if m is client else 1)
                                     for n in nodes for m in nodes))

        async def settled():
            views = [await n.ledger.current_balances() for n in nodes]
            return views if all(v == views[0] for v in views) and views[0].get(me) == -sum(expected.values()) \
                else None

        with trio.fail_after(WAIT_S):
            while (views := await settled()) is None:
                await trio.sleep(0.2)
        view = views[0]
        assert sum(view.values()) == 0
        for peer, units in expected.items():
            assert view[peer] == units
        # The client's chain: DEBITs only, each a countersigned receipt for one of its hops.
        chain = (await trio.to_thread.run_sync(client.ledger.store.chains))[me]
        assert {e.kind for e in chain} == {DEBIT}
        last = {}
        for e in chain:
            r = e.receipt()
            r.verify(countersigned=True)
            last[r.server] = r
        assert {p: r.units for p, r in last.items()} == expected
        assert client.client.statistics().receipts >= 2
        assert first.server.statistics().receipts >= 1 and second.server.statistics().receipts >= 1
        summary = await client.ledger.summary()
        assert summary["balance"] == -sum(expected.values()) and len(summary["counterparties"]) == 2
        # Below -limit now: the servers answer "credit", and the client says so in one line.
        with trio.fail_after(WAIT_S):
            try:
                await client.client.generate("Again?", 4)
            except GenerationError as e:
                assert "free tier" in str(e)
            else:
                raise AssertionError("a client below the free tier was served")
        assert first.server.statistics().refused_credit + second.server.statistics().refused_credit >= 1
        nursery.cancel_scope.cancel()
