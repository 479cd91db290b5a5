"""The Queue on real processes: features beyond ezpq's own tests."""

import csv
import os
import pickle
import sys
import threading

import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.job import FIELDS
from jobs import (exit_hard, fail, generator_output, return_me, sleep_for, square, wait_until_running)


@pytest.fixture
def Q():
    queue = ezpq.Queue(2)
    yield queue
    queue.dispose()


def test_job_dict_has_every_field(Q):
    Q.put(square, 7, name="seven", priority=3, lane="L")
    job = Q.get(wait=True)
    assert list(job) == list(FIELDS)
    assert job["output"] == 49 and job["args"] == [7] and job["name"] == "seven"
    assert job["status"] == "completed" and job["exitcode"] == 0 and not job["cancelled"]
    assert job["lane"] == "L" and job["priority"] == 3 and job["function"] == "square"
    assert job["submitted"] <= job["started"] <= job["ended"] <= job["processed"]
    assert job["runtime"] == pytest.approx((job["ended"] - job["started"]).total_seconds(), abs=1e-3)
    assert job["pid"] != os.getpid() and job["host"] and job["user"]
    assert job["max_rss"] > 0 and job["cpu_user"] is not None


def test_args_rules(Q):
    Q.put(return_me, "abc")
    Q.put(return_me, args=("t",))
    Q.put(return_me, args=5)
    Q.put(return_me, kwargs={"x": [1, 2]})
    Q.wait()
    assert [j["output"] for j in Q.collect()] == ["abc", "t", 5, [1, 2]]


def test_lambdas_closures_and_main_functions_under_spawn():
    k = 10
    with ezpq.Queue(2, start_method="spawn") as Q:
        out = Q.map(lambda x: x + k, range(5))
    assert [j["output"] for j in out] == [10, 11, 12, 13, 14]


def test_bad_input_raises_and_enqueues_nothing(Q):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="callable"):
        Q.put(42)
    with pytest.raises(ezpq.UnpicklableError, match="args\\[0\\]"):
        Q.put(return_me, args=[lock])
    with pytest.raises(ezpq.UnpicklableError, match="function"):
        Q.put(lambda: lock)
    with pytest.raises(TypeError, match="priority"):
        Q.put(return_me, 1, priority="high")
    with pytest.raises(TypeError, match="priority"):
        Q.put(return_me, 1, priority=1.5)
    with pytest.raises(TypeError, match="lane"):
        Q.put(return_me, 1, lane=[1])
    with pytest.raises(ValueError, match="timeout"):
        Q.put(return_me, 1, timeout=-1)
    with pytest.raises(TypeError, match="kwargs"):
        Q.put(return_me, kwargs=[1, 2, 3])
    with pytest.raises(TypeError, match="Job"):
        Q.submit(return_me)
    with pytest.raises(ezpq.UnpicklableError):
        Q.map(return_me, [1, 2, lock, 4])
    with pytest.raises(TypeError):
        Q.starmap(return_me, [[1], 2])
    with pytest.raises(TypeError):
        Q.map(return_me, 5)
    assert Q.size() == 0 and Q.n_submitted() == 0


def test_bad_queue_arguments():
    with pytest.raises(ValueError, match="job_runner"):
        ezpq.Queue(job_runner="gpu")
    with pytest.raises(ValueError, match="n_workers"):
        ezpq.Queue(n_workers=0)
    with pytest.raises(ValueError, match="max_size"):
        ezpq.Queue(max_size=-1)


def test_thread_runner_refuses_timeouts():
    with ezpq.Queue(2, job_runner=threading.Thread) as Q:
        with pytest.raises(ValueError, match="thread"):
            Q.put(return_me, 1, timeout=1)
        assert Q.size() == 0
        Q.put(square, 3)
        job = Q.get(wait=True)
        assert job["output"] == 9 and job["max_rss"] is None and job["cpu_user"] is not None


def test_max_size(Q):
    small = ezpq.Queue(1, max_size=2, auto_start=False)
    try:
        small.put(return_me, 1)
        small.put(return_me, 2)
        with pytest.raises(ezpq.QueueFull):
            small.put(return_me, 3)
        assert small.size() == 2 and small.is_full()
        with pytest.raises(ezpq.QueueFull):
            small.map(return_me, [1])
        assert small.size() == 2
    finally:
        small.dispose()


def test_auto_start_false_holds_jobs_until_start():
    with ezpq.Queue(2, auto_start=False) as Q:
        assert not Q.is_running
        Q.put(return_me, 1)
        Q.put(return_me, 2)
        assert Q.size(waiting=True) == 2
        assert {j["status"] for j in Q.jobs()} == {"waiting"}
        assert Q.get(wait=True, timeout=0.2) is None
        Q.start()
        assert Q.is_running
        assert Q.wait() == 0
        assert sorted(j["output"] for j in Q.collect()) == [1, 2]


