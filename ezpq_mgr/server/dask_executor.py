"""DaskExecutor: the worker pool's role (supervisor.py) played against a
Dask distributed cluster (``ezpq-server --dask ADDRESS``, ``Queue(dask=)``).

The server keeps everything that decides order: the waiting jobs, lanes,
priorities, fair share, the completed queue (``QueueState``, unchanged).
Dask only runs what we hand it, and we hand it no more than it can start at
once: ``min(--workers, the cluster's worker threads)`` jobs, so no job
waits in Dask's own queue where our order would be lost.

Jobs go to *runners* (worker/dask_host.run_jobs): one long Dask task per
Dask worker thread we use, pinned to its worker (``workers=[address]``,
``allow_other_workers=False``), that takes one job at a time from its own
``distributed.Queue`` (its inbox), runs it in an ezpq worker process there
and puts the result in our results queue::

      QueueState ──pick()──> DaskExecutor ──inbox.put(job)──> runner (Dask task, one thread)
          ^                    │   ^                             │ runs it in an ezpq process
          └─ finish(Outcome) ──┘   └──── results queue <─────────┘ [key, seq, HostResult]
                                   topic "all": workers join / leave

Why runners: a Dask task round trip (submit, schedule, run, report) is
~10 ms here, so a task per job with only as many in flight as threads did
~190 no-ops/s; a job handed over a ``distributed.Queue`` to a runner
already there is ~2 ms. Measured on the 2 x 1 LocalCluster, 2 runners, one
job each in flight, 3,000 no-ops, 3 rounds, median vs plain Dask's
``Client.submit`` of all at once: a ``distributed.Queue`` both ways 1.26x
(p50 of one hand-over 2.2 ms); results by ``Worker.log_event`` to
``subscribe_topic`` 1.24x (2.6 ms), and the scheduler keeps the last 1,000
of each topic, outputs included; an Actor mailbox on each worker (client
to worker directly) 0.95x (3.1 ms), as each sync call holds a client
thread, and actors pin state to a worker; Pub/Sub is gone from
distributed 2026.8. So: queues both ways. Items are msgpack (bytes, ints,
strings): the scheduler never unpickles a job.

- The order stays ours: a runner is handed a job only when it is free
  (none in its inbox, none running), so at most one job per runner and no
  more runners on a worker than it has threads; a better job put later
  overtakes any that wait with us.
- A runner with no job for ``RUNNER_IDLE`` seconds ends and frees its
  thread (adaptive clusters scale down); the next job starts a new one. It
  returns how many jobs it took: one handed to it as it gave up waits
  again, without using a retry. An idle queue makes no wake-ups here.
- No re-run behind our back: Dask re-runs a task whose worker died. A
  runner is pinned to its worker, so Dask cannot move it; when that worker
  leaves (its ``remove-worker`` event, or its absence from the cluster at
  the next look) its job is ``lost`` (or waits again while it has
  ``retries``), the runner's future is cancelled and its inbox released
  (anything left in it goes too).
- A cancel (or a skip) of a running job is recorded at once (exit code
  -9) and ``kill_job`` runs on its worker (``Client.run``): the tree of
  the process running it is killed there, or the runner skips it if it had
  not taken it yet. The runner stays busy until its (ignored) result comes,
  so the thread is free before the next job goes there.
- The scheduler lost: Dask cancels every future (running jobs are
  ``lost``); waiting jobs wait; the client reconnects within
  ``connect_timeout``, else a new client is tried every
  ``RECONNECT_INTERVAL`` s until one connects.

Jobs on Dask run as the Dask workers' OS user (see README, *Past one
machine*); ``Outcome.host`` is the Dask host, ``pid`` the ezpq process
there; the figures are that process's own for that job.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ..job import JobStatus
from ..messages import Outcome
from .joblogs import LogBook
from .state import QueueState

logger = logging.getLogger(__name__)

__all__ = ["DaskExecutor", "DaskUnreachable", "DEFAULT_CONNECT_TIMEOUT", "RUNNER_IDLE"]

DEFAULT_CONNECT_TIMEOUT = 10.0   # seconds
RECONNECT_INTERVAL = 2.0         # seconds between tries once the client gave up
#: while jobs run, the cluster's workers are read this often (seconds), in
#: case a worker left without its event reaching us; an idle queue never looks
LOOK_INTERVAL = 5.0
#: how often our client sends its batched messages (a runner's submit, a
#: queue's release) to the scheduler: Dask's client waits up to 10 ms; its
#: workers use 2 ms
CLIENT_BATCH_INTERVAL = 0.002
#: a runner with no job for this long (seconds) ends and gives its Dask
#: thread back. Long enough that a steady stream with pauses (a client
#: thinking between puts, a lane's next job) keeps its runners: a new one
#: costs a task round trip (~10 ms) plus its queue set-up; short enough that
#: an adaptive cluster (``Adaptive``: 3 looks 1 s apart before a worker is
#: retired) sees the threads free before it would decide, and that another
#: user of the cluster waits little for them.
RUNNER_IDLE = 2.0
#: a runner that hears nothing for this long (seconds) takes its server for
#: dead and ends (the server retires idle ones after RUNNER_IDLE itself)
RUNNER_ORPHAN = 60.0


class DaskUnreachable(ConnectionError):
    """The Dask scheduler cannot be reached; the message names its address."""


class _Runner:
    """One runner task on a Dask worker (worker/dask_host.run_jobs) and
    the job it is on."""
    __slots__ = ("key", "worker", "inbox", "future", "ready", "seq", "handed", "ended", "idle_since")

    def __init__(self, key: str, worker: str, inbox: Any):
        self.key, self.worker, self.inbox = key, worker, inbox
        self.future: Any = None
        self.ready = False               # it said so: it runs on its worker, waiting for a job
        self.seq: Optional[int] = None   # the job handed to it, until its result comes
        self.handed = 0                  # jobs handed to it (its return: how many it took)
        self.ended = False               # retired or over: no more jobs for it
        self.idle_since = 0.0            # monotonic time its last job ended


class DaskExecutor:
    """Runs the state's jobs on a Dask cluster, at most ``slots`` at once
    (and never more than the cluster's threads). The same face as the
    Supervisor for the Service: ``slots``, ``envs``, ``wake``,
    ``dispatch_now``, ``set_slots``, ``start``, ``stop``."""

    def __init__(self, state: QueueState, slots: int, address: str,
                 logs: Optional[LogBook] = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        self.state = state
        self.slots = slots
        self.address = address
        self.logs = logs
        self.connect_timeout = connect_timeout
        self.envs: Dict[int, Any] = {}
        self.token = os.urandom(4).hex()     # keys of two servers (or runs) never meet
        #: our plugin's name on the workers: each server keeps its own
        #: processes there, and removing ours at stop leaves another's alone
        self.plugin = f"ezpq-{self.token}"
        self.cluster: Dict[str, int] = {}    # Dask worker address -> its threads
        self._runners: Dict[str, _Runner] = {}   # runner key -> runner
        self._running: Dict[int, _Runner] = {}   # seq -> the runner it was handed to
        self._n_runners = 0                  # runners started (their keys' numbers)
        self._next_retire: Optional[float] = None   # monotonic time an idle runner is due to retire
        #: why runners failed before they were ready: each fails one waiting
        #: job (as a task per job would), so that a cluster that cannot run
        #: ours (ezpq_mgr missing there) is told, not retried forever
        self._start_failures: List[str] = []
        #: running jobs we asked their host to kill: seq -> (status, why)
        self._killing: Dict[int, Tuple[JobStatus, str]] = {}
        self._cv = threading.Condition()
        self._inbox: "collections.deque[tuple]" = collections.deque()
        self._woken = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        #: the results queue (``distributed.Queue``), read by its own thread
        self._outbox: Any = None
        self._outbox_name = f"ezpq-{self.token}-results"
        self._outbox_set = threading.Event()   # a new results queue (a new scheduler)
        self._reader: Optional[threading.Thread] = None
        self._look = True                    # read the cluster's workers again
        self._next_look = 0.0                # monotonic time of the next look while jobs run
        self._comm: Any = None               # the client's scheduler stream we set up
        self._next_try = 0.0                 # monotonic time of the next reconnect
        self._client = self._connect()

    # ------------------------------------------------------------ lifecycle
    def _connect(self):
        """A client of the scheduler, our plugin registered on every worker
        (and every later one), its worker events followed."""
        try:
            from distributed import Client
        except ImportError:
            raise RuntimeError("running jobs on Dask needs the distributed package "
                               "(pip install 'ezpq_mgr[dask]')") from None
        try:
            client = Client(self.address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise DaskUnreachable(f"cannot reach the Dask scheduler at {self.address}: "
                                  f"{' '.join(str(e).split()) or type(e).__name__}") from None
        try:
            self._setup(client)
        except BaseException:
            client.close()
            raise
        return client

    def _setup(self, client) -> None:
        """On a (new) scheduler: our plugin on every worker, its events
        followed, our results queue there."""
        from distributed import Queue
        from ..worker.dask_host import EzpqPlugin
        client.register_plugin(EzpqPlugin(self.plugin), name=self.plugin)
        client.subscribe_topic("all", self._on_event)
        self._comm = client.scheduler_comm
        if hasattr(self._comm, "interval"):
            self._comm.interval = CLIENT_BATCH_INTERVAL
        self._outbox = Queue(self._outbox_name, client=client)
        self._outbox_set.set()
        self._look = True

    def _resync(self) -> None:
        """The client reconnected by itself (a new scheduler stream): the
        scheduler may be a new one, without our plugin, subscription or
        queues; the runners of the old one are gone with their jobs."""
        logger.info("dask: reconnected to %s", self.address)
        with self.state.cond:
            self._lose_all()
        try:
            self._setup(self._client)
        except Exception as e:
            logger.warning("dask: cannot set up on %s again: %s", self.address, e)

    def start(self, prestart: bool = True) -> None:
        self._reader = threading.Thread(target=self._read_results, name="ezpq-dask-results", daemon=True)
        self._reader.start()
        self._thread = threading.Thread(target=self.run, name="ezpq-dask", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Running jobs end ``lost``; the runners are cancelled, our plugin
        leaves the workers (killing its processes there); the client closes."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._outbox_set.set()
        if self._thread is not None:
            self._thread.join(10)
        with self.state.cond:
            runners = list(self._runners.values())
            self._lose_all("the server stopped while it ran")
        client = self._client
        if client is not None:
            try:
                for r in runners:
                    self._release(r)
                client.unregister_worker_plugin(self.plugin)
                client.unsubscribe_topic("all")
                if self._outbox is not None:
                    self._outbox.put(None)   # the reader's last item
            except Exception as e:   # the scheduler is gone: its workers' lifelines end the processes
                logger.debug("dask: could not clean up on the scheduler: %s", e)
        if self._reader is not None:
            self._reader.join(5)
        if client is not None:
            try:
                if self._outbox is not None:
                    self._outbox.close()
            except Exception:
                pass
            client.close()

    def wake(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify()

    def dispatch_now(self) -> None:
        self.wake()

    def set_slots(self, n: int) -> None:
        with self.state.cond:
            self.slots = n
        self.wake()

    def _post(self, item: tuple) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    def _on_event(self, event) -> None:
        """The scheduler's topic ``all`` (on the client's event loop: post only)."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict) and msg.get("action") in ("add-worker", "remove-worker"):
            self._post(("workers", msg.get("worker"), msg.get("action")))

    def _read_results(self) -> None:
        """The reader thread: each result the runners put, posted to the
        loop. A blocking get: no wake-ups while nothing runs."""
        while not self._stopping:
            outbox = self._outbox
            try:
                msg = outbox.get()
            except Exception as e:   # the scheduler is lost: wait for the next one's queue
                if self._stopping:
                    return
                logger.debug("dask: results queue: %s", e)
                self._outbox_set.clear()
                if self._outbox is outbox:
                    self._outbox_set.wait(RECONNECT_INTERVAL)
                continue
            if msg is not None:
                self._post(("result", msg))

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._woken or self._stopping):
                    if self._client is None:
                        wait = max(0.0, self._next_try - time.monotonic())
                    elif self._running or not self.cluster or self._client.status != "running":
                        # a worker that left unannounced, a cluster with none yet, a
                        # client that gave up: looked at this often, never while idle
                        wait = max(0.0, self._next_look - time.monotonic())
                    else:
                        wait = None
                    if self._next_retire is not None:
                        due = max(0.0, self._next_retire - time.monotonic())
                        wait = due if wait is None else min(wait, due)
                    if wait == 0.0:
                        self._look = True
                        break
                    self._cv.wait(wait)
                if self._stopping:
                    return
                items = list(self._inbox)
                self._inbox.clear()
                self._woken = False
            self._round(items)
            if self.logs is not None and self.logs.doomed:
                self.logs.sweep()

    def _round(self, items: List[tuple]) -> None:
        results: List[Any] = []
        ended: List[Tuple[str, Any]] = []
        left: List[str] = []
        broken: List[str] = []
        for item in items:
            if item[0] == "result":
                results.append(item[1])
            elif item[0] == "runner":
                ended.append(item[1:])
            elif item[0] == "runner-broken":
                broken.append(item[1])
            else:
                self._look = True
                if item[2] == "remove-worker" and item[1]:
                    left.append(item[1])
        if self._client is None or self._client.status in ("closed", "closing"):
            self._reconnect()
        elif self._client.status == "running" and self._client.scheduler_comm is not self._comm:
            self._resync()
        if self._client is None or self._client.status != "running":
            # the scheduler is lost (the client reconnects or gave up): no
            # worker is known to be there; running jobs are lost, none is handed out
            self.cluster = {}
            self._look = True
        elif self._look:
            self._read_cluster()
        if results:
            self._record(results)
        gone: List[_Runner] = []
        kills: List[Tuple[_Runner, int, str]] = []
        with self.state.cond:
            for key, future in ended:
                runner = self._runners.get(key)
                if runner is not None and runner.future is future:
                    self._runner_ended(runner, future)
                    gone.append(runner)
            for runner in list(self._runners.values()):
                if runner.key in broken:
                    self._drop(runner)
                    gone.append(runner)
                elif runner.worker in left or runner.worker not in self.cluster:
                    if runner.seq is not None and self._running.get(runner.seq) is runner:
                        self._end(runner.seq, JobStatus.LOST, -9, self._why_lost(runner))
                    self._drop(runner)
                    gone.append(runner)
            kills = self._take_kills()
            sends = self._dispatch()
            retire = self._retire_idle()
        for runner in retire:
            try:
                runner.inbox.put(None)   # it returns; its future's end removes it
            except Exception as e:
                logger.debug("dask: retiring runner %s: %s", runner.key, e)
        for runner in gone:
            self._release(runner)
        for runner, seq, why in kills:
            try:
                from ..worker.dask_host import kill_job
                self._client.run(kill_job, self.plugin, runner.key, seq, why, workers=[runner.worker],
                                 wait=False)
            except Exception as e:   # recorded now, without its figures
                logger.warning("dask: cancel of job %s on %s failed: %s", seq, runner.worker, e)
                with self.state.cond:
                    if self._running.get(seq) is runner:
                        self._end(seq, JobStatus.LOST, -9, why)
        for runner, seq, msg in sends:
            self._send(runner, seq, msg)

    def _retire_idle(self) -> List[_Runner]:
        """Runners idle for RUNNER_IDLE: no more jobs for them; returned to
        be told to end. Until their tasks end their threads count as used.
        Caller holds the lock."""
        now = time.monotonic()
        retire, self._next_retire = [], None
        for runner in self._runners.values():
            if runner.ready and runner.seq is None and not runner.ended:
                due = runner.idle_since + RUNNER_IDLE
                if due <= now:
                    runner.ended = True
                    retire.append(runner)
                elif self._next_retire is None or due < self._next_retire:
                    self._next_retire = due
        return retire

    def _why_lost(self, runner: _Runner) -> str:
        if self._client is None or self._client.status != "running":
            return (f"the connection to the Dask scheduler at {self.address} was lost "
                    f"while the job ran")
        return f"the Dask worker {runner.worker} left while it ran the job"

    def _runner_ended(self, runner: _Runner, future: Any) -> None:
        """A runner's task is over. It ended by itself (idle, or told to):
        its count says whether it took the job last handed to it, which
        else waits again. Or it failed, or Dask cancelled it (its worker or
        the scheduler gone): its job is lost. Caller holds the lock."""
        runner.ended = True
        self._runners.pop(runner.key, None)
        if not runner.ready and future.status == "error":
            try:
                exc = future.exception(timeout=1)
            except Exception as e:
                exc = e
            self._start_failures.append(f"the Dask runner on {runner.worker} failed as it started: "
                                        f"{type(exc).__name__}: {exc}")
        seq = runner.seq
        if seq is None or self._running.get(seq) is not runner:
            return
        if future.status == "finished":
            try:
                taken = future.result(timeout=1)
            except Exception:
                taken = None
            if taken == runner.handed:
                return   # it took it: its result is in the results queue, on its way
            if taken == runner.handed - 1:
                del self._running[seq]
                runner.seq = None
                self.state.requeue(seq)   # never began: waits again where it was
                return
            why = f"the Dask runner on {runner.worker} ended with a wrong count ({taken!r})"
        elif future.status == "error":
            try:
                exc = future.exception(timeout=1)
            except Exception as e:
                exc = e
            why = f"the Dask runner on {runner.worker} failed: {type(exc).__name__}: {exc}"
        elif self._client is not None and self._client.status == "running" and runner.worker in self.cluster:
            why = f"the Dask runner on {runner.worker} was cancelled ({future.status}) while it ran the job"
        else:
            why = self._why_lost(runner)
        self._end(seq, JobStatus.LOST, -9, why)

    def _drop(self, runner: _Runner) -> None:
        """Give up a runner (its worker left). Caller holds the lock."""
        runner.ended = True
        self._runners.pop(runner.key, None)
        if runner.seq is not None and self._running.get(runner.seq) is runner:
            del self._running[runner.seq]
        runner.seq = None

    def _release(self, runner: _Runner) -> None:
        """An ended runner: its task cancelled (Dask must not run it again
        somewhere; the plugin kills its job's process), told to end (else
        it would wait for a job until RUNNER_ORPHAN), its inbox released
        (with whatever is left in it)."""
        if runner.inbox is None:
            return
        try:
            if runner.future is not None and not runner.future.done():
                self._client.cancel([runner.future], force=True)
                runner.inbox.put(None)
            runner.inbox.close()
        except Exception as e:
            logger.debug("dask: releasing runner %s: %s", runner.key, e)

    def _lose_all(self, why: Optional[str] = None) -> None:
        """Every running job lost, every runner forgotten (the scheduler or
        the server gone). Caller holds the lock."""
        for seq, runner in list(self._running.items()):
            self._end(seq, JobStatus.LOST, -9, why or self._why_lost(runner))
        for runner in list(self._runners.values()):
            self._drop(runner)

    def _end(self, seq: int, status: JobStatus, exitcode: int, why: str) -> None:
        """Record a job that will send no result (one being killed ends as
        it was asked to). Caller holds the lock."""
        runner = self._running.pop(seq, None)
        asked = self._killing.pop(seq, None)
        if asked is not None:
            status, why, exitcode = asked[0], asked[1], -9
        host = _host_of(runner.worker) if runner is not None else None
        self.state.finish(seq, Outcome(status, exitcode, exception=why, host=host))

    def _take_kills(self) -> List[Tuple[_Runner, int, str]]:
        """Cancels and skips of running jobs: the runners to tell returned.
        Each is recorded when its runner's result comes (the figures it had
        used by then, read on its host before the kill, as a local kill
        has), with the status and reason asked for. Caller holds the lock."""
        kills = []
        for seq, status, why in self.state.take_kill_requests():
            runner = self._running.get(seq)
            if runner is None or seq in self._killing:
                continue
            self._killing[seq] = (status, why)
            kills.append((runner, seq, why))
        return kills

    # ------------------------------------------------------------- dispatch
    def _dispatch(self) -> List[tuple]:
        """Hand jobs to free runners while we have a slot, the last one used
        first (so that the others go idle and retire); when none is free and
        a job waits, start runners on workers with a thread to spare. A job
        is picked only for a runner that said it is ready: one that never
        started (its worker left first, or busy with another's task) holds
        no job, and the order is decided when a runner can take it. Caller
        holds the lock."""
        if self._client is None or not self.cluster:
            return []
        sends: List[tuple] = []
        while self._start_failures:
            rec = self.state.pick()
            if rec is None:
                break
            self.state.finish(rec.seq, Outcome(JobStatus.LOST, -9, exception=self._start_failures.pop(0)))
        cap = min(self.slots, sum(self.cluster.values()))
        free = [r for r in self._runners.values() if r.ready and r.seq is None and not r.ended]
        while self.state.n_running < cap and free:
            rec = self.state.pick()
            if rec is None:
                break
            runner = free.pop()
            rec.pid, rec.host = None, _host_of(runner.worker)   # the pid is the host's, known at the end
            env = self.envs.get(rec.env_id)
            runner.seq = rec.seq
            runner.handed += 1
            self._running[rec.seq] = runner
            self._runners[runner.key] = self._runners.pop(runner.key)   # most recently used last
            sends.append((runner, rec.seq, [rec.seq, rec.fn_blob, rec.args_blob,
                                            None if env is None else list(env), rec.runner == "thread",
                                            rec.timeout or 0, rec.max_memory]))
        starting = sum(1 for r in self._runners.values() if not r.ready and not r.ended)
        room = cap - self.state.n_running - starting
        if free or room <= 0:
            return sends
        seen: List[Any] = []
        self.state.pick(lambda rec: seen.append(rec) or False)   # only looks: is a job runnable?
        if not seen:
            return sends
        room = min(room, sum(q.n_waiting for q in self.state.queues.values()))
        used: Dict[str, int] = collections.Counter(r.worker for r in self._runners.values())
        spare = {w: n - used.get(w, 0) for w, n in self.cluster.items()}
        for _ in range(room):
            worker = max(spare, key=spare.get)
            if spare[worker] <= 0:
                break
            spare[worker] -= 1
            self._n_runners += 1
            runner = _Runner(f"ezpq-{self.token}-r{self._n_runners}", worker, None)
            self._runners[runner.key] = runner
            sends.append((runner, None, None))
        return sends

    def _send(self, runner: _Runner, seq: Optional[int], msg: Optional[list]) -> None:
        """Start a runner (``seq`` None), or put a job in its inbox."""
        from distributed import Queue
        from ..worker.dask_host import run_jobs
        try:
            if seq is None:
                runner.inbox = Queue(f"{runner.key}-in", client=self._client)
                runner.future = self._client.submit(
                    run_jobs, self.plugin, f"{runner.key}-in", self._outbox_name, RUNNER_ORPHAN, key=runner.key,
                    workers=[runner.worker], allow_other_workers=False, pure=False, retries=0)
                runner.future.add_done_callback(lambda f, key=runner.key: self._post(("runner", key, f)))
            else:
                runner.inbox.put(msg)
        except Exception as e:
            with self.state.cond:
                if seq is None:
                    self._start_failures.append(f"could not start a Dask runner on {runner.worker}: {e}")
                elif self._running.get(seq) is runner:
                    self._end(seq, JobStatus.LOST, -9, f"could not hand the job to Dask: {e}")
                runner.seq = None
            self._post(("runner-broken", runner.key))

    # -------------------------------------------------------------- results
    def _record(self, results: List[Any]) -> None:
        """Record the results the runners sent (their logs appended outside the lock)."""
        outcomes = []
        now = time.monotonic()
        for msg in results:
            if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[1] is None:   # [key, None]: ready
                runner = self._runners.get(msg[0])
                if runner is not None and not runner.ready:
                    runner.ready, runner.idle_since = True, now
                continue
            if not (isinstance(msg, (list, tuple)) and len(msg) == 12 and isinstance(msg[0], str)
                    and type(msg[1]) is int):
                logger.warning("dask: a malformed message in the results queue: dropped")
                continue
            key, seq = msg[0], msg[1]
            runner = self._runners.get(key)
            if runner is None:   # ended: its last result still counts
                runner = self._running.get(seq)
                if runner is None or runner.key != key:
                    continue
            if runner.seq != seq:
                continue
            outcome, log = _outcome(msg[2:], runner.worker)
            outcomes.append((runner, seq, outcome, log))
        grown = False
        if self.logs is not None:
            for runner, seq, outcome, log in outcomes:
                if log and self._running.get(seq) is runner:
                    rec = self.state.records.get(seq)
                    if rec is not None:
                        grown = self.logs.append(self.logs.sink(seq, rec.uid), log) or grown
        with self.state.cond:
            if grown:
                self.state._changed()
            for runner, seq, outcome, _ in outcomes:
                runner.seq, runner.idle_since = None, now
                if self._running.get(seq) is runner:   # not ended meanwhile (its worker left)
                    del self._running[seq]
                    asked = self._killing.pop(seq, None)
                    if asked is not None:   # as asked, with what it had used by then
                        outcome = outcome._replace(status=asked[0], exception=asked[1], output_blob=None,
                                                   exitcode=outcome.exitcode if outcome.exitcode and
                                                   outcome.exitcode < 0 else -9)
                    self.state.finish(seq, outcome)

    # -------------------------------------------------------------- cluster
    def _read_cluster(self) -> None:
        self._next_look = time.monotonic() + LOOK_INTERVAL
        try:
            cluster = dict(self._client.nthreads())
        except Exception as e:
            logger.warning("dask: cannot read the cluster's workers: %s", e)
            return
        self._look = False
        if cluster != self.cluster:
            logger.info("dask: %s workers, %s threads", len(cluster), sum(cluster.values()))
        self.cluster = cluster

    def _reconnect(self) -> None:
        """The client gave up on the scheduler: try a new one now and then."""
        if time.monotonic() < self._next_try:
            return
        old, self._client = self._client, None
        if old is not None:
            try:
                old.close()
            except Exception:
                pass
            with self.state.cond:
                self._lose_all(f"the connection to the Dask scheduler at {self.address} "
                               f"was lost while the job ran")
            self.cluster = {}
        try:
            self._client = self._connect()
            self._look = True
            logger.info("dask: connected to %s again", self.address)
        except Exception as e:
            self._next_try = time.monotonic() + RECONNECT_INTERVAL
            logger.warning("dask: %s (next try in %g s)", e, RECONNECT_INTERVAL)


