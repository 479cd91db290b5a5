"""Job output and logs (issue 13): every job's stdout and stderr go to a
log file of its own, written as it runs, kept after a timeout, kill or
cancel, capped, readable only by its submitter (and through the server only
by them); ``ezpq log``/``ezpq follow``/``Queue.log``; a shell job's output
keeps the tails of its streams. Black-box: a real server, the CLI, the API,
two throwaway users for the attacks."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.client.connection import Remote
from ezpq_mgr.errors import JobNotFound
from ezpq_mgr.cli import main as cli_main   # imported here: a test user cannot read the stdlib
from server_fixture import Server

from multiuser import USERS, needs_root, run_as, users  # noqa: F401 (fixture)

#: a job printing 10 lines a second (unbuffered: its lines reach the pipe as printed)
TEN_A_SECOND = [sys.executable, "-u", "-c",
                "import time\nfor i in range(1000):\n    print('tick', i)\n    time.sleep(0.1)"]


@pytest.fixture
def logroot():
    """A 0755 directory for the server's --log-dir (other users may look in)."""
    d = tempfile.mkdtemp(prefix="ezpq-logs-test-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_server(logroot, *extra):
    server = Server("unix", workers=2, extra=("--log-dir", os.path.join(logroot, "logs"), *extra))
    # the test users' copy of the key (the server's own is root's, 0600)
    server.users_key = os.path.join(logroot, "users.key")
    with open(server.users_key, "wb") as f:
        f.write(server.key + b"\n")
    os.chmod(server.users_key, 0o644)
    return server


def cli(server, *args, timeout=120):
    argv = [*server.cli_args, *args]
    argv[argv.index("--authkey-file") + 1] = server.users_key
    done = subprocess.run(argv, capture_output=True, timeout=timeout)
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def submit(server, *command, options=()):
    code, out, err = cli(server, "--json", "submit", *options, "--", *command)
    assert code == 0, err
    return json.loads(out)["job"]


def wait_for_output(server, job, size, timeout=30):
    """Block (one parked call at a time, no sleeping) until job's log holds more than ``size`` bytes."""
    remote = Remote(server.address, server.key)
    deadline = time.monotonic() + timeout
    while True:
        got = remote.call("wait_log", job, size, max(0.0, deadline - time.monotonic()))
        if got["size"] > size or time.monotonic() >= deadline:
            return got


def test_follow_streams_a_chatty_job_live_and_its_log_survives_its_timeout(logroot):
    server = start_server(logroot)
    try:
        job = submit(server, *TEN_A_SECOND, options=("--timeout", "3"))
        follow = subprocess.Popen([*server.cli_args, "follow", str(job)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        arrivals = []
        for line in follow.stdout:   # as the lines come
            arrivals.append((time.monotonic(), line.decode().strip()))
        assert follow.wait(30) == 1   # it timed out: not completed
        ended = time.monotonic()
        follow.stderr.close()
        follow.stdout.close()
        lines = [text for _, text in arrivals]
        assert len(lines) >= 15 and lines == [f"tick {i}" for i in range(len(lines))]
        # live: the first lines came seconds before the job ended, not all at its end
        assert ended - arrivals[0][0] > 1.5 and ended - arrivals[9][0] > 0.5, arrivals[:10]
        code, out, _ = cli(server, "log", str(job))
        assert code == 0 and out.splitlines()[:len(lines)] == lines
        shown = json.loads(cli(server, "show", str(job))[1])
        assert shown["status"] == "timeout"
        path = os.path.join(logroot, "logs", f"{job}.log")
        assert open(path).read() == out
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        assert server.stop() == 0


def test_a_cancelled_jobs_log_is_kept_and_a_killed_ones_last_lines_are_in_it(logroot):
    server = start_server(logroot)
    try:
        job = submit(server, sys.executable, "-u", "-c",
                     "import time\nprint('started')\ntime.sleep(60)")
        assert wait_for_output(server, job, 0)["size"] > 0
        assert cli(server, "cancel", str(job))[0] == 0
        assert cli(server, "wait", str(job))[0] == 1
        code, out, _ = cli(server, "log", str(job))
        assert code == 0 and out == "started\n"
        assert json.loads(cli(server, "show", str(job))[1])["status"] == "cancelled"
        # follow of a finished job prints its log and says how it ended
        code, out, _ = cli(server, "follow", str(job))
        assert code == 1 and out == "started\n"
    finally:
        assert server.stop() == 0


def test_log_of_an_unknown_job_is_one_line_and_exit_1(logroot):
    server = start_server(logroot)
    try:
        code, out, err = cli(server, "log", "999")
        assert code == 1 and out == "" and err.strip() == "ezpq: no job 999"
        code, out, err = cli(server, "follow", "999")
        assert code == 1 and err.strip() == "ezpq: no job 999"
        job = submit(server, "true")
        assert cli(server, "wait", str(job))[0] == 0
        assert cli(server, "log", str(job))[:2] == (0, "")   # printed nothing: an empty log, no file
        assert not os.path.exists(os.path.join(logroot, "logs", f"{job}.log"))
        remote = Remote(server.address, server.key)
        for bad in ((job, -1), ("1", 0), (job, 1.5)):
            with pytest.raises((TypeError, ValueError)):
                remote.call("job_log", *bad)
    finally:
        assert server.stop() == 0


def test_a_shell_jobs_output_keeps_returncode_and_the_tails_while_the_log_has_all(logroot):
    server = start_server(logroot)
    try:
        job = submit(server, sys.executable, "-c",
                     "import sys\nsys.stdout.write('a' * 5000 + 'END')\nsys.stderr.write('b' * 6000 + 'ERR')\n"
                     "sys.exit(3)")
        assert cli(server, "wait", str(job))[0] == 1
        out = json.loads(cli(server, "show", str(job))[1])["output"]
        assert out["returncode"] == 3
        assert out["stdout"] == ("a" * 5000 + "END")[-4096:]
        assert out["stderr"] == ("b" * 6000 + "ERR")[-4096:]
        log = cli(server, "log", str(job))[1]
        assert log.count("a") == 5000 and log.count("b") == 6000 and "END" in log and "ERR" in log
    finally:
        assert server.stop() == 0


def test_the_cap_holds_for_a_job_writing_100_mb(logroot):
    server = start_server(logroot, "--max-log", "1M")
    try:
        job = submit(server, sys.executable, "-c",
                     "import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.buffer.write(chunk)\n"
                     "print('done', file=sys.stderr)")
        assert cli(server, "wait", str(job))[0] == 0   # the job is not stalled by the cap
        path = os.path.join(logroot, "logs", f"{job}.log")
        marker = f"\n[log truncated at {1 << 20} bytes]\n".encode()
        assert os.path.getsize(path) == (1 << 20) + len(marker)
        data = open(path, "rb").read()
        assert data.endswith(marker) and data[:1 << 20] == b"x" * (1 << 20)
    finally:
        assert server.stop() == 0


@needs_root
def test_a_symlink_planted_where_a_log_goes_is_not_followed(logroot):
    victim = os.path.join(logroot, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.mkdir(os.path.join(logroot, "logs"), 0o711)
    for n in range(1, 6):   # a fresh server's first jobs are 1, 2, ...
        os.symlink(victim, os.path.join(logroot, "logs", f"{n}.log"))
    server = start_server(logroot)
    try:
        job = submit(server, "echo", "written")
        assert cli(server, "wait", str(job))[0] == 0
        assert open(victim).read() == "precious\n"
        path = os.path.join(logroot, "logs", f"{job}.log")
        assert not os.path.islink(path) and open(path).read() == "written\n"
    finally:
        assert server.stop() == 0


@needs_root
def test_a_log_dir_others_can_write_is_refused_at_start(logroot):
    d = os.path.join(logroot, "open")
    os.mkdir(d)
    os.chmod(d, 0o777)
    done = subprocess.run([sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()",
                           "--socket", os.path.join(logroot, "s.sock"), "--authkey-file",
                           os.path.join(logroot, "key"), "--log-level", "WARNING", "--log-dir", d],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "writable by others" in done.stderr


# ------------------------------------------------------------- two users
def cli_here(server, *args):
    """``ezpq ARGS`` in this process (a test user cannot exec the venv's
    interpreter): (exit code, stdout, stderr)."""
    out, err = io.TextIOWrapper(io.BytesIO()), io.TextIOWrapper(io.BytesIO())
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        cli_main(["--socket", server.address, "--authkey-file", server.users_key, *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout, sys.stderr = saved
    out.flush()
    err.flush()
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def a_submits_a_secret(server):
    code, out, err = cli_here(server, "--json", "submit", "--", "echo", "secret-of-a")
    assert code == 0, err
    return json.loads(out)["job"]


def a_reads(server, job, path):
    code, out, _ = cli_here(server, "log", str(job))
    return code, out, open(path).read()


def b_tries_to_read(server, job, path):
    seen = {}
    seen["log"] = cli_here(server, "log", str(job))
    seen["follow"] = cli_here(server, "follow", str(job))
    remote = Remote(server.address, server.key)
    for method, args in (("job_log", (job, 0)), ("wait_log", (job, 0, 0))):
        try:
            seen[method] = remote.call(method, *args)
        except JobNotFound as exc:
            seen[method] = f"refused: {exc}"
    try:
        seen["file"] = open(path).read()
    except PermissionError:
        seen["file"] = "refused"
    return seen


def check_only_its_submitter_reads_it(server, logroot, a, b, job) -> dict:
    """Job ``job`` of user ``a`` (its secret written) has a log file of
    a's, 0600, that ``a`` reads through the server and the file, and ``b``
    through neither; returns what ``b`` saw (``b_tries_to_read``)."""
    path = os.path.join(logroot, "logs", f"{job}.log")
    st = os.stat(path)
    assert st.st_uid == a.pw_uid and st.st_mode & 0o777 == 0o600
    assert run_as(a, a_reads, server, job, path) == (0, "secret-of-a\n", "secret-of-a\n")
    seen = run_as(b, b_tries_to_read, server, job, path)
    assert seen["log"][0] == 1 and "secret" not in seen["log"][1] + seen["log"][2]
    assert seen["job_log"] == seen["wait_log"] == f"refused: no job {job}"
    assert seen["file"] == "refused"
    return seen


@needs_root
def test_another_user_cannot_read_a_jobs_log(logroot, users):
    a, b = users[USERS[0]], users[USERS[1]]
    server = start_server(logroot)
    try:
        job = run_as(a, a_submits_a_secret, server)
        assert cli(server, "wait", str(job))[0] == 0
        seen = check_only_its_submitter_reads_it(server, logroot, a, b, job)
        assert seen["follow"][0] == 1 and "secret" not in seen["follow"][1] + seen["follow"][2]
    finally:
        assert server.stop() == 0


# --------------------------------------------------------------- the API
def chatty(n):
    for i in range(n):
        print("out", i)
    print("err", n, file=sys.stderr)
    return n


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_queue_log_has_each_jobs_own_output(start_method):
    with ezpq.Queue(1, start_method=start_method) as Q:   # one worker: the jobs run back to back on it
        ids = [Q.put(chatty, n) for n in (3, 1, 2, 0)]
        Q.wait()
        for i, n in zip(ids, (3, 1, 2, 0)):
            assert Q.log(i) == "".join(f"out {k}\n" for k in range(n)) + f"err {n}\n"
        with pytest.raises(TypeError):
            Q.log("1")
        with pytest.raises(ValueError):
            Q.log(0)
        assert len(Q.collect()) == 4
        with pytest.raises(JobNotFound):   # collected: the server forgot it and its log
            Q.log(ids[0])


def loud(n):
    """Write n bytes straight to descriptor 1 (no Python buffer), then return at once."""
    view = memoryview(b"x" * n)
    while view:
        view = view[os.write(1, view):]
    return n


def test_a_loud_jobs_last_bytes_stay_in_its_own_log():
    """A job's bytes still in its pipe when it returns (the server reads 1 MiB
    a turn, the next job starts at once) are its own, never the next job's."""
    with ezpq.Queue(1) as Q:   # one worker: each job starts as soon as the last returns
        ids = [Q.put(loud, 3 << 20), Q.put(chatty, 2), Q.put(loud, 1 << 20), Q.put(chatty, 1)]
        Q.wait()
        assert [Q.log(i) for i in ids] == ["x" * (3 << 20), "out 0\nout 1\nerr 2\n", "x" * (1 << 20),
                                           "out 0\nerr 1\n"]
        assert len(Q.collect()) == 4


def test_a_timed_out_api_jobs_log_is_kept():
    with ezpq.Queue(1) as Q:
        i = Q.put(chatty_then_sleep, timeout=1)
        Q.wait()
        assert Q.log(i) == "before the timeout\n"
        assert Q.get()["status"] == "timeout"


def chatty_then_sleep():
    print("before the timeout")
    time.sleep(60)


def test_a_durable_server_keeps_logs_across_a_sigkill_and_removes_forgotten_ones():
    from test_durable import Durable
    server = Durable()
    try:
        server.start()
        with server.queue("kept") as Q:
            i = Q.put(print, "kept across a restart")
            Q.wait()
            Q.detach()
        logs = os.path.join(server.state_dir, "logs")
        stale = os.path.join(logs, "999.log")   # a job forgotten while the server was down
        with open(stale, "w") as f:
            f.write("stale\n")
        server.kill(signal.SIGKILL)
        server.start()
        with server.queue("kept") as Q:
            assert Q.log(i) == "kept across a restart\n"
            j = Q.put(print, "after")   # a new job's log beside it
            Q.wait()
            assert Q.log(j) == "after\n"
            Q.collect()
        assert not os.path.exists(stale)
        deadline = time.monotonic() + 10   # collected: their logs go with them (the supervisor removes them)
        while os.listdir(logs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.listdir(logs) == []
    finally:
        server.close()


# ---------------------------------------------------------------- cost of a silent job
def _say(text):
    os.write(1, text.encode() + b"\n")   # descriptor 1: pytest's capture replaces sys.stdout
    return text


def test_a_job_that_prints_nothing_leaves_no_log_object():
    """Only a job that wrote something has a log (an object and a file):
    100,000 silent jobs waiting to be collected hold nothing here (their
    objects cost GC time on the server). A real supervisor, workers, pipes."""
    from ezpq_mgr.job import JobRecord
    from ezpq_mgr.server.joblogs import LogBook
    from ezpq_mgr.server.state import QueueState
    from ezpq_mgr.server.supervisor import Supervisor
    from ezpq_mgr import serialize
    d = tempfile.mkdtemp(prefix="ezpq-test-logs-")
    state = QueueState()
    book = LogBook(d)
    sup = Supervisor(state, 1, logs=book)
    try:
        sup.start()

        def record(i, fn, arg):
            return JobRecord(seq=0, qid="", id=0, client="c", user="u", name=f"j{i}", priority=i,
                             lane_key=None, timeout=0, function=fn.__name__,
                             fn_blob=serialize.dump_function(fn), args_blob=serialize.dump_call_args([arg], None))
        state.add("q", [record(1, abs, -1), record(2, _say, "hello"), record(3, abs, -3)])
        sup.wake()
        deadline = time.monotonic() + 30
        while state.queues["q"].n_done < 3:
            assert time.monotonic() < deadline, "the jobs did not finish"
            time.sleep(0.01)
        said = [rec.seq for rec in state.records.values() if rec.name == "j2"]
        assert sorted(book.logs) == said, "a silent job has a log object"
        assert book.read(said[0], 0) == b"hello\n"
    finally:
        sup.stop()
        book.close()
        shutil.rmtree(d, ignore_errors=True)
