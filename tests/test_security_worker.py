"""Attacks on the worker side of the trust boundary (issue 10, items 1, 2,
4, 5, 10b, 15, 20), each done for real against a root ``ezpq-server`` on a
Unix socket with throwaway users, each asserting the attack fails and that
another user is still served promptly.

Job functions are nested functions (cloudpickle sends them by value), so a
worker never has to import this module.
"""

import os
import shutil
import signal
import statistics
import time
import uuid

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.connection import Remote
from conftest import START_METHODS
from server_fixture import Server

from multiuser import USERS, FORK, needs_root, run_as, start_as, users  # noqa: F401 (fixture)

pytestmark = needs_root

SECRET_ENV = "EZPQ_SERVER_SECRET_FOR_TEST"


@pytest.fixture(params=START_METHODS)
def server(users, monkeypatch, request):
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


def _queue(server, qid=None):
    return ezpq.Queue(address=server.address, authkey=server.key, qid=qid)


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
def quick_job_latency(server, n=60, timeout=10):
    """p50 seconds of put -> get(wait) of a no-op job (as the calling user)."""
    times = []
    with _queue(server, "lat-" + uuid.uuid4().hex[:6]) as Q:
        Q.put(int)  # warm up this user's worker
        assert Q.get(wait=True, timeout=timeout) is not None
        for _ in range(n):
            t0 = time.perf_counter()
            Q.put(int)
            job = Q.get(wait=True, timeout=timeout)
            assert job is not None and job["status"] == "completed", job
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_quick_job(server):
    t0 = time.monotonic()
    with _queue(server) as Q:
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


def a_sends_payload(server, payload, then_sleep, timeout):
    with _queue(server, "attack") as Q:
        Q.put(write_to_channels(payload, then_sleep), timeout=timeout)
        job = Q.get(wait=True, timeout=30)
    return job and {k: job[k] for k in ("status", "exception", "exitcode")}


