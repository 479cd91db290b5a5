"""Queue control in the scheduling state alone (no processes): a waiting
job's priority re-sorts it (in its queue and in its lane), finished jobs
are forgotten on request."""

import itertools
import pickle

import pytest

from ezpq_mgr.job import JobRecord, JobStatus
from ezpq_mgr.messages import Outcome
from ezpq_mgr.server.state import QueueState


@pytest.fixture
def state():
    ticks = itertools.count(1000)
    return QueueState(clock=lambda: float(next(ticks)))


def rec(priority=100, lane=None, user="u", uid=1):
    return JobRecord(seq=0, qid="", id=0, client="c", user=user, name=None, priority=priority,
                     lane_key=None if lane is None else pickle.dumps(lane), timeout=0, function="f",
                     fn_blob=b"", args_blob=b"", uid=uid)


def run_all(state):
    order = []
    while True:
        with state.cond:
            r = state.pick()
        if r is None:
            return order
        order.append(r.id)
        state.finish(r.seq, Outcome(JobStatus.COMPLETED, 0))


def seq_of(state, qid, job_id):
    return state.queues[qid].ids[job_id]


def test_a_priority_change_re_sorts_a_waiting_job(state):
    state.add("q", [rec(5), rec(5), rec(5), rec(5)])
    assert state.set_priority(seq_of(state, "q", 3), 1)     # better: first
    assert state.set_priority(seq_of(state, "q", 1), 9)     # worse: last
    assert state.set_priority(seq_of(state, "q", 3), 1)     # the same again: nothing changes
    assert run_all(state) == [3, 2, 4, 1]
    assert [j["priority"] for j in sorted(state.pop_completed("q", 0), key=lambda j: j["id"])] == [9, 5, 1, 5]


def test_a_priority_change_back_and_forth_runs_the_job_once(state):
    state.add("q", [rec(5), rec(5)])
    s = seq_of(state, "q", 2)
    for p in (1, 9, 1):
        assert state.set_priority(s, p)
    assert run_all(state) == [2, 1]


def test_only_a_waiting_job_changes_priority(state):
    state.add("q", [rec(5), rec(5)])
    with state.cond:
        running = state.pick()
    assert not state.set_priority(running.seq, 1)
    assert running.priority == 5
    state.finish(running.seq, Outcome(JobStatus.COMPLETED, 0))
    assert not state.set_priority(running.seq, 1)
    assert not state.set_priority(12345, 1)


def test_in_a_lane_a_priority_change_reorders_the_lane(state):
    # lane a: 1, 2, 3 (equal priorities run in order); 3 made best runs first
    # in its lane, and the lane competes in its queue with its best job's priority
    state.add("q", [rec(5, lane="a"), rec(5, lane="a"), rec(5, lane="a"), rec(3)])
    assert state.set_priority(seq_of(state, "q", 3), 1)
    assert run_all(state) == [3, 4, 1, 2]


def test_a_lane_job_made_worse_lets_the_next_of_its_lane_go_first(state):
    state.add("q", [rec(5, lane="a"), rec(5, lane="a"), rec(6)])
    assert state.set_priority(seq_of(state, "q", 1), 9)   # was offered to the queue for lane a
    assert run_all(state) == [2, 3, 1]


def test_a_lane_job_changed_while_its_lane_runs(state):
    state.add("q", [rec(5, lane="a"), rec(5, lane="a"), rec(5, lane="a")])
    with state.cond:
        first = state.pick()
    assert first.id == 1
    assert state.set_priority(seq_of(state, "q", 3), 1)
    state.finish(first.seq, Outcome(JobStatus.COMPLETED, 0))
    assert run_all(state) == [3, 2]


def test_forget_finished_takes_only_that_users_done_jobs(state):
    state.add("q", [rec(uid=1), rec(uid=1), rec(uid=2, user="v"), rec(uid=1)])
    state.add("r", [rec(uid=1)])
    with state.cond:
        a = state.pick()
    state.finish(a.seq, Outcome(JobStatus.COMPLETED, 0))
    run_all(state)   # all done but none collected
    state.add("q", [rec(uid=1)])   # waiting: stays
    assert state.forget_finished(1, "q") == 3
    assert sorted(state.queues["q"].ids) == [3, 5]   # user 2's job and the waiting one
    assert state.counts("q")["completed"] == 1 and state.counts("q")["waiting"] == 1
    assert state.forget_finished(1) == 1             # queue r
    assert "r" not in state.queues or not state.queues["r"].ids
    assert [j["id"] for j in state.pop_completed("q", 0)] == [3]


def test_the_journal_keeps_a_priority_change(tmp_path):
    """A durable server journals a priority change however it meets the
    commit: for a job inserted in the same batch, for one already on disk,
    and not for one deleted in the same batch (its row must go)."""
    import os
    import sqlite3
    from ezpq_mgr.server.store import DB_NAME, Store

    class NoEnvs:
        on_env = None

        def restore_envs(self, envs, refs):
            pass

    where = str(tmp_path / "state")
    state = QueueState()
    st = Store(where)
    st.restore(state, NoEnvs())
    st.attach(state, NoEnvs())
    state.hold_queue("q")
    state.add("q", [rec(5), rec(5)])
    st.barrier()                                    # both on disk
    with state.cond:                                # one batch: the journal waits for the lock
        state.add("q", [rec(5)])
        assert state.set_priority(3, 1)             # inserted in this batch
        assert state.set_priority(1, 2)             # already on disk
        assert state.set_priority(2, 3)
        state.cancel("q", 2)
        assert len(state.pop_ids("q", [2])) == 1    # deleted in this batch
        st.handed_over([2])                         # (its client read it: the row goes)
    st.barrier()
    st.close()
    db = sqlite3.connect(os.path.join(where, DB_NAME))
    assert db.execute("SELECT seq, priority FROM jobs ORDER BY seq").fetchall() == [(1, 2), (3, 1)]
    db.close()
