"""Issue 10, the client<->server transport: attacks on a real root
``ezpq-server --socket`` (throwaway users where a second uid matters).

Each test does the attack for real, asserts that it fails, and that the
server keeps serving another client within 1 s afterwards.
"""

import os
import pwd
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.connection import Remote
from ezpq_mgr.errors import ConnectionError as EzpqConnectionError

from multiuser import FORK, USERS, become, needs_root, users  # noqa: F401 (fixture)
from server_fixture import terminate

pytestmark = needs_root

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

            def preexec():
                become(user)
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
def server():
    s = LoggedServer()
    yield s
    assert s.stop() == 0, s.text()


def served_within(server, seconds=1.0):
    """A fresh client gets an answer within ``seconds``."""
    t0 = time.monotonic()
    Remote(server.address, server.key).call("info")
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


def test_manager_builtins_are_refused(server):
    keeper = Remote(server.address, server.key)
    keeper.call("info")  # a connected client whose next call must still work
    for name, args in BUILTINS:
        with pytest.raises(Exception):
            stdlib_dispatch(server.address, server.key, name, args)
        with pytest.raises(AttributeError, match="not exposed"):
            Remote(server.address, server.key).call(name, *args)
    assert server.proc.poll() is None
    assert keeper.call("info")["shared"] is True
    assert served_within(server)
    with ezpq.Queue(address=server.address, authkey=server.key, qid="after") as Q:
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


def test_stopped_client_with_a_parked_20mb_answer_stalls_only_itself(server):
    with ezpq.Queue(address=server.address, authkey=server.key, qid="fast") as Q:
        put_get_latencies(Q, 10)  # warm up
        idle = statistics.median(put_get_latencies(Q, 60))
        ready_r, ready_w = os.pipe()
        p = FORK.Process(target=stopped_getter, args=(server.address, server.key, ready_w))
        p.start()
        try:
            assert select.select([ready_r], [], [], 20)[0], "the big client did not start"
            remote = Remote(server.address, server.key)
            deadline = time.monotonic() + 10
            while remote.call("info")["parked_calls"] < 1:  # its get(wait=True) is parked
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(p.pid, signal.SIGSTOP)
            # the 20 MB answer is sent to a client that does not read it
            deadline = time.monotonic() + 10
            while remote.call("info")["parked_calls"] > 0:
                assert time.monotonic() < deadline, "the big job never finished"
                time.sleep(0.01)
            done = []
            worker = threading.Thread(target=lambda: done.append(put_get_latencies(Q, 60)), daemon=True)
            worker.start()
            worker.join(30)
            assert done, "another client's put->get stalled behind the stopped client"
            busy = statistics.median(done[0])
            assert busy < 2 * idle + 0.002, (idle, busy)
            assert served_within(server)
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


def test_idle_unauthenticated_connections_are_closed_and_others_served(server, users):
    a = users[USERS[0]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    go = FORK.Event()
    try:
        out = FORK.Queue()
        p = FORK.Process(target=_as(a, hold_idle_connections), args=(server.address, 1100, out, go))
        p.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        kind, opened, refused = out.get(timeout=60)
        assert kind == "open"
        t_open = time.monotonic()
        assert served_within(server), "a real client was not served at once"
        with ezpq.Queue(address=server.address, authkey=server.key, qid="real") as Q:
            Q.put(abs, -2)
            assert Q.get(wait=True, timeout=10)["output"] == 2
        go.set()
        kind, closed, t_closed = out.get(timeout=30)
        assert closed == opened, f"{opened - closed} of {opened} idle connections still open"
        assert f"uid {a.pw_uid}" in server.text() and "too many connections" in server.text()
        assert "not authenticated within 5 s" in server.text()
        assert t_closed - t_open < 10
        assert served_within(server)
    finally:
        go.set()
        p.join(20)
        if p.is_alive():
            p.kill()
            p.join()


def _as(pw, fn):
    def run(*args):
        become(pw)
        fn(*args)
    return run


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


def test_fifty_simultaneous_clients_are_all_served(server):
    start, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=one_client, args=(server.address, server.key, start, out)) for _ in range(50)]
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
    assert served_within(server)


# ------------------------------------- item 12: a non-root shared server
def cli_as(user, server, *args, key=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([ROOT, SITE]), "HOME": server.dir,
           "EZPQ_AUTHKEY": (key or server.key).decode()}
    return subprocess.run([SYSTEM_PYTHON, "-m", "ezpq_mgr", "--socket", server.address, *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd="/",
                          preexec_fn=lambda: become(user))


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


def test_non_root_server_with_allow_other_users_says_so(users):
    a, b = users[USERS[0]], users[USERS[1]]
    s = LoggedServer(extra=["--allow-other-users"], user=a)
    try:
        assert cli_as(b, s, "status").returncode == 0
        assert "--allow-other-users" in s.text() and f"run as {USERS[0]}" in s.text()
    finally:
        assert s.stop() == 0, s.text()


# --------------------------------------------------- item 19: message size
def test_oversize_message_is_refused_before_the_server_buffers_it(server):
    pid = server.proc.pid
    remote = Remote(server.address, server.key)
    remote.call("info")
    before = vm(pid, "VmHWM")
    with pytest.raises(ValueError, match="max-message"):
        remote.call("put", "big", [{"fn": b"x" * (300 * 1024 * 1024)}])
    with ezpq.Queue(address=server.address, authkey=server.key, qid="big") as Q:
        with pytest.raises(ValueError, match="max-message"):
            Q.put(len, b"x" * (300 * 1024 * 1024))  # at the call, before anything is sent
        assert Q.size() == 0
    # the same message sent raw, past the client library's check
    from ezpq_mgr import transport, wire
    sock = transport.connect(server.address, server.key)[0]
    try:
        body = wire.dumps(("put", ["big", [{"fn": b"x" * 1024}]]))
        size = 300 * 1024 * 1024
        sock.sendall(transport.HEADER.pack(size) + body)
        chunk = b"\0" * (1 << 20)
        sent = len(body)
        while sent < size:
            n = min(len(chunk), size - sent)
            sock.sendall(chunk[:n])
            sent += n
        kind, exc = wire.loads(transport.recv_frame(sock))
        assert kind == "#ERROR" and isinstance(exc, ValueError) and "max-message" in str(exc)
        sock.sendall(transport.frame(wire.dumps(("whoami", []))))  # the connection still works
        assert wire.loads(transport.recv_frame(sock))[0] == "#RETURN"
    finally:
        sock.close()
    assert vm(pid, "VmHWM") - before < 50 * 1024 * 1024
    assert served_within(server)


# --------------------------- item 20: what strangers get, what is logged
def test_unauthenticated_garbage_gets_no_traceback_and_refusals_are_logged(server, users):
    b = users[USERS[1]]
    out = FORK.Queue()

    def garbage():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(server.address)
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
    wrong = FORK.Process(target=_as(b, lambda: _try_wrong_key(server.address)))
    wrong.start()
    wrong.join(30)
    deadline = time.monotonic() + 5
    while f"uid {b.pw_uid}" not in server.text():
        assert time.monotonic() < deadline, server.text()
        time.sleep(0.05)
    assert served_within(server)


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
    "import ezpq_mgr.supervisor as s\n"
    "def _broken(self, *a, **k):\n"
    "    raise RuntimeError('injected supervisor bug')\n"
    "s.Supervisor._on_result = _broken\n"
    "from ezpq_mgr.cli import server_main; server_main()\n")


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
        assert s.proc.returncode not in (0, None)
        assert "injected supervisor bug" in s.text()
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
