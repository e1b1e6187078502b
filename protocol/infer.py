"""The inference session protocol, `/poolai/infer/1`, as sans-IO state machines.

One stream carries one session between a client and a span server:

    client                                server
      open {session, model, start, end, max_length, nonce}  ->
                                          <- ready {session, cache_tokens, nonce, started_ms}
                                                                                (or error, then close)
      step {seq, position, hidden, [receipt]}  ->
                                          <- out {seq, hidden, receipt}         (or error, then close)
      ... more steps ...
      close {[receipt]}                   ->  (server frees the session's KV cache)

Receipts (minor version 1, SPEC §5 and §13): every `out` carries the server's signature over the
session's cumulative receipt (`protocol.ledger.Receipt`: tokens and units so far, a running hash of
the step inputs and outputs, both nonces). The client checks it against its own count and hash, and
countersigns the newest one at least every RECEIPT_EVERY_TOKENS tokens (inside the next `step`) and
at the end (inside `close`). Each side records the countersigned receipts in its ledger chain. A
server that signs nothing (no `nonce` in `ready`) is served without receipts.

`position` is the index of the first token of `hidden` in the session, so the server can check that a
step continues its cache exactly; a replay after failover opens a new session and sends the kept
inputs from position 0. Errors carry a short `code` (see ERROR_CODES) and a human message.

The transitions of each side live in one table; anything else is a RemoteProtocolError naming it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import hashlib
from dataclasses import replace

from .codec import bytes_field, field, int_field, str_field
from .errors import LocalProtocolError, MalformedFrame, RemoteProtocolError
from .ledger import (
    IO_COMMITMENT_BYTES,
    MAX_CLOCK_SKEW_MS,
    MAX_RECEIPT_BYTES,
    NONCE_BYTES,
    Receipt,
    ReceiptRejected,
)
from .manifest import MAX_BLOCKS
from .tensors import WireTensor, tensor_from_wire
from .versions import INFER_MINOR

SESSION_ID_BYTES = 16
# The longest session a server accepts, in tokens (prompt + generated). Bounds the KV cache one
# client can claim: 2048 tokens x 30 layers x 2 x 3 heads x 64 x 4 bytes = 90 MiB for the default model.
MAX_SESSION_TOKENS = 2048
MAX_ERROR_CHARS = 512
# The client countersigns the server's newest receipt at least this often (and at close): a server
# that dies mid-session loses at most this many tokens of credit, while a countersignature costs one
# Ed25519 signature and ~400 bytes per 16 tokens, nothing next to a step's compute.
RECEIPT_EVERY_TOKENS = 16

ERROR_CODES = {
    "version": "the peer speaks another major version of the protocol",
    "busy": "the server has no cache left for this session; route around it",
    "draining": "the server is leaving or moving its span; route around it",
    "unknown_model": "the server does not serve this model",
    "span": "the server does not serve this span",
    "too_long": f"max_length is over the server's limit ({MAX_SESSION_TOKENS})",
    "position": "a step does not continue the session's cache",
    "bad_request": "a malformed or unexpected message",
    "timeout": "the session was idle too long and its cache was freed",
    "internal": "the server failed while computing",
    "credit": "the client's settled balance is below the server's free tier: serve blocks to earn credit",
}


class ServerRefused(RemoteProtocolError):
    """Raised on the client when the server answered with an error; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"server refused ({code}): {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class OpenRequest:
    session_id: bytes
    model_id: bytes
    start: int
    end: int
    max_length: int
    nonce: bytes | None = None  # the client's receipt nonce; None: a client that takes no receipts


@dataclass(frozen=True)
class StepRequest:
    seq: int
    position: int
    hidden: WireTensor
    receipt: bytes | None = None  # a receipt the client countersigned, to record


def io_commitment(previous: bytes, step_input: bytes, step_output: bytes) -> bytes:
    """The running hash of a session's traffic: SHA-256(previous || SHA-256(input) || SHA-256(output))."""
    return hashlib.sha256(previous + hashlib.sha256(step_input).digest() + hashlib.sha256(step_output).digest()).digest()