def test_callback_runs_in_the_submitting_process():
    seen = []

    def cb(job):
        seen.append(job["id"])
        if job["output"] == 2:
            raise ValueError("bad callback")
        return os.getpid()

    with ezpq.Queue(2, callback=cb) as Q:
        Q.map(return_me, [1, 2, 3])
        # map popped them; check via put/get
        Q.put(return_me, 1)
        Q.put(return_me, 2)
        Q.wait()
        jobs = {j["output"]: j for j in Q.collect()}
    assert jobs[1]["callback"] == os.getpid()
    assert jobs[2]["callback"] == "bad callback"
    assert sorted(seen) == [1, 2, 3, 4, 5]


def test_log_file(tmp_path):
    path = tmp_path / "log.csv"
    with ezpq.Queue(2, log_file=str(path)) as Q:
        Q.map(square, range(5))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert list(rows[0]) == list(FIELDS)
    assert sorted(int(r["output"]) for r in rows) == [0, 1, 4, 9, 16]


def test_log_csv_static(tmp_path):
    path = str(tmp_path / "one.csv")
    assert ezpq.Queue.log_csv({"a": 1, "b": 2}, path) == 0
    assert ezpq.Queue.log_csv({"a": 3, "b": 4}, path) == 0
    assert open(path).read().splitlines() == ["a,b", "1,2", "3,4"]


def test_errors_print_unless_suppressed(capfd):
    with ezpq.Queue(1) as Q:
        Q.put(fail, "loud-error")
        Q.put(fail, "quiet-error", suppress_errors=True)
        Q.wait()
        jobs = Q.collect()
    err = capfd.readouterr().err
    assert "loud-error" in err and "quiet-error" not in err
    assert all(j["status"] == "failed" and j["exitcode"] == 1 for j in jobs)
    assert all("RuntimeError" in j["exception"] for j in jobs)


def test_timeout_kills_and_worker_is_replaced(Q):
    Q.put(sleep_for, 30, timeout=0.3)
    job = Q.get(wait=True)
    assert job["status"] == "timeout" and job["cancelled"] and job["exitcode"] < 0
    assert job["runtime"] < 5
    Q.put(square, 4)
    assert Q.get(wait=True)["output"] == 16


def test_crash_is_reported_and_the_queue_carries_on(Q):
    Q.put(exit_hard, 3, suppress_errors=True)
    job = Q.get(wait=True)
    assert job["status"] == "lost" and job["exitcode"] == 3
    assert Q.map(square, [1, 2, 3])[2]["output"] == 9


def test_unpicklable_output_fails_that_job_only(Q):
    Q.put(generator_output, suppress_errors=True)
    job = Q.get(wait=True)
    assert job["status"] == "failed" and "cannot be pickled" in job["exception"]
    Q.put(square, 5)
    assert Q.get(wait=True)["output"] == 25


def test_cancel_waiting_and_running(Q):
    Q.set_workers(1)
    running = Q.put(sleep_for, 30)
    waiting = Q.put(sleep_for, 30)
    assert Q.cancel(waiting) is True
    wait_until_running(Q, running)
    assert Q.cancel(running) is True
    assert Q.wait() == 0
    jobs = {j["id"]: j for j in Q.collect()}
    assert jobs[waiting]["status"] == "cancelled" and jobs[waiting]["started"] is None
    assert jobs[running]["status"] == "cancelled" and jobs[running]["exitcode"] < 0
    assert jobs[running]["started"] is not None


@pytest.mark.parametrize("qid", [None, "named"], ids=["buffered", "shared_qid"])
def test_cancel_of_a_finished_job_is_false_and_of_an_unknown_id_raises(qid):
    with ezpq.Queue(1, qid=qid) as Q:
        collected, uncollected = Q.put(square, 2), Q.put(square, 3)
        assert Q.wait() == 0
        assert Q.get()["id"] == collected
        assert Q.cancel(uncollected) is False      # finished, not collected
        assert Q.cancel(collected) is False        # finished and collected
        assert Q.get()["id"] == uncollected        # the False cancel left it alone
        for never in (0, uncollected + 1, 999, 10 ** 6):
            with pytest.raises(ezpq.JobNotFound):
                Q.cancel(never)
        assert Q.put(square, 4) == uncollected + 1 and Q.get(wait=True)["output"] == 16


