"""Running one job: in a persistent worker process, or on a server thread.

A worker process loops ``recv job → run → send outcome`` over its pipe to
the supervisor. Between jobs it keeps nothing of the job but a small cache
of unpickled functions (a ``map`` sends the same function bytes each time).
A watcher thread ends the worker, and any process its job started, as soon
as its parent (the server) is gone, so a SIGKILLed server leaves no orphan.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, Dict, Optional, Tuple

from . import channel, serialize
from .job import JobStatus
from .shell import ShellResult
from .meter import JobMeter
from .procutil import become_subreaper, descendants, kill_tree, reap_zombies

__all__ = ["worker_main", "run_call", "apply_env", "thread_cpu", "HOST"]

HOST = socket.gethostname()
_FN_CACHE_SIZE = 32

#: One finished run: (status, exitcode, output_blob, exception text).
CallResult = Tuple[JobStatus, int, Optional[bytes], Optional[str]]


def apply_env(env: Optional[Tuple[str, list]]) -> None:
    """Run in the submitting client's working directory with its sys.path."""
    if env is None:
        return
    cwd, path = env
    if path is not None:
        sys.path[:] = list(path)
    if cwd is not None and os.getcwd() != cwd:
        os.chdir(cwd)


def run_call(fn_blob: bytes, args_blob: bytes, fn_cache: Optional[Dict[bytes, Any]] = None) -> CallResult:
    """Unpickle and call the job; never raises."""
    try:
        fn = fn_cache.get(fn_blob) if fn_cache is not None else None
        if fn is None:
            fn = serialize.load(fn_blob)
            if fn_cache is not None:
                if len(fn_cache) >= _FN_CACHE_SIZE:
                    fn_cache.clear()
                fn_cache[fn_blob] = fn
        args, kwargs = serialize.load(args_blob)
        output = fn(*(args or ()), **(kwargs or {}))
    except BaseException:  # the job's own SystemExit/KeyboardInterrupt fail the job only
        return JobStatus.FAILED, 1, None, traceback.format_exc()
    blob, error = serialize.dump_output(output)
    if error is not None:
        return JobStatus.FAILED, 1, None, error
    if isinstance(output, ShellResult) and output["returncode"] != 0:
        return (JobStatus.FAILED, output["returncode"], blob,
                f"command exited with code {output['returncode']}")
    return JobStatus.COMPLETED, 0, blob, None


def thread_cpu() -> Tuple[float, float]:
    """(user, system) CPU seconds of the calling thread."""
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        return ru.ru_utime, ru.ru_stime
    except (ImportError, AttributeError, OSError):
        import time
        return time.thread_time(), 0.0


def _watch_parent() -> None:
    """Exit (killing the job's processes) as soon as the parent process is gone."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        kill_tree(descendants(os.getpid()), grace=0.05)
        os._exit(1)

    threading.Thread(target=watch, name="ezpq-parent-watch", daemon=True).start()


def become_user(uid: int) -> None:
    """Drop root for ``uid`` (groups, gid, uid), before any job is unpickled."""
    import ctypes
    import pwd
    pw = pwd.getpwuid(uid)
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(uid)
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    try:  # setuid made us non-dumpable: /proc/self would stay root's (no clear_refs)
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def worker_main(conn: multiprocessing.connection.Connection, run_as: Optional[int] = None) -> None:
    """Entry point of a worker process.

    ``EZPQ_ACCOUNTING=0`` in the server's environment turns the per-job CPU
    and memory figures off (they are then None); the benchmarks use it to
    show what accounting costs."""
    _watch_parent()
    if run_as is not None:
        become_user(run_as)
    become_subreaper()
    accounting = os.environ.get("EZPQ_ACCOUNTING", "1") != "0"
    pid = os.getpid()
    meter = JobMeter() if accounting else None
    fn_cache: Dict[bytes, Any] = {}
    if meter:
        meter.arm()
    conn.send("ready")
    while True:
        try:
            msg = channel.recv(conn)
        except (EOFError, OSError):
            break
        if msg is None:
            break
        seq, fn_blob, args_blob, env, as_thread = msg
        apply_env(env)
        if as_thread:  # a thread job of a shared server: this thread's CPU, no RSS
            u0, s0 = thread_cpu()
        elif meter:
            meter.begin()
        started = time.time()
        status, exitcode, out, exc = run_call(fn_blob, args_blob, fn_cache)
        ended = time.time()
        figures = None  # a measured job's figures follow its result
        if as_thread:
            u1, s1 = thread_cpu()
            figures = (u1 - u0, s1 - s0, None, None, None)
        elif not meter:
            figures = (None, None, None, None, None)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        try:
            channel.send(conn, (seq, status.value, exitcode, out, exc, pid, started, ended, figures))
            if figures is None:
                # measured now: a system call before the send would delay the
                # result by far more than its own cost (see meter.py)
                figures, spawned = meter.stop()
                channel.send(conn, (seq, figures))
                if spawned:
                    reap_zombies()  # orphans of the job's processes were adopted by us
        except (EOFError, OSError):
            break
        if meter:  # for the next job, while the supervisor reads this result
            meter.arm(reuse=not as_thread)
