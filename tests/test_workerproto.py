"""The worker channel's format: round trips, and strict refusal of anything
else (the server never unpickles what a worker sends)."""

import pickle
import struct
import timeit

import pytest

from ezpq_mgr.worker import workerproto as wp
from ezpq_mgr.messages import Env, Figures, LateFigures, Ready, Result, RunJob


def test_round_trips():
    figs = Figures(0.5, 0.25, 123 << 20, "vmhwm", None)
    sent = [Ready(),
            Result("failed", 3, 1.5, 2.5, b"\x80out", "Tracebäck", None, False),
            LateFigures(figs, False),
            Result("completed", 0, 1.0, 2.0, None, None, wp.NO_FIGURES, False),
            Result("completed", 0, 1.0, 2.0, None, None, None, False),
            LateFigures(figs, True),      # the worker leaves after this job
            Result("completed", 0, 1.0, 2.0, None, None, figs, True),
            Result("completed", 0, 1.0, 2.0, None, None, Figures(1.0, 0.5, None, None, 7 << 20), False)]
    encode = {Ready: wp.encode_ready, Result: wp.encode_result, LateFigures: wp.encode_figures}
    frames = b"".join(encode[type(m)](*m) for m in sent)
    reader = wp.FrameReader()
    got = []
    for i in range(len(frames)):  # one byte at a time: frames complete only when whole
        got += reader.feed(frames[i:i + 1])
    assert got == sent and [type(m) for m in got] == [type(m) for m in sent]
    assert got[1].exception == "Tracebäck" and got[5].leaving and got[7].figures.max_rss_children == 7 << 20
    assert not reader.partial


@pytest.mark.parametrize("env", [None, Env("/tmp", ["/a", "/b"])])
@pytest.mark.parametrize("size", [10, 70000])
def test_job_round_trip(env, size):
    job = RunJob(b"f" * size, b"a" * (size + 1), env, True)
    frame = b"".join(bytes(b) for b in wp.encode_job(*job))
    version, kind, _, n = wp.HEADER.unpack_from(frame)
    assert (version, kind, n) == (wp.VERSION, wp.JOB, len(frame) - wp.HEADER.size)
    got = wp.decode_job(frame[wp.HEADER.size:])
    assert type(got) is RunJob and got == job and (env is None or type(got.env) is Env)


def _frame(kind, body, version=wp.VERSION, reserved=0):
    return wp.HEADER.pack(version, kind, reserved, len(body)) + body


@pytest.mark.parametrize("data, why", [
    (b"\xff" * 64, "version"),
    (struct.pack("!i", 5) + b"hello", "version"),
    (pickle.dumps(("x",)), "version"),
    (_frame(wp.READY, b"", reserved=1), "version"),
    (_frame(wp.JOB, b"x"), "kind"),
    (_frame(99, b""), "kind"),
    (_frame(wp.READY, b"x"), "no body"),
    (_frame(wp.FIGURES, b"x" * 3), "figures size"),
    (_frame(wp.RESULT, b"\x00" * 5), "truncated"),
    (_frame(wp.RESULT, wp.encode_result("completed", 0, 1.0, 2.0, b"x", None, None)[8:] + b"\x00"),
     "trailing"),
    (_frame(wp.RESULT, struct.pack("!Biddb", 7, 0, 1.0, 2.0, 0) + b"\xff" * 8), "bad result"),
    (_frame(wp.RESULT, struct.pack("!Biddb", 0, 0, float("nan"), 2.0, 0) + b"\xff" * 8), "out of range"),
    (_frame(wp.FIGURES, struct.pack("!BddqqB", 1, -1.0, 0, 0, 0, 0)), "range"),
    (_frame(wp.FIGURES, struct.pack("!BddqqB", 16, 0, 0, 0, 0, 0)), "bad figures"),
    # "leaving" without the figures that end the job, or as a figures bit inside a result
    (_frame(wp.RESULT, struct.pack("!Biddb", 0, 0, 1.0, 2.0, 2) + b"\xff" * 8), "bad result"),
    (_frame(wp.RESULT, struct.pack("!Biddb", 0, 0, 1.0, 2.0, 1) + struct.pack("!BddqqB", 11, 0, 0, 0, 0, 0)
            + b"\xff" * 8), "bad figures"),
])
def test_anything_else_is_refused(data, why):
    with pytest.raises(wp.ProtocolError, match=why):
        wp.FrameReader().feed(data)


def test_an_oversize_frame_is_refused_at_its_header():
    reader = wp.FrameReader(max_message=1000)
    with pytest.raises(wp.ProtocolError, match="over the 1000-byte limit"):
        reader.feed(wp.HEADER.pack(wp.VERSION, wp.RESULT, 0, 1001))
    assert wp.FrameReader(max_message=1 << 30).feed(wp.HEADER.pack(wp.VERSION, wp.RESULT, 0, 1 << 29)) == []


def test_costs_about_what_pickle_did():
    """Encode+decode of a no-op job's result and figures, against pickling
    the tuples the old channel sent (generous: within 3x; typically less)."""
    out = pickle.dumps(None)
    figs = (0.001, 0.0, 30 << 20, "vmhwm", None)
    reader = wp.FrameReader()

    def ours():
        reader.feed(wp.encode_result("completed", 0, 1.0, 2.0, out, None, None) + wp.encode_figures(figs))

    def theirs():
        pickle.loads(pickle.dumps((1, "completed", 0, out, None, 1234, 1.0, 2.0, None), 5))
        pickle.loads(pickle.dumps((1, figs), 5))

    n = 20000
    t_ours = min(timeit.repeat(ours, number=n, repeat=3)) / n
    t_theirs = min(timeit.repeat(theirs, number=n, repeat=3)) / n
    print(f"workerproto {t_ours * 1e6:.2f} us, pickle {t_theirs * 1e6:.2f} us per result+figures")
    assert t_ours < 3 * t_theirs


def test_a_result_with_times_that_are_no_dates_is_a_violation():
    """A job that forges its result's times (±1.7e308) must not reach the
    accounting log or the job dict, where they overflow datetime."""
    import pytest as _pytest
    from ezpq_mgr.worker import workerproto as wp
    for started, ended in ((-1.7e308, 1.7e308), (0.0, 1e12), (float("nan"), 1.0)):
        frame = wp.encode_result("completed", 0, started, ended, None, None, wp.NO_FIGURES)
        with _pytest.raises(wp.ProtocolError):
            wp.FrameReader().feed(frame)
    ok = wp.encode_result("completed", 0, 1.7e9, 1.7e9 + 1, None, None, wp.NO_FIGURES)
    assert type(wp.FrameReader().feed(ok)[0]) is Result


def test_each_kind_byte_names_one_record():
    from ezpq_mgr.messages import Stop
    frames = {wp.READY: wp.encode_ready(), wp.STOP: wp.encode_stop(),
              wp.JOB: b"".join(wp.encode_job(b"f", b"a", None, False))}
    for kind, frame in frames.items():
        assert wp.HEADER.unpack_from(frame)[1] == kind
    assert type(wp.FrameReader().feed(frames[wp.READY])[0]) is wp.RECORDS[wp.READY] is Ready
    assert type(wp.decode_job(frames[wp.JOB][wp.HEADER.size:])) is wp.RECORDS[wp.JOB] is RunJob
    assert wp.RECORDS[wp.STOP] is Stop
