"""Queue control, black-box: pause/resume, a waiting job's priority,
requeue, clean, through the API and the ``ezpq`` command; a durable server
keeps them across a SIGKILL; another user cannot use any of them on your
jobs (and sees nothing of yours in ``top``)."""

import json
import os
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.client.connection import Remote
from ezpq_mgr.errors import JobNotFound
from jobs import return_me, sleep_for
from multiuser import USERS, needs_root, run_as, users  # noqa: F401 (fixture)
from server_fixture import Server
from test_cli import run_cli
from test_durable import Durable


def _until(cond, limit=60.0, what="condition"):
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def server():
    s = Server("unix", workers=1)
    yield s
    assert s.stop() in (0, None)


def test_pause_priority_resume_in_python():
    with ezpq.Queue(n_workers=1) as Q:
        Q.pause()
        assert not Q.is_running
        ids = [Q.put(return_me, i, priority=5) for i in range(4)]
        assert Q.set_priority(ids[3], 1) is True      # best now
        assert Q.set_priority(ids[0], 9) is True      # worst now
        assert Q.size(waiting=True) == 4, "a paused queue started a job"
        Q.resume()
        assert Q.is_running
        assert Q.wait(timeout=60) == 0
        done = sorted(Q.collect(), key=lambda j: j["started"])
        assert [j["id"] for j in done] == [4, 2, 3, 1]
        assert [j["priority"] for j in done] == [1, 5, 5, 9]
        assert Q.set_priority(ids[0], 1) is False     # finished (and collected): not waiting
        with pytest.raises(JobNotFound):
            Q.set_priority(99, 1)
        for bad, exc in (("1", TypeError), (0, ValueError), (True, TypeError)):
            with pytest.raises(exc):
                Q.set_priority(bad, 1)
        for bad in (1.5, "high", None, 2 ** 63):
            with pytest.raises((TypeError, ValueError)):
                Q.set_priority(ids[0], bad)


def test_a_running_job_keeps_its_priority(server):
    with ezpq.Queue(address=server.address, authkey=server.key, qid="run") as Q:
        first = Q.put(sleep_for, 30)
        _until(lambda: Q.size(working=True) == 1, what="the job to start")
        assert Q.set_priority(first, 1) is False
        assert Q.jobs()[0]["priority"] == 100
        assert Q.cancel(first)


def test_the_server_refuses_bad_control_arguments(server):
    r = Remote(server.address, server.key)
    for args in ((["q", 5], True), ("q", True), (None, "yes"), ([["q"]], True)):
        with pytest.raises((TypeError, ValueError)):
            r.call("pause_queues", *args)
    for args in (("q", 1, "1"), ("q", "1", 1), ("q", 0, 1), ("q", 1, 2 ** 63)):
        with pytest.raises((TypeError, ValueError)):
            r.call("set_priority", *args)
    for call, args in (("job_priority", (0, 1)), ("job_priority", (1, None)), ("requeue_job", ("1",)),
                       ("clean", (5,))):
        with pytest.raises((TypeError, ValueError)):
            r.call(call, *args)


def _status(server, *args):
    code, out, err = run_cli(server, "--json", "status", *args)
    assert code == 0, err
    return {j["job"]: j for j in json.loads(out)}


