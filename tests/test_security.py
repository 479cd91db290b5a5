"""Issue 10: every trust boundary of a shared ezpq server, attacked for real.

One adversarial test (or a few) per item of the issue, each doing the attack
against a real root ``ezpq-server`` on a Unix socket, with throwaway users
(``tests/multiuser.py``) where another user matters; each asserts that the
attack fails and that the server keeps serving another user promptly.

Sections: jobs against their worker and the supervisor; clients and
strangers against the transport; clients against the state (inputs);
the files a root server touches. Each section has its own server fixture.
"""

import csv
import functools
import math
import os
import pwd
import resource
import select
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid

import psutil
import pytest

import ezpq_mgr as ezpq
from ezpq_mgr import serialize, wire
from ezpq_mgr.server import accounting, service
from ezpq_mgr.server.accounting import AccountingLog, report
from ezpq_mgr.client.connection import Remote
from ezpq_mgr.errors import ConnectionError as EzpqConnectionError
from ezpq_mgr.job import JobRecord, JobStatus
from ezpq_mgr.server.state import QueueInfo
from conftest import START_METHODS
from jobs import square
from server_fixture import Server, terminate

from multiuser import FORK, USERS, become, needs_root, run_as, start_as, users  # noqa: F401 (fixture)


# ============================================================================
# Jobs against their worker and the supervisor
# ============================================================================
# Attacks on the worker side of the trust boundary (issue 10, items 1, 2,
# 4, 5, 10b, 15, 20), each done for real against a root ``ezpq-server`` on a
# Unix socket with throwaway users, each asserting the attack fails and that
# another user is still served promptly.
#
# Job functions are nested functions (cloudpickle sends them by value), so a
# worker never has to import this module.


SECRET_ENV = "EZPQ_SERVER_SECRET_FOR_TEST"


@pytest.fixture(params=START_METHODS)
def worker_server(users, monkeypatch, request):
    """A root server; its start method serves root's own jobs (another
    user's worker is exec'd whatever it says)."""
    monkeypatch.setenv(SECRET_ENV, "server-secret-" + uuid.uuid4().hex)
    s = Server("unix", workers=2, start_method=request.param)
    os.chmod(s.dir, 0o777)  # jobs leave their pid files there
    try:
        yield s
        assert s.stop() == 0  # SIGTERM still stops it
    finally:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


def _queue(worker_server, qid=None):
    return ezpq.Queue(address=worker_server.address, authkey=worker_server.key, qid=qid)


