"""The node's local control API: a Unix socket in the data dir carrying msgpack frames.

Every front end (the CLI's `status`, the TUI) talks to a running node through it, never to the
node's insides. The socket is created mode 0600, so only the node's own user can connect.

    client                                   node
      {"t": "hello", "v": 1}             ->
                                          <- {"t": "hello", "v": 1, "version": "0.1.0"}
      {"t": "call", "id": 1, "method": "status", "args": {}}  ->
                                          <- {"t": "result", "id": 1, "value": {...}}
                                             or {"t": "error", "id": 1, "code": "...", "message": "..."}

A client speaking another major version gets an error naming both and the connection closes. A
malformed or oversized frame gets an error and the connection closes; the node keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import trio

from protocol.codec import FrameDecoder, encode_frame, field, str_field
from protocol.errors import RemoteProtocolError
from protocol.manifest import short_model_id
from protocol.signing import b58encode, short_id

log = logging.getLogger("poolai.control")

CONTROL_SOCKET = "control.sock"
CONTROL_MAJOR = 1
# Requests are small; answers carry the swarm map, which for a few thousand servers is a few MiB.
MAX_REQUEST_FRAME = 64 * 1024
MAX_ANSWER_FRAME = 8 * 1024 * 1024
MAX_CLIENTS = 16  # a TUI, a few CLI calls, a metrics scraper: more is a runaway script
READ_TIMEOUT_S = 300.0  # an idle front end is dropped after 5 minutes; it reconnects by itself
CONNECT_TIMEOUT_S = 5.0


def poolai_version() -> str:
    try:
        return version("poolai")
    except PackageNotFoundError:
        return "0+unknown"


class ControlError(Exception):
    """An answer of the node's control API that is an error (`code`, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NodeNotRunning(Exception):
    """No node answers on the data dir's control socket: start one, or pass the right --data-dir."""


# -- what the node answers -------------------------------------------------------------------------


def _ranges(values: list[int]) -> list[dict]:
    """Runs of equal replica counts: [{"start", "end", "replicas"}]."""
    out: list[dict] = []
    for b, v in enumerate(values):
        if out and out[-1]["replicas"] == v and out[-1]["end"] == b:
            out[-1]["end"] = b + 1
        else:
            out.append({"start": b, "end": b + 1, "replicas": v})
    return out


def build_methods(node) -> dict[str, Callable[[dict], Awaitable[Any]]]:
    manifest = node.client.manifest

    async def status(args: dict) -> dict:
        s = node.server
        return {
            "peer_id": node.peer_id,
            "addrs": node.p2p.listen_addrs(),
            "uptime_s": round(time.monotonic() - node.started, 1),
            "version": poolai_version(),
            "pid": os.getpid(),
            "data_dir": str(node.data_dir),
            "model": {"id": manifest.model_id.hex(), "name": manifest.name, "blocks": manifest.n_blocks},
            "span": [s.span.start, s.span.end] if s else None,
            "state": s.state if s else "client",
            "connected_peers": len(node.p2p.connected_peers()),
        }

    async def swarm(args: dict) -> dict:
        servers = node.swarm.map.servers(manifest.model_id, states=("online", "joining", "draining"))
        online = [a for a in servers if a.state == "online"]
        replicas = node.swarm.map.coverage(manifest.model_id, manifest.n_blocks)
        throughput = [0.0] * manifest.n_blocks
        for a in online:
            for b in range(a.start, min(a.end, manifest.n_blocks)):
                throughput[b] += a.throughput / 1000
        return {
            "model": short_model_id(manifest.model_id),
            "blocks": manifest.n_blocks,
            "replicas": replicas,
            "throughput": [round(t, 1) for t in throughput],
            "runs": _ranges(replicas),
            "servers": [{"peer": b58encode(a.peer_id), "start": a.start, "end": a.end, "state": a.state,
                         "throughput": a.throughput / 1000, "cache_tokens_left": a.cache_tokens_left,
                         "device": a.device, "expires_in_s": round(a.expires_ms / 1000 - time.time(), 1)}
                        for a in servers],
        }

    async def sessions(args: dict) -> dict:
        s = node.server
        return {
            "span": [s.span.start, s.span.end] if s else None,
            "state": s.state if s else "client",
            "server": asdict(s.statistics()) if s else None,
            "sessions": [asdict(x) for x in s.sessions()] if s else [],
            "client": asdict(node.client.statistics()),
            "balancer": asdict(node.balancer.statistics()) if node.balancer else None,
        }

    return {"status": status, "swarm": swarm, "sessions": sessions}


