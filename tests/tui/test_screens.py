"""Each pane of the TUI: a snapshot (pytest-textual-snapshot) and a Pilot test driving its keys, against
tui.testing.FakeNodeClient with fixed data. These run on asyncio (Textual's loop), not trio."""

import asyncio

import pytest
from textual.widgets import DataTable, Input, RichLog, Sparkline, Static

from tui.app import ConfirmScreen, HelpScreen, NoNodeScreen, PoolaiApp
from tui.testing import GENERATED, LEDGER, ME, PEERS, FakeNodeClient

SIZES = [(80, 24), (200, 50)]


def make_app(**kw) -> PoolaiApp:
    return PoolaiApp(FakeNodeClient(**kw), data_dir="/var/lib/poolai", poll_s=None)


async def settle(pilot, polls: int = 3) -> None:
    """Three polls (so rates have two points), then wait for the log stream's fixed lines."""
    for _ in range(polls):
        await pilot.app.poll_once()
    for _ in range(200):
        await pilot.pause()
        if not pilot.app.connected or len(pilot.app.query_one("#logs-pane").lines) >= 4:
            break


def run(coro_fn, size=(80, 24), **kw):
    async def main():
        app = make_app(**kw)
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            await coro_fn(app, pilot)

    asyncio.run(main())


def static_plain(app, selector: str) -> str:
    w = app.screen.query_one(selector, Static)
    r = w.content if hasattr(w, "content") else w.renderable
    if hasattr(r, "plain"):
        return r.plain
    from rich.console import Console

    console = Console(width=200, record=True, color_system=None)
    console.print(r)
    return console.export_text()


# -- snapshots ---------------------------------------------------------------------------------------------

PANE_KEYS = {"overview": "1", "peers": "2", "swarm": "3", "mynode": "4", "ledger": "5", "logs": "7"}


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "200x50"])
@pytest.mark.parametrize("pane", list(PANE_KEYS))
def test_snapshot_pane(snap_compare, pane, size):
    async def before(pilot):
        await settle(pilot)
        await pilot.press(PANE_KEYS[pane])
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "200x50"])
def test_snapshot_playground(snap_compare, size):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("6", *"Name three colours", "enter")  # the pane opens with its prompt focused
        for _ in range(200):
            await pilot.pause()
            if "tokens/s" in static_plain(pilot.app, "#playground-status"):
                break
        await pilot.press("escape")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "200x50"])
def test_snapshot_no_node(snap_compare, size):
    async def before(pilot):
        await settle(pilot)

    assert snap_compare(make_app(running=False), terminal_size=size, run_before=before)


def test_snapshot_help(snap_compare):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=before)


# -- Pilot: keys ---------------------------------------------------------------------------------------------


def test_overview_shows_and_copies_the_peer_id():
    async def body(app, pilot):
        text = static_plain(app, "#overview-body")
        assert ME in text
        assert "1 online, 1 unreachable" in text and "~42 nodes" in text and "+1,250 units" in text
        await pilot.press("c")
        assert app.clipboard == ME

    run(body)


def test_overview_without_ledger_or_overlay_says_na():
    async def body(app, pilot):
        text = static_plain(app, "#overview-body")
        assert "credit" in text and "n/a" in text.split("credit", 1)[1]

    run(body, ledger=False)


def test_peers_filter_sort_and_ban_behind_confirmation():
    async def body(app, pilot):
        await pilot.press("2")
        table = app.query_one("#peers-table", DataTable)
        assert table.row_count == 3
        await pilot.press("slash", *"infer")
        assert app.focused is app.query_one("#peer-filter", Input)
        await pilot.pause()
        assert table.row_count == 2
        await pilot.press("escape")
        app.query_one("#peer-filter", Input).value = ""
        await pilot.pause()
        assert table.row_count == 3
        # Sort by the next column (direction): inbound peers first.
        await pilot.press("s")
        await pilot.pause()
        first = table.coordinate_to_cell_key((0, 0)).row_key.value
        assert first in (PEERS[1], PEERS[2])
        # Sort by RTT descending via the header twice: the peer with no RTT (inf) first.
        pane = app.query_one("#peers-pane")
        pane.sort_index, pane.sort_reverse = 2, True
        pane.render_rows()
        table.focus()
        table.move_cursor(row=0)
        assert pane.selected_peer() == PEERS[2]
        # Ban asks first; "n" does nothing, "y" bans the selected peer.
        await pilot.press("b")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert app.client.actions == []
        await pilot.press("b")
        await pilot.pause()
        await pilot.press("y")
        for _ in range(50):
            await pilot.pause()
            if app.client.actions:
                break
        assert app.client.actions == [("ban", {"peer": PEERS[2]})]

    run(body)


