"""Round-trip times to the swarm's servers, measured with libp2p ping and kept per peer.

The route planner weighs each hop by its RTT. Every `PING_INTERVAL_S` (jittered) the node pings each
server of the swarm map it is connected to, over libp2p's ping protocol (32 random bytes echoed),
timing it with a monotonic clock (py-libp2p's own ping reports whole milliseconds, which is 0 on a
LAN). Samples are smoothed with an EWMA; session opens add samples too.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from protocol.signing import short_id

log = logging.getLogger("poolai.latency")

PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_BYTES = 32
PING_INTERVAL_S = 10.0  # RTTs drift slowly; one ping per server per 10 s is noise-level traffic
PING_TIMEOUT_S = 5.0
RTT_EWMA = 0.25  # recent samples weigh 1/4


@dataclass(frozen=True)
class LatencyStatistics:
    peers: int
    pings: int
    failures: int


class LatencyTracker:
    def __init__(self) -> None:
        self.rtt: dict[bytes, float] = {}

    def sample(self, peer: bytes, seconds: float) -> None:
        old = self.rtt.get(peer)
        self.rtt[peer] = seconds if old is None else (1 - RTT_EWMA) * old + RTT_EWMA * seconds

    def get(self, peer: bytes) -> float | None:
        return self.rtt.get(peer)


class Pinger:
    def __init__(self, p2p, swarm, tracker: LatencyTracker, model_id: bytes) -> None:
        self.p2p, self.swarm, self.tracker, self.model_id = p2p, swarm, tracker, model_id
        self._pings = self._failures = 0

    async def ping(self, peer: ID) -> float:
        payload = os.urandom(PING_BYTES)
        with trio.fail_after(PING_TIMEOUT_S):
            stream = await self.p2p.new_stream(peer, [PING_PROTOCOL])
            try:
                t0 = time.perf_counter()
                await stream.write(payload)
                got = b""
                while len(got) < PING_BYTES:
                    chunk = await stream.read(PING_BYTES - len(got))
                    if not chunk:
                        raise EOFError("ping stream closed")
                    got += chunk
                rtt = time.perf_counter() - t0
            finally:
                await stream.close()
        if got != payload:
            raise ValueError("ping answered with other bytes")
        return rtt

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        rng = random.Random()
        while True:
            await trio.sleep(PING_INTERVAL_S * rng.uniform(0.8, 1.2))
            connected = set(self.p2p.connected_peers())
            for record in self.swarm.map.servers(self.model_id):
                peer = ID(record.peer_id)
                if peer not in connected or record.peer_id == self.swarm.signer.peer_id:
                    continue
                try:
                    self.tracker.sample(record.peer_id, await self.ping(peer))
                    self._pings += 1
                except Exception as e:
                    self._failures += 1
                    log.debug("ping %s failed: %s", short_id(record.peer_id), e)

    def statistics(self) -> LatencyStatistics:
        return LatencyStatistics(len(self.tracker.rtt), self._pings, self._failures)
