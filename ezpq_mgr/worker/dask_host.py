"""The ezpq side of a Dask worker: the plugin that keeps ezpq worker
processes next to it, and the runner task that runs the server's jobs in
them, one at a time.

Runs on a Dask worker host (never in the ezpq server). The server
(server/dask_executor.py) registers ``EzpqPlugin`` through its Dask client
and starts ``run_jobs`` runners, one per Dask worker thread it uses. Why
processes of our own, not the job's code in the Dask worker's thread: a
thread cannot be killed, so a timeout, a memory limit or a cancel could not
stop the job; its CPU and memory could not be told from the Dask worker's;
and a ``os._exit`` or a segfault would take the Dask worker down. So, as on
the local server, each job runs in a persistent ezpq worker process
(worker/run.py, the same loop and the same ``workerproto`` channel, its
figures from worker/meter.py):

- the plugin starts one per Dask worker thread at setup (a fresh
  interpreter, ``subprocess``: a Dask worker is a daemonic process that
  multiprocessing will not let have children), each with its channel (a
  socketpair), a lifeline (it exits, killing its tree, when the Dask worker
  is gone) and four output pipes (the job's stdout/stderr, alternating per
  job as in supervisor.py); a dead one is replaced at the next job;
- a runner (``run_jobs``) is one long Dask task holding one Dask worker
  thread: it takes the next job the server put in its own
  ``distributed.Queue`` (its inbox), runs it in an idle process, enforcing
  the job's ``timeout`` (counted from the send) and ``max_memory`` (the
  tree's RSS every 50 ms) by killing the process's whole tree
  (procutil.kill_tree), and puts how it ended (``HostResult``: plain
  fields; the output stays the job's opaque pickle) in the server's
  results queue. Told to end (the server's ``None`` once it idled), it
  returns how many jobs it took, and its thread is Dask's again. Why a runner and not a
  task per job: a Dask task costs ~10 ms of scheduling here, a queue hand-
  over ~2 ms (figures in the README, *Past one machine*);
- a cancel: the server calls ``kill_job`` on that worker (``Client.run``);
  it kills the tree of the process running that job, or, if the runner has
  not taken it yet, marks it so that the runner skips it. A runner task
  cancelled by Dask (the server stopped, or gave it up) has its process
  killed by the plugin's ``transition`` hook.

Nothing here reads what a job wrote except through ``workerproto``'s
strict decoder; a job that breaks the format has its tree killed and fails.
Jobs run as the Dask worker's OS user (README, *Past one machine*).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from distributed import Queue, WorkerPlugin, get_worker

from ..job import JobStatus, death
from ..messages import LateFigures, Ready, Result
from . import workerproto
from .meter import MARK_SIZE, mark_figures
from .procutil import kill_tree, tree_rss

__all__ = ["EzpqPlugin", "PLUGIN_NAME", "run_jobs", "kill_job", "HostResult", "process_main"]

PLUGIN_NAME = "ezpq"
#: a fresh ezpq worker process must say it is ready within this
BOOT_TIMEOUT = 60.0
MEMORY_CHECK_INTERVAL = 0.05
#: a result's figures must follow within this (as in supervisor.py)
FIGURES_TIMEOUT = 5.0
#: the most of one job's stdout+stderr carried back with its result (the
#: server caps a log again with its own --max-log)
MAX_OUTPUT = 16 << 20
_READ = 1 << 16


class HostResult(NamedTuple):
    """One job's end on a Dask host, as plain fields for the server."""
    status: str                  # a JobStatus value
    exitcode: Optional[int]
    started: Optional[float]
    ended: Optional[float]
    output: Optional[bytes]      # the job's output pickle, opaque
    exception: Optional[str]
    figures: Optional[tuple]     # messages.Figures' fields, or None
    pid: Optional[int]
    host: str
    log: bytes                   # what the job wrote to stdout and stderr


HOST = socket.gethostname()


