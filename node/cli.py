"""The `poolai` command line.

    poolai node --config FILE [--data-dir DIR] [--listen MULTIADDR] [--span A:B]
    poolai demo [--nodes 3] [--prompt TEXT] [--max-new-tokens N] [--json]
    poolai generate --local --prompt TEXT [--max-new-tokens N] [--json]
    poolai generate --config FILE --prompt TEXT ...      (joins the swarm as a client-only node)
    poolai generate [--data-dir DIR] --prompt TEXT ...   (through the running node of DIR)
    poolai tui [--data-dir DIR]                          (the terminal UI of the running node of DIR)
    poolai ledger [verify] [--data-dir DIR] [--json]
    poolai sim overlay ...

Bad input (a config file, a flag) ends with exit code 2 and one line naming the problem.
"""

from __future__ import annotations

import os

# OpenMP threads that spin after a parallel region steal the CPU from the next process in a pipeline
# of spans on one machine; a passive wait costs nothing measurable in a single process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from .errors import ConfigError, GenerationError, NodeError, StartupError  # noqa: E402

log = logging.getLogger("poolai")

EXIT_USAGE = 2
EXIT_FAILED = 1


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("poolai"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise ConfigError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="poolai", description="A peer-to-peer node that serves transformer layer spans.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    n = sub.add_parser("node", help="run a node")
    n.add_argument("--config", required=True, help="TOML config file")
    n.add_argument("--data-dir", help="identity, model cache, logs (default: the user data dir)")
    n.add_argument("--listen", help="override node.listen, e.g. /ip4/127.0.0.1/tcp/4001")
    n.add_argument("--span", help="serve blocks A:B (e.g. 0:10) instead of choosing")
    n.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    d = sub.add_parser("demo", help="start a loopback swarm and generate through it")
    d.add_argument("--nodes", type=int, help="number of server processes (default from the config: 3)")
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--config", help="swarm config (default: bootstrap/local.toml)")
    d.add_argument("--data-dir", help="where the demo nodes keep their data (default: <user data>/demo)")
    d.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _sampling(d)

    g = sub.add_parser("generate", help="generate text, locally or through a swarm")
    g.add_argument("--local", action="store_true", help="run the whole model in this process, no network")
    g.add_argument("--config", help="swarm config to join as a client-only node (without --local)")
    g.add_argument("--data-dir", help="without --local or --config: the running node to generate through "
                                      "(default: the user data dir)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _sampling(g)

    t = sub.add_parser("tui", help="the terminal UI of a running node")
    t.add_argument("--data-dir", help="the node's data dir (default: the user data dir)")

    st = sub.add_parser("status", help="what a running node serves, the swarm's coverage, its sessions")
    st.add_argument("--data-dir", help="the node's data dir (default: the user data dir)")
    st.add_argument("--json", action="store_true", help="print one JSON object")

    lg = sub.add_parser("ledger", help="this node's credit: balance, recent entries, counterparties, fraud proofs")
    lg.add_argument("action", nargs="?", choices=["verify"], help="verify: re-validate the whole local store")
    lg.add_argument("--data-dir", help="the node's data dir (default: the user data dir)")
    lg.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("sim", help="simulations of the swarm's algorithms", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")


def check_generation_args(args) -> None:
    if not 1 <= args.max_new_tokens <= 1024:
        raise ConfigError(f"--max-new-tokens must be in 1..1024, not {args.max_new_tokens}")
    from .model import MAX_TEMPERATURE

    if not 0 <= args.temperature <= MAX_TEMPERATURE:  # NaN fails too
        raise ConfigError(f"--temperature must be in 0..{MAX_TEMPERATURE:g}, not {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], not {args.top_p}")
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty")


def _first_node_error(group: BaseExceptionGroup) -> NodeError | None:
    """trio nurseries wrap errors in groups; the operator wants the one line of the cause."""
    for e in group.exceptions:
        if isinstance(e, NodeError):
            return e
        if isinstance(e, BaseExceptionGroup) and (found := _first_node_error(e)):
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BaseExceptionGroup as group:
        error = _first_node_error(group)
        if error is None:
            raise
        return _main(argv, error)


def _main(argv: list[str] | None = None, raised: NodeError | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if raised is not None:
            raise raised
        if argv[:1] == ["sim"]:  # its own parser: argparse.REMAINDER would refuse a leading --help
            from .sim import main as sim_main

            return sim_main(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "node":
            return cmd_node(args)
        if args.command == "demo":
            from .demo import cmd_demo

            return cmd_demo(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "tui":
            return cmd_tui(args)
        if args.command == "ledger":
            return cmd_ledger(args)
    except (ConfigError, StartupError) as e:
        print(f"poolai: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except GenerationError as e:
        print(f"poolai: generation failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except NodeError as e:
        print(f"poolai: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def node_config_from_args(args, serve: bool = True):
    from .config import check_multiaddr, load_config, parse_span, validate

    config = load_config(args.config)
    overrides = {}
    if getattr(args, "listen", None):
        check_multiaddr(args.listen, "--listen")
        overrides["listen"] = (args.listen,)
    if getattr(args, "span", None):
        overrides["span"] = parse_span(args.span)
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    if not serve:
        overrides["serve"] = False
    config = config.with_overrides(**overrides)
    validate(config)
    return config


def cmd_node(args) -> int:
    import trio

    from .logs import setup_logging
    from .runtime import run_node

    from .runtime import check_data_dir

    config = node_config_from_args(args)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    check_data_dir(data_dir)
    setup_logging(config.log_level, data_dir)

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            await nursery.start(run_node, config, data_dir)

    trio.run(main_task)
    log.info("node stopped")
    return 0


async def _cancel_on_signal(scope) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            scope.cancel()
            return


def cmd_status(args) -> int:
    import trio

    from .control import ControlClient, ControlError, NodeNotRunning
    from .format import format_status

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()

    async def fetch() -> dict:
        async with ControlClient(data_dir) as c:
            return {"status": await c.call("status"), "swarm": await c.call("swarm"),
                    "sessions": await c.call("sessions")}

    try:
        info = trio.run(fetch)
    except NodeNotRunning as e:
        raise StartupError(f"{e}; start one with: poolai node --config FILE --data-dir {data_dir}") from None
    except ControlError as e:
        raise StartupError(f"the node refused: {e}") from None
    print(json.dumps(info) if args.json else format_status(info))
    return 0


def cmd_ledger(args) -> int:
    """Ask the running node; with none running, read the data dir's ledger file directly."""
    import trio

    from .control import ControlClient, ControlError, NodeNotRunning
    from .ledger import LEDGER_FILE, format_ledger, format_verify, ledger_summary, verify_store
    from .ledger_store import LedgerStore

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    method = "ledger_verify" if args.action == "verify" else "ledger"

    async def fetch() -> dict:
        async with ControlClient(data_dir) as c:
            return await c.call(method, timeout=120.0)

    try:
        info = trio.run(fetch)
    except NodeNotRunning:
        path = data_dir / LEDGER_FILE
        if not path.exists():
            raise StartupError(f"no node is running with data dir {data_dir}, and it holds no ledger ({path})") from None
        store = LedgerStore.open(path)
        try:
            info = verify_store(store) if method == "ledger_verify" else ledger_summary(store)
        finally:
            store.close()
    except ControlError as e:
        raise StartupError(f"the node refused: {e}") from None
    if args.json:
        print(json.dumps(info))
    else:
        print(format_verify(info) if method == "ledger_verify" else format_ledger(info))
    return EXIT_FAILED if method == "ledger_verify" and not info["ok"] else 0


def cmd_generate(args) -> int:
    check_generation_args(args)
    if args.local:
        return _generate_local(args)
    if not args.config:
        return _generate_via_node(args)
    return _generate_swarm(args)


def cmd_tui(args) -> int:
    from tui.app import run_tui

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    run_tui(str(data_dir))
    return 0


def _generate_via_node(args) -> int:
    """Generate through the running node of --data-dir, over its control API, printing tokens as they come."""
    import trio

    from .control import ControlClient, ControlError, NodeNotRunning

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()

    def show(item: dict) -> None:
        if not args.json:
            print(item["text"], end="", flush=True)

    async def run() -> dict:
        async with ControlClient(data_dir) as c:
            return await c.stream("generate", show, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  chat=not args.no_chat)

    try:
        result = trio.run(run)
    except NodeNotRunning as e:
        raise StartupError(f"generate needs --local, --config FILE, or a running node: {e}; start one with: "
                           f"poolai node --config FILE --data-dir {data_dir}") from None
    except ControlError as e:
        if e.code == "generation_failed":
            raise GenerationError(e.detail) from None
        raise StartupError(f"the node refused: {e}") from None
    if not args.json:
        print(f"\n\n{len(result['tokens'])} tokens: {result['tokens_per_s']:.1f} tokens/s via "
              + " -> ".join(f"{h['peer'][-8:]}[{h['start']}:{h['end']}]" for h in result["route"]))
    _emit(args, result)
    return 0


def _emit(args, result: dict) -> None:
    if args.json:
        print(json.dumps(result))


def _generate_local(args) -> int:
    import time

    import torch

    from .logs import setup_logging
    from .model import LocalModel, format_chat, sample_next
    from .runtime import _log_progress, apply_torch_threads
    from .weights import default_model_cache, prepare_model

    apply_torch_threads(0)
    setup_logging("warning" if args.json else "info", None)
    converted, manifest = prepare_model(default_model_cache(), None, _log_progress)
    model = LocalModel.load(converted)
    tokenizer = converted.load_tokenizer()
    text_in = args.prompt if args.no_chat else format_chat(converted.chat_template, args.prompt)
    prompt_ids = tokenizer.encode(text_in, add_special_tokens=False).ids
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    cache = model.new_cache(len(prompt_ids) + args.max_new_tokens)
    tokens: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    step = prompt_ids
    for _ in range(args.max_new_tokens):
        logits = model.forward(step, cache, cache.length, last_only=True)
        token = sample_next(logits[0, -1], args.temperature, args.top_p, generator)
        tokens.append(token)
        if not args.json:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)
            shown = text
        if token == model.config.eos_id:
            break
        step = [token]
    elapsed = time.perf_counter() - t0
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    tps = len(tokens) / elapsed
    if not args.json:
        print(f"\n\n{len(tokens)} tokens in {elapsed:.2f} s: {tps:.1f} tokens/s (local, one process)")
    _emit(args, {"text": text, "tokens": tokens, "tokens_per_s": tps, "route": [{"peer": "local", "start": 0,
                 "end": manifest.n_blocks}], "elapsed_s": elapsed, "prompt_tokens": len(prompt_ids)})
    return 0


def _generate_swarm(args) -> int:
    import trio

    from .logs import setup_logging
    from .runtime import run_node

    config = node_config_from_args(args, serve=False)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir() / "client"
    setup_logging("warning" if args.json else config.log_level, data_dir, stderr=True)
    result: dict = {}

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            node = await nursery.start(run_node, config, data_dir)
            await node.client.wait_ready(30.0)
            r = await node.client.generate(
                args.prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                chat=not args.no_chat,
                on_token=None if args.json else (lambda t, s: print(s, end="", flush=True)))
            result.update(dataclasses.asdict(r))
            nursery.cancel_scope.cancel()

    trio.run(main_task)
    if not args.json:
        print(f"\n\n{len(result['tokens'])} tokens: {result['tokens_per_s']:.1f} tokens/s via "
              + " -> ".join(f"{h['peer'][-8:]}[{h['start']}:{h['end']}]" for h in result["route"]))
    _emit(args, result)
    return 0
