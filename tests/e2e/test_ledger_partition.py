"""A 6-node loopback swarm of ledger nodes (real libp2p hosts) split in two halves, spending on both
sides, then healed: every node ends with identical balances, and a double spend made across the
partition (one identity signing two different entries at one seq, one shown to each half) is caught
and its author frozen everywhere.
"""

from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node.ledger import make_receipt, open_ledger_node
from protocol.ledger import CREDIT, DEBIT

MODEL = bytes(range(32))
SPAN = (0, 10)
WAIT_S = 60.0
START_MS = int(time.time() * 1000) - 1000


def receipt(client, server, tokens: int):
    return make_receipt(client.signer, server.signer, os.urandom(16), 1, tokens, model_id=MODEL, span=SPAN,
                        started_ms=START_MS, last_ms=int(time.time() * 1000))


async def spend(client, server, tokens: int) -> None:
    r = receipt(client, server, tokens)
    await client.service.record(r, DEBIT)
    await server.service.record(r, CREDIT)


async def wait_until(pred, timeout: float = WAIT_S) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def connect_all(nodes) -> None:
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            await a.p2p.connect(b.addr())


async def disconnect(a, b) -> None:
    for x, y in ((a, b), (b, a)):
        try:
            await x.p2p.host.disconnect(y.p2p.peer_id)
        except Exception:
            pass


async def test_partition_heal_converges_and_catches_a_cross_partition_double_spend(tmp_path: Path):
    x_key = create_new_key_pair()  # n2's key: n2 sits in half A, its clone in half B
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(6):
            nodes.append(await stack.enter_async_context(
                open_ledger_node(tmp_path / f"n{i}", key_pair=x_key if i == 2 else None, sync_interval_s=0.5)))
        half_a, half_b = nodes[:3], nodes[3:]
        n0, n1, n2, n3, n4, n5 = nodes
        await connect_all(nodes)
        await spend(n2, n0, 100)  # a shared history before the split: n2's seq 1
        await spend(n3, n4, 50)
        await wait_until(lambda: all(n.service.holds(n2.peer_id, 1) and n.service.holds(n4.peer_id, 1)
                                     for n in nodes))

        # The clone of n2 joins half B with n2's history.
        async with open_ledger_node(tmp_path / "clone", key_pair=x_key, sync_interval_s=0.5) as clone:
            # Split: no connection crosses the halves (nothing redials by itself).
            for a in half_a:
                for b in half_b:
                    await disconnect(a, b)
            for b in half_b:
                await clone.p2p.connect(b.addr())
            await wait_until(lambda: clone.service.holds(n2.peer_id, 1))
            assert not any(b.p2p.peer_id in a.p2p.connected_peers() for a in half_a for b in half_b)

            # Spend on both sides; n2 and its clone both spend n2's seq 2: the double spend.
            await spend(n2, n1, 70)
            await spend(n0, n1, 20)
            await spend(clone, n5, 90)
            await spend(n4, n5, 30)
            await wait_until(lambda: all(n.service.holds(n2.peer_id, 2) and n.service.holds(n1.peer_id, 2)
                                         for n in half_a))
            await wait_until(lambda: all(n.service.holds(n2.peer_id, 2) and n.service.holds(n5.peer_id, 2)
                                         for n in half_b))
            assert not any(n.service.is_frozen(n2.peer_id) for n in nodes)  # nobody can tell yet
        # The clone leaves (one peer ID cannot be connected twice); heal the partition.
        for a in half_a:
            for b in half_b:
                await a.p2p.connect(b.addr())

        await wait_until(lambda: all(n.service.is_frozen(n2.peer_id) for n in nodes))
        assert all(n.service.frozen()[n2.peer_id] == 2 for n in nodes)  # the first forked seq, everywhere
        everyone = [n0, n1, n3, n4, n5]
        await wait_until(lambda: all(n.service.holds(m.peer_id, m.service.heads()[m.peer_id])
                                     for n in nodes for m in everyone))

        async def views():
            return [await n.service.current_balances() for n in nodes]

        with trio.fail_after(WAIT_S):
            while len({tuple(sorted(v.items())) for v in await views()}) != 1:
                await trio.sleep(0.2)
        view = (await views())[0]
        assert sum(view.values()) == 0
        units = SPAN[1] - SPAN[0]
        # n2's seq 1 (before the fork) still settles; neither branch of its double spend does.
        assert view[n2.peer_id] == -100 * units
        assert view[n0.peer_id] == (100 - 20) * units
        assert view[n1.peer_id] == 20 * units  # n2's 70 at the forked seq counts for nobody
        assert view[n3.peer_id] == -50 * units and view[n4.peer_id] == (50 - 30) * units
        assert view[n5.peer_id] == 30 * units
        for n in nodes:
            assert not n.service.may_serve(n2.peer_id)
            assert (await n.service.verify())["faults"] == [] or n is n2
        assert sum(n.service.statistics().fraud_published for n in nodes) >= 1