def process_main() -> None:
    """Entry point of an ezpq worker process on a Dask host: ``channel
    lifeline outputs [mark]`` (descriptors). The same loop as the server's
    own workers (run.py), for the Dask worker's user; its meter leaves each
    job's baseline in the shared ``mark`` (as a local worker does), for the
    figures of a job killed from outside."""
    from .procutil import become_subreaper
    from .run import _exit, _serve, _watch_lifeline
    channel_fd, lifeline_fd = int(sys.argv[1]), int(sys.argv[2])
    outputs = [int(x) for x in sys.argv[3].split(",")] if sys.argv[3] != "-" else []
    mark = None
    if len(sys.argv) > 4:
        mark_fd = int(sys.argv[4])
        mark = memoryview(mmap.mmap(mark_fd, MARK_SIZE * 8)).cast("d")   # doubles, as a RawArray("d")
        os.close(mark_fd)
    _watch_lifeline(lifeline_fd)
    become_subreaper()
    if _serve(channel_fd, True, mark=mark, outputs=outputs):
        _exit()


def _shared_mark() -> Tuple[Optional[int], Optional[mmap.mmap]]:
    """A meter's mark shared with a process we start by ``subprocess``: a
    memfd (Linux) both sides map; (None, None) where there is none (the
    figures of a killed job are then unknown, as before)."""
    if not hasattr(os, "memfd_create"):
        return None, None
    fd = os.memfd_create("ezpq-mark")
    try:
        os.ftruncate(fd, MARK_SIZE * 8)
        return fd, mmap.mmap(fd, MARK_SIZE * 8)
    except BaseException:
        os.close(fd)
        raise


class _Process:
    """One ezpq worker process next to the Dask worker, and our end of it."""

    def __init__(self, lifeline_fd: int):
        ours, theirs = socket.socketpair()
        reads, writes = [], []
        mark_fd, self._mark_map = _shared_mark()
        try:
            for _ in range(4):
                r, w = os.pipe()
                os.set_blocking(r, False)
                reads.append(r)
                writes.append(w)
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            code = (f"import sys; sys.path.insert(0, {root!r}); "
                    f"from ezpq_mgr.worker.dask_host import process_main; process_main()")
            self.popen = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno()), str(lifeline_fd),
                 ",".join(str(w) for w in writes), *([] if mark_fd is None else [str(mark_fd)])],
                pass_fds=(theirs.fileno(), lifeline_fd, *writes, *([] if mark_fd is None else [mark_fd])),
                close_fds=True,
                stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            for fd in reads:
                os.close(fd)
            if self._mark_map is not None:
                self._mark_map.close()
            raise
        finally:
            theirs.close()
            if mark_fd is not None:
                os.close(mark_fd)
            for fd in writes:
                os.close(fd)
        self.sock = ours
        self.fd = ours.fileno()
        self.outs: List[int] = reads
        self.pid = self.popen.pid
        self.reader = workerproto.FrameReader(workerproto.DEFAULT_MAX_MESSAGE)
        self.ready = False
        self.sent = 0          # jobs sent (the parity picks the output pipes)
        self.env = None        # the environment last sent
        self.key: Optional[str] = None   # the Dask key of the runner it works for
        self.seq: Optional[int] = None   # the server's number of the job it runs
        self.stopped: Optional[Tuple[str, str]] = None   # (status, why) once we kill it
        self.dead = False
        #: the job's figures read just before we killed it (meter.mark_figures)
        self.kill_figures: Optional[tuple] = None
        self._lock = threading.Lock()
        self.mark = None if self._mark_map is None else memoryview(self._mark_map).cast("d")

    def kill(self, status: str, why: str) -> None:
        """End its whole tree (the job's processes included), reading the
        figures of its job by then first, as the local supervisor does;
        first reason wins."""
        with self._lock:
            first = self.stopped is None
            if first:
                self.stopped = (status, why)
                if self.mark is not None and self.seq is not None and self.ready:
                    try:
                        self.kill_figures = tuple(mark_figures(self.pid, self.mark))
                    except (OSError, ValueError, IndexError):
                        pass
        self.dead = True
        kill_tree([self.pid])

    def close(self) -> None:
        self.dead = True
        try:
            self.popen.wait(1.0)
        except subprocess.TimeoutExpired:
            kill_tree([self.pid])
            self.popen.wait()
        self.sock.close()
        for fd in self.outs:
            os.close(fd)
        self.outs = []
        if self.mark is not None:
            self.mark.release()
            self.mark = None
            self._mark_map.close()


