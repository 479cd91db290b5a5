"""The scheduling state machine alone: no processes, a fake clock."""

import itertools
import pickle

import pytest

from ezpq_mgr.errors import JobNotFound, QueueFull
from ezpq_mgr.job import JobRecord, JobStatus
from ezpq_mgr.messages import KillRequest, Outcome
from ezpq_mgr.server.state import QueueState


@pytest.fixture
def state():
    ticks = itertools.count(1000)
    return QueueState(clock=lambda: float(next(ticks)))


def rec(priority=100, lane=None, user="u", client="c", stop=False, retries=0):
    return JobRecord(seq=0, qid="", id=0, client=client, user=user, name=None,
                     priority=priority, lane_key=None if lane is None else pickle.dumps(lane),
                     timeout=0, function="f", fn_blob=b"", args_blob=b"",
                     stop_on_lane_error=stop, retries=retries)


def run_all(state, exitcodes=None):
    """Pick and finish jobs one at a time; returns the ids in run order."""
    order = []
    while True:
        with state.cond:
            r = state.pick()
        if r is None:
            return order
        order.append((r.qid, r.id))
        code = (exitcodes or {}).get(r.id, 0)
        state.finish(r.seq, Outcome(JobStatus.COMPLETED if code == 0 else JobStatus.FAILED, code))


def test_priority_then_fifo(state):
    state.add("q", [rec(5), rec(1), rec(5), rec(1)])
    assert run_all(state) == [("q", 2), ("q", 4), ("q", 1), ("q", 3)]
    out = state.pop_completed("q", 0)
    assert [(j["priority"], j["id"]) for j in out] == [(1, 2), (1, 4), (5, 1), (5, 3)]


def test_times_come_from_the_clock(state):
    state.add("q", [rec()])
    with state.cond:
        r = state.pick()
    state.finish(r.seq, Outcome(JobStatus.COMPLETED, 0))
    j = state.pop_completed("q")[0]
    assert j["submitted"] < j["started"] < j["ended"] < j["processed"]


def test_lane_runs_one_at_a_time_in_priority_order(state):
    state.add("q", [rec(lane="a"), rec(lane="a", priority=1), rec(lane="b")])
    with state.cond:
        first = state.pick()
        second = state.pick()
        assert state.pick() is None  # lane a is busy, lane b started
    assert (first.id, second.id) == (2, 3)  # lane a's priority-1 job first
    state.finish(first.seq, Outcome(JobStatus.COMPLETED, 0))
    with state.cond:
        third = state.pick()
    assert third.id == 1


def test_stop_on_lane_error_skips_with_predecessor_exitcode(state):
    state.add("q", [rec(lane=0), rec(lane=0, stop=True), rec(lane=0, stop=True), rec(lane=0)])
    order = run_all(state, exitcodes={1: 3})
    assert order == [("q", 1), ("q", 4)]
    jobs = {j["id"]: j for j in state.pop_completed("q", 0)}
    assert jobs[2]["status"] == jobs[3]["status"] == "skipped"
    assert jobs[2]["exitcode"] == jobs[3]["exitcode"] == 3
    assert jobs[2]["cancelled"] and jobs[2]["started"] is None
    assert "preceding job (1)" in jobs[2]["exception"]


def test_lane_error_is_remembered_after_the_lane_emptied(state):
    state.add("q", [rec(lane="x")])
    run_all(state, exitcodes={1: 1})
    state.add("q", [rec(lane="x", stop=True)])
    assert run_all(state) == []
    assert state.job("q", 2)["status"] == "skipped"


def test_idle_lanes_are_forgotten_but_a_failed_one_is_kept(state):
    """One Lane per lane key ever used stayed for good; now a lane with
    nothing waiting or running is dropped unless its last job failed."""
    state.add("q", [rec(lane=i) for i in range(100)] + [rec(lane="bad")])
    run_all(state, exitcodes={101: 1})
    assert list(state.queues["q"].lanes) == [pickle.dumps("bad")]
    state.add("q", [rec(lane="bad", stop=True), rec(lane=0, stop=True)])
    run_all(state)
    assert state.job("q", 102)["status"] == "skipped"
    assert state.job("q", 103)["status"] == "completed"


