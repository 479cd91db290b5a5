"""DaskExecutor: the worker pool's role (supervisor.py) played against a
Dask distributed cluster (``ezpq-server --dask ADDRESS``, ``Queue(dask=)``).

The server keeps everything that decides order: the waiting jobs, lanes,
priorities, fair share, the completed queue (``QueueState``, unchanged).
Dask only runs what we hand it, and we hand it no more than it can start at
once: ``min(--workers, the cluster's worker threads)`` jobs, each pinned to
a worker with a free thread (``workers=[address]``,
``allow_other_workers=False``), so no job waits in Dask's own queue where
our order would be lost::

      QueueState ──pick()──> DaskExecutor ──submit(run_job, key=ezpq-TOKEN-SEQ)──> Dask worker
          ^                    │   ^                                           (worker/dask_host.py:
          └─ finish(Outcome) ──┘   └──── future done: HostResult ─────────────  an ezpq process runs it)
                                   topic "all": workers join / leave

- One thread (``run``) owns the client's futures and waits on a condition
  for what the Dask client's threads post: a future done (its callback),
  a worker joined or left (the scheduler's events on topic ``all``),
  ``wake()`` (a put, a cancel, a new slot count). An idle queue makes no
  wake-ups.
- A finished future frees its thread at once (``state.release``: the job's
  slot goes to the next job before its result is fetched); its
  ``HostResult`` (plain fields; the output is the job's opaque pickle) is
  then fetched with the others of the round and recorded (``state.finish``).
- No re-run behind our back: Dask re-runs a task whose worker died. A job
  is pinned to one worker, so Dask cannot move it; when that worker leaves
  (its ``remove-worker`` event, or its absence from the cluster at the
  next look) the job is ``lost`` (or waits again while it has
  ``retries``) and its future is cancelled.
- A cancel (or a skip) of a running job cancels its future; Dask moves
  the task to ``cancelled`` on its worker and the plugin there kills the
  process tree running it (dask_host.EzpqPlugin.transition). The job is
  recorded at once, with the reason and exit code -9.
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
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ..job import JobStatus
from ..messages import Outcome
from .joblogs import LogBook
from .state import QueueState

logger = logging.getLogger(__name__)

__all__ = ["DaskExecutor", "DaskUnreachable", "DEFAULT_CONNECT_TIMEOUT"]

DEFAULT_CONNECT_TIMEOUT = 10.0   # seconds
RECONNECT_INTERVAL = 2.0         # seconds between tries once the client gave up
#: while jobs run, the cluster's workers are read this often (seconds), in
#: case a worker left without its event reaching us; an idle queue never looks
LOOK_INTERVAL = 5.0
#: how often our client sends its batched messages (a job's submit) to the
#: scheduler: Dask's client waits up to 10 ms, which one job per slot
#: round trip pays in full; its workers use 2 ms (W1 +20 % measured)
CLIENT_BATCH_INTERVAL = 0.002


class DaskUnreachable(ConnectionError):
    """The Dask scheduler cannot be reached; the message names its address."""


class _Job:
    """A job handed to Dask: its future and the worker it is pinned to."""
    __slots__ = ("seq", "future", "worker")

    def __init__(self, seq: int, future: Any, worker: str):
        self.seq, self.future, self.worker = seq, future, worker


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
        self._running: Dict[int, _Job] = {}  # seq -> handed to Dask, not yet done
        self._cv = threading.Condition()
        self._inbox: "collections.deque[tuple]" = collections.deque()
        self._woken = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        #: finished jobs whose results the fetcher thread gathers and records,
        #: so that a gather (a round trip to a worker) never delays a dispatch
        self._fetch: "queue.SimpleQueue[Optional[List[_Job]]]" = queue.SimpleQueue()
        self._fetcher: Optional[threading.Thread] = None
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
        """On a (new) scheduler: our plugin on every worker, its events followed."""
        from ..worker.dask_host import EzpqPlugin
        client.register_plugin(EzpqPlugin(self.plugin), name=self.plugin)
        client.subscribe_topic("all", self._on_event)
        self._comm = client.scheduler_comm
        if hasattr(self._comm, "interval"):
            self._comm.interval = CLIENT_BATCH_INTERVAL
        self._look = True

    def _resync(self) -> None:
        """The client reconnected by itself (a new scheduler stream): the
        scheduler may be a new one, without our plugin or subscription."""
        logger.info("dask: reconnected to %s", self.address)
        try:
            self._setup(self._client)
        except Exception as e:
            logger.warning("dask: cannot set up on %s again: %s", self.address, e)

    def start(self, prestart: bool = True) -> None:
        self._fetcher = threading.Thread(target=self._fetch_loop, name="ezpq-dask-results", daemon=True)
        self._fetcher.start()
        self._thread = threading.Thread(target=self.run, name="ezpq-dask", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Running jobs end ``lost``; our plugin leaves the workers (killing
        its processes there); the client closes."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(10)
        if self._fetcher is not None:   # the results already fetched are recorded first
            self._fetch.put(None)
            self._fetcher.join(10)
        with self.state.cond:
            jobs = list(self._running.values())
            self._running.clear()
            for job in jobs:
                self.state.finish(job.seq, Outcome(JobStatus.LOST, -9,
                                                   exception="the server stopped while it ran"))
        client = self._client
        if client is not None:
            try:
                if jobs:
                    client.cancel([j.future for j in jobs], force=True)
                client.unregister_worker_plugin(self.plugin)
                client.unsubscribe_topic("all")
            except Exception as e:   # the scheduler is gone: its workers' lifelines end the processes
                logger.debug("dask: could not unregister the plugin: %s", e)
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
        done: List[Tuple[int, Any]] = []
        left: List[str] = []
        for item in items:
            if item[0] == "done":
                done.append(item[1:])
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
        finished: List[_Job] = []
        cancel: List[Any] = []
        with self.state.cond:
            for seq, future in done:
                job = self._running.get(seq)
                if job is None or job.future is not future:
                    continue   # ended already (cancelled, its worker left)
                if future.status == "finished":
                    del self._running[seq]
                    self.state.release(seq)   # its thread is free: the next job may go now
                    finished.append(job)
                else:
                    self._end(job, *self._why_not_finished(job))
            for job in list(self._running.values()):
                if job.worker in left or job.worker not in self.cluster:
                    self._end(job, JobStatus.LOST, -9,
                              f"the Dask worker {job.worker} left while it ran the job")
                    cancel.append(job.future)
            cancel += self._take_kills()
            sends = self._dispatch()
        if cancel:
            try:
                self._client.cancel(cancel, force=True)
            except Exception as e:
                logger.warning("dask: cancel failed: %s", e)
        for rec_fields in sends:
            self._submit(*rec_fields)
        if finished:
            self._fetch.put(finished)

    def _why_not_finished(self, job: _Job) -> Tuple[JobStatus, int, str]:
        """A future that ended without our result: the task raised (our code
        on the host failed), or Dask cancelled it (the scheduler was lost)."""
        if job.future.status == "error":
            try:
                exc = job.future.exception(timeout=1)
            except Exception as e:
                exc = e
            return JobStatus.LOST, -9, f"the Dask task failed on {job.worker}: {type(exc).__name__}: {exc}"
        return JobStatus.LOST, -9, (f"the Dask task was cancelled ({job.future.status}): the connection "
                                    f"to the scheduler at {self.address} was lost while it ran")

    def _end(self, job: _Job, status: JobStatus, exitcode: int, why: str) -> None:
        """Record a job that will send no result. Caller holds the lock."""
        self._running.pop(job.seq, None)
        self.state.finish(job.seq, Outcome(status, exitcode, exception=why, host=_host_of(job.worker)))

    def _take_kills(self) -> List[Any]:
        """Cancels and skips of running jobs: recorded now, their futures
        returned for cancelling (the plugin kills the tree). Caller holds the lock."""
        futures = []
        later = []
        for seq, status, why in self.state.take_kill_requests():
            job = self._running.get(seq)
            if job is None:
                rec = self.state.records.get(seq)
                if rec is not None and rec.phase.name == "RUNNING":
                    later.append((seq, status, why))   # picked, not yet submitted: next round
                continue
            self._end(job, status, -9, why)
            futures.append(job.future)
        if later:
            self.state.kill_requests.extend(later)
            self._woken = True
        return futures

    # ------------------------------------------------------------- dispatch
    def _dispatch(self) -> List[tuple]:
        """Pick jobs while Dask has a free thread and we a slot; each goes
        to the worker with the most free threads. Caller holds the lock."""
        if self._client is None or not self.cluster:
            return []
        busy: Dict[str, int] = collections.Counter(j.worker for j in self._running.values())
        free = {w: n - busy.get(w, 0) for w, n in self.cluster.items()}
        cap = min(self.slots, sum(self.cluster.values()))
        sends = []
        while self.state.n_running < cap:
            worker = max(free, key=free.get)
            if free[worker] <= 0:
                break
            rec = self.state.pick()
            if rec is None:
                break
            free[worker] -= 1
            rec.pid, rec.host = None, _host_of(worker)   # the pid is the host's, known at the end
            env = self.envs.get(rec.env_id)
            job = _Job(rec.seq, None, worker)
            self._running[rec.seq] = job
            sends.append((job, rec.fn_blob, rec.args_blob, None if env is None else list(env),
                          rec.runner == "thread", rec.timeout or 0, rec.max_memory))
        return sends

    def _submit(self, job: _Job, fn_blob: bytes, args_blob: bytes, env, as_thread: bool,
                timeout: float, max_memory: Optional[int]) -> None:
        from ..worker.dask_host import run_job
        seq = job.seq
        try:
            future = self._client.submit(run_job, self.plugin, fn_blob, args_blob, env, as_thread, timeout,
                                         max_memory, key=f"ezpq-{self.token}-{seq}", workers=[job.worker],
                                         allow_other_workers=False, pure=False, retries=0)
        except Exception as e:
            with self.state.cond:
                self._end(job, JobStatus.LOST, -9, f"could not hand the job to Dask: {e}")
            return
        with self.state.cond:
            if self._running.get(seq) is job:
                job.future = future
            else:   # ended meanwhile (its worker left, a cancel)
                future.cancel()
                return
        future.add_done_callback(lambda f, seq=seq: self._post(("done", seq, f)))

    # -------------------------------------------------------------- results
    def _fetch_loop(self) -> None:
        """The fetcher thread: gather and record finished jobs, batch by batch."""
        while True:
            batch = self._fetch.get()
            if batch is None:
                return
            while True:   # what piled up meanwhile, in one gather
                try:
                    more = self._fetch.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._fetch.put(None)
                    break
                batch += more
            self._record(batch)
            self.wake()   # what they released (a lane's next job, a retry) goes out

    def _record(self, jobs: List[_Job]) -> None:
        """Fetch finished jobs' results (outside the lock) and record them."""
        try:
            results = self._client.gather([j.future for j in jobs])
        except Exception:   # one of them is gone (its worker died since): each on its own
            results = []
            for job in jobs:
                try:
                    results.append(self._client.gather(job.future))
                except Exception as e:
                    results.append(e)
        outcomes = []
        for job, res in zip(jobs, results):
            if isinstance(res, Exception):
                outcomes.append((job, (Outcome(JobStatus.LOST, -9, exception=(
                    f"the result of the job could not be fetched from the Dask worker {job.worker}: "
                    f"{type(res).__name__}: {res}"), host=_host_of(job.worker)), b"")))
            else:
                outcomes.append((job, _outcome(res, job.worker)))
        grown = False
        if self.logs is not None:
            for job, (_, log) in outcomes:
                if log:
                    rec = self.state.records.get(job.seq)
                    if rec is not None:
                        grown = self.logs.append(self.logs.sink(job.seq, rec.uid), log) or grown
        with self.state.cond:
            if grown:
                self.state._changed()
            for job, (outcome, _) in outcomes:
                self.state.finish(job.seq, outcome)

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
                for job in list(self._running.values()):
                    self._end(job, JobStatus.LOST, -9, f"the connection to the Dask scheduler at "
                                                       f"{self.address} was lost while the job ran")
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
