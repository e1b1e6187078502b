"""The control API against a real node on 127.0.0.1: bad frames, unknown calls, several clients, the
socket's permissions, actions and streaming calls, and the Prometheus endpoint."""

import logging
import os
import stat
import tempfile
import urllib.request
from pathlib import Path

import pytest
import trio

from node.control import (CONTROL_SOCKET, MAX_REQUEST_FRAME, ControlClient, ControlError, NodeNotRunning,
                          _receive, _send)
from node.testing import node_config, start_node, start_swarm
from protocol.codec import HEADER, FrameDecoder, encode_frame



async def raw_exchange(data_dir: Path, payload: bytes, *, hello: bool = True) -> list[dict]:
    """Send `payload` (after a hello) on a fresh connection; every frame the node answers until it closes."""
    stream = await trio.open_unix_socket(str(data_dir / CONTROL_SOCKET))
    decoder = FrameDecoder(8 * 1024 * 1024)
    got = []
    with trio.fail_after(20):
        if hello:
            await _send(stream, {"t": "hello", "v": 1})
            got.append(await _receive(stream, decoder, 10))
        await stream.send_all(payload)
        while True:
            try:
                got.append(await _receive(stream, decoder, 10))
            except EOFError:
                break
    await stream.aclose()
    return got


def traversable_dir() -> Path:
    """A data dir other users can reach, so that only the socket's own mode keeps them out."""
    d = Path(tempfile.mkdtemp(prefix="poolai-control-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


async def test_bad_clients_get_clear_errors_and_the_node_keeps_running(model_cache):
    data_dir = traversable_dir() / "n"
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, node_config(model_cache, span=(0, 2)), data_dir)
        sock = data_dir / CONTROL_SOCKET
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

        # Not msgpack at all: bad_request naming it, connection closed.
        garbage = b"\xc1\xc1\xc1\xc1"
        answers = await raw_exchange(data_dir, HEADER.pack(len(garbage)) + garbage)
        assert answers[-1]["t"] == "error" and answers[-1]["code"] == "bad_request"
        assert "msgpack" in answers[-1]["message"]

        # A header announcing a frame over the request limit is refused before its body arrives.
        answers = await raw_exchange(data_dir, HEADER.pack(MAX_REQUEST_FRAME + 1))
        assert answers[-1]["code"] == "bad_request" and str(MAX_REQUEST_FRAME) in answers[-1]["message"]

        # A call without an id, and a wrong major version.
        answers = await raw_exchange(data_dir, encode_frame({"t": "call", "method": "status", "args": {}}))
        assert answers[-1]["code"] == "bad_request" and "id" in answers[-1]["message"]
        answers = await raw_exchange(data_dir, encode_frame({"t": "hello", "v": 99}), hello=False)
        assert answers[-1]["code"] == "version" and "control/1" in answers[-1]["message"]

        async with ControlClient(data_dir) as a, ControlClient(data_dir) as b:
            # An unknown call: an error naming the known ones, and the connection stays usable.
            with pytest.raises(ControlError) as e:
                await a.call("no_such_method")
            assert e.value.code == "unknown_method" and "status" in str(e.value)
            with pytest.raises(ControlError) as e:
                await a.call("ban", peer="not-base58-0OIl")
            assert e.value.code == "bad_args" and "peer" in str(e.value)
            for junk in ("abc", "1", "z" * 30_000):  # base58, but no peer ID
                with pytest.raises(ControlError) as e:
                    await a.call("ban", peer=junk)
                assert e.value.code == "bad_args" and "not an Ed25519 peer ID" in str(e.value)
            with pytest.raises(ControlError) as e:
                await a.call("generate", prompt="hi", temperature=float("nan"))
            assert e.value.code == "bad_args" and "temperature" in str(e.value)
            with pytest.raises(ControlError) as e:
                await a.call("log_tail", lines="many")
            assert e.value.code == "bad_args"
            # A second client, with both connections open, answers too.
            sa, sb = await a.call("status"), await b.call("status")
            assert sa["peer_id"] == sb["peer_id"] == node.peer_id
            assert sa["span"] == [0, 2] and sa["state"] == "online"
            assert sa["addrs"] == node.p2p.listen_addrs()
            assert sa["device"]["kind"] in ("cpu", "cuda") and sa["memory"]["rss_bytes"] > 100 * 2**20
            assert sa["overlay_size_estimate"] is None or sa["overlay_size_estimate"] > 0
            peers = await b.call("peers")
            assert peers["peers"] == [] and peers["banned"] == []

        # A client running as another user is refused by the socket's mode (the data dir is open to all).
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1]); print('connected')\n"
                 "except PermissionError:\n    print('refused')\n")
        if os.geteuid() == 0:
            as_us = await trio.run_process(["/usr/bin/python3", "-c", probe, str(sock)], capture_stdout=True)
            assert as_us.stdout.strip() == b"connected"
            as_nobody = await trio.run_process(["/usr/bin/python3", "-c", probe, str(sock)], user=65534,
                                               group=65534, extra_groups=[], capture_stdout=True, cwd="/tmp")
            assert as_nobody.stdout.strip() == b"refused"
        os.chmod(sock, 0o000 if os.geteuid() else 0o600)  # without a second user: take our own right away
        if os.geteuid():
            try:
                with pytest.raises(NodeNotRunning, match="permission denied"):
                    async with ControlClient(data_dir):
                        pass
            finally:
                os.chmod(sock, 0o600)

        # After all of that, the node still answers.
        async with ControlClient(data_dir) as c:
            assert (await c.call("status"))["peer_id"] == node.peer_id
            assert (await c.call("sessions"))["server"]["protocol_errors"] == 0
        nursery.cancel_scope.cancel()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


