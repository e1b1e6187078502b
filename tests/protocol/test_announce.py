from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.announce import (
    MAX_TTL_MS,
    AnnouncementRejected,
    SpanAnnouncement,
    SwarmMap,
    check_announcement,
    decode_announcement,
)
from protocol.errors import MalformedFrame
from protocol.signing import Signer

MODEL = b"m" * 32
NOW = 1_700_000_000_000


def record(signer, start=0, end=10, issued=NOW, ttl=60_000, **kw):
    return SpanAnnouncement(signer.peer_id, MODEL, start, end, ("/ip4/127.0.0.1/tcp/1",), issued, issued + ttl,
                            **kw).signed(signer)


def test_round_trip_and_verify():
    s = Signer.generate()
    r = record(s, throughput=1234, cache_tokens_left=99, device="cpu")
    back = decode_announcement(r.encode())
    assert back == r
    check_announcement(back, NOW, sender=s.peer_id)


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: replace(r, end=11), "bad signature"),
    (lambda r: replace(r, signature=bytes(64)), "bad signature"),
    (lambda r: replace(r, peer_id=Signer.generate().peer_id), "bad signature"),
])
def test_forged_records_rejected(mutate, reason):
    r = mutate(record(Signer.generate()))
    with pytest.raises(AnnouncementRejected, match=reason):
        check_announcement(decode_announcement(r.encode()), NOW)


def test_time_rules():
    s = Signer.generate()
    with pytest.raises(AnnouncementRejected, match="expired"):
        check_announcement(record(s, issued=NOW - 70_000), NOW)
    with pytest.raises(AnnouncementRejected, match="future"):
        check_announcement(record(s, issued=NOW + 60_000), NOW)
    with pytest.raises(AnnouncementRejected, match="lifetime"):
        check_announcement(record(s, ttl=MAX_TTL_MS + 1), NOW)
    with pytest.raises(AnnouncementRejected, match="another peer"):
        check_announcement(record(s), NOW, sender=Signer.generate().peer_id)


@given(st.binary(max_size=400))
def test_garbage_never_decodes_to_a_record(data):
    try:
        decode_announcement(data)
    except MalformedFrame:
        pass


def test_map_keeps_newest_and_expires():
    a, b = Signer.generate(), Signer.generate()
    m = SwarmMap()
    assert m.apply(record(a, 0, 10), NOW)
    assert not m.apply(record(a, 0, 10, issued=NOW - 1000), NOW)  # older
    assert m.apply(record(a, 0, 15, issued=NOW + 1), NOW)
    assert m.apply(record(b, 15, 30, ttl=1000), NOW)
    assert m.coverage(MODEL, 30) == [1] * 30
    assert m.missing_blocks(MODEL, 30) == []
    gone = m.expire(NOW + 1000)
    assert [g.peer_id for g in gone] == [b.peer_id]
    assert m.missing_blocks(MODEL, 30) == list(range(15, 30))