class ReceiptBook:
    """The cumulative receipt of one session as either side computes it (pure: the caller gives times).

    Both sides advance it with the same step bytes, so the client can check every field the server
    signed except `last_ms`, which is the server's clock (checked for order and skew only).
    """

    def __init__(self, session_id: bytes, client: bytes, server: bytes, model_id: bytes, start: int, end: int,
                 client_nonce: bytes, server_nonce: bytes, started_ms: int) -> None:
        self.latest = Receipt(session_id, client, server, model_id, start, end, 0, 0, 0, bytes(IO_COMMITMENT_BYTES),
                              client_nonce, server_nonce, started_ms, started_ms)

    def advance(self, n_tokens: int, step_input: bytes, step_output: bytes, now_ms: int) -> Receipt:
        """The unsigned receipt after one more step of `n_tokens` tokens."""
        r = self.latest
        tokens = r.tokens + n_tokens
        self.latest = replace(
            r, seq=r.seq + 1, tokens=tokens, units=tokens * (r.span_end - r.span_start),
            io_commitment=io_commitment(r.io_commitment, step_input, step_output),
            last_ms=max(now_ms, r.last_ms), server_sig=b"", client_sig=b"",
        )
        return self.latest

    def check_server_receipt(self, raw: bytes, n_tokens: int, step_input: bytes, step_output: bytes,
                             now_ms: int) -> Receipt:
        """Client side: advance by the step just done and check the server's receipt for it.

        ReceiptRejected naming the problem: a field that differs from our own count or hash, a bad
        server signature, a time that goes back or runs ahead of our clock.
        """
        previous = self.latest
        received = Receipt.decode(raw)
        expected = self.advance(n_tokens, step_input, step_output, received.last_ms)
        if received.last_ms < previous.last_ms:
            raise ReceiptRejected("decreasing_counters", "last_ms went back")
        if received.last_ms > now_ms + MAX_CLOCK_SKEW_MS:
            raise ReceiptRejected("future_time", f"last_ms {received.last_ms} is ahead of our clock")
        if replace(received, server_sig=b"", client_sig=b"") != expected:
            differ = [n for n in ("seq", "tokens", "units", "io_commitment", "session_id", "client", "server",
                                  "model_id", "span_start", "span_end", "client_nonce", "server_nonce", "started_ms")
                      if getattr(received, n) != getattr(expected, n)]
            raise ReceiptRejected("malformed", f"the server's receipt differs from ours in {', '.join(differ)}")
        received.verify(countersigned=False)
        self.latest = received
        return received


def _optional_receipt(msg: dict[str, Any]) -> bytes | None:
    if "receipt" not in msg:
        return None
    return bytes_field(msg, "receipt", max_length=MAX_RECEIPT_BYTES)


def error_frame(code: str, message: str) -> dict[str, Any]:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown error code {code!r}")
    return {"t": "error", "code": code, "message": message[:MAX_ERROR_CHARS]}


class State(enum.Enum):
    AWAIT_OPEN = "await_open"
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


def _check_hidden(hidden: WireTensor, hidden_size: int, what: str) -> int:
    if len(hidden.shape) != 3 or hidden.shape[0] != 1 or hidden.shape[2] != hidden_size or hidden.shape[1] < 1:
        raise MalformedFrame(f"{what} must have shape [1, T>=1, {hidden_size}], not {list(hidden.shape)}")
    return hidden.shape[1]