async def test_actions_streams_and_metrics(tmp_path, model_cache):
    logging.getLogger("poolai").setLevel(logging.INFO)  # the log ring sees what a node's logger passes
    config = node_config(model_cache, span=(0, 30), metrics_enabled=True, metrics_port=0)
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, config, tmp_path / "n")
        other = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"  # a valid peer ID, not connected
        async with ControlClient(tmp_path / "n") as c, ControlClient(tmp_path / "n") as events_conn:
            seen_events: list[dict] = []

            follow_scope, followed = trio.CancelScope(), trio.Event()

            async def follow_events() -> None:
                with follow_scope:
                    try:
                        await events_conn.stream("events", seen_events.append, since=0)
                    except trio.ClosedResourceError:
                        pass  # the test failed and is on its way out: let its own error show
                followed.set()

            nursery.start_soon(follow_events)

            # Ban and unban: the client's ban list routes around the peer.
            await c.call("ban", peer=other, seconds=120)
            peers = await c.call("peers")
            assert [b["peer"] for b in peers["banned"]] == [other] and 100 < peers["banned"][0]["for_s"] <= 120
            assert (await c.call("unban", peer=other))["was_banned"] is True
            assert (await c.call("peers"))["banned"] == []

            # Drain: no new sessions, announced as draining; resume undoes it.
            assert (await c.call("drain"))["state"] == "draining"
            assert node.server.state == "draining"
            assert (await c.call("status"))["pinned"] is True
            assert (await c.call("resume"))["state"] == "online"

            # Pin another span: the node moves there in the background; release has no balancer here
            # (the span was pinned by the config).
            assert (await c.call("pin", start=0, end=30))["moving"] is False
            with pytest.raises(ControlError) as e:
                await c.call("pin", start=10, end=99)
            assert e.value.code == "bad_args" and "0:30" in str(e.value)
            assert (await c.call("pin", start=0, end=15))["moving"] is True
            with trio.fail_after(60):
                while (await c.call("status"))["span"] != [0, 15]:
                    await trio.sleep(0.2)
            assert (await c.call("release"))["balancer"] is False

            # The log tail and the log stream see the move's lines; a cancel ends the stream.
            tail = await c.call("log_tail", lines=50)
            assert tail["last_seq"] >= 1
            lines: list[dict] = []
            async with ControlClient(tmp_path / "n") as logs_conn:
                with trio.move_on_after(3):
                    await logs_conn.stream("logs", lines.append, contains="blocks 0:15", tail=50)
            assert any("now serving blocks 0:15" in x["message"] for x in lines), lines

            # Events: the operator's actions arrived on the other connection, in order.
            with trio.fail_after(10):
                while not any(e["kind"] == "release" for e in seen_events):
                    await trio.sleep(0.1)
            kinds = [e["kind"] for e in seen_events if e["kind"] in ("ban", "unban", "pin", "release")]
            assert kinds == ["ban", "unban", "pin", "pin", "release"], kinds
            follow_scope.cancel()
            await followed.wait()

            # A streaming call ended by the client's cancel frame answers a result; the connection lives on.
            raw = await trio.open_unix_socket(str(tmp_path / "n" / CONTROL_SOCKET))
            decoder = FrameDecoder(8 * 1024 * 1024)
            with trio.fail_after(20):
                await _send(raw, {"t": "hello", "v": 1})
                await _receive(raw, decoder, 10)
                await _send(raw, {"t": "call", "id": 7, "method": "logs", "args": {"tail": 3}})
                first = await _receive(raw, decoder, 10)
                assert first["t"] == "item" and first["id"] == 7
                await _send(raw, {"t": "cancel", "id": 7})
                while (answer := await _receive(raw, decoder, 10))["t"] == "item":
                    pass
                assert answer == {"t": "result", "id": 7, "value": {"cancelled": True}}
                await _send(raw, {"t": "call", "id": 8, "method": "status", "args": {}})
                assert (await _receive(raw, decoder, 10))["value"]["span"] == [0, 15]
            await raw.aclose()

            assert (await c.call("pin", start=0, end=30))["moving"] is True
            with trio.fail_after(60):
                while (await c.call("status"))["span"] != [0, 30]:
                    await trio.sleep(0.2)

            # Generation streamed through the node's own span server, tokens as they come.
            items: list[dict] = []
            result = await c.stream("generate", items.append, timeout=120, prompt="Name three colours.",
                                    max_new_tokens=6)
            assert [i["token"] for i in items] == result["tokens"] and len(items) >= 1
            assert items[0]["route"] == [{"peer": node.peer_id, "start": 0, "end": 30}]
            assert "".join(i["text"] for i in items) == result["text"]
            with pytest.raises(ControlError) as e:
                await c.stream("generate", items.append, prompt="  ")
            assert e.value.code == "bad_args"

            # Prometheus: the same figures as status.
            url = (await c.call("status"))["metrics_url"]
            assert url.startswith("http://127.0.0.1:")
            body = await trio.to_thread.run_sync(_scrape, url)
            assert f'peer_id="{node.peer_id}"' in body
            assert "poolai_span_end 30.0" in body
            assert 'poolai_server_state{state="online"} 1.0' in body
            assert "poolai_client_generations_total 1.0" in body
            assert "poolai_client_tokens_total %d.0" % len(result["tokens"]) in body
            assert 'poolai_block_replicas{block="20"} 1.0' in body
        nursery.cancel_scope.cancel()