class EzpqPlugin(WorkerPlugin):
    """Keeps ezpq worker processes next to one Dask worker and kills the
    one whose task Dask cancels."""

    idempotent = True    # registered again (a reconnecting server): the running one stays

    def __init__(self, name: str = PLUGIN_NAME):
        self.name = name     # one per ezpq server (dask_executor: ezpq-TOKEN)
        self._lock = threading.Lock()
        self._idle: List[_Process] = []
        self._busy: Dict[str, _Process] = {}
        #: (runner key, job seq) cancelled before that runner took the job
        self._cancelled: Set[Tuple[str, int]] = set()
        self._lifeline: Optional[Tuple[int, int]] = None
        self._closed = False

    def __getstate__(self):   # sent to the workers before setup: only its name travels
        return {"name": self.name}

    def __setstate__(self, state):
        self.__init__(state["name"])

    def setup(self, worker=None) -> None:
        r, w = os.pipe()   # we hold the only write end: EOF tells them we are gone
        os.set_inheritable(r, True)
        self._lifeline = (r, w)
        n = getattr(getattr(worker, "state", None), "nthreads", None) or getattr(worker, "nthreads", 1) or 1
        with self._lock:
            for _ in range(n):
                self._idle.append(_Process(r))

    def teardown(self, worker=None) -> None:
        with self._lock:
            self._closed = True
            procs = self._idle + list(self._busy.values())
            self._idle, self._busy = [], {}
        if procs:
            kill_tree([p.pid for p in procs])
        for p in procs:
            p.close()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def transition(self, key, start, finish, **kwargs) -> None:
        """Dask moved a task on this worker: an executing one of ours that
        was cancelled (its future cancelled by the server) has its tree
        killed, in a thread (this runs on the Dask worker's event loop)."""
        if start != "executing" or finish not in ("cancelled", "released", "forgotten"):
            return
        with self._lock:
            proc = self._busy.get(key)
        if proc is not None and not proc.dead:
            threading.Thread(target=proc.kill, args=(JobStatus.CANCELLED.value, "cancelled by request"),
                             name="ezpq-cancel", daemon=True).start()

    def kill(self, key: str, seq: int, why: str) -> None:
        """The server cancelled job ``seq`` it handed to runner ``key``:
        kill the tree running it, or have the runner skip it."""
        with self._lock:
            proc = self._busy.get(key)
            if proc is None or proc.seq != seq:
                self._cancelled.add((key, seq))
                return
        if not proc.dead:
            threading.Thread(target=proc.kill, args=(JobStatus.CANCELLED.value, why),
                             name="ezpq-cancel", daemon=True).start()

    def skip(self, key: str, seq: int) -> bool:
        """Was job ``seq`` cancelled before runner ``key`` took it?"""
        with self._lock:
            if (key, seq) in self._cancelled:
                self._cancelled.discard((key, seq))
                return True
            return False

    def forget(self, key: str) -> None:
        """Runner ``key`` ended: its cancels that came too late go."""
        with self._lock:
            self._cancelled = {c for c in self._cancelled if c[0] != key}

    def take(self, key: str, seq: Optional[int] = None) -> _Process:
        """An idle process for runner ``key``'s job ``seq`` (a new one if none is)."""
        with self._lock:
            if self._closed or self._lifeline is None:
                raise RuntimeError("the ezpq plugin of this Dask worker is closed")
            while self._idle:
                proc = self._idle.pop()
                if proc.popen.poll() is None:
                    break
                proc.close()
            else:
                proc = _Process(self._lifeline[0])
            proc.key, proc.seq = key, seq
            self._busy[key] = proc
        return proc

    def give_back(self, proc: _Process) -> None:
        with self._lock:
            self._busy.pop(proc.key, None)
            proc.key = proc.seq = None
            proc.stopped = None
            if proc.dead or self._closed:
                dead = True
            else:
                dead = False
                self._idle.append(proc)
        if dead:
            threading.Thread(target=proc.close, name="ezpq-reap", daemon=True).start()


def _plugin(name: str) -> EzpqPlugin:
    """This Dask worker's plugin of that server; attached here if the
    server's registration has not reached it yet (a new scheduler)."""
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if plugin is None:
        plugin = EzpqPlugin(name)
        plugin.setup(worker)
        worker.plugins[name] = plugin
    return plugin


