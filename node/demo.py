"""`poolai demo`: a loopback swarm of separate node processes, and one generation through it.

The demo converts the model once into a cache the nodes share, starts node 0, reads its address from
its `node.json`, starts the others with node 0 as their bootstrap peer, waits until every block is
served, then joins as a client-only node in this process and generates, streaming the text. Every
process it started is stopped on the way out, on Ctrl-C too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from .config import ConfigError, NodeConfig, load_config
from .errors import StartupError
from .runtime import STATE_FILE, _log_progress
from .weights import default_model_cache, prepare_model

log = logging.getLogger("poolai.demo")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "bootstrap" / "local.toml"
# Starting a node loads its blocks (~1 s) and a Python with torch and libp2p (~3 s); 120 s is a
# machine under heavy load, not a slow start.
NODE_START_TIMEOUT_S = 120.0
COVERAGE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def even_spans(n_blocks: int, nodes: int) -> list[tuple[int, int]]:
    bounds = [round(i * n_blocks / nodes) for i in range(nodes + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(nodes)]


def node_toml(config: NodeConfig, span: tuple[int, int], bootstrap: list[str], cache_dir: Path) -> str:
    def q(s: str) -> str:
        return json.dumps(s)  # a JSON string is a valid TOML basic string

    return "\n".join([
        "[node]",
        f"listen = [{', '.join(q(a) for a in config.listen)}]",
        f"span = {q(f'{span[0]}:{span[1]}')}",
        f"log_level = {q(config.log_level)}",
        f"torch_threads = {config.torch_threads}",
        "[swarm]",
        f"bootstrap = [{', '.join(q(a) for a in bootstrap)}]",
        f"bootstrap_timeout_s = {config.bootstrap_timeout_s}",
        f"announce_interval_s = {config.announce_interval_s}",
        f"announce_ttl_s = {config.announce_ttl_s}",
        "[model]",
        f"cache_dir = {q(str(cache_dir))}",
        "[server]",
        f"cache_tokens = {config.cache_tokens}",
        f"max_sessions = {config.max_sessions}",
        f"session_idle_timeout_s = {config.session_idle_timeout_s}",
        "",
    ])


class LocalSwarm:
    """N node processes on 127.0.0.1; a context manager that always stops what it started."""

    def __init__(self, root: Path, config: NodeConfig, spans: list[tuple[int, int]], cache_dir: Path,
                 quiet: bool = False) -> None:
        self.root, self.config, self.spans, self.cache_dir = root, config, spans, cache_dir
        self.procs: list[subprocess.Popen] = []
        self.states: list[dict] = []
        self.quiet = quiet

    def node_dir(self, i: int) -> Path:
        return self.root / f"node-{i}"

    def start_node(self, i: int, bootstrap: list[str]) -> subprocess.Popen:
        d = self.node_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        (d / STATE_FILE).unlink(missing_ok=True)
        cfg = d / "node.toml"
        cfg.write_text(node_toml(self.config, self.spans[i], bootstrap, self.cache_dir))
        err = open(d / "stderr.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "node", "--config", str(cfg), "--data-dir", str(d)],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        err.close()
        if i < len(self.procs):
            self.procs[i] = proc
        else:
            self.procs.append(proc)
        return proc

    async def wait_state(self, i: int, timeout: float = NODE_START_TIMEOUT_S) -> dict:
        path = self.node_dir(i) / STATE_FILE
        proc = self.procs[i]
        with trio.move_on_after(timeout):
            while True:
                if proc.poll() is not None:
                    tail = (self.node_dir(i) / "stderr.log").read_text(errors="replace").strip().splitlines()[-3:]
                    raise StartupError(f"demo node {i} exited with code {proc.returncode}: {' | '.join(tail)}")
                if path.exists():
                    try:
                        state = json.loads(path.read_text())
                        if state.get("pid") == proc.pid:
                            return state
                    except json.JSONDecodeError:
                        pass
                await trio.sleep(0.05)
        raise StartupError(f"demo node {i} did not start within {timeout:g} s; see {self.node_dir(i) / 'stderr.log'}")

    async def start(self) -> list[dict]:
        self.start_node(0, [])
        first = await self.wait_state(0)
        self.states = [first]
        boot = [first["addrs"][0]]
        for i in range(1, len(self.spans)):
            self.start_node(i, boot)
        for i in range(1, len(self.spans)):
            self.states.append(await self.wait_state(i))
        return self.states

    def bootstrap_addrs(self) -> list[str]:
        return [s["addrs"][0] for s in self.states]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()


def cmd_demo(args) -> int:
    from .cli import check_generation_args, default_data_dir
    from .logs import setup_logging

    check_generation_args(args)
    config = load_config(args.config or DEFAULT_CONFIG)
    nodes = args.nodes or config.demo_nodes
    if not 1 <= nodes <= 30:
        raise ConfigError(f"--nodes must be in 1..30, not {nodes}")
    root = Path(args.data_dir) if args.data_dir else default_data_dir() / "demo"
    setup_logging("warning" if args.json else "info", root)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    cache_dir = Path(config.model_cache_dir) if config.model_cache_dir else default_model_cache()
    say(f"poolai demo: {nodes} nodes on 127.0.0.1, data in {root}")
    _, manifest = prepare_model(cache_dir, None, None if args.json else _log_progress)
    n_blocks = manifest.n_blocks
    spans = list(config.demo_spans) if len(config.demo_spans) == nodes else even_spans(n_blocks, nodes)
    for a, b in spans:
        if b > n_blocks:
            raise ConfigError(f"demo span {a}:{b} is outside the model's {n_blocks} blocks")
    swarm = LocalSwarm(root, config, spans, cache_dir)
    result: dict = {}
    try:
        trio.run(_demo_main, args, config, swarm, root, cache_dir, say, result)
    finally:
        swarm.stop()
    if not result:
        say(f"\ninterrupted; stopped {nodes} nodes")
        return 130
    if not args.json:
        say(f"\n\n{len(result['tokens'])} tokens in {result['elapsed_s']:.2f} s: {result['tokens_per_s']:.1f} tokens/s")
        say("route: " + " -> ".join(f"{h['peer']}[{h['start']}:{h['end']}]" for h in result["route"]))
        say(f"stopped {nodes} nodes")
    else:
        print(json.dumps(result))
    return 0


async def _demo_main(args, config: NodeConfig, swarm: LocalSwarm, root: Path, cache_dir: Path, say, result: dict) -> None:
    from .runtime import run_node

    async with trio.open_nursery() as nursery:
        from .cli import _cancel_on_signal

        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
        t0 = time.monotonic()
        states = await swarm.start()
        for i, s in enumerate(states):
            say(f"  node {i}: {s['peer_id']} serves blocks {s['span'][0]}:{s['span'][1]}")
        client_config = NodeConfig(
            listen=("/ip4/127.0.0.1/tcp/0",), serve=False, bootstrap=tuple(swarm.bootstrap_addrs()),
            model_cache_dir=str(cache_dir), log_level=config.log_level, source="demo client",
        )
        node = await nursery.start(run_node, client_config, root / "client")
        await node.client.wait_ready(COVERAGE_TIMEOUT_S)
        say(f"swarm ready in {time.monotonic() - t0:.1f} s; prompt: {args.prompt!r}\n")
        r = await node.client.generate(
            args.prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            on_token=None if args.json else (lambda t, s: print(s, end="", flush=True)),
        )
        result.update(dataclasses.asdict(r))
        nursery.cancel_scope.cancel()
