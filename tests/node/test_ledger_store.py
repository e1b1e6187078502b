"""node.ledger_store: persistence, foreign entries, equivocation, and kill -9 at random points."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from node.errors import StartupError
from node.ledger_store import LedgerStatistics, LedgerStore
from protocol.ledger import (
    CREDIT,
    DEBIT,
    ChainCursor,
    EquivocationProof,
    LedgerState,
    Receipt,
    ReceiptRejected,
    balances,
    validate_chain,
)
from protocol.signing import Signer

REPO = Path(__file__).resolve().parents[2]
SIGNERS = [Signer.from_seed(hashlib.sha256(b"store-test-%d" % i).digest()) for i in range(4)]
A, B, C, D = SIGNERS
NOW = 1_700_000_000_000


def receipt(client: Signer, server: Signer, n: int, seq: int, tokens: int) -> Receipt:
    r = Receipt(
        session_id=hashlib.sha256(client.peer_id + server.peer_id + b"%d" % n).digest()[:16],
        client=client.peer_id,
        server=server.peer_id,
        model_id=bytes(32),
        span_start=0,
        span_end=4,
        seq=seq,
        tokens=tokens,
        units=tokens * 4,
        io_commitment=bytes(32),
        client_nonce=b"c" * 16,
        server_nonce=b"s" * 16,
        started_ms=NOW,
        last_ms=NOW + seq,
    )
    return r.sign_as_server(server).sign_as_client(client)


def test_append_persists_across_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with LedgerStore.open(path, A) as store:
        e1 = store.append_own(DEBIT, receipt(A, B, 0, 1, 5), NOW)
        e2 = store.append_own(DEBIT, receipt(A, B, 0, 2, 8), NOW + 1)
        e3 = store.append_own(CREDIT, receipt(C, A, 0, 1, 3).encode(), NOW - 10)  # clock went back
        assert [e.seq for e in (e1, e2, e3)] == [1, 2, 3]
        assert e3.time_ms == NOW + 1
        assert [e.balance_after for e in (e1, e2, e3)] == [-20, -32, -20]
        with pytest.raises(ReceiptRejected) as info:
            store.append_own(DEBIT, receipt(A, B, 0, 2, 8), NOW + 2)  # the same receipt again
        assert info.value.reason == "replay"
        with pytest.raises(ReceiptRejected) as info:
            store.append_own(DEBIT, receipt(A, B, 0, 3, 7), NOW + 2)
        assert info.value.reason == "decreasing_counters"
    with LedgerStore.open(path, A) as store:
        assert store.head() == e3
        assert store.entries(A.peer_id, 2, 3) == [e2, e3]
        assert store.heads() == {A.peer_id: 3}
        assert store.verify_all() == []
        e4 = store.append_own(DEBIT, receipt(A, B, 0, 3, 9), NOW + 5)
        assert e4.seq == 4 and e4.prev_hash == e3.entry_hash() and e4.balance_after == -24
        assert validate_chain(store.chains()[A.peer_id]) is None
        assert store.statistics() == LedgerStatistics(entries=4, authors=1, own_head_seq=4, proofs=0, balance=0)
    with pytest.raises(StartupError):
        LedgerStore.open(path, B)  # another identity's file


def test_two_writers_on_one_file_never_fork(tmp_path):
    # The head is read inside BEGIN IMMEDIATE, so even two handles on one file (two processes, or a
    # store reopened while an old handle lingers) extend one chain.
    path = tmp_path / "ledger.sqlite"
    handles = [LedgerStore.open(path, A), LedgerStore.open(path, A)]
    errors = []

    def writer(k):
        try:
            for seq in range(1, 21):
                handles[k].append_own(DEBIT, receipt(A, B, 100 + k, seq, seq), NOW + seq)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    chain = handles[0].entries(A.peer_id, 1, None, limit=100)
    assert [e.seq for e in chain] == list(range(1, 41)) and validate_chain(chain) is None
    assert chain[-1].balance_after == -2 * 4 * 20
    for h in handles:
        h.close()


def test_foreign_entries_settle_and_forks_become_proofs(tmp_path):
    # B's chain, written by B's own store.
    with LedgerStore.open(tmp_path / "b.sqlite", B) as b_store:
        for seq, tokens in ((1, 5), (2, 9)):
            b_store.append_own(CREDIT, receipt(A, B, 0, seq, tokens), NOW + seq)
        b_store.append_own(DEBIT, receipt(B, C, 0, 1, 2), NOW + 3)
        b_chain = b_store.entries(B.peer_id)
    with LedgerStore.open(tmp_path / "a.sqlite", A) as store:
        store.append_own(DEBIT, receipt(A, B, 0, 2, 9), NOW)
        # A tampered entry is refused (its signature no longer matches).
        assert store.add_foreign([dataclasses.replace(b_chain[0], balance_after=1)]) == ([], [])
        # Out of order, with a gap first time round: only the contiguous part is taken.
        accepted, proofs = store.add_foreign([b_chain[2], b_chain[0]])
        assert accepted == [b_chain[0]] and proofs == []
        accepted, proofs = store.add_foreign(b_chain)
        assert accepted == b_chain[1:] and proofs == []
        assert store.add_foreign(b_chain) == ([], [])  # idempotent
        settled = store.balances()
        assert settled[A.peer_id] == -36 and settled[B.peer_id] == 36
        assert store.statistics().balance == -36
        # B forks at seq 2: another entry for seq 2, validly signed.
        cursor = ChainCursor(B.peer_id)
        cursor.append(b_chain[0])
        fork2 = cursor.next_entry(B, DEBIT, receipt(B, D, 0, 1, 1), NOW + 50)
        accepted, proofs = store.add_foreign([fork2])
        assert accepted == [] and len(proofs) == 1
        proof = proofs[0]
        assert proof.author == B.peer_id and proof.seq == 2
        EquivocationProof.decode(proof.encode()).verify()
        assert store.heads()[B.peer_id] == 1
        assert store.chains()[B.peer_id] == b_chain[:1]
        frozen = store.balances()
        assert frozen[B.peer_id] == 20 and sum(frozen.values()) == 0
        assert store.verify_all() == []
        assert store.statistics().proofs == 1
        # The same proof gossiped again changes nothing; a third node learns it by gossip alone.
        assert store.add_proofs([proof]) == []
    with LedgerStore.open(tmp_path / "c.sqlite", C) as c_store:
        c_store.add_foreign(b_chain)
        assert c_store.add_proofs([proof]) == [proof]
        assert c_store.heads()[B.peer_id] == 1
        assert c_store.state() == LedgerState.of({B.peer_id: b_chain}, [proof])


def test_store_matches_the_pure_rule(tmp_path):
    stores = {s.peer_id: LedgerStore.open(tmp_path / f"{i}.sqlite", s) for i, s in enumerate(SIGNERS)}
    try:
        rng = random.Random(7)
        for n in range(12):
            client, server = rng.sample(SIGNERS, 2)
            for seq in range(1, rng.randint(1, 3) + 1):
                r = receipt(client, server, n, seq, seq * 3)
                for who, kind in ((client, DEBIT), (server, CREDIT)):
                    if rng.random() < 0.8:
                        try:
                            stores[who.peer_id].append_own(kind, r, NOW + n)
                        except ReceiptRejected:
                            pass
        hub = stores[A.peer_id]
        for peer, store in stores.items():
            if peer != A.peer_id:
                hub.add_foreign(store.entries(peer, 1, None, limit=10_000))
        chains = {p: s.entries(p, 1, None, limit=10_000) for p, s in stores.items()}
        assert hub.balances() == balances(chains)
        assert sum(hub.balances().values()) == 0
        assert hub.verify_all() == []
    finally:
        for s in stores.values():
            s.close()


# ----------------------------------------------------------------------------------------------------
# crash safety

CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from node.ledger_store import LedgerStore
    from protocol.ledger import CREDIT, DEBIT, Receipt
    from protocol.signing import Signer

    me = Signer.from_seed(bytes.fromhex(sys.argv[2]))
    peer = Signer.from_seed(bytes.fromhex(sys.argv[3]))
    run = int(sys.argv[4])
    store = LedgerStore.open(sys.argv[1], me)
    print("ready", flush=True)
    seq = 0
    while True:
        seq += 1
        debit = seq % 2 == 0
        client, server = (me, peer) if debit else (peer, me)
        r = Receipt(
            session_id=hashlib.sha256(b"%d/%d" % (run, debit)).digest()[:16], client=client.peer_id,
            server=server.peer_id, model_id=bytes(32), span_start=0, span_end=2, seq=seq, tokens=seq,
            units=2 * seq, io_commitment=bytes(32), client_nonce=bytes(16), server_nonce=bytes(16),
            started_ms=0, last_ms=seq,
        ).sign_as_server(server).sign_as_client(client)
        entry = store.append_own(DEBIT if debit else CREDIT, r, 1_000 + seq)
        print(entry.seq, entry.entry_hash().hex(), flush=True)
    """
)