class ControlServer:
    def __init__(self, node, path: Path) -> None:
        self.node = node
        self.path = path
        self.methods = build_methods(node)
        self._clients = 0
        self._calls = 0
        self._errors = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.path.unlink(missing_ok=True)  # a stale socket of a dead node; the data dir lock is ours
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only the node's user may connect
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(MAX_CLIENTS)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
                self.path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._clients >= MAX_CLIENTS:
            await _send(stream, {"t": "error", "id": None, "code": "busy", "message": f"{MAX_CLIENTS} clients connected"})
            await stream.aclose()
            return
        self._clients += 1
        decoder = FrameDecoder(MAX_REQUEST_FRAME)
        try:
            hello = await _receive(stream, decoder, READ_TIMEOUT_S)
            major = hello.get("v")
            if hello["t"] != "hello" or major != CONTROL_MAJOR:
                await _send(stream, {"t": "error", "id": None, "code": "version",
                                     "message": f"this node speaks control/{CONTROL_MAJOR}; the client sent "
                                                f"{hello['t']!r} for control/{major}"})
                return
            await _send(stream, {"t": "hello", "v": CONTROL_MAJOR, "version": poolai_version()})
            while True:
                msg = await _receive(stream, decoder, READ_TIMEOUT_S)
                call_id = msg.get("id")
                if msg["t"] != "call":
                    raise ControlProtocolError(f"expected 'call', got {msg['t']!r}")
                method = str_field(msg, "method", 64)
                args = field(msg, "args", dict)
                handler = self.methods.get(method)
                self._calls += 1
                if handler is None:
                    await _send(stream, {"t": "error", "id": call_id, "code": "unknown_method",
                                         "message": f"no method {method!r}; known: {', '.join(sorted(self.methods))}"})
                    continue
                try:
                    value = await handler(args)
                except ControlError as e:
                    await _send(stream, {"t": "error", "id": call_id, "code": e.code, "message": str(e)})
                    continue
                await _send(stream, {"t": "result", "id": call_id, "value": value})
        except (trio.ClosedResourceError, trio.BrokenResourceError, EOFError):
            pass
        except (RemoteProtocolError, trio.TooSlowError) as e:
            self._errors += 1
            log.info("control client dropped: %s", e)
            try:
                await _send(stream, {"t": "error", "id": None, "code": "bad_request", "message": str(e)})
            except Exception:
                pass
        finally:
            self._clients -= 1
            await stream.aclose()


class ControlProtocolError(RemoteProtocolError):
    """A control client sent something that is not a call."""


async def _send(stream, msg: dict) -> None:
    await stream.send_all(encode_frame(msg, MAX_ANSWER_FRAME))


async def _receive(stream, decoder: FrameDecoder, timeout: float) -> dict:
    with trio.fail_after(timeout):
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError
            decoder.feed(data)


class ControlClient:
    """The one way front ends talk to a node: `async with ControlClient(data_dir) as c: await c.call(...)`."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / CONTROL_SOCKET
        self._stream: trio.SocketStream | None = None
        self._decoder = FrameDecoder(MAX_ANSWER_FRAME)
        self._next_id = 0
        self.node_version = ""

    async def __aenter__(self) -> "ControlClient":
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                self._stream = await trio.open_unix_socket(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NodeNotRunning(f"no node is running with data dir {self.path.parent} (no {CONTROL_SOCKET})") from None
        except PermissionError:
            raise NodeNotRunning(f"permission denied on {self.path}: the node runs as another user") from None
        await _send(self._stream, {"t": "hello", "v": CONTROL_MAJOR})
        hello = await _receive(self._stream, self._decoder, CONNECT_TIMEOUT_S)
        if hello["t"] == "error":
            raise ControlError(hello.get("code", "error"), hello.get("message", ""))
        self.node_version = hello.get("version", "")
        return self

    async def __aexit__(self, *exc) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def call(self, method: str, timeout: float = 30.0, **args) -> Any:
        assert self._stream is not None
        self._next_id += 1
        await _send(self._stream, {"t": "call", "id": self._next_id, "method": method, "args": args})
        answer = await _receive(self._stream, self._decoder, timeout)
        if answer["t"] == "error":
            raise ControlError(answer.get("code", "error"), answer.get("message", ""))
        return answer["value"]
