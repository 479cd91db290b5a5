"""The worker pool: dispatch, results, timeouts, kills and replacements.

One thread (``Supervisor.run``) owns every worker handle and blocks on
``multiprocessing.connection.wait`` over the busy workers' result pipes,
every worker's sentinel and a wakeup pipe, with the nearest job deadline as
its timeout: no polling::

      QueueState ──pick()──> Supervisor ──(seq, fn, args, env)──> worker process
          ^                    │   ^                                   │
          └──── finish() ──────┘   └──── (seq, outcome figures) ───────┘
                                   sentinel fires: worker died → job lost/killed,
                                   worker replaced on the next dispatch

Thread jobs run on threads of this process and report through ``finish``
then ``wake``. A job is stopped (timeout, memory limit, cancel) by killing
its worker's whole process tree in a helper thread; the job's final status
is recorded at that moment, and the dead worker is replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import selectors
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Tuple

import psutil

from . import channel
from .job import JobRecord, JobStatus
from .procutil import kill_tree, tree, tree_rss
from .state import Outcome, QueueState
from .worker import HOST, run_call, thread_cpu, worker_main

logger = logging.getLogger(__name__)

__all__ = ["Supervisor"]

MEMORY_CHECK_INTERVAL = 0.05


@dataclasses.dataclass
class WorkerHandle:
    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    seq: Optional[int] = None          # the job it runs
    deadline: Optional[float] = None   # monotonic time its job times out
    max_memory: Optional[int] = None
    env_id: int = -1                   # the environment last sent to it
    uid: Optional[int] = None          # the user it runs as (None: the server's)
    ready: bool = False                # booted and waiting for a job
    dead: bool = False                 # being killed or gone: never reused
    reader: Optional[channel.Reader] = None   # its result pipe (several messages at a time)
    pending: Optional[tuple] = None    # a result whose figures are on their way

    @property
    def idle(self) -> bool:
        return self.ready and self.seq is None and not self.dead


class Supervisor:
    """Runs the state's jobs on ``slots`` concurrent workers."""

    def __init__(self, state: QueueState, slots: int, start_method: Optional[str] = None,
                 envs: Optional[Dict[int, Tuple[str, list]]] = None, shared: bool = False):
        self.state = state
        self.slots = slots
        self.shared = shared                # thread jobs go to worker processes, not our threads
        self.as_root = shared and os.geteuid() == 0   # run each job as its submitter
        self.demand: set = set()            # run-as uids with a runnable job and no idle worker
        self.ctx = multiprocessing.get_context(start_method)
        self.envs = envs if envs is not None else {}
        self.workers: List[WorkerHandle] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()   # kept across loops: no per-job setup
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._woken = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle
    def start(self, prestart: bool = True) -> None:
        with self.state.cond:
            for _ in range(self.slots if prestart else 0):
                self._start_worker(None)
        self._thread = threading.Thread(target=self.run, name="ezpq-supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make the supervisor look at the state again (called by any thread)."""
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    def dispatch_now(self) -> None:
        """Start waiting jobs from the calling thread (a client's put), saving
        the hand-off to the supervisor thread; wake it only when it must
        recompute its timeout or watch a new worker."""
        with self.state.cond:
            if self._stopping:
                return
            before = len(self.workers)
            self._dispatch()
            if len(self.workers) != before or self._has_limits():
                self.wake()

    def set_slots(self, n: int) -> None:
        with self.state.cond:
            self.slots = n
        self.wake()

    def stop(self) -> None:
        """Stop running jobs (recorded as lost), end every worker, join the thread."""
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(10)
        with self.state.cond:
            workers = list(self.workers)
            for w in workers:
                self._flush_pending(w)
                if w.seq is not None and not w.dead:
                    self._finalize(w, JobStatus.LOST, -signal.SIGTERM, "the server stopped while it ran")
        kill_tree([p for w in workers for p in tree(w.proc.pid)], grace=0.2)
        for w in workers:
            w.proc.join(1)
            w.conn.close()
        self.workers.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        while not self._stopping:
            with self.state.cond:
                timeout = self._next_timeout()
            events = self._selector.select(timeout)
            if self._stopping:
                break
            with self.state.cond:
                for key, _ in events:
                    kind, w = key.data
                    if kind == "wake":
                        # drain first, then clear: a wake() skipped in between
                        # changed the state before the dispatch below, so none is lost
                        os.read(self._wake_r, 4096)
                        self._woken = False
                    elif kind == "conn" and not w.dead:
                        try:
                            messages = w.reader.read()
                        except (EOFError, OSError):
                            continue  # the sentinel reports the death
                        for msg in messages:
                            if msg == "ready":
                                w.ready = True
                            else:
                                self._on_result(w, msg)
                for key, _ in events:
                    kind, w = key.data
                    if kind == "sentinel":
                        self._on_death(w)
            self.state.outbox.deliver()  # answers our results made possible, outside the lock
            with self.state.cond:
                if self.state.kill_requests or self._has_limits():
                    self._enforce_limits()
                self._dispatch()
            self.state.outbox.deliver()

    def _has_limits(self) -> bool:
        """Is some running job under a deadline or a memory cap?"""
        return any(w.deadline or w.max_memory for w in self.workers)

    def _next_timeout(self) -> Optional[float]:
        deadlines = [w.deadline for w in self.workers if w.deadline is not None and not w.dead]
        timeout = None
        if deadlines:
            timeout = max(0.0, min(deadlines) - time.monotonic())
        if any(w.max_memory for w in self.workers if w.seq is not None and not w.dead):
            timeout = MEMORY_CHECK_INTERVAL if timeout is None else min(timeout, MEMORY_CHECK_INTERVAL)
        return timeout

    # ------------------------------------------------------------- dispatch
    def _live(self) -> List[WorkerHandle]:
        return [w for w in self.workers if not w.dead]

    def _run_as(self, rec: JobRecord) -> Optional[int]:
        """The uid a job's worker must run as (None: the server's own)."""
        return rec.uid if self.as_root and rec.uid not in (None, 0) else None

    def _dispatch(self) -> None:
        """Start waiting jobs while slots are free. Caller holds the lock.

        A process job goes only to a ready worker of its user, so its timeout
        counts from the moment it really starts; a job whose user has no
        idle worker waits while one boots, and others may go first."""
        def runnable(rec: JobRecord) -> bool:
            if rec.runner == "thread" and not self.shared:
                return True
            uid = self._run_as(rec)
            if any(w.idle and w.uid == uid for w in self.workers):
                return True
            self.demand.add(uid)
            return False

        while self.state.n_running < self.slots:
            rec = self.state.pick(runnable)
            if rec is None:
                break
            if rec.runner == "thread" and not self.shared:
                self._start_thread_job(rec)
            else:
                uid = self._run_as(rec)
                self._send(rec, next(w for w in self.workers if w.idle and w.uid == uid))
        self._top_up()

    def _top_up(self) -> None:
        """Start a worker for each user who waits for one (making room by
        retiring idle workers of others); keep the pool at ``slots``."""
        live = self._live()
        for uid in sorted(self.demand, key=lambda u: -1 if u is None else u):
            if any(w.uid == uid and w.seq is None for w in live):
                continue  # one is idle or booting
            if len(live) >= self.slots:
                victim = next((w for w in live if w.seq is None and w.uid not in self.demand), None)
                if victim is None:
                    continue
                self._retire(victim)
                live.remove(victim)
            live.append(self._start_worker(uid))
        self.demand.clear()
        surplus = len(live) - self.slots
        for w in [w for w in live if w.seq is None][:max(0, surplus)]:
            self._retire(w)

    def _send(self, rec: JobRecord, worker: WorkerHandle) -> None:
        env = None
        if worker.env_id != rec.env_id:
            env = self.envs.get(rec.env_id)
            worker.env_id = rec.env_id
        worker.seq = rec.seq
        worker.deadline = time.monotonic() + rec.timeout if rec.timeout else None
        worker.max_memory = rec.max_memory
        rec.pid, rec.host = worker.proc.pid, HOST
        try:
            channel.send(worker.conn, (rec.seq, rec.fn_blob, rec.args_blob, env, rec.runner == "thread"))
        except (OSError, EOFError):
            pass  # the worker died; its sentinel reports the job as lost

    def _start_worker(self, uid: Optional[int] = None) -> WorkerHandle:
        parent_conn, child_conn = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker_main, args=(child_conn, uid), name="ezpq-worker")
        proc.start()
        child_conn.close()
        w = WorkerHandle(proc, parent_conn, uid=uid, reader=channel.Reader(parent_conn))
        self._selector.register(parent_conn, selectors.EVENT_READ, ("conn", w))
        self._selector.register(proc.sentinel, selectors.EVENT_READ, ("sentinel", w))
        self.workers.append(w)
        logger.debug("started worker %s", proc.pid)
        return w

    def _retire(self, w: WorkerHandle) -> None:
        w.dead = True
        try:
            w.conn.send(None)
        except (OSError, EOFError):
            pass

    def _start_thread_job(self, rec: JobRecord) -> None:
        rec.pid, rec.host = os.getpid(), HOST
        threading.Thread(target=self._run_thread_job, args=(rec.seq, rec.fn_blob, rec.args_blob),
                         name=f"ezpq-job-{rec.qid}-{rec.id}", daemon=True).start()

    def _run_thread_job(self, seq: int, fn_blob: bytes, args_blob: bytes) -> None:
        u0, s0 = thread_cpu()
        status, exitcode, out, exc = run_call(fn_blob, args_blob)
        u1, s1 = thread_cpu()
        self.state.finish(seq, Outcome(status, exitcode, out, exc, u1 - u0, s1 - s0,
                                       pid=os.getpid(), host=HOST))
        self.wake()

    # -------------------------------------------------------------- results
    def _on_result(self, w: WorkerHandle, msg: tuple) -> None:
        """Worker ``w`` finished a job. Caller holds the lock.

        A measured job's result comes in two messages: the result, then its
        figures (the worker measures after sending the result, so measuring
        costs the result no time). In between the job stays working but
        gives back its slot and its worker (which reads its next job only
        after sending the figures); it completes with the figures."""
        if len(msg) == 2:  # (seq, figures) of the result before
            seq, figures = msg
            if w.pending is not None and w.pending[0] == seq:
                self._complete(w, w.pending, figures)
            return
        if w.seq == msg[0]:
            w.seq = w.deadline = w.max_memory = None
        if msg[-1] is None:  # figures follow: free the worker for its next job now
            w.pending = msg
            self.state.release(msg[0])
            return
        self._complete(w, msg, msg[-1])

    def _complete(self, w: WorkerHandle, result: tuple, figures: Optional[tuple]) -> None:
        seq, status, exitcode, out, exc, pid, started, ended, _ = result
        if w.pending is result:
            w.pending = None
        cpu_u, cpu_s, rss, method, rss_ch = figures or (None,) * 5
        self.state.finish(seq, Outcome(JobStatus(status), exitcode, out, exc, cpu_u, cpu_s,
                                       rss, method, rss_ch, pid=pid, host=HOST, started=started,
                                       ended=ended))

    def _on_death(self, w: WorkerHandle) -> None:
        """A worker process ended. Caller holds the lock."""
        w.proc.join(0.1)
        code = w.proc.exitcode
        self._flush_pending(w)
        if w.seq is not None and not w.dead:
            status = JobStatus.KILLED if code is not None and code < 0 else JobStatus.LOST
            self._finalize(w, status, code if code else -signal.SIGKILL,
                           f"the worker process (pid {w.proc.pid}) died while running the job "
                           f"(exit code {code})")
            logger.warning("worker %s died with exit code %s", w.proc.pid, code)
        w.dead = True
        for obj in (w.conn, w.proc.sentinel):
            try:
                self._selector.unregister(obj)
            except (KeyError, ValueError):
                pass
        w.conn.close()
        self.workers.remove(w)
        if w.uid is None and not self._stopping:
            self.demand.add(None)  # keep the pool full: replace it now

    def _finalize(self, w: WorkerHandle, status: JobStatus, exitcode: int, why: str) -> None:
        """Record the outcome of the job on a worker we lost (its pending
        result, if any, was flushed first)."""
        seq = w.seq
        w.seq = w.deadline = w.max_memory = None
        rec = self.state.records.get(seq)
        if rec is not None:
            self.state.finish(seq, Outcome(status, exitcode, exception=why, pid=w.proc.pid, host=HOST))

    def _flush_pending(self, w: WorkerHandle) -> None:
        """A worker that will send nothing more: its last result completes
        without the figures that were to follow."""
        if w.pending is not None:
            self._complete(w, w.pending, None)

    # --------------------------------------------------------------- limits
    def _enforce_limits(self) -> None:
        """Kill jobs past their timeout or memory limit, or asked to stop."""
        now = time.monotonic()
        for seq, status, why in self.state.take_kill_requests():
            w = next((w for w in self._live() if w.seq == seq), None)
            if w is not None:
                self._kill(w, status, why)
        for w in self._live():
            if w.seq is None:
                continue
            if w.deadline is not None and now >= w.deadline:
                rec = self.state.records.get(w.seq)
                timeout = rec.timeout if rec else "?"
                self._kill(w, JobStatus.TIMEOUT, f"timed out after {timeout} s")
            elif w.max_memory:
                rss = tree_rss(w.proc.pid)
                if rss > w.max_memory:
                    self._kill(w, JobStatus.KILLED,
                               f"killed: memory {rss} bytes passed max_memory={w.max_memory}")

    def _kill(self, w: WorkerHandle, status: JobStatus, why: str) -> None:
        """Stop a job by killing its worker's process tree, in a helper thread.

        The job stays working until the tree is gone; then its outcome is
        recorded with the signal that ended the worker, and any survivor is
        named in ``exception``. The worker is never reused."""
        self._flush_pending(w)
        procs = tree(w.proc.pid)
        seq, pid = w.seq, w.proc.pid
        w.seq = w.deadline = w.max_memory = None
        w.dead = True
        threading.Thread(target=self._kill_and_record,
                         args=(seq, pid, procs, status, why, time.time()),
                         name="ezpq-kill", daemon=True).start()

    def _kill_and_record(self, seq: int, pid: int, procs: List[psutil.Process],
                         status: JobStatus, why: str, ended: float) -> None:
        survivors = kill_tree(procs)
        code = next((p.returncode for p in procs if p.pid == pid and getattr(p, "returncode", None)), None)
        exitcode = code if code is not None and code < 0 else -signal.SIGTERM
        if survivors:
            why += f"; processes {survivors} survived SIGKILL"
            logger.error("job %s: %s", seq, why)
        self.state.finish(seq, Outcome(status, exitcode, exception=why, pid=pid, host=HOST,
                                       ended=ended))
        self.wake()
