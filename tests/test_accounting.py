"""psutil's side: per-job CPU and peak memory, whole-tree timeouts, crashes."""

import os
import signal
import threading
import time

import psutil
import pytest

import ezpq_mgr as ezpq
from jobs import (burn_cpu, child_burns_cpu, child_touches_memory, exit_hard, raise_signal, segfault,
                  spawn_sleeper_tree, square, touch_memory, touch_memory_in_a_thread, wait_for_file,
                  write_pid_and_sleep)

MiB = 1024 * 1024


@pytest.fixture
def Q1():
    queue = ezpq.Queue(1)
    yield queue
    queue.dispose()


def test_cpu_seconds_match_a_direct_run(Q1):
    t0 = os.times()
    burn_cpu(0.5)
    t1 = os.times()
    direct = (t1.user - t0.user) + (t1.system - t0.system)
    Q1.put(burn_cpu, 0.5)
    job = Q1.get(wait=True)
    measured = job["cpu_user"] + job["cpu_system"]
    assert measured == pytest.approx(direct, rel=0.15)


def test_peak_memory_is_per_job(Q1):
    Q1.put(touch_memory, 200)
    Q1.put(square, 3)
    big, small = Q1.get(wait=True), Q1.get(wait=True)
    assert big["pid"] == small["pid"]  # same persistent worker
    assert big["max_rss_method"] == "vmhwm"
    assert 200 * MiB <= big["max_rss"] <= 260 * MiB
    assert small["max_rss"] < 60 * MiB


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_peak_in_an_exited_thread_does_not_stick_to_the_worker(start_method):
    """getrusage's maxrss must not carry a finished job's peak into the next
    job, even when it was reached in a thread that has exited since (and,
    under spawn, whatever the kernel fixed at exec)."""
    with ezpq.Queue(1, start_method=start_method) as Q:
        Q.put(touch_memory_in_a_thread, 200)
        Q.put(square, 3)
        big, small = Q.get(wait=True), Q.get(wait=True)
    assert big["pid"] == small["pid"]
    assert 200 * MiB <= big["max_rss"] <= 260 * MiB
    assert small["max_rss"] < 60 * MiB


def test_child_process_cpu_and_memory_count(Q1):
    Q1.put(child_burns_cpu, 0.3)
    job = Q1.get(wait=True)
    assert job["status"] == "completed"
    assert job["cpu_user"] + job["cpu_system"] >= 0.3 * 0.85
    Q1.put(child_touches_memory, 100)
    job = Q1.get(wait=True)
    assert job["max_rss_children"] >= 100 * MiB
    assert job["max_rss"] < 60 * MiB


def test_child_cpu_counts_once_between_plain_jobs(Q1):
    """The children's CPU baseline carried over from a job that started no
    process must not hide the next job's child, nor leak into the job after."""
    ids = [Q1.put(square, 2), Q1.put(child_burns_cpu, 0.3), Q1.put(square, 3)]
    Q1.wait()
    jobs = {j["id"]: j for j in Q1.collect()}
    cpu = [jobs[i]["cpu_user"] + jobs[i]["cpu_system"] for i in ids]
    assert len({jobs[i]["pid"] for i in ids}) == 1
    assert cpu[1] >= 0.3 * 0.85
    assert cpu[0] < 0.1 and cpu[2] < 0.1
    assert jobs[ids[1]]["max_rss_children"] is not None
    assert jobs[ids[0]]["max_rss_children"] is None and jobs[ids[2]]["max_rss_children"] is None


def test_timeout_kills_the_whole_tree(Q1, tmp_path):
    pidfile = str(tmp_path / "tree")
    Q1.put(spawn_sleeper_tree, pidfile, timeout=1.0)
    assert wait_for_file(pidfile)
    pids = [int(p) for p in open(pidfile).read().split()]
    job = Q1.get(wait=True)
    ended = time.monotonic()
    assert job["status"] == "timeout" and job["cancelled"] and job["exitcode"] < 0
    assert job["runtime"] == pytest.approx(1.0, abs=0.2)
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    gone, alive = psutil.wait_procs(procs, timeout=max(0.0, ended + 0.5 - time.monotonic()))
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive
    Q1.put(square, 5)
    assert Q1.get(wait=True)["output"] == 25


