"""Frames over libp2p streams: the trio pump around protocol.codec.

A killed peer looks like a clean end of stream to a reader (trap 4 in LIBP2P-NOTES); only our length
framing tells a truncated frame from a complete one, so EOF in the middle of a frame is an error of
its own.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamError
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError

from protocol.codec import MAX_CONTROL_FRAME, FrameDecoder, encode_frame
from protocol.errors import RemoteProtocolError

# Read in chunks of 256 KiB: large tensors arrive in a few reads, small frames in one.
READ_CHUNK = 256 * 1024


class StreamClosed(RemoteProtocolError):
    """The peer closed the stream (or it was reset) between frames."""


class TruncatedFrame(RemoteProtocolError):
    """The stream ended inside a frame: the peer died or cut the message short."""


class FramedStream:
    def __init__(self, stream: Any, limit: int = MAX_CONTROL_FRAME) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(limit)
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def remote_peer(self):
        return self.stream.muxed_conn.peer_id

    async def send(self, message: dict[str, Any], limit: int | None = None) -> None:
        """Write one frame; StreamClosed when the peer reset or closed the stream (its doing, not a bug)."""
        data = encode_frame(message, limit or self.decoder.limit)
        self.bytes_out += len(data)
        try:
            await self.stream.write(data)
        except (StreamError, MuxedStreamError, MuxedConnError, trio.BrokenResourceError, OSError) as e:
            raise StreamClosed(f"stream closed while writing ({type(e).__name__})") from None

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; StreamClosed, TruncatedFrame, FrameTooLarge, MalformedFrame or TooSlowError."""
        with trio.fail_after(timeout) if timeout is not None else _nullcontext():
            while True:
                msg = self.decoder.next_message()
                if msg is not None:
                    return msg
                try:
                    data = await self.stream.read(max(self.decoder.wanted(), READ_CHUNK))
                except trio.Cancelled:
                    raise
                except Exception as e:  # StreamEOF, StreamReset, MuxedStreamEOF...
                    data = b""
                    reason = type(e).__name__
                else:
                    reason = "end of stream"
                if not data:
                    if self.decoder.mid_frame:
                        raise TruncatedFrame(f"stream ended inside a frame ({reason})")
                    raise StreamClosed(f"stream closed ({reason})")
                self.bytes_in += len(data)
                self.decoder.feed(data)

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:
            pass


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
