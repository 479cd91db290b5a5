"""The worker pool: dispatch, results, timeouts, kills and replacements.

One thread (``Supervisor.run``) owns every worker handle and waits in a
selector on the workers' channels, a pidfd per worker (readable when it
exits) and a wakeup pipe, with the nearest deadline as its timeout: no
polling::

      QueueState ──pick()──> Supervisor ──RunJob (workerproto)──> worker process
          ^                    │   ^                                    │
          └─ finish(Outcome) ──┘   └──── Result, LateFigures ───────────┘
                                   pidfd fires: worker died → job lost/killed,
                                   its orphans killed, worker replaced

The trust boundary (a worker runs untrusted code, in the same process that
talks to us):

- Nothing a worker sends is unpickled here: ``workerproto`` messages are
  plain fields plus opaque bytes, checked strictly. A worker may report
  only on the job we gave it; we never believe an id it claims. Garbage, a
  message in the wrong phase, an oversize frame, or a frame begun and not
  finished within ``STALL_TIMEOUT`` ends that worker's whole tree and its
  job is ``failed`` with "protocol violation: ...".
- We never block on a worker, and never do I/O under the state lock:
  channels are non-blocking; reads happen outside the lock and are applied
  under it; a dispatch (also ``dispatch_now`` on a client's thread) queues
  the job's bytes in the worker's output buffer (one job at most) and
  writes them outside the lock, the rest on EVENT_WRITE. A stopped worker
  stalls only its own job.
- A worker for another uid than ours is an exec'd interpreter (see
  worker/run.py), never a fork of this process.
- A job is stopped (timeout, memory limit, cancel, violation) by stopping
  then killing its worker's whole tree in a helper thread; ``exitcode`` is
  the signal that really ended the worker (-9). When a worker dies with a
  job, the processes it left behind (re-parented to us: the server is a
  child subreaper) are killed and named in ``exception``.
- A result is the job's word until its figures follow (a job can write a
  RESULT of its own and run on): its slot is given back at the result, but
  its timeout, memory limit and cancel hold until the figures arrive
  (within ``FIGURES_TIMEOUT``). A kill in that window is that job's fate;
  the job handed to the same worker meanwhile never started and goes back
  to waiting (``QueueState.requeue``); its own limits count from the figures.
- A job can also forge its figures, and then the worker looks idle while
  the job runs on. So for another user's worker, what the server counts is
  read from outside (``meter.ProcMeter``, /proc): the figures of each job
  (the worker's own are only compared), and, while the worker is idle, its
  CPU: an idle worker (and its processes) that used more than
  ``IDLE_CPU_BUDGET`` since a first look ``IDLE_CHECK_INTERVAL`` after its
  job, or that still has processes at a later look, is a violation and is
  killed (a rogue runs for about two intervals). These looks are timers of
  such idle workers only: a queue without them makes no wake-up.
- A worker told to stop (retired) or that leaves by itself and is still
  there ``RETIRE_GRACE`` s later is killed with its tree.

Thread jobs run on threads of this process and report through ``finish``
then ``wake``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Tuple

from ..worker import workerproto
from ..job import JobRecord, JobStatus, Phase, death
from ..stdlib_private import mp_helper_pids
from ..messages import NO_FIGURES, Env, Figures, LateFigures, Outcome, Ready, Result
from ..worker.meter import MARK_SIZE, TICKS, ProcMeter, mark_figures
from ..worker.procutil import become_subreaper, child_pids, is_alive, kill_tree, tree_rss
from .joblogs import Echo, LogBook
from .ratelimit import RateLimitedLog
from .state import QueueState
from ..worker.run import HOST, exec_argv, run_call, thread_cpu, worker_main

#: a worker's two statuses (workerproto.STATUSES) as the state's, without an Enum call per job
_WORKER_STATUS = {status: JobStatus(status) for status in workerproto.STATUSES}

logger = logging.getLogger(__name__)

__all__ = ["Supervisor"]

MEMORY_CHECK_INTERVAL = 0.05
MAX_SELECT_TIMEOUT = 3600.0   # seconds; see _next_timeout
#: after 3 workers of a user died while starting, that user's jobs fail
#: (with the reason) for this long instead of starting worker after worker
BOOT_RETRY = 10.0
#: a frame begun must make progress within this (a healthy worker writes a
#: whole frame at once; a job writing half a header must not hold its slot)
STALL_TIMEOUT = 2.0
#: a result's figures must follow within this (a healthy worker measures
#: with a few system calls and sends them microseconds later)
FIGURES_TIMEOUT = 5.0
#: a worker sent STOP (or that said it leaves) is killed if still there then
RETIRE_GRACE = 3.0
#: another user's idle worker: how often its CPU is looked at, and how much
#: it may use (a healthy idle worker uses none: every thread of it blocks)
IDLE_CHECK_INTERVAL = 1.0
IDLE_CPU_BUDGET = 0.1
_IDLE_SLACK = IDLE_CHECK_INTERVAL / 4   # looks this close are done in one wake-up
_READ_CHUNK = 1 << 16    # below malloc's mmap threshold: no mmap/mremap/munmap per read
_READS_PER_EVENT = 16   # (1 MiB) then let the others have their turn
_IOV_MAX = 512


def _kill_and_reap(orphans: List[int], live: List[int], in_hand: set) -> None:
    """Kill ``live`` (and their trees), then collect every one of ``orphans``
    (our children by adoption: nobody else waits for them); until then they
    are ``in_hand``, so that no other sweep signals a pid reaped meanwhile."""
    try:
        left = kill_tree(live) if live else []
        for pid in orphans:
            try:
                os.waitpid(pid, 0 if pid in live and pid not in left else os.WNOHANG)
            except ChildProcessError:
                pass
    finally:
        in_hand.difference_update(orphans)


class Returned(NamedTuple):
    """A job whose worker sent its ``Result`` and whose figures are due
    (``WorkerHandle.pending``): the supervisor's own note, never sent."""
    seq: int
    result: Result


