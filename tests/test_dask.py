"""The Dask backend (``Queue(dask=)``, ``ezpq-server --dask``) on a real
``distributed.LocalCluster`` on 127.0.0.1: 2 worker processes x 1 thread.

The ported ezpq parity tests run their bodies (test_parity.py) on it; then
what a local job has must hold on a Dask host too: timeouts that kill a
grandchild, cancel of a running job, max_memory, the resource fields, a
Dask worker killed under its jobs; and the start-up errors.
"""

import logging
import os
import random
import socket
import subprocess
import sys
import time

import psutil
import pytest

distributed = pytest.importorskip("distributed")

import ezpq_mgr as ezpq  # noqa: E402
import test_parity as parity  # noqa: E402
from jobs import (burn_cpu, spawn_sleeper_tree, touch_then_burn, wait_for_file,  # noqa: E402
                  write_pid_and_sleep)
from multiuser import USERS, needs_root, run_as, users  # noqa: E402,F401 (fixture)
from server_fixture import free_port  # noqa: E402
from test_joblogs import (a_submits_a_secret, check_only_its_submitter_reads_it, cli, logroot,  # noqa: E402,F401
                          start_server)

N = 100   # the parity tests' inputs (1,000 locally): a Dask round trip is ~10 ms


def local_cluster(**kw):
    opts = dict(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.ERROR)
    opts.update(kw)
    return distributed.LocalCluster(**opts)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


@pytest.fixture
def Q(cluster):
    queue = ezpq.Queue(5, dask=cluster.scheduler_address)
    yield queue
    queue.dispose()


@pytest.fixture
def inputs():
    values = list(range(N))
    random.shuffle(values)
    return tuple(values)


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["priority", "map", "starmap", "starmapkw", "lanes", "size"])
def test_parity_on_dask(Q, inputs, name):
    getattr(parity, f"test_{name}")(Q, inputs)


def test_lane_error_on_dask(Q):
    parity.test_lane_error(Q)


def test_at_most_the_clusters_threads_run_at_once(Q, tmp_path):
    """5 slots asked, 2 threads in the cluster: 2 jobs work, the rest wait
    with us (not in Dask's queue), in our order."""
    for i in range(4):
        Q.put(write_pid_and_sleep, str(tmp_path / f"p{i}"), priority=i)
    assert wait_for_file(str(tmp_path / "p0")) and wait_for_file(str(tmp_path / "p1"))
    assert Q.size(working=True) == 2 and Q.size(waiting=True) == 2
    assert {j["id"] for j in Q.jobs() if j["status"] == "working"} == {1, 2}
    assert Q.cancel(1) and Q.cancel(2)
    assert wait_for_file(str(tmp_path / "p2")) and wait_for_file(str(tmp_path / "p3"))
    Q.stop_all()


# ------------------------------------------------------------- runners
def _runners(client):
    """{worker: [our runner tasks it is processing]} (ezpq's Dask keys)."""
    return {w: [k for k in keys if str(k).startswith("ezpq-")] for w, keys in client.processing().items()}


def _poll(what, limit):
    deadline = time.monotonic() + limit
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_an_idle_runner_holds_its_thread_then_retires_and_frees_it(Q, cluster):
    """Right after a job a runner holds its Dask thread (the next job needs
    no new task); with nothing to do for RUNNER_IDLE it ends, and the
    cluster's threads are free again (an adaptive cluster can scale down)."""
    from ezpq_mgr.server.dask_executor import RUNNER_IDLE
    with distributed.Client(cluster, set_as_default=False) as client:
        Q.put(os.getpid)
        assert Q.get(wait=True, timeout=30)["status"] == "completed"
        held = [k for keys in _runners(client).values() for k in keys]
        assert len(held) == 1   # still there, idle
        assert _poll(lambda: not any(client.processing().values()), RUNNER_IDLE + 15)
        Q.put(os.getpid)   # the next job starts a new runner
        job = Q.get(wait=True, timeout=30)
        assert job["status"] == "completed" and job["output"] == job["pid"]
        again = _poll(lambda: [k for keys in _runners(client).values() for k in keys], 10)
        assert len(again) == 1 and again != held