def test_a_queue_nobody_uses_is_dropped_once_empty(state):
    """A held queue (an open connection uses it) stays, ids going on; once
    let go and empty it is forgotten but for its id counter; paused or
    capped ones are kept."""
    q = state.hold_queue("q")
    state.add("q", [rec(), rec()])
    run_all(state)
    state.pop_completed("q", 0)
    assert state.queues.get("q") is q
    assert state.add("q", [rec()]) == [3]
    state.release_queue(q)
    assert state.queues.get("q") is q   # its job is still on the server
    run_all(state)
    state.pop_completed("q", 0)
    assert "q" not in state.queues and state.queues_of == {}
    assert state.last_ids == {"q": 4}   # nothing of the old qid is left but its id counter
    assert state.add("q", [rec()]) == [4]  # no id is ever reused
    assert state.last_ids == {}
    for name, setting in (("p", {"paused": True}), ("c", {"cap": 1})):
        held = state.hold_queue(name)
        state.configure(name, **setting)
        state.release_queue(held)
        assert name in state.queues


def test_max_size_is_all_or_nothing(state):
    state.configure("q", max_size=3)
    state.add("q", [rec(), rec()])
    with pytest.raises(QueueFull):
        state.add("q", [rec(), rec()])
    assert state.counts("q")["waiting"] == 2
    state.add("q", [rec()])


def test_cancel_waiting_and_unknown(state):
    state.add("q", [rec(), rec()])
    assert state.cancel("q", 1) is True
    assert run_all(state) == [("q", 2)]
    assert state.job("q", 1)["status"] == "cancelled"
    with pytest.raises(JobNotFound):
        state.cancel("q", 99)


def test_cancel_running_asks_the_supervisor(state):
    state.add("q", [rec()])
    with state.cond:
        r = state.pick()
    assert state.cancel("q", 1) is True
    with state.cond:
        assert state.take_kill_requests() == [KillRequest(r.seq, JobStatus.CANCELLED, "cancelled by request")]


def test_paused_queue_and_cap(state):
    state.configure("p", paused=True)
    state.configure("c", cap=1)
    state.add("p", [rec()])
    state.add("c", [rec(), rec()])
    with state.cond:
        a = state.pick()
        assert state.pick() is None
    assert a.qid == "c"


def test_fair_share_between_users(state):
    state.add("qa", [rec(user="a") for _ in range(5)])
    state.add("qb", [rec(user="b")])
    with state.cond:
        first = state.pick()
        second = state.pick()
    assert (first.user, second.user) == ("a", "b")


def test_retries(state):
    state.add("q", [rec(retries=2)])
    attempts = 0
    while True:
        with state.cond:
            r = state.pick()
        if r is None:
            break
        attempts += 1
        state.finish(r.seq, Outcome(JobStatus.FAILED, 1))
    assert attempts == 3
    assert state.job("q", 1)["status"] == "failed"


def test_holding_client_counts_job_as_working_until_processed(state):
    state.open_notices("c")
    state.set_holding("c", True)
    state.add("q", [rec()])
    run_all(state)
    assert state.counts("q")["working"] == 1
    notes = state.take_notices("c", 0)
    assert [n["id"] for n in notes] == [1] and notes[0]["held"]
    state.mark_processed([(notes[0]["seq"], b"x")])
    assert state.counts("q") ["completed"] == 1
    state.close_notices("c")
    assert state.take_notices("c", 0) is None


def test_a_slot_waits_for_the_best_jobs_worker(state):
    state.add("qa", [rec(user="a"), rec(user="a")])
    state.add("qb", [rec(user="b")])
    with state.cond:
        first = state.pick()
        assert first.user == "a"
        # b is now the best (fewest running); while b's worker boots, a must not jump ahead
        assert state.pick(lambda r: r.user != "b") is None
        assert state.pick().user == "b"


def test_a_released_job_frees_its_slot_but_stays_working_until_finished(state):
    state.add("q", [rec(), rec()])
    with state.cond:
        first = state.pick()
    state.release(first.seq)  # its function returned; its figures are on their way
    counts = state.counts("q")
    assert (counts["running"], counts["working"], counts["completed"]) == (0, 1, 0)
    assert state.pop_completed("q") == []          # nothing to collect yet
    with state.cond:
        second = state.pick()                      # the slot went to the next job
    assert second is not None and state.counts("q")["running"] == 1
    state.finish(first.seq, Outcome(JobStatus.COMPLETED, 0, cpu_user=0.5))
    counts = state.counts("q")
    assert (counts["running"], counts["working"], counts["completed"]) == (1, 1, 1)
    assert state.user_running["u"] == 1
    assert state.pop_completed("q")[0]["cpu_user"] == 0.5


