"""`NodeClient`: the one interface the TUI uses to talk to a node, and its real, socket-backed kind.

The node is a trio program; the TUI is asyncio (Textual). They share nothing but the control socket's
frames (protocol/codec.py; the conversation is drawn in node/control.py), so the real client here is
plain asyncio Unix sockets. Tests swap it for `tui.testing.FakeNodeClient`.

    NodeClient                      abstract: call(), stream(), close(); helpers built on them
    ├── SocketNodeClient            the node's data_dir/control.sock (asyncio)
    └── tui.testing.FakeNodeClient  fixed data, for snapshot and Pilot tests

Errors: `NodeNotRunning` (no socket, refused, or the connection dropped: the app shows its "no node"
screen and retries), `ControlError` (the node answered an error: shown as a notification).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from node.control import (CONNECT_TIMEOUT_S, CONTROL_MAJOR, CONTROL_SOCKET, MAX_ANSWER_FRAME, ControlError,
                          NodeNotRunning)
from protocol.codec import FrameDecoder, encode_frame
from protocol.errors import ProtocolError

__all__ = ["ControlError", "NodeClient", "NodeNotRunning", "SocketNodeClient"]

CALL_TIMEOUT_S = 30.0  # a plain call answers in milliseconds; 30 s means the node is stuck


class NodeClient:
    """What the TUI may ask of a node. Subclasses implement `call`, `stream` and `close`."""

    description = "a node"

    async def call(self, method: str, **args: Any) -> Any:
        raise NotImplementedError

    def stream(self, method: str, **args: Any) -> AsyncIterator[dict]:
        """Items of a streaming call; the last one is {"result": final value}. Closing it cancels the call."""
        raise NotImplementedError

    async def close(self) -> None:
        pass

    # -- helpers ------------------------------------------------------------------------------------
    async def status(self) -> dict:
        return await self.call("status")

    async def peers(self) -> dict:
        return await self.call("peers")

    async def swarm(self) -> dict:
        return await self.call("swarm")

    async def sessions(self) -> dict:
        return await self.call("sessions")

    async def ledger(self) -> dict | None:
        """The ledger summary, or None when this node keeps no ledger (or its API has no such call)."""
        try:
            return await self.call("ledger")
        except ControlError as e:
            if e.code in ("unknown_method", "not_supported"):
                return None
            raise

    async def ban(self, peer: str, seconds: float | None = None) -> dict:
        return await self.call("ban", peer=peer, **({"seconds": seconds} if seconds else {}))

    async def unban(self, peer: str) -> dict:
        return await self.call("unban", peer=peer)

    async def drain(self) -> dict:
        return await self.call("drain")


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(MAX_ANSWER_FRAME)

    async def send(self, msg: dict) -> None:
        self.writer.write(encode_frame(msg, MAX_ANSWER_FRAME))
        await self.writer.drain()

    async def receive(self) -> dict:
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("the node closed the control connection")
            self.decoder.feed(data)

    def close(self) -> None:
        self.writer.close()


class SocketNodeClient(NodeClient):
    """The node of `data_dir`, over its control socket. One connection for calls, one per stream."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / CONTROL_SOCKET
        self.description = f"the node of {self.data_dir}"
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path),
                                                                                 limit=MAX_ANSWER_FRAME),
                                                    CONNECT_TIMEOUT_S)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NodeNotRunning(f"no node is running with data dir {self.data_dir} (no {CONTROL_SOCKET})") from None
        except PermissionError:
            raise NodeNotRunning(f"permission denied on {self.path}: the node runs as another user") from None
        except (OSError, asyncio.TimeoutError) as e:
            raise NodeNotRunning(f"cannot reach the node of {self.data_dir}: {e}") from None
        conn = _Connection(reader, writer)
        try:
            await conn.send({"t": "hello", "v": CONTROL_MAJOR})
            hello = await asyncio.wait_for(conn.receive(), CONNECT_TIMEOUT_S)
        except (OSError, EOFError, asyncio.TimeoutError, ProtocolError) as e:
            conn.close()
            raise NodeNotRunning(f"the node of {self.data_dir} did not answer: {e}") from None
        if hello["t"] == "error":
            conn.close()
            raise ControlError(hello.get("code", "error"), hello.get("message", ""))
        return conn

    async def call(self, method: str, **args: Any) -> Any:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._open()
            self._next_id += 1
            try:
                await self._conn.send({"t": "call", "id": self._next_id, "method": method, "args": args})
                answer = await asyncio.wait_for(self._conn.receive(), CALL_TIMEOUT_S)
            except (OSError, EOFError, asyncio.TimeoutError, ProtocolError) as e:
                self._conn.close()
                self._conn = None
                raise NodeNotRunning(f"lost the node of {self.data_dir}: {type(e).__name__}: {e}") from None
        if answer["t"] == "error":
            raise ControlError(answer.get("code", "error"), answer.get("message", ""))
        return answer.get("value")

    async def stream(self, method: str, **args: Any) -> AsyncIterator[dict]:
        conn = await self._open()
        try:
            await conn.send({"t": "call", "id": 1, "method": method, "args": args})
            while True:
                try:
                    answer = await conn.receive()
                except (OSError, EOFError, ProtocolError) as e:
                    raise NodeNotRunning(f"lost the node of {self.data_dir}: {e}") from None
                if answer["t"] == "item":
                    yield answer["value"]
                elif answer["t"] == "error":
                    raise ControlError(answer.get("code", "error"), answer.get("message", ""))
                else:
                    yield {"result": answer.get("value")}
                    return
        finally:
            conn.close()  # the node sees the end of stream and stops the call

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
