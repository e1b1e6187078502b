"""Local vs 3-process swarm tokens/s for greedy 64 tokens on the same prompt.

    .venv/bin/python bench/pipeline.py [--tokens 64] [--data-dir DIR]

Prints both figures, the per-hop cost (swarm time per token minus local, over the hops) and, last,
`ratio=<swarm/local>`. Both runs decode after one warm-up generation, with the same torch threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from node.config import NodeConfig  # noqa: E402
from node.demo import LocalSwarm  # noqa: E402
from node.model import LocalModel, format_chat  # noqa: E402
from node.runtime import apply_torch_threads, run_node  # noqa: E402
from node.weights import default_model_cache, prepare_model  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


ROUNDS = 3  # local and swarm runs alternate, so a noisy moment hits both; medians are reported


def local_generate(model: LocalModel, ids: list[int], tokens: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = model.generate(ids, tokens, stop_ids=())
    return out, len(out) / (time.perf_counter() - t0)


async def run(root: Path, cache: Path, converted, tokens: int) -> dict:
    model = LocalModel.load(converted)
    tok = converted.load_tokenizer()
    ids = tok.encode(format_chat(converted.chat_template, PROMPT), add_special_tokens=False).ids
    model.generate(ids, 8)  # warm-up
    swarm = LocalSwarm(root, NodeConfig(), [(0, 10), (10, 20), (20, 30)], cache)
    out: dict = {"local": [], "swarm": []}
    try:
        async with trio.open_nursery() as nursery:
            await swarm.start()
            cfg = NodeConfig(serve=False, bootstrap=tuple(swarm.bootstrap_addrs()), model_cache_dir=str(cache),
                             source="bench")
            node = await nursery.start(run_node, cfg, root / "client")
            await node.client.wait_ready(60)
            await node.client.generate(PROMPT, 8)  # warm-up: connections, streams, caches
            for _ in range(ROUNDS):
                local_tokens, local_tps = local_generate(model, ids, tokens)
                r = await node.client.generate(PROMPT, tokens, stop_at_eos=False)
                out["local"].append(local_tps)
                out["swarm"].append(r.tokens_per_s)
                out["identical"] = out.get("identical", True) and r.tokens == local_tokens
                out["hops"] = len(r.route)
                print(f"  round: local {local_tps:.2f} tokens/s, swarm {r.tokens_per_s:.2f} tokens/s", flush=True)
            nursery.cancel_scope.cancel()
    finally:
        swarm.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    apply_torch_threads(0)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="poolai-bench-"))
    cache = default_model_cache()
    converted, _ = prepare_model(cache)
    r = trio.run(run, root, cache, converted, args.tokens)
    local_tps, swarm_tps = statistics.median(r["local"]), statistics.median(r["swarm"])
    per_hop_ms = (1 / swarm_tps - 1 / local_tps) / r["hops"] * 1000
    print(f"local: {local_tps:.2f} tokens/s (median of {ROUNDS}, {args.tokens} tokens, one process)")
    print(f"swarm: {swarm_tps:.2f} tokens/s (median of {ROUNDS}) through {r['hops']} processes; "
          f"identical tokens: {r['identical']}")
    print(f"per-hop cost: {per_hop_ms:.2f} ms per token per hop")
    print(f"ratio={swarm_tps / local_tps:.3f}")


if __name__ == "__main__":
    main()
