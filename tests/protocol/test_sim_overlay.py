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
