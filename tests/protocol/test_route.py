import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.announce import SpanAnnouncement
from protocol.placement import choose_span
from protocol.route import NoRoute, plan_route


def server(i, start, end, throughput=0, cache=10_000):
    return SpanAnnouncement(bytes([i]) * 38, b"m" * 32, start, end, (), 0, 1, throughput=throughput,
                            cache_tokens_left=cache)


def test_route_prefers_fewer_hops_and_faster_servers():
    servers = [server(1, 0, 10), server(2, 10, 20), server(3, 20, 30), server(4, 0, 30, throughput=500_000)]
    hops = plan_route(servers, 0, 30)
    assert [(h.peer_id[0], h.start, h.end) for h in hops] == [(4, 0, 30)]
    hops = plan_route(servers, 0, 30, exclude=frozenset({bytes([4]) * 38}))
    assert [(h.peer_id[0], h.start, h.end) for h in hops] == [(1, 0, 10), (2, 10, 20), (3, 20, 30)]


def test_no_route_names_missing_blocks():
    with pytest.raises(NoRoute, match="blocks 10-14, 20") as e:
        plan_route([server(1, 0, 10), server(2, 15, 20), server(3, 21, 30)], 0, 30)
    assert e.value.missing == [10, 11, 12, 13, 14, 20]


spans = st.lists(st.tuples(st.integers(0, 29), st.integers(1, 30)).filter(lambda t: t[0] < t[1]), max_size=12)


@given(spans, st.lists(st.floats(0.0001, 0.1), min_size=12, max_size=12))
def test_route_covers_every_block_once_in_order(span_list, rtts):
    servers = [server(i + 1, a, b, throughput=(i * 7919) % 100_000) for i, (a, b) in enumerate(span_list)]
    try:
        hops = plan_route(servers, 0, 30, rtt_s=lambda p: rtts[p[0] - 1])
    except NoRoute as e:
        covered = {b for a, z in span_list for b in range(a, z)}
        assert e.missing and all(b not in covered for b in e.missing)
        return
    assert hops[0].start == 0 and hops[-1].end == 30
    for h, nxt in zip(hops, hops[1:]):
        assert h.end == nxt.start
    for h in hops:
        s = next(s for s in servers if s.peer_id == h.peer_id)
        assert s.start <= h.start < h.end <= s.end


@given(st.lists(st.floats(0, 100), min_size=1, max_size=40), st.integers(1, 50))
def test_chosen_span_inside_model_and_covers_weakest(served, size):
    a, b = choose_span(served, size)
    assert 0 <= a < b <= len(served) and b - a == min(size, len(served))
    assert min(served[a:b]) == min(served)


def test_choose_span_closes_gaps_first():
    assert choose_span([2, 2, 2, 0, 0, 1, 1, 2], 3) == (3, 6)
