"""Framing and the msgpack codec for every poolai stream.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. The body of a frame is a
map whose key "t" names the message type. Decoding is strict: only the msgpack types a message
declares are accepted, strings must be UTF-8, and every length is bounded before any allocation.

`FrameDecoder` is sans-IO: feed it bytes as they arrive and take out complete messages; it never
reads a socket. A frame whose header announces more than the limit is refused at the header, so a
peer cannot make us buffer a large body.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import FrameTooLarge, LocalProtocolError, MalformedFrame

HEADER = struct.Struct(">I")

# The largest control message (open, error, announcement) is well under 4 KiB; 64 KiB leaves room for
# long address lists without letting a peer make us hold much.
MAX_CONTROL_FRAME = 64 * 1024

# A step carries one hidden-state tensor: max_new_tokens x hidden x 4 bytes at prefill. A prompt of
# MAX_SESSION_TOKENS (2048) tokens of a hidden size up to 8192 in fp32 is 64 MiB; hidden states of the
# embedded model (576) at 2048 tokens are 4.5 MiB. 72 MiB bounds the worst legal step with headroom.
MAX_TENSOR_FRAME = 72 * 1024 * 1024


def encode_frame(message: dict[str, Any], limit: int = MAX_CONTROL_FRAME) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > limit:
        raise LocalProtocolError(f"refusing to send a {len(body)}-byte frame over the {limit}-byte limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body into a message map; MalformedFrame when it is not one."""
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            # Nothing we speak has deep nesting; bounding depth and counts keeps a hostile body cheap.
            max_str_len=len(body),
            max_bin_len=len(body),
            max_array_len=min(len(body), 1 << 16),
            max_map_len=min(len(body), 1 << 10),
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise MalformedFrame(f"frame is not valid msgpack: {e}") from None
    except Exception as e:  # msgpack raises a few other internal types on hostile input
        raise MalformedFrame(f"frame is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(value, dict) or not isinstance(value.get("t"), str):
        raise MalformedFrame("frame is not a message map with a string field 't'")
    return value


class FrameDecoder:
    """Turns a byte stream into messages; refuses a frame over `limit` at its header."""

    def __init__(self, limit: int = MAX_CONTROL_FRAME) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._need: int | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def wanted(self) -> int:
        """How many more bytes complete the frame in progress (at least 1)."""
        if self._need is None:
            return max(1, HEADER.size - len(self._buffer))
        return max(1, self._need - len(self._buffer))

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or None when more bytes are needed."""
        if self._need is None:
            if len(self._buffer) < HEADER.size:
                return None
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.limit:
                raise FrameTooLarge(f"frame of {length} bytes is over the {self.limit}-byte limit")
            del self._buffer[: HEADER.size]
            self._need = length
        if len(self._buffer) < self._need:
            return None
        body = bytes(self._buffer[: self._need])
        del self._buffer[: self._need]
        self._need = None
        return decode_body(body)

    @property
    def mid_frame(self) -> bool:
        """True when bytes of an unfinished frame are buffered: an EOF now means a truncated frame."""
        return self._need is not None or len(self._buffer) > 0


# -- typed field access ----------------------------------------------------------------------------


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """message[name] checked against `kind`; MalformedFrame naming the field otherwise."""
    if name not in message:
        raise MalformedFrame(f"message {message.get('t')!r} lacks field {name!r}")
    value = message[name]
    # bool is an int in Python; never accept one where an int is asked for.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MalformedFrame(f"field {name!r} of {message.get('t')!r} must be {_kind_name(kind)}, not bool")
    if not isinstance(value, kind):
        raise MalformedFrame(
            f"field {name!r} of {message.get('t')!r} must be {_kind_name(kind)}, not {type(value).__name__}"
        )
    return value


def int_field(message: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = field(message, name, int)
    if not lo <= value <= hi:
        raise MalformedFrame(f"field {name!r} of {message.get('t')!r} is {value}, outside [{lo}, {hi}]")
    return value


def bytes_field(message: dict[str, Any], name: str, length: int | None = None, max_length: int | None = None) -> bytes:
    value = field(message, name, bytes)
    if length is not None and len(value) != length:
        raise MalformedFrame(f"field {name!r} of {message.get('t')!r} must be {length} bytes, not {len(value)}")
    if max_length is not None and len(value) > max_length:
        raise MalformedFrame(f"field {name!r} of {message.get('t')!r} is over {max_length} bytes")
    return value


def str_field(message: dict[str, Any], name: str, max_length: int) -> str:
    value = field(message, name, str)
    if len(value) > max_length:
        raise MalformedFrame(f"field {name!r} of {message.get('t')!r} is over {max_length} characters")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
