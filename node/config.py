"""The node's TOML config: parsed, checked, and turned into a frozen NodeConfig.

Unknown keys are errors, not warnings: a misspelt key silently ignored is a setting the operator thinks
is in force and is not. Every error names the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import multiaddr

from protocol.signing import b58decode

from .errors import ConfigError

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"


@dataclass(frozen=True)
class NodeConfig:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    span: tuple[int, int] | None = None  # pinned span; None = chosen by the node
    blocks: int = 0  # how many blocks to serve when the span is chosen; 0 = as many as memory allows
    serve: bool = True  # False: a client-only node that serves no blocks
    log_level: str = "info"
    torch_threads: int = 0  # 0 = auto, see node.runtime.apply_torch_threads
    bootstrap: tuple[str, ...] = ()
    bootstrap_timeout_s: float = 10.0
    announce_interval_s: float = 15.0
    announce_ttl_s: float = 60.0
    rebalance_period_s: float = 60.0
    overlay_period_s: float = 10.0  # overlay stabilisation period (node.overlay.STABILISE_PERIOD_S)
    gguf: str | None = None
    model_cache_dir: str | None = None
    cache_tokens: int = 16384
    throughput: float = 0.0  # announced block-steps per second; 0 = measure at start
    max_sessions: int = 16
    session_idle_timeout_s: float = 120.0
    ledger_credit_limit: int = 200_000  # L: clients down to -L units are served (protocol.ledger.FREE_TIER_UNITS)
    ledger_sync_interval_s: float = 2.0  # anti-entropy with one random peer this often (node.ledger)
    demo_nodes: int = 3
    demo_spans: tuple[tuple[int, int], ...] = ()
    metrics_enabled: bool = False  # a Prometheus endpoint (node/metrics.py): off unless asked for
    metrics_port: int = 9464  # the port Prometheus' exporter guide gives to "poolai"-like exporters
    metrics_host: str = "127.0.0.1"  # local only by default: the figures name peers and spans
    source: str = "<defaults>"
    extra: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **kw: Any) -> "NodeConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


# section -> key -> (NodeConfig attribute, parser)
def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError("a list of strings")
    return tuple(v)


# Upper bounds: far above any real setting, low enough that a typo (an extra zero, a value in ms) is
# caught here instead of as a hang, an overflow or a 40 GiB allocation later.
MAX_PERIOD_S = 86_400.0  # periods and timeouts: a day
MAX_CACHE_TOKENS = 10_000_000  # about 180 GiB of fp32 KV cache for the embedded model: beyond any host
MAX_SESSIONS = 4096
MAX_THREADS = 1024
MAX_BLOCKS = 10_000
MAX_THROUGHPUT = 1e9  # block-steps per second
MAX_CREDIT_UNITS = 10**15  # 64-bit safe with room for sums
MAX_DEMO_NODES = 30  # one per block of the embedded model


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_PERIOD_S:  # NaN fails too
        raise TypeError(f"a number of seconds in (0, {MAX_PERIOD_S:.0f}]")
    return float(v)


def _number_upto(hi: float):
    def parse(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:  # NaN fails too
            raise TypeError(f"a number in [0, {hi:g}]")
        return float(v)
    return parse


def _int_in(lo: int, hi: int):
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise TypeError(f"a whole number in {lo}..{hi}")
        return v
    return parse


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _level(v: Any) -> str:
    if v not in ("debug", "info", "warning", "error"):
        raise TypeError("one of debug, info, warning, error")
    return v


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise TypeError("a port number in 1..65535")
    return v


def _span_or_auto(v: Any) -> tuple[int, int] | None:
    if v == "auto":
        return None
    if not isinstance(v, str):
        raise TypeError('"A:B" or "auto"')
    return parse_span(v)


def _span_list(v: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError('a list of "A:B" strings')
    return tuple(parse_span(x) for x in v)


SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "node": {
        "listen": ("listen", _str_list),
        "span": ("span", _span_or_auto),
        "blocks": ("blocks", _int_in(0, MAX_BLOCKS)),
        "serve": ("serve", _bool),
        "log_level": ("log_level", _level),
        "torch_threads": ("torch_threads", _int_in(0, MAX_THREADS)),
    },
    "swarm": {
        "bootstrap": ("bootstrap", _str_list),
        "bootstrap_timeout_s": ("bootstrap_timeout_s", _seconds),
        "announce_interval_s": ("announce_interval_s", _seconds),
        "announce_ttl_s": ("announce_ttl_s", _seconds),
        "rebalance_period_s": ("rebalance_period_s", _seconds),
    },
    "overlay": {
        "stabilise_period_s": ("overlay_period_s", _seconds),
    },
    "model": {
        "gguf": ("gguf", _str),
        "cache_dir": ("model_cache_dir", _str),
    },
    "ledger": {
        "credit_limit": ("ledger_credit_limit", _int_in(0, MAX_CREDIT_UNITS)),
        "sync_interval_s": ("ledger_sync_interval_s", _seconds),
    },
    "server": {
        "cache_tokens": ("cache_tokens", _int_in(1, MAX_CACHE_TOKENS)),
        "throughput": ("throughput", _number_upto(MAX_THROUGHPUT)),
        "max_sessions": ("max_sessions", _int_in(1, MAX_SESSIONS)),
        "session_idle_timeout_s": ("session_idle_timeout_s", _seconds),
    },
    "metrics": {
        "enabled": ("metrics_enabled", _bool),
        "port": ("metrics_port", _port),
        "host": ("metrics_host", _str),
    },
    "demo": {
        "nodes": ("demo_nodes", _int_in(1, MAX_DEMO_NODES)),
        "spans": ("demo_spans", _span_list),
    },
}


def parse_span(text: str) -> tuple[int, int]:
    """'10:20' -> (10, 20); ConfigError for anything else. Bounds against the model are checked later."""
    a, sep, b = text.partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise ConfigError(f"span {text!r} is not of the form A:B with whole numbers (e.g. 0:10)")
    start, end = int(a), int(b)
    if start >= end:
        raise ConfigError(f"span {text!r} is empty: its start must be below its end")
    return start, end


def check_multiaddr(text: str, what: str, need_peer_id: bool = False, listen: bool = False) -> multiaddr.Multiaddr:
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as e:
        raise ConfigError(f"{what} {text!r} is not a valid multiaddr ({e})") from None
    protocols = [p.name for p in addr.protocols()]
    if "tcp" not in protocols or not ({"ip4", "ip6", "dns", "dns4", "dns6"} & set(protocols)):
        raise ConfigError(f"{what} {text!r} must be a TCP multiaddr like /ip4/127.0.0.1/tcp/4001")
    if listen and protocols[0] not in ("ip4", "ip6"):
        # py-libp2p listens on every interface for a /dns name: say which interface, by address.
        raise ConfigError(f"{what} {text!r} must name an IP address (/ip4/... or /ip6/...), not a host name")
    if need_peer_id:
        if "p2p" not in protocols:
            raise ConfigError(f"{what} {text!r} lacks the peer ID: append /p2p/<peer id>")
        try:
            b58decode(addr.value_for_protocol("p2p"))
        except Exception:
            raise ConfigError(f"{what} {text!r} has an invalid peer ID") from None
    return addr


def load_config(path: str | Path | None) -> NodeConfig:
    """Read and check a config file; None gives the defaults."""
    if path is None:
        return NodeConfig()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return config_from_dict(data, str(path))


def config_from_dict(data: dict[str, Any], source: str) -> NodeConfig:
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown config section [{section}] (known: {', '.join(SCHEMA)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {section} must be a [{section}] table")
        for key, value in body.items():
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{source}: unknown config key '{section}.{key}' (known in [{section}]: {', '.join(SCHEMA[section])})"
                )
            attr, parse = SCHEMA[section][key]
            try:
                values[attr] = parse(value)
            except TypeError as e:
                raise ConfigError(f"{source}: config key '{section}.{key}' must be {e}, not {value!r}") from None
    config = NodeConfig(source=source, **values)
    validate(config)
    return config


def validate(config: NodeConfig) -> None:
    """Checks that hold whatever the source (file or command line)."""
    if not config.listen:
        raise ConfigError(f"{config.source}: node.listen needs at least one address")
    for addr in config.listen:
        check_multiaddr(addr, "listen address", listen=True)
    for addr in config.bootstrap:
        check_multiaddr(addr, "bootstrap address", need_peer_id=True)
