"""Plain-text rendering of control API answers for the CLI (the TUI has its own widgets)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def coverage_bar(replicas: list[int], target: int = 2) -> str:
    """One character per block: '.' for a gap, then the replica count (capped at 9)."""
    return "".join("." if r == 0 else str(min(r, 9)) for r in replicas)


def format_status(info: dict) -> str:
    st, sw, se = info["status"], info["swarm"], info["sessions"]
    lines = [
        f"peer     {st['peer_id']}  (poolai {st['version']}, up {duration(st['uptime_s'])}, "
        f"{st['connected_peers']} peers connected)",
        f"listen   {', '.join(st['addrs'])}",
        f"model    {st['model']['name']} {st['model']['id'][:12]}, {st['model']['blocks']} blocks",
    ]
    dev, mem = st.get("device") or {}, st.get("memory") or {}
    if dev:
        lines.append(f"device   {dev['name']}, {dev['free_bytes'] / 2**30:.1f} of {dev['total_bytes'] / 2**30:.1f} GiB "
                     f"free; node resident {mem.get('rss_bytes', 0) / 2**20:,.0f} MiB")
    if st.get("bootstrap"):
        lines.append(f"boot     {st['bootstrap_online']} bootstrap peers online, {st['bootstrap_unreachable']} unreachable")
    if st.get("overlay_size_estimate"):
        n_hat = round(st["overlay_size_estimate"])
        lines.append(f"overlay  ~{n_hat} node{'' if n_hat == 1 else 's'} (estimate)")
    if st.get("metrics_url"):
        lines.append(f"metrics  {st['metrics_url']}")
    if st["span"]:
        srv = se["server"]
        lines.append(f"my span  {st['span'][0]}:{st['span'][1]} ({st['state']}), {srv['sessions_open']} sessions open, "
                     f"{srv['sessions_total']} served, cache {srv['cache_tokens_reserved']}/{srv['cache_tokens_budget']} "
                     f"tokens reserved")
    else:
        lines.append("my span  none (client only)")
    lines.append("")
    lines.append(f"coverage {coverage_bar(sw['replicas'])}   (replicas per block; '.' = no server)")
    for run in sw["runs"]:
        tput = sum(sw["throughput"][run["start"]:run["end"]]) / (run["end"] - run["start"])
        gap = "  <- GAP" if run["replicas"] == 0 else ""
        lines.append(f"  blocks {run['start']:>3}-{run['end'] - 1:<3} {run['replicas']} replica(s), "
                     f"{tput:,.0f} block-steps/s{gap}")
    lines.append("")
    lines.append(f"servers ({len(sw['servers'])})")
    for s in sw["servers"]:
        lines.append(f"  {s['peer'][-12:]}  {s['start']:>3}:{s['end']:<3} {s['state']:<9} "
                     f"{s['throughput']:>8,.0f}/s  cache {s['cache_tokens_left']:>6}  {s['device']}")
    if se["sessions"]:
        lines.append("")
        lines.append("my sessions")
        for x in se["sessions"]:
            lines.append(f"  client {x['client']}  blocks {x['start']}:{x['end']}  {x['tokens']}/{x['max_length']} tokens")
    return "\n".join(lines)
