"""Dependencies (``after``) in the state alone: no processes, a fake clock.

The server-side rules of dependencies.py: order, skips that cascade in the
same transition, refusals before anything changes, blocked jobs that block
nobody, cancels. The same through real servers, the CLI and a restart:
tests/test_dependencies_server.py."""

import itertools
import pickle

import pytest

from ezpq_mgr import Job
from ezpq_mgr.job import JobRecord, JobStatus, Phase
from ezpq_mgr.messages import After, Outcome, job_record
from ezpq_mgr.schema import MAX_AFTER
from ezpq_mgr.server.state import QueueState


@pytest.fixture
def state():
    ticks = itertools.count(1000)
    return QueueState(clock=lambda: float(next(ticks)))


def rec(priority=100, lane=None, ids=(), jobs=(), uid=1, job_id=0):
    return JobRecord(seq=0, qid="", id=job_id, client="c", user="u", name=None, priority=priority,
                     lane_key=None if lane is None else pickle.dumps(lane), timeout=0, function="f",
                     fn_blob=b"", args_blob=b"", uid=uid,
                     after=After(tuple(ids), tuple(jobs)) if ids or jobs else None)


def pick(state):
    with state.cond:
        return state.pick()


def end(state, r, status=JobStatus.COMPLETED, code=0):
    state.finish(r.seq, Outcome(status, code))


def run_all(state, fail=()):
    """Pick and finish jobs one at a time (ids in ``fail`` fail); the ids in run order."""
    order = []
    while True:
        r = pick(state)
        if r is None:
            return order
        order.append(r.id)
        end(state, r, *((JobStatus.FAILED, 1) if r.id in fail else (JobStatus.COMPLETED, 0)))


def status(state, qid, job_id):
    return state.job(qid, job_id)["status"]


def test_a_chain_runs_in_order_whatever_the_priorities(state):
    """3 after 2 after 1, though 3 has the best priority and 2 the worst."""
    assert state.add("q", [rec(priority=5)]) == [1]
    assert state.add("q", [rec(priority=9, ids=[1])]) == [2]
    assert state.add("q", [rec(priority=1, ids=[2])]) == [3]
    assert state.counts("q")["waiting"] == 3     # blocked jobs count as waiting
    assert run_all(state) == [1, 2, 3]
    assert [j["after"] for j in state.jobs("q")] == [None, (1,), (2,)]


def test_a_job_waits_for_all_it_names(state):
    state.add("q", [rec(), rec(), rec()])
    state.add("q", [rec(ids=[3, 1])])
    a, b = pick(state), pick(state)
    end(state, a)
    end(state, b)
    assert status(state, "q", 4) == "waiting"
    c = pick(state)
    assert c.id == 3
    assert pick(state) is None    # 4 still waits for 3
    end(state, c)
    assert pick(state).id == 4


def test_a_failed_parent_skips_child_and_grandchild_in_the_same_transition(state):
    state.add("q", [rec()])
    state.add("q", [rec(ids=[1])])
    state.add("q", [rec(ids=[2])])
    state.add("q", [rec()])                 # independent
    parent = pick(state)
    end(state, parent, JobStatus.FAILED, 3)
    child, grandchild = state.job("q", 2), state.job("q", 3)
    assert child["status"] == grandchild["status"] == "skipped"
    assert child["cancelled"] and child["exitcode"] == 3 and grandchild["exitcode"] == 3
    assert child["exception"] == ("after: job 1 (id 1 of its queue), which this job waits for, "
                                  "ended failed")
    assert grandchild["exception"].startswith("after: job 2 (id 2") and "ended skipped" in grandchild["exception"]
    assert run_all(state) == [4]
    assert state.counts("q")["waiting"] == 0


@pytest.mark.parametrize("how", ["timeout", "killed", "cancelled", "lost"])
def test_any_other_end_than_completed_skips(state, how):
    state.add("q", [rec()])
    state.add("q", [rec(ids=[1])])
    if how == "cancelled":
        assert state.cancel("q", 1)
    else:
        end(state, pick(state), JobStatus(how), -9)
    assert status(state, "q", 2) == "skipped"
    assert f"ended {how}" in state.job("q", 2)["exception"]


def test_a_retried_parent_releases_its_child_only_at_its_final_end(state):
    r = rec()
    r.retries = 1
    state.add("q", [r])
    state.add("q", [rec(ids=[1])])
    end(state, pick(state), JobStatus.FAILED, 1)       # retried: not final
    assert status(state, "q", 2) == "waiting"
    assert run_all(state) == [1, 2]


def test_a_blocked_job_blocks_nobody(state):
    """Lanes and priorities unchanged: a blocked job in a lane does not
    hold its lane, nor its better priority the queue."""
    state.add("q", [rec(priority=50)])                         # 1: runs long
    state.add("q", [rec(priority=1, lane="L", ids=[1])])       # 2: blocked
    state.add("q", [rec(priority=9, lane="L"), rec(priority=10)])   # 3, 4
    three, four, first = pick(state), pick(state), pick(state)
    assert [three.id, four.id, first.id] == [3, 4, 1]
    end(state, three)
    assert pick(state) is None          # 2 still waits for 1
    end(state, first)
    assert pick(state).id == 2


def test_already_completed_is_met_already_failed_skips_at_once(state):
    state.add("q", [rec(), rec()])
    end(state, pick(state))                              # 1 completed
    end(state, pick(state), JobStatus.FAILED, 1)         # 2 failed
    assert state.add("q", [rec(ids=[1])]) == [3]
    assert status(state, "q", 3) == "waiting" and pick(state).id == 3
    assert state.add("q", [rec(ids=[1, 2])]) == [4]
    assert status(state, "q", 4) == "skipped"


