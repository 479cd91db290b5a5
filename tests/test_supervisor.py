"""The supervisor's side of the worker channel, driven by hand (no worker
processes): the two-message result (result, then figures), and the phase
rules that make anything out of place a protocol violation."""

import os
import pickle
import time
import types

import pytest

from ezpq_mgr.worker import workerproto
from ezpq_mgr.job import JobRecord, JobStatus
from ezpq_mgr.messages import NO_FIGURES, Figures, LateFigures, Ready, Result
from ezpq_mgr.server.state import QueueState
from ezpq_mgr.server.supervisor import IDLE_CHECK_INTERVAL, Supervisor, WorkerHandle


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


_ENCODE = {Ready: workerproto.encode_ready, Result: workerproto.encode_result,
           LateFigures: workerproto.encode_figures}


def _messages(*sent):
    """What the supervisor reads when a worker sends these messages (through
    the real format: encoded, then decoded by a FrameReader)."""
    reader = workerproto.FrameReader()
    return reader.feed(b"".join(_ENCODE[type(m)](*m) for m in sent))


def _result(figures=None, output=42):
    return Result("completed", 0, 1.0, 2.0, pickle.dumps(output), None, figures, False)


def _figures(figures=NO_FIGURES, leaving=False):
    return LateFigures(figures, leaving)


def test_figures_complete_the_job_and_the_worker_is_free_at_the_result(running):
    state, sup, w, rec, killed = running
    result, figures = _messages(_result(), _figures(Figures(0.25, 0.01, 30 << 20, "vmhwm", None)))
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
        sup._apply(w, _messages(_result(figures=NO_FIGURES)), None)
    assert state.pop_completed("q")[0]["status"] == JobStatus.COMPLETED.value


@pytest.mark.parametrize("sent, why", [
    ([_result(NO_FIGURES), _result(NO_FIGURES)], "no job was given"),
    ([_result(), _result()], "figures were due"),
    ([Ready()], "second ready"),
])
def test_a_message_out_of_place_is_a_violation_that_fails_the_job(running, sent, why):
    state, sup, w, rec, killed = running
    with state.cond:
        sup._apply(w, _messages(*sent), None)
    assert len(killed) == 1 and killed[0][1] == JobStatus.FAILED and why in killed[0][2]


def test_figures_without_a_result_are_a_violation(running):
    state, sup, w, rec, killed = running
    with state.cond:
        sup._apply(w, _messages(_figures()), None)
    assert len(killed) == 1 and "protocol violation" in killed[0][2]
    assert w.seq == rec.seq  # the job it ran is the one that fails


# ---------------------------------------------------------------- a result is the job's word until its figures
@pytest.fixture
def handed_over():
    """Job 1 sent a result (figures due) and job 2 was handed to the same
    worker meanwhile (it looked free). Kills are recorded, not done."""
    state = QueueState()
    sup = Supervisor(state, 1)
    recs = [JobRecord(seq=0, qid="", id=0, client="c", user="u", name=None, priority=100,
                      lane_key=None, timeout=t, function="f", fn_blob=b"", args_blob=b"")
            for t in (1.0, 3.0)]
    state.add("q", recs)
    w = WorkerHandle(proc=types.SimpleNamespace(pid=1234), conn=types.SimpleNamespace(close=lambda: None),
                     ready=True, last_rx=time.monotonic())
    sup.workers.append(w)
    killed = []
    sup._kill_and_record = lambda seq, proc, status, why, *rest: killed.append((seq, status, why))
    sup._queue = lambda w, buffers: None   # no channel here
    with state.cond:
        first = state.pick()
        sup._send(first, w)
        sup._apply(w, _messages(_result()), None)      # figures due
        second = state.pick()
        sup._send(second, w)                          # the worker looks free: it gets the next one
    yield state, sup, w, first, second, killed
    sup._selector.close()
    os.close(sup._wake_r)
    os.close(sup._wake_w)


def test_a_result_keeps_its_jobs_timeout_until_its_figures(handed_over):
    state, sup, w, first, second, killed = handed_over
    assert sup._has_limits() and sup._next_timeout() <= 1.0
    with state.cond:
        w.pending_deadline = 0.0   # its timeout is up while its figures are still due
        sup._enforce_limits()
    assert killed == [(first.seq, JobStatus.TIMEOUT, "timed out after 1.0 s")]  # the job, not its forgery
    assert w.dead and w.pending is None and w.seq is None
    assert second.status == JobStatus.WAITING and second.attempts == 0   # never started: in line again
    assert state.counts("q")["waiting"] == 1


