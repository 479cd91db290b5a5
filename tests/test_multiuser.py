"""Several OS users on one ezpq-server (as root, with throwaway users).

CI runs as root: these tests create two users with ``useradd`` and remove
them afterwards. Client processes are forked from the test and drop to the
user, so the server learns who they are from SO_PEERCRED only.
"""

import os
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.client.connection import Remote
from ezpq_mgr.errors import JobNotFound
from server_fixture import Server

from multiuser import USERS, FORK, needs_root, run_as, start_as, users  # noqa: F401 (fixture)

pytestmark = needs_root


@pytest.fixture
def server(users):
    s = Server("unix", workers=2, start_method="fork")
    yield s
    assert s.stop() == 0


# ---------------------------------------------------------------- as user B
def b_leaves_jobs(server):
    Q = ezpq.Queue(address=server.address, authkey=server.key, qid="shared")
    for _ in range(3):
        Q.put(time.sleep, 30)
    seqs = [j["seq"] for j in Remote(server.address, server.key).call("jobs", "shared")]
    Q.detach()
    return seqs


def a_looks_for_them(server, b_seqs):
    seen = {}
    with ezpq.Queue(address=server.address, authkey=server.key, qid="shared") as Q:
        seen["size"] = Q.size()
        seen["collect"] = Q.collect()
        seen["jobs"] = Q.jobs()
    remote = Remote(server.address, server.key)
    seen["listed"] = [j["seq"] for j in remote.call("list_jobs", True)]
    seen["whoami"] = remote.call("whoami")
    refused = 0
    for seq in b_seqs:
        for call in ("cancel_job", "show_job"):
            try:
                remote.call(call, seq)
            except JobNotFound:
                refused += 1
    seen["refused"] = refused
    seen["report_users"] = [r["user"] for r in remote.call("report", "user", True)]
    return seen


def test_users_never_see_collect_or_cancel_each_others_jobs(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    b_seqs = run_as(b, b_leaves_jobs, server)
    seen = run_as(a, a_looks_for_them, server, b_seqs)
    assert seen["whoami"]["uid"] == a.pw_uid and not seen["whoami"]["privileged"]
    assert seen["size"] == 0 and seen["collect"] == [] and seen["jobs"] == []
    assert not set(b_seqs) & set(seen["listed"])
    assert seen["refused"] == 2 * len(b_seqs)
    assert USERS[1] not in seen["report_users"]
    root = Remote(server.address, server.key)  # the owner sees and cancels all
    listed = {j["seq"]: j for j in root.call("list_jobs", True)}
    assert set(b_seqs) <= set(listed) and {listed[s]["user"] for s in b_seqs} == {USERS[1]}
    assert {listed[s]["qid"] for s in b_seqs} == {"shared"}
    assert all(root.call("cancel_job", s) for s in b_seqs)


def a_runs_whoami(server):
    marker = os.path.join(server.dir, "made-by-job")
    with ezpq.Queue(address=server.address, authkey=server.key) as Q:
        Q.put(lambda: (os.getuid(), os.getgid(), open(marker, "w").close()))
        job = Q.get(wait=True)
    return job["status"], job["output"], job["max_rss_method"], os.stat(marker).st_uid, job["user"]


def test_jobs_run_as_their_submitter(server, users):
    a = users[USERS[0]]
    os.chmod(server.dir, 0o777)  # let the job create its marker file
    status, output, method, file_uid, user = run_as(a, a_runs_whoami, server)
    assert status == "completed"
    assert output == (a.pw_uid, a.pw_gid, None)
    assert file_uid == a.pw_uid and user == USERS[0]
    assert method == "vmhwm"


def a_floods(server, submitted):
    with ezpq.Queue(address=server.address, authkey=server.key, qid="flood") as Q:
        for _ in range(20):
            Q.put(time.sleep, 0.2)
        submitted.set()
        Q.wait()
        return sorted(j["started"] for j in Q.collect())


def b_submits_two(server):
    with ezpq.Queue(address=server.address, authkey=server.key, qid="small") as Q:
        jobs = Q.map(time.sleep, [0.2, 0.2])
    return sorted(j["started"] for j in jobs)


def test_fair_share_between_users(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    submitted = FORK.Event()
    pa, out = start_as(a, a_floods, server, submitted)
    assert submitted.wait(60)
    b_started = run_as(b, b_submits_two, server)
    kind, a_started = out.get(timeout=120)
    pa.join(10)
    assert kind == "ok", a_started
    assert max(b_started) < a_started[4]  # both of B's before A's 5th