def run_jobs(plugin_name: str, inbox: str, outbox: str, orphan_after: float) -> int:
    """A runner: the Dask task that runs the server's jobs on this worker
    thread, one at a time, each in an ezpq worker process of this host
    (kept by the plugin ``plugin_name``, its server's). Jobs come from the
    queue ``inbox`` (this runner's alone) as ``[seq, fn_blob, args_blob,
    env, as_thread, timeout, max_memory]``; each one's ``[key, seq,
    *HostResult]`` goes to ``outbox``, after its ``[key, None]`` at start
    (ready: no job is chosen for a runner before it runs). A ``None`` (the server retires it)
    ends it; it returns how many jobs it took.

    The server retires an idle runner itself, so a runner waits without a
    timeout of its own but ``orphan_after`` seconds (far longer than the
    server lets one idle): only a runner whose server died waits that long,
    and it then gives its thread back. (A timed-out queue get is logged as
    an error by the scheduler, and a job put as it gave up would be lost:
    both are why the server, not the runner, decides when it ends.)"""
    key = get_worker().get_current_task()
    plugin = _plugin(plugin_name)
    jobs, results = Queue(inbox), Queue(outbox)
    taken = 0
    try:
        results.put([key, None])   # ready: the server picks a job for it only now
        while True:
            try:
                msg = jobs.get(timeout=orphan_after)
            except (TimeoutError, asyncio.TimeoutError):
                return taken
            if msg is None:
                return taken
            taken += 1
            seq, fn_blob, args_blob, env, as_thread, timeout, max_memory = msg
            if plugin.skip(key, seq):
                res = HostResult(JobStatus.CANCELLED.value, -9, None, time.time(), None,
                                 "cancelled by request", None, None, HOST, b"")
            else:
                proc = plugin.take(key, seq)
                try:
                    res = _run(proc, fn_blob, args_blob, env, as_thread, timeout, max_memory)
                finally:
                    plugin.give_back(proc)
            results.put([key, seq, *res])
    finally:
        plugin.forget(key)
        for q in (jobs, results):
            try:
                q.close()
            except Exception:
                pass


async def kill_job(plugin_name: str, key: str, seq: int, why: str, dask_worker=None) -> None:
    """Run on the Dask worker's event loop (``Client.run``; a coroutine, so
    that the server need not wait for it): the server cancelled job ``seq``
    of runner ``key``."""
    plugin = (dask_worker or get_worker()).plugins.get(plugin_name)
    if plugin is not None:
        plugin.kill(key, seq, why)


def _host_env(env: Optional[list]) -> Optional[tuple]:
    """The client's environment as it can apply here: its working directory
    if this host has it, its sys.path then ours (what this host has)."""
    cwd, path = env if env else (None, None)
    if cwd is not None and not os.path.isdir(cwd):
        cwd = None
    path = list(path or []) + [p for p in sys.path if p not in (path or [])]
    return (cwd, path)