def test_counters_and_predicates(Q):
    assert Q.n_workers() == 2 and Q.is_empty() and not Q.is_working()
    Q.set_workers(3)
    assert Q.n_workers() == 3
    Q.map(square, range(4))
    assert Q.n_submitted() == 4 and Q.n_completed() == 4 and Q.remaining_jobs() == 0
    assert Q.n_workers_free() == 3 and not Q.is_busy()
    assert Q.get() is None and Q.get(wait=True) is None


def test_clear_waiting_and_stop_all():
    with ezpq.Queue(1, auto_start=False) as Q:
        for i in range(3):
            Q.put(return_me, i)
        assert Q.clear_waiting() == 3
        assert [j["status"] for j in Q.collect()] == ["cancelled"] * 3
        running = Q.put(sleep_for, 30)
        waiting = Q.put(sleep_for, 30)
        Q.start()
        wait_until_running(Q, running)
        Q.stop_all()   # waits for the stop
        assert Q.size(waiting=True, working=True) == 0
        jobs = {j["id"]: j for j in Q.collect()}
        assert jobs[waiting]["status"] == "cancelled" and jobs[waiting]["started"] is None
        assert jobs[running]["status"] == "cancelled" and jobs[running]["exitcode"] < 0
        assert Q.put(return_me, 7) and Q.get(wait=True)["output"] == 7   # the queue carries on


def test_jobs_run_in_the_clients_cwd_and_sys_path(tmp_path, monkeypatch):
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "helper_mod.py").write_text("import os\ndef where():\n    return os.getcwd()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(moddir))
    import helper_mod
    with ezpq.Queue(1, start_method="spawn") as Q:
        Q.put(helper_mod.where)
        job = Q.get(wait=True)
    assert job["status"] == "completed", job["exception"]
    assert job["output"] == str(tmp_path)


def test_exceptions_survive_pickling():
    for exc in (ezpq.EzpqError("x"), ezpq.QueueFull("x"), ezpq.ConnectionError("x"),
                ezpq.AuthenticationError("x"), ezpq.UnpicklableError("x"), ezpq.JobNotFound("x")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and back.args == ("x",)
    assert issubclass(ezpq.ConnectionError, ConnectionError)
    assert issubclass(ezpq.AuthenticationError, ezpq.ConnectionError)
    assert issubclass(ezpq.QueueFull, ezpq.EzpqError)


def test_connection_errors(Q, tmp_path):
    with pytest.raises(ezpq.ConnectionError, match="cannot connect"):
        ezpq.Queue(address=str(tmp_path / "nothing.sock"), authkey=b"k")
    with pytest.raises(ezpq.AuthenticationError):
        ezpq.Queue(address=Q._server.address, authkey=b"wrong")


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_server_dies_with_a_killed_client_and_leaves_no_directory(tmp_path, signame):
    """A client ended by a signal runs no clean-up: its private server stops
    with it, kills its workers and removes its own socket directory."""
    import signal
    import subprocess
    import psutil
    from jobs import wait_for_file

    import pathlib
    import tempfile
    private_tmp = pathlib.Path(tempfile.mkdtemp(prefix="c"))  # short: tmp_path is too long for a socket
    pidfile = tmp_path / "pids"
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, time, psutil\n"
        "import ezpq_mgr as ezpq\n"
        "Q = ezpq.Queue(2)\n"
        "Q.put(time.sleep, 60)\nQ.put(time.sleep, 60)\n"
        "while Q.size(working=True) < 2: time.sleep(0.01)\n"
        "server = psutil.Process(Q._server.popen.pid)\n"
        "pids = [server.pid] + [c.pid for c in server.children(recursive=True)]\n"
        f"open({str(pidfile)!r} + '.tmp', 'w').write(' '.join(map(str, pids)))\n"
        f"import os; os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "time.sleep(60)\n")
    client = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, TMPDIR=str(private_tmp)))
    try:
        assert wait_for_file(str(pidfile), 60)
        pids = [int(p) for p in pidfile.read_text().split()]
        assert len(pids) >= 3  # server + 2 workers
        assert [p.name for p in private_tmp.iterdir()][0].startswith("ezpq-")
        procs = [psutil.Process(p) for p in pids]   # now, while they run (pid + create time)
        client.send_signal(getattr(signal, signame))
        client.wait()
        gone, alive = psutil.wait_procs(procs, timeout=5)
        assert not alive, f"left alive: {alive}"
        assert list(private_tmp.iterdir()) == []
    finally:
        client.kill()
        client.wait()
        private_tmp.rmdir()


