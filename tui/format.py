"""Pure formatting for the TUI's widgets: numbers, bars and rates. No Textual, no I/O: unit-tested."""

from __future__ import annotations

from rich.text import Text

from node.format import duration
from protocol.errors import MalformedFrame
from protocol.versions import OUR_MAJORS, REFUSED_MAJORS_AROUND, parse_protocol_id

__all__ = ["bar", "capacity_tokens_per_s", "coverage_text", "duration", "human_bytes", "protocols_label", "rate",
           "short_peer"]


def human_bytes(n: float | None) -> str:
    if not n:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def short_peer(peer: str, keep: int = 10) -> str:
    """The tail of a base58 peer ID, which is where IDs differ (they all start 12D3KooW)."""
    return peer if len(peer) <= keep + 1 else "…" + peer[-keep:]


def coverage_text(replicas: list[int], width: int, target: int = 2) -> Text:
    """One cell per block (or per group of blocks when they do not fit `width`): the replica count,
    a red '·' on a gap. A group shows its least-covered block, so a gap is never hidden."""
    text = Text()
    n = len(replicas)
    if n == 0:
        return Text("no blocks", style="dim")
    if n <= width:  # wide enough: one run of up to 3 cells per block, easier to read than 1
        per = max(1, min(3, width // n))
        for r in replicas:
            if r == 0:
                text.append("·" * per, style="bold white on red")
            else:
                text.append(str(min(r, 9)) * per, style="black on green" if r >= target else "black on yellow")
        return text
    cells = width
    for c in range(cells):
        lo, hi = c * n // cells, max(c * n // cells + 1, (c + 1) * n // cells)
        r = min(replicas[lo:hi])
        if r == 0:
            text.append("·", style="bold white on red")
        else:
            text.append(str(min(r, 9)), style="black on green" if r >= target else "black on yellow")
    return text


def bar(used: float, total: float, width: int = 20) -> Text:
    """A used/total bar: green, yellow over 70%, red over 90%."""
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, used / total))
    fill = round(frac * width)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.7 else "green"
    return Text("█" * fill, style=style) + Text("░" * (width - fill), style="dim")


def capacity_tokens_per_s(throughput: list[float]) -> float:
    """Tokens/s one pipeline over the swarm's announced per-block throughput could reach: a token
    passes every block once, so the times add up (0 when a block has no server)."""
    if not throughput or any(t <= 0 for t in throughput):
        return 0.0
    return 1.0 / sum(1.0 / t for t in throughput)


def rate(prev: tuple[float, float] | None, now: tuple[float, float]) -> float:
    """(time, counter) pairs -> counter per second; 0 when time did not advance or the counter reset."""
    if prev is None:
        return 0.0
    dt, dv = now[0] - prev[0], now[1] - prev[1]
    return dv / dt if dt > 0 and dv >= 0 else 0.0


def protocols_label(protocols: list[str]) -> str:
    """poolai's protocols the peer speaks, libp2p's as a count: "infer ring swarm +4".

    A name alone means the peer speaks our major of it; another major is shown ("infer/2"), so a peer
    of another version stands out. A node also registers a refusal on the REFUSED_MAJORS_AROUND majors
    on each side of its own (protocol/versions.py), and identify lists those too: a set of majors that
    is exactly such a window names its middle one; any other set is shown whole.
    """
    majors: dict[str, set[int]] = {}
    for x in protocols:
        if x.startswith("/poolai/"):
            try:
                name, major = parse_protocol_id(x)
            except MalformedFrame:
                continue
            majors.setdefault(name, set()).add(major)
    ours = []
    for name in sorted(majors):
        got = majors[name]
        real = max(got) - REFUSED_MAJORS_AROUND
        if len(got) > 1 and got == set(range(max(0, real - REFUSED_MAJORS_AROUND), real + REFUSED_MAJORS_AROUND + 1)):
            got = {real}
        ours.append(name if got == {OUR_MAJORS.get(name)} else f"{name}/{','.join(str(m) for m in sorted(got))}")
    others = len({x for x in protocols if not x.startswith("/poolai/")})
    return " ".join(ours + ([f"+{others}"] if others else [])) or "-"
