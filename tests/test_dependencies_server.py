"""Dependencies and the blocking collector on real servers: the Python API,
``ezpq submit --after``, raw calls as another user (the wire a hostile
client controls), a durable server's restart, and a collector started
before its putter on a shared qid."""

import datetime
import json
import os
import signal
import subprocess
import threading
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr import serialize
from ezpq_mgr.client.connection import Remote
from jobs import fail, sleep_for
from server_fixture import Server
from test_durable import Durable
from test_security import connect, refused   # a raw client, and what a refusal says

from multiuser import USERS, needs_root, run_as, start_as, users  # noqa: F401 (fixture)


@pytest.fixture
def server():
    s = Server("unix", workers=2, start_method="fork")
    os.chmod(s.dir, 0o777)   # other users' jobs run there
    yield s
    assert s.stop() in (0, None)


def queue(server, qid):
    return ezpq.Queue(address=server.address, authkey=server.key, qid=qid)


def run_cli(server, *args):
    done = subprocess.run([*server.cli_args, *args], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def record(token, env, **over):
    """A valid job record as the client library sends it, with ``over``."""
    r = {"client": token, "name": "x", "priority": 100, "timeout": 0.0, "function": "abs",
         "fn_blob": serialize.dump_function(abs), "args_blob": serialize.dump_call_args([-1], None),
         "env_id": env}
    r.update(over)
    return r


# ------------------------------------------------------------- the Python API
def test_an_ok_chain_runs_in_order_and_a_failed_parent_skips_its_line(server):
    with queue(server, "chain") as Q:
        a = Q.put(sleep_for, 0.3)
        b = Q.put(sleep_for, 0.2, after=[a], priority=1)
        c = Q.put(sleep_for, 0.1, after=[b], priority=0)
        bad = Q.put(fail, "parent")
        child = Q.put(sleep_for, 0, after=[bad, a], suppress_errors=True)
        grandchild = Q.submit(ezpq.Job(sleep_for, 0, after=[child]))
        assert Q.wait(timeout=60) == 0
        jobs = {j["id"]: j for j in Q.collect()}
    assert [jobs[i]["status"] for i in (a, b, c)] == ["completed"] * 3
    assert jobs[a]["ended"] <= jobs[b]["started"] and jobs[b]["ended"] <= jobs[c]["started"]
    assert jobs[bad]["status"] == "failed"
    assert jobs[child]["status"] == jobs[grandchild]["status"] == "skipped"
    assert jobs[child]["started"] is None and jobs[child]["cancelled"]
    assert "ended failed" in jobs[child]["exception"] and "ended skipped" in jobs[grandchild]["exception"]
    # the job numbers it waited for (one each; the CLI's job column)
    assert jobs[a]["after"] is None and len(jobs[b]["after"]) == len(jobs[c]["after"]) == 1
    assert jobs[b]["after"][0] < jobs[c]["after"][0]


def test_refused_at_the_call_and_nothing_enqueued(server):
    Q = ezpq.Queue(address=server.address, authkey=server.key)    # a private queue: buffered puts
    try:
        first = Q.put(sleep_for, 0)
        assert Q.put(sleep_for, 0, after=[first]) == first + 1      # the buffered one went first
        with pytest.raises(ValueError, match="job 99 of this queue is not on the server"):   # reserved
            Q.put(sleep_for, 0, after=[99])
        with pytest.raises(TypeError):
            Q.put(sleep_for, 0, after="1")
        assert Q.wait(timeout=30) == 0 and len(Q.collect()) == 2
        with pytest.raises(ValueError, match="already collected"):
            Q.put(sleep_for, 0, after=[first])
        assert Q.n_submitted() == 2
    finally:
        Q.dispose()


def test_raw_calls_self_unknown_and_collected_are_refused(server):
    remote, token, env = connect(server)
    own = remote.call("reserve_ids", "raw", 1)
    assert refused(remote.call, "put", "raw", [record(token, env, id=own, after=[own])]) == \
        f"ValueError: after: job {own} cannot wait for itself"
    assert "no job 5 in this queue" in refused(remote.call, "put", "raw", [record(token, env, after=[5])])
    assert "no job 123456 of yours" in refused(remote.call, "put", "raw",
                                               [record(token, env, after_jobs=[123456])])
    for bad in ("7", [0], [1.5], list(range(1, 2000))):
        assert refused(remote.call, "put", "raw", [record(token, env, after=bad)]).startswith(
            ("TypeError", "ValueError"))
    assert remote.call("counts", "raw")["submitted"] == 0


# ------------------------------------------------------------- other users
def a_puts_a_long_job(server):
    remote, token, env = connect(server)
    seq = remote.call("submit", "a", record(token, env, fn_blob=serialize.dump_function(sleep_for),
                                            args_blob=serialize.dump_call_args([30], None)))["job"]
    return seq


def b_names_foreign_jobs(server, seqs):
    remote, token, env = connect(server)
    out = [refused(remote.call, "put", "b", [record(token, env, after_jobs=[seq])]) for seq in seqs]
    out.append(remote.call("counts", "b")["submitted"])
    return out


@needs_root
def test_another_users_job_and_roots_are_refused(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    a_seq = run_as(a, a_puts_a_long_job, server)
    root_seq = a_puts_a_long_job(server)                 # root's own job
    out = run_as(b, b_names_foreign_jobs, server, [a_seq, root_seq])
    for seq, said in zip((a_seq, root_seq), out[:2]):
        assert said.startswith(f"ValueError: after: no job {seq} of yours"), said
    assert out[2] == 0
    # root (the server's owner too) may not make its jobs wait for another user's
    code, _, err = run_cli(server, "submit", "--after", str(a_seq), "--", "true")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"no job {a_seq} of yours" in err
    Remote(server.address, server.key).call("cancel_job", a_seq)
    Remote(server.address, server.key).call("cancel_job", root_seq)


# ------------------------------------------------------------------ the CLI
def test_ezpq_submit_after(server):
    code, out, _ = run_cli(server, "submit", "--", "sh", "-c", "sleep 0.3")
    first = int(out)
    code, out, _ = run_cli(server, "submit", "--qid", "other", "--after", f"{first}", "--", "true")
    second = int(out)
    code, out, _ = run_cli(server, "submit", "--", "false")
    bad = int(out)
    code, out, err = run_cli(server, "submit", "--after", f"{second},{bad}", "--", "true")
    assert code == 0, err
    third = int(out)
    code, out, err = run_cli(server, "--json", "wait", str(first), str(second), str(bad), str(third))
    assert code == 1, err                      # bad failed, third skipped
    jobs = {j["job"]: j for j in json.loads(out)}
    when = datetime.datetime.fromisoformat
    assert jobs[second]["status"] == "completed"
    assert when(jobs[second]["started"]) >= when(jobs[first]["ended"])
    assert jobs[second]["after"] == [first]
    assert jobs[third]["status"] == "skipped"
    assert f"after: job {bad} " in jobs[third]["exception"]
    code, _, err = run_cli(server, "submit", "--after", "99999", "--", "true")
    assert code == 2 and err.count("\n") == 1 and "no job 99999 of yours" in err
    # a requeued job waits for nothing: the skipped one runs now
    code, out, err = run_cli(server, "requeue", str(third))
    assert code == 0, err
    again = int(out.split("requeued as")[1])
    code, out, err = run_cli(server, "--json", "wait", str(again))
    assert code == 0, out + err
    job = json.loads(out)[0]
    assert job["status"] == "completed" and job["after"] is None


# ---------------------------------------------------------- a durable server
def test_a_restart_keeps_the_dependency():
    s = Durable(workers=1).start()
    try:
        Q = s.queue("d")
        Q._stop()                              # paused: nothing runs before the restart
        parent = Q.put(fail, "after the restart", suppress_errors=True)
        child = Q.put(sleep_for, 0, after=[parent])
        Q.detach()
        s.kill(signal.SIGKILL)
        s.start()
        Q2 = s.queue("d")
        Q2.start()
        assert Q2.wait(timeout=60) == 0
        jobs = {j["id"]: j for j in Q2.collect()}
        assert jobs[parent]["status"] == "failed"
        assert jobs[child]["status"] == "skipped" and "ended failed" in jobs[child]["exception"]
        Q2.dispose()
    finally:
        s.close()


# ------------------------------------------------------- a blocking collector
def _parked(server, n):
    deadline = time.monotonic() + 30
    remote = Remote(server.address, server.key)
    while remote.call("info")["parked_calls"] < n:
        assert time.monotonic() < deadline, "the collector never parked"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["get", "wait"])
def test_a_collector_started_before_the_putter_gets_the_results(server, how):
    got = {}

    def collect():
        with queue(server, "feed") as C:
            t0 = time.monotonic()
            if how == "get":
                got["job"] = C.get(wait=True, timeout=20)
            else:
                got["left"] = C.wait(timeout=20)
                got["job"] = C.get()
            got["took"] = time.monotonic() - t0

    collector = threading.Thread(target=collect)
    collector.start()
    _parked(server, 1)                         # it waits on an empty queue, nothing put yet
    with queue(server, "feed") as P:
        P.put(sleep_for, 0.2)
        collector.join(30)
        assert not collector.is_alive()
        P.detach()
    assert got["job"] is not None and got["job"]["output"] == 0.2
    assert got.get("left", 0) == 0 and got["took"] < 15
    with ezpq.Queue(address=server.address, authkey=server.key) as private:   # ezpq's rule stays
        t0 = time.monotonic()
        assert private.get(wait=True, timeout=20) is None and private.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 5


def b_collects(server):
    with queue(server, "feed") as C:
        t0 = time.monotonic()
        job = C.get(wait=True, timeout=4)
        return job, time.monotonic() - t0


def a_feeds(server):
    with queue(server, "feed") as P:
        P.put(sleep_for, 0.1)
        return P.get(wait=True, timeout=20)["output"]


@needs_root
def test_a_collector_never_sees_another_users_queue_of_the_same_name(server, users):
    """B's collector waits on its "feed" while A puts to A's "feed": B is
    not woken with A's job, and times out empty; A gets its own."""
    a, b = users[USERS[0]], users[USERS[1]]
    p, out = start_as(b, b_collects, server)
    try:
        _parked(server, 1)
        assert run_as(a, a_feeds, server) == 0.1
        kind, value = out.get(timeout=30)
    finally:
        p.join(10)
    assert kind == "ok", value
    job, took = value
    assert job is None and took >= 3.5