def _wait_for(predicate, timeout, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ helpers run as a user
def quick_job_latency(worker_server, n=60, timeout=10):
    """p50 seconds of put -> get(wait) of a no-op job (as the calling user)."""
    times = []
    with _queue(worker_server, "lat-" + uuid.uuid4().hex[:6]) as Q:
        Q.put(int)  # warm up this user's worker
        assert Q.get(wait=True, timeout=timeout) is not None
        for _ in range(n):
            t0 = time.perf_counter()
            Q.put(int)
            job = Q.get(wait=True, timeout=timeout)
            assert job is not None and job["status"] == "completed", job
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_quick_job(worker_server):
    t0 = time.monotonic()
    with _queue(worker_server) as Q:
        Q.put(int, args=[7])
        job = Q.get(wait=True, timeout=10)
    return job and job["status"], job and job["output"], time.monotonic() - t0


def write_to_channels(payload, then_sleep):
    """Job body: write ``payload`` to every pipe/socket the job can find."""
    def job():
        import os as _os
        import time as _time
        written = []
        for name in _os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2:
                continue
            try:
                target = _os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(("pipe:", "socket:")):
                try:
                    _os.set_blocking(fd, False)
                    _os.write(fd, payload)
                    written.append(fd)
                except OSError:
                    pass
        if then_sleep:
            _time.sleep(then_sleep)
        return written
    return job


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def evil_pickle_frame(path):
    import pickle
    import struct
    body = pickle.dumps(_Marker(path))
    # every result framing the server ever used: a 4-byte big-endian length
    return struct.pack("!i", len(body)) + body


def a_sends_payload(worker_server, payload, then_sleep, timeout):
    with _queue(worker_server, "attack") as Q:
        Q.put(write_to_channels(payload, then_sleep), timeout=timeout)
        job = Q.get(wait=True, timeout=30)
    return job and {k: job[k] for k in ("status", "exception", "exitcode")}


# ----------------------------------------------------------------------- item 1
@needs_root
def test_pickle_written_to_the_worker_pipe_runs_nothing_as_root(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    marker = os.path.join(worker_server.dir, "root-marker-" + uuid.uuid4().hex)
    job = run_as(a, a_sends_payload, worker_server, evil_pickle_frame(marker), 0, 0)
    assert not os.path.exists(marker)
    assert job["status"] == "failed" and "protocol violation" in (job["exception"] or ""), job
    status, output, took = run_as(b, one_quick_job, worker_server)
    assert (status, output) == ("completed", 7)


# ----------------------------------------------------------------------- item 2
def b_runs_a_real_job(worker_server, started):
    with _queue(worker_server, "victim") as Q:
        Q.put(time.sleep, args=[2])
        started.set()
        job = Q.get(wait=True, timeout=30)
    return job["status"], job["output"], job["exception"]


def forged_results(max_seq):
    """Frames claiming seqs 0..max_seq completed with the output 'forged'."""
    import pickle
    import struct
    frames = b""
    for seq in range(max_seq):
        body = pickle.dumps((seq, "completed", 0, pickle.dumps("forged"), None, 1, 1.0, 2.0,
                             (0.0, 0.0, 1, "vmhwm", None)))
        frames += struct.pack("!i", len(body)) + body
    return frames


@needs_root
def test_a_job_cannot_forge_another_users_result(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    started = FORK.Event()
    pb, out = start_as(b, b_runs_a_real_job, worker_server, started)
    assert started.wait(30)
    time.sleep(0.3)  # B's job is running
    job = run_as(a, a_sends_payload, worker_server, forged_results(40), 0, 0)
    assert job["status"] == "failed" and "protocol violation" in (job["exception"] or ""), job
    kind, (status, output, exc) = out.get(timeout=30)
    pb.join(10)
    assert kind == "ok"
    assert output != "forged"
    assert (status, output) == ("completed", None), exc
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------------------------------ items 4 and 20
def b_holds_a_secret(worker_server, token, started):
    with _queue(worker_server, "secret") as Q:
        Q.put(time.sleep, args=[4], name="B-JOB-ARGS:" + token)
        Q.put(lambda s: len(s), args=["B-JOB-ARGS:" + token])  # waits: bytes in the server
        started.set()
        Q.collect()
        Q.wait()


def a_inspects_its_worker(worker_server, token, secret_env):
    def job(token, secret_env):
        import os as _os
        import socket as _socket
        fds = {}
        for name in _os.listdir("/proc/self/fd"):
            try:
                fds[int(name)] = _os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass
        listening = []
        for fd, target in fds.items():
            if target.startswith("socket:"):
                try:
                    s = _socket.socket(fileno=_os.dup(fd))
                    try:
                        if s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
                            listening.append(fd)
                    finally:
                        s.close()
                except OSError:
                    pass
        env = dict(_os.environ)
        needle = token.encode()
        prefix = b"B-JOB-ARGS:"
        hits = 0
        with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
            for line in maps:
                parts = line.split()
                if "r" not in parts[1] or (len(parts) > 5 and parts[5].startswith("[v")):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                try:
                    mem.seek(lo)
                    data = mem.read(hi - lo)
                except (OSError, ValueError, OverflowError):
                    continue
                i = data.find(needle)
                while i >= 0:
                    if data[max(0, i - len(prefix)):i] == prefix:
                        hits += 1
                    i = data.find(needle, i + 1)
                del data
        return {"fds": fds, "listening": listening, "pid": _os.getpid(),
                "env_keys": sorted(env), "secret": secret_env in env or any(
                    "server-secret-" in v for v in env.values()), "hits": hits}

    with _queue(worker_server, "inspect") as Q:
        Q.put(job, args=[token, secret_env])
        got = Q.get(wait=True, timeout=60)
    assert got["status"] == "completed", got["exception"]
    return got["output"]


@needs_root
def test_a_job_sees_no_server_descriptor_memory_or_environment(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    token = uuid.uuid4().hex
    started = FORK.Event()
    pb, out = start_as(b, b_holds_a_secret, worker_server, token, started)
    assert started.wait(30)
    seen = run_as(a, a_inspects_its_worker, worker_server, token, SECRET_ENV)
    kind, _ = out.get(timeout=60)
    pb.join(10)
    assert kind == "ok"
    assert seen["hits"] == 0, "another user's job is in this job's memory"
    assert not seen["secret"] and SECRET_ENV not in seen["env_keys"]
    assert not {"EZPQ_TEST_SESSION", "PYTHONPATH"} & set(seen["env_keys"]), seen["env_keys"]
    assert not seen["listening"]
    pid = seen["pid"]
    others = {fd: t for fd, t in seen["fds"].items()
              if fd > 2 and not t.startswith(f"/proc/{pid}/")}
    # the worker channel, its lifeline and the write ends of its jobs' four
    # output pipes (joblogs.py): nothing else of the server's
    assert len(others) <= 6 and all(t.startswith(("socket:", "pipe:")) for t in others.values()), others
    assert not any(worker_server.dir in t for t in seen["fds"].values())  # no accounting log, no socket
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ----------------------------------------------------------------------- item 5
PAYLOADS = {
    "garbage": (b"\xff" * 64, 0),
    "partial-header": (b"\x00\x00", 30),
    "non-pickle": (b"\x00\x00\x00\x05hello", 0),
    # a well-formed header announcing 2 GiB: refused before anything is stored
    "oversize": (bytes([1, 3, 0, 0]) + (1 << 31).to_bytes(4, "big") + b"x" * 1000, 30),
}


@needs_root
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_bad_frames_from_a_job_freeze_nothing(worker_server, users, kind):
    a, b = users[USERS[0]], users[USERS[1]]
    idle = run_as(b, quick_job_latency, worker_server)
    payload, then_sleep = PAYLOADS[kind]
    pa, out = start_as(a, a_sends_payload, worker_server, payload, then_sleep, 0)
    time.sleep(0.3)  # the attack is under way
    busy = run_as(b, quick_job_latency, worker_server)
    assert Remote(worker_server.address, worker_server.key).call("info")["workers"] == 2
    got, job = out.get(timeout=60)
    pa.join(10)
    assert got == "ok", job
    assert job["status"] == "failed" and "protocol violation" in (job["exception"] or ""), job
    idle = max(idle, run_as(b, quick_job_latency, worker_server))  # idle again: the machine is shared
    assert busy <= 2 * idle + 0.002, (busy, idle)
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ---------------------------------------------------------------------- item 10b
def a_stops_its_idle_worker_then_sends_5mb(worker_server):
    def stop_me_later():
        import _thread
        import os as _os
        import signal as _signal
        import time as _time

        def later():
            _time.sleep(0.3)
            _os.kill(_os.getpid(), _signal.SIGSTOP)
        # a thread ``threading`` does not know of (a Python thread would make
        # the worker leave after the job); stopped, the worker burns no CPU
        _thread.start_new_thread(later, ())
        return _os.getpid()

    with _queue(worker_server, "stopper") as Q:
        Q.put(stop_me_later)
        first = Q.get(wait=True, timeout=10)
        assert first["status"] == "completed", first
        pid = first["output"]
        assert _wait_for(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 5)
        Q.put(len, args=[b"x" * (5 << 20)], timeout=4)
        second = Q.get(wait=True, timeout=30)
    return pid, second["status"]


@needs_root
def test_a_sigstopped_worker_stalls_only_its_own_job(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    idle = run_as(b, quick_job_latency, worker_server)
    pa, out = start_as(a, a_stops_its_idle_worker_then_sends_5mb, worker_server)
    time.sleep(1.0)  # the worker is stopped, the 5 MB job dispatched to it
    busy = run_as(b, quick_job_latency, worker_server)
    assert Remote(worker_server.address, worker_server.key).call("info")["workers"] == 2
    kind, got = out.get(timeout=60)
    pa.join(10)
    assert kind == "ok", got
    assert got[1] == "timeout"
    idle = max(idle, run_as(b, quick_job_latency, worker_server))  # idle again: the machine is shared
    assert busy <= 2 * idle + 0.002, (busy, idle)
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ----------------------------------------------------------------------- item 15
def a_forks_and_exits(worker_server):
    def job(directory):
        import os as _os
        import time as _time
        pid = _os.fork()
        if pid == 0:
            with open(_os.path.join(directory, f"child-{_os.getpid()}"), "w"):
                pass
            _time.sleep(20)
            _os._exit(0)
        while not any(n.startswith("child-") for n in _os.listdir(directory)):
            _time.sleep(0.01)
        _os._exit(0)

    directory = os.path.join(worker_server.dir, "fork-exit")
    os.mkdir(directory)
    with _queue(worker_server, "forker") as Q:
        t0 = time.monotonic()
        Q.put(job, args=[directory])
        got = Q.get(wait=True, timeout=30)
        took = time.monotonic() - t0
    pids = [int(n.split("-")[1]) for n in os.listdir(directory)]
    return took, got["status"], got["exception"], pids


@needs_root
def test_fork_then_exit_is_reported_at_once_and_leaves_no_child(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    took, status, exc, pids = run_as(a, a_forks_and_exits, worker_server)
    assert pids
    assert took < 3, (took, status, exc)
    assert status in ("lost", "killed", "failed"), status
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 2), pids
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


def a_spawns_respawning_children(worker_server):
    def job(directory, n):
        import os as _os
        import signal as _signal
        import time as _time

        def child():
            def respawn(*_):
                if _os.fork() == 0:
                    child()
            _signal.signal(_signal.SIGTERM, respawn)
            with open(_os.path.join(directory, f"child-{_os.getpid()}"), "w"):
                pass
            while True:
                _time.sleep(0.05)

        for _ in range(n):
            if _os.fork() == 0:
                try:
                    child()
                finally:
                    _os._exit(0)
        while len(_os.listdir(directory)) < n:
            _time.sleep(0.01)
        _time.sleep(60)

    directory = os.path.join(worker_server.dir, "respawn")
    os.mkdir(directory)
    with _queue(worker_server, "respawner") as Q:
        Q.put(job, args=[directory, 20], timeout=1.5)
        got = Q.get(wait=True, timeout=30)
    pids = [int(n.split("-")[1]) for n in os.listdir(directory)]
    return got["status"], got["exitcode"], pids


@needs_root
def test_respawning_children_are_all_killed(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    status, exitcode, pids = run_as(a, a_spawns_respawning_children, worker_server)
    assert status == "timeout" and len(pids) >= 20
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 2), [p for p in pids if _alive(p)]
    assert exitcode == -signal.SIGKILL
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


def a_ignores_sigterm(worker_server):
    def job():
        import signal as _signal
        import time as _time
        _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
        _time.sleep(30)

    with _queue(worker_server, "stubborn") as Q:
        Q.put(job, timeout=0.5)
        got = Q.get(wait=True, timeout=30)
    return got["status"], got["exitcode"]


@needs_root
def test_a_job_ignoring_sigterm_reports_the_signal_that_ended_it(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    assert run_as(a, a_ignores_sigterm, worker_server) == ("timeout", -signal.SIGKILL)
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------- the job's working directory, as the user
def a_submits_from(worker_server, connected, go):
    with _queue(worker_server, "cwd") as Q:   # its working directory goes with the hello
        connected.set()
        assert go.wait(30)
        Q.put(os.getcwd)
        got = Q.get(wait=True, timeout=30)
    return got["status"], got["exception"]


@needs_root
def test_a_working_directory_the_user_cannot_enter_fails_the_job_with_the_reason(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    directory = os.path.join(worker_server.dir, "root-only")
    os.mkdir(directory, 0o755)
    connected, go = FORK.Event(), FORK.Event()
    pa, out = start_as(a, a_submits_from, worker_server, connected, go, cwd=directory)
    assert connected.wait(30)
    os.chmod(directory, 0o700)  # root's now: the worker must not enter it as A
    go.set()
    kind, got = out.get(timeout=60)
    pa.join(10)
    assert kind == "ok", got
    status, exc = got
    assert status == "failed" and "working directory" in exc and directory in exc, got
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------- a job that shuts its worker's channel down
def a_shuts_the_channel_then_submits(worker_server):
    def shut():
        import os as _os
        import socket as _socket
        for name in _os.listdir("/proc/self/fd"):
            try:
                if _os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    s = _socket.socket(fileno=_os.dup(int(name)))
                    s.shutdown(_socket.SHUT_RD)
                    s.close()
            except OSError:
                pass
        return "shut"

    with _queue(worker_server, "shut") as Q:
        Q.put(shut)
        first = Q.get(wait=True, timeout=10)
        Q.put(int, args=[5])
        second = Q.get(wait=True, timeout=20)
        Q.put(int, args=[6])
        third = Q.get(wait=True, timeout=20)
    return [(j["status"], j["output"], j["exception"]) for j in (first, second, third)]


@needs_root
def test_a_job_that_shuts_its_channel_down_stalls_nothing(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    first, second, third = run_as(a, a_shuts_the_channel_then_submits, worker_server)
    assert first[:2] == ("completed", "shut")
    assert second[:2] == ("completed", 5) or (second[0] == "failed" and "protocol violation" in second[2])
    assert third[:2] == ("completed", 6)
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------- the server's own user: forked, yet nothing inherited
def own_worker_descriptors():
    import os as _os
    import socket as _socket
    fds, listening = {}, []
    for name in _os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = target = _os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            s = _socket.socket(fileno=_os.dup(int(name)))
            try:
                if s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
                    listening.append(int(name))
            finally:
                s.close()
    return _os.getpid(), fds, listening


@needs_root
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_own_user_workers_keep_only_their_channel(method):
    with ezpq.Queue(n_workers=1, start_method=method) as Q:
        Q.put(own_worker_descriptors)
        job = Q.get(wait=True, timeout=60)
    assert job["status"] == "completed", job["exception"]
    pid, fds, listening = job["output"]
    assert not listening
    # /proc and the files in it: the worker's own readings (its memory sampler
    # thread lists /proc and reads /proc/*/stat while the job runs), opened
    # by it, never inherited
    others = {fd: t for fd, t in fds.items() if fd > 2 and t != "/proc" and not t.startswith("/proc/")}
    # (+ the write ends of its jobs' four output pipes, joblogs.py)
    assert len(others) <= 6 and all(t.startswith(("socket:", "pipe:")) for t in others.values()), others


# ------------------------------------------- nothing outlives a job that completed
def a_leaves_processes_behind(worker_server):
    def job():
        import os as _os
        import subprocess as _subprocess
        import time as _time
        child = _subprocess.Popen(["sleep", "30"]).pid
        r, w = _os.pipe()
        if _os.fork() == 0:          # a daemon: double fork, own session
            _os.setsid()
            pid = _os.fork()
            if pid == 0:
                _time.sleep(30)
                _os._exit(0)
            _os.write(w, str(pid).encode())
            _os._exit(0)
        daemon = int(_os.read(r, 32))
        return child, daemon

    with _queue(worker_server, "leaver") as Q:
        Q.put(job)
        got = Q.get(wait=True, timeout=20)
    return got["status"], got["output"]


@needs_root
def test_processes_a_completed_job_left_running_are_killed(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    status, pids = run_as(a, a_leaves_processes_behind, worker_server)
    assert status == "completed"
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 2), [p for p in pids if _alive(p)]
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------- a SIGKILLed server leaves no worker and no job process
def a_starts_a_long_job(worker_server, directory, started):
    def job(directory):
        import os as _os
        import subprocess as _subprocess
        import time as _time
        child = _subprocess.Popen(["sleep", "30"])
        with open(_os.path.join(directory, f"pids-{_os.getpid()}-{child.pid}"), "w"):
            pass
        _time.sleep(30)

    Q = _queue(worker_server, "long")
    Q.put(job, args=[directory])
    started.set()
    Q.detach()


@needs_root
def test_a_killed_server_leaves_no_user_worker_behind(users):
    a = users[USERS[0]]
    s = Server("unix", workers=2, start_method="fork")
    try:
        directory = os.path.join(s.dir, "long")
        os.mkdir(directory)
        os.chmod(directory, 0o777)
        started = FORK.Event()
        run_as(a, a_starts_a_long_job, s, directory, started)
        assert _wait_for(lambda: os.listdir(directory), 10)
        pids = [int(x) for x in os.listdir(directory)[0].split("-")[1:]]
        assert all(_alive(p) for p in pids)
        s.proc.kill()
        s.proc.wait(10)
        assert _wait_for(lambda: not any(_alive(p) for p in pids), 3), [p for p in pids if _alive(p)]
    finally:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


# ------------------------------------------- a user whose worker cannot start
@needs_root
def test_a_user_whose_worker_cannot_start_gets_failed_jobs_not_a_spawn_loop(worker_server, users):
    import types
    ghost = types.SimpleNamespace(pw_uid=54321, pw_gid=54321)  # no passwd entry: cannot drop to it
    t0 = time.monotonic()
    status, output, took = run_as(ghost, one_quick_job, worker_server)
    assert status == "failed", (status, output)
    assert time.monotonic() - t0 < 20
    assert run_as(users[USERS[1]], one_quick_job, worker_server)[:2] == ("completed", 7)



# ------------------------------------------- a job that says it is done and runs on (issue 10c)
def forged_frames(figures_too):
    """A RESULT for the job in hand (output 'forged', figures to follow) and,
    ``figures_too``, the FIGURES that complete it: what a job can write to
    its own worker's channel before it has really finished."""
    import pickle
    from ezpq_mgr.worker import workerproto
    from ezpq_mgr.messages import Figures, LateFigures, Result
    now = time.time()
    frames = workerproto.encode_result(*Result("completed", 0, now, now, pickle.dumps("forged"), None, None,
                                               False))
    if figures_too:
        frames += workerproto.encode_figures(*LateFigures(Figures(0.0, 0.0, 4096, "vmhwm", None), False))
    return frames


def forge_then(frames, directory, then):
    """Job body: write ``frames`` to its worker's channel, leave a pid file
    in ``directory``, then go on: ``sleep``, ``memory`` (touch 300 MB and
    sleep), ``loop`` (burn CPU), ``child`` (a child burns CPU, we sleep).
    Everything ends by itself after 25 s, killed or not."""
    def job():
        import os as _os
        import time as _time
        for name in _os.listdir("/proc/self/fd"):
            try:
                if _os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    _os.write(int(name), frames)
            except OSError:
                pass
        end = _time.monotonic() + 25
        pids = [_os.getpid()]
        if then == "child":
            pid = _os.fork()
            if pid == 0:
                while _time.monotonic() < end:
                    pass
                _os._exit(0)
            pids.append(pid)
        with open(_os.path.join(directory, "pids-" + "-".join(map(str, pids))), "w"):
            pass
        block = b"\x01" * (300 << 20) if then == "memory" else None
        while _time.monotonic() < end:
            if then != "loop":
                _time.sleep(0.05)
        del block
        return "real"
    return job


def _pids_in(directory):
    names = [n for n in os.listdir(directory) if n.startswith("pids-")]
    return [int(x) for x in names[0].split("-")[1:]] if names else []


LIMITS = {"timeout": {"timeout": 1.5}, "max_memory": {"max_memory": 150 << 20}, "cancel": {}}


def a_forges_its_result_under_a_limit(worker_server, limit):
    """A's job sends a forged result and runs on; A's next job is put once
    the forgery is in (so it is handed to the same worker, as the worker
    looks free); with ``cancel``, A then cancels the first."""
    directory = os.path.join(worker_server.dir, "forge-" + limit)
    os.mkdir(directory)
    with _queue(worker_server, "forger") as Q:
        first = Q.put(forge_then(forged_frames(False), directory, "memory" if limit == "max_memory" else "sleep"),
                      **LIMITS[limit])
        assert _wait_for(lambda: _pids_in(directory), 20)
        second = Q.put(int, args=[5])
        time.sleep(0.2)  # both are in the server: the second is handed to the forger's worker
        cancelled = Q.cancel(first) if limit == "cancel" else None
        jobs = {}
        for _ in range(2):
            job = Q.get(wait=True, timeout=15)
            if job is not None:
                jobs[job["id"]] = (job["status"], job["output"], job["exception"])
    return jobs.get(first), jobs.get(second), _pids_in(directory), cancelled


@needs_root
@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_a_job_that_forges_its_result_stays_under_its_limits(worker_server, users, limit):
    a, b = users[USERS[0]], users[USERS[1]]
    first, second, pids, cancelled = run_as(a, a_forges_its_result_under_a_limit, worker_server, limit)
    assert cancelled in (None, True), "cancel() refused: the job is still running"
    expected = {"timeout": "timeout", "max_memory": "killed", "cancel": "cancelled"}[limit]
    assert first is not None and first[0] == expected and first[1] != "forged", (first, second)
    if limit == "max_memory":
        assert "max_memory" in first[2], first
    assert second == ("completed", 5, None), (first, second)   # not lost, not charged with the kill
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 3), pids
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


def a_forges_its_figures_then_burns(worker_server, then):
    directory = os.path.join(worker_server.dir, "burn-" + then)
    os.mkdir(directory)
    with _queue(worker_server, "burner") as Q:
        Q.put(forge_then(forged_frames(True), directory, then))
        job = Q.get(wait=True, timeout=20)
        t0 = time.monotonic()
        assert _wait_for(lambda: _pids_in(directory), 10)
    return job and (job["status"], job["output"]), _pids_in(directory), t0


@needs_root
@pytest.mark.parametrize("then", ["loop", "child"])
def test_a_worker_counted_idle_that_burns_cpu_is_ended(worker_server, users, then):
    """Result and figures forged, the job burns CPU on (or its child does):
    the server counts the worker idle, so it must see for itself that an
    idle worker of another user burns no CPU, and end it within seconds."""
    a, b = users[USERS[0]], users[USERS[1]]
    job, pids, t0 = run_as(a, a_forges_its_figures_then_burns, worker_server, then)
    assert job == ("completed", "forged")   # its own job: what it says about it stands
    assert pids
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 10), \
        f"{[p for p in pids if _alive(p)]} still burning {time.monotonic() - t0:.1f} s after its job ended"
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------- a job's thread outlives it (issue 10c)
def a_leaves_a_thread(worker_server, daemon):
    def job(daemon):
        import os as _os
        import threading as _threading
        import time as _time

        def forever():
            while True:
                _time.sleep(0.05)
        _threading.Thread(target=forever, daemon=daemon).start()
        return _os.getpid()

    with _queue(worker_server, "threads") as Q:
        Q.put(job, args=[daemon])
        first = Q.get(wait=True, timeout=20)
        Q.put(os.getpid)
        second = Q.get(wait=True, timeout=20)
    return [(j["status"], j["output"]) for j in (first, second)]


@needs_root
@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "non-daemon"])
def test_a_worker_left_with_a_jobs_thread_is_not_reused(worker_server, users, daemon):
    a, b = users[USERS[0]], users[USERS[1]]
    (s1, pid1), (s2, pid2) = run_as(a, a_leaves_a_thread, worker_server, daemon)
    assert s1 == s2 == "completed"
    assert pid2 != pid1                      # the next job ran in a fresh worker
    assert _wait_for(lambda: not _alive(pid1), 5), pid1
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)


# ------------------------------------------- a retired worker that does not leave (issue 10c)
def stop_my_worker_soon():
    """Job body: a thread of it SIGSTOPs the worker once the job returned, so
    the worker never reads the STOP it is sent when it is retired."""
    def job():
        import os as _os
        import signal as _signal
        import threading as _threading
        import time as _time

        def later():
            _time.sleep(1.0)
            _os.kill(_os.getpid(), _signal.SIGSTOP)
        _threading.Thread(target=later, daemon=True).start()
        _time.sleep(0.5)  # the other worker takes the other job meanwhile
        return _os.getpid()
    return job


def _stopped(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def retire_a_stopped_worker(Q, set_workers):
    """Stop both of the queue's two workers (the job above on each), then
    drop to one worker: one of them is retired and must be gone within
    seconds, although it never reads its STOP. The one kept is let go on
    (SIGCONT) and serves the next job. Returns (whether one was gone,
    seconds it took, the next job's status and output)."""
    Q.put(stop_my_worker_soon())
    Q.put(stop_my_worker_soon())
    jobs = [Q.get(wait=True, timeout=60), Q.get(wait=True, timeout=60)]
    assert all(j and j["status"] == "completed" for j in jobs), jobs
    pids = {j["output"] for j in jobs}
    assert len(pids) == 2, pids
    assert _wait_for(lambda: all(_stopped(p) for p in pids), 5), pids
    t0 = time.monotonic()
    set_workers(1)
    gone = _wait_for(lambda: any(not _alive(p) for p in pids), 15)
    took = time.monotonic() - t0
    for pid in pids:   # ours (root's own workers, or this user's): let the kept one run on
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)
    Q.put(int, args=[5])
    after = Q.get(wait=True, timeout=60)
    return gone, took, after and (after["status"], after["output"])


@needs_root
def test_a_retired_worker_that_does_not_exit_is_killed_root_server(worker_server):
    """The root server's own workers (the fixture's start method)."""
    server = Remote(worker_server.address, worker_server.key)   # root: the server's workers
    with _queue(worker_server, "retire") as Q:
        gone, took, after = retire_a_stopped_worker(Q, lambda n: server.call("set_workers", n))
    assert gone, f"the retired worker is still there {took:.1f} s after it was retired"
    assert after == ("completed", 5)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_retired_worker_that_does_not_exit_is_killed_embedded(method):
    with ezpq.Queue(n_workers=2, start_method=method) as Q:
        gone, took, after = retire_a_stopped_worker(Q, Q.set_workers)
    assert gone, f"the retired worker is still there {took:.1f} s after it was retired"
    assert after == ("completed", 5)


# ------------------------------------------- a job forges its own figures (issue 10d)
def a_forges_its_figures(worker_server):
    def job():
        import time as _time
        from ezpq_mgr.worker import workerproto as _wp
        from ezpq_mgr.messages import Figures as _Figures
        real = _wp.encode_figures
        # every LateFigures its worker sends from now on says: no CPU, 4 KiB
        _wp.encode_figures = lambda figures, *a, **k: real(_Figures(0.001, 0.0, 4096, "vmhwm", None), *a, **k)
        t0 = _time.process_time()
        while _time.process_time() - t0 < 1.0:
            pass
        block = b"\x01" * (200 << 20)
        del block
        return "done"

    with _queue(worker_server, "figures") as Q:
        Q.put(job)
        got = Q.get(wait=True, timeout=30)
    return {k: got[k] for k in ("status", "output", "cpu_user", "cpu_system", "max_rss")}


@needs_root
def test_a_job_cannot_forge_its_cpu_and_memory_figures(worker_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    got = run_as(a, a_forges_its_figures, worker_server)
    assert (got["status"], got["output"]) == ("completed", "done"), got
    assert got["cpu_user"] + got["cpu_system"] >= 0.9, got
    assert got["max_rss"] >= 200 << 20, got

    def row():
        with open(worker_server.log_file, newline="") as f:
            return next((r for r in csv.DictReader(f) if r["user"] == USERS[0]), None)  # A's one job
    assert _wait_for(row, 10)
    logged = row()
    assert float(logged["cpu_user"]) + float(logged["cpu_system"]) >= 0.9, logged
    assert int(logged["max_rss"]) >= 200 << 20, logged
    assert run_as(b, one_quick_job, worker_server)[:2] == ("completed", 7)

# ============================================================================
# Clients and strangers against the transport
# ============================================================================
# Issue 10, the client<->server transport: attacks on a real root
# ``ezpq-server --socket`` (throwaway users where a second uid matters).
#
# Each test does the attack for real, asserts that it fails, and that the
# server keeps serving another client within 1 s afterwards.


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = next(p for p in sys.path if p.endswith("site-packages"))
#: A world-readable interpreter: the venv's lives under /root (mode 0700).
SYSTEM_PYTHON = "/usr/bin/python3"


class LoggedServer:
    """A real ``ezpq-server`` whose log we can read; run as ``user`` if given."""

    def __init__(self, extra=(), user=None, workers=2, code=None):
        self.dir = tempfile.mkdtemp(prefix="ezpq-tsrv-")
        os.chmod(self.dir, 0o755)
        self.keyfile = os.path.join(self.dir, "key")
        self.address = os.path.join(self.dir, "s.sock")
        self.log_path = os.path.join(self.dir, "server.log")
        code = code or "from ezpq_mgr.cli import server_main; server_main()"
        cmd = [sys.executable, "-c", code, "--socket", self.address, "--workers", str(workers),
               "--authkey-file", self.keyfile, "--start-method", "fork", "--log-level", "WARNING", *extra]
        env = dict(os.environ)
        preexec = None
        if user is not None:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            cmd[0] = SYSTEM_PYTHON
            env["PYTHONPATH"] = os.pathsep.join([ROOT, SITE])
            env["HOME"] = self.dir
            preexec = functools.partial(become, user)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stderr=self.log, env=env, preexec_fn=preexec, cwd=self.dir)
        try:
            self._await(user)
        except BaseException:
            self.stop()
            raise

    def _await(self, user):
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "ezpq-server exited during start-up: " + self.text()
            assert time.monotonic() < deadline, "ezpq-server did not start: " + self.text()
            if os.path.exists(self.address) and os.path.exists(self.keyfile):
                self.key = open(self.keyfile, "rb").read().strip()
                if self.key and (user is not None or self._answers()):
                    break
            time.sleep(0.02)

    def _answers(self):
        try:
            Remote(self.address, self.key).call("info")
            return True
        except Exception:
            return False

    def text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        terminate(self.proc)
        self.log.close()
        subprocess.run(["rm", "-rf", self.dir])
        return self.proc.returncode


@pytest.fixture
def logged_server():
    s = LoggedServer()
    yield s
    assert s.stop() == 0, s.text()


def let_go(go, p):
    """Tell the attacker process ``p`` to let go (``go``) and reap it."""
    go.set()
    p.join(20)
    if p.is_alive():
        p.kill()
        p.join()


def served_within(logged_server, seconds=1.0):
    """A fresh client gets an answer within ``seconds``."""
    t0 = time.monotonic()
    Remote(logged_server.address, logged_server.key).call("info")
    return time.monotonic() - t0 < seconds


def vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# ------------------------------------------------------------ item 9: built-ins
BUILTINS = [("shutdown", ()), ("create", ("service",)), ("incref", ("0",)), ("decref", ("0",)),
            ("decref", ("0",)), ("decref", ("0",)), ("debug_info", ()), ("number_of_objects", ()),
            ("accept_connection", ("x",)), ("dummy", ())]


def stdlib_dispatch(address, key, name, args):
    """Call a manager built-in the way ``multiprocessing.managers`` does."""
    from multiprocessing import connection, managers
    from ezpq_mgr import wire
    client = managers.listener_client.get(getattr(wire, "SERIALIZER", None), (None, connection.Client))[1]
    conn = client(address, authkey=key)
    try:
        return managers.dispatch(conn, None, name, args)
    finally:
        conn.close()


@needs_root
def test_manager_builtins_are_refused(logged_server):
    keeper = Remote(logged_server.address, logged_server.key)
    keeper.call("info")  # a connected client whose next call must still work
    for name, args in BUILTINS:
        with pytest.raises(Exception):
            stdlib_dispatch(logged_server.address, logged_server.key, name, args)
        with pytest.raises(AttributeError, match="not exposed"):
            Remote(logged_server.address, logged_server.key).call(name, *args)
    assert logged_server.proc.poll() is None
    assert keeper.call("info")["shared"] is True
    assert served_within(logged_server)
    with ezpq.Queue(address=logged_server.address, authkey=logged_server.key, qid="after") as Q:
        Q.put(abs, -3)
        assert Q.get(wait=True, timeout=10)["output"] == 3


# ------------------------------------------------- item 10: a stopped client
BIG = 20 * 1024 * 1024


def big_result():
    time.sleep(0.3)
    return b"x" * BIG


def stopped_getter(address, key, ready_w):
    with ezpq.Queue(address=address, authkey=key, qid="big") as Q:
        Q.put(big_result)
        os.write(ready_w, b"1")
        Q.get(wait=True, timeout=60)


def put_get_latencies(Q, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        Q.put(abs, -1)
        job = Q.get(wait=True, timeout=10)
        assert job is not None and job["output"] == 1, job
        out.append(time.perf_counter() - t0)
    return out


@needs_root
def test_stopped_client_with_a_parked_20mb_answer_stalls_only_itself(logged_server):
    with ezpq.Queue(address=logged_server.address, authkey=logged_server.key, qid="fast") as Q:
        put_get_latencies(Q, 10)  # warm up
        idle = statistics.median(put_get_latencies(Q, 60))
        ready_r, ready_w = os.pipe()
        p = FORK.Process(target=stopped_getter, args=(logged_server.address, logged_server.key, ready_w))
        p.start()
        try:
            assert select.select([ready_r], [], [], 20)[0], "the big client did not start"
            remote = Remote(logged_server.address, logged_server.key)
            deadline = time.monotonic() + 10
            # parked: Q's notice reader, the big client's, and its get(wait=True)
            while remote.call("info")["parked_calls"] < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(p.pid, signal.SIGSTOP)
            # the 20 MB answer is sent to a client that does not read it
            deadline = time.monotonic() + 10
            while remote.call("info")["parked_calls"] > 2:
                assert time.monotonic() < deadline, "the big job never finished"
                time.sleep(0.01)
            done = []
            worker = threading.Thread(target=lambda: done.append(put_get_latencies(Q, 60)), daemon=True)
            worker.start()
            worker.join(30)
            assert done, "another client's put->get stalled behind the stopped client"
            busy = statistics.median(done[0])
            assert busy < 2 * idle + 0.002, (idle, busy)
            assert served_within(logged_server)
        finally:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.join(10)
            os.close(ready_r)
            os.close(ready_w)


# ------------------------------- item 11: idle unauthenticated connections
def hold_idle_connections(address, n, out, go):
    """As a user without the key: open ``n`` connections and say nothing."""
    socks, refused = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        try:
            s.connect(address)
            socks.append(s)
        except OSError:
            s.close()
            refused += 1
    out.put(("open", len(socks), refused))
    go.wait(60)
    deadline = time.monotonic() + 12
    pending = {s.fileno(): s for s in socks}
    for s in socks:
        s.setblocking(False)
    while pending and time.monotonic() < deadline:
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(100):
            try:
                while True:
                    if not pending[fd].recv(65536):
                        del pending[fd]
                        break
            except BlockingIOError:
                pass
            except OSError:
                del pending[fd]
    out.put(("closed", len(socks) - len(pending), time.monotonic()))
    for s in socks:
        s.close()


@needs_root
def test_idle_unauthenticated_connections_are_closed_and_others_served(logged_server, users):
    a = users[USERS[0]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    go = FORK.Event()
    try:
        out = FORK.Queue()
        p = FORK.Process(target=_as(a, hold_idle_connections), args=(logged_server.address, 1100, out, go))
        p.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        kind, opened, refused = out.get(timeout=60)
        assert kind == "open"
        t_open = time.monotonic()
        assert served_within(logged_server), "a real client was not served at once"
        with ezpq.Queue(address=logged_server.address, authkey=logged_server.key, qid="real") as Q:
            Q.put(abs, -2)
            assert Q.get(wait=True, timeout=10)["output"] == 2
        go.set()
        kind, closed, t_closed = out.get(timeout=30)
        assert closed == opened, f"{opened - closed} of {opened} idle connections still open"
        assert f"uid {a.pw_uid}" in logged_server.text() and "too many connections" in logged_server.text()
        assert "not authenticated within 5 s" in logged_server.text()
        assert t_closed - t_open < 10
        assert served_within(logged_server)
    finally:
        let_go(go, p)


def _as(pw, fn):
    def run(*args):
        become(pw)
        fn(*args)
    return run


@needs_root
def test_out_of_descriptors_pauses_accepting_instead_of_spinning():
    """The server may open 160 descriptors; root (not capped) holds 300 idle
    connections: accept() fails with EMFILE until the idle ones are closed."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))\n"
            "from ezpq_mgr.cli import server_main; server_main()\n")
    s = LoggedServer(code=code, extra=["--log-level", "INFO"])
    socks = []
    try:
        for _ in range(300):
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(s.address)
            except (BlockingIOError, InterruptedError):
                pass
            socks.append(c)
        import psutil
        proc = psutil.Process(s.proc.pid)
        t0 = sum(proc.cpu_times()[:2])
        time.sleep(2.0)  # measuring CPU use over a span, not waiting for an event
        busy = sum(proc.cpu_times()[:2]) - t0
        assert busy < 0.5, f"the server used {busy:.2f} s of CPU in 2 s while out of descriptors"
        assert "Too many open files" in s.text()
        assert len(s.text()) < 20000, "the log grew without bound"
        t = time.monotonic()
        while True:  # the idle connections are closed after 5 s; then a real client gets in
            try:
                Remote(s.address, s.key).call("info")
                break
            except EzpqConnectionError:
                assert time.monotonic() - t < 20
    finally:
        for c in socks:
            c.close()
        assert s.stop() == 0, s.text()


# ------------------------------------------- item 13: 50 clients at once
def one_client(address, key, start, out):
    start.wait(30)
    try:
        out.put(("ok", Remote(address, key).call("whoami")["uid"]))
    except BaseException as exc:
        out.put(("error", repr(exc)))


@needs_root
def test_fifty_simultaneous_clients_are_all_served(logged_server):
    start, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=one_client, args=(logged_server.address, logged_server.key, start, out)) for _ in range(50)]
    for p in procs:
        p.start()
    try:
        start.set()
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
    errors = [r for r in results if r[0] != "ok"]
    assert not errors, errors
    assert served_within(logged_server)


# ------------------------------------- item 12: a non-root shared server
def cli_as(user, logged_server, *args, key=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([ROOT, SITE]), "HOME": logged_server.dir,
           "EZPQ_AUTHKEY": (key or logged_server.key).decode()}
    return subprocess.run([SYSTEM_PYTHON, "-m", "ezpq_mgr", "--socket", logged_server.address, *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd="/",
                          preexec_fn=lambda: become(user))


@needs_root
def test_non_root_server_refuses_other_users(users):
    a, b = users[USERS[0]], users[USERS[1]]
    s = LoggedServer(user=a)
    try:
        ok = cli_as(a, s, "status")
        assert ok.returncode == 0, ok.stderr
        refused = cli_as(b, s, "status")
        assert refused.returncode == 3, (refused.returncode, refused.stdout, refused.stderr)
        assert refused.stderr.strip() == (f"ezpq: this server runs as {USERS[0]} "
                                          f"and cannot run jobs as {USERS[1]}"), refused.stderr
        assert f"uid {b.pw_uid}" in s.text()
        assert cli_as(a, s, "status").returncode == 0  # still serving its owner
    finally:
        assert s.stop() == 0, s.text()


@needs_root
def test_non_root_server_with_allow_other_users_says_so(users):
    a, b = users[USERS[0]], users[USERS[1]]
    s = LoggedServer(extra=["--allow-other-users"], user=a)
    try:
        assert cli_as(b, s, "status").returncode == 0
        assert "--allow-other-users" in s.text() and f"run as {USERS[0]}" in s.text()
    finally:
        assert s.stop() == 0, s.text()


# --------------------------------------------------- item 19: message size
@needs_root
def test_oversize_message_is_refused_before_the_server_buffers_it(logged_server):
    pid = logged_server.proc.pid
    remote = Remote(logged_server.address, logged_server.key)
    remote.call("info")
    before = vm(pid, "VmHWM")
    with pytest.raises(ValueError, match="max-message"):
        remote.call("put", "big", [{"fn": b"x" * (300 * 1024 * 1024)}])
    with ezpq.Queue(address=logged_server.address, authkey=logged_server.key, qid="big") as Q:
        with pytest.raises(ValueError, match="max-message"):
            Q.put(len, b"x" * (300 * 1024 * 1024))  # at the call, before anything is sent
        assert Q.size() == 0
    # the same message sent raw, past the client library's check
    from ezpq_mgr import transport, wire
    from ezpq_mgr.messages import ERROR, RETURN, Reply, Request
    sock = transport.connect(logged_server.address, logged_server.key)[0]
    try:
        body = wire.dumps(Request("put", ["big", [{"fn": b"x" * 1024}]]))
        size = 300 * 1024 * 1024
        sock.sendall(transport.HEADER.pack(size) + body)
        chunk = b"\0" * (1 << 20)
        sent = len(body)
        while sent < size:
            n = min(len(chunk), size - sent)
            sock.sendall(chunk[:n])
            sent += n
        kind, exc = Reply.parse(wire.loads(transport.recv_frame(sock)))
        assert kind == ERROR and isinstance(exc, ValueError) and "max-message" in str(exc)
        sock.sendall(transport.frame(wire.dumps(Request("whoami", []))))  # the connection still works
        assert Reply.parse(wire.loads(transport.recv_frame(sock))).kind == RETURN
    finally:
        sock.close()
    assert vm(pid, "VmHWM") - before < 50 * 1024 * 1024
    assert served_within(logged_server)


# ------------------------------------- a frame header alone, then a trickle
#: A server whose deadline for a message begun is 2 s (30 s by default).
SHORT_READ_TIMEOUT = 2.0
SHORT_READ_SERVER = (f"import ezpq_mgr.server.outgoing as o; o.READ_TIMEOUT = {SHORT_READ_TIMEOUT}\n"
                     "from ezpq_mgr.cli import server_main; server_main()\n")
HEADER_SIZE = 64 * 1024 * 1024


def stall_mid_message(server, n, size, out):
    """As user A: ``n`` authenticated connections each send the header of a
    ``size``-byte request and 4 KiB of it, then one byte each every 0.2 s
    for 1 s, then nothing; reports when the server closed each of them."""
    from ezpq_mgr import transport
    socks = [transport.connect(server.address, server.key)[0] for _ in range(n)]
    for s in socks:
        s.sendall(transport.HEADER.pack(size) + b" " * 4096)
    for _ in range(5):
        time.sleep(0.2)  # the attack's own pace: a byte every 0.2 s
        for s in socks:
            s.sendall(b" ")
    out.put(("trickled", time.monotonic()))
    closed, deadline = 0, time.monotonic() + 3 * SHORT_READ_TIMEOUT + 10
    for s in socks:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            closed += s.recv(1) == b""
        except OSError:
            pass
    out.put(("closed", closed, time.monotonic()))
    for s in socks:
        s.close()


@needs_root
def test_a_header_alone_costs_no_memory_and_a_stalled_message_is_dropped(users):
    """The attacker's find: the server allocated a message's whole buffer as
    soon as its 8-byte header came, so 16 connections that each sent a
    header and then trickled (or nothing) held ~2.5-4 GB of a root server.
    Now memory follows the bytes received, and a message begun that stops
    coming is dropped after the read deadline (logged once per connection)."""
    a = users[USERS[0]]
    s = LoggedServer(code=SHORT_READ_SERVER)
    p = None
    try:
        pid = s.proc.pid
        assert served_within(s)
        before = vm(pid, "VmHWM")
        out = FORK.Queue()
        p, _ = start_as(a, stall_mid_message, s, 16, HEADER_SIZE, out)
        kind, trickled = out.get(timeout=60)
        assert kind == "trickled", trickled
        assert served_within(s), "another client waited over 1 s during the attack"
        grown = vm(pid, "VmHWM") - before
        assert grown < 32 * 2**20, (f"16 connections that sent a {HEADER_SIZE >> 20} MiB header and ~4 KiB "
                                    f"made the server's peak RSS grow by {grown / 2**20:.0f} MiB")
        kind, closed, at = out.get(timeout=60)
        assert closed == 16, f"the server closed {closed} of 16 stalled connections"
        assert SHORT_READ_TIMEOUT * 0.75 <= at - trickled < SHORT_READ_TIMEOUT + 5, at - trickled
        lines = [ln for ln in s.text().splitlines() if "then nothing for" in ln]
        assert len(lines) == 16 and all(f"uid {a.pw_uid}" in ln for ln in lines), s.text()
        assert served_within(s)
    finally:
        if p is not None:
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join()
        assert s.stop() == 0, s.text()


def hold_stalled_connections(server, n, out, go):
    """As user A: try ``n`` authenticated connections, each sending a 1 MiB
    request's header and one byte of it; report how many got in."""
    from ezpq_mgr import transport
    socks, refused = [], []
    for _ in range(n):
        try:
            sock = transport.connect(server.address, server.key)[0]
        except transport.Refused as exc:
            refused.append(str(exc))
            continue
        sock.sendall(transport.HEADER.pack(1 << 20) + b" ")
        socks.append(sock)
    out.put((len(socks), sorted(set(refused))))
    go.wait(60)
    for sock in socks:
        sock.close()


@needs_root
def test_connections_stalled_mid_message_are_capped_per_user(logged_server, users):
    """A message begun holds a serving thread until its read deadline: one
    user holds at most ``MAX_PER_PEER`` such connections (the doorman's cap
    counts them until they close), and others are still served."""
    from ezpq_mgr.server.doorman import MAX_PER_PEER
    a = users[USERS[0]]
    pid = logged_server.proc.pid
    before = vm(pid, "VmHWM")
    go, out = FORK.Event(), FORK.Queue()
    p, _ = start_as(a, hold_stalled_connections, logged_server, MAX_PER_PEER + 40, out, go)
    try:
        opened, why = out.get(timeout=60)
        assert opened == MAX_PER_PEER, opened
        assert why == [f"too many connections from one user (limit {MAX_PER_PEER})"], why
        assert served_within(logged_server)
        grown = vm(pid, "VmHWM") - before
        assert grown < 64 * 2**20, f"{opened} stalled 1 MiB messages grew the server by {grown / 2**20:.0f} MiB"
    finally:
        let_go(go, p)


# --------------------------- item 20: what strangers get, what is logged
@needs_root
def test_unauthenticated_garbage_gets_no_traceback_and_refusals_are_logged(logged_server, users):
    b = users[USERS[1]]
    out = FORK.Queue()

    def garbage():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(logged_server.address)
        got = b""
        try:
            got += s.recv(4096)
            s.sendall(b"\x00\x00\x00\x10GET / HTTP/1.0\r\n\r\n" + os.urandom(200))
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        s.close()
        return got

    p = FORK.Process(target=_as(b, lambda: out.put(garbage())))
    p.start()
    got = out.get(timeout=30)
    p.join(10)
    said = _text_frames(got)  # what the server said, its random challenge left out
    assert said, got
    assert b"Traceback" not in said and b".py" not in said and b"/" not in said, said
    wrong = FORK.Process(target=_as(b, lambda: _try_wrong_key(logged_server.address)))
    wrong.start()
    wrong.join(30)
    deadline = time.monotonic() + 5
    while f"uid {b.pw_uid}" not in logged_server.text():
        assert time.monotonic() < deadline, logged_server.text()
        time.sleep(0.05)
    assert served_within(logged_server)


def _text_frames(data):
    """The bodies of the length-prefixed frames in ``data``, minus challenges
    (``EZPQ/1 `` + random bytes); the old server's 4-byte frames are read too."""
    from ezpq_mgr import transport
    out, i = b"", 0
    while i + 4 <= len(data):
        if data[i:i + 4] == b"\0\0\0\0":      # an 8-byte header
            size, i = transport.HEADER.unpack_from(data, i)[0], i + 8
        else:
            size, i = int.from_bytes(data[i:i + 4], "big"), i + 4
        body, i = data[i:i + size], i + size
        if not body.startswith((b"EZPQ/1 ", b"#CHALLENGE#")):
            out += body
    return out


def _try_wrong_key(address):
    try:
        Remote(address, b"wrong key")
    except Exception:
        pass


# -------------------------------------------- a dead thread is not silent
BROKEN_SUPERVISOR = (
    "import ezpq_mgr.server.supervisor as s\n"
    "def _broken(self, *a, **k):\n"
    "    raise RuntimeError('injected supervisor bug')\n"
    "s.Supervisor._on_result = _broken\n"
    "from ezpq_mgr.cli import server_main; server_main()\n")


@needs_root
def test_a_dying_server_thread_stops_the_server_non_zero():
    s = LoggedServer(code=BROKEN_SUPERVISOR)
    try:
        Q = ezpq.Queue(address=s.address, authkey=s.key, qid="x")
        try:
            Q.put(abs, -1)
            try:
                Q.get(wait=True, timeout=10)
            except Exception:
                pass
        finally:
            try:
                Q.detach()
            except Exception:
                pass
        s.proc.wait(15)
        assert s.proc.returncode == 1   # documented: failed while serving
        assert "injected supervisor bug" in s.text()
        assert s.text().rstrip().splitlines()[-1].startswith("ezpq-server: server thread ezpq-supervisor")
    finally:
        s.stop()


# ------------------------------------- item 22: put_then loses the server
def nap(x):
    time.sleep(0.1)
    return x


def slow_to_die(x):
    """Ends 30-65 ms after SIGTERM: past kill_tree's first wait, so the
    worker is a zombie by the time its survivors are sorted out."""
    import signal as _signal

    def on_term(*_):
        time.sleep(0.03 + (x % 8) * 0.005)
        os._exit(1)
    _signal.signal(_signal.SIGTERM, on_term)
    time.sleep(30)


@needs_root
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_put_then_survives_timeouts_of_jobs_slow_to_die(start_method):
    """Item 22, reproduced: the kill thread read ``returncode`` from a
    psutil.Process that kill_tree had dropped as a zombie without waiting
    for it (AttributeError). The thread died: before, the job stayed
    working for ever (lanes2.py hung about 1 run in 25 on a busy machine);
    now that a dying thread stops the server, the client got exactly
    ``lost the ezpq server ... EOFError`` inside ``put_then``
    (2 of 3 runs of this test before the fix)."""
    with ezpq.Queue(4, start_method=start_method) as Q:
        for x in range(32):
            Q.put(slow_to_die, x, timeout=0.1)
        Q.wait(timeout=60)
        out = Q.collect()
    assert len(out) == 32 and {j["status"] for j in out} == {"timeout"}, out


@needs_root
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_put_then_stress_jobs_ending_as_their_timeout_fires(start_method):
    """lanes2.py's pattern, sharpened: every job ends just as its timeout
    fires, so the kill races the job's own exit (tests/stress_put_then.py
    runs lanes2.py itself, several at once)."""
    rounds, jobs = (3, 32) if start_method == "fork" else (2, 24)
    for _ in range(rounds):
        with ezpq.Queue(4, start_method=start_method) as Q:
            for x in range(jobs):
                Q.put(nap, x, timeout=0.1, lane=x % 4)
            Q.wait()
            out = Q.collect()
        assert len(out) == jobs
        assert {j["status"] for j in out} <= {"completed", "timeout"}, out


# ============================================================================
# Clients against the server's state (every input checked)
# ============================================================================
# Issue 10: everything a client may send is checked, at the server.
#
# Each test is an attack made with raw calls (``Remote.call``, the wire a
# hostile client controls, not the client library's checks) against a real
# root ``ezpq-server`` on a Unix socket, mostly as a throwaway user; each
# asserts the attack fails and that another user is still served within
# 1 s. Items: 3 (configure), 6 and 14 (timeouts), 7 (record types), 8
# (leaked slots), 18 (memory only grows).


DAY = 86400.0


def _server(*extra):
    s = Server("unix", workers=2, start_method="fork", extra=extra)
    os.chmod(s.dir, 0o777)  # the users' jobs and markers live here
    return s


@pytest.fixture
def input_server(users):
    s = _server()
    yield s
    assert s.stop() == 0
    shutil.rmtree(s.dir, ignore_errors=True)


def record(token, env, fn=abs, args=(-1,), **over):
    """A valid job record, as the client library sends it, with ``over`` applied."""
    r = {"client": token, "name": "x", "priority": 100, "lane_key": None, "lane_text": None,
         "timeout": 0.0, "function": getattr(fn, "__name__", "f"),
         "fn_blob": serialize.dump_function(fn), "args_blob": serialize.dump_call_args(list(args), None),
         "runner": "process", "suppress_errors": False, "stop_on_lane_error": False,
         "retries": 0, "max_memory": None, "env_id": env}
    r.update(over)
    return r


def connect(input_server):
    """A raw connection and a registered client token (as ``Queue`` does)."""
    remote = Remote(input_server.address, input_server.key)
    token = uuid.uuid4().hex
    env = remote.call("hello", token, input_server.dir, [], False)["env_id"]
    return remote, token, env


def refused(call, *args):
    """'TypeError: ...'/'ValueError: ...' if refused so, else what happened."""
    try:
        result = call(*args)
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"other {exc!r}"
    return f"accepted {result!r}"[:200]


def b_round_trip(input_server):
    """User B puts a job and gets its result: seconds taken, and the output."""
    t0 = time.monotonic()
    with ezpq.Queue(address=input_server.address, authkey=input_server.key, qid="b") as Q:
        Q.put(abs, -7)
        job = Q.get(wait=True, timeout=20)
        took = time.monotonic() - t0
    return took, job and job["output"]


def assert_b_served(input_server, users):
    took, output = run_as(users[USERS[1]], b_round_trip, input_server, timeout=60)
    assert output == 7, "the other user's job did not run"
    assert took < 1.0, f"the other user waited {took:.2f} s"


# ------------------------------------------------------- item 3: configure
def a_configures(input_server, b_seq):
    remote, token, env = connect(input_server)
    remote.call("put", "mine", [record(token, env)])
    forged = {f: getattr(QueueInfo("x"), f) for f in QueueInfo.__dataclass_fields__}
    forged.update(qid=f"{os.getuid()}:mine", ids={"1": b_seq})
    attempts = {
        "__dict__": {"__dict__": forged},
        "__class__": {"__class__": "x"},
        "ids": {"ids": {"1": b_seq}},
        "qid": {"qid": "0:other"},
        "n_running": {"n_running": -5},
        "next_id": {"next_id": 1},
        "unknown": {"bogus": 1},
        "cap": {"cap": "x"},
        "cap_negative": {"cap": -1},
        "cap_float": {"cap": 1.5},
        "max_size": {"max_size": 2 ** 70},
        "paused": {"paused": "yes"},
        "auto_remove": {"auto_remove": 1},
        "not_a_dict": ["paused", True],
    }
    out = {name: refused(remote.call, "configure", "mine", s) for name, s in attempts.items()}
    out["valid"] = refused(remote.call, "configure", "mine", {"cap": 2, "paused": False})
    reach = {job["id"]: job["uid"] for job in remote.call("jobs", "mine")}   # whose jobs "mine" holds now
    return out, reach


def b_parks_a_job(input_server):
    remote, token, env = connect(input_server)
    remote.call("configure", "parked", {"paused": True})
    remote.call("put", "parked", [record(token, env)])
    return remote.call("jobs", "parked")[0]["seq"]


@needs_root
def test_configure_is_an_allow_list(input_server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    assert_b_served(input_server, users)  # warm B's worker
    b_seq = run_as(b, b_parks_a_job, input_server)
    out, reach = run_as(a, a_configures, input_server, b_seq)
    assert out.pop("valid").startswith("accepted"), out
    for name, what in out.items():
        assert what.startswith(("TypeError", "ValueError")), (name, what)
    assert out["cap"].split(":")[1].strip().startswith("cap"), out["cap"]
    assert b.pw_uid not in reach.values(), reach
    assert_b_served(input_server, users)


# ------------------------------------------------- items 6 and 7: records
DROP = object()
BAD_FIELDS = [
    ("timeout", {"timeout": 400 * DAY}), ("timeout", {"timeout": 2592000.0 * 13}),
    ("timeout", {"timeout": math.inf}), ("timeout", {"timeout": math.nan}),
    ("timeout", {"timeout": -1.0}), ("timeout", {"timeout": "5"}),
    ("priority", {"priority": "x"}), ("priority", {"priority": 2 ** 70}), ("priority", {"priority": 1.5}),
    ("priority", {"priority": True}),
    ("max_memory", {"max_memory": "x"}), ("max_memory", {"max_memory": 0}),
    ("max_memory", {"max_memory": -5}), ("max_memory", {"max_memory": 2 ** 70}),
    ("retries", {"retries": "x"}), ("retries", {"retries": 10 ** 6}), ("retries", {"retries": -1}),
    ("name", {"name": "n" * 2048}), ("name", {"name": "a\nb"}), ("name", {"name": "a\x1bb"}),
    ("name", {"name": ["x"]}), ("name", {"name": math.nan}),
    ("fn_blob", {"fn_blob": "not bytes"}), ("args_blob", {"args_blob": 5}),
    ("fn_blob", {"fn_blob": DROP}),
    ("lane_key", {"lane_key": "x"}), ("lane_text", {"lane_text": "l" * 2048}),
    ("runner", {"runner": "root-thread"}), ("client", {"client": 5}),
    ("function", {"function": "f" * 2048}), ("env_id", {"env_id": "x"}),
    ("suppress_errors", {"suppress_errors": "no"}), ("id", {"id": -1}), ("id", {"id": 10 ** 9}),
] + [(f, {f: v}) for f, v in [
    ("seq", 1), ("qid", "0:x"), ("status", "completed"), ("submitted", 1.0), ("started", 1.0),
    ("ended", 1.0), ("processed", 1.0), ("exitcode", 0), ("cancelled", True),
    ("output_blob", b"x"), ("exception", "x"), ("callback_blob", b"x"), ("uid", 0), ("user", "root"),
    ("pid", 1), ("host", "h"), ("attempts", 5), ("cpu_user", 1.0), ("cpu_system", 1.0),
    ("max_rss", 1), ("max_rss_method", "x"), ("max_rss_children", 1),
    ("bogus", 1), ("__class__", "x"), ("__dict__", {}),
]]


def a_puts_bad_records(input_server):
    remote, token, env = connect(input_server)
    out = []
    for field, over in BAD_FIELDS:
        bad = record(token, env, **{k: v for k, v in over.items() if v is not DROP})
        for k in [k for k, v in over.items() if v is DROP]:
            del bad[k]
        # a good record first: a bad one refuses the whole batch
        out.append((field, refused(remote.call, "put", "bad", [record(token, env), bad])))
    out.append(("records", refused(remote.call, "put", "bad", "not a list")))
    out.append(("record", refused(remote.call, "put", "bad", ["not a dict"])))
    return out, remote.call("counts", "bad")


@needs_root
def test_put_refuses_bad_records_and_nothing_is_enqueued(input_server, users):
    assert_b_served(input_server, users)
    out, counts = run_as(users[USERS[0]], a_puts_bad_records, input_server)
    for field, what in out:
        assert what.startswith(("TypeError", "ValueError")), (field, what)
        assert field in what, (field, what)   # the message names the field
    assert counts["submitted"] == 0 and counts["waiting"] == 0, counts
    assert_b_served(input_server, users)


@needs_root
def test_submit_with_a_huge_timeout_is_refused(input_server, users):
    """``ezpq submit --timeout`` past 366 days is refused at the call."""
    cmd = input_server.cli_args + ["submit", "--timeout", "2592000000", "--", "true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "timeout" in done.stderr, done
    assert_b_served(input_server, users)


@needs_root
def test_a_thirty_day_timeout_does_not_stop_the_supervisor(input_server, users):
    """The issue's one-liner: ``ezpq submit --timeout 2592000 -- true`` (a job
    that runs while the supervisor waits for its deadline)."""
    ok = subprocess.run(input_server.cli_args + ["submit", "--timeout", "2592000", "--", "sleep", "1"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok
    root = Remote(input_server.address, input_server.key)
    seq = int(ok.stdout)
    deadline = time.monotonic() + 20
    while not root.call("wait_jobs", [seq], 1.0):
        assert time.monotonic() < deadline, "the job never ended: the supervisor died"
    assert root.call("show_jobs", [seq])[0]["status"] == "completed"
    assert_b_served(input_server, users)


# ----------------------------------------------------- item 8: leaked slots
def _running(remote, qid, n):
    deadline = time.monotonic() + 20
    while remote.call("counts", qid)["running"] < n:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.02)


def a_marks_running_jobs(input_server):
    remote, token, env = connect(input_server)
    remote.call("put", "leak", [record(token, env, time.sleep, (30,)) for _ in range(2)])
    _running(remote, "leak", 2)
    seqs = [j["seq"] for j in remote.call("jobs", "leak")]
    out = {"mark": refused(remote.call, "mark_processed", [[s, None] for s in seqs]),
           "mark_bad": refused(remote.call, "mark_processed", [["x", None]]),
           "mark_blob": refused(remote.call, "mark_processed", [[seqs[0], "not bytes"]]),
           "processed_field": refused(remote.call, "put", "leak2", [record(token, env, processed=1.0)])}
    out["collected"] = len(remote.call("collect", "leak", 0))
    out["cancelled"] = remote.call("cancel_all", "leak", None, True)
    return out


@needs_root
def test_mark_processed_on_running_jobs_leaks_no_slot(input_server, users):
    assert_b_served(input_server, users)
    out = run_as(users[USERS[0]], a_marks_running_jobs, input_server)
    assert out["collected"] == 0 and out["cancelled"] == 2, out
    assert out["processed_field"].startswith("ValueError"), out
    assert out["mark_bad"].startswith("TypeError") and out["mark_blob"].startswith("TypeError"), out
    root = Remote(input_server.address, input_server.key)
    deadline = time.monotonic() + 20
    while root.call("info")["running"]:
        assert time.monotonic() < deadline, "slots stay taken"
        time.sleep(0.05)
    assert_b_served(input_server, users)


def a_abuses_the_other_calls(input_server):
    remote, token, env = connect(input_server)
    out = {
        "reserve_negative": refused(remote.call, "reserve_ids", "q", -10 ** 6),
        "reserve_zero": refused(remote.call, "reserve_ids", "q", 0),
        "reserve_huge": refused(remote.call, "reserve_ids", "q", 10 ** 12),
        "reserve_str": refused(remote.call, "reserve_ids", "q", "x"),
        "pop_ids_str": refused(remote.call, "pop_ids", "q", "x"),
        "pop_ids_item": refused(remote.call, "pop_ids", "q", [["x"]]),
        "cancel_all_client": refused(remote.call, "cancel_all", "q", 5, True),
        "cancel_all_running": refused(remote.call, "cancel_all", "q", None, "yes"),
        "hello_holding": refused(remote.call, "hello", token, os.getcwd(), [], "yes"),
        "goodbye_forget": refused(remote.call, "goodbye", token, "q", "x"),
        "qid_type": refused(remote.call, "counts", 5),
        "qid_long": refused(remote.call, "counts", "q" * 5000),
        "job_id": refused(remote.call, "cancel", "q", "1"),
        "collect_n": refused(remote.call, "collect", "q", "x"),
    }
    # the goodbye of a client whose job is still running must not break its end
    remote.call("put", "early", [record(token, env, time.sleep, (0.3,))])
    remote.call("goodbye", token, "early", True)
    deadline = time.monotonic() + 20
    while remote.call("counts", "early")["working"] + remote.call("counts", "early")["waiting"]:
        assert time.monotonic() < deadline, "the job never ended"
        time.sleep(0.05)
    return out


@needs_root
def test_other_calls_refuse_bad_arguments(input_server, users):
    assert_b_served(input_server, users)
    out = run_as(users[USERS[0]], a_abuses_the_other_calls, input_server)
    for name, what in out.items():
        assert what.startswith(("TypeError", "ValueError")), (name, what)
    assert_b_served(input_server, users)


# ------------------------------------------------- items 6 and 14: waits
def _cpu(proc):
    t = proc.cpu_times()
    return t.user + t.system


@needs_root
def test_nan_inf_negative_wait_timeouts_return_promptly_and_spin_nothing(input_server, users):
    """Every blocking call refuses NaN, inf and negative timeouts at once; a
    huge finite one is clamped and parked (no server thread, no CPU), and
    withdrawn the moment its client disconnects."""
    remote, token, env = connect(input_server)
    remote.call("configure", "w", {"paused": True})
    remote.call("put", "w", [record(token, env)])     # pending forever: every wait below waits
    seq = remote.call("jobs", "w")[0]["seq"]
    calls = [("wait_free", lambda t: ["w", t]), ("wait_pending", lambda t: ["w", 0 if t != 1e300 else 1, t]),
             ("get", lambda t: ["w", True, t]), ("take_notices", lambda t: [token, t]),
             ("wait_jobs", lambda t: [[seq], t]), ("wait_client", lambda t: [token, 1, t])]
    remote.call("configure", "w", {"cap": 1})
    results = {}

    socks = {}

    def one(r, method, args, key):
        socks[key] = r._connection()   # this thread's own connection
        t0 = time.monotonic()
        results[key] = (refused(r.call, method, *args), time.monotonic() - t0)

    threads, huge = [], []
    for t in (math.nan, math.inf, -math.inf, -1.0, 1e300):
        for method, args in calls:
            r = Remote(input_server.address, input_server.key)   # connect one at a time (listen backlog)
            th = threading.Thread(target=one, args=(r, method, args(t), (method, t)), daemon=True)
            th.start()
            threads.append(th)
            if t == 1e300:
                huge.append((r, th))
    for th in threads:
        if not any(th is h for _, h in huge):
            th.join(8)
    hung = [(m, t) for t in (math.nan, math.inf, -math.inf, -1.0) for m, _ in calls
            if (m, t) not in results]
    assert not hung, f"calls hang: {hung}"
    slow = {k: v for k, v in results.items() if v[1] > 1.0}
    assert not slow, slow
    for (method, t), (what, _) in results.items():
        assert what.startswith("ValueError"), (method, t, what)
    deadline = time.monotonic() + 5   # the clamped ones: parked, not refused
    while remote.call("info")["parked_calls"] < len(calls):
        assert time.monotonic() < deadline, remote.call("info")
        time.sleep(0.02)
    proc = psutil.Process(input_server.proc.pid)
    before = _cpu(proc)
    time.sleep(1.0)
    used = _cpu(proc) - before
    assert used < 0.3, f"the server burnt {used:.2f} s of CPU in 1 s with parked calls"
    for (method, _), (r, th) in zip(calls, huge):   # their clients leave: the parked calls are withdrawn
        socks[(method, 1e300)].shutdown(socket.SHUT_RDWR)
        th.join(5)
        assert not th.is_alive()
        assert results[(method, 1e300)][0].startswith("other"), results[(method, 1e300)]  # ConnectionError
    while remote.call("info")["parked_calls"]:
        assert time.monotonic() < deadline + 5, remote.call("info")
        time.sleep(0.02)
    remote.close()
    assert_b_served(input_server, users)


# ------------------------------------------------------ item 18: memory
@needs_root
def test_keep_finished_drops_uncollected_jobs_but_not_their_rows(users):
    s = _server("--keep-finished", "1")
    try:
        remote, token, env = connect(s)
        remote.call("put", "kf", [record(token, env)])
        seq = remote.call("jobs", "kf")[0]["seq"]
        remote.call("goodbye", token, "kf", False)
        deadline = time.monotonic() + 20
        while not remote.call("wait_jobs", [seq], 1.0):
            assert time.monotonic() < deadline
        assert remote.call("show_jobs", [seq])[0]["status"] == "completed"
        finished = time.monotonic()
        while any(j["seq"] == seq for j in remote.call("list_jobs", True)):
            assert time.monotonic() - finished < 5, "the finished job is still kept"
            time.sleep(0.1)
        assert remote.call("counts", "kf")["completed"] == 0
        while True:
            with open(s.log_file) as f:
                if any(row["job"] == str(seq) for row in csv.DictReader(f)):
                    break
            assert time.monotonic() - finished < 5, "no accounting row"
            time.sleep(0.1)
        assert_b_served(s, users)
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)


def a_leaves_private_jobs(input_server, ready):
    Q = ezpq.Queue(address=input_server.address, authkey=input_server.key)      # private: no qid
    Q2 = ezpq.Queue(address=input_server.address, authkey=input_server.key, qid="kept")
    for i in range(3):
        marker = os.path.join(input_server.dir, f"ran-{i}")
        Q.put(lambda m=marker: (open(m, "w").close(), time.sleep(30)))
    Q2.put(abs, -3)
    Q.size()
    ready.set()
    time.sleep(60)


@needs_root
def test_sigkilled_clients_private_jobs_are_cancelled_and_removed(input_server, users):
    a = users[USERS[0]]
    ready = FORK.Event()
    p, _ = start_as(a, a_leaves_private_jobs, input_server, ready)
    try:
        assert ready.wait(30)
        root = Remote(input_server.address, input_server.key)
        deadline = time.monotonic() + 20
        while root.call("info")["running"] < 2 or not os.path.exists(os.path.join(input_server.dir, "ran-1")):
            assert time.monotonic() < deadline, "the jobs did not start"
            time.sleep(0.05)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    deadline = time.monotonic() + 15
    while True:
        left = [j for j in root.call("list_jobs", True) if j["uid"] == a.pw_uid]
        if [j["qid"] for j in left] == ["kept"] and root.call("info")["running"] == 0:
            break
        assert time.monotonic() < deadline, f"the killed client's jobs stay: {[j['status'] for j in left]}"
        time.sleep(0.1)
    assert not os.path.exists(os.path.join(input_server.dir, "ran-2")), "a waiting job of the dead client ran"
    assert_b_served(input_server, users)


@needs_root
def test_submit_jobs_left_on_the_server_do_not_slow_submit(input_server):
    def submit_time():
        best = 1e9
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run(input_server.cli_args + ["submit", "--", "true"], check=True, capture_output=True,
                           timeout=60)
            best = min(best, time.monotonic() - t0)
        return best

    idle = submit_time()
    remote, token, env = connect(input_server)
    for _ in range(5):
        remote.call("put", "cli", [record(token, env, name="n" * 200) for _ in range(1000)])
    deadline = time.monotonic() + 60
    while remote.call("wait_client", token, 1, 1.0):
        assert time.monotonic() < deadline
    loaded = submit_time()
    assert loaded < idle * 1.5 + 0.1, f"submit took {loaded:.2f} s with 5,000 jobs left, {idle:.2f} s idle"


# ------------------------------------------ the same checks in the library
@needs_root
@pytest.mark.parametrize("kw, exc", [
    ({"timeout": math.nan}, ValueError), ({"timeout": math.inf}, ValueError),
    ({"timeout": 400 * DAY}, ValueError), ({"timeout": -1}, ValueError), ({"timeout": "5"}, TypeError),
    ({"priority": "x"}, TypeError), ({"priority": 2 ** 70}, ValueError),
    ({"max_memory": "x"}, TypeError), ({"max_memory": 0}, ValueError), ({"max_memory": 1.5}, TypeError),
    ({"retries": "x"}, TypeError), ({"retries": 10 ** 6}, ValueError),
    ({"name": "n" * 2048}, ValueError), ({"name": "a\nb"}, ValueError),
])
def test_job_arguments_are_checked_at_the_call(kw, exc):
    with pytest.raises(exc):
        ezpq.Job(abs, **kw)


@needs_root
@pytest.mark.parametrize("kw, exc", [
    ({"max_size": 2 ** 70}, ValueError), ({"max_size": "x"}, ValueError), ({"qid": "q" * 5000}, ValueError),
    ({"qid": "a\nb"}, ValueError),
])
def test_queue_arguments_are_checked_at_the_call(kw, exc):
    with pytest.raises(exc):
        ezpq.Queue(address="/nonexistent/ezpq.sock", authkey=b"k", **kw)


@needs_root
def test_queue_put_checks_before_sending():
    with ezpq.Queue(1) as Q:
        with pytest.raises(ValueError, match="timeout"):
            Q.put(abs, -1, timeout=math.nan)
        with pytest.raises(ValueError, match="name"):
            Q.put(abs, -1, name="a\nb")
        with pytest.raises(ValueError, match="timeout"):
            Q.get(wait=True, timeout=math.nan)
        with pytest.raises(ValueError, match="timeout"):
            Q.wait(timeout=-1)
        assert Q.size() == 0


# ------------------------------------- item 18: a big client leaves nothing behind
def a_maps_200k(input_server):
    """User A maps 200,000 jobs, collects them (in map), then disconnects."""
    with ezpq.Queue(address=input_server.address, authkey=input_server.key) as Q:
        jobs = Q.map(abs, range(200_000))
    return len(jobs), sum(j["status"] == "completed" for j in jobs)


@needs_root
def test_a_200k_job_client_leaves_server_memory_near_idle(input_server, users):
    """The issue's figure: 361 MB held after a 200k-job client left (977 MB
    peak in its collect). After the client disconnects, the server's RSS
    must be within 100 MB of what it was idle."""
    proc = psutil.Process(input_server.proc.pid)
    b_round_trip(input_server)  # warm: workers started, first allocations made
    idle = proc.memory_info().rss
    n, completed = run_as(users[USERS[0]], a_maps_200k, input_server, timeout=110)
    assert n == completed == 200_000
    grown = proc.memory_info().rss - idle
    assert grown < 100 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB after the client left"
    assert Remote(input_server.address, input_server.key).call("info")["running"] == 0
    assert_b_served(input_server, users)


@needs_root
def test_wait_jobs_with_a_huge_list_is_refused_and_stalls_nobody(input_server, users):
    """The attacker's find: 3,000,000 copies of one job number in wait_jobs,
    on four connections, held the state's lock until the box ran out of
    memory. Now: at most 100,000 jobs a call (duplicates counted once)."""
    remote, token, env = connect(input_server)
    remote.call("put", "w", [record(token, env)])
    seq = remote.call("jobs", "w")[0]["seq"]
    t0 = time.monotonic()
    assert refused(remote.call, "wait_jobs", [seq] * 3_000_000, 1.0).startswith("ValueError")
    assert time.monotonic() - t0 < 5
    assert refused(remote.call, "show_jobs", [seq] * 3_000_000).startswith("ValueError")
    assert remote.call("wait_jobs", [seq] * 50_000, 5.0) in (True, False)
    assert len(remote.call("show_jobs", [seq] * 50_000)) == 1
    assert_b_served(input_server, users)


# ------------------------------------- item 18: what a client registers is freed
#: A sys.path just under the limit of one hello (64 Ki characters, cwd included).
BIG_SYS_PATH = ["/" + "p" * 3999] * 15


def a_loops_hellos(input_server, n):
    """As user A: ``n`` hello/goodbye pairs on one connection, then ``n``
    hellos (holding, a private queue configured) on connections closed
    without goodbye; each with an environment of its own and a big sys.path."""
    remote = Remote(input_server.address, input_server.key)
    for i in range(n):
        token = uuid.uuid4().hex
        remote.call("hello", token, input_server.dir, [f"/loop/{i}"] + BIG_SYS_PATH, True, "mine")
        remote.call("configure", "mine", {"max_size": 10})
        remote.call("goodbye", token, "mine", True)
    for i in range(n):
        gone = Remote(input_server.address, input_server.key)
        token = uuid.uuid4().hex
        gone.call("hello", token, input_server.dir, [f"/gone/{i}"] + BIG_SYS_PATH, True, f"p{i}")
        gone.call("configure", f"p{i}", {"max_size": 10})
        gone.close()
    return n


@needs_root
def test_hello_loops_leave_server_memory_near_idle(input_server, users):
    """The attacker's find: nothing a hello registered (the client's token,
    its environment, its notice channel) was ever freed: 100 hellos with a
    big sys.path grew a root server by 390 MB, and a client looping hello
    with fresh tokens grew it for ever. Now all of it is freed at goodbye or
    when the client's last connection closes."""
    proc = psutil.Process(input_server.proc.pid)
    b_round_trip(input_server)  # warm: workers started, first allocations made
    idle = proc.memory_info().rss
    assert run_as(users[USERS[0]], a_loops_hellos, input_server, 2000, timeout=300) == 2000
    deadline = time.monotonic() + 20   # the last connections' disconnects are still being handled
    while True:
        grown = proc.memory_info().rss - idle
        if grown < 48 * 2**20 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert grown < 48 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB after 4,000 hellos were let go"
    info = Remote(input_server.address, input_server.key).call("info")
    assert info["clients"] == info["environments"] == 0, info
    assert info["queues"] == 0, info   # B's queue "b" and A's went with their clients
    assert_b_served(input_server, users)


def a_fills_its_share(input_server):
    """As user A, on one connection: fresh tokens, each with an environment
    of its own (a big sys.path), until refused; then fresh tokens sharing
    the first environment until refused; a hello too big; a goodbye; then
    as many environments again on a new connection once the first closed."""
    from ezpq_mgr.errors import EzpqError
    seen = {}
    remote = Remote(input_server.address, input_server.key)

    def env(i):
        return [f"/env/{i}"] + BIG_SYS_PATH

    def hellos(what, limit, env_of):
        for i in range(limit + 1):
            token = uuid.uuid4().hex
            try:
                remote.call("hello", token, input_server.dir, env_of(i), False)
            except EzpqError as exc:
                seen[what] = (i, f"{type(exc).__name__}: {exc}")
                return
            seen.setdefault(what + " tokens", []).append(token)
        seen[what] = (limit + 1, "accepted")

    hellos("environments", service.MAX_CLIENTS_PER_USER, env)
    hellos("clients", service.MAX_CLIENTS_PER_USER, lambda i: env(0))
    seen["too big"] = refused(remote.call, "hello", uuid.uuid4().hex, input_server.dir,
                              BIG_SYS_PATH * 2, False)
    remote.call("goodbye", seen["clients tokens"][0], "x", True)
    seen["after goodbye"] = refused(remote.call, "hello", uuid.uuid4().hex, input_server.dir, env(0), False)
    remote.close()
    n = seen["environments"][0]
    deadline = time.monotonic() + 10   # the closed connection's clients are freed by its thread
    while True:
        again = Remote(input_server.address, input_server.key)
        try:
            for i in range(n):
                again.call("hello", uuid.uuid4().hex, input_server.dir, [f"/again/{i}"] + BIG_SYS_PATH, False)
            seen["after close"] = "accepted"
            break
        except Exception as exc:
            seen["after close"] = repr(exc)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        finally:
            again.close()
    return seen


@needs_root
def test_one_user_holds_a_bounded_number_of_clients_and_environments(input_server, users):
    """What one user may hold at once is capped (live client tokens, bytes
    of environments), with a clear error at the cap, and one hello is
    bounded in size; what was let go counts no more."""
    seen = run_as(users[USERS[0]], a_fills_its_share, input_server, timeout=120)
    budget, n_clients = service.MAX_ENV_BYTES_PER_USER, service.MAX_CLIENTS_PER_USER
    chars = len(input_server.dir) + len("/env/0") + sum(map(len, BIG_SYS_PATH))   # one environment's
    n_envs, why = seen["environments"]
    assert budget // (chars + 4096) <= n_envs <= budget // chars, seen["environments"]
    assert why.startswith("ServerLimit: at most 16.0 MiB of environments per user"), why
    # the first token of "clients" shares the first environment: n_envs tokens were already live
    assert seen["clients"][0] == n_clients - n_envs, seen["clients"]
    assert seen["clients"][1].startswith(f"ServerLimit: at most {n_clients} clients per user"), seen["clients"]
    assert seen["too big"].startswith("ValueError: sys_path") and "65536" in seen["too big"], seen["too big"]
    assert seen["after goodbye"].startswith("accepted"), seen["after goodbye"]
    assert seen["after close"] == "accepted", seen["after close"]
    assert_b_served(input_server, users)


def a_names_queues(input_server):
    """As user A: configure fresh qids on one connection until refused;
    the same on a new connection once that one closed; then paused ones,
    which stay, until refused on a third connection."""
    from ezpq_mgr.errors import EzpqError
    seen = {}

    def configure(what, settings, n):
        remote = Remote(input_server.address, input_server.key)
        try:
            for i in range(n):
                try:
                    remote.call("configure", f"{what}{i}", settings)
                except EzpqError as exc:
                    seen[what] = (i, f"{type(exc).__name__}: {exc}")
                    return
            seen[what] = (n, "accepted")
        finally:
            remote.close()

    limit = service.MAX_QUEUES_PER_USER
    configure("fresh", {"max_size": 0}, limit + 1)
    deadline = time.monotonic() + 10   # the first connection's queues are let go by its thread
    while True:
        configure("again", {"max_size": 0}, limit)
        if seen["again"][0] == limit or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    while True:
        configure("paused", {"paused": True}, limit)
        if seen["paused"][0] == limit or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    configure("more", {"max_size": 0}, 1)   # the paused ones stay: no room
    return seen


@needs_root
def test_queues_nobody_uses_are_dropped_and_a_user_holds_a_bounded_number(input_server, users):
    """Every qid ever named stayed for the server's life (a loop of
    configure calls on fresh names grew it for ever): now an empty queue no
    open connection uses is dropped, unless paused or capped, and one user
    holds at most ``MAX_QUEUES_PER_USER`` queues at once."""
    limit = service.MAX_QUEUES_PER_USER
    seen = run_as(users[USERS[0]], a_names_queues, input_server, timeout=120)
    assert seen["fresh"][0] == limit, seen["fresh"]
    assert seen["fresh"][1].startswith(f"ServerLimit: at most {limit} queues"), seen["fresh"]
    assert seen["again"] == (limit, "accepted"), seen["again"]
    assert seen["paused"] == (limit, "accepted"), seen["paused"]
    assert seen["more"][0] == 0 and "unless paused" in seen["more"][1], seen["more"]
    assert Remote(input_server.address, input_server.key).call("info")["queues"] == limit
    assert_b_served(input_server, users)


# ============================================================================
# The files a root server touches: key, socket, accounting log
# ============================================================================
# Issue 10, items 16, 17, 18 (accounting rows) and 21: the files a root
# ``ezpq-server`` touches (key file, socket, accounting log) and the
# accounting writer.
#
# Every attack runs against a real ``ezpq-server`` subprocess started as root,
# with throwaway users (``tests/multiuser.py``) where another user matters.
# A server that must refuse to start has to exit 2 with one line on stderr and
# no traceback; a server that must keep running answers a client within 1 s.


SERVER = [sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()"]


# ------------------------------------------------------------------ helpers
@pytest.fixture
def root_dir():
    """A root-owned 0755 directory (other users may traverse it)."""
    d = tempfile.mkdtemp(prefix="ezpq-files-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _key(directory):
    """A valid key file (root, 0600) in ``directory``."""
    path = os.path.join(directory, "key")
    if not os.path.lexists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"k" * 64 + b"\n")
        os.close(fd)
    return path


class Launch:
    """An ``ezpq-server`` started with our own arguments: it either refuses
    (exits) or serves (answers ``info``). Its stderr goes to a file."""

    def __init__(self, directory, *args, socket_path=None, keyfile=None, tcp=None):
        self.dir = directory
        self.address = socket_path or os.path.join(directory, "s.sock")
        self.keyfile = keyfile or _key(directory)
        self.err_path = os.path.join(directory, f"stderr-{time.monotonic_ns()}")
        self.err_file = open(self.err_path, "w")
        where = ["--address", tcp] if tcp else ["--socket", self.address]
        cmd = SERVER + [*where, "--workers", "1", "--authkey-file", self.keyfile,
                        "--start-method", "fork", "--log-level", "WARNING", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err_file)

    @property
    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def outcome(self, timeout=20.0):
        """'refused' (it exited) or 'serving' (a client got an answer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "refused"
            try:
                with open(self.keyfile, "rb") as f:
                    self.key = f.read().strip()
                Remote(self.address, self.key).call("info")
                return "serving"
            except Exception:
                time.sleep(0.05)
        raise AssertionError("ezpq-server neither refused nor served within the deadline")

    def stop(self):
        terminate(self.proc)
        self.err_file.close()
        return self.proc.returncode


def assert_one_line_refusal(launch, *words, usage=False):
    """Exit 2, one line on stderr naming ``words``, no traceback (``usage``:
    argparse's usage line comes first)."""
    state = launch.outcome()
    if state == "serving":
        launch.stop()
        raise AssertionError(f"ezpq-server started; it should have refused ({words})")
    code = launch.stop()
    err = launch.stderr.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    if usage:
        assert err.splitlines()[-1].startswith("ezpq-server: error:"), err
    else:
        assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def serves_within_1s(address, key):
    t0 = time.monotonic()
    assert Remote(address, key).call("info") is not None
    assert time.monotonic() - t0 < 1.0


def run_one_job(address, key, name="probe"):
    with ezpq.Queue(address=address, authkey=key) as Q:
        Q.put(square, 3, name=name)
        job = Q.get(wait=True)
    assert job["output"] == 9


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------ 16: the log file
PLANTS = ["symlink_in_user_dir", "symlink_in_root_dir", "hardlink", "owned_by_user",
          "world_writable_dir", "group_writable_dir", "user_owned_dir", "user_owned_parent", "fifo"]


def _plant(kind, base, user):
    """Set up the log location ``kind``; returns (log path, secret target)."""
    secret_dir = os.path.join(base, "secret")
    os.mkdir(secret_dir, 0o700)
    target = os.path.join(secret_dir, "target")
    with open(target, "w") as f:
        f.write("root only\n")
    os.chmod(target, 0o600)
    parent = os.path.join(base, "up")
    os.mkdir(parent, 0o755)
    logs = os.path.join(parent, "logs")
    os.mkdir(logs, 0o755)
    log = os.path.join(logs, "acct.csv")
    if kind == "symlink_in_user_dir":
        os.chown(logs, user.pw_uid, user.pw_gid)
        os.symlink(target, log)
        os.lchown(log, user.pw_uid, user.pw_gid)
    elif kind == "symlink_in_root_dir":
        os.symlink(target, log)
    elif kind == "hardlink":
        os.link(target, log)
    elif kind == "owned_by_user":
        with open(log, "w"):
            pass
        os.chown(log, user.pw_uid, user.pw_gid)
    elif kind == "world_writable_dir":
        os.chmod(logs, 0o777)
    elif kind == "group_writable_dir":
        os.chown(logs, 0, user.pw_gid)
        os.chmod(logs, 0o775)
    elif kind == "user_owned_dir":
        os.chown(logs, user.pw_uid, user.pw_gid)
    elif kind == "user_owned_parent":  # she could rename logs/ and plant her own
        os.chown(parent, user.pw_uid, user.pw_gid)
    elif kind == "fifo":  # opening it for writing must not block the start
        os.mkfifo(log, 0o600)
    return log, target


@needs_root
@pytest.mark.parametrize("kind", PLANTS)
def test_an_unsafe_log_file_is_refused(root_dir, users, kind):
    log, target = _plant(kind, root_dir, users[USERS[0]])
    before = open(target).read()
    launch = Launch(root_dir, "--log-file", log)
    if launch.outcome() == "serving":  # the attack: root appends a row to the target
        run_one_job(launch.address, launch.key)
        launch.stop()
        after = open(target).read()
        raise AssertionError(f"server started with log {kind}; target {'written' if after != before else 'kept'}")
    assert_one_line_refusal(launch, log)
    assert open(target).read() == before
    assert os.lstat(target).st_uid == 0


@needs_root
def test_a_log_in_a_sticky_world_writable_directory_is_accepted(root_dir):
    logs = os.path.join(root_dir, "logs")
    os.mkdir(logs)
    os.chmod(logs, 0o1777)
    log = os.path.join(logs, "acct.csv")
    launch = Launch(root_dir, "--log-file", log)
    try:
        assert launch.outcome() == "serving", launch.stderr
        run_one_job(launch.address, launch.key)
    finally:
        assert launch.stop() == 0
    st = os.lstat(log)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
    assert len(csv_rows(log)) == 1


@needs_root
def test_control_characters_cannot_write_a_line_of_their_own(users):
    """A job name and a job's exception text with newlines, CR and ESC: the
    CSV still has one physical line per job, no line of the attacker's."""
    evil = "x\n* * * * * root touch /tmp/ezpq-pwned\r\n\x1b[2J"
    server = Server("unix", workers=1)
    try:
        names_refused = False
        with ezpq.Queue(address=server.address, authkey=server.key) as Q:
            try:
                Q.put(square, 2, name=evil)
            except ValueError:  # the name check of item 7 may refuse it at the call
                names_refused = True
            Q.put(_raise_evil, evil, suppress_errors=True)
            Q.wait()
        rows = Remote(server.address, server.key).call("report", "user", True)
        streamed = Remote(server.address, server.key).call("accounting", True)  # rows read from the CSV
        serves_within_1s(server.address, server.key)
    finally:
        assert server.stop(keep_files=True) == 0
    n = 1 if names_refused else 2
    assert rows[0]["jobs"] == n
    assert type(streamed) is list and len(streamed) == n and all("\n" not in r["exception"] for r in streamed
                                                                   if r["exception"])
    with open(server.log_file, newline="") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and len(lines) == n + 2  # header, n rows, final newline
    assert not any(line.startswith("* * * * *") for line in lines)
    assert all(c not in "".join(lines) for c in "\r\x1b")
    parsed = csv_rows(server.log_file)
    assert len(parsed) == n
    assert any("* * * * * root" in r["exception"] and "\\n" in r["exception"] for r in parsed)
    server.stop()


def _raise_evil(text):
    raise ValueError(text)


# ------------------------------------------------- 17: the disk fills up
@pytest.fixture
def small_disk():
    """A 64 KiB tmpfs, root 0755; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    d = tempfile.mkdtemp(prefix="ezpq-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", d], check=True)
    yield d
    subprocess.run(["umount", "-l", d], check=False)
    os.rmdir(d)


def _fill(directory):
    """Fill the file system; returns the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


@needs_root
def test_rows_wait_for_space_and_are_all_written(small_disk, root_dir):
    log = os.path.join(small_disk, "acct.csv")
    launch = Launch(root_dir, "--log-file", log)
    try:
        assert launch.outcome() == "serving", launch.stderr
        filler = _fill(small_disk)
        n = 40
        with ezpq.Queue(address=launch.address, authkey=launch.key) as Q:
            jobs = Q.map(square, range(n))
        assert [j["output"] for j in jobs] == [i * i for i in range(n)]
        assert len(csv_rows(log)) < n  # the disk is full: some rows wait
        report_rows = Remote(launch.address, launch.key).call("report", "user", True)
        assert report_rows[0]["jobs"] == n  # waiting rows are counted
        serves_within_1s(launch.address, launch.key)
        os.unlink(filler)
        deadline = time.monotonic() + 15
        while len(csv_rows(log)) < n:
            assert time.monotonic() < deadline, f"{len(csv_rows(log))} of {n} rows written after space returned"
            time.sleep(0.05)
        run_one_job(launch.address, launch.key)  # the writer still works
        deadline = time.monotonic() + 10
        while len(csv_rows(log)) < n + 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        assert launch.stop() == 0
    rows = csv_rows(log)
    assert sorted(int(r["job"]) for r in rows) == list(range(1, n + 2))
    assert launch.stderr.count("disk full") == 1, launch.stderr


def _record(i, uid=0, name=None):
    t = 1.7e9 + i
    return JobRecord(seq=i, qid="q", id=i, client="c", user="root", name=name or f"job{i}", priority=100,
                     lane_key=None, timeout=0.0, function="square", fn_blob=b"", args_blob=b"", uid=uid,
                     status=JobStatus.COMPLETED, submitted=t, started=t, ended=t + 0.5, cpu_user=0.25,
                     cpu_system=0.05, max_rss=1000 + i, max_rss_method="vmhwm", pid=100, host="h")


def _wait_rows(path, n, timeout=10):
    deadline = time.monotonic() + timeout
    while len(csv_rows(path)) < n:
        assert time.monotonic() < deadline, f"{len(csv_rows(path))} of {n} rows"
        time.sleep(0.02)


@needs_root
def test_past_the_bound_dropped_rows_are_counted_loudly(small_disk, caplog):
    log_path = os.path.join(small_disk, "acct.csv")
    filler = _fill(small_disk)  # not even the header fits
    log = AccountingLog(log_path, pending_limit=5)
    try:
        for i in range(1, 21):
            log.record(_record(i), "q")
        assert len(log.visible(None)) == 5  # the 5 that wait; 15 dropped
        os.unlink(filler)
        _wait_rows(log_path, 5)
        log.record(_record(21), "q")
        _wait_rows(log_path, 6)
    finally:
        log.close()
    assert [int(r["job"]) for r in csv_rows(log_path)] == [1, 2, 3, 4, 5, 21]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("15 rows" in m and "DROPPED" in m for m in errors), errors


# --------------------------------------------- 18: rows are not kept in memory
def test_a_log_file_keeps_no_rows_in_memory(tmp_path):
    n = 20_000
    path = str(tmp_path / "acct.csv")
    records = [_record(i, uid=i % 2) for i in range(1, n + 1)]
    log = AccountingLog(path)
    try:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for rec in records:
            log.record(rec, "q")
        assert sum(1 for _ in log.visible(1)) == n // 2  # written first, then streamed
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        totals = report(log.visible(None), "user")
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    finally:
        log.close()
    assert totals[0]["jobs"] == n and totals[0]["cpu_seconds"] == pytest.approx(0.3 * n)
    print(f"held {held} B, report peak {peak} B for {n} rows")
    assert held < 1024 * 1024, held  # no rows kept (20,000 rows in memory: about 5.5 MB)
    assert peak < 2 * 1024 * 1024, peak  # report aggregates as it reads (a list of rows: about 30 MB)
    assert len(csv_rows(path)) == n


def test_without_a_log_file_only_recent_rows_are_kept():
    log = AccountingLog()
    for i in range(1, accounting.MEMORY_ROWS + 101):
        log.record(_record(i), "q")
    rows = log.visible(None)
    assert len(rows) == accounting.MEMORY_ROWS
    assert rows[0]["job"] == 101 and rows[-1]["job"] == accounting.MEMORY_ROWS + 100
    log.close()


# ------------------------------------------------------- 21: key and socket
@needs_root
def test_a_key_file_owned_by_another_user_is_refused(root_dir, users):
    a = users[USERS[0]]
    keyfile = _key(root_dir)
    os.chown(keyfile, a.pw_uid, a.pw_gid)
    launch = Launch(root_dir, keyfile=keyfile)
    assert_one_line_refusal(launch, keyfile, USERS[0])


@needs_root
def test_a_dangling_symlink_key_file_is_refused_in_one_line(root_dir):
    keyfile = os.path.join(root_dir, "key")
    target = os.path.join(root_dir, "planted-key")
    os.symlink(target, keyfile)
    launch = Launch(root_dir, keyfile=keyfile)
    assert_one_line_refusal(launch, keyfile, "symlink")
    assert not os.path.lexists(target)  # never created through the link
    assert os.path.islink(keyfile)


@needs_root
def test_a_dangling_symlink_at_the_socket_is_never_followed(root_dir):
    sock = os.path.join(root_dir, "s.sock")
    target = os.path.join(root_dir, "elsewhere")
    os.symlink(target, sock)
    launch = Launch(root_dir, socket_path=sock)
    if launch.outcome() == "serving":  # allowed: it must not have followed the link
        try:
            serves_within_1s(launch.address, launch.key)
            assert not os.path.lexists(target)
        finally:
            assert launch.stop() == 0
    else:
        assert_one_line_refusal(launch, sock, "symlink")
        assert os.path.islink(sock) and not os.path.lexists(target)


@needs_root
def test_a_second_server_on_a_live_socket_is_refused(root_dir):
    first = Server("unix", workers=1)
    try:
        launch = Launch(root_dir, socket_path=first.address)
        err = assert_one_line_refusal(launch, first.address, str(first.proc.pid))
        assert "already" in err
        assert stat.S_ISSOCK(os.lstat(first.address).st_mode)
        serves_within_1s(first.address, first.key)
        run_one_job(first.address, first.key)
    finally:
        assert first.stop() == 0


@needs_root
def test_a_regular_file_at_the_socket_is_not_deleted(root_dir):
    sock = os.path.join(root_dir, "s.sock")
    with open(sock, "w") as f:
        f.write("precious\n")
    launch = Launch(root_dir, socket_path=sock)
    assert_one_line_refusal(launch, sock, "not a socket")
    assert open(sock).read() == "precious\n"


@needs_root
def test_a_stale_socket_is_replaced(root_dir):
    sock = os.path.join(root_dir, "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    s.close()  # a socket file nobody listens on
    launch = Launch(root_dir, socket_path=sock)
    try:
        assert launch.outcome() == "serving", launch.stderr
        serves_within_1s(launch.address, launch.key)
    finally:
        assert launch.stop() == 0
    assert not os.path.lexists(sock)  # removed at stop


@needs_root
def test_stop_leaves_a_socket_that_is_not_its_own(root_dir):
    launch = Launch(root_dir)
    assert launch.outcome() == "serving", launch.stderr
    os.unlink(launch.address)
    with open(launch.address, "w") as f:  # someone else's file now at the path
        f.write("not yours\n")
    assert launch.stop() == 0
    assert open(launch.address).read() == "not yours\n"


@pytest.mark.parametrize("args, words, usage", [
    (["--log-level", "LOUD"], ["--log-level"], True),
    (["--workers", "0"], ["--workers"], True),
    (["--log-file", "/nonexistent-dir/acct.csv"], ["/nonexistent-dir/acct.csv"], False),
    (["tcp", "127.0.0.1:99999"], ["99999"], False),
    (["tcp", "no-port-here"], ["no-port-here"], False),
])
def test_start_up_errors_are_one_line_with_exit_2(root_dir, args, words, usage):
    launch = Launch(root_dir, tcp=args[1]) if args[0] == "tcp" else Launch(root_dir, *args)
    assert_one_line_refusal(launch, *words, usage=usage)


def test_a_tcp_port_in_use_is_one_line(root_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launch = Launch(root_dir, tcp=f"127.0.0.1:{port}")
        assert_one_line_refusal(launch, str(port))


def test_authkey_as_str_works_in_the_client_library():
    server = Server("unix", workers=1)
    try:
        text = server.key.decode()
        assert Remote(server.address, text).call("info") is not None
        with ezpq.Queue(address=server.address, authkey=text) as Q:
            assert [j["output"] for j in Q.map(square, [2, 3])] == [4, 9]
        with pytest.raises(TypeError):
            Remote(server.address, 12345)
        with pytest.raises(TypeError):
            ezpq.Queue(address=server.address, authkey=12345)
        serves_within_1s(server.address, server.key)
    finally:
        assert server.stop() == 0


def test_rows_read_back_from_the_file_equal_the_rows_kept_in_memory(tmp_path):
    """Streaming from the CSV changes no row: same fields, same types."""
    on_file, in_memory = AccountingLog(str(tmp_path / "acct.csv")), AccountingLog()
    try:
        for i in range(1, 6):
            for log in (on_file, in_memory):
                log.record(_record(i, uid=i % 2), "q")
        for uid in (None, 0, 1):
            assert list(on_file.visible(uid)) == in_memory.visible(uid)
        assert report(on_file.visible(None), "user") == report(in_memory.visible(None), "user")
    finally:
        on_file.close()
        in_memory.close()


# ============================================================================
# Second attack pass (2026-12-07)
# ============================================================================
# The surface added after issue 10 was worked: per-job logs, queue control
# and ``top``, dependencies, the durable server, parked calls, the Dask
# executor. Same rules: a real root ``ezpq-server`` on a Unix socket,
# throwaway users, the attack done for real, asserting it fails and that
# another user is still served within 1 s.


@pytest.fixture
def log_server(users):
    """``input_server`` with a ``--log-dir`` the test knows (a user learns
    the path from the unit file; the job number from ``ezpq submit``)."""
    root = tempfile.mkdtemp(prefix="ezpq-attack-logs-")
    os.chmod(root, 0o755)
    s = _server("--log-dir", os.path.join(root, "logs"))
    s.log_dir = os.path.join(root, "logs")
    yield s
    assert s.stop() == 0
    shutil.rmtree(s.dir, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------- a lease on one's own log file
def a_leases_its_log(log_server, leased, release):
    """User A (no privilege) submits a job that prints now and then; its log
    file is A's own (fchown), so A may take a file lease on it: every open
    for writing by anyone else then blocks until A lets go (or for
    /proc/sys/fs/lease-break-time, 45 s by default), then A takes it again."""
    import fcntl

    def print_for_a_while(_ignored):
        import sys as _sys
        import time as _time
        print("first line", flush=True)
        end = _time.monotonic() + 8
        while _time.monotonic() < end:
            _time.sleep(0.1)
            _sys.stdout.write("more\n")
            _sys.stdout.flush()

    remote, token, env = connect(log_server)
    seq = remote.call("submit", "lease", record(token, env, fn=print_for_a_while))["job"]
    path = os.path.join(log_server.log_dir, f"{seq}.log")
    signal.signal(signal.SIGIO, signal.SIG_IGN)   # the lease holder ignores the break notice
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, "the job's log never appeared"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            time.sleep(0.02)
            continue
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            break
        except OSError:   # the server has it open right now: again
            os.close(fd)
            time.sleep(0.005)
    leased.set()
    release.wait(20)
    os.close(fd)
    return seq


@needs_root
def test_a_lease_on_ones_own_log_file_stalls_nobody(log_server, users):
    """A read lease on the log file A owns made the supervisor's next open
    of it for appending block (in the supervisor thread, under the log
    book's lock) until A released it: nobody's job started or ended
    meanwhile. Now the server opens logs without blocking."""
    leased, release = FORK.Event(), FORK.Event()
    pa, out = start_as(users[USERS[0]], a_leases_its_log, log_server, leased, release)
    try:
        assert leased.wait(30), f"A could not take its lease: {out.get(timeout=1) if not out.empty() else ''}"
        time.sleep(0.5)   # the job prints meanwhile: the server opens the file
        assert_b_served(log_server, users)
    finally:
        release.set()
        kind, seq = out.get(timeout=60)
        pa.join(10)
    assert kind == "ok", seq
    assert_b_served(log_server, users)


# ------------------------------------------- parked wait_jobs scanned at every change
def _put_paused(remote, token, env, qid, n_jobs):
    """``n_jobs`` no-op jobs into the caller's paused queue ``qid`` (nothing runs)."""
    remote.call("pause_queues", [qid], True)
    for start in range(0, n_jobs, 2000):
        remote.call("put", qid, [record(token, env)] * min(2000, n_jobs - start))


def _many_and_last(input_server, n_jobs):
    """The caller's ``n_jobs`` jobs in paused queue "many" and one more in
    paused "last": a wait on all of them ends only when "last" does. Its
    connection."""
    remote, token, env = connect(input_server)
    _put_paused(remote, token, env, "many", n_jobs)
    _put_paused(remote, token, env, "last", 1)
    return remote


def _park_wait_jobs(input_server, remote, n_conns, timeout, socks=None):
    """``wait_jobs([])`` (all the caller's jobs) parked on ``n_conns`` new
    connections, each in a thread; returns once the server counts them all
    parked. (connections, the answers list they append to, the threads);
    ``socks``: each connection's socket once its call is sent."""
    remotes = [Remote(input_server.address, input_server.key) for _ in range(n_conns)]
    answers = []

    def park(r):
        sent = None if socks is None else (lambda: socks.__setitem__(r, r._local.sock))
        try:
            answers.append(r.call("wait_jobs", [], timeout, sent=sent))
        except Exception as exc:
            answers.append(repr(exc))

    threads = [threading.Thread(target=park, args=(r,), daemon=True) for r in remotes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while remote.call("info")["parked_calls"] < n_conns:
        assert time.monotonic() < deadline, "the calls did not park"
        time.sleep(0.05)
    return remotes, answers, threads


def a_parks_wait_jobs_behind_finished_ones(input_server, n_jobs, n_conns, parked, release):
    """User A holds ``n_jobs`` jobs in a paused queue and one more, last,
    in another paused queue; parks ``wait_jobs([])`` (all of A's jobs) on
    ``n_conns`` connections; then cancels the ``n_jobs``. Each parked
    call's condition is re-run at every change of the server (anyone's put,
    start, end), and scanned the finished jobs before the one unfinished
    job at the end: n_jobs x n_conns steps under the state's lock, per change."""
    remote = _many_and_last(input_server, n_jobs)
    socks = {}
    remotes, answers, threads = _park_wait_jobs(input_server, remote, n_conns, 120.0, socks)
    assert remote.call("cancel_all", "many", None, False) == n_jobs
    parked.set()
    release.wait(60)
    for r in remotes[1:]:   # withdrawn unanswered (99 answers of 30,001 jobs each: another test's matter)
        socks[r].shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 60
    while remote.call("info")["parked_calls"] > 1:   # withdrawn before the answer could go out
        assert time.monotonic() < deadline, "the calls were not withdrawn"
        time.sleep(0.05)
    remote.call("cancel_all", "last", None, False)   # the one parked call left is answered now
    for t in threads:
        t.join(30)
    remotes[0].close()
    return answers


@needs_root
@pytest.mark.timeout(600)   # before the fix, A's 99 withdrawals cost minutes at teardown
def test_parked_wait_jobs_cost_nothing_per_change_for_jobs_already_finished(input_server, users):
    """30,000 finished jobs x 100 parked calls: 3M steps under the state's
    lock at every change of the server (0.3-0.5 s each: B's put alone). Now
    each parked wait_jobs keeps its place: a job is looked at once after it ended."""
    parked, release = FORK.Event(), FORK.Event()
    pa, out = start_as(users[USERS[0]], a_parks_wait_jobs_behind_finished_ones, input_server,
                       30_000, 100, parked, release)
    try:
        assert parked.wait(120), f"A did not get its calls parked: {out.get(timeout=1) if not out.empty() else ''}"
        assert_b_served(input_server, users)
    finally:
        release.set()
        kind, answers = out.get(timeout=500)
        pa.join(10)
    assert kind == "ok", answers
    assert answers.count(True) == 1 and len(answers) == 100, answers[:3]


# ------------------------------------------- many parked waits answered at once
def a_gets_parked_waits_answered_at_once(input_server, n_jobs, n_conns, parked, go, answering):
    """User A parks ``wait_jobs([])`` over ``n_jobs`` + 1 of her jobs on
    ``n_conns`` connections, then ends the last one: every call is ready at
    once. When each answer listed every job, the thread that ended it built
    n_conns x n_jobs rows under the state's lock and encoded them (100 x
    30,001: minutes in which nobody's job moved)."""
    remote = _many_and_last(input_server, n_jobs)
    assert remote.call("cancel_all", "many", None, False) == n_jobs
    remotes, answers, threads = _park_wait_jobs(input_server, remote, n_conns, 300.0)
    parked.set()
    go.wait(60)
    answering.set()
    remote.call("cancel_all", "last", None, False)   # all n_conns calls are ready now
    for t in threads:
        t.join(300)
    for r in remotes:
        r.close()
    return answers


@needs_root
@pytest.mark.timeout(600)
def test_many_parked_waits_answered_at_once_stall_nobody(input_server, users):
    parked, go, answering = FORK.Event(), FORK.Event(), FORK.Event()
    pa, out = start_as(users[USERS[0]], a_gets_parked_waits_answered_at_once, input_server,
                       30_000, 100, parked, go, answering)
    try:
        assert parked.wait(120), f"A did not get its calls parked: {out.get(timeout=1) if not out.empty() else ''}"
        go.set()
        assert answering.wait(30)
        assert_b_served(input_server, users)
    finally:
        go.set()
        kind, answers = out.get(timeout=500)
        pa.join(10)
    assert kind == "ok", answers
    assert answers == [True] * 100, answers[:3]


# ------------------------------------------- what one user may hold on the server
def a_holds_as_much_as_she_can(input_server, big, lane=0):
    """User A keeps putting jobs in a paused queue (nothing runs, nothing is
    collected) until the server refuses: with no cap, one user could hold
    the server's memory (or, with --state-dir, its disk) alone. Then she
    makes room (clean) and is served again. ``lane``: each job also carries
    a lane key of that many bytes (a job's lane key, up to 64 KiB, was not
    counted: 250,000 jobs could hold 16 GB past --max-user-bytes)."""
    remote, token, env = connect(input_server)
    remote.call("pause_queues", ["hoard"], True)
    args = (b"x" * big,) if big else (-1,)
    extra = {"lane_key": b"k" * lane} if lane else {}
    accepted, refusal = 0, None
    batch = 1 if big or lane else 10
    for _ in range(400):
        try:
            remote.call("put", "hoard", [record(token, env, fn=len if big else abs, args=args, **extra)] * batch)
            accepted += batch
        except ezpq.ServerLimit as exc:
            refusal = str(exc)
            break
    on_server = len(remote.call("jobs", "hoard"))
    remote.call("cancel_all", "hoard", None, False)
    remote.call("clean", "hoard")
    remote.call("put", "hoard", [record(token, env)])
    again = len(remote.call("jobs", "hoard"))
    return accepted, on_server, refusal, again


@needs_root
@pytest.mark.parametrize("what, big, lane, cap", [("jobs", 0, 0, 100), ("bytes", 300_000, 0, 6),
                                                 ("bytes", 0, 64 * 1024, 31)], ids=["jobs", "bytes", "lane-keys"])
def test_one_user_holds_a_bounded_share_of_the_server(users, what, big, lane, cap):
    s = _server("--max-user-jobs", "100", "--max-user-bytes", "2M")
    try:
        accepted, on_server, refusal, again = run_as(users[USERS[0]], a_holds_as_much_as_she_can, s, big, lane,
                                                     timeout=120)
        assert refusal is not None and f"--max-user-{what}" in refusal, (accepted, refusal)
        assert 0 < accepted == on_server <= cap, (accepted, on_server)   # the refused batch left nothing
        assert again == 1, "after making room, A is served again"
        assert_b_served(s, users)
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)


# ------------------------------------------- the Dask client unpickles what the scheduler sends it
def b_makes_the_scheduler_send_ezpq_pickles(scheduler, marker):
    """User B, without the ezpq key: Dask's scheduler has no authentication,
    so any local user (or any job, on a --dask-any-user server) can run code
    in it (``run_on_scheduler``). A Dask client unpickles any ``__Pickled__``
    sub-header the scheduler sends, whatever its deserializers say. B (1)
    makes every answer to a results-queue get a pickle that runs his code
    and then gives the real answer back (the queue goes on, nobody sees),
    and (2) puts a ``ToPickle`` item in every ezpq results queue. Returns
    what it patched and the queues it reached."""
    import distributed

    def patch_scheduler(dask_scheduler=None, marker=marker):
        from distributed.protocol.serialize import ToPickle
        code = f"open({marker!r}, 'w').write(str(__import__('os').getpid()))"

        class Payload:
            def __init__(self, value):
                self.value = value

            def __reduce__(self):   # runs B's code where it is unpickled, then is the real value
                return (eval, (f"({code}, {self.value!r})[1]",))

        original = dask_scheduler.handlers["queue_get"]

        async def queue_get(*args, **kwargs):
            out = await original(*args, **kwargs)
            if isinstance(out, dict) and out.get("type") == "msgpack":
                out = dict(out, value=ToPickle(Payload(out["value"])))
            return out

        dask_scheduler.handlers["queue_get"] = queue_get
        queues = dask_scheduler.extensions["queues"].queues
        names = [name for name in queues if str(name).endswith("-results")]
        for name in names:
            queues[name].put_nowait({"type": "msgpack", "value": ToPickle(Payload(None))})
        return names

    with distributed.Client(scheduler, timeout=30, set_as_default=False) as client:
        return client.run_on_scheduler(patch_scheduler)


@needs_root
def test_what_a_dask_worker_hands_back_runs_nothing_in_the_server(users):
    """The pickles run where the Dask client is: the Dask bridge, as
    --dask-user (nobody), never in the root ezpq-server; the queue goes on."""
    distributed = pytest.importorskip("distributed")
    import pwd
    from server_fixture import free_port
    from test_dask import _start_scheduler, _start_worker, _stop
    port = free_port()
    scheduler_address = f"tcp://127.0.0.1:{port}"
    scheduler = _start_scheduler(port)
    worker = _start_worker(scheduler_address)
    server = None
    where = tempfile.mkdtemp(prefix="ezpq-attack-dask-")
    os.chmod(where, 0o777)
    marker = os.path.join(where, "ran-in-the-server")
    try:
        with distributed.Client(scheduler_address, timeout=30, set_as_default=False) as c:   # the cluster is up
            c.wait_for_workers(1, timeout=60)
        server = Server("unix", workers=2, extra=("--dask", scheduler_address, "--dask-any-user"))
        os.chmod(server.dir, 0o777)
        assert len(run_as(users[USERS[1]], b_makes_the_scheduler_send_ezpq_pickles, scheduler_address, marker,
                          cwd=where)) == 1
        with ezpq.Queue(address=server.address, authkey=server.key) as Q:   # anybody's next job
            Q.put(abs, -3)
            job = Q.get(wait=True, timeout=60)
        ran = open(marker).read() if os.path.exists(marker) else None
        assert ran != str(server.proc.pid), "B's code ran in the root ezpq-server"
        assert ran is not None, "the attack reached no Dask client"
        assert os.stat(marker).st_uid == pwd.getpwnam("nobody").pw_uid   # the bridge, as --dask-user
        assert job["status"] == "completed" and job["output"] == 3, job
    finally:
        if server is not None:
            assert server.stop() == 0
        _stop(worker)
        _stop(scheduler)
        shutil.rmtree(where, ignore_errors=True)


# ------------------------------------------- one user's big listings starve the others
def a_lists_its_jobs_in_a_loop(input_server, n_jobs, n_conns, looping, release):
    """User A holds ``n_jobs`` waiting jobs (a paused queue: nothing caps
    how many jobs one user holds) and asks for all of them (``ezpq status``,
    ``list_jobs``) on ``n_conns`` connections at once, again and again: each
    call snapshots them under the state's lock and encodes ~30 MB of JSON
    on the server's interpreter."""
    remote, token, env = connect(input_server)
    _put_paused(remote, token, env, "many", n_jobs)
    return _in_a_loop_on_connections(input_server, n_conns, looping, release, 1,
                                     lambda r: r.call("list_jobs"))


def _in_a_loop_on_connections(input_server, n_conns, looping, release, settle, one):
    """``one(remote)`` again and again on ``n_conns`` connections of their
    own until ``release``; ``looping`` is set ``settle`` s after they began.
    How many calls were made."""
    calls = []

    def loop():
        r = Remote(input_server.address, input_server.key)
        r.call("info")
        while not release.is_set():
            one(r)
            calls.append(1)
        r.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n_conns)]
    for t in threads:
        t.start()
    time.sleep(settle)
    looping.set()
    release.wait(120)
    for t in threads:
        t.join(60)
    return len(calls)


def _b_served_while_a_attacks(input_server, users, attack, *args, rounds=1):
    """Run ``attack(input_server, *args, looping, release)`` as user A; once
    it says it is looping, B's round trip must stay under 1 s (``rounds``
    times); then A is released and must have ended cleanly."""
    looping, release = FORK.Event(), FORK.Event()
    pa, out = start_as(users[USERS[0]], attack, input_server, *args, looping, release)
    try:
        assert looping.wait(120), f"A did not start: {out.get(timeout=1) if not out.empty() else ''}"
        for _ in range(rounds):
            assert_b_served(input_server, users)
    finally:
        release.set()
        kind, result = out.get(timeout=120)
        pa.join(10)
    assert kind == "ok", result


@needs_root
def test_one_users_listings_of_many_jobs_starve_nobody(input_server, users):
    # B's worker is up before the attack (a fresh interpreter: ~0.3 s of
    # B's first round trip on a loaded box, which is not what is measured).
    # Five rounds: with A's 8 listings encoded at once (one per user at a
    # time only while copied), B's round trips took 0.16-1.2 s (1 in 16 over
    # 1 s; a CI run failed at 1.09 s); answered one at a time, 0.02-0.44 s
    assert_b_served(input_server, users)
    _b_served_while_a_attacks(input_server, users, a_lists_its_jobs_in_a_loop, 50_000, 8, rounds=5)


# ============================================================================
# Third attack pass (2026-12-07)
# ============================================================================
# What is newest or least attacked: the per-user caps, the JSON of any
# request, the Dask bridge. Same rules: a real root ``ezpq-server`` on a
# Unix socket, throwaway users, the attack done for real, asserting it fails
# and that another user is still served within 1 s.


# ------------------------------------------- bytes that come after the put
def _held_bytes(jobs):
    return sum(len(j.get(f) or b"") for j in jobs for f in ("args_blob", "output_blob", "callback_blob"))


def a_grows_after_the_put(input_server, how, n, size):
    """User A's put is small (``bytes`` of a number), so --max-user-bytes
    lets it in; what the server then holds for her comes later: each job's
    output (``how="output"``: ``size`` bytes each), or, for a holding
    client, the pickled result of her callback that she hands back with
    ``mark_processed`` (``how="callback"``). Neither was counted: n x size
    bytes held past the cap (the server's memory, with --state-dir its
    disk). Then A collects everything: what did the server hold for her?"""
    remote, token, env = connect(input_server)
    if how == "callback":
        remote.call("hello", token, input_server.dir, [], True)   # a holding client (callbacks)
    fn, args = (bytes, (size,)) if how == "output" else (abs, (-1,))
    remote.call("put", "grow", [record(token, env, fn=fn, args=args, suppress_errors=True)] * n)   # (failed: not held)
    refusals = []
    if how == "output":
        remote.call("wait_pending", "grow", 1, 120.0)
    else:   # held jobs are not done until processed: their notices say they ended
        held, deadline = [], time.monotonic() + 60
        while len(held) < n and time.monotonic() < deadline:
            held += [j["seq"] for j in remote.call("take_notices", token, 5.0) or []]
        assert len(held) == n, held
        for seq in held:
            try:
                remote.call("mark_processed", [(seq, b"c" * size)])
            except ezpq.ServerLimit as exc:
                refusals.append(str(exc))
                remote.call("mark_processed", [(seq, None)])   # processed, without a result kept
    jobs = remote.call("collect", "grow", n)
    return len(jobs), _held_bytes(jobs), sorted({j["status"] for j in jobs}), refusals, \
        [j["exception"] for j in jobs if j["exception"]][:1]


@needs_root
@pytest.mark.parametrize("how", ["output", "callback"])
def test_what_a_job_holds_after_its_put_counts_in_the_users_bytes(users, how):
    s = _server("--max-user-bytes", "2M")
    try:
        n, size = 20, 1_000_000   # 20 MB against a 2 MiB cap
        got, held, statuses, refusals, why = run_as(users[USERS[0]], a_grows_after_the_put, s, how, n, size,
                                                    timeout=180)
        assert got == n, (got, statuses)
        assert held <= 2 * 1024 * 1024, f"A held {held:,} bytes on the server past the 2 MiB cap"
        if how == "output":   # the jobs past the cap end failed, saying why
            assert "failed" in statuses and why and "--max-user-bytes" in why[0], (statuses, why)
        else:
            assert refusals and "--max-user-bytes" in refusals[0], refusals
        assert_b_served(s, users)
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)


# ------------------------------------------- a request of many small tokens holds the interpreter
def a_sends_requests_of_many_tokens(input_server, n_items, n_conns, looping, release):
    """User A (no privilege, within --max-message) sends, on ``n_conns``
    connections in a loop, a request that is a JSON list of ``n_items``
    zeros (``pop_ids`` with millions of ids is one legitimately: MAX_IDS is
    10M). ``json.loads`` is one C call that holds the GIL for the whole
    parse (~50 ns a token: seconds for tens of millions): no other thread
    of the server runs meanwhile, whatever the switch interval says. The
    request is malformed, so nothing but the parse (or, now, the count that
    refuses it) costs the server."""
    from ezpq_mgr import transport
    frame = transport.frame(b"[" + b"0," * (n_items - 1) + b"0]")

    def send(r):
        r._local.sock.sendall(frame)
        r._recv(r._local.sock)   # refused: too many values, or malformed

    return _in_a_loop_on_connections(input_server, n_conns, looping, release, 2, send)


@needs_root
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n_items", [50_000_000, wire.MAX_VALUES])
def test_a_request_of_many_small_tokens_stalls_nobody(input_server, users, n_items):
    """50M zeros (100 MB, under --max-message) on 3 connections: B's
    round trip took 1.8 to 6.9 s. Now a request of more than
    wire.MAX_VALUES values is refused before it is parsed (its commas
    counted); at the bound (about 0.4 s a parse) B is still served."""
    assert_b_served(input_server, users)   # B's worker is up before the attack
    _b_served_while_a_attacks(input_server, users, a_sends_requests_of_many_tokens, n_items, 3, rounds=3)


@needs_root
def test_a_call_of_too_many_values_is_refused_at_the_call_and_by_the_server(input_server, monkeypatch):
    """The client library counts a shared server's request too: ValueError
    at the call, nothing sent, nothing queued. (The server's own count is
    what the attack above meets.)"""
    from ezpq_mgr import wire
    with ezpq.Queue(address=input_server.address, authkey=input_server.key, qid="values") as Q:
        monkeypatch.setattr(wire, "MAX_VALUES", 20_000)   # this process only: the server keeps its own
        with pytest.raises(ValueError, match="values is over"):
            Q.map(abs, range(5_000))
        monkeypatch.undo()
        assert Q.size() == 0
        assert [j["output"] for j in Q.map(abs, range(-3, 0))] == [3, 2, 1]


# ------------------------------------------- a Dask bridge taken over floods the root server
def b_floods_from_the_bridge(scheduler, seconds):
    """User B, without the ezpq key, reaches the (unauthenticated) scheduler
    and has it send the bridge a pickle (as above): B's code runs in the
    bridge, as --dask-user. From there B writes well-formed ``BridgeLog``
    lines (level CRITICAL, the bridge chooses) on the bridge's channel for
    ``seconds``: every one was logged by the root server, under the state's
    lock, with no bound: the server's log (its journal, root's disk) grows
    at memory speed and the lock is held for the flood."""
    import distributed
    code = (
        "import sys, threading, time, gc\n"
        "if not getattr(sys, '_ezpq_flood', False):\n"
        "    sys._ezpq_flood = True\n"
        "    from ezpq_mgr.server import bridgeproto\n"
        "    from ezpq_mgr import messages as m\n"
        "    b = next(o for o in gc.get_objects() if type(o).__name__ == 'Bridge' and hasattr(o, 'send'))\n"
        "    data = bridgeproto.encode(m.BridgeLog(50, 'B-WAS-HERE ' + 'x' * 1000)) * 100\n"
        "    def flood(end=time.monotonic() + %r):\n"
        "        while time.monotonic() < end:\n"
        "            with b._send_lock:\n"
        "                b.sock.sendall(data)\n"
        "    threading.Thread(target=flood, daemon=True).start()\n" % seconds)

    def patch_scheduler(dask_scheduler=None, code=code):
        from distributed.protocol.serialize import ToPickle

        class Payload:
            def __reduce__(self):
                return (exec, (code, {}))

        queues = dask_scheduler.extensions["queues"].queues
        names = [name for name in queues if str(name).endswith("-results")]
        for name in names:
            queues[name].put_nowait({"type": "msgpack", "value": ToPickle(Payload())})
        return names

    with distributed.Client(scheduler, timeout=30, set_as_default=False) as client:
        return client.run_on_scheduler(patch_scheduler)


def b_calls_the_server(server):
    """User B's calls that take the state's lock (put in a paused queue,
    counts, a listing), not a job's run: seconds taken."""
    t0 = time.monotonic()
    remote, token, env = connect(server)
    remote.call("pause_queues", ["b"], True)
    remote.call("put", "b", [record(token, env)])
    remote.call("counts", "b")
    remote.call("list_jobs")
    remote.call("cancel_all", "b", None, False)
    remote.call("clean", "b")
    return time.monotonic() - t0


@needs_root
@pytest.mark.timeout(300)
def test_a_bridge_taken_over_floods_neither_the_log_nor_the_lock(users, tmp_path):
    """A taken-over bridge that floods is ended: its lines logged a few a
    second, never under the state's lock; the server answers B meanwhile.
    (Jobs on Dask wait for the next bridge: whoever reaches the scheduler
    can stop the cluster's work anyway; the root server is what is kept.)"""
    distributed = pytest.importorskip("distributed")
    from server_fixture import free_port
    from test_dask import _start_scheduler, _start_worker, _stop
    port = free_port()
    scheduler_address = f"tcp://127.0.0.1:{port}"
    scheduler = _start_scheduler(port)
    worker = _start_worker(scheduler_address)
    server = None
    err = tmp_path / "server-stderr"
    saved = os.dup(2)
    try:
        with distributed.Client(scheduler_address, timeout=30, set_as_default=False) as c:   # the cluster is up
            c.wait_for_workers(1, timeout=60)
        with open(err, "wb") as f:   # the server's log (stderr) where the test can count its lines
            os.dup2(f.fileno(), 2)
            try:
                server = Server("unix", workers=2, extra=("--dask", scheduler_address, "--dask-any-user"))
            finally:
                os.dup2(saved, 2)
        os.chmod(server.dir, 0o777)
        assert_b_served(server, users)   # B's first job on Dask, before the attack
        seconds = 6
        assert len(run_as(users[USERS[0]], b_floods_from_the_bridge, scheduler_address, seconds,
                          cwd=server.dir)) == 1
        t0, took = time.monotonic(), []
        while time.monotonic() - t0 < seconds:   # the server itself (jobs on Dask wait for a new bridge)
            took.append(run_as(users[USERS[1]], b_calls_the_server, server, timeout=60))
        assert max(took) < 1.0, f"the other user's calls took up to {max(took):.2f} s"
        time.sleep(1)
        with open(err, "rb") as f:
            logged = f.read()
        lines = logged.count(b"B-WAS-HERE")
        assert lines > 0, f"the attack reached no bridge: {logged[-2000:]!r}"
        assert lines <= 100, f"the root server logged {lines:,} lines a taken-over bridge wrote in {seconds} s"
    finally:
        os.close(saved)
        if server is not None:
            assert server.stop() == 0
        _stop(worker)
        _stop(scheduler)


# ------------------------------------------- requeue: jobs the caps never saw
def a_requeues_past_her_share(input_server):
    """User A puts one job (within --max-user-jobs 5) in a paused queue,
    cancels it (finished), then ``requeue_job``s it again and again: each
    requeue is a new job, with the same function and arguments, added
    without the caps' check and without being counted, so (1) A holds as
    many jobs (and, with --state-dir, copies of their bytes on disk) as she
    likes; (2) when they go, what they never added is taken off: A's count
    goes negative and her next puts pass the cap by as much."""
    remote, token, env = connect(input_server)
    remote.call("pause_queues", ["rq"], True)
    remote.call("put", "rq", [record(token, env)])
    remote.call("cancel_all", "rq", None, False)
    seq = remote.call("jobs", "rq")[0]["seq"]
    requeued, refusal = 0, None
    for _ in range(20):
        try:
            remote.call("requeue_job", seq)
            requeued += 1
        except ezpq.ServerLimit as exc:
            refusal = str(exc)
            break
    held = len(remote.call("jobs", "rq"))
    remote.call("cancel_all", "rq", None, False)
    remote.call("clean", "rq")
    put = 0
    for _ in range(20):   # everything is gone: the cap is 5 again
        try:
            remote.call("put", "rq", [record(token, env)])
            put += 1
        except ezpq.ServerLimit:
            break
    remote.call("cancel_all", "rq", None, False)
    remote.call("clean", "rq")
    return requeued, held, refusal, put


@needs_root
def test_requeued_jobs_count_in_the_users_share(users):
    s = _server("--max-user-jobs", "5")
    try:
        requeued, held, refusal, put = run_as(users[USERS[0]], a_requeues_past_her_share, s, timeout=120)
        assert held <= 5 and refusal is not None and "--max-user-jobs" in refusal, (requeued, held, refusal, put)
        assert put == 5, f"after her requeued jobs went, A put {put} jobs under a cap of 5"
        assert_b_served(s, users)
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)


# ============================================================================
# Fourth attack pass (2026-12-08)
# ============================================================================
# The newest change (one user's big answers one at a time, Python's 5 ms
# switch interval) and several users attacking at once. Same rules: a real
# root ``ezpq-server`` on a Unix socket, throwaway users, the attack done for
# real, asserting it fails and that another user is still served within 1 s.


# ------------------------------------------- big answers asked for and never read
def a_asks_big_answers_it_never_reads(input_server, n_jobs, n_conns, out, go):
    """User A holds ``n_jobs`` jobs with 1 KiB names and function names (a
    paused queue), then asks for all of them (``list_jobs``, ``ezpq
    status``) on ``n_conns`` connections of its own and reads none of the
    answers: the server encodes each (~2.7 KiB a job) and keeps what the
    socket does not take until the client reads it."""
    from ezpq_mgr import transport
    from ezpq_mgr.messages import Request
    remote, token, env = connect(input_server)
    remote.call("pause_queues", ["many"], True)
    job = record(token, env, name="n" * 1024, function="f" * 1024)
    for start in range(0, n_jobs, 1000):
        remote.call("put", "many", [job] * min(1000, n_jobs - start))
    body = wire.dumps(Request("list_jobs", ()))
    socks = []
    for _ in range(n_conns):
        sock = transport.connect(input_server.address, input_server.key)[0]
        sock.sendall(transport.HEADER.pack(len(body)) + body)
        socks.append(sock)
    out.put(("asked", len(socks)))
    go.wait(120)
    for sock in socks:
        sock.close()
    remote.close()


def a_lists_its_jobs(input_server):
    return len(Remote(input_server.address, input_server.key).call("list_jobs"))


def _settled(proc, deadline, grown, bound):
    """Poll until ``proc`` stops using CPU (under 20 ms in 0.5 s), failing
    as soon as ``grown()`` passes ``bound``; the last growth seen."""
    cpu = sum(proc.cpu_times()[:2])
    while True:
        g = grown()
        assert g < bound, f"the server's RSS grew by {g / 2**20:.0f} MiB"
        assert time.monotonic() < deadline, "the server kept busy"
        time.sleep(0.5)
        now = sum(proc.cpu_times()[:2])
        if now - cpu < 0.02:
            return grown()
        cpu = now


@needs_root
def test_big_answers_a_user_never_reads_hold_a_bounded_memory(input_server, users):
    """The attacker's find: one user's big answers were made one at a time,
    but each was then kept for its connection until the client read it, and
    one user may hold 256 connections: 64 listings of 5,000 jobs with 1 KiB
    names, none read, held ~0.9 GB of a root server (250,000 jobs, the
    default cap, on 256 connections: some 170 GB, i.e. the OOM killer). Now
    a user's next big answer waits until its last one was read: the server
    holds one unread big answer per user (what this user's next big answers
    wait for is its own client)."""
    proc = psutil.Process(input_server.proc.pid)
    assert_b_served(input_server, users)   # warm: B's worker is up
    idle = vm(proc.pid, "VmRSS")
    go, out = FORK.Event(), FORK.Queue()
    p, _ = start_as(users[USERS[0]], a_asks_big_answers_it_never_reads, input_server, 5_000, 64, out, go)
    try:
        kind, asked = out.get(timeout=120)
        assert (kind, asked) == ("asked", 64), (kind, asked)
        assert_b_served(input_server, users)
        grown = _settled(proc, time.monotonic() + 90, lambda: vm(proc.pid, "VmRSS") - idle, 150 * 2**20)
        assert grown < 150 * 2**20, grown
        assert_b_served(input_server, users)
    finally:
        let_go(go, p)
    # A's connections closed: its next listing is answered at once
    assert run_as(users[USERS[0]], a_lists_its_jobs, input_server, timeout=30) == 5_000


# ------------------------------------------- several users' big answers at once
def nameless_users(n):
    """``n`` uids with no account (61000 on): attackers need no name, and
    the server learns each uid from SO_PEERCRED all the same."""
    return [pwd.struct_passwd((str(61000 + i), "x", 61000 + i, 61000 + i, "", "/", "/bin/false"))
            for i in range(n)]


def _b_served_while_several_attack(input_server, users, attackers, attack, *args, rounds=1):
    """``_b_served_while_a_attacks`` with every user of ``attackers`` running
    ``attack`` at once; root's ``info`` must be answered within 1 s too."""
    started = []
    try:
        for pw in attackers:
            looping, release = FORK.Event(), FORK.Event()
            p, out = start_as(pw, attack, input_server, *args, looping, release)
            started.append((p, out, looping, release))
        for p, out, looping, release in started:
            assert looping.wait(180), f"an attacker did not start: {out.get(timeout=1) if not out.empty() else ''}"
        for _ in range(rounds):
            assert_b_served(input_server, users)
            assert served_within(input_server), "root's ezpq status waited over 1 s"
    finally:
        for p, out, looping, release in started:
            release.set()
        results = [out.get(timeout=120) for p, out, looping, release in started]
        for p, *_ in started:
            p.join(10)
    assert all(kind == "ok" for kind, _ in results), results


@needs_root
def test_several_users_listings_at_once_starve_nobody(input_server, users):
    """The attacker's find: one user's big answers are made one at a time,
    but four users' were made at once, and the others' calls shared the
    interpreter with all of them: four users listing 50,000 jobs on 8
    connections each left B's put and get at 0.30-1.14 s (one user: 0.05-0.23
    s), growing with the number of users. Now one big answer is made at a
    time server-wide: 0.08-0.10 s. Six users listing 20,000 jobs here."""
    assert_b_served(input_server, users)
    attackers = [users[USERS[0]]] + nameless_users(5)
    _b_served_while_several_attack(input_server, users, attackers, a_lists_its_jobs_in_a_loop, 20_000, 2,
                                   rounds=5)


# ------------------------------------------- results handed over and never read
def a_takes_results_and_never_reads(input_server, how, rounds, size, out, go):
    """User A, ``rounds`` times: one job that returns ``size`` bytes, taken
    by a new connection of her own whose answer she never reads: collected
    once done (``how="collect"``), or a parked ``get(wait=True)`` asked
    before the put and answered by the server when the job ends
    (``how="get"``). A job handed over no longer counts in her
    --max-user-bytes, but its answer stays queued in the server for her
    connection: without a bound, any number of results held by a client
    that does not read."""
    from ezpq_mgr import transport
    from ezpq_mgr.messages import Request
    remote, token, env = connect(input_server)
    body = wire.dumps(Request("collect", ("grow", 1)) if how == "collect" else
                      Request("get", ("grow", True, 120.0, True)))
    socks = []
    for _ in range(rounds):
        sock = transport.connect(input_server.address, input_server.key)[0]
        socks.append(sock)
        if how == "get":
            sock.sendall(transport.HEADER.pack(len(body)) + body)
        remote.call("put", "grow", [record(token, env, fn=bytes, args=(size,), suppress_errors=True)])
        assert remote.call("wait_pending", "grow", 1, 120.0) == 0
        if how == "collect":
            sock.sendall(transport.HEADER.pack(len(body)) + body)
        deadline = time.monotonic() + 60   # taken off the queue by that connection's call
        while remote.call("counts", "grow")["completed"] and time.monotonic() < deadline:
            time.sleep(0.01)
    out.put(("asked", len(socks)))
    go.wait(120)
    for sock in socks:
        sock.close()
    remote.close()


@needs_root
@pytest.mark.parametrize("how", ["collect", "get"])
def test_results_a_user_never_reads_count_in_her_bytes(users, how):
    """The attacker's find (fourth pass): on a server with
    --max-user-bytes 16M, 40 jobs of 8 MB each, each collected on a
    connection whose answer A never read, grew the root server by 992 MiB
    (860 MiB with a parked get): a collected job leaves A's bytes, its
    answer stayed. Now the answers queued for a user's connections and not
    yet taken count in her bytes: the jobs that would pass the cap end
    failed with nothing kept, and the server's growth stays near the cap."""
    s = _server("--max-user-bytes", "16M")
    try:
        proc = psutil.Process(s.proc.pid)
        assert_b_served(s, users)   # warm: B's worker is up
        idle = vm(proc.pid, "VmRSS")
        go, out = FORK.Event(), FORK.Queue()
        p, _ = start_as(users[USERS[0]], a_takes_results_and_never_reads, s, how, 40, 8_000_000, out, go)
        try:
            kind, asked = out.get(timeout=240)
            assert (kind, asked) == ("asked", 40), (kind, asked)
            grown = vm(proc.pid, "VmRSS") - idle
            assert grown < 120 * 2**20, f"the server's RSS grew by {grown / 2**20:.0f} MiB"
            assert_b_served(s, users)
        finally:
            let_go(go, p)
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)


# ============================================================================
# Fifth attack pass (2026-12-08)
# ============================================================================
# Many queues and names, the server-wide turn at big answers, the jobs'
# output pipes, what an exec'd worker can reach, the TCP transport before
# authentication. Same rules: a real root ``ezpq-server`` on a Unix socket,
# throwaway users, the attack done for real, asserting it fails and that
# another user is still served within 1 s.


# ------------------------------------------- the id counters of dropped queues
def a_names_many_queues(input_server, rounds, per):
    """User A names ``per`` new queues of 256 characters on a connection
    (``reserve_ids``: no job, nothing in her --max-user-jobs or bytes), then
    closes it, ``rounds`` times: each queue is dropped with its connection
    and its id counter kept, so that its ids are never given out again.
    Then she names her first queue again: the id it gives is past the one
    it gave before (never reused). (first id before, first id again)"""
    first = None
    for r in range(rounds):
        remote = Remote(input_server.address, input_server.key)
        for i in range(per):
            got = remote.call("reserve_ids", f"{r}-{i}-" + "q" * (256 - len(f"{r}-{i}-")), 1)
            first = got if first is None else first
        remote.close()
    remote = Remote(input_server.address, input_server.key)
    again = remote.call("reserve_ids", "0-0-" + "q" * 252, 1)
    remote.close()
    return first, again


@needs_root
def test_the_ids_of_many_dropped_queues_hold_a_bounded_memory(input_server, users):
    """The attacker's find (fifth pass): a dropped queue's id counter was
    kept by name with no cap per user (``QueueState.last_ids``), and naming
    a queue costs no job: 40,000 queues of 256 characters named in 6 s grew
    a root server by 16 MiB, whatever --max-user-jobs and --max-user-bytes
    say, without end (about 10 GB an hour on one connection). Now one user
    keeps at most ``state.MAX_KEPT_IDS`` counters by name; past that her
    oldest go into one floor where her new queues start: ids are still never
    reused."""
    from ezpq_mgr.server import state
    assert_b_served(input_server, users)   # warm: B's worker is up
    idle = vm(input_server.proc.pid, "VmRSS")
    first, again = run_as(users[USERS[0]], a_names_many_queues, input_server, 12, 4_000, timeout=120)
    grown = vm(input_server.proc.pid, "VmRSS") - idle
    assert (first, again >= 2) == (1, True), (first, again)
    assert grown < 8 * 2**20, f"the server's RSS grew by {grown / 2**20:.1f} MiB"
    assert 12 * 4_000 > 4 * state.MAX_KEPT_IDS
    assert_b_served(input_server, users)


# ------------------------------------------- reports over a long accounting log hold the big answers' turn
def a_reads_her_accounting_in_a_loop(server, n_conns, looping, release):
    """User A asks for her accounting rows (``ezpq report``'s source) again
    and again on ``n_conns`` connections: each call reads and parses the
    whole accounting log, every user's rows, for seconds."""
    return _in_a_loop_on_connections(server, n_conns, looping, release, 0.5, lambda r: r.call("accounting"))


def b_lists_its_jobs(server):
    """User B's ``ezpq status`` (``list_jobs``): the slowest of 3, seconds."""
    r = Remote(server.address, server.key)
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        r.call("list_jobs")
        took.append(time.monotonic() - t0)
    r.close()
    return max(took)


@needs_root
def test_reports_over_a_long_accounting_log_hold_up_no_one_elses_listings(users):
    """The attacker's find (fifth pass): ``accounting`` and ``report`` read
    the whole accounting log (every user's rows, every earlier run's) and
    were made under the server-wide turn at big answers, like a listing:
    with 150,000 rows of A's tiny jobs in the log (a busy server has
    millions) one call took 5 s, and A asking again and again left B's
    ``ezpq status`` and ``ezpq log`` waiting 2.8-4 s each. Now the answers
    read from the log take turns among themselves, not with the listings."""
    root = tempfile.mkdtemp(prefix="ezpq-attack-acct-")
    os.chmod(root, 0o755)
    path = os.path.join(root, "acct.csv")
    log = AccountingLog(path)
    log.record(_record(1, uid=users[USERS[0]].pw_uid), "q")
    log.close()
    with open(path) as f:
        header, row = f.readlines()
    with open(path, "w") as f:   # A's history of tiny jobs
        f.write(header + row * 150_000)
    s = _server("--log-file", path)
    try:
        assert_b_served(s, users)   # warm: B's worker is up
        looping, release = FORK.Event(), FORK.Event()
        pa, out = start_as(users[USERS[0]], a_reads_her_accounting_in_a_loop, s, 2, looping, release)
        try:
            assert looping.wait(60), f"A did not start: {out.get(timeout=1) if not out.empty() else ''}"
            took = run_as(users[USERS[1]], b_lists_its_jobs, s, timeout=120)
            assert took < 1.0, f"B's ezpq status waited {took:.2f} s"
            assert_b_served(s, users)
        finally:
            release.set()
            kind, calls = out.get(timeout=120)
            pa.join(10)
        assert kind == "ok" and calls >= 1, (kind, calls)
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------- lanes remembered for their failure
def a_fails_in_many_lanes(server, n, batch):
    """User A puts ``n`` jobs that fail at once (``int("x")``), each in a
    lane of its own whose key is 64 KiB (``schema.MAX_LANE_KEY``), and
    collects them: nothing of hers is left in --max-user-jobs or
    --max-user-bytes, but a lane whose last job failed is kept (later
    ``stop_on_lane_error`` jobs of it are skipped), with its key, for as
    long as the server lives. (jobs collected, their status)"""
    remote, token, env = connect(server)
    statuses = set()
    collected = 0
    for start in range(0, n, batch):
        recs = [record(token, env, fn=int, args=("x",), suppress_errors=True,
                       lane_key=b"%08d" % (start + i) + b"k" * (64 * 1024 - 8)) for i in range(batch)]
        remote.call("put", "lanes", recs)
        assert remote.call("wait_pending", "lanes", 1, 120.0) == 0
        got = remote.call("collect", "lanes", 0)
        collected += len(got)
        statuses.update(j["status"] for j in got)
    remote.close()
    return collected, sorted(statuses)


@needs_root
def test_lanes_kept_for_their_failure_hold_a_bounded_memory(users):
    """The attacker's find (fifth pass): a lane whose last job failed is
    kept with its key (``Scheduling._drop_lane_if_idle``: it skips later
    ``stop_on_lane_error`` jobs) after its jobs are collected, and counts
    in neither --max-user-jobs nor --max-user-bytes: 1,000 failing jobs in
    lanes of 64 KiB keys, collected, grew a server with --max-user-bytes 16M
    by 98 MiB in 2 s, without end. Now one user keeps at most
    ``scheduling.MAX_FAILED_LANES`` lanes for a failure and
    ``MAX_FAILED_LANE_BYTES`` of their keys, her oldest forgotten past
    either (test_state.py)."""
    s = _server("--max-user-bytes", "16M")
    try:
        assert_b_served(s, users)   # warm: B's worker is up
        idle = vm(s.proc.pid, "VmRSS")
        assert run_as(users[USERS[0]], a_fails_in_many_lanes, s, 1_000, 100, timeout=120) == (1_000, ["failed"])
        grown = vm(s.proc.pid, "VmRSS") - idle
        assert_b_served(s, users)
        assert grown < 48 * 2**20, f"the server's RSS grew by {grown / 2**20:.0f} MiB"
    finally:
        assert s.stop() == 0
        shutil.rmtree(s.dir, ignore_errors=True)
