"""Ring messages and signed records (protocol/ring.py): round trips, limits, and hostile input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import decode_body, encode_frame
from protocol.errors import MalformedFrame, RemoteProtocolError
from protocol.overlay import RING_SIZE
from protocol.ring import (
    MAX_ADDRS,
    MAX_KEY_BYTES,
    MAX_RECORD_TTL_MS,
    MAX_RECORDS_PER_MESSAGE,
    MAX_RING_FRAME,
    MAX_SHORT_ENTRIES,
    MAX_VALUE_BYTES,
    RING_PROTOCOL,
    Found,
    RecordRejected,
    Refused,
    RingLists,
    RingRecord,
    check_record,
    decode_record,
    decode_reply,
    decode_request,
    error_reply,
    find_request,
    found_reply,
    get_request,
    key_position,
    link_request,
    make_record,
    records_reply,
    ring_reply,
    stab_request,
    store_request,
)
from protocol.signing import Signer

NOW = 1_700_000_000_000
SIGNER = Signer.from_seed(b"\x01" * 32)
OTHER = Signer.from_seed(b"\x02" * 32)
ADDRS = ("/ip4/127.0.0.1/tcp/4001",)


def wire(msg: dict) -> dict:
    """Through the real frame codec, as a peer would see it."""
    return decode_body(encode_frame(msg, MAX_RING_FRAME)[4:])


def test_protocol_id():
    assert RING_PROTOCOL == "/poolai/ring/1"


def test_record_round_trip_and_checks():
    rec = make_record(SIGNER, b"key", b"value", NOW, 60_000)
    back = decode_record(rec.encode())
    assert back == rec
    check_record(back, NOW)
    assert rec.position == key_position(b"key") and rec.slot == (b"key", SIGNER.peer_id)
    with pytest.raises(RecordRejected, match="expired"):
        check_record(rec, NOW + 60_000)
    with pytest.raises(RecordRejected, match="future"):
        check_record(rec, NOW - 31_000)
    tampered = RingRecord(rec.author, rec.key, b"other", rec.issued_ms, rec.expires_ms, rec.signature)
    with pytest.raises(RecordRejected, match="bad signature"):
        check_record(decode_record(tampered.encode()), NOW)
    stolen = RingRecord(OTHER.peer_id, rec.key, rec.value, rec.issued_ms, rec.expires_ms, rec.signature)
    with pytest.raises(RecordRejected, match="bad signature"):
        check_record(stolen, NOW)
    too_long = RingRecord(SIGNER.peer_id, b"k", b"v", NOW, NOW + MAX_RECORD_TTL_MS + 1).signed(SIGNER)
    with pytest.raises(RecordRejected, match="lifetime"):
        check_record(too_long, NOW)


def test_record_size_limits():
    make_record(SIGNER, b"k" * MAX_KEY_BYTES, b"v" * MAX_VALUE_BYTES, NOW, 1000)  # at the limits: fine
    for key, value in ((b"", b"v"), (b"k" * (MAX_KEY_BYTES + 1), b"v"), (b"k", b"v" * (MAX_VALUE_BYTES + 1))):
        with pytest.raises(ValueError):
            make_record(SIGNER, key, value, NOW, 1000)
        # The same record built by hand and sent by a peer is refused on arrival.
        rec = RingRecord(SIGNER.peer_id, key, value, NOW, NOW + 1000).signed(SIGNER)
        with pytest.raises(RecordRejected):
            check_record(decode_record(rec.encode()), NOW)
    with pytest.raises(RecordRejected, match="over the"):
        decode_record(b"\x00" * (MAX_VALUE_BYTES + MAX_KEY_BYTES + 1024))
    with pytest.raises(ValueError):
        make_record(SIGNER, b"k", b"v", NOW, MAX_RECORD_TTL_MS + 1)


@pytest.mark.parametrize("raw", [
    "text", b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"a": 1}),
    msgpack.packb([b"x", b"k", b"v", 1, 2, b"s" * 64]),  # author is not a peer ID
    msgpack.packb([SIGNER.peer_id, "k", b"v", 1, 2, b"s" * 64]),  # key is text
    msgpack.packb([SIGNER.peer_id, b"k", b"v", -1, 2, b"s" * 64]),  # negative time
    msgpack.packb([SIGNER.peer_id, b"k", b"v", 1, 2, b"s"]),  # short signature
])
def test_malformed_records(raw):
    with pytest.raises(RemoteProtocolError):
        decode_record(raw)


def test_requests_round_trip():
    r = decode_request(wire(find_request(RING_SIZE - 1, ADDRS)))
    assert (r.kind, r.key_pos, r.addrs) == ("find", RING_SIZE - 1, ADDRS)
    r = decode_request(wire(stab_request(123.5, ADDRS)))
    assert (r.kind, r.n_hat) == ("stab", 123.5)
    assert decode_request(wire(link_request(ADDRS, drop=True))).drop is True
    rec = make_record(SIGNER, b"k", b"v", NOW, 1000).encode()
    assert decode_request(wire(store_request([rec], ADDRS))).records == (rec,)
    assert decode_request(wire(get_request(b"k", ADDRS))).key == b"k"


def test_replies_round_trip():
    a, b = (SIGNER.peer_id, ADDRS), (OTHER.peer_id, ())
    found = decode_reply(wire(found_reply(a, [a, b], 24.0)), "find")
    assert found == Found(a, (a, b), 24.0)
    assert decode_reply(wire(found_reply(None, [], 1.0)), "find").next is None
    lists = decode_reply(wire(ring_reply([a], [b], [a, b], 3.0)), "stab")
    assert lists == RingLists((a,), (b,), (a, b), 3.0)
    assert decode_reply(wire(records_reply([b"x"])), "get") == (b"x",)
    with pytest.raises(Refused, match="busy"):
        decode_reply(wire(error_reply("busy")), "find")
    with pytest.raises(MalformedFrame, match="expected"):
        decode_reply(wire(found_reply(None, [], 1.0)), "stab")


@pytest.mark.parametrize("msg", [
    {"t": "nope", "a": []},
    {"t": "find", "a": []},
    {"t": "find", "key": RING_SIZE, "a": []},
    {"t": "find", "key": 1, "a": ["x"] * (MAX_ADDRS + 1)},
    {"t": "find", "key": 1, "a": [1]},
    {"t": "find", "key": True, "a": []},
    {"t": "stab", "n": 0.5, "a": []},
    {"t": "stab", "n": float("inf"), "a": []},
    {"t": "link", "drop": 1, "a": []},
    {"t": "store", "records": [b"x"] * (MAX_RECORDS_PER_MESSAGE + 1), "a": []},
    {"t": "get", "key": b"k" * (MAX_KEY_BYTES + 1), "a": []},
])
def test_malformed_requests(msg):
    with pytest.raises(MalformedFrame):
        decode_request(msg)


@pytest.mark.parametrize("msg", [
    {"t": "found", "close": [], "n": 1.0},
    {"t": "found", "next": [b"short", []], "close": [], "n": 1.0},
    {"t": "found", "next": None, "close": [[SIGNER.peer_id, []]] * (MAX_SHORT_ENTRIES + 1), "n": 1.0},
    {"t": "found", "next": None, "close": [], "n": float("nan")},
    {"t": "found", "next": [SIGNER.peer_id], "close": [], "n": 1.0},
])
def test_malformed_replies(msg):
    with pytest.raises(MalformedFrame):
        decode_reply(msg, "find")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_record_decoder(data):
    try:
        rec = decode_record(data)
        check_record(rec, NOW)
    except RemoteProtocolError:
        pass


_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.binary(max_size=40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["find", "stab", "link", "store", "get", "found", "ring", "x"]),
       st.dictionaries(st.sampled_from(["a", "key", "n", "drop", "records", "next", "close", "succ", "pred",
                                        "nbrs", "ok", "count"]), _value, max_size=6))
def test_fuzz_message_decoders(kind, body):
    """Whatever a peer sends, decoding either succeeds or raises a RemoteProtocolError."""
    msg = {**body, "t": kind}
    try:
        decode_request(msg)
    except RemoteProtocolError:
        pass
    for request in ("find", "stab", "link", "store", "get"):
        try:
            decode_reply(msg, request)
        except RemoteProtocolError:
            pass


def test_undialable_addresses_are_dropped_not_handed_on():
    """A peer's garbage addresses never reach the table, so they are never passed to other peers."""
    good = ("/ip4/127.0.0.1/tcp/4001", "/dns4/node.example.org/tcp/4001/p2p/" + "Qm" * 10)
    msg = stab_request(10.0, ("garbage", "/ip4/1.2.3.4/udp/1/quic", *good))
    assert decode_request(wire(msg)).addrs == good
    assert decode_request(wire(stab_request(10.0, ("/unix/tmp/x", "/ip4/1.2.3.4/tcp/1; rm")))).addrs == ()
