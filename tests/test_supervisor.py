"""The supervisor's side of the worker channel, driven by hand (no worker
processes): the two-message result (result, then figures), and the phase
rules that make anything out of place a protocol violation."""

import os
import pickle
import types

import pytest

from ezpq_mgr import workerproto
from ezpq_mgr.job import JobRecord, JobStatus
from ezpq_mgr.state import QueueState
from ezpq_mgr.supervisor import Supervisor, WorkerHandle


@pytest.fixture
def running():
    state = QueueState()
    sup = Supervisor(state, 0)
    state.add("q", [JobRecord(seq=0, qid="", id=0, client="c", user="u", name=None, priority=100,
                              lane_key=None, timeout=5, function="f", fn_blob=b"",
                              args_blob=pickle.dumps(((), None)))])
    with state.cond:
        rec = state.pick()
    w = WorkerHandle(proc=types.SimpleNamespace(pid=1234), conn=None, seq=rec.seq, deadline=1e18,
                     ready=True)
    killed = []
    sup._kill = lambda w, status, why: killed.append((w, status, why))  # no process to kill here
    yield state, sup, w, rec, killed
    sup._selector.close()
    os.close(sup._wake_r)
    os.close(sup._wake_w)


def _messages(*frames):
    reader = workerproto.FrameReader()
    return reader.feed(b"".join(frames))


def _result(figures=None, output=42):
    return workerproto.encode_result("completed", 0, 1.0, 2.0, pickle.dumps(output), None, figures)


def test_figures_complete_the_job_and_the_worker_is_free_at_the_result(running):
    state, sup, w, rec, killed = running
    result, figures = _messages(_result(), workerproto.encode_figures((0.25, 0.01, 30 << 20, "vmhwm", None)))
    with state.cond:
        sup._apply(w, [result], None)
        assert w.idle and w.deadline is None       # may take the next job now
        assert state.counts("q")["working"] == 1 and state.pop_completed("q") == []
        sup._apply(w, [figures], None)
    job = state.pop_completed("q")[0]
    assert (job["status"], job["cpu_user"], job["max_rss"], job["pid"]) == ("completed", 0.25, 30 << 20, 1234)
    assert not killed


def test_a_worker_lost_before_its_figures_still_completes_the_job(running):
    state, sup, w, rec, killed = running
    with state.cond:
        sup._apply(w, _messages(_result()), None)
        sup._flush_pending(w)                      # what death, kill and stop do first
    job = state.pop_completed("q")[0]
    assert (job["status"], job["exitcode"], job["cpu_user"]) == ("completed", 0, None)
    assert state.counts("q")["working"] == 0


def test_unmeasured_results_complete_at_once(running):
    state, sup, w, rec, killed = running
    with state.cond:
        sup._apply(w, _messages(_result(figures=workerproto.NO_FIGURES)), None)
    assert state.pop_completed("q")[0]["status"] == JobStatus.COMPLETED.value


@pytest.mark.parametrize("frames, why", [
    ([_result(workerproto.NO_FIGURES), _result(workerproto.NO_FIGURES)], "no job was given"),
    ([_result(), _result()], "figures were due"),
    ([workerproto.encode_ready()], "second ready"),
])
def test_a_message_out_of_place_is_a_violation_that_fails_the_job(running, frames, why):
    state, sup, w, rec, killed = running
    with state.cond:
        sup._apply(w, _messages(*frames), None)
    assert len(killed) == 1 and killed[0][1] == JobStatus.FAILED and why in killed[0][2]


def test_figures_without_a_result_are_a_violation(running):
    state, sup, w, rec, killed = running
    with state.cond:
        sup._apply(w, _messages(workerproto.encode_figures(workerproto.NO_FIGURES)), None)
    assert len(killed) == 1 and "protocol violation" in killed[0][2]
    assert w.seq == rec.seq  # the job it ran is the one that fails
