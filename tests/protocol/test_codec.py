import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import HEADER, MAX_CONTROL_FRAME, FrameDecoder, encode_frame, int_field
from protocol.errors import FrameTooLarge, LocalProtocolError, MalformedFrame
from protocol.tensors import tensor_from_wire

scalars = st.one_of(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=64), st.text(max_size=32), st.booleans(),
                    st.none())
messages = st.fixed_dictionaries({"t": st.text(min_size=1, max_size=8)},
                                 optional={"a": scalars, "b": st.lists(scalars, max_size=4), "c": scalars})


@given(st.lists(messages, min_size=1, max_size=5), st.integers(1, 64))
def test_round_trip_in_any_chunking(msgs, chunk):
    data = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i : i + chunk])
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert not dec.mid_frame


@given(messages, st.data())
def test_truncated_frame_is_never_a_message(msg, data):
    frame = encode_frame(msg)
    cut = data.draw(st.integers(1, len(frame) - 1))
    dec = FrameDecoder()
    dec.feed(frame[:cut])
    assert dec.next_message() is None
    assert dec.mid_frame  # EOF now is a truncated frame, not a clean close


@given(st.integers(MAX_CONTROL_FRAME + 1, 2**32 - 1))
def test_oversized_header_refused_before_body(length):
    dec = FrameDecoder()
    dec.feed(HEADER.pack(length))
    with pytest.raises(FrameTooLarge, match="over the"):
        dec.next_message()


def test_encoder_refuses_oversized():
    with pytest.raises(LocalProtocolError):
        encode_frame({"t": "x", "a": b"\0" * (MAX_CONTROL_FRAME + 1)})


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=300)
def test_random_bodies_never_crash(body):
    dec = FrameDecoder()
    dec.feed(HEADER.pack(len(body)) + body)
    try:
        m = dec.next_message()
    except MalformedFrame:
        return
    assert isinstance(m, dict) and isinstance(m["t"], str)


@pytest.mark.parametrize("value", [[1, 2], 5, "x", {"x": 1}, {"t": 3}])
def test_non_message_bodies_rejected(value):
    dec = FrameDecoder()
    body = msgpack.packb(value)
    dec.feed(HEADER.pack(len(body)) + body)
    with pytest.raises(MalformedFrame):
        dec.next_message()


@pytest.mark.parametrize("value,match", [("5", "must be int"), (True, "not bool"), (99, "outside")])
def test_wrongly_typed_fields(value, match):
    with pytest.raises(MalformedFrame, match=match):
        int_field({"t": "open", "start": value}, "start", 0, 10)


@given(st.sampled_from(["f32", "f16", "bf16"]), st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(-3, 3))
def test_tensor_size_must_match_shape(dtype, shape, delta):
    size = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    n = size
    for d in shape:
        n *= d
    wire = {"dtype": dtype, "shape": shape, "data": b"\0" * max(0, n + delta)}
    if max(0, n + delta) == n:
        assert tensor_from_wire(wire).shape == tuple(shape)
    else:
        with pytest.raises(MalformedFrame, match="bytes of data"):
            tensor_from_wire(wire)


@pytest.mark.parametrize("wire", [
    {"dtype": "f64", "shape": [1], "data": b"\0" * 8},
    {"dtype": "f32", "shape": [], "data": b""},
    {"dtype": "f32", "shape": [1, 1, 1, 1, 1], "data": b"\0" * 4},
    {"dtype": "f32", "shape": [True], "data": b"\0" * 4},
    {"dtype": "f32", "shape": [2**21], "data": b""},
    {"dtype": "f32", "shape": [1], "data": "abcd"},
    [1, 2, 3],
])
def test_bad_tensors(wire):
    with pytest.raises(MalformedFrame):
        tensor_from_wire(wire)
