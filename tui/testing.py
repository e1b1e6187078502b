"""A fake NodeClient with fixed data, shaped like the node's control API answers (node/control.py).

Deterministic: the node clock (`uptime_s`) advances one second per `status` call and the counters by
fixed steps, so rates and sparklines render the same on every run.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

from .client import ControlError, NodeClient, NodeNotRunning

ME = "12D3KooWFakeNodeMe111111111111111111111111111111111"
PEERS = [
    "12D3KooWAlphaServer2222222222222222222222222222222222",
    "12D3KooWBravoServer3333333333333333333333333333333333",
    "12D3KooWCharlieClient444444444444444444444444444444444",
]

STATUS = {
    "peer_id": ME, "addrs": [f"/ip4/127.0.0.1/tcp/40001/p2p/{ME}"], "uptime_s": 3725.0, "version": "0.1.0",
    "control_version": 1, "pid": 4242, "data_dir": "/var/lib/poolai",
    "model": {"id": "e337e3cc45bf" + "0" * 52, "name": "smollm2-135m-instruct", "blocks": 30},
    "span": [0, 10], "state": "online", "connected_peers": 3,
    "device": {"kind": "cpu", "name": "cpu (2 cores)", "total_bytes": 8 * 2**30, "free_bytes": 5 * 2**30},
    "memory": {"rss_bytes": 700 * 2**20, "device_total_bytes": 8 * 2**30, "device_free_bytes": 5 * 2**30},
    "overlay_size_estimate": 42.5,
    "bootstrap": [{"addr": f"/ip4/127.0.0.1/tcp/40002/p2p/{PEERS[0]}", "peer": PEERS[0], "online": True},
                  {"addr": "/ip4/10.0.0.9/tcp/4001/p2p/12D3KooWGoneGoneGone5555555555555555555555555555555",
                   "peer": "12D3KooWGoneGoneGone5555555555555555555555555555555", "online": False}],
    "bootstrap_online": 1, "bootstrap_unreachable": 1, "pinned": False, "metrics_url": None,
}

PEER_LIST = {
    "peers": [
        {"peer": PEERS[0], "direction": "outbound", "since_s": 3600.0, "latency_ms": 0.61,
         "protocols": ["/ipfs/ping/1.0.0", "/poolai/infer/1", "/poolai/swarm/1"], "addrs": ["/ip4/127.0.0.1/tcp/40002"],
         "spans": [[10, 20]], "banned_for_s": 0},
        {"peer": PEERS[1], "direction": "inbound", "since_s": 1800.0, "latency_ms": 12.4,
         "protocols": ["/ipfs/ping/1.0.0", "/poolai/infer/1"], "addrs": ["/ip4/127.0.0.1/tcp/40003"],
         "spans": [[20, 25]], "banned_for_s": 0},
        {"peer": PEERS[2], "direction": "inbound", "since_s": 65.0, "latency_ms": None,
         "protocols": ["/ipfs/ping/1.0.0"], "addrs": ["/ip4/127.0.0.1/tcp/40004"], "spans": [], "banned_for_s": 0},
    ],
    "banned": [],
}

SWARM = {
    "model": "e337e3cc45bf", "model_name": "smollm2-135m-instruct", "blocks": 30,
    "replicas": [1] * 10 + [2] * 10 + [1] * 5 + [0] * 5,
    "throughput": [850.0] * 10 + [1500.0] * 10 + [700.0] * 5 + [0.0] * 5,
    "runs": [{"start": 0, "end": 10, "replicas": 1}, {"start": 10, "end": 20, "replicas": 2},
             {"start": 20, "end": 25, "replicas": 1}, {"start": 25, "end": 30, "replicas": 0}],
    "servers": [
        {"peer": ME, "start": 0, "end": 10, "state": "online", "throughput": 850.0, "cache_tokens_left": 12000,
         "device": "cpu (2 cores)", "expires_in_s": 45.0, "me": True},
        {"peer": PEERS[0], "start": 10, "end": 20, "state": "online", "throughput": 800.0,
         "cache_tokens_left": 16384, "device": "cpu (4 cores)", "expires_in_s": 50.0, "me": False},
        {"peer": PEERS[1], "start": 10, "end": 25, "state": "draining", "throughput": 700.0,
         "cache_tokens_left": 2048, "device": "cuda NVIDIA A10", "expires_in_s": 20.0, "me": False},
    ],
}

SESSIONS = {
    "span": [0, 10], "state": "online",
    "server": {"model_id": "e337e3cc45bf", "span": [0, 10], "sessions_open": 2, "sessions_total": 17,
               "sessions_refused": 1, "steps": 900, "tokens": 5000, "cache_tokens_reserved": 4384,
               "cache_tokens_budget": 16384, "compute_s": 12.5, "protocol_errors": 0},
    "sessions": [
        {"client": PEERS[2][-8:], "start": 0, "end": 10, "max_length": 2048, "opened": 0.0, "tokens": 310},
        {"client": PEERS[0][-8:], "start": 0, "end": 5, "max_length": 512, "opened": 0.0, "tokens": 64},
    ],
    "client": {"generations": 3, "tokens": 144, "failovers": 1, "banned": [], "rtt_ms": {}},
    "balancer": None, "pinned": False,
}

LEDGER = {
    "peer_id": ME, "balance": 1250, "own_view": 1250, "credit_limit": 10000, "may_consume": True, "entries": 5,
    "recent": [
        {"seq": 5, "time_ms": 1_700_000_500_000, "kind": "credit", "counterparty": PEERS[2], "session": "aa" * 16,
         "span": [0, 10], "tokens": 40, "units": 400, "balance_after": 1250},
        {"seq": 4, "time_ms": 1_700_000_400_000, "kind": "debit", "counterparty": PEERS[0], "session": "bb" * 16,
         "span": [10, 20], "tokens": 30, "units": 300, "balance_after": 850},
        {"seq": 3, "time_ms": 1_700_000_300_000, "kind": "credit", "counterparty": PEERS[2], "session": "cc" * 16,
         "span": [0, 10], "tokens": 60, "units": 600, "balance_after": 1150},
        {"seq": 2, "time_ms": 1_700_000_200_000, "kind": "credit", "counterparty": PEERS[1], "session": "dd" * 16,
         "span": [0, 10], "tokens": 50, "units": 500, "balance_after": 550},
        {"seq": 1, "time_ms": 1_700_000_100_000, "kind": "credit", "counterparty": PEERS[1], "session": "ee" * 16,
         "span": [0, 10], "tokens": 5, "units": 50, "balance_after": 50},
    ],
    "counterparties": [], "proofs": [{"author": PEERS[1], "seq": 7, "us": False}], "chains": 4, "balances_sum": 0,
    "statistics": None,
}

LOG_LINES = [
    {"seq": 1, "time": 1_700_000_000.0, "level": "INFO", "logger": "poolai.node", "message": f"peer ID {ME}"},
    {"seq": 2, "time": 1_700_000_001.0, "level": "INFO", "logger": "poolai.node",
     "message": "serving blocks 0:10 of model e337e3cc45bf"},
    {"seq": 3, "time": 1_700_000_002.0, "level": "WARNING", "logger": "poolai.client",
     "message": "server …Bravo33333 failed: timeout; banned for 5 s"},
    {"seq": 4, "time": 1_700_000_003.0, "level": "INFO", "logger": "poolai.balancer",
     "message": "span 0:10 stays: swarm minimum 700.0 block-steps/s"},
]

TOKEN_STEPS = [12, 30, 6, 24, 18, 40, 2, 28]  # tokens through the span per poll (one node-second apart)
GENERATED = ["Red", ",", " green", " and", " blue", "."]


class FakeNodeClient(NodeClient):
    """Fixed answers; `running=False` behaves like a data dir with no node. Records actions taken."""

    description = "the fake node"

    def __init__(self, *, running: bool = True, ledger: bool = True) -> None:
        self.running = running
        self.has_ledger = ledger
        self.actions: list[tuple[str, dict]] = []
        self.uptime = STATUS["uptime_s"]
        self.tokens = SESSIONS["server"]["tokens"]
        self.status_calls = 0
        self.sessions_calls = 0

    async def call(self, method: str, **args: Any) -> Any:
        await asyncio.sleep(0)
        if not self.running:
            raise NodeNotRunning("no node is running with data dir /var/lib/poolai (no control.sock)")
        if method == "status":
            self.status_calls += 1
            self.uptime += 1.0
            return {**copy.deepcopy(STATUS), "uptime_s": self.uptime}
        if method == "peers":
            return copy.deepcopy(PEER_LIST)
        if method == "swarm":
            return copy.deepcopy(SWARM)
        if method == "sessions":
            self.tokens += TOKEN_STEPS[self.sessions_calls % len(TOKEN_STEPS)]
            self.sessions_calls += 1
            s = copy.deepcopy(SESSIONS)
            s["server"]["tokens"] = self.tokens
            return s
        if method == "ledger":
            if not self.has_ledger:
                raise ControlError("unknown_method", "no method 'ledger'")
            return copy.deepcopy(LEDGER)
        if method in ("ban", "unban", "drain"):
            self.actions.append((method, args))
            return {"ok": True, **args}
        raise ControlError("unknown_method", f"no method {method!r}")

    async def stream(self, method: str, **args: Any) -> AsyncIterator[dict]:
        if not self.running:
            raise NodeNotRunning("no node is running")
        if method == "logs":
            for line in LOG_LINES:
                yield dict(line)
            await asyncio.Event().wait()  # a quiet node: nothing more until the stream is closed
        elif method == "generate":
            self.actions.append(("generate", args))
            route = [{"peer": ME, "start": 0, "end": 10}, {"peer": PEERS[0], "start": 10, "end": 20},
                     {"peer": PEERS[1], "start": 20, "end": 30}]
            for i, piece in enumerate(GENERATED):
                await asyncio.sleep(0)
                yield {"token": 100 + i, "text": piece, **({"route": route} if i == 0 else {})}
            yield {"result": {"text": "".join(GENERATED), "tokens": list(range(100, 100 + len(GENERATED))),
                              "tokens_per_s": 12.5, "route": route, "failovers": []}}
        else:
            raise ControlError("unknown_method", f"no method {method!r}")
