"""Protocol IDs and their versions.

Every stream protocol is named `/poolai/<name>/<major>`. A major version changes when a peer of the
old version could misread the new messages; minor versions only add optional fields and travel inside
the messages. A node registers a refusal on the majors next to its own, so that a peer speaking
another major gets an error that names both versions instead of a bare negotiation failure.
"""

from __future__ import annotations

from .errors import MalformedFrame

PREFIX = "/poolai/"

INFER = "infer"
INFER_MAJOR = 1
INFER_MINOR = 1  # 1: receipts (nonce in open/ready, receipt in out/step/close)

# The small-world overlay service (protocol/ring.py, node/overlay.py).
RING = "ring"
RING_MAJOR = 1

# How many majors around our own a node answers with a clear refusal. Four below and four above covers
# every version a swarm could plausibly mix during a rolling upgrade; farther ones get multistream's "na".
REFUSED_MAJORS_AROUND = 4

ANNOUNCE_TOPIC = "/poolai/announce/1"
# Direct exchange of span records with a peer just met (SPEC 4.3).
SWARM = "swarm"
SWARM_MAJOR = 1


def protocol_id(name: str, major: int) -> str:
    return f"{PREFIX}{name}/{major}"


def parse_protocol_id(pid: str) -> tuple[str, int]:
    """('infer', 1) for '/poolai/infer/1'; MalformedFrame for anything else."""
    if not pid.startswith(PREFIX):
        raise MalformedFrame(f"not a poolai protocol ID: {pid!r}")
    name, _, major = pid[len(PREFIX) :].rpartition("/")
    if not name or not major.isdigit():
        raise MalformedFrame(f"protocol ID without a major version: {pid!r}")
    return name, int(major)


def neighbour_majors(major: int) -> list[int]:
    """The other majors a node answers with a version refusal."""
    return [m for m in range(max(0, major - REFUSED_MAJORS_AROUND), major + REFUSED_MAJORS_AROUND + 1) if m != major]

# Credits (SPEC §13): anti-entropy between two peers, chain heads and fraud proofs by gossip.
LEDGER_SYNC = "ledger-sync"
LEDGER_SYNC_MAJOR = 1
LEDGER_HEADS_TOPIC = "/poolai/ledger-heads/1"
LEDGER_FRAUD_TOPIC = "/poolai/ledger-fraud/1"

# Every stream protocol a node serves, by name: its major. Front ends compare a peer's list with it.
OUR_MAJORS = {INFER: INFER_MAJOR, RING: RING_MAJOR, LEDGER_SYNC: LEDGER_SYNC_MAJOR, SWARM: SWARM_MAJOR}