def test_cli_pause_priority_resume_requeue_clean(server):
    code, out, err = run_cli(server, "pause", "c1")
    assert (code, out.strip()) == (0, "c1: paused"), err
    jobs = []
    for _ in range(3):
        code, out, err = run_cli(server, "submit", "--qid", "c1", "--", "true")
        assert code == 0, err
        jobs.append(int(out))
    code, out, err = run_cli(server, "priority", str(jobs[2]), "7")
    assert (code, out.strip()) == (0, f"{jobs[2]}: priority 7"), err
    assert {j: s["status"] for j, s in _status(server, "--state", "waiting").items()} == dict.fromkeys(jobs, "waiting")
    code, out, err = run_cli(server, "requeue", str(jobs[0]))
    assert code == 1 and "only a finished job" in err and "Traceback" not in err

    code, out, err = run_cli(server, "resume")   # everything of mine
    assert (code, out.strip()) == (0, "c1: resumed"), err
    assert run_cli(server, "wait")[0] == 0
    st = _status(server)
    assert [j for j, _ in sorted(st.items(), key=lambda kv: kv[1]["started"])] == [jobs[2], jobs[0], jobs[1]]
    code, out, err = run_cli(server, "priority", str(jobs[0]), "1")
    assert code == 1 and "only a waiting job" in err and len(err.strip().splitlines()) == 1

    code, out, err = run_cli(server, "--json", "requeue", str(jobs[2]))
    assert code == 0, err
    new = json.loads(out)[0]
    assert new["from"] == jobs[2] and new["job"] > max(jobs) and new["id"] == 4 and new["qid"] == "c1"
    assert run_cli(server, "wait", str(new["job"]))[0] == 0
    again = _status(server)[new["job"]]
    assert again["status"] == "completed" and again["priority"] == 7 and again["name"] == "true"
    assert again["started"] > st[jobs[2]]["ended"]

    code, out, err = run_cli(server, "submit", "--qid", "c2", "--", "true")
    assert run_cli(server, "wait")[0] == 0
    code, out, err = run_cli(server, "clean", "--qid", "c1")
    assert (code, out.strip()) == (0, "4 finished jobs forgotten"), err
    assert [j["qid"] for j in _status(server).values()] == ["c2"]
    assert run_cli(server, "clean")[1].strip() == "1 finished job forgotten"
    assert _status(server) == {}
    code, out, err = run_cli(server, "requeue", str(jobs[0]))
    assert code == 1 and err.strip() == f"ezpq: no job {jobs[0]}"
    assert json.loads(run_cli(server, "--json", "pause", "c2")[1]) == {"paused": ["c2"]}
    assert json.loads(run_cli(server, "--json", "resume")[1]) == {"resumed": ["c2"]}
    assert run_cli(server, "resume")[1].strip() == "no queue of yours to resume (none, or all are already)"
    assert run_cli(server, "resume", "c2")[1].strip() == "c2: resumed"   # named: said even if it was
    code, out, err = run_cli(server, "priority", "1", "soon")
    assert code == 2 and "Traceback" not in err


def test_pause_and_priority_survive_a_sigkill(tmp_path):
    s = Durable(workers=1).start()
    try:
        Q = ezpq.Queue(address=s.address, authkey=s.key, qid="d")
        Q.pause()
        ids = [Q.put(return_me, i) for i in range(3)]
        assert Q.set_priority(ids[2], 1)
        C = ezpq.Queue(address=s.address, authkey=s.key, qid="gone")
        C.put(return_me, 0)
        assert C.wait(timeout=60) == 0
        r = Remote(s.address, s.key)
        gone_job = [j["seq"] for j in r.call("list_jobs", False) if j["qid"] == "gone"][0]
        assert r.call("clean", "gone") == 1
        Q.detach()
        C.detach()
        s.kill(9)
        s.start()
        Q = ezpq.Queue(address=s.address, authkey=s.key, qid="d")
        assert not Q.is_running, "the queue came back unpaused"
        jobs = {j["id"]: j for j in Q.jobs()}
        assert [jobs[i]["priority"] for i in ids] == [100, 100, 1]
        r = Remote(s.address, s.key)
        assert gone_job not in {j["seq"] for j in r.call("list_jobs", False)}, "a cleaned job came back"
        Q.resume()
        assert Q.wait(timeout=60) == 0
        assert [j["id"] for j in sorted(Q.collect(), key=lambda j: j["started"])] == [3, 1, 2]
        # a finished job is requeued where it ran after a restart too (its environment was kept)
        C = ezpq.Queue(address=s.address, authkey=s.key, qid="gone")
        cid = C.put(os.getcwd)
        assert C.wait(timeout=60) == 0
        seq = [j["seq"] for j in r.call("list_jobs", False) if j["qid"] == "gone"][0]
        C.detach()
        s.kill(9)
        s.start()
        r = Remote(s.address, s.key)
        new = r.call("requeue_job", seq)
        C = ezpq.Queue(address=s.address, authkey=s.key, qid="gone")
        assert C.wait(timeout=60) == 0
        out = {j["id"]: j["output"] for j in C.collect()}
        assert out == {cid: os.getcwd(), new["id"]: os.getcwd()} and new["id"] == cid + 1
        C.dispose()
        Q.dispose()
    finally:
        s.close()


