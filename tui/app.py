"""The operator's terminal UI: one App, seven panes in tabs, a few modal screens.

Everything comes from a `NodeClient` (tui/client.py). A poller (a worker) asks the node for status,
peers, swarm, sessions and ledger once a second and posts one `NodeUpdated`; each pane renders its
part. Logs arrive on a stream of their own; the playground streams a generation. No I/O in event
handlers: workers and the client do it. When the node does not answer, a screen says so and how to
start one, and the poller keeps trying: the UI comes back by itself.

Keys: 1-7 or tabs switch panes, `/` filters (peers, logs), `?` help, `q` quit, `c` copies the peer ID,
`b`/`u` ban/unban the selected peer (after a confirmation), `s` sorts the peers, `d` drains the node.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (Button, DataTable, Footer, Header, Input, Label, RichLog, Sparkline, Static,
                             TabbedContent, TabPane)

from .client import ControlError, NodeClient, NodeNotRunning
from .format import (bar, capacity_tokens_per_s, coverage_text, duration, human_bytes, protocols_label, rate,
                     short_peer)
from .messages import NodeLost, NodeUpdated, PeerAction, Snapshot

POLL_S = 1.0  # one poll a second: live to a person, a handful of small calls to the node
RETRY_S = 2.0  # with no node, try again this often
SERIES_POINTS = 120  # two minutes of sparkline at one poll a second
MAX_LOG_LINES = 2000  # the log pane keeps what the node's own ring keeps
PANES = [("overview", "Overview"), ("peers", "Peers"), ("swarm", "Swarm"), ("mynode", "My node"),
         ("ledger", "Ledger"), ("playground", "Playground"), ("logs", "Logs")]

HELP = """\
[b]poolai tui[/b]: your node and its swarm

  [b]1[/b]-[b]7[/b], tab      switch pane: overview, peers, swarm,
                 my node, ledger, playground, logs
  [b]/[/b]              filter (peers, logs)
  [b]c[/b]              copy this node's peer ID
  [b]s[/b]              sort peers by the next column
  [b]b[/b] / [b]u[/b]          ban / unban the selected peer
  [b]d[/b]              drain: take no new sessions
  [b]enter[/b]          (playground) generate
  [b]esc[/b]            leave the prompt or a filter
  [b]?[/b]              this help      [b]q[/b]  quit

Press any key to close."""


def kv_table(rows: list[tuple[str, object]]) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v if isinstance(v, Text) else str(v))
    return t


# -- modal screens ------------------------------------------------------------------------------------


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 60; height: auto; max-height: 22; border: round $accent; padding: 0 1;
                          background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP)

    def on_key(self, event) -> None:
        event.stop()
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; `y`/enter confirms, `n`/escape declines."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $warning; padding: 0 1; background: $surface; }
    ConfirmScreen Horizontal { height: auto; align: center middle; }
    ConfirmScreen Button { margin: 0 2; }
    """
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class NoNodeScreen(Screen):
    """Shown while no node answers; the app's poller pops it when one does."""

    DEFAULT_CSS = """
    NoNodeScreen { align: center middle; }
    NoNodeScreen > Static { width: 76; max-width: 100%; height: auto; border: round $error; padding: 1 2; }
    """
    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def __init__(self, reason: str, data_dir: str) -> None:
        super().__init__()
        self.reason = reason
        self.data_dir = data_dir

    def compose(self) -> ComposeResult:
        yield Static(self._text(), id="nonode")
        yield Footer()

    def _text(self) -> Text:
        t = Text()
        t.append("No poolai node is running here.\n\n", style="bold red")
        t.append(f"{self.reason}\n\n")
        t.append("Start one in another terminal:\n", style="bold")
        dd = f" --data-dir {self.data_dir}" if self.data_dir else ""
        t.append(f"  poolai node --config bootstrap/local.toml{dd}\n", style="cyan")
        t.append("or a whole loopback swarm:\n", style="bold")
        t.append("  poolai demo\n\n", style="cyan")
        t.append(f"Retrying every {RETRY_S:g} s; this screen goes away by itself. q quits.", style="dim")
        return t

    def set_reason(self, reason: str) -> None:
        self.reason = reason
        self.query_one("#nonode", Static).update(self._text())


# -- panes --------------------------------------------------------------------------------------------


