"""store.py alone, in this process: the journal fed by QueueState, group
commits, the restore's rules, the schema version and its migration path."""

import os
import shutil
import sqlite3
import tempfile
import threading
import time

import pytest

from ezpq_mgr.server import store as store_mod
from ezpq_mgr.job import JobRecord, JobStatus, Phase
from ezpq_mgr import messages
from ezpq_mgr.messages import Outcome
from ezpq_mgr.server.state import QueueState
from ezpq_mgr.server.store import Store, StoreError


class FakeService:
    """What the store asks of the Service: environments."""

    def __init__(self):
        self.envs, self.refs, self.on_env = {}, {}, None

    def restore_envs(self, envs, refs):
        self.envs, self.refs = envs, refs


@pytest.fixture
def where():
    d = tempfile.mkdtemp(prefix="ezpq-store-")
    yield os.path.join(d, "state")
    shutil.rmtree(d, ignore_errors=True)


def _rec(qid="q", priority=100, lane=None, retries=0, name=None, client="c" * 32):
    return JobRecord(seq=0, qid=qid, id=0, client=client, user="u", name=name, priority=priority,
                     lane_key=lane, timeout=0, function="f", fn_blob=b"F", args_blob=b"A",
                     retries=retries, uid=0)


def _open(where, clock=None):
    state = QueueState(clock=clock) if clock else QueueState()
    st = Store(where)
    st.restore(state, FakeService())
    st.attach(state, FakeService())
    return st, state