class WorkerProcess:
    """A worker process however it was started (multiprocessing or exec):
    its pid, a pidfd that becomes readable when it exits (a multiprocessing
    sentinel would wait for every process that inherited it), its exit code."""

    def __init__(self, obj: Any):
        self._obj = obj
        self.pid: int = obj.pid
        try:
            self.sentinel: int = os.pidfd_open(self.pid)
            self._own_sentinel = True
        except (AttributeError, OSError):
            self.sentinel = obj.sentinel
            self._own_sentinel = False

    def exitcode(self, timeout: float = 0.0) -> Optional[int]:
        if isinstance(self._obj, subprocess.Popen):
            try:
                return self._obj.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        self._obj.join(timeout)
        return self._obj.exitcode

    def close(self) -> None:
        if self._own_sentinel:
            try:
                os.close(self.sentinel)
            except OSError:
                pass


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    proc: Optional[WorkerProcess]
    conn: Any                          # owns the channel's descriptor (Connection or socket)
    seq: Optional[int] = None          # the job it runs (ours to know, never the worker's)
    deadline: Optional[float] = None   # monotonic time its job times out
    max_memory: Optional[int] = None
    env_id: int = -1                   # the environment last sent to it
    uid: Optional[int] = None          # the user it runs as (None: the server's)
    ready: bool = False                # booted and waiting for a job
    dead: bool = False                 # being killed or gone: never reused
    pending: Optional[Returned] = None  # the job whose figures are on their way
    pending_deadline: Optional[float] = None   # that job's limits, which hold until its figures
    pending_memory: Optional[int] = None
    figures_due: float = 0.0           # monotonic time its figures must have come by
    retire_by: Optional[float] = None  # retired (or leaving): killed if still there then
    gauge: Optional[ProcMeter] = None  # another user's worker, read from outside
    mark: Any = None                   # ours: its meter's shared baseline (meter.mark_figures)
    idle_check: Optional[float] = None  # (idle, another user's) next look at its CPU
    idle_cpu: Optional[int] = None     # its CPU ticks at the first look
    reader: Optional[workerproto.FrameReader] = None
    fd: int = -1
    last_rx: float = 0.0               # monotonic time bytes last came in
    out: Deque[memoryview] = dataclasses.field(default_factory=collections.deque)
    out_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    events: int = selectors.EVENT_READ  # what the selector watches on fd
    eof: bool = False
    broken: bool = False               # a write to it failed
    #: the read ends of its output pipes (joblogs.py): [stdout, stderr] for
    #: odd jobs, then for even ones (a job's late bytes never reach the next job's log)
    outs: List[Any] = dataclasses.field(default_factory=list)
    sinks: List[Optional[JobRecord]] = dataclasses.field(default_factory=lambda: [None, None])   # whose each pair is
    sent: int = 0                      # jobs sent to it (the parity picks the pipes)
    outs_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def idle(self) -> bool:
        return self.ready and self.seq is None and not self.dead