def test_cancel_reaches_a_job_whose_figures_are_due(handed_over):
    state, sup, w, first, second, killed = handed_over
    assert state.cancel("q", first.id)
    with state.cond:
        sup._enforce_limits()
    assert killed == [(first.seq, JobStatus.CANCELLED, "cancelled by request")]
    assert second.status == JobStatus.WAITING


def test_the_job_handed_over_is_stopped_only_once_it_started(handed_over):
    state, sup, w, first, second, killed = handed_over
    assert state.cancel("q", second.id)
    with state.cond:
        sup._enforce_limits()
        assert not killed and state.kill_requests   # its worker is still on job 1: wait
        w.deadline = 0.0                            # and its own timeout waits too
        sup._enforce_limits()
        assert not killed
        sup._apply(w, _messages(_figures()), None)
        assert w.deadline > 0                       # its timeout counts from now
        sup._enforce_limits()
    assert state.pop_completed("q")[0]["status"] == "completed"
    assert killed == [(second.seq, JobStatus.CANCELLED, "cancelled by request")]


def test_figures_that_never_come_are_a_violation(handed_over):
    state, sup, w, first, second, killed = handed_over
    with state.cond:
        w.pending_deadline = None
        w.figures_due = 0.0
        sup._enforce_limits()
    assert len(killed) == 1 and killed[0][0] == first.seq and "no figures within" in killed[0][2]
    assert second.status == JobStatus.WAITING


def test_a_worker_that_leaves_gives_back_the_job_it_never_read(handed_over):
    state, sup, w, first, second, killed = handed_over
    with state.cond:
        sup._apply(w, _messages(_figures(leaving=True)), None)
    assert state.pop_completed("q")[0]["status"] == "completed"
    assert w.dead and w.retire_by is not None and not killed
    assert second.status == JobStatus.WAITING and second.attempts == 0
    with state.cond:
        w.retire_by = 0.0                 # still there after its grace: killed (no job)
        sup._end_retired = lambda w: killed.append(("retired", w.proc.pid))
        sup._enforce_limits()
    assert killed == [("retired", 1234)]


def test_a_death_before_the_figures_keeps_the_result_and_requeues_the_next(handed_over):
    state, sup, w, first, second, killed = handed_over
    w.proc = types.SimpleNamespace(pid=1234, exitcode=lambda timeout=0: 0, close=lambda: None,
                                   sentinel=-1)
    with state.cond:
        sup._on_death(w)
    assert state.pop_completed("q")[0]["status"] == "completed"
    assert second.status == JobStatus.WAITING


# ---------------------------------------------------------------- timers only where they are due
def test_idle_own_workers_make_no_wake_up():
    state = QueueState()
    sup = Supervisor(state, 2)
    try:
        sup.workers = [WorkerHandle(proc=types.SimpleNamespace(pid=p), conn=None, ready=True)
                       for p in (1, 2)]
        assert sup._next_timeout() is None and not sup._has_limits()
        # another user's idle worker is looked at, once an interval
        other = WorkerHandle(proc=types.SimpleNamespace(pid=3), conn=None, ready=True, uid=1000,
                             gauge=types.SimpleNamespace(cpu=lambda: (0, 0, 0)))
        sup.workers.append(other)
        sup._after_job(other, False)
        assert 0 < sup._next_timeout() <= IDLE_CHECK_INTERVAL
    finally:
        sup._selector.close()
        os.close(sup._wake_r)
        os.close(sup._wake_w)


def test_an_idle_worker_of_another_user_that_burns_cpu_is_a_violation():
    state = QueueState()
    sup = Supervisor(state, 1)
    ticks = [100]
    w = WorkerHandle(proc=types.SimpleNamespace(pid=3), conn=None, ready=True, uid=1000,
                     gauge=types.SimpleNamespace(cpu=lambda: (ticks[0], 0, 0)))
    sup.workers.append(w)
    killed = []
    sup._kill = lambda w, status, why: killed.append(why)
    try:
        with state.cond:
            sup._after_job(w, False)
            sup._check_idle(w, 0.0)          # first look: its CPU now
            ticks[0] += 1                    # a tick: nothing
            sup._check_idle(w, 1.0)
            assert not killed and w.idle_check == 1.0 + IDLE_CHECK_INTERVAL
            ticks[0] += 50                   # half a second while idle
            sup._check_idle(w, 2.0)
        assert len(killed) == 1 and "of CPU while idle" in killed[0]
    finally:
        sup._selector.close()
        os.close(sup._wake_r)
        os.close(sup._wake_w)