def _recount(state):
    """Every count, derived afresh from the records' phases."""
    from ezpq_mgr.job import Phase
    per_queue = {qid: [0] * len(Phase) for qid in state.queues}
    running, users, clients = 0, {}, {}
    for r in state.records.values():
        per_queue[r.qid][r.phase] += 1
        if r.phase is Phase.RUNNING:
            running += 1
            users[r.user] = users.get(r.user, 0) + 1
        if r.phase in (Phase.WAITING, Phase.RUNNING, Phase.RETURNED, Phase.HELD):
            clients[r.client] = clients.get(r.client, 0) + 1
    return per_queue, running, users, clients


def test_counts_always_equal_the_phases_of_the_records(state):
    """A random mix of every verb (seeded): after each step the kept counts
    equal those recounted from the records' phases, and every change went
    through the one transition hook."""
    import random
    from ezpq_mgr.job import Phase, TRANSITIONS
    rnd = random.Random(7)
    moves = []
    state.on_move = lambda r, frm, to: moves.append((frm, to))
    state.open_notices("h")
    state.set_holding("h", True)
    state.configure("q2", auto_remove=True)
    picked = []
    for step in range(3000):
        op = rnd.randrange(9)
        if op <= 1:
            state.add(rnd.choice(["q1", "q2"]), [rec(priority=rnd.randrange(3), client=rnd.choice("ch"),
                                                      user=rnd.choice("ab"), lane=rnd.choice([None, 1]),
                                                      stop=rnd.random() < 0.3, retries=rnd.randrange(2))])
        elif op == 2:
            with state.cond:
                r = state.pick()
            if r is not None:
                picked.append(r.seq)
        elif op == 3 and picked:
            state.release(rnd.choice(picked))
        elif op == 4 and picked:
            seq = picked.pop(rnd.randrange(len(picked)))
            state.finish(seq, Outcome(rnd.choice([JobStatus.COMPLETED, JobStatus.FAILED]), 0))
        elif op == 5:
            ids = list(state.queues["q1"].ids) if "q1" in state.queues else []
            if ids:
                state.cancel("q1", rnd.choice(ids))
        elif op == 6:
            notes = state.take_notices("h", 0) or []
            state.mark_processed([(n["seq"], None) for n in notes if rnd.random() < 0.7])
        elif op == 7:
            state.pop_completed(rnd.choice(["q1", "q2"]), rnd.randrange(3))
        else:
            state.take_kill_requests()
        per_queue, running, users, clients = _recount(state)
        for qid, q in state.queues.items():
            kept = [q.count[p] for p in Phase if p not in (Phase.NEW, Phase.GONE)]
            assert kept == [per_queue[qid][p] for p in Phase if p not in (Phase.NEW, Phase.GONE)], step
        assert state.n_running == running
        assert {u: n for u, n in state.user_running.items() if n} == users
        assert state.client_pending == clients
    assert set(moves) <= TRANSITIONS and len(set(moves)) >= 10  # most transitions were taken


def test_a_move_outside_the_transitions_is_refused(state):
    from ezpq_mgr.job import Phase
    state.add("q", [rec()])
    r = next(iter(state.records.values()))
    with state.cond, pytest.raises(AssertionError, match="no move from WAITING to HELD"):
        state._move(state.queues["q"], r, Phase.HELD)
    assert r.phase is Phase.WAITING


def test_a_released_job_can_still_be_cancelled(state):
    """Its result may be one the job forged while it runs on: until its
    figures arrive the supervisor can still stop it."""
    state.add("q", [rec()])
    with state.cond:
        first = state.pick()
    state.release(first.seq)
    assert state.cancel("q", first.id) is True
    assert state.take_kill_requests() == [KillRequest(first.seq, JobStatus.CANCELLED, "cancelled by request")]


@pytest.mark.parametrize("lane", [None, "L"])
def test_a_requeued_job_waits_again_first_in_line(state, lane):
    state.add("q", [rec(lane=lane), rec(lane=lane)])
    with state.cond:
        first = state.pick()
    state.requeue(first.seq)   # its worker was killed before it ever read it
    counts = state.counts("q")
    assert (counts["waiting"], counts["running"], state.n_running) == (2, 0, 0)
    assert state.user_running["u"] == 0
    assert (first.status, first.attempts, first.started, first.pid) == (JobStatus.WAITING, 0, None, None)
    assert run_all(state) == [("q", first.id), ("q", first.id + 1)]
    assert state.records[first.seq].attempts == 1