def test_kill_9_never_loses_an_acknowledged_entry_nor_forks(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "ledger.sqlite"
    me, peer = hashlib.sha256(b"crash-me").digest(), hashlib.sha256(b"crash-peer").digest()
    author = Signer.from_seed(me).peer_id
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(20240611)
    acknowledged: dict[int, str] = {}  # seq -> hash hex, as printed by a child after append_own returned
    seen: dict[int, bytes] = {}  # seq -> hash ever found on disk
    started = time.monotonic()
    for run in range(50):
        child = subprocess.Popen(
            [sys.executable, str(script), str(path), me.hex(), peer.hex(), str(run)],
            stdout=subprocess.PIPE, cwd=REPO, env=env, text=True,
        )
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, 0.12))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        for line in out.splitlines(keepends=True):
            if line.endswith("\n"):  # a line cut by the kill was never acknowledged
                seq, digest = line.split()
                assert int(seq) not in acknowledged, "a seq was acknowledged twice"
                acknowledged[int(seq)] = digest

        with LedgerStore.open(path) as store:
            chain = store.entries(author, 1, None, limit=1_000_000)
            assert validate_chain(chain) is None
            assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
            on_disk = {e.seq: e.entry_hash() for e in chain}
            for seq, digest in acknowledged.items():
                assert on_disk.get(seq, b"").hex() == digest, f"run {run}: acknowledged seq {seq} lost or changed"
            for seq, h in seen.items():
                assert on_disk[seq] == h, f"run {run}: seq {seq} was rewritten (fork)"
            seen.update(on_disk)
    assert len(acknowledged) > 50, "the child should have appended in most runs"
    with LedgerStore.open(path) as store:
        assert store.verify_all() == []
    assert time.monotonic() - started < 60
