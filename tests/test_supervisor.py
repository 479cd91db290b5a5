"""The supervisor's side of the two-message result (result, then figures),
driven by hand: no worker processes."""

import os
import pickle

import pytest

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
    w = WorkerHandle(proc=None, conn=None, seq=rec.seq, deadline=1e18, ready=True)
    yield state, sup, w, rec
    sup._selector.close()
    os.close(sup._wake_r)
    os.close(sup._wake_w)


def _result(seq, figures=None):
    return (seq, "completed", 0, pickle.dumps(42), None, 1234, 1.0, 2.0, figures)


def test_figures_complete_the_job_and_the_worker_is_free_at_the_result(running):
    state, sup, w, rec = running
    with state.cond:
        sup._on_result(w, _result(rec.seq))
        assert w.idle and w.deadline is None       # may take the next job now
        assert state.counts("q")["working"] == 1 and state.pop_completed("q") == []
        sup._on_result(w, (rec.seq, (0.25, 0.01, 30 << 20, "vmhwm", None)))
    job = state.pop_completed("q")[0]
    assert (job["status"], job["cpu_user"], job["max_rss"], job["pid"]) == ("completed", 0.25, 30 << 20, 1234)


def test_a_worker_lost_before_its_figures_still_completes_the_job(running):
    state, sup, w, rec = running
    with state.cond:
        sup._on_result(w, _result(rec.seq))
        sup._flush_pending(w)                      # what death, kill and stop do first
        sup._on_result(w, (rec.seq, (0.25, 0.01, 1, "vmhwm", None)))  # too late: ignored
    job = state.pop_completed("q")[0]
    assert (job["status"], job["exitcode"], job["cpu_user"]) == ("completed", 0, None)
    assert state.counts("q")["working"] == 0


def test_unmeasured_results_complete_at_once(running):
    state, sup, w, rec = running
    with state.cond:
        sup._on_result(w, _result(rec.seq, figures=(None,) * 5))
    assert state.pop_completed("q")[0]["status"] == JobStatus.COMPLETED.value
