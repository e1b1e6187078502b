"""Helpers for tests of poolai and of code built on it: in-process nodes on 127.0.0.1, a raw peer
that speaks arbitrary bytes, and config builders. Real libp2p hosts, real weights; nothing mocked.
"""

from __future__ import annotations

from pathlib import Path

import trio

from .config import NodeConfig
from .p2p import P2P, open_p2p
from .runtime import Node, run_node

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def node_config(cache_dir: Path, *, span: tuple[int, int] | None = None, bootstrap: tuple[str, ...] = (),
                serve: bool = True, **kw) -> NodeConfig:
    return NodeConfig(listen=(LOOPBACK,), span=span, serve=serve, bootstrap=bootstrap,
                      model_cache_dir=str(cache_dir), bootstrap_timeout_s=kw.pop("bootstrap_timeout_s", 5.0),
                      source="test", **kw)


async def start_node(nursery: trio.Nursery, config: NodeConfig, data_dir: Path) -> Node:
    """Start a node in `nursery` and return it once it is reachable and announcing."""
    return await nursery.start(run_node, config, data_dir)


async def start_swarm(nursery: trio.Nursery, cache_dir: Path, root: Path,
                      spans: list[tuple[int, int]]) -> list[Node]:
    """One node per span, all bootstrapping from the first."""
    first = await start_node(nursery, node_config(cache_dir, span=spans[0]), root / "n0")
    boot = (first.p2p.listen_addrs()[0],)
    nodes = [first]
    for i, span in enumerate(spans[1:], 1):
        nodes.append(await start_node(nursery, node_config(cache_dir, span=span, bootstrap=boot), root / f"n{i}"))
    return nodes


def raw_host(key_pair=None):
    """A bare libp2p host (no poolai services) for tests that speak raw bytes to a node."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    return open_p2p(key_pair or create_new_key_pair(), [LOOPBACK])


__all__ = ["LOOPBACK", "P2P", "node_config", "raw_host", "start_node", "start_swarm"]