@pytest.mark.parametrize("ids,jobs,why", [
    ([5], (), "no job 5 in this queue"),
    ([3], (), "job 3 cannot wait for itself"),
    ([1], (), "job 1 of this queue is not on the server"),      # collected
    ((), [77], "no job 77 of yours"),
    ((), [2], "no job 2 of yours"),                               # another uid's
])
def test_refused_before_anything_changes(state, ids, jobs, why):
    state.add("q", [rec()])
    end(state, pick(state))
    state.pop_completed("q", 0)                                   # job 1 collected
    state.add("other", [rec(uid=2)])                              # job number 2, uid 2
    state.reserve_ids("q", 2)                                     # ids 2, 3
    before = (state.seq, state.counts("q"), len(state.records))
    with pytest.raises(ValueError, match=why):
        state.add("q", [rec(), rec(ids=ids, jobs=jobs, job_id=3)])
    assert (state.seq, state.counts("q"), len(state.records)) == before


def test_a_job_of_the_same_batch_is_not_yet_on_the_server(state):
    """Only jobs already put can be named: no cycle can ever be made."""
    first = state.reserve_ids("q", 2)
    with pytest.raises(ValueError, match="not on the server"):
        state.add("q", [rec(job_id=first), rec(job_id=first + 1, ids=[first])])
    assert state.counts("q")["submitted"] == 0


def test_job_numbers_name_jobs_of_other_queues_of_the_same_user(state):
    state.add("a", [rec()])
    state.add("b", [rec(jobs=[1])])
    assert run_all(state) == [1, 1]
    assert state.job("b", 1)["after"] == (1,)


def test_cancel_of_a_blocked_job_and_clear_waiting(state):
    state.add("q", [rec(), rec()])
    state.add("q", [rec(ids=[1]), rec(ids=[2])])
    assert state.cancel("q", 3)
    assert status(state, "q", 3) == "cancelled"
    running = pick(state)                      # 1
    assert state.cancel_all("q", running=False) == 2   # 2 and 4: each cancelled, not skipped
    assert [status(state, "q", i) for i in (2, 4)] == ["cancelled", "cancelled"]
    end(state, running)
    assert pick(state) is None and state.counts("q")["waiting"] == 0
    assert not state.unmet and not state.dependents


def test_a_long_chain_skips_without_recursion(state):
    n = 5000
    state.add("q", [rec()])
    for i in range(1, n):
        state.add("q", [rec(ids=[i])])
    end(state, pick(state), JobStatus.FAILED, 1)
    assert state.counts("q")["waiting"] == 0 and state.counts("q")["completed"] == n
    assert status(state, "q", n) == "skipped"
    assert not state.unmet and not state.dependents


def test_counts_recount_with_dependencies(state):
    """The counts _move keeps agree with the records through releases and skips."""
    state.add("q", [rec(), rec()])
    state.add("q", [rec(ids=[1]), rec(ids=[2])])
    state.add("q", [rec(ids=[3, 4])])
    end(state, pick(state))
    end(state, pick(state), JobStatus.FAILED, 1)
    run_all(state)
    q = state.queues["q"]
    phases = [r.phase for r in state.records.values()]
    assert [q.count[p] for p in Phase if p not in (Phase.NEW, Phase.GONE)] == [
        phases.count(p) for p in Phase if p not in (Phase.NEW, Phase.GONE)]
    assert q.n_done == 5
    assert [state.job("q", i)["status"] for i in range(1, 6)] == [
        "completed", "failed", "completed", "skipped", "skipped"]


# ------------------------------------------------------- the checks at the call
def test_after_is_checked_at_the_call_and_on_the_wire():
    f = print
    assert Job(f, after=[2, 1, 2]).after == (2, 1)
    assert Job(f, after=range(1, 3)).after == (1, 2)
    assert Job(f, after=[]).after is None
    for bad, kind in [("1,2", TypeError), ([1.0], TypeError), ([0], ValueError), ([True], TypeError),
                      (list(range(1, MAX_AFTER + 2)), ValueError), (7, TypeError)]:
        with pytest.raises(kind):
            Job(f, after=bad)
    base = {"client": "c", "priority": 1, "timeout": 0, "function": "f", "fn_blob": b"", "args_blob": b""}
    assert job_record({**base, "after": [3], "after_jobs": [9]}, "q", "u", 1).after == After((3,), (9,))
    assert job_record({**base, "after": []}, "q", "u", 1).after is None
    for field, bad, kind in [("after", "3", TypeError), ("after_jobs", [-1], ValueError),
                             ("after", [2 ** 63], ValueError), ("after_jobs", {"a": 1}, TypeError)]:
        with pytest.raises(kind, match=field):
            job_record({**base, field: bad}, "q", "u", 1)


def test_a_new_priority_keeps_a_blocked_job_blocked(state):
    """``ezpq priority`` of a job that waits for another: it stays blocked
    (in no heap, in a lane or not), and is released at its new priority."""
    state.add("q", [rec(), rec(priority=50)])
    state.add("q", [rec(priority=60, ids=[1]), rec(priority=60, lane="L", ids=[1])])
    assert state.set_priority(3, 1) and state.set_priority(4, 2)
    two, first = pick(state), pick(state)
    assert [two.id, first.id] == [2, 1] and pick(state) is None      # 3 and 4 still wait for 1
    end(state, first)
    assert [pick(state).id, pick(state).id] == [3, 4]