def test_swarm_shows_gaps_in_red_and_servers():
    async def body(app, pilot):
        await pilot.press("3")
        await pilot.pause()
        cov = app.query_one("#swarm-coverage", Static)
        rendered = cov.content if hasattr(cov, "content") else cov.renderable
        assert "5 blocks uncovered" in rendered.plain
        red = [s for s in rendered.spans if "red" in str(s.style) and rendered.plain[s.start:s.end].startswith("·")]
        assert red, "gaps must be drawn in red"
        assert app.query_one("#swarm-servers", DataTable).row_count == 3
        # Capacity over a swarm with a gap is zero: nothing can pass blocks 25-29.
        assert app.query_one("#swarm-spark", Sparkline).data == [0.0, 0.0, 0.0]

    run(body)


def test_my_node_rates_and_drain_behind_confirmation():
    async def body(app, pilot):
        await pilot.press("4")
        await pilot.pause()
        # Tokens through the span per node-second: steps 30 and 6 after the first poll's baseline.
        assert app.query_one("#mynode-spark", Sparkline).data == [30.0, 6.0]
        assert app.query_one("#mynode-sessions", DataTable).row_count == 2
        assert "4,384 / 16,384 tokens" in static_plain(app, "#mynode-summary")
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        for _ in range(50):
            await pilot.pause()
            if app.client.actions:
                break
        assert app.client.actions == [("drain", {})]

    run(body)


def test_ledger_balance_history_receipts_and_proofs():
    async def body(app, pilot):
        await pilot.press("5")
        await pilot.pause()
        assert app.query_one("#ledger-spark", Sparkline).data == [float(e["balance_after"])
                                                                   for e in reversed(LEDGER["recent"])]
        assert app.query_one("#ledger-receipts", DataTable).row_count == len(LEDGER["recent"])
        assert "equivocated at seq 7" in static_plain(app, "#ledger-proofs")
        assert "+1,250 units" in static_plain(app, "#ledger-summary")

    run(body)


def test_ledger_absent_says_na():
    async def body(app, pilot):
        await pilot.press("5")
        await pilot.pause()
        assert "n/a" in static_plain(app, "#ledger-summary")
        assert app.query_one("#ledger-receipts", DataTable).row_count == 0

    run(body, ledger=False)


def test_playground_streams_tokens_with_the_route():
    async def body(app, pilot):
        await pilot.press("6", *"Name three colours", "enter")  # the pane opens with its prompt focused
        for _ in range(200):
            await pilot.pause()
            if "tokens/s" in static_plain(app, "#playground-status"):
                break
        assert app.client.actions == [("generate", {"prompt": "Name three colours", "max_new_tokens": 64})]
        assert "".join(GENERATED) in static_plain(app, "#generated")
        route = static_plain(app, "#route")
        assert "0:10" in route and "10:20" in route and "20:30" in route and PEERS[1][-10:] in route

    run(body)


def test_logs_live_and_filtered():
    async def body(app, pilot):
        await pilot.press("7")
        log = app.query_one("#log", RichLog)
        assert len(app.query_one("#logs-pane").lines) == 4
        await pilot.press("slash", *"warning")
        await pilot.pause()
        assert [x["level"] for x in app.query_one("#logs-pane").lines if app.query_one("#logs-pane")._match(x)] \
            == ["WARNING"]
        assert any("banned for 5 s" in "".join(seg.text for seg in line) for line in log.lines)
        assert not any("serving blocks" in "".join(seg.text for seg in line) for line in log.lines)

    run(body)


def test_help_and_number_keys_and_quit():
    async def body(app, pilot):
        for key, pane in zip("1234567", ["overview", "peers", "swarm", "mynode", "ledger", "playground", "logs"]):
            await pilot.press(key)
            assert app.query_one("TabbedContent").active == pane
            if pane == "playground":  # it opens with the prompt focused; escape gives the keys back
                assert app.focused is app.query_one("#prompt")
                await pilot.press("escape")
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("x")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0 or not app.is_running

    run(body)


def test_no_node_screen_then_reconnects_by_itself():
    async def body(app, pilot):
        assert isinstance(app.screen, NoNodeScreen)
        assert "poolai node --config" in static_plain(app, "#nonode")
        await pilot.press("question_mark")  # help opened over it goes away with it
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        app.client.running = True  # a node starts
        assert await app.poll_once()
        await pilot.pause()
        assert not isinstance(app.screen, (NoNodeScreen, HelpScreen))
        assert ME in static_plain(app, "#overview-body")

    run(body, running=False)
