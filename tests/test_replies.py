"""Deferred replies: a parked get(wait=True) is answered by whoever finishes its job,
exactly once, and a parked call whose client leaves takes nothing with it."""

import multiprocessing
import threading
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.client.connection import Remote
from jobs import square, wait_for_file
from server_fixture import Server


def _until(predicate, limit=10.0):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def server():
    s = Server("unix")
    yield s
    assert s.stop() in (0, None)


def _parked(server):
    """Parked calls on the server: each open Queue parks one (its notice
    reader's take_notices) besides the waits a test makes."""
    return Remote(server.address, server.key).call("info")["parked_calls"]


def test_a_get_that_times_out_leaves_the_job_for_the_next_get(tmp_path):
    gate = str(tmp_path / "gate")
    with ezpq.Queue(1) as Q:
        job_id = Q.put(wait_for_file, gate)
        assert Q.get(timeout=0.2) is None
        assert Q.size() == 1
        open(gate, "w").close()
        job = Q.get(wait=True)
        assert (job["id"], job["output"], job["status"]) == (job_id, True, "completed")
        assert Q.size() == 0


def test_parked_gets_on_one_qid_each_take_a_different_job(server, tmp_path):
    gate = str(tmp_path / "gate")
    with ezpq.Queue(address=server.address, authkey=server.key, qid="shared") as Q:
        ids = [Q.put(wait_for_file, gate) for _ in range(2)]
        got, getters = [], []
        queues = [ezpq.Queue(address=server.address, authkey=server.key, qid="shared") for _ in range(2)]
        _until(lambda: _parked(server) == 3)   # three notice readers
        for G in queues:
            getters.append(G)
            t = threading.Thread(target=lambda G=G: got.append(G.get(wait=True)))
            t.start()
            getters.append(t)
        _until(lambda: _parked(server) == 5)
        open(gate, "w").close()
        for t in getters[1::2]:
            t.join(30)
        assert sorted(j["id"] for j in got) == sorted(ids)
        assert Q.size() == 0
        for G in getters[0::2]:
            G.detach()


def _get_forever(address, key):
    with ezpq.Queue(address=address, authkey=key, qid="shared") as Q:
        Q.get(wait=True)


def test_a_client_killed_in_a_parked_get_takes_nothing(server, tmp_path):
    gate = str(tmp_path / "gate")
    with ezpq.Queue(address=server.address, authkey=server.key, qid="shared") as Q:
        job_id = Q.put(wait_for_file, gate)
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=_get_forever, args=(server.address, server.key))
        _until(lambda: _parked(server) == 1)   # Q's notice reader
        p.start()
        _until(lambda: _parked(server) == 3)   # + the client's notice reader and its get
        p.kill()
        p.join(10)
        _until(lambda: _parked(server) == 1)  # both withdrawn as their connections closed
        open(gate, "w").close()
        job = Q.get(wait=True)
        assert (job["id"], job["output"]) == (job_id, True)


def test_a_parked_get_is_answered_by_a_cancel_on_another_connection(server, tmp_path):
    gate = str(tmp_path / "never")
    with ezpq.Queue(address=server.address, authkey=server.key, qid="c") as Q:
        job_id = Q.put(wait_for_file, gate)
        got = []
        t = threading.Thread(target=lambda: got.append(Q.get(wait=True)))
        t.start()
        _until(lambda: _parked(server) == 2)   # its notice reader and the get
        other = ezpq.Queue(address=server.address, authkey=server.key, qid="c")
        assert other.cancel(job_id)
        t.join(30)
        assert got and (got[0]["id"], got[0]["status"]) == (job_id, "cancelled")
        other.detach()


def test_put_then_refuses_what_is_not_exposed_and_adds_nothing():
    with ezpq.Queue(1) as Q:
        Q.wait()
        remote = Remote(Q._remote.address, Q._server.authkey, shared=False)
        record = dict(Q._record(ezpq.Job(square, 3)), id=99)
        for method in ("put_then", "__init__", "_key"):
            with pytest.raises(AttributeError):
                remote.call("put_then", Q.qid, [record], method, [])
        assert Q.size() == 0
