"""Failover benchmark: 4 node processes (two stripes of two mirrors), greedy 64 tokens, one server
SIGKILLed at token 20.

    .venv/bin/python bench/failover.py [--tokens 64] [--kill-at 20]

Prints the seconds from the kill to the next token and whether the text equals the undisturbed run;
the last line is one JSON object:
{"identical": ..., "recovery_s": ..., "tokens_per_s_with_kill": ..., "tokens_per_s_clean": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from node.config import NodeConfig  # noqa: E402
from node.demo import LocalSwarm  # noqa: E402
from node.runtime import apply_torch_threads, run_node  # noqa: E402
from node.weights import default_model_cache, prepare_model  # noqa: E402
from protocol.signing import b58encode  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
SPANS = [(0, 15), (0, 15), (15, 30), (15, 30)]


async def run(root: Path, cache: Path, tokens: int, kill_at: int) -> dict:
    swarm = LocalSwarm(root, NodeConfig(), SPANS, cache)
    out: dict = {}
    try:
        async with trio.open_nursery() as nursery:
            await swarm.start()
            cfg = NodeConfig(serve=False, bootstrap=tuple(swarm.bootstrap_addrs()), model_cache_dir=str(cache),
                             source="bench")
            node = await nursery.start(run_node, cfg, root / "client")
            await node.client.wait_ready(60)
            await node.client.generate(PROMPT, 8)  # warm-up
            clean = await node.client.generate(PROMPT, tokens, stop_at_eos=False)
            killed: list = []

            def on_token(token, text):
                if on_token.n == kill_at - 1 and not killed:
                    hop = node.client.last_route[-1]  # the last span: the one whose output we wait for
                    i = next(k for k, s in enumerate(swarm.states) if s["peer_id"] == b58encode(hop.peer_id))
                    swarm.kill(i)
                    killed.append(time.perf_counter())
                on_token.n += 1
            on_token.n = 0
            t0 = time.perf_counter()
            hurt = await node.client.generate(PROMPT, tokens, stop_at_eos=False, on_token=on_token)
            kill_t = killed[0] - t0
            after = next(t for t in hurt.token_times if t > kill_t)
            out = {
                "identical": hurt.tokens == clean.tokens,
                "recovery_s": round(after - kill_t, 3),
                "tokens_per_s_with_kill": round(hurt.tokens_per_s, 2),
                "tokens_per_s_clean": round(clean.tokens_per_s, 2),
                "failovers": [{"blocks": f.blocks, "replayed_steps": f.replayed_steps,
                               "recovery_in_client_s": round(f.recovery_s, 3)} for f in hurt.failovers],
            }
            nursery.cancel_scope.cancel()
    finally:
        swarm.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kill-at", type=int, default=20)
    args = ap.parse_args()
    apply_torch_threads(0)
    root = Path(tempfile.mkdtemp(prefix="poolai-failover-"))
    cache = default_model_cache()
    prepare_model(cache)
    r = trio.run(run, root, cache, args.tokens, args.kill_at)
    print(f"killed a server at token {args.kill_at}: next token {r['recovery_s']:.3f} s after the kill; "
          f"identical output: {r['identical']}")
    print(f"tokens/s clean {r['tokens_per_s_clean']}, with the kill {r['tokens_per_s_with_kill']}; "
          f"failovers: {r['failovers']}")
    print(json.dumps({k: r[k] for k in ("identical", "recovery_s", "tokens_per_s_with_kill", "tokens_per_s_clean")}))


if __name__ == "__main__":
    main()