def test_a_client_killed_before_its_server_got_the_config_leaves_no_directory(tmp_path):
    """The narrowest window: the client made its private directory and
    started the server, then died before it sent the server its config (its
    stdin closes at once). The server was told the directory on its command
    line, so it removes it all the same."""
    import subprocess
    import tempfile
    private = tempfile.mkdtemp(prefix="ezpq-")
    ready_r, ready_w = os.pipe()
    try:
        server = subprocess.Popen([sys.executable, "-m", "ezpq_mgr.server", "--embedded", "--ready-fd",
                                   str(ready_w), "--private-dir", private],
                                  stdin=subprocess.PIPE, pass_fds=[ready_w])
        server.stdin.close()          # the client is gone: no config line ever comes
        assert server.wait(30) == 0
        assert not os.path.exists(private)
    finally:
        os.close(ready_r)
        os.close(ready_w)
        if os.path.isdir(private):
            os.rmdir(private)


def test_a_temp_dir_too_long_for_a_socket_falls_back_to_tmp(monkeypatch):
    """A Unix socket path holds at most 107 bytes: with a deep TMPDIR the
    private server's directory is made in /tmp instead, and removed after."""
    import tempfile
    deep = tempfile.mkdtemp()
    long_dir = os.path.join(deep, "d" * 100)
    os.mkdir(long_dir)
    monkeypatch.setattr(tempfile, "tempdir", long_dir)
    try:
        with ezpq.Queue(1) as Q:
            directory = Q._server.dir
            assert os.path.dirname(directory) == "/tmp"
            assert [j["output"] for j in Q.map(abs, [-1, -2])] == [1, 2]
        assert not os.path.exists(directory)
    finally:
        os.rmdir(long_dir)
        os.rmdir(deep)


def test_a_forked_child_neither_holds_nor_removes_the_private_server(tmp_path):
    """A child forked by the client must not keep the server alive once the
    client is killed, nor delete its socket when the child exits normally."""
    import signal
    import subprocess
    import psutil
    from jobs import wait_for_file

    pidfile = tmp_path / "pids"
    script = tmp_path / "client.py"
    script.write_text(
        "import os, sys, time\n"
        "import ezpq_mgr as ezpq\n"
        "Q = ezpq.Queue(1)\n"
        "if os.fork() == 0:\n"   # a short-lived child exits normally (atexit runs)
        "    sys.exit(0)\n"
        "os.wait()\n"
        "assert [j['output'] for j in Q.map(abs, [-1, -2])] == [1, 2]\n"
        "child = os.fork()\n"
        "if child == 0:\n"       # a long-lived child outlives the client
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        f"open({str(pidfile)!r} + '.tmp', 'w').write(f'{{Q._server.popen.pid}} {{child}}')\n"
        f"os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "time.sleep(60)\n")
    client = subprocess.Popen([sys.executable, str(script)])
    child = None
    try:
        assert wait_for_file(str(pidfile), 60)
        server_pid, child_pid = (int(p) for p in pidfile.read_text().split())
        child = psutil.Process(child_pid)
        server = psutil.Process(server_pid)
        client.send_signal(signal.SIGKILL)
        client.wait()
        gone, alive = psutil.wait_procs([server], timeout=5)
        assert not alive, "the forked child kept the private server alive"
        assert child.is_running()
    finally:
        client.kill()
        client.wait()
        if child is not None and child.is_running():
            child.kill()
            child.wait(5)


def test_forkserver_start_method():
    with ezpq.Queue(2, start_method="forkserver") as Q:
        assert [j["output"] for j in Q.map(square, range(6))] == [0, 1, 4, 9, 16, 25]
        Q.put(sleep_for, 30, timeout=0.2)
        assert Q.get(wait=True)["status"] == "timeout"


def test_auto_stop_pauses_when_idle_and_auto_remove_discards():
    with ezpq.Queue(2, auto_stop=True) as Q:
        Q.put(square, 2)
        assert Q.wait() == 0
        assert not Q.is_running
        Q.put(square, 3)
        assert Q.size(waiting=True) == 1
        Q.start()
        assert Q.wait() == 0
        assert sorted(j["output"] for j in Q.collect()) == [4, 9]
    with ezpq.Queue(2, auto_remove=True) as Q:
        Q.put(square, 2)
        assert Q.wait() == 0
        assert Q.size() == 0 and Q.n_completed() == 1 and Q.collect() == []


def test_stop_all_cancels_waiting_and_stops_running():
    with ezpq.Queue(1) as Q:
        first = Q.put(sleep_for, 30)
        for _ in range(3):
            Q.put(sleep_for, 30)
        wait_until_running(Q, first)
        Q.stop_all()
        jobs = {j["id"]: j for j in Q.collect()}
        assert len(jobs) == 4 and {j["status"] for j in jobs.values()} == {"cancelled"}
        assert jobs[first]["exitcode"] < 0