def _run(proc: _Process, fn_blob: bytes, args_blob: bytes, env: Optional[list], as_thread: bool,
         timeout: float, max_memory: Optional[int]) -> HostResult:
    log = bytearray()
    pair = (proc.sent & 1) * 2
    if not proc.ready:
        why = _await_ready(proc, log)
        if why is not None:
            proc.kill(JobStatus.LOST.value, why)
            return _ended(proc, None, log, pair)
    env = _host_env(env)
    send_env = None if env == proc.env else env
    proc.env = env
    proc.sent += 1
    data = b"".join(workerproto.encode_job(fn_blob, args_blob, send_env, as_thread))
    start = time.monotonic()
    deadline = start + timeout if timeout else None
    try:
        proc.sock.sendall(data)
    except OSError:
        pass   # its death is read below
    result: Optional[Result] = None
    figures_due = None
    check_memory = start
    while True:
        if proc.stopped is not None:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            proc.kill(JobStatus.TIMEOUT.value, f"timed out after {timeout} s")
            break
        if max_memory and now >= check_memory:
            rss = tree_rss(proc.pid)
            if rss > max_memory:
                proc.kill(JobStatus.KILLED.value, f"killed: memory {rss} bytes passed max_memory={max_memory}")
                break
            check_memory = now + MEMORY_CHECK_INTERVAL
        if figures_due is not None and now >= figures_due:
            proc.kill(JobStatus.FAILED.value, f"protocol violation: no figures within {FIGURES_TIMEOUT:g} s "
                                              f"of its result (the job's worker was killed)")
            break
        wait = 0.5   # a cancel (proc.stopped) is looked at this often at least
        for t in (deadline, figures_due, check_memory if max_memory else None):
            if t is not None:
                wait = min(wait, max(0.0, t - now))
        readable, _, _ = select.select([proc.fd] + proc.outs[pair:pair + 2], [], [], wait)
        for fd in readable:
            if fd != proc.fd:
                _read_output(fd, log)
        if proc.fd not in readable:
            continue
        try:
            data = proc.sock.recv(_READ)
        except OSError:
            data = b""
        if not data:   # the process died under its job
            break
        try:
            messages = proc.reader.feed(data)
        except workerproto.ProtocolError as e:
            proc.kill(JobStatus.FAILED.value, f"protocol violation: {e} (the job's worker was killed)")
            break
        for msg in messages:
            kind = type(msg)
            if kind is Result and result is None:
                result = msg
                if msg.figures is not None:
                    return _done(proc, result, msg.figures, msg.leaving, log, pair)
                figures_due = time.monotonic() + FIGURES_TIMEOUT
            elif kind is LateFigures and result is not None:
                return _done(proc, result, msg.figures, msg.leaving, log, pair)
            else:
                what = "ready" if kind is Ready else "result" if kind is Result else "figures"
                proc.kill(JobStatus.FAILED.value, f"protocol violation: a {what} message out of place "
                                                  f"(the job's worker was killed)")
                break
    return _ended(proc, result, log, pair)


def _await_ready(proc: _Process, log: bytearray) -> Optional[str]:
    """Wait for a fresh process's ``Ready``; the reason if it never comes."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline and proc.stopped is None:
        readable, _, _ = select.select([proc.fd], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
        if not readable:
            continue
        data = proc.sock.recv(_READ)
        if not data:
            return f"the ezpq worker process on {HOST} exited while starting (exit code {proc.popen.poll()})"
        try:
            messages = proc.reader.feed(data)
        except workerproto.ProtocolError as e:
            return f"the ezpq worker process on {HOST} sent garbage while starting: {e}"
        if messages and type(messages[0]) is Ready:
            proc.ready = True
            return None
    return proc.stopped[1] if proc.stopped else f"the ezpq worker process on {HOST} did not start " \
                                                 f"within {BOOT_TIMEOUT:g} s"


def _read_output(fd: int, log: bytearray) -> None:
    for _ in range(16):
        try:
            data = os.read(fd, _READ)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        if len(log) < MAX_OUTPUT:
            log += data[:MAX_OUTPUT - len(log)]
        if len(data) < _READ:
            return


def _drain(proc: _Process, log: bytearray, pair: int) -> bytes:
    for fd in proc.outs[pair:pair + 2]:
        _read_output(fd, log)
    return bytes(log)


def _done(proc: _Process, result: Result, figures, leaving: bool, log: bytearray, pair: int) -> HostResult:
    if leaving:
        proc.dead = True
    return HostResult(result.status, result.exitcode, result.started, result.ended, result.output,
                      result.exception, None if figures is None else tuple(figures), proc.pid, HOST,
                      _drain(proc, log, pair))


def _ended(proc: _Process, result: Optional[Result], log: bytearray, pair: int) -> HostResult:
    """The job ended without its figures: we killed its tree (timeout,
    memory, cancel, a violation), or its process died under it."""
    proc.dead = True
    if proc.stopped is None:   # died by itself: reap it, then say how
        kill_tree([proc.pid])
        try:
            code = proc.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            code = None
        status, signal_name = death(code)
        why = (f"the worker process (pid {proc.pid}) on {HOST} died while running the job "
               f"(exit code {code}{', ' + signal_name if signal_name else ''})")
        return HostResult(status.value, code if code is not None else -9, None, time.time(), None, why,
                          None, proc.pid, HOST, _drain(proc, log, pair))
    try:
        code = proc.popen.wait(2.0)
    except subprocess.TimeoutExpired:
        code = None
    status, why = proc.stopped
    exitcode = code if code is not None and code < 0 else -9
    return HostResult(status, exitcode, None, time.time(), None, why, proc.kill_figures, proc.pid, HOST,
                      _drain(proc, log, pair))