class ServerSession:
    """Server side of one session. Feed it decoded messages; it returns what the node must do."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.state = State.AWAIT_OPEN
        self.open: OpenRequest | None = None
        self.tokens = 0  # tokens whose keys/values the server holds
        self.next_seq = 0
        self.steps = 0
        self.final_receipt: bytes | None = None  # the countersigned receipt sent with `close`

    def receive(self, msg: dict[str, Any]) -> OpenRequest | StepRequest | None:
        """Returns an OpenRequest or StepRequest to act on, or None when the client closed."""
        handler = _SERVER_TABLE.get((self.state, msg["t"]))
        if handler is None:
            raise MalformedFrame(f"unexpected message {msg['t']!r} in state {self.state.value}")
        return handler(self, msg)

    def _on_open(self, msg: dict[str, Any]) -> OpenRequest:
        v = field(msg, "v", int)
        del v  # minor versions only add fields; nothing to check yet
        req = OpenRequest(
            session_id=bytes_field(msg, "session", SESSION_ID_BYTES),
            model_id=bytes_field(msg, "model", 32),
            start=int_field(msg, "start", 0, MAX_BLOCKS - 1),
            end=int_field(msg, "end", 1, MAX_BLOCKS),
            max_length=int_field(msg, "max_length", 1, 1 << 31),
            nonce=bytes_field(msg, "nonce", NONCE_BYTES) if "nonce" in msg else None,
        )
        if req.start >= req.end:
            raise MalformedFrame(f"empty span [{req.start}, {req.end})")
        self.open = req
        self.state = State.OPENING
        return req

    def accept(self, cache_tokens: int, nonce: bytes | None = None, started_ms: int = 0) -> dict[str, Any]:
        """The `ready` answer; with `nonce` (the server's) the session carries receipts."""
        if self.state is not State.OPENING or self.open is None:
            raise LocalProtocolError("accept() without a pending open")
        self.state = State.OPEN
        frame = {"t": "ready", "session": self.open.session_id, "cache_tokens": cache_tokens}
        if nonce is not None:
            frame.update(nonce=nonce, started_ms=started_ms)
        return frame

    def refuse(self, code: str, message: str) -> dict[str, Any]:
        self.state = State.CLOSED
        return error_frame(code, message)

    def _on_step(self, msg: dict[str, Any]) -> StepRequest:
        assert self.open is not None
        seq = int_field(msg, "seq", 0, 1 << 40)
        if seq != self.next_seq:
            raise MalformedFrame(f"step seq {seq}, expected {self.next_seq}")
        position = int_field(msg, "position", 0, MAX_SESSION_TOKENS)
        hidden = tensor_from_wire(field(msg, "hidden", dict), "step hidden")
        n = _check_hidden(hidden, self.hidden_size, "step hidden")
        if position != self.tokens:
            raise PositionError(f"step at position {position}, the session's cache holds {self.tokens} tokens")
        if position + n > self.open.max_length:
            raise PositionError(f"step would reach {position + n} tokens, over max_length {self.open.max_length}")
        self.next_seq += 1
        return StepRequest(seq, position, hidden, _optional_receipt(msg))

    def respond(self, step: StepRequest, hidden: WireTensor, receipt: bytes | None = None) -> dict[str, Any]:
        if self.state is not State.OPEN:
            raise LocalProtocolError("respond() outside an open session")
        _check_hidden(hidden, self.hidden_size, "output hidden")
        self.tokens = step.position + step.hidden.shape[1]
        self.steps += 1
        frame = {"t": "out", "seq": step.seq, "hidden": hidden.to_wire()}
        if receipt is not None:
            frame["receipt"] = receipt
        return frame

    def _on_close(self, msg: dict[str, Any]) -> None:
        self.final_receipt = _optional_receipt(msg)
        self.state = State.CLOSED
        return None


class PositionError(MalformedFrame):
    """A step that does not continue the session's cache (answered with code 'position')."""


_SERVER_TABLE = {
    (State.AWAIT_OPEN, "open"): ServerSession._on_open,
    (State.OPEN, "step"): ServerSession._on_step,
    (State.OPEN, "close"): ServerSession._on_close,
    (State.OPENING, "close"): ServerSession._on_close,
    (State.AWAIT_OPEN, "close"): ServerSession._on_close,
}


class ClientSession:
    """Client side of one session with one span server."""

    def __init__(self, session_id: bytes, model_id: bytes, start: int, end: int, max_length: int,
                 hidden_size: int, nonce: bytes | None = None) -> None:
        if len(session_id) != SESSION_ID_BYTES:
            raise LocalProtocolError("session id must be 16 bytes")
        if not 0 < max_length <= MAX_SESSION_TOKENS:
            raise LocalProtocolError(f"max_length must be in 1..{MAX_SESSION_TOKENS}")
        self.session_id, self.model_id = session_id, model_id
        self.start, self.end, self.max_length = start, end, max_length
        self.hidden_size = hidden_size
        self.state = State.AWAIT_OPEN
        self.cache_tokens = 0
        self.tokens = 0
        self._seq = 0
        self._pending: tuple[int, int] | None = None  # (seq, n tokens) awaiting its output
        self.nonce = nonce  # our receipt nonce; None: we take no receipts
        self.last_receipt: bytes | None = None  # the server's receipt in the last `out`
        self.server_nonce: bytes | None = None
        self.started_ms = 0

    def open_frame(self) -> dict[str, Any]:
        if self.state is not State.AWAIT_OPEN:
            raise LocalProtocolError("session already opened")
        self.state = State.OPENING
        frame = {"t": "open", "v": INFER_MINOR, "session": self.session_id, "model": self.model_id,
                 "start": self.start, "end": self.end, "max_length": self.max_length}
        if self.nonce is not None:
            frame["nonce"] = self.nonce
        return frame

    def on_ready(self, msg: dict[str, Any]) -> None:
        self._raise_if_error(msg)
        if self.state is not State.OPENING or msg["t"] != "ready":
            raise MalformedFrame(f"expected 'ready', got {msg['t']!r}")
        if bytes_field(msg, "session", SESSION_ID_BYTES) != self.session_id:
            raise MalformedFrame("ready names another session")
        self.cache_tokens = int_field(msg, "cache_tokens", 0, 1 << 40)
        if "nonce" in msg:
            self.server_nonce = bytes_field(msg, "nonce", NONCE_BYTES)
            self.started_ms = int_field(msg, "started_ms", 0, 2**63 - 1)
        self.state = State.OPEN

    def step_frame(self, hidden: WireTensor, receipt: bytes | None = None) -> dict[str, Any]:
        if self.state is not State.OPEN or self._pending is not None:
            raise LocalProtocolError("step_frame() needs an open session with no step in flight")
        n = _check_hidden(hidden, self.hidden_size, "step input")
        if self.tokens + n > self.max_length:
            raise LocalProtocolError(f"session would exceed max_length {self.max_length}")
        self._pending = (self._seq, n)
        frame = {"t": "step", "seq": self._seq, "position": self.tokens, "hidden": hidden.to_wire()}
        if receipt is not None:
            frame["receipt"] = receipt
        self._seq += 1
        return frame

    def on_output(self, msg: dict[str, Any]) -> WireTensor:
        """The output hidden states of the step in flight (its receipt, if any: `last_receipt`)."""
        self._raise_if_error(msg)
        if msg["t"] != "out" or self._pending is None:
            raise MalformedFrame(f"expected 'out', got {msg['t']!r}")
        seq, n = self._pending
        if int_field(msg, "seq", 0, 1 << 40) != seq:
            raise MalformedFrame(f"output for another step (expected seq {seq})")
        hidden = tensor_from_wire(field(msg, "hidden", dict), "output hidden")
        if _check_hidden(hidden, self.hidden_size, "output hidden") != n:
            raise MalformedFrame(f"output has {hidden.shape[1]} tokens, the step sent {n}")
        self.last_receipt = _optional_receipt(msg)
        self._pending = None
        self.tokens += n
        return hidden

    def close_frame(self, receipt: bytes | None = None) -> dict[str, Any]:
        self.state = State.CLOSED
        return {"t": "close", "receipt": receipt} if receipt is not None else {"t": "close"}

    def _raise_if_error(self, msg: dict[str, Any]) -> None:
        if msg["t"] == "error":
            self.state = State.CLOSED
            code = str_field(msg, "code", 32)
            raise ServerRefused(code if code in ERROR_CODES else "bad_request",
                                str_field(msg, "message", MAX_ERROR_CHARS))
