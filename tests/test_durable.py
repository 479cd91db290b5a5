"""A server with ``--state-dir``: restarts (SIGTERM, SIGKILL, five SIGKILLs
at random moments), and the state dir refused when it cannot be used
(locked, damaged, another version, unwritable, disk full)."""

import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.client.connection import Remote
from ezpq_mgr.server.store import DB_NAME, SCHEMA_VERSION
from jobs import fail, return_me, sleep_for
from server_fixture import terminate

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")


class Durable:
    """An ezpq-server on a Unix socket with a state dir, started and
    restarted on the same files; the test's own temp dir, removed by ``close``."""

    def __init__(self, workers=1, state_dir=None, extra=(), stateless=False):
        self.dir = tempfile.mkdtemp(prefix="ezpq-durable-")
        self.keyfile = os.path.join(self.dir, "key")
        self.address = os.path.join(self.dir, "s.sock")
        self.state_dir = state_dir or os.path.join(self.dir, "state")
        self.cmd = [sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()",
                    "--socket", self.address, "--workers", str(workers), "--authkey-file", self.keyfile,
                    "--log-level", "WARNING", *([] if stateless else ["--state-dir", self.state_dir]), *extra]
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.cmd, env=dict(os.environ, TMPDIR=self.dir))   # its temp files too
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "ezpq-server exited during start-up"
            assert time.monotonic() < deadline, "ezpq-server did not start"
            try:
                self.key = open(self.keyfile, "rb").read().strip()
                Remote(self.address, self.key).call("info")
                return self
            except Exception:
                time.sleep(0.02)

    def run(self, *extra):
        """Start it in the foreground and expect a refusal: (exit code, stderr)."""
        p = subprocess.run(self.cmd + list(extra), capture_output=True, text=True, timeout=60)
        return p.returncode, p.stderr

    def kill(self, sig):
        if sig == signal.SIGTERM:
            assert terminate(self.proc) == 0
        else:
            self.proc.send_signal(sig)
            self.proc.wait(15)

    def queue(self, qid, **kw):
        return ezpq.Queue(address=self.address, authkey=self.key, qid=qid, **kw)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def durable():
    servers = []

    def make(**kw):
        servers.append(Durable(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _wait_until(cond, limit=30.0, what="condition"):
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("sig,sync", [(signal.SIGTERM, "normal"), (signal.SIGKILL, "normal"),
                                      (signal.SIGKILL, "full")], ids=["SIGTERM", "SIGKILL", "SIGKILL-sync-full"])
def test_restart_keeps_waiting_jobs_and_uncollected_results(durable, sig, sync):
    """20 jobs: 3 collected, 3 completed-uncollected, 1 running, 13 waiting;
    a restart on the same dir gives a new client exactly the other 17:
    results unchanged (not run again), the running one lost, the waiting ones run."""
    s = durable(workers=1, extra=["--sync", sync]).start()
    Q = s.queue("r")
    ids = [Q.put(return_me, i) for i in range(6)]
    ids.append(Q.put(sleep_for, 60))
    ids += [Q.put(return_me, i) for i in range(7, 20)]
    assert ids == list(range(1, 21))
    _wait_until(lambda: Q.size(completed=True) == 6 and Q.size(working=True) == 1, what="6 done, 1 running")
    got = Q.collect(3)
    assert sorted(j["id"] for j in got) == [1, 2, 3]
    before = {j["id"]: j for j in Q.jobs()}

    # a client blocked in get(wait=True) hears of the server's death within 1 s
    blocked = ezpq.Queue(address=s.address, authkey=s.key, qid="blocked")
    blocked.put(sleep_for, 60)
    heard = []

    def block():
        try:
            blocked.get(wait=True)
        except ezpq.ConnectionError:
            heard.append(time.monotonic())

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.2)   # let it park on the server (nothing to wait for: it must still be blocked)
    assert t.is_alive()
    killed = time.monotonic()
    s.kill(sig)
    t.join(5)
    assert heard and heard[0] - killed < 1.0, "a blocked get did not raise ConnectionError within 1 s"

    s.start()
    blocked2 = s.queue("blocked")
    assert blocked2.cancel(1)
    Q2 = s.queue("r")
    assert Q2.wait(timeout=60) == 0
    after = {j["id"]: j for j in Q2.collect()}
    assert sorted(after) == list(range(4, 21)), "no id lost, none duplicated, collected ones gone"
    for i in (4, 5, 6):   # completed before: unchanged, not run again
        assert after[i]["status"] == "completed" and after[i]["output"] == i - 1
        assert after[i]["started"] == before[i]["started"] and after[i]["ended"] == before[i]["ended"]
    assert after[7]["status"] == "lost"
    assert ("stopped" if sig == signal.SIGTERM else "restarted") in after[7]["exception"]
    assert all(after[i]["status"] == "completed" and after[i]["output"] == i - 1 for i in range(8, 21))
    assert Q2.put(return_me, 0) == 21, "ids continue after the restart"
    Q2.wait(timeout=30)
    Q2.collect()
    blocked2.dispose()
    Q2.dispose()


def _get_then_kill_before_the_removal_commits(s, Q):
    """Q.get() a completed job while the test holds the database's write
    lock (the journal cannot commit the job's removal), then SIGKILL the
    server and restart it. Returns what get() returned."""
    _wait_until(lambda: sqlite3.connect(os.path.join(s.state_dir, DB_NAME)).execute(
        "SELECT count(*) FROM jobs WHERE status='completed'").fetchone()[0] == 1, what="the result on disk")
    blocker = sqlite3.connect(os.path.join(s.state_dir, DB_NAME), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(Q.get(wait=True, timeout=10)))
        t.start()
        t.join(4)   # under the journal's 5 s busy timeout
        assert got and got[0] is not None, "get() waited for its removal's commit"
        s.kill(signal.SIGKILL)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    s.start()
    return got[0]


def test_a_result_handed_out_before_a_kill_reaches_each_process_once(durable):
    """At least once, and once per process: a result handed over just
    before a SIGKILL whose removal was not yet on disk is on the server
    again after the restart; the process that had it does not get it a
    second time, another process does (nothing is lost)."""
    s = durable(workers=1).start()
    Q = s.queue("once")
    job_id = Q.put(return_me, 7)
    assert Q.wait(timeout=30) == 0
    assert _get_then_kill_before_the_removal_commits(s, Q)["output"] == 7
    Q2 = s.queue("once")
    assert [j["id"] for j in Q2.jobs()] == [job_id], "the job is not on the server again"
    assert Q2.get() is None and Q2.collect() == [], "this process was handed the result twice"
    assert Q2.size() == 0
    job_id = Q2.put(return_me, 8)
    assert Q2.wait(timeout=30) == 0
    assert _get_then_kill_before_the_removal_commits(s, Q2)["output"] == 8
    again = Remote(s.address, s.key).call("get", "once", False, 0)   # as another process would
    assert again is not None and (again["id"], again["status"]) == (job_id, "completed"), \
        "the result handed out before the kill is lost"
    s.queue("once").dispose()


def test_buffered_puts_are_committed_once_flush_returns(durable):
    """Queue(buffer_puts=True) on a durable server: put returns at once
    with its id, and once flush() returns every job is committed: a SIGKILL
    right after loses none, and none is there twice."""
    s = durable(workers=1).start()
    Q = s.queue("buf", buffer_puts=True, auto_start=False)
    ids = [Q.put(return_me, i) for i in range(300)]
    assert ids == list(range(1, 301))
    Q.flush()
    s.kill(signal.SIGKILL)
    s.start()
    Q2 = s.queue("buf")
    assert Q2.size(waiting=True) == 300
    Q2.start()
    assert Q2.wait(timeout=60) == 0
    got = Q2.collect()
    assert sorted(j["id"] for j in got) == ids and sorted(j["output"] for j in got) == list(range(300))
    Q2.dispose()


def test_buffer_puts_is_checked_at_the_call(durable):
    s = durable().start()
    with pytest.raises(TypeError, match="buffer_puts"):
        s.queue("x", buffer_puts="yes")
    with pytest.raises(ValueError, match="max_size"):
        s.queue("x", buffer_puts=True, max_size=5)


def test_stop_on_lane_error_holds_across_a_sigkill(durable):
    """A lane's job failed and was collected; the server is SIGKILLed and
    restarted; the lane's next stop_on_lane_error job is skipped, not run."""
    s = durable(workers=1).start()
    Q = s.queue("lanes")
    Q.put(fail, lane="L")
    assert Q.wait(timeout=30) == 0
    first = Q.collect()
    assert [j["status"] for j in first] == ["failed"]
    s.kill(signal.SIGKILL)
    s.start()
    Q2 = s.queue("lanes")
    Q2.put(return_me, 1, lane="L", stop_on_lane_error=True)
    assert Q2.wait(timeout=30) == 0
    got = Q2.collect()
    assert [j["status"] for j in got] == ["skipped"], got
    assert f"preceding job ({first[0]['id']})" in got[0]["exception"]
    Q2.dispose()


def test_retries_run_again_after_a_restart(durable):
    """A job running at a SIGKILL runs again when it has retries left (attempts counts)."""
    s = durable(workers=1).start()
    Q = s.queue("retry")
    marker = os.path.join(s.dir, "ran")
    Q.put(_touch_then_sleep, [marker, 60], retries=1)
    _wait_until(lambda: os.path.exists(marker), what="the job to start")
    os.unlink(marker)
    s.kill(signal.SIGKILL)
    s.start()
    Q2 = s.queue("retry")
    _wait_until(lambda: os.path.exists(marker), what="the job to run again")
    job = Q2.jobs()[0]
    assert job["status"] == "working" and job["attempts"] == 2
    Q2.cancel(job["id"])
    Q2.wait(timeout=30)
    assert Q2.collect()[0]["status"] == "cancelled"
    Q2.dispose()


def _touch_then_sleep(path, seconds):
    open(path, "w").close()
    time.sleep(seconds)


def test_chaos_five_sigkills(durable):
    """3 clients put 200 jobs (half with retries=1) while the server is
    SIGKILLed 5 times at random moments and restarted: every acknowledged
    job is collected exactly once, no id twice, and only jobs without
    retries left come back lost (at most one per kill per worker)."""
    workers, kills = 2, 5
    s = durable(workers=workers).start()
    up = threading.Event()
    up.set()
    n = {0: 67, 1: 67, 2: 66}
    results = {}

    def client(i):
        qid, todo = f"chaos{i}", list(range(n[i]))
        acked, collected, unacked = {}, [], 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            up.wait(60)
            try:
                Q = s.queue(qid)
                while todo:
                    k = todo.pop(0)   # one try per job: an unacknowledged put may or may not be in
                    try:
                        acked[Q.put(sleep_for, random.uniform(0, 0.03), name=f"{i}-{k}", retries=k % 2)] = k
                    except ezpq.ConnectionError:
                        unacked += 1
                        raise
                while Q.size() > 0:   # (a get with a timeout on a shared qid waits for arrivals)
                    job = Q.get(wait=True, timeout=30)
                    if job is not None:
                        collected.append(job)
                results[i] = (acked, collected, unacked)
                Q.detach()
                return
            except (ezpq.ConnectionError, ezpq.ServerError):
                time.sleep(0.05)   # the server is down: wait for it to be up again
        results[i] = None

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    rng = random.Random()
    for _ in range(kills):
        time.sleep(rng.uniform(0.2, 1.0))
        up.clear()
        s.kill(signal.SIGKILL)
        s.start()
        up.set()
    for t in threads:
        t.join(300)
    assert all(results.get(i) is not None for i in range(3)), "a client did not finish"
    lost = 0
    for i, (acked, collected, unacked) in results.items():
        ids = [j["id"] for j in collected]
        assert len(ids) == len(set(ids)), f"client {i}: an id collected twice"
        assert set(acked) <= set(ids), f"client {i}: acknowledged jobs missing {set(acked) - set(ids)}"
        names = [j["name"] for j in collected]
        assert len(names) == len(set(names)), f"client {i}: a job ran as two"
        assert len(ids) - len(acked) <= unacked
        for j in collected:
            assert j["status"] in ("completed", "lost"), j
            if j["status"] == "lost":
                lost += 1
                assert j["retries"] == 0 or j["attempts"] > j["retries"], j
    assert lost <= kills * workers


# ------------------------------------------------------------ refusals
def test_a_second_server_on_the_same_dir_refuses(durable):
    first = durable().start()
    second = Durable(state_dir=first.state_dir)
    try:
        code, err = second.run()
    finally:
        second.close()
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "in use by another ezpq-server" in err and str(first.proc.pid) in err


def test_state_dir_and_database_permissions(durable):
    s = durable().start()
    assert stat.S_IMODE(os.stat(s.state_dir).st_mode) == 0o700
    for name in os.listdir(s.state_dir):
        st = os.stat(os.path.join(s.state_dir, name))
        # the jobs' logs (joblogs.py): 0711 on a root server (each file 0600, its user's), else 0700
        want = (0o711 if os.geteuid() == 0 else 0o700) if name == "logs" else 0o600
        assert stat.S_IMODE(st.st_mode) == want, name
        assert st.st_uid == os.geteuid()


@pytest.mark.parametrize("damage", ["truncated", "not sqlite", "other sqlite", "newer version"])
def test_a_damaged_database_refuses_to_start(durable, damage):
    s = durable()
    s.start()
    Q = s.queue("keep")
    Q.put(return_me, 1)
    Q.wait(timeout=30)
    Q.detach()
    s.kill(signal.SIGTERM)
    db = os.path.join(s.state_dir, DB_NAME)
    if damage == "truncated":
        with open(db, "r+b") as f:
            f.truncate(os.path.getsize(db) // 2 or 100)
            f.seek(0)
            f.write(b"\0" * 64)
    elif damage == "not sqlite":
        with open(db, "wb") as f:
            f.write(b"hello, this is not a database\n" * 100)
    else:
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA application_id=0" if damage == "other sqlite" else
                     f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.commit()
        conn.close()
    size = os.path.getsize(db)
    code, err = s.run()
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert db in err
    assert os.path.getsize(db) == size, "a refused database is left as it was"


def test_an_unusable_state_dir_refuses(durable):
    s = durable()
    with open(os.path.join(s.dir, "file"), "w"):
        pass
    code, err = s.run("--state-dir", os.path.join(s.dir, "file", "sub"))
    assert code == 2 and "--state-dir" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def tmpfs():
    """A small tmpfs mounted for the test alone; unmounted and removed after."""
    mounts = []

    def mount(size, readonly=False):
        where = tempfile.mkdtemp(prefix="ezpq-tmpfs-")
        opts = f"size={size},mode=0700" + (",ro" if readonly else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", where], check=True)
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", where], check=False)
        os.rmdir(where)


@needs_root
def test_an_unwritable_state_dir_refuses(durable, tmpfs):
    ro = tmpfs("1m", readonly=True)
    s = durable(state_dir=ro)
    code, err = s.run()
    assert code == 2, err
    assert ro in err and err.count("\n") == 1 and "Traceback" not in err, err


@needs_root
def test_disk_full_stops_the_server_and_keeps_what_was_committed(durable, tmpfs):
    """The state dir fills up: the put that cannot be committed is never
    acknowledged, the server stops with one line saying why (exit 1), and
    every job acknowledged before is there after a restart."""
    where = tmpfs("3m")
    s = durable(state_dir=os.path.join(where, "state")).start()
    Q = s.queue("full", auto_start=False)   # nothing runs: every job stays waiting
    acked = []
    blob = os.urandom(200_000)
    with pytest.raises((ezpq.ConnectionError, ezpq.ServerError)):
        for _ in range(100):
            acked.append(Q.put(return_me, blob))
    assert 3 <= len(acked) < 100
    assert s.proc.wait(30) == 1
    # room again: move the database to a bigger place and restart there
    bigger = os.path.join(s.dir, "state2")
    shutil.copytree(os.path.join(where, "state"), bigger)
    s2 = durable(state_dir=bigger)
    os.rmdir(s2.dir)   # it goes on in the first server's dir (its key and socket)
    s2.dir, s2.keyfile, s2.address = s.dir, s.keyfile, s.address
    s2.cmd = [a if a != os.path.join(where, "state") else bigger for a in s.cmd]
    s2.start()
    Q2 = s2.queue("full")
    jobs = {j["id"]: j for j in Q2.jobs()}
    assert set(acked) <= set(jobs), "an acknowledged job was lost"
    assert all(j["status"] == "waiting" for j in jobs.values())
    Q2.clear_waiting()
    Q2.dispose()


def test_ezpq_wait_and_status_retry_across_a_restart(durable):
    """``ezpq wait --retry`` keeps waiting for a job through a restart of the
    server (job numbers are kept); ``ezpq status --retry`` connects once it is up."""
    s = durable(workers=1).start()
    base = [sys.executable, "-m", "ezpq_mgr", "--socket", s.address, "--authkey-file", s.keyfile]
    marker = os.path.join(s.dir, "started")
    Q = s.queue("cli")
    Q.put(_touch_then_sleep, [marker, 60])           # keeps the worker busy
    job = Q.put(return_me, 5)
    _wait_until(lambda: os.path.exists(marker), what="the first job to start")
    numbers = Remote(s.address, s.key).call("list_jobs", False)
    waited = [n["seq"] for n in numbers if n["id"] == job][0]
    waiter = subprocess.Popen(base + ["--json", "wait", str(waited), "--retry", "30"],
                              stdout=subprocess.PIPE, text=True)
    s.kill(signal.SIGKILL)
    assert subprocess.run(base + ["status"], capture_output=True).returncode == 3
    status = subprocess.Popen(base + ["status", "--retry", "30"], stdout=subprocess.PIPE, text=True)
    s.start()
    assert status.wait(30) == 0
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, out
    assert '"output": 5' in out
    Q2 = s.queue("cli")
    assert sorted(j["status"] for j in Q2.collect()) == ["completed", "lost"]
    Q2.dispose()


def test_embedded_queue_with_a_state_dir(durable):
    """``Queue(state_dir=...)``: the private server keeps its queue there;
    a later Queue on the same dir and qid finds the jobs again."""
    s = durable()
    where = os.path.join(s.dir, "embedded")
    Q = ezpq.Queue(1, state_dir=where, qid="mine", auto_start=False)
    ids = [Q.put(return_me, i) for i in range(3)]
    Q.detach()
    with pytest.raises(ValueError):
        ezpq.Queue(state_dir=where, address=s.address)
    Q2 = ezpq.Queue(1, state_dir=where, qid="mine")
    Q2.start()
    assert Q2.wait(timeout=30) == 0
    assert sorted((j["id"], j["output"]) for j in Q2.collect()) == list(zip(ids, range(3)))
    Q2.dispose()


def test_without_a_state_dir_the_log_file_keeps_the_history(durable):
    """No --state-dir but --log-file: after a restart ``ezpq report`` covers
    the whole file and job numbers continue after the largest in it."""
    s = durable(stateless=True)
    log = os.path.join(s.dir, "acct.csv")
    s.cmd += ["--log-file", log]
    for run in range(2):
        s.start()
        Q = s.queue("hist")
        for i in range(3):
            Q.put(return_me, i)
        assert Q.wait(timeout=30) == 0
        Q.dispose()
        s.kill(signal.SIGTERM)
    s.start()
    rows = Remote(s.address, s.key).call("accounting", True)
    assert sorted(int(r["job"]) for r in rows) == list(range(1, 7))
    base = [sys.executable, "-m", "ezpq_mgr", "--socket", s.address, "--authkey-file", s.keyfile]
    out = subprocess.run(base + ["--json", "report", "--by", "qid"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"jobs": 6' in out.stdout, out.stdout


# ------------------------------------------------------------ puts committed, ids never reused
def test_a_put_returns_only_once_committed(durable):
    """Against a durable server a Queue does not buffer: each put (and each
    job of a map) is committed before it returns, so a SIGKILL right after
    loses none; before, a private Queue's puts sat in its buffer."""
    n = 50
    s = durable(workers=1).start()
    Q = ezpq.Queue(address=s.address, authkey=s.key, auto_start=False)   # private: buffered when in memory
    ids = [Q.put(return_me, i) for i in range(n)]
    s.kill(signal.SIGKILL)   # at once: no sleep, no other call
    s.start()
    Q2 = s.queue(Q.qid)
    assert sorted(j["id"] for j in Q2.jobs()) == ids == list(range(1, n + 1))
    Q2.start()
    assert Q2.wait(timeout=60) == 0
    assert sorted(j["output"] for j in Q2.collect()) == list(range(n))
    Q2.dispose()

    # a map: its jobs are committed before it waits for them
    M = ezpq.Queue(address=s.address, authkey=s.key, auto_start=False)
    errors = []

    def run_map():
        try:
            M.map(return_me, range(n))
        except ezpq.ConnectionError as exc:
            errors.append(exc)

    t = threading.Thread(target=run_map)
    t.start()
    watch = s.queue(M.qid)   # the same user's other client sees the jobs once they are committed
    _wait_until(lambda: watch.size(waiting=True) == n, what="the map's jobs")
    s.kill(signal.SIGKILL)
    t.join(10)
    assert errors, "the map did not hear of the server's death"
    s.start()
    M2 = s.queue(M.qid)
    M2.start()
    assert M2.wait(timeout=60) == 0
    assert sorted(j["output"] for j in M2.collect()) == list(range(n))
    M2.dispose()


def test_ids_are_never_reused(durable):
    """A named queue dropped (no client, no job left) and named again
    continues its ids, in one server life and across restarts (SIGTERM,
    SIGKILL); the server-wide job numbers never repeat either."""
    s = durable(workers=1).start()
    seqs = []

    def put_collect(values):
        Q = s.queue("again")
        ids = [Q.put(return_me, v) for v in values]
        seqs.extend(j["seq"] for j in Remote(s.address, s.key).call("list_jobs", False))
        assert Q.wait(timeout=30) == 0
        Q.collect()
        Q.dispose()   # the queue is dropped: nothing refers to it any more
        return ids

    assert put_collect(range(3)) == [1, 2, 3]
    assert put_collect([3]) == [4], "a dropped queue's ids started again"
    s.kill(signal.SIGTERM)
    s.start()
    assert put_collect([4]) == [5], "ids started again after a restart"
    s.kill(signal.SIGKILL)
    s.start()
    assert put_collect([5, 6]) == [6, 7], "ids started again after a SIGKILL"
    assert seqs == sorted(set(seqs)), f"a job number came back: {seqs}"


# --------------------------------------------------------------- review


def test_a_collect_larger_than_the_remembered_ids_is_not_handed_twice(durable):
    """One collect() hands 4,116 results (more than an earlier design of
    client/delivered.py remembered); the server restarts (a plain SIGTERM)
    right after, maybe before the client's ack reached it, so they may all
    be on the server again. The same process collecting again gets none."""
    s = durable(workers=2).start()
    Q = s.queue("window", buffer_puts=True)
    n = 4116
    for i in range(n):
        Q.put(return_me, i)
    Q.flush()
    assert Q.wait(timeout=120) == 0
    first = Q.collect()
    assert len(first) == n
    s.kill(signal.SIGTERM)   # no request of Q since: nothing confirmed
    s.start()
    again = s.queue("window").collect()
    assert again == [], f"{len(again)} results handed to this process twice (ids {[j['id'] for j in again][:5]}...)"


def test_a_result_confirmed_by_nobody_does_not_free_a_reused_environment(durable, tmp_path):
    """A client collects results and dies before its next request: their
    rows stay (at least once) but their environment is released and
    deleted (ED). After a restart, env ids restart after the largest row
    left in `envs`, so the next client gets the same env id; collecting the
    lingering results then releases *its* environment: its waiting job
    runs without its working directory."""
    s = durable(workers=1).start()
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    script = ("import os, sys, ezpq_mgr as ezpq\n"
              "Q = ezpq.Queue(address=sys.argv[1], authkey=open(sys.argv[2], 'rb').read().strip(), qid='gone')\n"
              "from ezpq_mgr.client.connection import Remote\n"
              "Remote._ack = lambda self, sock: None   # sends no ack: as if killed before it could\n"
              "[Q.put(os.getcwd) for _ in range(3)]\n"
              "assert Q.wait(timeout=60) == 0\n"
              "assert len(Q.collect()) == 3\n"
              "os._exit(0)   # killed: no further request\n")
    subprocess.run([sys.executable, "-c", script, s.address, s.keyfile], cwd=a_dir, check=True, timeout=90,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    db = os.path.join(s.state_dir, DB_NAME)
    _wait_until(lambda: sqlite3.connect(db).execute("SELECT count(*) FROM envs").fetchone()[0] == 0,
                what="the dead client's environment to be dropped")
    assert sqlite3.connect(db).execute("SELECT count(*) FROM jobs").fetchone()[0] == 3
    s.kill(signal.SIGTERM)
    s.start()
    cwd = os.getcwd()
    os.chdir(b_dir)
    try:
        Qb = s.queue("mine", auto_start=False)
        Qb.put(os.getcwd)
        lingering = s.queue("gone").collect()   # as another process would: at least once
        assert [j["output"] for j in lingering] == [str(a_dir)] * 3
        Qb.start()
        assert Qb.wait(timeout=30) == 0
        job = Qb.get()
    finally:
        os.chdir(cwd)
    assert job["output"] == str(b_dir), f"the job ran in {job['output']!r}, not its client's directory"


def test_private_queues_on_a_durable_server_leave_no_memory_in_the_client(durable):
    """client/delivered.py keeps the ids handed per (state_id, qid) for the
    process's life. A private queue (no qid: a random name, never used again
    once disposed) still leaves its entry behind: a process making a
    Queue per task grows without bound (up to REMEMBERED ids per queue)."""
    from ezpq_mgr.client.delivered import Delivered
    s = durable(workers=1).start()
    before = len(Delivered._seen)
    for i in range(20):
        Q = ezpq.Queue(address=s.address, authkey=s.key)
        Q.put(return_me, i)
        assert Q.get(wait=True, timeout=30)["output"] == i
        Q.dispose()
    assert len(Delivered._seen) - before <= 1, \
        f"{len(Delivered._seen) - before} disposed private queues still remembered"


def test_a_script_that_ends_normally_after_get_does_not_leave_its_result_to_be_handed_again(durable, tmp_path):
    """The usual shared-server script: Queue(qid).get(), then the script
    ends (no dispose: its other jobs keep running). Its result's row stays
    on disk (nothing confirmed it), so the next restart, however much later,
    hands the consumed result to whatever process collects the qid next."""
    s = durable(workers=1).start()
    script = ("import sys, ezpq_mgr as ezpq\n"
              "Q = ezpq.Queue(address=sys.argv[1], authkey=open(sys.argv[2], 'rb').read().strip(), qid='consumed')\n"
              "Q.put(abs, -5)\n"
              "assert Q.get(wait=True, timeout=60)['output'] == 5\n")
    subprocess.run([sys.executable, "-c", script, s.address, s.keyfile], check=True, timeout=90,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    db = os.path.join(s.state_dir, DB_NAME)   # its ack reached the server as it ended: the row goes
    _wait_until(lambda: sqlite3.connect(db).execute("SELECT count(*) FROM jobs").fetchone()[0] == 0,
                what="the consumed result's row to be deleted")
    s.kill(signal.SIGTERM)   # a routine restart
    s.start()
    again = s.queue("consumed").collect()
    assert again == [], f"a result its process read and ended with is handed out again: {again}"


def test_clean_is_acknowledged_only_once_its_removal_is_committed(durable):
    """README: 'no reply leaves the server before what it reports is
    committed'. ``ezpq clean`` replies with the number it removed while the
    removal is not on disk (D is not in a reply's mark): a SIGKILL then
    brings the cleaned results back."""
    s = durable(workers=1).start()
    Q = s.queue("cleaned")
    Q.put(return_me, 1)
    assert Q.wait(timeout=30) == 0
    db = os.path.join(s.state_dir, DB_NAME)
    _wait_until(lambda: sqlite3.connect(db).execute(
        "SELECT count(*) FROM jobs WHERE status='completed'").fetchone()[0] == 1, what="the result on disk")
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")   # nothing can commit now
    try:
        got = []
        t = threading.Thread(target=lambda: _swallow(   # (its server is killed while it waits)
            lambda: got.append(Remote(s.address, s.key).call("clean", "cleaned"))))
        t.start()
        t.join(4)   # under the journal's 5 s busy timeout
        replied = list(got)
        s.kill(signal.SIGKILL)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    s.start()
    left = s.queue("cleaned").size()
    assert not (replied == [1] and left == 1), "clean said 1 removed, and after a SIGKILL the result is back"


def test_flush_returns_only_once_another_threads_in_flight_puts_are_committed(durable, monkeypatch):
    """flush(): 'returns once the server has them: on a durable server,
    once they are committed'. Another thread's get(wait=True) took the
    buffer (put_then) and let the send lock go once the batch was on the
    wire; flush() then finds nothing to send and returns at once, though
    nothing is committed (the test holds the database's write lock): a
    SIGKILL then loses the jobs flush() vouched for."""
    from ezpq_mgr.client import queue as client_queue
    monkeypatch.setattr(client_queue, "FLUSH_DELAY", 60.0)   # the flusher thread stays out of it
    s = durable(workers=1).start()
    Q = s.queue("flushed", buffer_puts=True, auto_start=False)
    for i in range(3):
        Q.put(return_me, i)
    db = os.path.join(s.state_dir, DB_NAME)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        getter = threading.Thread(target=lambda: _swallow(lambda: Q.get(wait=True, timeout=20)), daemon=True)
        getter.start()
        _wait_until(lambda: not Q._buffer, limit=3, what="the getter to take the batch")
        flushed = threading.Event()
        threading.Thread(target=lambda: (Q.flush(), flushed.set()), daemon=True).start()
        returned = flushed.wait(3)   # under the journal's 5 s busy timeout
        s.kill(signal.SIGKILL)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    s.start()
    n = s.queue("flushed").size(waiting=True)
    assert not (returned and n < 3), f"flush() returned, and after a SIGKILL {3 - n} of its 3 jobs are lost"


def _swallow(fn):
    try:
        fn()
    except Exception:
        pass


def test_a_private_queue_name_used_again_does_not_lose_its_results(durable, monkeypatch):
    """A private queue's name is 8 random hex digits and its id counter is
    not kept once it is disposed (README), so a later private queue of the
    same process that draws the same name (the birthday bound: ~1% in 10,000
    queues) starts at id 1 again. client/delivered.py still remembers ids
    1.. for that (state_id, qid): the new queue's results are dropped as
    'redeliveries' and confirmed on the server: lost."""
    import uuid as uuid_module
    from ezpq_mgr.client import queue as client_queue
    fixed, real, calls = uuid_module.UUID("deadbeef" + "0" * 24), uuid_module.uuid4, []

    def uuid4():   # each Queue's first draw (its qid) is the same name; the rest (tokens) random
        calls.append(None)
        return fixed if len(calls) % 2 else real()
    monkeypatch.setattr(client_queue.uuid, "uuid4", uuid4)
    s = durable(workers=1).start()
    Q1 = ezpq.Queue(address=s.address, authkey=s.key)
    assert Q1.put(return_me, "first") == 1
    assert Q1.get(wait=True, timeout=30)["output"] == "first"
    Q1.dispose()
    Q2 = ezpq.Queue(address=s.address, authkey=s.key)
    assert Q2.put(return_me, "second") == 1
    got = Q2.get(wait=True, timeout=30)
    Q2.dispose()
    assert got is not None and got["output"] == "second", f"the second queue's result was dropped: {got}"