class OverviewPane(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("connecting…", id="overview-body")

    def show(self, snap: Snapshot) -> None:
        st = snap.status
        mem = st.get("memory", {})
        dev = st.get("device", {})
        n_hat = st.get("overlay_size_estimate")
        ledger = snap.ledger
        boot = st.get("bootstrap", [])
        boot_text = Text(f"{st.get('bootstrap_online', 0)} online", style="green")
        if st.get("bootstrap_unreachable"):
            boot_text.append(f", {st['bootstrap_unreachable']} unreachable", style="bold red")
        if not boot:
            boot_text = Text("none configured (this node is a bootstrap peer)", style="dim")
        span = st.get("span")
        rows: list[tuple[str, object]] = [
            ("peer ID", Text(st["peer_id"], style="bold") + Text("  (c copies)", style="dim")),
            ("addresses", "\n".join(st.get("addrs", [])) or "none"),
            ("uptime", f"{duration(st.get('uptime_s', 0))}  (poolai {st.get('version', '?')}, pid {st.get('pid', '?')})"),
            ("model", f"{st['model']['name']} {st['model']['id'][:12]}, {st['model']['blocks']} blocks"),
            ("serving", f"blocks {span[0]}:{span[1]}, {st.get('state')}" + (", pinned" if st.get("pinned") else "")
             if span else "nothing (client only)"),
            ("device", f"{dev.get('name', 'n/a')}, {human_bytes(dev.get('free_bytes'))} free of "
                       f"{human_bytes(dev.get('total_bytes'))}" if dev else "n/a"),
            ("memory", f"{human_bytes(mem.get('rss_bytes'))} resident"),
            ("peers", f"{st.get('connected_peers', 0)} connected"),
            ("bootstrap", boot_text),
            ("overlay size", f"~{round(n_hat)} node{'' if round(n_hat) == 1 else 's'} (estimate)"
             if isinstance(n_hat, (int, float)) else "n/a"),
            ("credit", f"{ledger['balance']:+,} units (limit {ledger.get('credit_limit', 0):,})"
             if ledger and "balance" in ledger else "n/a"),
        ]
        if st.get("metrics_url"):
            rows.append(("metrics", st["metrics_url"]))
        self.query_one("#overview-body", Static).update(kv_table(rows))


class PeersPane(Vertical):
    COLUMNS = [("peer", "Peer"), ("dir", "Dir"), ("rtt", "RTT"), ("since", "Since"), ("spans", "Spans"),
               ("banned", "Ban"), ("protocols", "Protocols")]

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.rows: list[dict] = []
        self.sort_index = 0
        self.sort_reverse = False

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter peers (/): part of an ID, a span, a protocol", id="peer-filter")
        table = DataTable(id="peers-table", cursor_type="row", zebra_stripes=True)
        for key, label in self.COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static("", id="peers-footer")

    def show(self, snap: Snapshot) -> None:
        banned = {b["peer"]: b["for_s"] for b in snap.peers.get("banned", [])}
        self.rows = snap.peers.get("peers", [])
        known = {p["peer"] for p in self.rows}
        for peer, for_s in banned.items():  # banned peers we are not connected to: shown too
            if peer not in known:
                self.rows = [*self.rows, {"peer": peer, "direction": "-", "since_s": None, "latency_ms": None,
                                          "protocols": [], "spans": [], "banned_for_s": for_s}]
        self.render_rows()

    def _sort_key(self, p: dict):
        key = self.COLUMNS[self.sort_index][0]
        return {
            "peer": p["peer"], "dir": p.get("direction", ""),
            "rtt": p["latency_ms"] if p.get("latency_ms") is not None else float("inf"),
            "since": p["since_s"] if p.get("since_s") is not None else float("inf"),
            "spans": min((s[0] for s in p.get("spans", [])), default=10**9),
            "banned": p.get("banned_for_s", 0), "protocols": len(p.get("protocols", [])),
        }[key]

    def render_rows(self) -> None:
        table = self.query_one("#peers-table", DataTable)
        text = self.query_one("#peer-filter", Input).value.strip().lower()
        cursor_key = None
        if table.row_count and table.cursor_row >= 0:
            try:
                cursor_key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
            except Exception:
                cursor_key = None
        table.clear()
        shown = 0
        for p in sorted(self.rows, key=self._sort_key, reverse=self.sort_reverse):
            spans = " ".join(f"{a}:{b}" for a, b in p.get("spans", []))
            protos = protocols_label(p.get("protocols", []))
            hay = " ".join([p["peer"], p.get("direction", ""), spans, " ".join(p.get("protocols", []))]).lower()
            if text and text not in hay:
                continue
            banned = p.get("banned_for_s", 0)
            table.add_row(
                short_peer(p["peer"]), {"inbound": "in", "outbound": "out"}.get(p.get("direction", ""), "?"),
                f"{p['latency_ms']:.1f}" if p.get("latency_ms") is not None else "-",
                duration(p["since_s"]) if p.get("since_s") is not None else "-",
                spans or "-", Text(duration(banned), style="bold red") if banned else "",
                protos, key=p["peer"])
            shown += 1
        if cursor_key is not None:
            try:
                table.move_cursor(row=table.get_row_index(cursor_key))
            except Exception:
                pass
        col = self.COLUMNS[self.sort_index][1]
        self.query_one("#peers-footer", Static).update(Text(
            f"{shown} of {len(self.rows)} peers, sorted by {col}{' (desc)' if self.sort_reverse else ''}"
            "; RTT in ms   s sort  / filter  b ban  u unban", style="dim"))

    def selected_peer(self) -> str | None:
        table = self.query_one("#peers-table", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value

    def cycle_sort(self) -> None:
        if self.sort_reverse or self.sort_index == 0:
            self.sort_index = (self.sort_index + 1) % len(self.COLUMNS) if self.sort_reverse or self.sort_index else 1
            self.sort_reverse = False
        else:
            self.sort_reverse = True
        self.render_rows()

    @on(DataTable.HeaderSelected)
    def header(self, event: DataTable.HeaderSelected) -> None:
        index = [k for k, _ in self.COLUMNS].index(event.column_key.value)
        self.sort_reverse = not self.sort_reverse if index == self.sort_index else False
        self.sort_index = index
        self.render_rows()

    @on(Input.Changed, "#peer-filter")
    def filtered(self) -> None:
        self.render_rows()


class SwarmPane(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("", id="swarm-coverage")
        yield Label("swarm capacity, tokens/s (one pipeline over the announced throughput)", classes="caption")
        yield Sparkline([], id="swarm-spark", summary_function=max)
        table = DataTable(id="swarm-servers", cursor_type="row", zebra_stripes=True)
        for label in ("Server", "Span", "State", "Steps/s", "Cache left", "Device"):
            table.add_column(label, key=label.lower())
        yield table

    def show(self, snap: Snapshot) -> None:
        sw = snap.swarm
        width = max(10, self.size.width - 12) if self.size.width else 60
        gaps = sum(1 for r in sw["replicas"] if r == 0)
        head = Text(f"{sw.get('model_name', 'model')} {sw['model']}: {sw['blocks']} blocks, "
                    f"{len(sw['servers'])} servers", style="bold")
        if gaps:
            head.append(f"  {gaps} blocks uncovered", style="bold red")
        body = Text("coverage  ") + coverage_text(sw["replicas"], width)
        runs = Text()
        for r in sw["runs"]:
            style = "bold red" if r["replicas"] == 0 else ""
            runs.append(f"{r['start']}-{r['end'] - 1}: {r['replicas']}x  ", style=style)
        cap = snap.swarm_tokens_per_s[-1] if snap.swarm_tokens_per_s else 0.0
        tail = Text(f"\nreplicas per block ('·' = gap)   capacity now {cap:.1f} tokens/s", style="dim")
        self.query_one("#swarm-coverage", Static).update(head + Text("\n") + body + Text("\n") + runs + tail)
        self.query_one("#swarm-spark", Sparkline).data = list(snap.swarm_tokens_per_s) or [0.0]
        table = self.query_one("#swarm-servers", DataTable)
        table.clear()
        for s in sorted(sw["servers"], key=lambda s: (s["start"], s["end"], s["peer"])):
            state_style = {"online": "green", "draining": "yellow", "joining": "cyan"}.get(s["state"], "")
            name = short_peer(s["peer"], 10) + (" (me)" if s.get("me") else "")
            table.add_row(name, f"{s['start']}:{s['end']}", Text(s["state"], style=state_style),
                          f"{s['throughput']:,.0f}", f"{s['cache_tokens_left']:,}", s.get("device", ""),
                          key=f"{s['peer']}:{s['start']}:{s['end']}")


class MyNodePane(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("", id="mynode-summary")
        yield Label("tokens/s through my span", classes="caption")
        yield Sparkline([], id="mynode-spark", summary_function=max)
        table = DataTable(id="mynode-sessions", cursor_type="row", zebra_stripes=True)
        for label in ("Client", "Blocks", "Tokens", "Max length"):
            table.add_column(label, key=label.lower())
        yield table

    def show(self, snap: Snapshot) -> None:
        se = snap.sessions
        srv = se.get("server")
        if srv is None:
            summary = Text("This node serves no blocks (a client-only node).", style="dim")
        else:
            used, budget = srv["cache_tokens_reserved"], srv["cache_tokens_budget"]
            now = snap.my_tokens_per_s[-1] if snap.my_tokens_per_s else 0.0
            summary = kv_table([
                ("span", f"blocks {srv['span'][0]}:{srv['span'][1]}, {se.get('state')}"
                         + (", pinned" if se.get("pinned") else "") + "   (d drains)"),
                ("sessions", f"{srv['sessions_open']} open, {srv['sessions_total']} served, "
                             f"{srv['sessions_refused']} refused"),
                ("work", f"{srv['steps']:,} steps, {srv['tokens']:,} tokens, {now:.1f} tokens/s now"),
                ("cache", bar(used, budget, 24) + Text(f" {used:,} / {budget:,} tokens")),
                ("as client", f"{se['client']['generations']} generations, {se['client']['tokens']} tokens, "
                              f"{se['client']['failovers']} failovers"),
            ])
        self.query_one("#mynode-summary", Static).update(summary)
        self.query_one("#mynode-spark", Sparkline).data = list(snap.my_tokens_per_s) or [0.0]
        table = self.query_one("#mynode-sessions", DataTable)
        table.clear()
        for i, x in enumerate(se.get("sessions", [])):
            table.add_row(x["client"], f"{x['start']}:{x['end']}", str(x["tokens"]), str(x["max_length"]),
                          key=str(i))


class LedgerPane(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("", id="ledger-summary")
        yield Label("balance over the recent entries", classes="caption")
        yield Sparkline([], id="ledger-spark", summary_function=lambda d: d[-1] if d else 0)
        table = DataTable(id="ledger-receipts", cursor_type="row", zebra_stripes=True)
        for label in ("Seq", "Time (UTC)", "Kind", "Counterparty", "Span", "Tokens", "Units", "Balance"):
            table.add_column(label, key=label.lower())
        yield table
        yield Static("", id="ledger-proofs")

    def show(self, snap: Snapshot) -> None:
        lg = snap.ledger
        table = self.query_one("#ledger-receipts", DataTable)
        table.clear()
        if lg is None:
            self.query_one("#ledger-summary", Static).update(
                Text("n/a: this node keeps no ledger (its control API has no 'ledger' call).", style="dim"))
            self.query_one("#ledger-spark", Sparkline).data = []
            self.query_one("#ledger-proofs", Static).update("")
            return
        recent = lg.get("recent", [])
        summary = Text(f"balance {lg['balance']:+,} units", style="bold green" if lg["balance"] >= 0 else "bold red")
        summary.append(f"   limit {lg.get('credit_limit', 0):,}   {lg.get('entries', 0)} entries in my chain, "
                       f"{lg.get('chains', 0)} chains known")
        if not lg.get("may_consume", True):
            summary.append("   over the credit limit or frozen", style="bold red")
        self.query_one("#ledger-summary", Static).update(summary)
        self.query_one("#ledger-spark", Sparkline).data = [float(e["balance_after"]) for e in reversed(recent)]
        for e in recent:
            when = datetime.fromtimestamp(e["time_ms"] / 1000, timezone.utc).strftime("%m-%d %H:%M:%S")
            kind = Text(e["kind"], style="green" if e["kind"] == "credit" else "yellow")
            table.add_row(str(e["seq"]), when, kind, short_peer(e["counterparty"], 10),
                          f"{e['span'][0]}:{e['span'][1]}", str(e["tokens"]), f"{e['units']:,}",
                          f"{e['balance_after']:+,}", key=str(e["seq"]))
        proofs = lg.get("proofs", [])
        text = Text(f"fraud proofs: {len(proofs)}", style="bold red" if proofs else "dim")
        for p in proofs:
            text.append(f"\n  {short_peer(p['author'], 12)} equivocated at seq {p['seq']}"
                        + (" (that is us!)" if p.get("us") else ""), style="red")
        self.query_one("#ledger-proofs", Static).update(text)


class PlaygroundPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Input(placeholder="a prompt, then enter: generated through the swarm", id="prompt")
        with Horizontal(id="playground-body"):
            with VerticalScroll(id="playground-out"):
                yield Static("", id="generated")
            yield Static(Text("route\n(appears with the first token)", style="dim"), id="route")
        yield Static("", id="playground-status")

    def show_route(self, route: list[dict]) -> None:
        t = Text("route\n", style="bold")
        for h in route:
            t.append(f"{h['start']:>3}:{h['end']:<3} ", style="cyan")
            t.append(short_peer(h["peer"], 10) + "\n")
        self.query_one("#route", Static).update(t)


class LogsPane(Vertical):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.lines: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter logs (/): text, a logger, or a level like WARNING", id="log-filter")
        # min_width=1: RichLog wraps at 78 columns at least by default, which an 80-column terminal
        # cuts off; the stable gutter keeps the wrap width when the scrollbar appears.
        yield RichLog(id="log", max_lines=MAX_LOG_LINES, wrap=True, markup=False, min_width=1)

    @staticmethod
    def format_line(x: dict) -> Text:
        when = datetime.fromtimestamp(x["time"], timezone.utc).strftime("%H:%M:%S")
        style = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red", "DEBUG": "dim"}.get(x["level"], "")
        t = Text(f"{when} ", style="dim")
        t.append(f"{x['level'][:4]:<4} ", style=style or "green")
        t.append(f"{x['logger'].removeprefix('poolai.')}: ", style="cyan")
        t.append(x["message"], style=style)
        return t

    def _match(self, x: dict) -> bool:
        f = self.query_one("#log-filter", Input).value.strip().lower()
        return not f or f in x["message"].lower() or f in x["logger"].lower() or f == x["level"].lower()

    def add(self, x: dict) -> None:
        self.lines.append(x)
        del self.lines[:-MAX_LOG_LINES]
        if self._match(x):
            self.query_one("#log", RichLog).write(self.format_line(x))

    def on_resize(self) -> None:
        self.refilter()  # written lines keep the width they were wrapped at: wrap them again

    @on(Input.Changed, "#log-filter")
    def refilter(self) -> None:
        log = self.query_one("#log", RichLog)
        log.clear()
        for x in self.lines:
            if self._match(x):
                log.write(self.format_line(x))


# -- the app ------------------------------------------------------------------------------------------


class PoolaiApp(App):
    TITLE = "poolai"
    CSS = """
    TabPane { padding: 0 1; }
    .caption { color: $text-muted; margin-top: 1; }
    Sparkline { height: 2; margin-bottom: 1; }
    #peers-table { height: 1fr; }
    #peers-footer { height: 1; }
    #swarm-servers, #mynode-sessions, #ledger-receipts { height: auto; max-height: 16; }
    #playground-body { height: 1fr; }
    #log { scrollbar-gutter: stable; }
    #playground-out { width: 1fr; border: round $primary; }
    #route { width: 28; border: round $secondary; padding: 0 1; }
    #playground-status { height: 1; color: $text-muted; }
    #log { height: 1fr; }
    Input { margin: 0 0 0 0; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("slash", "filter", "Filter"),
        Binding("c", "copy_peer_id", "Copy ID", show=False),
        Binding("b", "ban", "Ban", show=False),
        Binding("u", "unban", "Unban", show=False),
        Binding("s", "sort", "Sort", show=False),
        Binding("d", "drain", "Drain", show=False),
        Binding("escape", "unfocus", "Back", show=False),
        *[Binding(str(i + 1), f"show_pane('{pid}')", name, show=False) for i, (pid, name) in enumerate(PANES)],
    ]

    def __init__(self, client: NodeClient, *, data_dir: str = "", poll_s: float | None = POLL_S,
                 retry_s: float = RETRY_S) -> None:
        super().__init__()
        self.client = client
        self.data_dir = data_dir
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.snapshot: Snapshot | None = None
        self.polls = 0
        self.connected = False
        self._my_series: list[float] = []
        self._swarm_series: list[float] = []
        self._last_tokens: tuple[float, float] | None = None
        self._no_node: NoNodeScreen | None = None
        self._logs_running = False

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="overview"):
            for i, (pid, name) in enumerate(PANES):
                with TabPane(f"{i + 1} {name}", id=pid):
                    yield {"overview": OverviewPane, "peers": PeersPane, "swarm": SwarmPane, "mynode": MyNodePane,
                           "ledger": LedgerPane, "playground": PlaygroundPane, "logs": LogsPane}[pid](
                        id=f"{pid}-pane")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = self.client.description
        if self.poll_s:
            self.poll_loop()

    # -- polling --------------------------------------------------------------------------------------
    @work(exclusive=True, group="poll")
    async def poll_loop(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as e:  # an answer we cannot render must not end the UI: say it, keep polling
                self.notify(f"cannot show the node's answer: {type(e).__name__}: {e}", severity="error", timeout=5)
            await asyncio.sleep(self.poll_s if self.connected else self.retry_s)

    async def poll_once(self) -> bool:
        """Ask the node for everything once and render it; False when no node answered."""
        try:
            status = await self.client.status()
            peers = await self.client.peers()
            swarm = await self.client.swarm()
            sessions = await self.client.sessions()
            ledger = await self.client.ledger()
        except NodeNotRunning as e:
            self._lost(str(e))
            return False
        except ControlError as e:
            self.notify(f"the node refused: {e}", severity="error")
            return False
        self.polls += 1
        clock = float(status.get("uptime_s", time.monotonic()))
        srv = sessions.get("server")
        if srv is not None:
            now = (clock, float(srv["tokens"]))
            if self._last_tokens is not None:
                self._my_series = (self._my_series + [rate(self._last_tokens, now)])[-SERIES_POINTS:]
            self._last_tokens = now
        self._swarm_series = (self._swarm_series + [capacity_tokens_per_s(swarm["throughput"])])[-SERIES_POINTS:]
        snap = Snapshot(status, peers, swarm, sessions, ledger, list(self._my_series), list(self._swarm_series))
        self.snapshot = snap
        if not self.connected:
            self.connected = True
            if self._no_node is not None:
                while self._no_node in self.screen_stack:  # with anything opened over it (help) too
                    self.pop_screen()
                self._no_node = None
            if not self._logs_running:
                self.follow_logs()
        self.sub_title = f"{short_peer(status['peer_id'], 12)} · {status.get('state')} · up {duration(clock)}"
        self.post_message(NodeUpdated(snap))
        return True

    def _lost(self, reason: str) -> None:
        self.connected = False
        self.post_message(NodeLost(reason))

    def on_node_lost(self, message: NodeLost) -> None:
        if self._no_node is None:
            self._no_node = NoNodeScreen(message.reason, self.data_dir)
            self.push_screen(self._no_node)
        else:
            self._no_node.set_reason(message.reason)

    def on_node_updated(self, message: NodeUpdated) -> None:
        snap = message.snapshot
        self.query_one(OverviewPane).show(snap)
        self.query_one(PeersPane).show(snap)
        self.query_one(SwarmPane).show(snap)
        self.query_one(MyNodePane).show(snap)
        self.query_one(LedgerPane).show(snap)

    # -- streams --------------------------------------------------------------------------------------
    @work(exclusive=True, group="logs")
    async def follow_logs(self) -> None:
        self._logs_running = True
        pane = self.query_one(LogsPane)
        seen: dict = {}  # the last line shown, per node process: a restarted node numbers from 1 again
        try:
            while True:
                pid = self.snapshot.status.get("pid") if self.snapshot else None
                try:
                    async for x in self.client.stream("logs", tail=200):
                        if "result" in x or x.get("seq", 0) <= seen.get(pid, 0):
                            continue
                        seen[pid] = x["seq"]
                        pane.add(x)
                except (NodeNotRunning, ControlError):
                    pass
                await asyncio.sleep(self.retry_s)
        finally:
            self._logs_running = False

    @on(Input.Submitted, "#prompt")
    def submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.generate(event.value.strip())

    @work(exclusive=True, group="generate")
    async def generate(self, prompt: str) -> None:
        pane = self.query_one(PlaygroundPane)
        out = pane.query_one("#generated", Static)
        status = pane.query_one("#playground-status", Static)
        text = Text()
        text.append(prompt + "\n\n", style="bold")
        out.update(text)
        status.update("generating…")
        try:
            async for item in self.client.stream("generate", prompt=prompt, max_new_tokens=64):
                if "result" in item:
                    r = item["result"]
                    status.update(f"{len(r['tokens'])} tokens, {r['tokens_per_s']:.1f} tokens/s, "
                                  f"{len(r.get('failovers', []))} failovers")
                    if r.get("route"):
                        pane.show_route(r["route"])
                    continue
                if "route" in item:
                    pane.show_route(item["route"])
                text.append(item["text"])
                out.update(text)
                pane.query_one("#playground-out", VerticalScroll).scroll_end(animate=False)
        except (NodeNotRunning, ControlError) as e:
            status.update(Text(f"generation failed: {e}", style="bold red"))

    # -- actions --------------------------------------------------------------------------------------
    def _active(self) -> str:
        return self.query_one(TabbedContent).active

    def action_show_pane(self, pane: str) -> None:
        self.query_one(TabbedContent).active = pane
        if pane == "playground":  # the pane is its prompt: type at once; escape leaves it for the keys
            self.query_one("#prompt", Input).focus()
        else:
            self.set_focus(None)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_unfocus(self) -> None:
        self.set_focus(None)

    def action_filter(self) -> None:
        target = {"peers": "#peer-filter", "logs": "#log-filter", "playground": "#prompt"}.get(self._active())
        if target is None:
            self.notify("/ filters the Peers (2) and Logs (7) panes", timeout=3)
            return
        self.query_one(target, Input).focus()

    def action_copy_peer_id(self) -> None:
        if self.snapshot is None:
            return
        self.copy_to_clipboard(self.snapshot.status["peer_id"])
        self.notify(f"copied {self.snapshot.status['peer_id']}", timeout=3)

    def action_sort(self) -> None:
        if self._active() == "peers":
            self.query_one(PeersPane).cycle_sort()

    def _peer_action(self, action: str) -> None:
        if self._active() != "peers":
            self.notify(f"select a peer in the Peers pane (2) to {action} it", timeout=3)
            return
        peer = self.query_one(PeersPane).selected_peer()
        if peer is None:
            self.notify("no peer selected", timeout=3)
            return
        question = (f"Ban peer {short_peer(peer, 16)} for an hour?\nThis node routes around it."
                    if action == "ban" else f"Unban peer {short_peer(peer, 16)}?")

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(PeerAction(action, peer))

        self.push_screen(ConfirmScreen(question), answered)

    def action_ban(self) -> None:
        self._peer_action("ban")

    def action_unban(self) -> None:
        self._peer_action("unban")

    def on_peer_action(self, message: PeerAction) -> None:
        self.do_peer_action(message.action, message.peer)

    @work(group="actions")
    async def do_peer_action(self, action: str, peer: str) -> None:
        try:
            await (self.client.ban(peer) if action == "ban" else self.client.unban(peer))
            self.notify(f"{action}ned {short_peer(peer, 12)}", timeout=3)
        except (NodeNotRunning, ControlError) as e:
            self.notify(f"{action} failed: {e}", severity="error")
        await self.poll_once()

    def action_drain(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.do_drain()

        self.push_screen(ConfirmScreen("Drain this node?\nIt takes no new sessions; open ones finish."), answered)

    @work(group="actions")
    async def do_drain(self) -> None:
        try:
            await self.client.drain()
            self.notify("draining: no new sessions", timeout=3)
        except (NodeNotRunning, ControlError) as e:
            self.notify(f"drain failed: {e}", severity="error")
        await self.poll_once()

    async def on_unmount(self) -> None:
        await self.client.close()


def run_tui(data_dir: str) -> None:
    from .client import SocketNodeClient

    PoolaiApp(SocketNodeClient(data_dir), data_dir=data_dir).run()
