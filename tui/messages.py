"""Every message that crosses widgets in the TUI. Snapshots and log lines come often: each carries the
whole state it announces, so a dropped or coalesced one loses nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message


@dataclass
class Snapshot:
    """One poll of the node: the control API's answers, plus series the app keeps between polls."""

    status: dict
    peers: dict
    swarm: dict
    sessions: dict
    ledger: dict | None
    my_tokens_per_s: list[float] = field(default_factory=list)
    swarm_tokens_per_s: list[float] = field(default_factory=list)


class NodeUpdated(Message):
    """A fresh Snapshot, sent by the app's poller to every pane."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class NodeLost(Message):
    """The node stopped answering (or never did): the app shows how to start one and keeps retrying."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class PeerAction(Message):
    """The operator confirmed an action on a peer ("ban" or "unban")."""

    def __init__(self, action: str, peer: str) -> None:
        super().__init__()
        self.action = action
        self.peer = peer
