"""The named messages (messages.py): what a client may send is checked
against one schema and the server's record is built from the checked
values; the records survive both wire formats and name themselves again
on arrival; the handshake's frames are its records."""

import dataclasses
import json
import pickle

import pytest

from ezpq_mgr import messages as m
from ezpq_mgr import transport, wire
from ezpq_mgr.job import JobRecord, JobStatus, Phase


def _job(**over):
    r = {"client": "tok", "priority": 5, "timeout": 2.5, "function": "f", "fn_blob": b"F",
         "args_blob": b"A"}
    r.update(over)
    return r


def test_every_record_field_is_the_clients_or_the_servers():
    """A field added to JobRecord must be placed in the schema: sent by a
    client (JOB_FIELDS) or set by the server (SERVER_FIELDS), never both."""
    fields = {f.name for f in dataclasses.fields(JobRecord)}
    assert (set(m.JOB_FIELDS) - m.FOLDED) | m.SERVER_FIELDS == fields
    assert m.FOLDED <= set(m.JOB_FIELDS) and not m.FOLDED & fields
    assert not set(m.JOB_FIELDS) & m.SERVER_FIELDS
    assert m.REQUIRED <= set(m.JOB_FIELDS)


def test_a_job_record_is_built_from_the_checked_values():
    sent = _job(id=7, name="n", lane_key=b"L", lane_text="lane", runner="thread", suppress_errors=True,
                stop_on_lane_error=True, retries=2, max_memory=1 << 20, env_id=3)
    rec = m.job_record(sent, "1000:q", "alice", 1000)
    assert (rec.qid, rec.user, rec.uid, rec.seq) == ("1000:q", "alice", 1000, 0)   # the server's, not the client's
    for key, value in sent.items():
        assert getattr(rec, key) == value, key
    assert (rec.status, rec.phase, rec.attempts, rec.submitted) == (JobStatus.WAITING, Phase.NEW, 0, None)
    sent["priority"] = 99       # the record is no view of the client's dict
    assert rec.priority == 5


def test_a_job_record_takes_the_schemas_defaults():
    rec = m.job_record(_job(), "q", "u", None)
    for key, default in m.JOB_FIELDS.items():
        if key not in m.REQUIRED and key not in m.FOLDED:
            assert getattr(rec, key) == default, key


@pytest.mark.parametrize("over, error, text", [
    ({"status": "completed"}, ValueError, "set by the server"),
    ({"uid": 0}, ValueError, "set by the server"),
    ({"user": "root"}, ValueError, "set by the server"),
    ({"extra": 1}, ValueError, "unknown job record field"),
    ({"priority": "1"}, TypeError, "priority"),
    ({"timeout": float("nan")}, ValueError, "timeout"),
    ({"runner": "fork"}, ValueError, "runner"),
    ({"lane_text": "x"}, ValueError, "lane_text without a lane_key"),
    ({"client": "a\nb"}, ValueError, "printable"),
    ({"fn_blob": "not bytes"}, TypeError, "fn_blob"),
])
def test_a_job_outside_the_schema_is_refused(over, error, text):
    with pytest.raises(error, match=text):
        m.job_record(_job(**over), "q", "u", 1)


def test_a_job_without_a_required_field_is_refused():
    r = _job()
    del r["fn_blob"]
    with pytest.raises(ValueError, match="lacks fn_blob"):
        m.job_record(r, "q", "u", 1)
    with pytest.raises(TypeError, match="must be a dict"):
        m.job_record([("client", "tok")], "q", "u", 1)


def test_a_batch_is_all_or_nothing():
    with pytest.raises(TypeError, match="priority"):
        m.job_records([_job(), _job(priority=None)], "q", "u", 1)
    assert [r.function for r in m.job_records([_job(), _job(function="g")], "q", "u", 1)] == ["f", "g"]


@pytest.mark.parametrize("dumps, loads", [(wire.dumps, wire.loads),
                                          (lambda msg: pickle.dumps(tuple(msg)), pickle.loads)])
def test_calls_travel_as_their_fields_and_are_named_on_arrival(dumps, loads):
    req = m.Request.parse(loads(dumps(m.Request("get", ["q", True, None]))))
    assert type(req) is m.Request and (req.method, list(req.args)) == ("get", ["q", True, None])
    reply = m.Reply.parse(loads(dumps(m.Reply(m.ERROR, ValueError("no")))))
    assert type(reply) is m.Reply and reply.kind == m.ERROR and isinstance(reply.value, ValueError)