def test_concurrent_puts_share_commits(where):
    """Puts that arrive while a commit is written go in the next one, together:
    far fewer commits than puts, and every acknowledged job is in the file."""
    st, state = _open(where)
    n_threads, n_puts = 8, 200

    def putter(i):
        for _ in range(n_puts):
            state.add(f"q{i}", [_rec(f"q{i}")])
            st.barrier()   # what the serving thread does before it replies

    threads = [threading.Thread(target=putter, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert st.batches < n_threads * n_puts / 2
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == n_threads * n_puts
    assert db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0] == n_threads * n_puts
    db.close()


def test_a_job_put_and_collected_within_one_commit_never_reaches_the_file(where):
    st, state = _open(where)
    state.hold_queue("q")   # a client uses it: kept, with its id counter
    with state.cond:   # the journal thread cannot take the batch until we let go
        state.add("q", [_rec()])
        rec = state.pick()
        state.finish(rec.seq, Outcome(JobStatus.COMPLETED, 0, output_blob=b"out"))
        assert len(state.pop_completed("q", 0)) == 1
        st.handed_over([rec.seq])   # the client's next request: it read the result
    st.barrier()
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert db.execute("SELECT next_id FROM queues WHERE qid='q'").fetchone()[0] == 2
    db.close()


def test_restore_keeps_order_results_and_ends_running_jobs(where):
    """Waiting jobs come back in (priority, submission) and lane order;
    a running job is lost or waits again (retries left; attempts kept);
    a held job is done; a collected one is gone; ids continue."""
    now = [1000.0]
    st, state = _open(where, clock=lambda: now[0])
    state.open_notices("client")
    state.set_holding("client", True)
    state.add("q", [_rec(name="done"), _rec(name="held", client="client"), _rec(name="run", retries=0),
                    _rec(name="retry", retries=1), _rec(name="gone")])
    done, held, run, retry, gone = (state.pick() for _ in range(5))
    state.finish(done.seq, Outcome(JobStatus.COMPLETED, 0, output_blob=b"42"))
    state.finish(gone.seq, Outcome(JobStatus.COMPLETED, 0))
    state.pop_ids("q", [gone.id])
    st.handed_over([gone.seq])   # its client read it (its next request)
    state.finish(held.seq, Outcome(JobStatus.FAILED, 1, exception="boom"))
    assert held.phase is Phase.HELD
    state.add("q", [_rec(priority=5, name="w-late-but-first"), _rec(name="w2"),
                    _rec(lane=b"L", name="lane1"), _rec(lane=b"L", name="lane2")])
    state.reserve_ids("q", 10)          # ids handed to a client: never again
    st.barrier()
    st.close()   # all committed: what a SIGKILL now would leave

    now[0] = 2000.0
    st2, state2 = _open(where, clock=lambda: now[0])
    q = state2.queues["q"]
    by_name = {r.name: r for r in state2.records.values()}
    assert "gone" not in by_name
    assert by_name["done"].status is JobStatus.COMPLETED and by_name["done"].output_blob == b"42"
    assert by_name["done"].phase is Phase.DONE and by_name["done"].processed == 1000.0
    assert by_name["held"].phase is Phase.DONE and by_name["held"].exception == "boom"
    assert by_name["run"].status is JobStatus.LOST and "restarted" in by_name["run"].exception
    assert by_name["retry"].phase is Phase.WAITING and by_name["retry"].attempts == 1
    order = []
    while True:
        rec = state2.pick()
        if rec is None:
            break
        order.append(rec.name)
        if rec.lane_key is not None:
            state2.finish(rec.seq, Outcome(JobStatus.COMPLETED, 0))
    assert order == ["w-late-but-first", "retry", "w2", "lane1", "lane2"]
    assert state2.seq == 9 and q.next_id == 20
    assert state2.add("q", [_rec()]) == [20]
    st2.close()


def test_schema_version_migrates_older_and_refuses_newer(where, monkeypatch):
    st = Store(where)
    st.close()
    calls = []
    v = store_mod.SCHEMA_VERSION

    def next_version(db):
        db.execute("ALTER TABLE jobs ADD COLUMN note TEXT")
        calls.append(v)

    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", v + 1)
    monkeypatch.setitem(store_mod.MIGRATIONS, v, next_version)
    Store(where).close()
    assert calls == [v]
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("PRAGMA user_version").fetchone()[0] == v + 1
    db.close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", v)
    with pytest.raises(StoreError, match=f"schema version {v + 1}"):
        Store(where)


def test_a_version_1_database_migrates_and_keeps_its_jobs(where):
    """Version 1 had no ``ids`` table (dropped queues' id counters): opened,
    it gains one, and its jobs and counters are restored."""
    st, state = _open(where)
    state.add("q", [_rec(), _rec()])
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    db.execute("DROP TABLE ids")
    db.execute("ALTER TABLE jobs DROP COLUMN after")   # version 3's
    db.execute("DROP TABLE lanes")                     # version 4's
    db.execute("PRAGMA user_version=1")
    db.close()
    st2, state2 = _open(where)
    assert state2.queues["q"].next_id == 3 and len(state2.records) == 2
    assert state2.add("q", [_rec()]) == [3]
    st2.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
    assert db.execute("SELECT count(*) FROM ids").fetchone()[0] == 0
    db.close()


def test_a_version_2_database_migrates_and_its_jobs_wait_for_none(where):
    """Version 2 had no ``after`` column: opened, it gains one (NULL: the
    job waits for nothing), its jobs run as before."""
    st, state = _open(where)
    state.add("q", [_rec(), _rec()])
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    db.execute("ALTER TABLE jobs DROP COLUMN after")
    db.execute("DROP TABLE lanes")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    st2, state2 = _open(where)
    assert [r.after for r in state2.records.values()] == [None, None]
    with state2.cond:
        assert state2.pick().id == 1 and state2.pick().id == 2
    st2.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
    db.close()


def test_a_restore_keeps_what_a_job_waits_for(where):
    """A blocked job stays blocked (its parent ends after the restore: it
    runs then); one whose parent ended lost in the restore is skipped; one
    whose parent completed and was collected before the restart runs."""
    st, state = _open(where)
    state.add("q", [_rec(), _rec(), _rec()])           # 1 waits; 2 will run; 3 completes
    for seq in (1, 2, 3):
        state.records[seq].after = None
    dep = [_rec(), _rec(), _rec()]
    for r, parent in zip(dep, (1, 2, 3)):
        r.after = messages.After((parent,), ())
    with state.cond:
        three = state.pick()
    assert three.id == 1     # all equal: FIFO
    state.finish(three.seq, Outcome(JobStatus.COMPLETED, 0))
    with state.cond:
        running = state.pick()                          # 2 runs at the restart
    for r in dep:
        state.add("q", [r])                             # 4 after 1 (done), 5 after 2, 6 after 3
    assert [state.job("q", i)["status"] for i in (4, 5, 6)] == ["waiting"] * 3
    state.pop_ids("q", [1])                             # 1 collected
    st.close()
    assert running.id == 2
    st2, state2 = _open(where)
    assert state2.job("q", 5)["status"] == "skipped" and "ended lost" in state2.job("q", 5)["exception"]
    assert state2.records[6].after == (3,) and state2.unmet == {6: 1}
    with state2.cond:
        order = [state2.pick().id, state2.pick().id]
        assert state2.pick() is None                    # 6 waits for 3
    assert order == [3, 4]
    state2.finish(state2.records[3].seq, Outcome(JobStatus.COMPLETED, 0))
    with state2.cond:
        assert state2.pick().id == 6
    st2.close()


def test_a_dropped_queue_keeps_its_id_counter(where):
    """A named queue dropped (idle, empty) and named again continues its
    ids, in memory and after a restore; a private queue disposed of by its
    client (``_drop_if_empty``) costs nothing."""
    st, state = _open(where)
    q = state.hold_queue("named")
    assert state.add("named", [_rec(), _rec()]) == [1, 2]
    assert len(state.pop_completed("named", 0)) == 0
    state.cancel_all("named")
    got = state.pop_completed("named", 0)
    assert len(got) == 2
    st.handed_over([j["seq"] for j in got])   # its client read them
    state.release_queue(q)
    assert "named" not in state.queues and state.last_ids == {"named": 3}
    p = state.hold_queue("private")
    state.reserve_ids("private", 10)
    with state.cond:
        state._drop_if_empty("private")
    state.release_queue(p)
    assert "private" not in state.queues and "private" not in state.last_ids
    st.barrier()
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("SELECT qid, next_id FROM ids").fetchall() == [("named", 3)]
    assert db.execute("SELECT count(*) FROM queues").fetchone()[0] == 0
    db.close()
    st2, state2 = _open(where)
    assert state2.last_ids == {"named": 3} and not state2.queues
    q = state2.hold_queue("named")
    assert state2.add("named", [_rec()]) == [3]
    assert state2.last_ids == {}
    state2.cancel_all("named")
    st2.handed_over([j["seq"] for j in state2.pop_completed("named", 0)])
    state2.release_queue(q)
    assert state2.last_ids == {"named": 4}
    st2.close()
    st3, state3 = _open(where)
    assert state3.add("named", [_rec()]) == [4]
    st3.close()


# ------------------------------------------------------------ lanes
def test_one_owners_kept_id_counters_are_capped_into_a_floor(where, monkeypatch):
    """Past ``MAX_KEPT_IDS`` dropped queues of one owner (a shared server's
    "uid:qid"), her oldest counter goes into her floor ("uid:\\0"), where
    her new queues start: bounded, and no id reused, after a restore too."""
    from ezpq_mgr.server import state as state_mod
    monkeypatch.setattr(state_mod, "MAX_KEPT_IDS", 3)
    st, state = _open(where)
    state.owner_of = lambda qid: qid.partition(":")[0]
    for i in range(5):
        q = state.hold_queue(f"7:q{i}")
        state.reserve_ids(f"7:q{i}", 10 + i)
        state.release_queue(q)
    q = state.hold_queue("8:other")
    state.reserve_ids("8:other", 1)
    state.release_queue(q)
    assert state.last_ids == {"7:q2": 13, "7:q3": 14, "7:q4": 25, "7:\0": 12, "8:other": 2}
    st.barrier()
    st.close()
    st2, state2 = _open(where)
    state2.owner_of = lambda qid: qid.partition(":")[0]
    assert state2.last_ids == {"7:q2": 13, "7:q3": 14, "7:q4": 25, "7:\0": 12, "8:other": 2}
    assert state2.reserve_ids("7:q0", 1) == 12   # forgotten by name: from the floor, past its 10 ids
    assert state2.reserve_ids("7:q3", 1) == 14
    assert state2.reserve_ids("8:new", 1) == 1
    st2.close()


def _fail_lane_then_collect(st, state, lane=b"L"):
    """A lane's job runs and fails, and is collected: only the lane's memory is left."""
    state.add("q", [_rec(lane=lane)])
    with state.cond:
        rec = state.pick()
    state.finish(rec.seq, Outcome(JobStatus.FAILED, 3, exception="boom"))
    assert [j["id"] for j in state.pop_completed("q", 0)] == [rec.id]
    st.handed_over([rec.seq])
    return rec


def test_a_lane_remembers_its_failed_job_across_a_restart(where):
    """stop_on_lane_error after a restart: the lane's last job failed (and
    was collected) before it; the next stop_on_lane_error job of the lane
    is skipped with that job's exit code, not run."""
    st, state = _open(where)
    failed = _fail_lane_then_collect(st, state)
    st.close()
    st2, state2 = _open(where)
    nxt = _rec(lane=b"L")
    nxt.stop_on_lane_error = True
    state2.add("q", [nxt])
    rec = state2.records[nxt.seq]
    assert (rec.status, rec.exitcode) == (JobStatus.SKIPPED, 3)
    assert f"preceding job ({failed.id}) exit code is 3" in rec.exception
    st2.close()


def test_one_owners_lanes_kept_for_a_failure_stay_capped_across_a_restart(where, monkeypatch):
    """A shared server's user keeps at most MAX_FAILED_LANES lanes for a
    failure: the one forgotten past it loses its row too, and a restore
    counts the kept ones again (else each restart would let her keep as
    many more)."""
    from ezpq_mgr.server import scheduling
    monkeypatch.setattr(scheduling, "MAX_FAILED_LANES", 2)
    state = QueueState()
    state.owner_of = lambda qid: qid.partition(":")[0]
    st = Store(where)
    st.restore(state, FakeService())
    st.attach(state, FakeService())
    for lane in (b"L0", b"L1", b"L2"):
        state.add("7:q", [_rec(qid="7:q", lane=lane)])
        with state.cond:
            rec = state.pick()
        state.finish(rec.seq, Outcome(JobStatus.FAILED, 3, exception="boom"))
        state.pop_completed("7:q", 0)
        st.handed_over([rec.seq])
    assert set(state.queues["7:q"].lanes) == {b"L1", b"L2"}
    st.close()
    state2 = QueueState()
    state2.owner_of = lambda qid: qid.partition(":")[0]
    st2 = Store(where)
    st2.restore(state2, FakeService())
    st2.attach(state2, FakeService())
    assert set(state2.queues["7:q"].lanes) == {b"L1", b"L2"}
    assert list(state2.failed_lanes_of["7"]) == [("7:q", b"L1"), ("7:q", b"L2")]
    st2.close()


def test_a_lane_whose_later_job_succeeded_forgets_the_failure(where):
    st, state = _open(where)
    _fail_lane_then_collect(st, state)
    state.add("q", [_rec(lane=b"L")])
    with state.cond:
        rec = state.pick()
    state.finish(rec.seq, Outcome(JobStatus.COMPLETED, 0))
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("SELECT count(*) FROM lanes").fetchone()[0] == 0
    db.close()
    st2, state2 = _open(where)
    nxt = _rec(lane=b"L")
    nxt.stop_on_lane_error = True
    state2.add("q", [nxt])
    assert state2.records[nxt.seq].phase is Phase.WAITING
    st2.close()


def test_a_lane_whose_running_job_came_back_lost_forgets_the_failure(where):
    """Its last job is the lost one now (a lost job is no failure): the
    next stop_on_lane_error job runs; the row is gone after the restore."""
    st, state = _open(where)
    _fail_lane_then_collect(st, state)
    state.add("q", [_rec(lane=b"L")])
    with state.cond:
        state.pick()
    st.close()   # a restart with that job running
    st2, state2 = _open(where)
    assert [r.status for r in state2.records.values()] == [JobStatus.LOST]
    nxt = _rec(lane=b"L")
    nxt.stop_on_lane_error = True
    state2.add("q", [nxt])
    assert state2.records[nxt.seq].phase is Phase.WAITING
    st2.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("SELECT count(*) FROM lanes").fetchone()[0] == 0
    db.close()


def test_a_version_3_database_migrates_with_no_lane_remembered(where):
    st, state = _open(where)
    state.add("q", [_rec(lane=b"L")])
    st.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    db.execute("DROP TABLE lanes")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    st2, state2 = _open(where)
    with state2.cond:
        assert state2.pick().id == 1
    st2.close()
    db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
    assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION == 4
    assert db.execute("SELECT count(*) FROM lanes").fetchone()[0] == 0
    db.close()


# ------------------------------------------------------------ coalescing
def test_moves_nobody_waits_for_share_a_commit_and_a_reply_is_not_held(where, monkeypatch):
    """A job's start and end, with no reply waiting for them, go to disk in
    one commit (the journal waits up to COALESCE for more); a reply that
    waits (barrier) is committed at once, not after the window."""
    monkeypatch.setattr(store_mod, "COALESCE", 30.0)
    st, state = _open(where)
    try:
        state.add("q", [_rec()])
        st.barrier()   # a put's reply: at once, though the window is 30 s
        before = st.batches
        with state.cond:
            rec = state.pick()
        time.sleep(0.05)   # the start alone would be a commit of its own without the window
        state.finish(rec.seq, Outcome(JobStatus.COMPLETED, 0, output_blob=b"out"))
        started = time.monotonic()
        st.barrier()
        assert time.monotonic() - started < 5, "a waiting reply was held by the window"
        assert st.batches == before + 1, "the start and the end were not one commit"
        db = sqlite3.connect(os.path.join(where, store_mod.DB_NAME))
        assert db.execute("SELECT status FROM jobs").fetchall() == [("completed",)]
        db.close()
    finally:
        st.close()


def test_a_result_handed_out_stays_on_disk_until_its_client_read_it(where):
    """get/collect take a result from the state at once, but its row stays
    until the client's next request says it read the reply (handed_over):
    a restart in between brings the result back."""
    st, state = _open(where)
    state.add("q", [_rec()])
    with state.cond:
        rec = state.pick()
    state.finish(rec.seq, Outcome(JobStatus.COMPLETED, 0, output_blob=b"out"))
    assert [j["seq"] for j in state.pop_completed("q", 0)] == [rec.seq]
    st.barrier()
    st.close()   # a restart before the client read it
    st2, state2 = _open(where)
    assert [r.seq for r in state2.records.values()] == [rec.seq]
    assert state2.pop_completed("q", 0)[0]["output_blob"] == b"out"
    st2.handed_over([rec.seq])
    st2.barrier()
    st2.close()
    st3, state3 = _open(where)
    assert state3.records == {}
    st3.close()
