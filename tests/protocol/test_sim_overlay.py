"""``poolai sim overlay`` end to end at 1000 nodes (node/sim.py over protocol/overlay.py)."""

from __future__ import annotations

import json

from node import sim


def test_sim_overlay_json_table(capsys) -> None:
    rc = sim.main(["overlay", "--n", "1000", "--fail", "0,0.3", "--lookups", "200", "--json"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = json.loads(out[-1])
    rows = {(r["n"], r["fail"]): r for r in table}
    assert set(rows) == {(1000, 0.0), (1000, 0.3)}
    for r in table:
        assert set(r) == {"n", "fail", "mean_hops", "p99_hops", "success", "mean_degree", "max_degree"}
    assert rows[(1000, 0.0)]["success"] == 1.0
    assert rows[(1000, 0.3)]["success"] >= 0.99
    assert rows[(1000, 0.0)]["mean_hops"] < 4.5
    assert rows[(1000, 0.3)]["mean_hops"] < 4.5
    # 16 short links and k = 10 long links each way, capped at 2k inbound.
    assert 16 <= rows[(1000, 0.0)]["mean_degree"] <= rows[(1000, 0.0)]["max_degree"] <= 16 + 3 * 11


def test_sim_overlay_churn_reports_rounds(capsys) -> None:
    rc = sim.main(
        ["overlay", "--n", "1000", "--fail", "0", "--lookups", "100", "--churn", "--rounds", "2", "--json"]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    churn = json.loads(lines[-2])["churn"]
    assert [r["round"] for r in churn] == [1, 2]
    assert all(0.0 < r["stale_links"] < 0.5 and r["success"] >= 0.99 for r in churn)


def test_gossip_moves_one_hop_per_round_each_way() -> None:
    """On a plain ring (two neighbours each) a head needs n/2 rounds: nothing travels two hops at once."""
    import numpy as np

    n = 20
    peers = np.stack([(np.arange(n) + 1) % n, (np.arange(n) - 1) % n], axis=1).astype(np.int32)
    counts = np.full(n, 2)
    rng = np.random.default_rng(3)
    rounds = [sim.gossip_rounds(peers, counts, 0, rng) for _ in range(20)]
    assert min(rounds) >= n // 2
    # a source cut off from everyone never converges
    counts[5] = 0
    assert sim.gossip_rounds(peers, counts, 5, rng) == -1


def test_sim_gossip_json_table(capsys) -> None:
    rc = sim.main(["gossip", "--n", "1000", "--fail", "0,0.3", "--trials", "40", "--json"])
    assert rc == 0
    rows = {r["fail"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    assert set(rows) == {0.0, 0.3}
    for r in rows.values():
        assert r["converged"] == 1.0 and r["trials"] == 40
        # push-pull reaches n nodes in about log3(n) + ln ln(n) rounds: ~8 at 1000; a sparse graph adds a few
        assert 6 <= r["mean_rounds"] <= r["p99_rounds"] <= 16