@pytest.mark.parametrize("obj", [("get",), ("get", ["q"], 1), (1, []), ("get", "q"), "get", None])
def test_a_malformed_request_is_refused(obj):
    with pytest.raises(TypeError):
        m.Request.parse(obj)


def test_a_reply_of_an_unknown_kind_is_refused():
    with pytest.raises(TypeError, match="unknown reply kind"):
        m.Reply.parse(("#MAYBE", 1))


def test_processed_is_checked():
    assert m.Processed.parse([3, None]) == m.Processed(3, None)
    assert m.Processed.parse(m.Processed(4, b"x")).callback_blob == b"x"
    for bad, error in (([0, None], ValueError), (["3", None], TypeError), ([3, "x"], TypeError),
                       ([3], TypeError), ("ab", TypeError)):
        with pytest.raises(error):
            m.Processed.parse(bad)


def test_the_handshake_frames_are_its_records():
    def body(frame):
        return frame[transport.HEADER.size:]

    c = m.Challenge(b"n" * transport.NONCE)
    assert transport.parse_greeting(body(transport.encode_handshake(c))) == c
    refusal = m.Refusal("too many connections")
    assert transport.parse_greeting(body(transport.encode_handshake(refusal))) == refusal
    a = m.Answer(b"d" * transport.DIGEST, b"c" * transport.NONCE)
    assert transport.parse_answer(body(transport.encode_handshake(a))) == a
    assert transport.parse_answer(b"EZPQ/1 short") is None
    w = m.Welcome(b"s" * transport.DIGEST, {"max_message": 123})
    assert transport.parse_welcome(body(transport.encode_handshake(w))) == w
    assert transport.parse_welcome(body(transport.refusal(transport.WRONG_KEY))) == m.Refusal(transport.WRONG_KEY)
    with pytest.raises(ConnectionError):
        transport.parse_greeting(b"HTTP/1.0 200 OK")


def test_the_key_is_proven_both_ways():
    key = b"k" * 32
    nonce, frame = transport.challenge()
    assert transport.parse_greeting(frame[transport.HEADER.size:]) == m.Challenge(nonce)
    mine = b"m" * transport.NONCE
    answer = m.Answer(transport._mac(key, b"client:", nonce), mine)
    assert transport.check_answer(key, nonce, transport.encode_handshake(answer)[transport.HEADER.size:]) == mine
    assert transport.check_answer(b"other", nonce, transport.encode_handshake(answer)[transport.HEADER.size:]) is None
    welcome = transport.parse_welcome(transport.welcome(key, mine, {"max_message": 9})[transport.HEADER.size:])
    assert welcome.digest == transport._mac(key, b"server:", mine) and welcome.limits == {"max_message": 9}


def test_every_message_is_a_named_tuple():
    """Cheap to build and to read (no per-message __init__), and its fields have names."""
    for name in m.__all__:
        obj = getattr(m, name)
        if isinstance(obj, type):
            assert issubclass(obj, tuple) and hasattr(obj, "_fields"), name
    assert m.Outcome(JobStatus.FAILED, 1, exception="x").exception == "x"


@pytest.mark.parametrize("n", [0, 3, wire._SLICE, wire._SLICE + 1, 2 * wire._SLICE + 7])
def test_long_lists_are_dumped_in_slices_with_the_same_bytes(n, monkeypatch):
    """A long listing is written a slice per json call (so the C encoder
    never holds the interpreter for a whole 28 MB reply): the bytes are
    those of one call, and it reads back the same, inside a Reply too."""
    rows = [{"job": i, "args": b"\x00x", "t": (i, None), "__odd": "k"} for i in range(n)]
    calls = []
    real = wire.json.dumps
    monkeypatch.setattr(wire.json, "dumps", lambda *a, **k: calls.append(1) or real(*a, **k))
    for obj in (rows, m.Reply("ok", rows), {"rows": rows, "more": [rows, 1]}):
        calls.clear()
        data = wire.dumps(obj)
        assert data == real(json.loads(data), separators=(",", ":")).encode()
        back = wire.loads(data)
        assert (tuple(back) if isinstance(obj, m.Reply) else back) == (tuple(obj) if isinstance(obj, m.Reply) else obj)
        if n > wire._SLICE:
            assert len(calls) >= n // wire._SLICE, "a long list was dumped in one call"