def _host_of(worker: str) -> str:
    """The host part of a Dask address (tcp://10.0.0.5:40123 -> 10.0.0.5)."""
    rest = worker.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest


_STATUSES = {s.value: s for s in JobStatus}


def _outcome(res: Any, worker: str) -> Tuple[Outcome, bytes]:
    """A ``HostResult`` as an ``Outcome`` (and the job's log bytes),
    checked field by field: anything malformed makes the job ``lost``."""
    try:
        status, exitcode, started, ended, output, exception, figures, pid, host, log = res
        status = _STATUSES[status]
        if not (exitcode is None or type(exitcode) is int) or not (pid is None or type(pid) is int):
            raise TypeError("exitcode/pid")
        if not (output is None or type(output) is bytes) or not (exception is None or type(exception) is str):
            raise TypeError("output/exception")
        if type(host) is not str or type(log) is not bytes:
            raise TypeError("host/log")
        for t in (started, ended):
            if t is not None and type(t) is not float:
                raise TypeError("times")
        cpu_u = cpu_s = rss = method = children = None
        if figures is not None:
            cpu_u, cpu_s, rss, method, children = figures
        return Outcome(status, exitcode, output, exception, cpu_u, cpu_s, rss, method, children, pid, host,
                       started, ended), log
    except (TypeError, ValueError, KeyError) as e:
        return Outcome(JobStatus.LOST, -9, exception=f"the Dask worker {worker} sent a malformed result "
                                                     f"({type(e).__name__}: {e})"), b""