# ----------------------------------------------------------------------- item 1
def test_pickle_written_to_the_worker_pipe_runs_nothing_as_root(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    marker = os.path.join(server.dir, "root-marker-" + uuid.uuid4().hex)
    job = run_as(a, a_sends_payload, server, evil_pickle_frame(marker), 0, 0)
    assert not os.path.exists(marker)
    assert job["status"] == "failed" and "protocol violation" in (job["exception"] or ""), job
    status, output, took = run_as(b, one_quick_job, server)
    assert (status, output) == ("completed", 7)


# ----------------------------------------------------------------------- item 2
def b_runs_a_real_job(server, started):
    with _queue(server, "victim") as Q:
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


def test_a_job_cannot_forge_another_users_result(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    started = FORK.Event()
    pb, out = start_as(b, b_runs_a_real_job, server, started)
    assert started.wait(30)
    time.sleep(0.3)  # B's job is running
    job = run_as(a, a_sends_payload, server, forged_results(40), 0, 0)
    assert job["status"] == "failed" and "protocol violation" in (job["exception"] or ""), job
    kind, (status, output, exc) = out.get(timeout=30)
    pb.join(10)
    assert kind == "ok"
    assert output != "forged"
    assert (status, output) == ("completed", None), exc
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ------------------------------------------------------------------ items 4 and 20
def b_holds_a_secret(server, token, started):
    with _queue(server, "secret") as Q:
        Q.put(time.sleep, args=[4], name="B-JOB-ARGS:" + token)
        Q.put(lambda s: len(s), args=["B-JOB-ARGS:" + token])  # waits: bytes in the server
        started.set()
        Q.collect()
        Q.wait()


def a_inspects_its_worker(server, token, secret_env):
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

    with _queue(server, "inspect") as Q:
        Q.put(job, args=[token, secret_env])
        got = Q.get(wait=True, timeout=60)
    assert got["status"] == "completed", got["exception"]
    return got["output"]


def test_a_job_sees_no_server_descriptor_memory_or_environment(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    token = uuid.uuid4().hex
    started = FORK.Event()
    pb, out = start_as(b, b_holds_a_secret, server, token, started)
    assert started.wait(30)
    seen = run_as(a, a_inspects_its_worker, server, token, SECRET_ENV)
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
    # the worker channel and its lifeline: nothing else of the server's
    assert len(others) <= 2 and all(t.startswith(("socket:", "pipe:")) for t in others.values()), others
    assert not any(server.dir in t for t in seen["fds"].values())  # no accounting log, no socket
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ----------------------------------------------------------------------- item 5
PAYLOADS = {
    "garbage": (b"\xff" * 64, 0),
    "partial-header": (b"\x00\x00", 30),
    "non-pickle": (b"\x00\x00\x00\x05hello", 0),
    # a well-formed header announcing 2 GiB: refused before anything is stored
    "oversize": (bytes([1, 3, 0, 0]) + (1 << 31).to_bytes(4, "big") + b"x" * 1000, 30),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_bad_frames_from_a_job_freeze_nothing(server, users, kind):
    a, b = users[USERS[0]], users[USERS[1]]
    idle = run_as(b, quick_job_latency, server)
    payload, then_sleep = PAYLOADS[kind]
    pa, out = start_as(a, a_sends_payload, server, payload, then_sleep, 0)
    time.sleep(0.3)  # the attack is under way
    busy = run_as(b, quick_job_latency, server)
    assert Remote(server.address, server.key).call("info")["workers"] == 2
    got, job = out.get(timeout=60)
    pa.join(10)
    assert got == "ok", job
    assert job["status"] == "failed" and "protocol violation" in (job["exception"] or ""), job
    idle = max(idle, run_as(b, quick_job_latency, server))  # idle again: the machine is shared
    assert busy <= 2 * idle + 0.002, (busy, idle)
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ---------------------------------------------------------------------- item 10b
def a_stops_its_idle_worker_then_sends_5mb(server):
    def stop_me_later():
        import os as _os
        import signal as _signal
        import threading as _threading
        import time as _time

        def later():
            _time.sleep(0.3)
            _os.kill(_os.getpid(), _signal.SIGSTOP)
        _threading.Thread(target=later, daemon=True).start()
        return _os.getpid()

    with _queue(server, "stopper") as Q:
        Q.put(stop_me_later)
        first = Q.get(wait=True, timeout=10)
        assert first["status"] == "completed", first
        pid = first["output"]
        assert _wait_for(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 5)
        Q.put(len, args=[b"x" * (5 << 20)], timeout=4)
        second = Q.get(wait=True, timeout=30)
    return pid, second["status"]


def test_a_sigstopped_worker_stalls_only_its_own_job(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    idle = run_as(b, quick_job_latency, server)
    pa, out = start_as(a, a_stops_its_idle_worker_then_sends_5mb, server)
    time.sleep(1.0)  # the worker is stopped, the 5 MB job dispatched to it
    busy = run_as(b, quick_job_latency, server)
    assert Remote(server.address, server.key).call("info")["workers"] == 2
    kind, got = out.get(timeout=60)
    pa.join(10)
    assert kind == "ok", got
    assert got[1] == "timeout"
    idle = max(idle, run_as(b, quick_job_latency, server))  # idle again: the machine is shared
    assert busy <= 2 * idle + 0.002, (busy, idle)
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ----------------------------------------------------------------------- item 15
def a_forks_and_exits(server):
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

    directory = os.path.join(server.dir, "fork-exit")
    os.mkdir(directory)
    with _queue(server, "forker") as Q:
        t0 = time.monotonic()
        Q.put(job, args=[directory])
        got = Q.get(wait=True, timeout=30)
        took = time.monotonic() - t0
    pids = [int(n.split("-")[1]) for n in os.listdir(directory)]
    return took, got["status"], got["exception"], pids


def test_fork_then_exit_is_reported_at_once_and_leaves_no_child(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    took, status, exc, pids = run_as(a, a_forks_and_exits, server)
    assert pids
    assert took < 3, (took, status, exc)
    assert status in ("lost", "killed", "failed"), status
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 2), pids
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


def a_spawns_respawning_children(server):
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

    directory = os.path.join(server.dir, "respawn")
    os.mkdir(directory)
    with _queue(server, "respawner") as Q:
        Q.put(job, args=[directory, 20], timeout=1.5)
        got = Q.get(wait=True, timeout=30)
    pids = [int(n.split("-")[1]) for n in os.listdir(directory)]
    return got["status"], got["exitcode"], pids


def test_respawning_children_are_all_killed(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    status, exitcode, pids = run_as(a, a_spawns_respawning_children, server)
    assert status == "timeout" and len(pids) >= 20
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 2), [p for p in pids if _alive(p)]
    assert exitcode == -signal.SIGKILL
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


def a_ignores_sigterm(server):
    def job():
        import signal as _signal
        import time as _time
        _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
        _time.sleep(30)

    with _queue(server, "stubborn") as Q:
        Q.put(job, timeout=0.5)
        got = Q.get(wait=True, timeout=30)
    return got["status"], got["exitcode"]


def test_a_job_ignoring_sigterm_reports_the_signal_that_ended_it(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    assert run_as(a, a_ignores_sigterm, server) == ("timeout", -signal.SIGKILL)
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ------------------------------------------- the job's working directory, as the user
def a_submits_from(server, connected, go):
    with _queue(server, "cwd") as Q:   # its working directory goes with the hello
        connected.set()
        assert go.wait(30)
        Q.put(os.getcwd)
        got = Q.get(wait=True, timeout=30)
    return got["status"], got["exception"]


def test_a_working_directory_the_user_cannot_enter_fails_the_job_with_the_reason(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    directory = os.path.join(server.dir, "root-only")
    os.mkdir(directory, 0o755)
    connected, go = FORK.Event(), FORK.Event()
    pa, out = start_as(a, a_submits_from, server, connected, go, cwd=directory)
    assert connected.wait(30)
    os.chmod(directory, 0o700)  # root's now: the worker must not enter it as A
    go.set()
    kind, got = out.get(timeout=60)
    pa.join(10)
    assert kind == "ok", got
    status, exc = got
    assert status == "failed" and "working directory" in exc and directory in exc, got
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ------------------------------------------- a job that shuts its worker's channel down
def a_shuts_the_channel_then_submits(server):
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

    with _queue(server, "shut") as Q:
        Q.put(shut)
        first = Q.get(wait=True, timeout=10)
        Q.put(int, args=[5])
        second = Q.get(wait=True, timeout=20)
        Q.put(int, args=[6])
        third = Q.get(wait=True, timeout=20)
    return [(j["status"], j["output"], j["exception"]) for j in (first, second, third)]


def test_a_job_that_shuts_its_channel_down_stalls_nothing(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    first, second, third = run_as(a, a_shuts_the_channel_then_submits, server)
    assert first[:2] == ("completed", "shut")
    assert second[:2] == ("completed", 5) or (second[0] == "failed" and "protocol violation" in second[2])
    assert third[:2] == ("completed", 6)
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


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
    assert len(others) <= 2 and all(t.startswith(("socket:", "pipe:")) for t in others.values()), others


# ------------------------------------------- nothing outlives a job that completed
def a_leaves_processes_behind(server):
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

    with _queue(server, "leaver") as Q:
        Q.put(job)
        got = Q.get(wait=True, timeout=20)
    return got["status"], got["output"]


def test_processes_a_completed_job_left_running_are_killed(server, users):
    a, b = users[USERS[0]], users[USERS[1]]
    status, pids = run_as(a, a_leaves_processes_behind, server)
    assert status == "completed"
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 2), [p for p in pids if _alive(p)]
    assert run_as(b, one_quick_job, server)[:2] == ("completed", 7)


# ------------------------------------------- a SIGKILLed server leaves no worker and no job process
def a_starts_a_long_job(server, directory, started):
    def job(directory):
        import os as _os
        import subprocess as _subprocess
        import time as _time
        child = _subprocess.Popen(["sleep", "30"])
        with open(_os.path.join(directory, f"pids-{_os.getpid()}-{child.pid}"), "w"):
            pass
        _time.sleep(30)

    Q = _queue(server, "long")
    Q.put(job, args=[directory])
    started.set()
    Q.detach()


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
def test_a_user_whose_worker_cannot_start_gets_failed_jobs_not_a_spawn_loop(server, users):
    import types
    ghost = types.SimpleNamespace(pw_uid=54321, pw_gid=54321)  # no passwd entry: cannot drop to it
    t0 = time.monotonic()
    status, output, took = run_as(ghost, one_quick_job, server)
    assert status == "failed", (status, output)
    assert time.monotonic() - t0 < 20
    assert run_as(users[USERS[1]], one_quick_job, server)[:2] == ("completed", 7)
