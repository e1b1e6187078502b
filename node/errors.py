"""Errors of the node, named by who is at fault.

    NodeError
    ├── ConfigError        the operator's config file or command line is wrong (exit 2, one line)
    ├── StartupError       the machine or the swarm prevents a start: port in use, bootstrap peers
    │                      unreachable, model not installed, data dir owned by another node (exit 2)
    └── GenerationError    a generation could not finish: no route, servers failed (exit 1)

Errors a peer causes are protocol.errors.RemoteProtocolError: the node drops or resets what that peer
sent, logs one line and keeps serving others; they never reach the command line.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of the node's own errors. str(error) is a complete one-line explanation."""


class ConfigError(NodeError):
    """Raised when a config file or a command-line value is missing, malformed or unknown.

    The operator should fix the named file, key or flag; the node did not start.
    """


class StartupError(NodeError):
    """Raised when the node cannot start for a reason outside the config's syntax.

    The message says what was unavailable (a port, the bootstrap peers, the model files).
    """


class GenerationError(NodeError):
    """Raised when a generation fails: no route covers the model, or every route failed.

    The message names the blocks or peers at fault; the node itself keeps running.
    """


def describe(e: BaseException) -> str:
    """An exception in one line for a log or an answer: "Type: message", or the type alone when the
    message is empty (trio.TooSlowError, libp2p's StreamReset and EOFError often carry none)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