async def test_peers_name_direction_and_the_protocols_registered_after_bootstrap(tmp_path, model_cache):
    """The second node dials the first before its span server and overlay exist; the identify push at
    the end of start-up still tells the first about them, and each side names the direction."""
    async with trio.open_nursery() as nursery:
        first, second = await start_swarm(nursery, model_cache, tmp_path, [(0, 15), (15, 30)])
        want = {"/poolai/infer/1", "/poolai/ring/1", "/poolai/ledger-sync/1", "/poolai/swarm/1"}
        async with ControlClient(tmp_path / "n0") as c0, ControlClient(tmp_path / "n1") as c1:
            with trio.fail_after(10):
                while True:
                    (p0,) = (await c0.call("peers"))["peers"]
                    if want <= set(p0["protocols"]):
                        break
                    await trio.sleep(0.1)
            (p1,) = (await c1.call("peers"))["peers"]
        assert p0["peer"] == second.peer_id and p0["direction"] == "inbound"
        assert p1["peer"] == first.peer_id and p1["direction"] == "outbound"
        assert want <= set(p1["protocols"]) and p0["spans"] == [[15, 30]]
        nursery.cancel_scope.cancel()


async def test_silent_clients_cannot_lock_the_operator_out(model_cache, monkeypatch):
    """MAX_CLIENTS connections that never say hello are dropped after HELLO_TIMEOUT_S; until then a
    real client gets the node's one-line 'busy' answer, not a broken pipe."""
    import node.control as control

    monkeypatch.setattr(control, "HELLO_TIMEOUT_S", 1.0)
    data_dir = traversable_dir() / "n"
    async with trio.open_nursery() as nursery:
        await start_node(nursery, node_config(model_cache, span=(0, 2)), data_dir)
        silent = [await trio.open_unix_socket(str(data_dir / CONTROL_SOCKET)) for _ in range(control.MAX_CLIENTS)]
        await trio.sleep(0.2)
        with pytest.raises(ControlError) as e:
            async with ControlClient(data_dir) as c:
                await c.call("status")
        assert e.value.code == "busy" and f"{control.MAX_CLIENTS} clients" in str(e.value)
        await trio.sleep(1.5)  # the silent ones are dropped
        async with ControlClient(data_dir) as c:
            assert (await c.call("status"))["peer_id"]
        for s in silent:
            await s.aclose()
        nursery.cancel_scope.cancel()