def test_a_job_waiting_behind_busy_runners_is_overtaken_by_a_better_one(Q, tmp_path):
    """Both runners busy: a job put later with a better priority goes
    first; the order is ours, nothing waits in a runner's inbox or in Dask."""
    busy = [Q.put(write_pid_and_sleep, str(tmp_path / f"b{i}")) for i in range(2)]
    assert wait_for_file(str(tmp_path / "b0")) and wait_for_file(str(tmp_path / "b1"))
    low = Q.put(time.time, priority=50)
    high = Q.put(time.time, priority=1)
    assert Q.size(waiting=True) == 2
    assert Q.cancel(busy[0])   # one runner frees: the better job first, then the other
    deadline = time.monotonic() + 30
    while Q.size(waiting=True) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert Q.cancel(busy[1])
    Q.wait()
    done = {j["id"]: j for j in Q.collect()}
    assert done[high]["status"] == done[low]["status"] == "completed"
    assert done[high]["output"] < done[low]["output"]


def test_a_runners_worker_killed_mid_job_then_a_new_runner_takes_the_next(tmp_path):
    with local_cluster(n_workers=1, threads_per_worker=1) as cluster, \
            ezpq.Queue(1, dask=cluster.scheduler_address) as Q, \
            distributed.Client(cluster, set_as_default=False) as client:
        first = Q.put(write_pid_and_sleep, str(tmp_path / "p"), suppress_errors=True)
        assert wait_for_file(str(tmp_path / "p"))
        before = _runners(client)
        assert [len(keys) for keys in before.values()] == [1]
        pid = int(open(str(tmp_path / "p")).read())
        psutil.Process(pid).parent().kill()   # the Dask worker; its nanny starts another
        job = Q.get(wait=True, timeout=60)
        assert job["id"] == first and job["status"] == "lost" and "left while it ran" in job["exception"]
        Q.put(os.getpid)
        nxt = Q.get(wait=True, timeout=60)
        assert nxt["status"] == "completed" and nxt["output"] == nxt["pid"] != pid
        after = _poll(lambda: {w: k for w, k in _runners(client).items() if k}, 10)
        assert len(after) == 1 and set(after) != set(before)   # a new runner, on the new worker
        assert list(after.values())[0] != list(before.values())[0]


def test_a_job_whose_worker_leaves_before_it_began_waits_again_without_a_retry():
    """The Dask thread is busy with another client's task, so our runner
    has not started: the job still waits with us (it is chosen only for a
    runner that is up); the worker dies; the job runs on the next one,
    though it has no retries."""
    with local_cluster(n_workers=1, threads_per_worker=1) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client, \
            ezpq.Queue(1, dask=cluster.scheduler_address) as Q:
        (worker,) = client.nthreads()
        blocker = client.submit(time.sleep, 60, workers=[worker], allow_other_workers=False, pure=False)
        assert _poll(lambda: client.processing().get(worker), 10)
        job_id = Q.put(os.getpid)
        assert _poll(lambda: _runners(client).get(worker), 10)   # our runner, queued behind it
        assert Q.size(waiting=True) == 1 and Q.size(working=True) == 0
        psutil.Process(client.run(os.getpid, workers=[worker])[worker]).kill()
        job = Q.get(wait=True, timeout=60)
        assert job["id"] == job_id and job["status"] == "completed" and job["output"] == job["pid"]
        blocker.cancel()