def test_an_exit_without_a_result_is_lost(Q1):
    Q1.put(exit_hard, 3, suppress_errors=True)
    got = Q1.get(wait=True)
    assert got["status"] == "lost" and got["exitcode"] == 3
    assert "died" in got["exception"]
    assert [j["output"] for j in Q1.map(square, [1, 2])] == [1, 4]


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("job,sig", [
    ((segfault,), signal.SIGSEGV),
    ((raise_signal, int(signal.SIGSEGV)), signal.SIGSEGV),
    ((raise_signal, int(signal.SIGBUS)), signal.SIGBUS),
    ((raise_signal, int(signal.SIGFPE)), signal.SIGFPE),
    ((raise_signal, int(signal.SIGILL)), signal.SIGILL),
    ((raise_signal, int(signal.SIGABRT)), signal.SIGABRT),
], ids=["string_at_0", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"])
def test_a_job_that_crashes_of_its_own_signal_failed(start_method, job, sig):
    with ezpq.Queue(1, start_method=start_method) as Q:
        Q.put(job[0], args=list(job[1:]), suppress_errors=True)
        got = Q.get(wait=True)
        assert got["status"] == "failed" and got["exitcode"] == -sig, got
        assert sig.name in got["exception"] and "died" in got["exception"], got["exception"]
        assert [j["output"] for j in Q.map(square, [1, 2])] == [1, 4]   # the worker was replaced


def test_outside_sigkill_is_reported(Q1, tmp_path):
    path = str(tmp_path / "pid")
    Q1.put(write_pid_and_sleep, path, suppress_errors=True)
    assert wait_for_file(path)
    os.kill(int(open(path).read()), signal.SIGKILL)
    job = Q1.get(wait=True)
    assert job["status"] == "killed" and job["exitcode"] == -signal.SIGKILL
    assert "SIGKILL" in job["exception"]
    assert Q1.map(square, [3])[0]["output"] == 9


def test_max_memory_breach_kills_the_job(Q1):
    Q1.put(touch_memory, 300, max_memory=100 * MiB, suppress_errors=True)
    job = Q1.get(wait=True)
    assert job["status"] == "killed" and job["exitcode"] < 0
    assert "max_memory" in job["exception"]
    assert Q1.map(square, [4])[0]["output"] == 16


def test_thread_jobs_measure_their_own_thread():
    with ezpq.Queue(2, job_runner=threading.Thread) as Q:
        Q.put(burn_cpu, 0.3)
        job = Q.get(wait=True)
    assert job["cpu_user"] + job["cpu_system"] == pytest.approx(0.3, rel=0.2)
    assert job["max_rss"] is None and job["pid"] != os.getpid()


def test_procmeter_reads_a_process_and_its_children_from_outside():
    """The server's reading of another user's worker (meter.ProcMeter): CPU
    of the process and of a child still running, the peak since the last
    reading, each reading the next one's baseline."""
    import subprocess
    import sys
    from ezpq_mgr.worker.meter import ProcMeter
    from ezpq_mgr.worker.procutil import kill_tree
    code = ("import os, sys, time\n"
            "def burn(s):\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < s: pass\n"
            "sys.stdin.readline()\n"
            "burn(0.4); block = b'x' * (150 << 20); del block\n"
            "if os.fork() == 0:\n"
            "    burn(0.3); print('done', flush=True); time.sleep(60); os._exit(0)\n"
            "sys.stdin.readline()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        meter = ProcMeter(p.pid)
        idle_u, idle_s, idle_peak = meter.take()
        assert idle_u + idle_s < 0.1 and idle_peak < 100 * MiB
        p.stdin.write(b"\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"done\n"   # the child burnt its CPU and sleeps, alive
        u, s, peak = meter.take()
        assert u + s >= 0.6, (u, s)               # 0.4 s its own, 0.3 s its live child's
        assert peak >= 150 * MiB
        u, s, peak = meter.take()                 # nothing since
        assert u + s < 0.05 and peak < 100 * MiB
        assert meter.cpu()[2] == 1                # one descendant
        meter.close()
        meter.close()                             # once only: the numbers may be reused
    finally:
        kill_tree([p.pid])
        p.wait()
        p.stdin.close()
        p.stdout.close()


def test_report_counts_each_finished_status_and_a_shell_jobs_peak():
    from ezpq_mgr.server.accounting import report
    rows = [{"user": "u", "status": s, "cpu_user": 1, "cpu_system": 0, "max_rss": 10, "runtime": 1}
            for s in ("completed", "completed", "failed", "timeout", "killed", "lost", "cancelled", "skipped")]
    rows.append({"user": "u", "status": "completed", "max_rss": "100", "max_rss_children": "3000"})
    (r,) = report(rows, "user")
    assert r["jobs"] == 9 and r["completed"] == 3 and r["failed"] == 1
    assert r["timeout"] == r["killed"] == r["lost"] == r["cancelled"] == r["skipped"] == 1
    assert r["max_rss_peak"] == 3000 and r["cpu_seconds"] == 8