class Supervisor:
    """Runs the state's jobs on ``slots`` concurrent workers.

    ``max_message``: the largest message a worker may send (a result's
    output included). ``subreaper``: make this process a child subreaper so
    that a worker's orphans come back to us and are killed (the server
    process sets it; never inside a test runner). ``logs``: capture each
    job's stdout and stderr there (None: a worker's output goes where ours
    does); ``echo``: also copy it to our own stdout/stderr (a private
    server: its client's terminal, as before logs existed)."""

    def __init__(self, state: QueueState, slots: int, start_method: Optional[str] = None,
                 shared: bool = False,
                 max_message: int = workerproto.DEFAULT_MAX_MESSAGE, subreaper: bool = False,
                 logs: Optional[LogBook] = None, echo: bool = False):
        if not isinstance(max_message, int) or isinstance(max_message, bool) or not 0 < max_message < 1 << 32:
            raise ValueError(f"max_message must be a positive int below 4 GiB, not {max_message!r}")
        self.state = state
        self.slots = slots
        self.shared = shared                # thread jobs go to worker processes, not our threads
        self.as_root = shared and os.geteuid() == 0   # run each job as its submitter
        self.max_message = max_message
        self.subreaper = subreaper and become_subreaper()
        self.accounting = os.environ.get("EZPQ_ACCOUNTING", "1") != "0"
        self.logs = logs
        self.echo = Echo() if echo and logs is not None else None
        self.demand: set = set()            # run-as uids with a runnable job and no idle worker
        self.ctx = multiprocessing.get_context(start_method)
        self.envs: Dict[int, Env] = {}   # env_id -> (cwd, sys.path): kept by the Service
        self.workers: List[WorkerHandle] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._lifeline_r: Optional[Any] = None   # workers' read end; we hold the write end
        self._lifeline_w: Optional[Any] = None
        self._selector = selectors.DefaultSelector()   # kept across loops: no per-job setup
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._woken = False
        self._stopping = False
        self._queued: List[WorkerHandle] = []   # workers with bytes to write (lock held to add)
        self._rearm = False     # EVENT_WRITE interest must be recomputed (_watch_writes)
        self._suspect = False   # some channel has a frame begun or failed a write (_check_stalls)
        self._thread: Optional[threading.Thread] = None
        self._thread_jobs = 0                   # thread jobs running in this process
        self._orphans_in_hand: set = set()      # adopted processes being killed and reaped
        self._boot_failures: Dict[Optional[int], Tuple[int, float, str]] = {}  # uid: (n, when, why)
        #: what a job can trigger: 10 lines, then one a minute
        self._job_log = RateLimitedLog(logger, rate=1 / 60, burst=10)
        self._due: Optional[float] = None   # the nearest timer (_next_timeout)

    # ------------------------------------------------------------ lifecycle
    def start(self, prestart: bool = True) -> None:
        self._lifeline_r, self._lifeline_w = self.ctx.Pipe(duplex=False)
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
        recompute its timeout or watch a new worker. The job's bytes are
        written after the lock is released, without blocking."""
        with self.state.cond:
            if self._stopping:
                return
            before = len(self.workers)
            self._dispatch()
            if len(self.workers) != before or self._has_limits():
                self.wake()
            queued, self._queued = self._queued, []
        if queued:
            self._flush(queued)

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
                    self._finalize(w, JobStatus.LOST, -signal.SIGKILL, "the server stopped while it ran")
        kill_tree([w.proc.pid for w in workers])
        for w in workers:
            w.proc.exitcode(1)
            w.proc.close()
            self._drain_outputs(w)
            self._close_channel(w)
            self._drop_gauge(w)
        self._reap_orphans(wait=True)
        self.workers.clear()
        for conn in (self._lifeline_r, self._lifeline_w):
            if conn is not None:
                conn.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.echo is not None:
            self.echo.close()

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        with self.state.cond:
            timeout = self._next_timeout()
        while not self._stopping:
            events = self._selector.select(timeout)
            if self._stopping:
                break
            inbox = []
            deaths = []
            grown = False
            for key, mask in events:
                kind, w = key.data
                if kind == "out":   # a job's output: to its log, outside the lock
                    grown = self._read_output(*w) or grown
                elif kind == "wake":
                    # drain first, then clear: a wake() skipped in between
                    # changed the state before the dispatch below, so none is lost
                    os.read(self._wake_r, 4096)
                    self._woken = False
                elif kind == "conn":
                    if mask & selectors.EVENT_WRITE:
                        self._flush([w])
                    if mask & selectors.EVENT_READ:
                        inbox.append((w,) + self._read(w))   # outside the lock; a dead one's is dropped
                elif kind == "sentinel":
                    deaths.append(w)
                    grown = self._drain_outputs(w) or grown   # its last words, before its job ends
            # one hold of the state's lock per round: results in, limits,
            # dispatch, the next timer; letting it go sends the answers our
            # results made possible (StateLock), then the jobs go out
            with self.state.cond:
                if grown:   # a follower waits for these bytes (waits.py)
                    self.state._changed()
                for w, messages, error in inbox:
                    if not w.dead:
                        self._apply(w, messages, error)
                if self._suspect:   # a frame begun, or a write that failed
                    self._check_stalls()
                for w in deaths:
                    self._on_death(w)
                if (self.state.kill_requests or self._has_limits()
                        or (self._due is not None and time.monotonic() >= self._due)):
                    self._enforce_limits()
                self._dispatch()
                queued, self._queued = self._queued, []
                timeout = self._next_timeout()
                if self._rearm:   # only when a flush left bytes behind or emptied them
                    self._rearm = False
                    self._watch_writes()
            if queued:
                self._flush(queued)
            if self.logs is not None and self.logs.doomed:   # forgotten jobs' logs
                self.logs.sweep()

    def _has_limits(self) -> bool:
        """Is some job under a deadline or a memory cap (its figures due or not)?"""
        for w in self.workers:   # (a loop, not any(): this runs every round)
            if w.deadline or w.max_memory or w.pending_deadline or w.pending_memory:
                return True
        return False

    def _next_timeout(self) -> Optional[float]:
        """Seconds until the nearest timer (also kept in ``_due``): a job's
        deadline (while its figures are due: theirs, and the job's own), a
        stalled frame, a retired worker's grace, an idle look; or the memory
        check's interval while a job has a cap. None when there is none."""
        due = None
        poll = False
        for w in self.workers:
            if w.dead:
                t = w.retire_by
            elif w.pending is not None:
                t = w.figures_due
                if w.pending_deadline is not None and w.pending_deadline < t:
                    t = w.pending_deadline
                poll = poll or bool(w.pending_memory)
            elif w.seq is not None:
                t = w.deadline
                poll = poll or bool(w.max_memory)
            else:
                t = w.idle_check
            if t is not None and (due is None or t < due):
                due = t
            if not w.dead and w.reader is not None and w.reader.partial:
                t = w.last_rx + STALL_TIMEOUT
                if due is None or t < due:
                    due = t
        self._due = due
        timeout = None if due is None else max(0.0, due - time.monotonic())
        if poll:
            timeout = MEMORY_CHECK_INTERVAL if timeout is None else min(timeout, MEMORY_CHECK_INTERVAL)
        if timeout is not None:
            # epoll's timeout is an int of milliseconds: past ~24.8 days it
            # overflows; a far deadline is simply looked at again later
            timeout = min(timeout, MAX_SELECT_TIMEOUT)
        return timeout

    # ---------------------------------------------------------- channel I/O
    def _read(self, w: WorkerHandle) -> Tuple[list, Optional[str]]:
        """Whatever the worker sent, without blocking: (messages, violation)."""
        messages: list = []
        for _ in range(_READS_PER_EVENT):
            try:
                data = os.read(w.fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                # EOF: stop watching (it would fire forever); its pidfd reports the death
                w.eof = True
                self._unwatch(w.fd)
                break
            w.last_rx = time.monotonic()
            try:
                messages += w.reader.feed(data)
            except workerproto.ProtocolError as e:
                return messages, str(e)
            if w.reader.partial:
                self._suspect = True
            if len(data) < _READ_CHUNK:
                break
        return messages, None

    def _read_output(self, w: WorkerHandle, i: int, ours: bool = True) -> bool:
        """Bytes on ``w``'s output pipe ``i``, without blocking, to the log of
        the job that pipe belongs to (and our own stdout/stderr when we echo).
        True when a log grew. Outside the state's lock, on the supervisor
        thread, or (``ours`` False) a kill's helper thread, which leaves the
        selector and the descriptors to the supervisor."""
        grown = False
        with w.outs_lock:
            if i >= len(w.outs) or w.outs[i] is None:
                return False
            fd = w.outs[i].fileno()
            for _ in range(_READS_PER_EVENT):
                try:
                    data = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:   # every writer is gone: stop watching it
                    if not ours:
                        break
                    self._unwatch(fd)
                    w.outs[i].close()
                    w.outs[i] = None
                    break
                rec = w.sinks[i >> 1]
                if rec is not None and rec.phase is not Phase.GONE:
                    # its log is made at its first byte: a job that prints
                    # nothing costs no object (100,000 of them: GC time)
                    grown = self.logs.append(self.logs.sink(rec.seq, rec.uid), data) or grown
                    if rec.phase is Phase.GONE:   # forgotten meanwhile: the file goes too
                        self.logs.forget(rec.seq)
                if self.echo is not None:
                    self.echo.put(i & 1, data)
                if len(data) < _READ_CHUNK:
                    break
        return grown

    def _drain_outputs(self, w: WorkerHandle, ours: bool = True) -> bool:
        """Whatever ``w``'s pipes hold now (it died or was killed)."""
        grown = False
        for i in range(len(w.outs)):
            grown = self._read_output(w, i, ours) or grown
        return grown

    def _output_pipes(self) -> Tuple[list, list]:
        """A new worker's output pipes: (read ends, write ends), as
        multiprocessing connections (they cross to a spawned worker)."""
        reads, writes = [], []
        try:
            for _ in range(4):
                r, wr = self.ctx.Pipe(duplex=False)
                os.set_blocking(r.fileno(), False)
                reads.append(r)
                writes.append(wr)
        except BaseException:
            for c in reads + writes:
                c.close()
            raise
        return reads, writes

    def _flush(self, workers: List[WorkerHandle]) -> None:
        """Write queued bytes without blocking; what is left waits for
        EVENT_WRITE (the supervisor thread watches it, see _watch_writes)."""
        for w in workers:
            with w.out_lock:
                out = w.out
                if w.fd < 0:   # closed meanwhile: never write to a reused number
                    out.clear()
                while out:
                    try:
                        n = os.write(w.fd, out[0]) if len(out) == 1 else os.writev(w.fd, list(out)[:_IOV_MAX])
                    except BlockingIOError:
                        break
                    except OSError:
                        # gone (its pidfd reports the job), or its job shut the
                        # channel down: the supervisor ends it (_check_stalls)
                        out.clear()
                        w.broken = True
                        self._suspect = True
                        self.wake()
                        break
                    while n:
                        head = out[0]
                        if n >= len(head):
                            n -= len(head)
                            out.popleft()
                        else:
                            out[0] = head[n:]
                            n = 0
                left = bool(out)
            if left != bool(w.events & selectors.EVENT_WRITE):
                self._rearm = True
                self.wake()   # the supervisor thread (re)arms EVENT_WRITE

    def _watch_writes(self) -> None:
        """Watch EVENT_WRITE exactly on workers with bytes queued. Caller holds the lock."""
        for w in self.workers:
            if w.eof or w.fd < 0:
                continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if w.out and not w.dead else 0)
            if want != w.events:
                try:
                    self._selector.modify(w.fd, want, ("conn", w))
                    w.events = want
                except (KeyError, ValueError, OSError):
                    pass

    def _queue(self, w: WorkerHandle, buffers: List[bytes]) -> None:
        """Queue a message for ``w``; written after the lock is released. Caller holds the lock."""
        with w.out_lock:
            w.out.extend(memoryview(b) for b in buffers)
        self._queued.append(w)

    def _unwatch(self, obj) -> None:
        try:
            self._selector.unregister(obj)
        except (KeyError, ValueError, OSError):
            pass

    def _close_channel(self, w: WorkerHandle) -> None:
        with w.out_lock:   # a client thread may be flushing to it
            fd, w.fd = w.fd, -1
            w.out.clear()
        with w.outs_lock:
            for i, c in enumerate(w.outs):
                if c is not None:
                    self._unwatch(c.fileno())
                    c.close()
                    w.outs[i] = None
        if fd >= 0:
            self._unwatch(fd)
        try:
            w.conn.close()
        except OSError:
            pass

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
            if self._idle_worker(uid) is not None or self._cannot_boot(uid):
                return True
            self.demand.add(uid)
            return False

        while self.state.n_running < self.slots:
            rec = self.state.pick(runnable)
            if rec is None:
                break
            if rec.runner == "thread" and not self.shared:
                self._start_thread_job(rec)
                continue
            uid = self._run_as(rec)
            worker = self._idle_worker(uid)
            if worker is None:  # its user's workers die while starting: say so, do not loop
                rec.pid, rec.host = None, HOST
                self.state.finish(rec.seq, Outcome(JobStatus.FAILED, 1, exception=self._boot_failures[uid][2]))
                continue
            self._send(rec, worker)
        self._top_up()

    def _idle_worker(self, uid: Optional[int]) -> Optional[WorkerHandle]:
        """A ready worker of ``uid`` with no job, if any."""
        for w in self.workers:
            if w.uid == uid and w.idle:
                return w
        return None

    def _cannot_boot(self, uid: Optional[int]) -> bool:
        """Have this user's last workers died before they were ready (3 in a
        row, the last within BOOT_RETRY s)? Its jobs then fail with the
        reason instead of waiting for a worker that never comes."""
        failures = self._boot_failures.get(uid)
        return (failures is not None and failures[0] >= 3
                and time.monotonic() - failures[1] < BOOT_RETRY)

    def _top_up(self) -> None:
        """Start a worker for each user who waits for one (making room by
        retiring idle workers of others); keep the pool at ``slots``."""
        if not self.demand and len(self.workers) <= self.slots:
            return   # the usual round: nobody waits for a worker, none too many
        live = self._live()
        for uid in sorted(self.demand, key=lambda u: -1 if u is None else u):
            if any(w.uid == uid and w.seq is None for w in live) or self._cannot_boot(uid):
                continue  # one is idle or booting, or none can start now
            if len(live) >= self.slots:
                victim = next((w for w in live if w.seq is None and w.pending is None
                               and w.uid not in self.demand), None)
                if victim is None:
                    continue
                self._retire(victim)
                live.remove(victim)
            try:
                live.append(self._start_worker(uid))
            except OSError as e:
                logger.error("cannot start a worker for uid %s: %s", uid, e)
        self.demand.clear()
        surplus = len(live) - self.slots
        for w in [w for w in live if w.seq is None and w.pending is None][:max(0, surplus)]:
            self._retire(w)

    def _send(self, rec: JobRecord, worker: WorkerHandle) -> None:
        env = None
        if worker.env_id != rec.env_id:
            env = self.envs.get(rec.env_id)
            worker.env_id = rec.env_id
        worker.seq = rec.seq
        worker.deadline = time.monotonic() + rec.timeout if rec.timeout else None
        worker.max_memory = rec.max_memory
        worker.idle_check = None
        rec.pid, rec.host = worker.proc.pid, HOST
        if worker.outs:   # the worker takes the other pair of pipes for each job
            worker.sinks[worker.sent & 1] = rec
            worker.sent += 1
        self._queue(worker, workerproto.encode_job(rec.fn_blob, rec.args_blob, env, rec.runner == "thread"))

    def _start_worker(self, uid: Optional[int] = None) -> WorkerHandle:
        """A new worker for ``uid`` (None: our own user). Caller holds the lock.

        Another user's worker is exec'd (subprocess, close_fds, only its
        channel and the lifeline passed, an environment of nothing but
        PATH); ours is started by multiprocessing with the configured
        start method and closes what it inherited itself."""
        outs, out_w = self._output_pipes() if self.logs is not None else ([], [])
        mark = None
        try:
            if uid is None:
                parent_conn, child_conn = self.ctx.Pipe()
                mark = self.ctx.RawArray("d", MARK_SIZE) if self.accounting else None
                proc = self.ctx.Process(target=worker_main, name="ezpq-worker",
                                        args=(child_conn, self._lifeline_r, self.accounting, mark, out_w))
                proc.start()
                child_conn.close()
                conn, fd = parent_conn, parent_conn.fileno()
                handle = WorkerProcess(proc)
            else:
                ours, theirs = socket.socketpair()
                try:
                    lifeline = self._lifeline_r.fileno()
                    out_fds = [c.fileno() for c in out_w]
                    popen = subprocess.Popen(
                        exec_argv(theirs.fileno(), lifeline, uid, self.accounting, out_fds),
                        pass_fds=(theirs.fileno(), lifeline, *out_fds), close_fds=True,
                        stdin=subprocess.DEVNULL, env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
                        cwd="/")
                except BaseException:
                    ours.close()
                    raise
                finally:
                    theirs.close()
                conn, fd = ours, ours.fileno()
                handle = WorkerProcess(popen)
        except BaseException:
            for c in outs:
                c.close()
            raise
        finally:
            for c in out_w:   # only the worker writes to them
                c.close()
        os.set_blocking(fd, False)
        w = WorkerHandle(handle, conn, uid=uid, reader=workerproto.FrameReader(self.max_message), fd=fd,
                         last_rx=time.monotonic(), mark=mark, outs=list(outs))
        self._selector.register(fd, selectors.EVENT_READ, ("conn", w))
        for i, c in enumerate(outs):
            self._selector.register(c.fileno(), selectors.EVENT_READ, ("out", (w, i)))
        self._selector.register(handle.sentinel, selectors.EVENT_READ, ("sentinel", w))
        self.workers.append(w)
        logger.debug("started worker %s for uid %s", handle.pid, uid)
        return w

    def _retire(self, w: WorkerHandle) -> None:
        """Tell an idle worker to stop; killed if still there after RETIRE_GRACE."""
        w.dead = True
        w.retire_by = time.monotonic() + RETIRE_GRACE
        w.idle_check = None
        self._queue(w, [workerproto.encode_stop()])
        self.wake()   # the grace is a new timer

    def _leaving(self, w: WorkerHandle) -> None:
        """``w`` said its last job left threads and that it exits now: the
        job handed to it after that job's result never started."""
        if w.seq is not None:
            self.state.requeue(w.seq)
        self._clear_jobs(w)
        w.dead = True
        w.retire_by = time.monotonic() + RETIRE_GRACE
        w.idle_check = None

    def _end_retired(self, w: WorkerHandle) -> None:
        """A retired worker outlived its grace (stopped, or a job's code holds
        it): kill its tree. Its pidfd then reports it gone."""
        w.retire_by = None
        self._job_log(logging.WARNING, "worker %s (uid %s) was still there %g s after it was told to stop: killed",
                      w.proc.pid, w.uid, RETIRE_GRACE)
        threading.Thread(target=kill_tree, args=([w.proc.pid],), name="ezpq-kill", daemon=True).start()

    def _start_thread_job(self, rec: JobRecord) -> None:
        rec.pid, rec.host = os.getpid(), HOST
        self._thread_jobs += 1
        threading.Thread(target=self._run_thread_job, args=(rec.seq, rec.fn_blob, rec.args_blob),
                         name=f"ezpq-job-{rec.qid}-{rec.id}", daemon=True).start()

    def _run_thread_job(self, seq: int, fn_blob: bytes, args_blob: bytes) -> None:
        u0, s0 = thread_cpu()
        try:
            status, exitcode, out, exc = run_call(fn_blob, args_blob)
            u1, s1 = thread_cpu()
            self.state.finish(seq, Outcome(status, exitcode, out, exc, u1 - u0, s1 - s0,
                                           pid=os.getpid(), host=HOST))
        finally:
            with self.state.cond:
                self._thread_jobs -= 1
        self.wake()

    # -------------------------------------------------------------- results
    def _apply(self, w: WorkerHandle, messages: list, error: Optional[str]) -> None:
        """Messages read from ``w``, in order, then the violation that ended
        the read, if any. Caller holds the lock."""
        for msg in messages:
            if w.dead:
                return
            why = self._on_message(w, msg)
            if why:
                self._violation(w, why)
                return
        if error and not w.dead:
            self._violation(w, error)

    def _on_message(self, w: WorkerHandle, msg: tuple) -> Optional[str]:
        """One message (``Ready``, ``Result``, ``LateFigures``) in its phase;
        a reason when it is out of place."""
        kind = type(msg)
        if kind is Ready:
            if w.ready:
                return "a second ready message"
            w.ready = True
            self._boot_failures.pop(w.uid, None)
            if w.uid is not None:
                self._watch_from_outside(w)
            return None
        if not w.ready:
            return f"a {'result' if kind is Result else 'figures'} message before ready"
        if kind is LateFigures:
            if w.pending is None:
                return "figures with no result waiting for them"
            self._complete(w, w.pending, msg.figures)
            self._after_job(w, msg.leaving)
            return None
        # a result
        if w.pending is not None:
            return "a result while the last one's figures were due"
        if w.seq is None:
            return "a result while no job was given"
        self._on_result(w, msg)
        return None

    def _on_result(self, w: WorkerHandle, msg: Result) -> None:
        """Worker ``w`` finished its job: ``msg`` is its ``Result`` (the job
        is the one we gave it). Caller holds the lock.

        A measured job's result comes in two messages: the result, then its
        figures (the worker measures after sending the result, so measuring
        costs the result no time). In between the job stays working but
        gives back its slot and its worker (which reads its next job only
        after sending the figures); it completes with the figures. Its
        limits and cancel hold until then: the result may be the job's own
        forgery while it runs on."""
        seq = w.seq
        if msg.figures is None:  # figures follow: free the worker for its next job now
            w.pending = Returned(seq, msg)
            w.pending_deadline, w.pending_memory = w.deadline, w.max_memory
            w.figures_due = w.last_rx + FIGURES_TIMEOUT
            w.seq = w.deadline = w.max_memory = None
            self.state.release(seq)
            return
        w.seq = w.deadline = w.max_memory = None
        self._complete(w, Returned(seq, msg), msg.figures)
        self._after_job(w, msg.leaving)

    def _after_job(self, w: WorkerHandle, leaving: bool) -> None:
        """``w``'s last job is over (its figures are in): it leaves; or the
        job handed to it meanwhile starts now (its timeout counts from
        here); or, another user's, it is idle and looked at."""
        if leaving:
            self._leaving(w)
        elif w.seq is not None:
            if w.deadline is not None:
                rec = self.state.records.get(w.seq)
                if rec is not None and rec.timeout:
                    w.deadline = time.monotonic() + rec.timeout
        elif w.gauge is not None:
            w.idle_check = time.monotonic() + IDLE_CHECK_INTERVAL
            w.idle_cpu = None

    def _complete(self, w: WorkerHandle, pending: Returned, figures: Optional[Figures]) -> None:
        """Record a job's result with its figures (None: none came). Another
        user's job gets the figures we read ourselves (``_measured``)."""
        seq, r = pending
        if w.pending is pending:
            w.pending = w.pending_deadline = w.pending_memory = None
        if figures is not None and w.gauge is not None and self.accounting:
            figures = self._measured(w, seq, figures)
        cpu_u, cpu_s, rss, method, rss_ch = figures or NO_FIGURES
        self.state.finish(seq, Outcome(_WORKER_STATUS[r.status], r.exitcode, r.output, r.exception, cpu_u, cpu_s,
                                       rss, method, rss_ch, w.proc.pid, HOST, r.started, r.ended))

    def _measured(self, w: WorkerHandle, seq: int, told: Figures) -> Figures:
        """The figures of another user's job as we read them (ProcMeter):
        they win over what the worker ``told`` (the job may have written
        that); a worker that told far less is logged. The children's peak
        (``max_rss_children``) is the worker's word: reaped children's peaks
        cannot be read from outside."""
        try:
            cpu_u, cpu_s, peak = w.gauge.take()
        except OSError:
            return told   # gone meanwhile: its own word is all there is
        rec = self.state.records.get(seq)
        t_u, t_s, t_rss, t_method, t_children = told
        if rec is not None and rec.runner == "thread":   # thread jobs have no max_rss
            return Figures(cpu_u, cpu_s, None, None, t_children)
        if peak is None:
            peak, method = t_rss, t_method
        else:
            method = "vmhwm"
        cpu, t_cpu = cpu_u + cpu_s, (t_u or 0.0) + (t_s or 0.0)
        if ((cpu - t_cpu > 0.25 and t_cpu < 0.8 * cpu)
                or (peak and (t_rss or 0) < 0.8 * peak and peak - (t_rss or 0) > 32 << 20)):
            self._job_log(logging.WARNING, "worker %s (uid %s): job %s told %.2f s CPU and max_rss %s; it used "
                          "%.2f s and %s (recorded)", w.proc.pid, w.uid, seq, t_cpu, t_rss, cpu, peak)
        return Figures(cpu_u, cpu_s, peak, method, t_children)

    def _watch_from_outside(self, w: WorkerHandle) -> None:
        """Another user's worker is ready: open its /proc files (its figures
        are read from them from now on) and look at it while it is idle."""
        try:
            w.gauge = ProcMeter(w.proc.pid)
        except OSError as e:
            logger.error("worker %s (uid %s): cannot read it from /proc (%s): its jobs' figures are "
                         "its own word and its idle CPU is not watched", w.proc.pid, w.uid, e)
            return
        if w.seq is None:
            w.idle_check = time.monotonic() + IDLE_CHECK_INTERVAL
            w.idle_cpu = None

    def _drop_gauge(self, w: WorkerHandle) -> None:
        if w.gauge is not None:
            w.gauge.close()
            w.gauge = None

    def _check_idle(self, w: WorkerHandle, now: float) -> None:
        """Another user's worker that we count idle must be idle: the first
        look (an interval after its job: it has swept up since) takes its
        CPU; a later one that finds more than IDLE_CPU_BUDGET used since,
        or any process of it, ends it. A job that forged its result and
        figures and runs on, or a thread a lying worker kept, is caught so
        within about two intervals. Caller holds the lock."""
        try:
            u, s, processes = w.gauge.cpu()
        except OSError:
            w.idle_check = None   # gone: its pidfd says so
            return
        if w.idle_cpu is None:
            w.idle_cpu = u + s
        elif u + s - w.idle_cpu > IDLE_CPU_BUDGET * TICKS:
            self._violation(w, f"it used {(u + s - w.idle_cpu) / TICKS:.2f} s of CPU while idle")
            return
        elif processes:
            self._violation(w, f"{processes} process(es) of it still ran while it was idle")
            return
        w.idle_check = now + IDLE_CHECK_INTERVAL

    def _clear_jobs(self, w: WorkerHandle) -> None:
        w.seq = w.deadline = w.max_memory = None
        w.pending = w.pending_deadline = w.pending_memory = None

    def _violation(self, w: WorkerHandle, why: str) -> None:
        """``w`` broke the protocol: end its tree; its job (the one whose
        figures were due, whose code spoke last; else the one running)
        fails. Caller holds the lock."""
        self._job_log(logging.WARNING, "worker %s (uid %s): protocol violation: %s", w.proc.pid, w.uid, why)
        self._kill(w, JobStatus.FAILED, f"protocol violation: {why} (the job's worker was killed)")

    def _check_stalls(self) -> None:
        """A frame begun and not extended for STALL_TIMEOUT, or a channel that
        refuses our messages while its worker lives, is a violation. Caller holds the lock."""
        now = time.monotonic()
        self._suspect = False
        for w in self.workers:
            if w.dead:
                continue
            if (w.reader is not None and w.reader.partial) or w.broken:
                self._suspect = True   # look again next time
            if w.reader is not None and w.reader.partial and now - w.last_rx > STALL_TIMEOUT:
                self._violation(w, f"a message begun and not finished within {STALL_TIMEOUT:g} s")
            elif w.broken and w.proc is not None and is_alive(w.proc.pid):
                self._violation(w, "its channel no longer takes messages")

    def _on_death(self, w: WorkerHandle) -> None:
        """A worker process ended. Caller holds the lock.

        A result whose figures were due completes without them (a death is
        no verdict of ours on it); the job handed over after that result
        never started and goes back to waiting."""
        code = w.proc.exitcode(0.1)
        if w.pending is not None and w.seq is not None and not w.dead:
            self.state.requeue(w.seq)
            w.seq = w.deadline = w.max_memory = None
        self._flush_pending(w)
        self._drop_gauge(w)
        if not w.ready and not w.dead:
            n = self._boot_failures.get(w.uid, (0, 0.0, ""))[0] + 1
            why = (f"the worker for this user could not start (exit code {code}; "
                   f"the server's log says why)")
            self._boot_failures[w.uid] = (n, time.monotonic(), why)
            logger.error("a worker for uid %s died while starting (exit code %s)", w.uid, code)
        if w.seq is not None and not w.dead:
            left = self._reap_orphans()
            status, signal_name = death(code)   # its own crash signal: failed; from outside: killed
            why = (f"the worker process (pid {w.proc.pid}) died while running the job "
                   f"(exit code {code}{', ' + signal_name if signal_name else ''})")
            if left:
                why += f"; processes it left running were killed: {left}"
            self._finalize(w, status, code if code is not None else -signal.SIGKILL, why)
            logger.warning("worker %s died with exit code %s", w.proc.pid, code)
        elif self.subreaper:
            self._reap_orphans()
        w.dead = True
        self._unwatch(w.proc.sentinel)
        w.proc.close()
        self._close_channel(w)
        self.workers.remove(w)
        if w.uid is None and not self._stopping and not self.as_root:
            # keep the pool full: replace it now (a root server starts its
            # own user's workers on demand, like everyone's: refilling the
            # pool would retire other users' idle workers to make room)
            self.demand.add(None)

    def _reap_orphans(self, wait: bool = False) -> List[int]:
        """Kill and reap our children that are not workers: processes a
        dead worker left behind, re-parented to us (we are a subreaper).
        Returns the pids of those alive. The kill runs in a helper thread
        (never under the state lock) unless ``wait``. Children of our own
        thread jobs (same uid as ours) are spared while any thread job runs."""
        if not self.subreaper:
            return []
        keep = {w.proc.pid for w in self.workers if w.proc is not None}
        keep |= mp_helper_pids()   # started by multiprocessing
        me = os.getuid()
        orphans = []
        for pid in set(child_pids(os.getpid())) - keep - self._orphans_in_hand:
            if self._thread_jobs:
                try:
                    if os.stat(f"/proc/{pid}").st_uid == me:
                        continue
                except OSError:
                    continue
            orphans.append(pid)
        if not orphans:
            return []
        live = [p for p in orphans if is_alive(p)]
        self._orphans_in_hand.update(orphans)
        if wait:
            _kill_and_reap(orphans, live, self._orphans_in_hand)
        else:
            threading.Thread(target=_kill_and_reap, args=(orphans, live, self._orphans_in_hand),
                             name="ezpq-orphans", daemon=True).start()
        return live

    def _finalize(self, w: WorkerHandle, status: JobStatus, exitcode: int, why: str) -> None:
        """Record the outcome of the job on a worker we lost (its pending
        result, if any, was flushed first)."""
        seq = w.seq
        self._clear_jobs(w)
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
        """Kill jobs past their timeout or memory limit, or asked to stop
        (a job whose figures are due included: its result may be forged);
        end retired workers past their grace; look at idle workers of other
        users. Caller holds the lock."""
        now = time.monotonic()
        later = []
        for seq, status, why in self.state.take_kill_requests():
            w = next((w for w in self._live()
                      if w.seq == seq or (w.pending is not None and w.pending.seq == seq)), None)
            if w is None:
                continue
            if w.seq == seq and w.pending is not None:
                # handed over after the last job's result: not started yet
                # (killing now would end that job); done once it has started
                later.append((seq, status, why))
                continue
            self._kill(w, status, why)
        self.state.kill_requests.extend(later)
        for w in list(self.workers):
            if w.dead:
                if w.retire_by is not None and now >= w.retire_by:
                    self._end_retired(w)
                continue
            if w.pending is not None:   # the job whose figures are due is the one in the worker
                if w.pending_deadline is not None and now >= w.pending_deadline:
                    self._kill(w, JobStatus.TIMEOUT, self._timed_out(w.pending.seq))
                elif now >= w.figures_due:
                    self._violation(w, f"no figures within {FIGURES_TIMEOUT:g} s of its result")
                elif w.pending_memory:
                    self._check_memory(w, w.pending_memory)
                continue
            if w.seq is None:
                if w.idle_check is not None and now >= w.idle_check - _IDLE_SLACK:
                    self._check_idle(w, now)
                continue
            if w.deadline is not None and now >= w.deadline:
                self._kill(w, JobStatus.TIMEOUT, self._timed_out(w.seq))
            elif w.max_memory:
                self._check_memory(w, w.max_memory)

    def _timed_out(self, seq: int) -> str:
        rec = self.state.records.get(seq)
        return f"timed out after {rec.timeout if rec else '?'} s"

    def _check_memory(self, w: WorkerHandle, limit: int) -> None:
        rss = tree_rss(w.proc.pid)
        if rss > limit:
            self._kill(w, JobStatus.KILLED, f"killed: memory {rss} bytes passed max_memory={limit}")

    def _kill(self, w: WorkerHandle, status: JobStatus, why: str) -> None:
        """Stop the job in ``w`` by killing its worker's process tree, in a
        helper thread. That job is the one whose figures are due, if any
        (its result does not count: the kill is its fate; the job handed to
        ``w`` after that result never started and waits again), else the
        one running.

        The job stays working until the tree is gone; then its outcome is
        recorded with the signal that ended the worker and the CPU and
        memory it had used, read just before (another user's worker from
        outside; ours through its meter's mark, unless the job's figures
        were due: the worker may have set the mark for its next job
        already, so those are unknown), and any survivor is named in
        ``exception``. The worker is never reused."""
        mark = w.mark
        if w.pending is not None:
            mark = None
            seq = w.pending.seq
            if w.seq is not None:
                self.state.requeue(w.seq)
        else:
            seq = w.seq
        self._clear_jobs(w)
        w.dead = True
        w.idle_check = None
        with w.out_lock:
            w.out.clear()
        gauge, w.gauge = w.gauge, None   # the helper thread reads and closes it
        rec = self.state.records.get(seq) if seq is not None else None
        with_rss = rec is not None and rec.runner != "thread"
        threading.Thread(target=self._kill_and_record,
                         args=(seq, w.proc, status, why, time.time(), gauge, with_rss, mark, w),
                         name="ezpq-kill", daemon=True).start()

    def _kill_and_record(self, seq: Optional[int], proc: WorkerProcess, status: JobStatus, why: str,
                         ended: float, gauge: Optional[ProcMeter] = None, with_rss: bool = True,
                         mark: Any = None, w: Optional[WorkerHandle] = None) -> None:
        """Kill ``proc``'s tree; record job ``seq`` as it ended, with the
        figures it had used by then, read just before the kill: from
        outside (``gauge``, another user's worker) or through its meter's
        ``mark`` (ours). ``w``: its output pipes are drained into the
        job's log once the tree is gone, before the end is recorded."""
        figures = children = None
        if mark is not None and seq is not None and self.accounting:
            try:
                cpu_u, cpu_s, peak, _, children = mark_figures(proc.pid, mark)
                figures = (cpu_u, cpu_s, peak)
            except (OSError, ValueError, IndexError):
                pass
        if gauge is not None:
            try:
                if seq is not None and self.accounting:
                    figures = gauge.take()
            except OSError:
                pass
            finally:
                gauge.close()
        survivors = kill_tree([proc.pid])
        code = proc.exitcode(1.0)
        exitcode = code if code is not None and code < 0 else -signal.SIGKILL
        if survivors:
            why += f"; processes {survivors} survived SIGKILL"
            logger.error("job %s: %s", seq, why)
        if w is not None:   # its output up to the kill is in its log before it ends
            self._drain_outputs(w, ours=False)
        if seq is not None:
            cpu_u = cpu_s = rss = None
            if figures is not None:
                cpu_u, cpu_s, peak = figures
                if with_rss and peak is not None:
                    rss = peak
            self.state.finish(seq, Outcome(status, exitcode, exception=why, cpu_user=cpu_u, cpu_system=cpu_s,
                                           max_rss=rss, max_rss_method=None if rss is None else "vmhwm",
                                           max_rss_children=children, pid=proc.pid, host=HOST, ended=ended))
        self.wake()
