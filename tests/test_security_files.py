"""Issue 10, items 16, 17, 18 (accounting rows) and 21: the files a root
``ezpq-server`` touches (key file, socket, accounting log) and the
accounting writer.

Every attack runs against a real ``ezpq-server`` subprocess started as root,
with throwaway users (``tests/multiuser.py``) where another user matters.
A server that must refuse to start has to exit 2 with one line on stderr and
no traceback; a server that must keep running answers a client within 1 s.
"""

import csv
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr import accounting
from ezpq_mgr.accounting import AccountingLog, report
from ezpq_mgr.connection import Remote
from ezpq_mgr.job import JobRecord, JobStatus
from jobs import square
from server_fixture import Server, terminate

from multiuser import USERS, needs_root, users  # noqa: F401 (fixture)

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
        assert server.stop() == 0
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
