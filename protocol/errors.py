"""Errors raised by the pure protocol layer.

    ProtocolError
    ├── LocalProtocolError    we misused the protocol (a bug on our side, or a caller's mistake)
    └── RemoteProtocolError   a peer sent something wrong: drop it, penalise it, keep running
        ├── FrameTooLarge     a frame's declared length is over the limit for its protocol
        ├── MalformedFrame    bytes that do not decode, or a message of the wrong shape
        ├── BadSignature      a signature that does not verify against the claimed author
        └── VersionMismatch   the peer speaks another major version of a protocol

Every error carries a message that names what was wrong, so that a log line or a refusal sent back
to the peer is enough to understand it.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by `protocol`."""


class LocalProtocolError(ProtocolError):
    """Raised when our own side breaks the protocol: a caller passed an invalid value.

    The caller should fix its code; nothing was sent.
    """


class RemoteProtocolError(ProtocolError):
    """Raised when a peer sent bytes or a message that break the protocol.

    The caller should reset the stream (or drop the message), log one line naming the peer, and go on
    serving others.
    """


class FrameTooLarge(RemoteProtocolError):
    """Raised when a frame header announces more bytes than the protocol's limit allows."""


class MalformedFrame(RemoteProtocolError):
    """Raised when a frame does not decode, or decodes to a message of the wrong type or shape."""


class BadSignature(RemoteProtocolError):
    """Raised when a signed record's signature does not verify against its claimed author."""


class VersionMismatch(RemoteProtocolError):
    """Raised when a peer speaks another major version of one of our protocols.

    The message names both versions.
    """

    def __init__(self, ours: str, theirs: str) -> None:
        super().__init__(f"version mismatch: this node speaks {ours}, the peer speaks {theirs}")
        self.ours = ours
        self.theirs = theirs
