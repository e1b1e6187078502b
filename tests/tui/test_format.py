"""The TUI's pure formatters."""

from tui.format import bar, capacity_tokens_per_s, coverage_text, human_bytes, protocols_label, rate, short_peer


def test_coverage_text_one_run_per_block_when_it_fits():
    t = coverage_text([2, 1, 0], width=9)
    assert t.plain == "222111···"
    red = [t.plain[s.start:s.end] for s in t.spans if "red" in str(s.style)]
    assert red == ["···"]


def test_coverage_text_groups_show_their_worst_block():
    replicas = [2] * 50 + [0] + [2] * 49  # one gap in a hundred blocks, drawn 10 cells wide
    t = coverage_text(replicas, width=10)
    assert len(t.plain) == 10
    assert t.plain.count("·") == 1 and t.plain[5] == "·"


def test_capacity_adds_the_times_of_every_block():
    assert capacity_tokens_per_s([100.0, 100.0]) == 50.0
    assert capacity_tokens_per_s([100.0, 0.0]) == 0.0
    assert capacity_tokens_per_s([]) == 0.0


def test_rate_ignores_resets_and_stopped_clocks():
    assert rate(None, (1.0, 5.0)) == 0.0
    assert rate((1.0, 5.0), (3.0, 25.0)) == 10.0
    assert rate((1.0, 50.0), (2.0, 5.0)) == 0.0  # the node restarted: its counter went down
    assert rate((1.0, 5.0), (1.0, 9.0)) == 0.0


def test_human_bytes_and_short_peer_and_bar():
    assert human_bytes(0) == "n/a" and human_bytes(512) == "512 B" and human_bytes(3 * 2**30) == "3.0 GiB"
    assert short_peer("12D3KooWabcdefghijklmnop", 6) == "…klmnop" and short_peer("short", 6) == "short"
    b = bar(95, 100, 10)
    assert b.plain == "█" * 10 and "red" in str(b.style)
    assert bar(0, 0, 4).plain == "░" * 4


def test_protocols_label_names_ours_and_counts_the_rest():
    assert protocols_label(["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/poolai/infer/1", "/poolai/swarm/1",
                            "/poolai/swarm/1"]) == "infer swarm +2"
    assert protocols_label([]) == "-"
    # A node's refusal window around its own major (protocol/versions.py) names that major alone...
    window = [f"/poolai/ledger-sync/{m}" for m in range(0, 6)]
    assert protocols_label(window + ["/poolai/ring/1"]) == "ledger-sync ring"
    assert protocols_label([f"/poolai/infer/{m}" for m in range(3, 12)]) == "infer/7"  # another version
    # ...anything else is shown as it is.
    assert protocols_label(["/poolai/infer/1", "/poolai/infer/3", "/poolai/bad", "/poolai/new/1"]) == "infer/1,3 new/1"