# -------------------------------------------------------- limits and kills
def _alive(pid, created):
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(procs, seconds=10.0):
    deadline = time.monotonic() + seconds
    while any(_alive(*p) for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_timeout_kills_the_jobs_tree_on_the_dask_host(Q, tmp_path):
    pidfile = str(tmp_path / "tree")
    Q.put(spawn_sleeper_tree, pidfile, timeout=1.5)
    assert wait_for_file(pidfile)
    pids = [int(p) for p in open(pidfile).read().split()]
    procs = [(pid, psutil.Process(pid).create_time()) for pid in pids]
    job = Q.get(wait=True, timeout=30)
    assert job["status"] == "timeout" and job["cancelled"] and job["exitcode"] == -9
    assert "timed out after 1.5 s" in job["exception"]
    assert not any(_alive(*p) for p in procs)   # gone before the job was recorded


def test_cancel_of_a_running_job_kills_it_there(Q, tmp_path):
    pidfile = str(tmp_path / "pid")
    job_id = Q.put(write_pid_and_sleep, pidfile)
    assert wait_for_file(pidfile)
    pid = int(open(pidfile).read())
    proc = (pid, psutil.Process(pid).create_time())
    assert pid != Q._server.popen.pid
    assert Q.cancel(job_id) is True
    job = Q.get(wait=True, timeout=30)
    assert job["status"] == "cancelled" and job["cancelled"]
    assert _gone_within([proc])
    assert Q.map(burn_cpu, [0.01])[0]["status"] == "completed"   # its thread is free again


def test_max_memory_is_enforced_on_the_dask_host(Q):
    Q.put(touch_then_burn, [400, 10], max_memory=200 << 20)
    job = Q.get(wait=True, timeout=30)
    assert job["status"] == "killed" and job["exitcode"] == -9
    assert "max_memory=209715200" in job["exception"]
    assert job["runtime"] < 8


def test_a_job_killed_on_dask_keeps_the_figures_it_had_used(Q, tmp_path):
    """Timeout, cancel and max_memory: the CPU and peak memory by then, read
    on the host just before the kill, as a local kill has them."""
    MiB = 1 << 20
    Q.put(touch_then_burn, [100, 10], timeout=1.5)
    timed_out = Q.get(wait=True, timeout=30)
    path = str(tmp_path / "burning")
    job_id = Q.put(touch_then_burn, [60, 30, path])
    assert wait_for_file(path)   # it has used 0.5 s of CPU
    assert Q.cancel(job_id)
    cancelled = Q.get(wait=True, timeout=30)
    Q.put(touch_then_burn, [300, 10], max_memory=200 * MiB)
    killed = Q.get(wait=True, timeout=30)
    assert timed_out["status"] == "timeout" and cancelled["status"] == "cancelled" and killed["status"] == "killed"
    assert timed_out["cpu_user"] + timed_out["cpu_system"] >= 0.5, timed_out
    assert 100 * MiB <= timed_out["max_rss"] < 200 * MiB and timed_out["max_rss_method"] == "vmhwm", timed_out
    assert cancelled["cpu_user"] + cancelled["cpu_system"] >= 0.5 and cancelled["max_rss"] >= 60 * MiB, cancelled
    assert cancelled["exception"] == "cancelled by request" or "cancel" in cancelled["exception"]
    assert killed["cpu_user"] is not None and killed["max_rss"] >= 200 * MiB, killed


def test_resource_fields_are_the_jobs_own(Q, cluster):
    job = Q.map(touch_then_burn, [60], kwargs={"seconds": 0.3})[0]
    assert job["status"] == "completed"
    assert job["cpu_user"] + job["cpu_system"] >= 0.3
    assert 60 << 20 <= job["max_rss"] < 1 << 30 and job["max_rss_method"] == "vmhwm"
    assert job["host"] == socket.gethostname()
    Q.put(os.getpid)
    pid = Q.get(wait=True)
    assert pid["output"] == pid["pid"] and pid["pid"] not in (os.getpid(), Q._server.popen.pid)
    with distributed.Client(cluster) as client:
        dask_workers = set(client.run(os.getpid).values())
    assert psutil.Process(pid["pid"]).ppid() in dask_workers   # next to a Dask worker


def test_job_output_reaches_its_log(Q):
    job_id = Q.put(print, "hello from dask")
    Q.wait()
    assert Q.log(job_id) == "hello from dask\n"


def _rerun_once(marker, pidfile):
    """First run: leave a marker, write our pid, hang; a second run returns."""
    if os.path.exists(marker):
        return "again"
    open(marker, "w").close()
    write_pid_and_sleep(pidfile)


def test_a_dask_worker_killed_from_outside(tmp_path):
    """Its jobs are lost, or run again where they have retries left; Dask
    never re-runs one by itself; the job's process dies with the worker."""
    with local_cluster(n_workers=1, threads_per_worker=2) as cluster, \
            ezpq.Queue(2, dask=cluster.scheduler_address) as Q:
        lost = Q.put(_rerun_once, args=[str(tmp_path / "m1"), str(tmp_path / "p1")], suppress_errors=True)
        again = Q.put(_rerun_once, args=[str(tmp_path / "m2"), str(tmp_path / "p2")], retries=1)
        assert wait_for_file(str(tmp_path / "p1")) and wait_for_file(str(tmp_path / "p2"))
        pids = [int(open(str(tmp_path / f"p{i}")).read()) for i in (1, 2)]
        procs = [(pid, psutil.Process(pid).create_time()) for pid in pids]
        dask_worker = psutil.Process(pids[0]).parent()
        assert dask_worker.pid == psutil.Process(pids[1]).ppid()
        dask_worker.kill()
        jobs = {j["id"]: j for j in (Q.get(wait=True, timeout=60), Q.get(wait=True, timeout=60))}
        assert jobs[lost]["status"] == "lost" and "left while it ran" in jobs[lost]["exception"]
        assert jobs[again]["status"] == "completed" and jobs[again]["output"] == "again"
        assert _gone_within(procs)
        assert jobs[lost]["output"] is None   # ran once: Dask did not run it again by itself


# ------------------------------------------------------------- start-up
def _server_cmd(tmp_path, *extra):
    return [sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()",
            "--socket", str(tmp_path / "s.sock"), "--authkey-file", str(tmp_path / "key"),
            "--log-level", "ERROR", *extra]


def test_unreachable_scheduler_is_a_connection_error_naming_it(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    r = subprocess.run(_server_cmd(tmp_path, "--dask", address, "--dask-timeout", "0.5", "--dask-any-user"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert address in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dask_is_checked_at_the_call():
    with pytest.raises(TypeError, match="scheduler address"):
        ezpq.Queue(2, dask=8786)
    with pytest.raises(ValueError, match="scheme"):
        ezpq.Queue(2, dask="http://x:1")
    with pytest.raises(ValueError, match="embedded"):
        ezpq.Queue(2, dask="tcp://127.0.0.1:1", address="127.0.0.1:9")


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is a root server's")
def test_a_root_server_refuses_dask_without_dask_any_user(tmp_path):
    r = subprocess.run(_server_cmd(tmp_path, "--dask", "tcp://127.0.0.1:1"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--dask-any-user" in r.stderr and "Traceback" not in r.stderr


def test_a_malformed_result_from_a_dask_worker_makes_the_job_lost():
    from ezpq_mgr.server.dask_bridge import check_host_result
    good = ("completed", 0, 1.0, 2.0, b"x", None, (0.1, 0.0, 1, "vmhwm", None), 7, "h", b"")
    assert check_host_result("k", 1, good, "tcp://w:1").status == "completed"
    for bad in [None, "x", good[:-1], ("weird",) + good[1:], good[:4] + ("text",) + good[5:],
                good[:7] + ("7",) + good[8:], good[:9] + ("log",), good[:2] + (1,) + good[3:]]:
        result = check_host_result("k", 1, bad, "tcp://w:1")
        assert result.status == "lost" and "malformed" in result.exception and result.log == b""


# ------------------------------------------------------------- two users
@needs_root
def test_on_dask_another_user_cannot_read_a_jobs_log(cluster, logroot, users):
    """A root server with --dask --dask-any-user: a job's output comes back
    from the Dask host into a log only its submitter reads."""
    a, b = users[USERS[0]], users[USERS[1]]
    server = start_server(logroot, "--dask", cluster.scheduler_address, "--dask-any-user")
    try:
        job = run_as(a, a_submits_a_secret, server)
        assert cli(server, "wait", str(job))[0] == 0
        assert cli(server, "--json", "show", str(job))[1].count('"status": "completed"') == 1
        check_only_its_submitter_reads_it(server, logroot, a, b, job)
    finally:
        assert server.stop() == 0


# ------------------------------------------------------- scheduler lost
def _start_scheduler(port):
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", str(port), "--no-dashboard"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_worker(address):
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                             "--nworkers", "1", "--no-dashboard", "--death-timeout", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_scheduler_lost_running_jobs_lost_waiting_wait_then_reconnected(tmp_path):
    """A Dask worker closes when its scheduler goes (its deployment starts
    a new one): here a new scheduler on the same port, then a new worker."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start_scheduler(port)
    worker = _start_worker(address)
    workers = [worker]
    try:
        with ezpq.Queue(2, dask=address) as Q:
            Q.put(write_pid_and_sleep, str(tmp_path / "pid"), suppress_errors=True)
            assert wait_for_file(str(tmp_path / "pid"), limit=60)
            scheduler.kill()
            scheduler.wait()
            job = Q.get(wait=True, timeout=60)
            assert job["status"] == "lost" and "scheduler" in job["exception"]
            later = Q.put(os.getpid)
            assert Q.size(waiting=True) == 1
            assert worker.wait(60) is not None   # it left with its scheduler
            scheduler = _start_scheduler(port)
            workers.append(_start_worker(address))
            job = Q.get(wait=True, timeout=60)
            assert job["id"] == later and job["status"] == "completed" and job["output"] == job["pid"]
    finally:
        for w in workers:
            _stop(w)
        _stop(scheduler)


# ------------------------------------------------------------ the bridge
@pytest.mark.parametrize("how", ["garbage", "wrong-seq"])
def test_a_bridge_that_breaks_protocol_is_replaced_its_job_lost_or_run_again(cluster, monkeypatch, how):
    """The first bridge (a test hook in the server's own environment, which
    no client sets) sends garbage, or a result for a job it was not given,
    at its first result: it is ended, its job lost (or run again where it
    has a retry), a new bridge starts and the other jobs go on."""
    from ezpq_mgr.server.dask_executor import MISBEHAVE_ENV
    monkeypatch.setenv(MISBEHAVE_ENV, how)
    with ezpq.Queue(2, dask=cluster.scheduler_address) as Q:
        first = Q.put(os.getpid, suppress_errors=True)
        job = Q.get(wait=True, timeout=60)
        assert job["id"] == first and job["status"] == "lost", job
        assert "bridge" in job["exception"] and "protocol" in job["exception"], job["exception"]
        again = Q.put(os.getpid, retries=1)
        others = [Q.put(abs, -i) for i in range(1, 6)]
        done = {j["id"]: j for j in (Q.get(wait=True, timeout=60) for _ in range(6))}
        assert done[again]["status"] == "completed" and done[again]["output"] == done[again]["pid"]
        assert [done[i]["output"] for i in others] == [1, 2, 3, 4, 5]


def test_a_replacement_bridge_that_never_speaks_is_ended_and_replaced(cluster, monkeypatch):
    """The first bridge breaks protocol; the one started in its place never
    says whether it connected: it is ended after its allowance (a test hook
    makes that 3 s) and a third one runs the jobs. Before, the silent one
    was waited for forever and no job ran again."""
    from ezpq_mgr.server.dask_executor import FIRST_WORD_ENV, MISBEHAVE_ENV
    monkeypatch.setenv(MISBEHAVE_ENV, "garbage/silent-start")
    monkeypatch.setenv(FIRST_WORD_ENV, "3")
    with ezpq.Queue(2, dask=cluster.scheduler_address) as Q:
        first = Q.put(os.getpid, suppress_errors=True)
        job = Q.get(wait=True, timeout=60)
        assert job["id"] == first and job["status"] == "lost", job
        later = Q.put(abs, -7)
        job = Q.get(wait=True, timeout=60)   # backoffs 1 + 2 s, the silent one's 3 s, a boot
        assert job is not None and job["id"] == later and job["output"] == 7, job


def test_a_bridge_flooding_the_servers_log_is_rate_limited(cluster, monkeypatch, capfd):
    """A bridge (that is: whoever controls the cluster) sends 5,000 log
    lines at once: the server's log takes a burst of them, not all, and
    the jobs go on."""
    from ezpq_mgr.server.dask_executor import MISBEHAVE_ENV
    monkeypatch.setenv(MISBEHAVE_ENV, "log-flood")
    with ezpq.Queue(2, dask=cluster.scheduler_address) as Q:
        assert [job["output"] for job in Q.map(abs, [-1, -2, -3])] == [1, 2, 3]
    err = capfd.readouterr().err
    flood = [line for line in err.splitlines() if "dask bridge: flood" in line]
    assert 1 <= len(flood) <= 40, len(flood)


def test_a_bridge_whose_result_would_be_retried_runs_it_on_the_next_bridge(cluster, monkeypatch):
    from ezpq_mgr.server.dask_executor import MISBEHAVE_ENV
    monkeypatch.setenv(MISBEHAVE_ENV, "wrong-seq")
    with ezpq.Queue(2, dask=cluster.scheduler_address) as Q:
        first = Q.put(os.getpid, retries=1)
        job = Q.get(wait=True, timeout=60)
        assert job["id"] == first and job["status"] == "completed" and job["output"] == job["pid"], job


@needs_root
def test_dask_user_that_does_not_exist_is_refused_in_one_line(tmp_path):
    r = subprocess.run(_server_cmd(tmp_path, "--dask", "tcp://127.0.0.1:1", "--dask-any-user",
                                   "--dask-user", "ezbr_no_such_user"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ezbr_no_such_user" in r.stderr, r.stderr


def _fd_targets(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


@needs_root
def test_on_a_root_server_the_bridge_runs_as_dask_user_holding_only_its_channel(cluster, logroot, users):
    """The process that holds the Dask client runs as --dask-user, with
    nothing of the server open but its end of the channel."""
    import pwd
    user = USERS[1]
    server = start_server(logroot, "--dask", cluster.scheduler_address, "--dask-any-user", "--dask-user", user)
    try:
        bridges = [p for p in psutil.Process(server.proc.pid).children()
                   if "dask_bridge" in " ".join(p.cmdline())]
        assert len(bridges) == 1
        bridge = bridges[0].pid
        uid = pwd.getpwnam(user).pw_uid
        status = open(f"/proc/{bridge}/status").read()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
        assert uids == [str(uid)] * 4 and gids == [str(pwd.getpwnam(user).pw_gid)] * 4
        theirs = _fd_targets(bridge)
        assert all(theirs[fd] == "/dev/null" for fd in (0, 1, 2))
        ours = set(_fd_targets(server.proc.pid).values())
        shared = {t for t in theirs.values() if t in ours and t != "/dev/null" and not t.startswith("anon_inode:")}
        assert not shared, shared   # the server's files, sockets, pipes: none (its channel is its own end)
        Q = ezpq.Queue(address=server.address, authkey=server.key)
        try:
            Q.put(abs, -4)
            job = Q.get(wait=True, timeout=60)
        finally:
            Q.dispose()
        assert job["status"] == "completed" and job["output"] == 4
    finally:
        assert server.stop() == 0
