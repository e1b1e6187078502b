"""The libp2p host, built the one way this project trusts (see shared/LIBP2P-NOTES.md).

TCP only, Noise only (a default host would also accept plaintext peers), Yamux only, one connection
per peer (the default of three adds a 250 ms delay to every dial). Pubsub and gossipsub run before the
host listens or dials, since a connection that arrives before pubsub runs crashes the host. Every
dial, stream open and read is bounded by our own timeouts: the library's are 30 s x 4 attempts.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from protocol.signing import short_id

from .errors import StartupError, describe

log = logging.getLogger("poolai.p2p")

GOSSIPSUB_ID = TProtocol("/meshsub/1.0.0")
# A dial on loopback takes 5-7 ms; over the internet a few hundred. 5 s says "unreachable" long before
# the library's own 120 s worst case.
DIAL_TIMEOUT_S = 5.0
# Opening a stream is one multistream round trip on an open connection.
STREAM_OPEN_TIMEOUT_S = 5.0
# An identify push is one stream per peer, in parallel: a stream open and a small write.
IDENTIFY_PUSH_TIMEOUT_S = 5.0
# Time for in-flight pubsub messages to drain before the host closes (trap 8 in LIBP2P-NOTES).
SHUTDOWN_SETTLE_S = 0.2
# Gossipsub heartbeat: 1 s makes a fresh node join the mesh within a second or two, cheap at our sizes.
HEARTBEAT_S = 1.0


@dataclass
class P2P:
    host: object
    pubsub: Pubsub
    gossipsub: GossipSub
    started: float

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    def listen_addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    async def connect(self, addr: str | multiaddr.Multiaddr, timeout: float = DIAL_TIMEOUT_S) -> ID:
        """Dial a /p2p/ multiaddr; raises trio.TooSlowError or OSError-like errors on failure."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(str(addr)))
        return await self.connect_info(info, timeout)

    async def connect_info(self, info: PeerInfo, timeout: float = DIAL_TIMEOUT_S) -> ID:
        network = self.host.get_network()
        # A failed dial puts the peer in a 60 s negative cache; a peer we are told to dial again may
        # have restarted, so clear it first (trap 5).
        try:
            network.unblock_peer(info.peer_id)
        except Exception:
            pass
        with trio.fail_after(timeout):
            await self.host.connect(info)
        return info.peer_id

    async def new_stream(self, peer_id: ID, protocols: list[str], timeout: float = STREAM_OPEN_TIMEOUT_S):
        with trio.fail_after(timeout):
            return await self.host.new_stream(peer_id, [TProtocol(p) for p in protocols])

    def handle(self, protocol: str, handler) -> None:
        """Register a stream handler that never lets an exception reach py-libp2p.

        py-libp2p 0.8.1 stops accepting streams on a connection whose handler raised, while the
        connection stays up: every later stream from that peer times out (measured: a peer that reset
        a /poolai/swarm/1 request before the answer was written cut itself off). So whatever a
        handler did not handle is logged as the peer's doing and the stream is reset."""

        async def guarded(stream) -> None:
            try:
                await handler(stream)
            except Exception as e:
                try:
                    peer = short_id(stream.muxed_conn.peer_id.to_bytes())
                except Exception:
                    peer = "?"
                log.info("%s stream from %s ended: %s", protocol, peer, describe(e))
                try:
                    await stream.reset()
                except Exception:
                    pass

        self.host.set_stream_handler(TProtocol(protocol), guarded)

    async def push_identify(self, timeout: float = IDENTIFY_PUSH_TIMEOUT_S) -> None:
        """Tell connected peers our protocols again, after registering handlers.

        Identify runs when a connection opens; a node dials its bootstrap peers before its span server
        and overlay register their handlers, so those peers would list it without them. Best effort:
        a peer that misses the push learns them on its next connection."""
        from libp2p.identity.identify_push.identify_push import push_identify_to_peers

        with trio.move_on_after(timeout):
            try:
                await push_identify_to_peers(self.host)
            except Exception as e:
                log.debug("identify push failed: %s", e)

    def connected_peers(self) -> list[ID]:
        return list(self.host.get_network().get_connections_map().keys())

    def peer_protocols(self, peer_id: ID) -> list[str]:
        try:
            return list(self.host.get_peerstore().get_protocols(peer_id))
        except Exception:
            return []


def _check_port_free(addr: multiaddr.Multiaddr) -> None:
    """StartupError naming the address when its TCP port is taken (py-libp2p only logs it)."""
    protocols = {p.name for p in addr.protocols()}
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    family, host = ((socket.AF_INET6, addr.value_for_protocol("ip6")) if "ip6" in protocols
                    else (socket.AF_INET, addr.value_for_protocol("ip4") if "ip4" in protocols else "0.0.0.0"))
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listener does
        probe.bind((host, port))
    except OSError as e:
        raise StartupError(f"cannot listen on {addr}: {e.strerror} (is another node running there?)") from None
    finally:
        probe.close()


def build_host(key_pair: KeyPair):
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


@asynccontextmanager
async def open_p2p(key_pair: KeyPair, listen: list[str]) -> AsyncIterator[P2P]:
    """Run a host with pubsub; on exit unsubscribe, let messages settle, and close the host."""
    host = build_host(key_pair)
    gossipsub = GossipSub(
        protocols=[GOSSIPSUB_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=HEARTBEAT_S,
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    addrs = [multiaddr.Multiaddr(a) for a in listen]
    async with background_trio_service(pubsub), background_trio_service(gossipsub):
        await pubsub.wait_until_ready()
        for addr in addrs:
            _check_port_free(addr)
        run = host.run(addrs)
        await run.__aenter__()
        if not host.get_addrs():  # py-libp2p logs a failed listen and carries on; we do not
            with trio.CancelScope(shield=True):
                await host.close()
                await run.__aexit__(None, None, None)
            raise StartupError(f"cannot listen on {', '.join(listen)}")
        p2p = P2P(host, pubsub, gossipsub, time.monotonic())
        log.info("peer %s listening on %s", short_id(host.get_id().to_bytes()), ", ".join(p2p.listen_addrs()))
        try:
            yield p2p
        finally:
            with trio.CancelScope(shield=True):
                for topic in list(pubsub.topic_ids):
                    try:
                        await pubsub.unsubscribe(topic)
                    except Exception:
                        pass
                await trio.sleep(SHUTDOWN_SETTLE_S)
                try:
                    await host.close()
                except Exception as e:
                    log.debug("host close: %r", e)
                try:
                    await run.__aexit__(None, None, None)
                except Exception as e:
                    log.debug("host run exit: %r", e)