# --------------------------------------------------------- two users
def a_leaves_jobs(server):
    """A: one job running, one finished, one waiting in paused queue "ax"."""
    Q = ezpq.Queue(address=server.address, authkey=server.key, qid="ax")
    Q.put(time.sleep, 60)
    Q.put(abs, -3)
    deadline = time.monotonic() + 60
    while Q.size(completed=True) < 1 or Q.size(working=True) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    Q.pause()
    Q.put(abs, -4)
    jobs = {j["status"]: j["seq"] for j in Remote(server.address, server.key).call("jobs", "ax")}
    Q.detach()
    return jobs


def b_tries(server, jobs):
    r = Remote(server.address, server.key)
    seen = {"pause_all": r.call("pause_queues", None, True), "resume_all": r.call("pause_queues", None, False),
            "clean": r.call("clean", None), "top": r.call("top")}
    for name, call, args in (("priority", "job_priority", (jobs["waiting"], 1)),
                             ("requeue", "requeue_job", (jobs["completed"],)),
                             ("set_priority", "set_priority", ("ax", 3, 1))):
        try:
            seen[name] = r.call(call, *args)
        except Exception as exc:
            seen[name] = type(exc).__name__
    return seen


@needs_root
def test_another_user_cannot_control_your_jobs_or_see_them_in_top(users):
    s = Server("unix", workers=2, start_method="fork")
    try:
        a, b = users[USERS[0]], users[USERS[1]]
        jobs = run_as(a, a_leaves_jobs, s)
        assert set(jobs) == {"working", "completed", "waiting"}, jobs
        seen = run_as(b, b_tries, s, jobs)
        assert seen["pause_all"] == [] and seen["resume_all"] == [] and seen["clean"] == 0
        assert seen["priority"] == seen["requeue"] == seen["set_priority"] == "JobNotFound", seen
        assert seen["top"]["running"] == [] and seen["top"]["queues"] == [], seen["top"]
        assert seen["top"]["busy"] == 1 and seen["top"]["waiting_total"] == 1

        root = Remote(s.address, s.key)
        listed = {j["seq"]: j for j in root.call("list_jobs", True)}
        assert listed[jobs["waiting"]]["status"] == "waiting" and listed[jobs["waiting"]]["priority"] == 100
        assert listed[jobs["completed"]]["status"] == "completed", "B's clean took A's result"
        top = root.call("top")   # the owner sees everyone's
        assert [(j["job"], j["user"], j["qid"]) for j in top["running"]] == [(jobs["working"], USERS[0], "ax")]
        assert top["running"][0]["rss"] > 0 and top["running"][0]["cpu_percent"] is not None
        assert {"user": USERS[0], "qid": "ax", "waiting": 1, "running": 1, "paused": True} in top["queues"]
        with pytest.raises(PermissionError, match="only your own"):
            root.call("requeue_job", jobs["completed"])   # it would run A's code as root
        assert root.call("job_priority", jobs["waiting"], 5)["changed"]   # root may, as cancel
        for seq in (jobs["working"], jobs["waiting"]):
            assert root.call("cancel_job", seq)
    finally:
        assert s.stop() in (0, None)
