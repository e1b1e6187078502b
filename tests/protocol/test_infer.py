import pytest

from protocol.errors import LocalProtocolError, MalformedFrame
from protocol.infer import ClientSession, PositionError, ServerRefused, ServerSession, State
from protocol.tensors import WireTensor

H = 4


def hidden(t):
    return WireTensor("f32", (1, t, H), b"\0" * (4 * t * H))


def opened():
    c = ClientSession(b"s" * 16, b"m" * 32, 0, 10, 8, H)
    s = ServerSession(H)
    req = s.receive(c.open_frame())
    assert (req.start, req.end, req.max_length) == (0, 10, 8)
    c.on_ready(s.accept(8))
    return c, s


def test_full_session():
    c, s = opened()
    for t in (3, 1, 1):
        step = s.receive(c.step_frame(hidden(t)))
        out = c.on_output(s.respond(step, hidden(t)))
        assert out.shape == (1, t, H)
    assert c.tokens == s.tokens == 5
    assert s.receive(c.close_frame()) is None and s.state is State.CLOSED


def test_step_must_continue_cache():
    c, s = opened()
    frame = c.step_frame(hidden(2))
    frame["position"] = 1
    with pytest.raises(PositionError, match="position 1"):
        s.receive(frame)


def test_step_over_max_length():
    c, s = opened()
    frame = {"t": "step", "seq": 0, "position": 0, "hidden": hidden(9).to_wire()}
    with pytest.raises(PositionError, match="max_length"):
        s.receive(frame)


def test_wrong_hidden_size_and_unexpected_messages():
    c, s = opened()
    bad = {"t": "step", "seq": 0, "position": 0, "hidden": WireTensor("f32", (1, 1, 3), b"\0" * 12).to_wire()}
    with pytest.raises(MalformedFrame, match="shape"):
        s.receive(bad)
    s2 = ServerSession(H)
    with pytest.raises(MalformedFrame, match="unexpected message 'step'"):
        s2.receive({"t": "step"})


def test_refusal_reaches_client_as_server_refused():
    c = ClientSession(b"s" * 16, b"m" * 32, 0, 10, 8, H)
    s = ServerSession(H)
    s.receive(c.open_frame())
    with pytest.raises(ServerRefused) as e:
        c.on_ready(s.refuse("busy", "no cache"))
    assert e.value.code == "busy"


def test_client_checks_output():
    c, s = opened()
    step = s.receive(c.step_frame(hidden(2)))
    with pytest.raises(MalformedFrame, match="tokens"):
        c.on_output({"t": "out", "seq": step.seq, "hidden": hidden(1).to_wire()})


def test_local_misuse():
    with pytest.raises(LocalProtocolError):
        ClientSession(b"s" * 16, b"m" * 32, 0, 10, 10**6, H)
    c, s = opened()
    c.step_frame(hidden(1))
    with pytest.raises(LocalProtocolError):
        c.step_frame(hidden(1))  # one step in flight at a time