def test_a_requeued_job_that_was_asked_to_stop_ends_so(state):
    state.add("q", [rec()])
    with state.cond:
        first = state.pick()
    assert state.cancel("q", first.id)
    state.requeue(first.seq)
    job = state.pop_completed("q")[0]
    assert job["status"] == "cancelled" and state.take_kill_requests() == []
    assert state.counts("q")["working"] == 0 and state.n_running == 0


def test_one_owners_lanes_kept_for_a_failure_are_capped(monkeypatch):
    """A shared server's user keeps at most MAX_FAILED_LANES lanes only for
    their failure (fifth attack pass: 1,000 failing lanes of 64 KiB keys grew
    a root server by 98 MiB, without end): past it her oldest is forgotten
    (a stop_on_lane_error job put there later runs), another user's are not
    touched, and a lane whose later job succeeded no longer counts."""
    from ezpq_mgr.server import scheduling
    monkeypatch.setattr(scheduling, "MAX_FAILED_LANES", 3)
    ticks = itertools.count(1000)
    state = QueueState(clock=lambda: float(next(ticks)))
    state.owner_of = lambda qid: qid.partition(":")[0]
    state.add("b:q", [rec(lane="b0", user="b")])
    run_all(state, exitcodes={1: 1})
    state.add("a:q", [rec(lane=f"a{i}", user="a") for i in range(4)])
    run_all(state, exitcodes={1: 1, 2: 1, 3: 1, 4: 1})     # four lanes fail: a0, the oldest, is forgotten
    assert set(state.queues["a:q"].lanes) == {pickle.dumps(f"a{i}") for i in (1, 2, 3)}
    state.add("a:q", [rec(lane="a1", user="a")])            # a1 succeeds: no longer kept for a failure
    run_all(state)
    assert list(state.failed_lanes_of["a"]) == [("a:q", pickle.dumps("a2")), ("a:q", pickle.dumps("a3"))]
    state.add("a:r", [rec(lane="a5", user="a")])            # another queue of hers counts the same
    run_all(state, exitcodes={1: 1})
    assert list(state.failed_lanes_of["a"])[-1] == ("a:r", pickle.dumps("a5"))
    assert len(state.failed_lanes_of["a"]) == 3
    state.add("a:q", [rec(lane="a0", user="a", stop=True), rec(lane="a2", user="a", stop=True)])
    run_all(state)
    assert state.job("a:q", 6)["status"] == "completed"     # a0 was forgotten: its job runs
    assert state.job("a:q", 7)["status"] == "skipped"       # a2 is still kept
    assert list(state.failed_lanes_of["b"]) == [("b:q", pickle.dumps("b0"))]
    state.add("b:q", [rec(lane="b0", user="b", stop=True)])
    run_all(state)
    assert state.job("b:q", 2)["status"] == "skipped"
    assert state.failed_lane_bytes == {"a": 3 * len(pickle.dumps("a2")), "b": len(pickle.dumps("b0"))}


def test_one_owners_lanes_kept_for_a_failure_are_capped_in_bytes_too(monkeypatch):
    """Lane keys are up to 64 KiB: past MAX_FAILED_LANE_BYTES of them, the
    owner's oldest failed lanes are forgotten even below MAX_FAILED_LANES."""
    from ezpq_mgr.server import scheduling
    monkeypatch.setattr(scheduling, "MAX_FAILED_LANE_BYTES", 250_000)
    state = QueueState(clock=lambda: 0.0)
    state.owner_of = lambda qid: qid.partition(":")[0]
    big = [b"%d" % i + b"k" * (64 * 1024) for i in range(5)]
    jobs = [rec(user="a") for _ in big]
    for job, key in zip(jobs, big):
        job.lane_key = key
    state.add("a:q", jobs)
    run_all(state, exitcodes={i: 1 for i in range(1, 6)})
    assert list(state.queues["a:q"].lanes) == big[2:]      # 3 keys of 64 KiB fit in 250,000 bytes
    assert state.failed_lane_bytes["a"] == sum(map(len, big[2:]))
