"""``Queue``: ezpq's API, served by an ezpq_mgr server.

With no address (and no ``$EZPQ_ADDRESS``) a Queue starts a private server
(``embedded.py``) and stops it in ``dispose()``; with one, it connects to a
shared ``ezpq-server``. Either way the client only pickles jobs, talks to
the server's ``Service`` through ``connection.Remote``, and unpickles
results. A daemon thread per Queue takes the server's notices about its finished jobs: it
prints tracebacks (unless ``suppress_errors``), runs ``callback`` and writes
``log_file`` rows, then tells the server the jobs are processed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, List, Optional

from .. import schema, serialize
from .connection import Remote, default_authkey, parse_address
from .delivered import Delivered
from .embedded import PrivateServer
from ..errors import ConnectionError, EzpqError, JobNotFound, ServerLimit
from ..job import ERROR_STATES, Job, normalize_args, plain_name
from .jobdict import log_csv, to_job_dict
from ..messages import Processed
from ..worker.workerproto import CANNOT_LOAD

logger = logging.getLogger(__name__)

__all__ = ["Queue"]

FLUSH_DELAY = 0.002   # seconds a buffered put may wait for company
FLUSH_SIZE = 1000     # records per put batch
FLUSH_IDLE = 0.05     # seconds without puts before the flusher sleeps until woken
ID_BLOCK = 1024       # job ids reserved at a time by a buffering client


def _runner_name(job_runner: Any) -> str:
    import threading as _threading
    if job_runner in ("process", "thread"):
        return job_runner
    if isinstance(job_runner, type):
        if issubclass(job_runner, _threading.Thread):
            return "thread"
        if issubclass(job_runner, multiprocessing.process.BaseProcess):
            return "process"
    raise ValueError(
        f"job_runner must be multiprocessing.Process, threading.Thread, 'process' or 'thread', "
        f"not {job_runner!r}")


class Queue:
    """A parallel priority queue of jobs (ezpq 0.2.2's API).

    Args (ezpq's, plus ``address``/``authkey``/``start_method``): see the README.
    """

    def __init__(
        self,
        n_workers: Optional[int] = None,
        max_size: int = 0,
        job_runner: Any = multiprocessing.Process,
        auto_remove: bool = False,
        auto_start: bool = True,
        auto_stop: bool = False,
        callback: Optional[Callable[[dict], Any]] = None,
        log_file: Optional[str] = None,
        poll: float = 0.1,
        show_progress: bool = False,
        qid: Optional[str] = None,
        address: Any = None,
        authkey: Optional[bytes] = None,
        start_method: Optional[str] = None,
        state_dir: Optional[str] = None,
        buffer_puts: Optional[bool] = None,
        dask: Optional[str] = None,
    ):
        self._runner = _runner_name(job_runner)
        if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int)
                                      or n_workers < 1):
            raise ValueError(f"n_workers must be an int >= 1, got {n_workers!r}")
        if (isinstance(max_size, bool) or not isinstance(max_size, int)
                or not 0 <= max_size <= schema.MAX_SETTING):
            raise ValueError(f"max_size must be an int in 0..{schema.MAX_SETTING}, got {max_size!r}")
        if n_workers is not None and n_workers > schema.MAX_SETTING:
            raise ValueError(f"n_workers must be at most {schema.MAX_SETTING}, got {n_workers!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if qid is not None:
            schema.check_qid(qid)
        if buffer_puts is not None and not isinstance(buffer_puts, bool):
            raise TypeError(f"buffer_puts must be True, False or None, not {type(buffer_puts).__name__}")
        if buffer_puts and max_size:
            raise ValueError("buffer_puts=True cannot be combined with max_size: a full queue must "
                             "refuse the put when it is made")
        start_method = start_method or os.environ.get("EZPQ_START_METHOD") or None
        if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method must be one of {multiprocessing.get_all_start_methods()}, "
                             f"not {start_method!r}")
        self._qid = qid or uuid.uuid4().hex[:8]
        #: a named (shared) qid: get(wait=True, timeout=T) and wait(timeout=T)
        #: wait up to T for jobs others put too (a private queue: "nothing
        #: left, return now", as ezpq)
        self._collector = qid is not None
        self._token = uuid.uuid4().hex
        self._callback = callback
        self._log_file = log_file
        self.show_progress = show_progress
        self._max_size = max_size
        self._server: Optional[PrivateServer] = None
        self._disposed = False
        if address is None:
            address = os.environ.get("EZPQ_ADDRESS") or None
        if state_dir is not None and address is not None:
            raise ValueError("state_dir is for the embedded queue; a shared server keeps its "
                             "state with ezpq-server --state-dir")
        if dask is not None:
            schema.check_dask_address(dask)
            if address is not None:
                raise ValueError("dask is for the embedded queue; a shared server runs its jobs on "
                                 "Dask with ezpq-server --dask")
        if address is None:
            self._server = PrivateServer(n_workers or os.cpu_count() or 1, start_method,
                                         prestart=self._runner == "process",
                                         state_dir=None if state_dir is None else os.fspath(state_dir),
                                         dask=dask)
            address, key = self._server.address, self._server.authkey
        else:
            address = parse_address(address)
            key = authkey if authkey is not None else default_authkey()
        try:
            self._remote = Remote(address, key, shared=self._server is None)
            holding = callback is not None or log_file is not None
            # a private queue (no qid given) is disposed of by the server if we
            # vanish without dispose()/detach(), as dispose() would
            hello = self._remote.call("hello", self._token, os.getcwd(),
                                      [p for p in sys.path if isinstance(p, str)], holding,
                                      None if qid is not None else self._qid)
            self._env_id = hello["env_id"]
            settings = {"max_size": max_size, "auto_stop": auto_stop, "auto_remove": auto_remove}
            if not auto_start:
                settings["paused"] = True
            if self._server is None and n_workers is not None:
                settings["cap"] = n_workers
            self._remote.call("configure", self._qid, schema.check_settings(settings))
        except BaseException:
            if self._server is not None:
                self._server.stop()
            raise
        self._unloadable_reported: set = set()
        self._notices = threading.Thread(target=self._take_notices, name=f"ezpq-notices-{self._qid}",
                                         daemon=True)
        self._notices.start()
        # put() buffers records; a flusher thread sends them within FLUSH_DELAY
        # (any other call sends them first), so 10,000 puts are not 10,000 round trips.
        # By default not on a durable server (--state-dir): there a put returns
        # once its job is committed (the server replies after the commit), so
        # none is lost; nor on a shared qid (others see a job once put returns).
        # ``buffer_puts`` says otherwise: True buffers there too (flush() is
        # then the point where they are on the server, committed), False never.
        if buffer_puts is None:
            self._buffered = qid is None and max_size == 0 and not self._remote.durable
        else:
            self._buffered = buffer_puts
        self._buffer: List[dict] = []
        self._buffer_cond = threading.Condition(threading.RLock())
        self._send_lock = threading.Lock()
        self._next_id = self._id_end = 1   # ids reserved and not yet given out: next_id..id_end-1
        self._flush_error: Optional[BaseException] = None
        self._flusher_idle = False
        self._flusher = threading.Thread(target=self._flush_loop, name=f"ezpq-flush-{self._qid}",
                                         daemon=True)
        self._flusher.start()

    # ----------------------------------------------------------- internals
    def _call(self, method: str, *args):
        if self._disposed:
            raise EzpqError(f"queue {self._qid!r} is disposed")
        if self._buffered:
            # buffered puts reach the server first, in the same round trip;
            # a flush in flight on the flusher thread (its batch already
            # taken from the buffer) is waited for, so that a get() or
            # wait() right after put() never looks before the jobs arrive
            return self._flush(method, args)
        return self._remote.call(method, *args)

    def _flush(self, then: Optional[str] = None, args: tuple = ()):
        """Send the buffered puts, in order, and then make call ``then`` if
        given (its result is returned). ``put()`` only holds the buffer lock
        for an append; the send happens under ``_send_lock`` alone."""
        lock, held = self._send_lock, [True]

        def release() -> None:   # once the batch is on the wire: a parked then-call holds nobody
            if held[0]:
                held[0] = False
                lock.release()

        lock.acquire()
        try:
            with self._buffer_cond:
                if self._flush_error is not None:
                    error, self._flush_error = self._flush_error, None
                    raise error
                batch, self._buffer = self._buffer, []
            if batch and then is not None and not self._remote.durable:
                return self._remote.call("put_then", self._qid, batch, then, list(args), sent=release)
            # (a durable server: the put alone first, under the send lock, so
            # that a flush() on another thread returns only once it is committed)
            if batch:
                self._remote.call("put", self._qid, batch)
            release()
            if then is not None:
                return self._remote.call(then, *args)
        finally:
            release()

    def _flush_loop(self) -> None:
        """Daemon thread: send buffered puts at most FLUSH_DELAY s after they were made.

        While puts keep coming it ticks every FLUSH_DELAY by itself; only
        after FLUSH_IDLE of quiet does it sleep until a put wakes it. Waking
        it on every put would cost each put a GIL hand-off (~30 us)."""
        quiet_since = time.monotonic()
        while True:
            with self._buffer_cond:
                if not self._buffer and time.monotonic() - quiet_since > FLUSH_IDLE:
                    self._flusher_idle = True
                    self._buffer_cond.wait_for(lambda: self._buffer or self._disposed)
                    self._flusher_idle = False
                if self._disposed:
                    return
                self._buffer_cond.wait(FLUSH_DELAY)
                if self._disposed:
                    return
                if self._buffer:
                    quiet_since = time.monotonic()
            try:
                self._flush()
            except BaseException as exc:  # reported by the next call
                with self._buffer_cond:
                    self._flush_error = exc

    def _take_id(self) -> int:
        """The next of the ids reserved for this client's puts (buffer lock held)."""
        if self._next_id == self._id_end:
            self._next_id = self._remote.call("reserve_ids", self._qid, ID_BLOCK)
            self._id_end = self._next_id + ID_BLOCK
        job_id = self._next_id
        self._next_id += 1
        return job_id

    def _buffer_put(self, record: dict) -> int:
        with self._buffer_cond:
            job_id = self._next_id
            if job_id == self._id_end:   # the reserved block is used up
                job_id = self._take_id()
            else:
                self._next_id = job_id + 1
            record["id"] = job_id
            self._buffer.append(record)
            full = len(self._buffer) >= FLUSH_SIZE
            if self._flusher_idle and len(self._buffer) == 1:
                self._buffer_cond.notify()
        if full:
            self._flush()
        return job_id

    def _record(self, job: Job, fn_blob: Optional[bytes] = None) -> dict:
        """Check and pickle one job; raises before anything is sent."""
        if not isinstance(job, Job):
            raise TypeError(f"submit() takes an ezpq_mgr.Job, not {type(job).__name__}")
        if self._runner == "thread" and job.timeout > 0:
            raise ValueError("thread jobs cannot be killed: a timeout needs job_runner=Process")
        if self._runner == "thread" and job.max_memory:
            raise ValueError("thread jobs cannot be killed: max_memory needs job_runner=Process")
        record = {
            "client": self._token,
            "name": plain_name(job.name),
            "priority": job.priority,
            "lane_key": None if job.lane is None else serialize.dump_value(job.lane, "lane"),
            "lane_text": None if job.lane is None else str(job.lane),
            "timeout": float(job.timeout),
            "function": getattr(job.function, "__name__", type(job.function).__name__),
            "fn_blob": fn_blob if fn_blob is not None else serialize.dump_function(job.function),
            "args_blob": serialize.dump_call_args(job.args, job.kwargs),
            "runner": self._runner,
            "suppress_errors": job.suppress_errors,
            "stop_on_lane_error": job.stop_on_lane_error,
            "retries": job.retries,
            "max_memory": job.max_memory,
            "env_id": self._env_id,
        }
        if job.after is not None:
            record["after"] = list(job.after)
        return self._remote.check_record(record)

    def _put_jobs(self, jobs: List[Job]) -> List[int]:
        """Pickle every job first (all or nothing), then send them in one call."""
        fn_blobs = {}  # one pickle per function (the jobs keep the functions alive, ids stay unique)
        records = []
        for job in jobs:
            blob = fn_blobs.get(id(job.function))
            if blob is None:
                blob = fn_blobs[id(job.function)] = serialize.dump_function(job.function)
            records.append(self._record(job, blob))
        if not records:
            return []
        return self._call("put", self._qid, records)

    def _take_notices(self) -> None:
        """Daemon thread: react to this client's finished jobs."""
        while True:
            try:
                notices = self._remote.call("take_notices", self._token, None)  # parked until some
            except Exception:
                return
            if notices is None:
                return
            processed = []
            for snap in notices:
                job = to_job_dict(snap)
                if job["exception"] and not snap["suppress_errors"] and job["status"] in ERROR_STATES \
                        and self._first_report(job):
                    sys.stderr.write(f"ezpq job {job['id']} ({job['function']}) {job['status']}:\n"
                                     f"{job['exception']}\n")
                    sys.stderr.flush()
                if snap["held"]:
                    processed.append(Processed(snap["seq"], self._post_process(job)))
            if processed:
                try:
                    try:
                        self._remote.call("mark_processed", processed)
                    except ServerLimit as exc:   # the results do not fit: processed all the same, without them
                        sys.stderr.write(f"ezpq: callback results not kept: {exc}\n")
                        self._remote.call("mark_processed", [Processed(p.seq, None) for p in processed])
                except Exception:
                    return

    def _first_report(self, job: dict) -> bool:
        """Print a failed job's error? A function the worker cannot load is
        reported once per function, not once per job of a map."""
        if not job["exception"].startswith(CANNOT_LOAD):
            return True
        if job["function"] in self._unloadable_reported:
            return False
        self._unloadable_reported.add(job["function"])
        return True

    def _post_process(self, job: dict) -> Optional[bytes]:
        result = None
        if self._callback is not None:
            try:
                result = self._callback(job)
            except Exception as exc:
                result = str(exc)
            job["callback"] = result
        if self._log_file is not None:
            from datetime import datetime
            job["processed"] = datetime.now()
            log_csv(job, self._log_file)
        if result is None:
            return None
        try:
            return serialize.dump_value(result, "callback result")
        except EzpqError:
            return serialize.dump_value(repr(result))

    @staticmethod
    def _server_timeout(timeout: Any) -> Optional[float]:
        """A library call's timeout (0, None, inf: none) as a blocking call's
        timeout at the server (None: none; the call is parked until done)."""
        return schema.client_timeout(timeout) or None

    # ------------------------------------------------------------- ezpq API
    def __call__(self, fun: Callable) -> Callable:
        """Decorator: ``@Queue(6)`` makes ``f(iterable=...)`` map f and dispose."""
        self.start()

        def wrapped_f(iterable, *args, **kwargs):
            try:
                ids = self._put_jobs([Job(fun, args=[x] + list(args), kwargs=kwargs or None)
                                      for x in iterable])
                self.wait(show_progress=self.show_progress)
                return self._collect_ids(ids)
            finally:
                self.dispose()

        wrapped_f.__wrapped__ = fun
        wrapped_f.__name__ = getattr(fun, "__name__", "wrapped_f")
        return wrapped_f

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc) -> None:
        self.dispose()

    def __repr__(self) -> str:
        where = "embedded" if self._server else self._remote.where
        return f"<ezpq_mgr.Queue qid={self._qid!r} {where}{' disposed' if self._disposed else ''}>"

    @property
    def qid(self) -> str:
        return self._qid

    @property
    def is_running(self) -> bool:
        """True while jobs of this queue may start (ezpq's pulse is running)."""
        if self._disposed:
            return False
        return not self._call("counts", self._qid)["paused"]

    log_csv = staticmethod(log_csv)

    def start(self) -> None:
        """Let this queue's waiting jobs start (after auto_start=False or _stop())."""
        self._call("configure", self._qid, {"paused": False})

    def _stop(self) -> None:
        """Hold this queue's waiting jobs (running ones go on), as ezpq's _stop()."""
        self._call("configure", self._qid, {"paused": True})

    def pause(self) -> None:
        """No more of this queue's jobs start until ``resume()`` (running
        ones go on; puts are still taken). The same as ezpq's ``_stop()``
        and ``ezpq pause QID``; a paused queue stays paused after its
        clients leave."""
        self._stop()

    def resume(self) -> None:
        """Let this queue's waiting jobs start again (``start()``, ``ezpq resume QID``)."""
        self.start()

    def set_priority(self, job_id: int, priority: int) -> bool:
        """Give a waiting job another priority (lower runs first); it is
        re-sorted at once (in a lane: within its lane, which still runs one
        job at a time). False if it is no longer waiting (running or
        finished); ``JobNotFound`` for an id this queue never gave out."""
        job_id = schema.check_int("job_id", job_id, 1, schema.INT64_MAX)
        priority = schema.check_priority(priority)
        if self._buffered and job_id >= self._next_id:
            raise JobNotFound(f"no job {job_id} in queue {self._qid!r}")
        return self._call("set_priority", self._qid, job_id, priority)

    def put(self, function: Callable, args: Any = None, kwargs: Optional[dict] = None,
            name: Any = None, priority: int = 100, lane: Any = None, timeout: float = 0,
            suppress_errors: bool = False, stop_on_lane_error: bool = False,
            retries: int = 0, max_memory: Optional[int] = None,
            after: Optional[Iterable[int]] = None) -> int:
        """Create a job and submit it; returns its id. ``after``: ids of
        this queue's jobs it waits for (see ``submit``)."""
        return self.submit(Job(function, args, kwargs, name, priority, lane, timeout,
                               suppress_errors, stop_on_lane_error, retries, max_memory, after))

    def submit(self, job: Job) -> int:
        """Submit an ``ezpq_mgr.Job``; returns its id.

        On a private queue (no ``qid`` given, no ``max_size``) of an
        in-memory server the job is buffered and sent within FLUSH_DELAY or
        by this queue's next call, so puts in a loop travel in batches;
        nobody else can see the queue, so nobody can tell. A shared ``qid``,
        a ``max_size`` or a durable server (``--state-dir``,
        ``Queue(state_dir=)``) sends it at once (other clients see it when
        put returns; ``QueueFull`` is raised here; on a durable server the
        job is committed when put returns). ``Queue(buffer_puts=True)``
        buffers on a shared ``qid`` and a durable server too: put returns
        at once and ``flush()`` (or the queue's next call) is where the jobs
        are on the server, committed; ``buffer_puts=False`` never buffers."""
        record = self._record(job)
        if self._disposed:
            raise EzpqError(f"queue {self._qid!r} is disposed")
        if self._buffered and job.after is not None:
            # a job with ``after`` (ids of this queue's jobs already put: it
            # runs once they all completed, and is ``skipped`` if one ends
            # otherwise) is never buffered: the puts before it go first,
            # then it, with the next id, so that an id not on the server
            # (never given out, the job itself, a job already collected)
            # raises ``ValueError`` here, and nothing is enqueued
            self._flush()
            with self._buffer_cond:
                record["id"] = self._take_id()
            return self._remote.call("put", self._qid, [record])[0]
        if not self._buffered:
            return self._call("put", self._qid, [record])[0]
        return self._buffer_put(record)

    def _collect_ids(self, ids: List[int]) -> List[dict]:
        return [to_job_dict(s) for s in self._call("pop_ids", self._qid, ids)
                if s is not None and self._first(s)]

    def _map_jobs(self, jobs: List[Job], show_progress: bool) -> List[dict]:
        ids = self._put_jobs(jobs)
        if show_progress:
            self._progress(lambda below, t: self._call("wait_client", self._token, below, t), len(ids))
        else:
            self._call("wait_client", self._token, 1, None)
        return self._collect_ids(ids)

    def map(self, function: Callable, iterable: Iterable, args: Any = None,
            kwargs: Optional[dict] = None, timeout: float = 0, show_progress: bool = False) -> List[dict]:
        """Run ``function(x, *args, **kwargs)`` for each x; job dicts in input order."""
        extra = normalize_args(args) or []
        return self._map_jobs([Job(function, [x] + extra, kwargs, timeout=timeout)
                               for x in _iterable(iterable)], show_progress)

    def starmap(self, function: Callable, iterable: Iterable, args: Any = None,
                kwargs: Optional[dict] = None, timeout: float = 0, show_progress: bool = False) -> List[dict]:
        """Run ``function(*x, *args, **kwargs)`` for each x; job dicts in input order."""
        extra = normalize_args(args) or []
        jobs = []
        for x in _iterable(iterable):
            if not isinstance(x, (list, tuple)):
                raise TypeError(f"starmap items must be lists or tuples, got {type(x).__name__}")
            jobs.append(Job(function, list(x) + extra, kwargs, timeout=timeout))
        return self._map_jobs(jobs, show_progress)

    def starmapkw(self, function: Callable, iterable: Iterable, args: Any = None,
                  kwargs: Optional[dict] = None, timeout: float = 0, show_progress: bool = False) -> List[dict]:
        """Run ``function(*args, **x, **kwargs)`` for each dict x; job dicts in input order."""
        jobs = []
        for x in _iterable(iterable):
            if not isinstance(x, dict):
                raise TypeError(f"starmapkw items must be dicts, got {type(x).__name__}")
            jobs.append(Job(function, args, {**x, **(kwargs or {})}, timeout=timeout))
        return self._map_jobs(jobs, show_progress)

    def flush(self) -> None:
        """Send the puts this queue buffered (see ``buffer_puts``); returns
        once the server has them: on a durable server, once they are
        committed. Any other call of this queue sends them first too; a
        queue that does not buffer has nothing to send."""
        if self._disposed:
            raise EzpqError(f"queue {self._qid!r} is disposed")
        if self._buffered:
            self._flush()

    def wait(self, poll: float = 0, timeout: float = 0, show_progress: bool = False) -> int:
        """Block until this queue has no waiting or working job (or ``timeout``).

        Returns how many are still waiting or working (0 = all done). On a
        shared ``qid`` (one was given) with a ``timeout``, an empty queue is
        not done yet: it waits up to ``timeout`` for jobs to arrive (put by
        any client of this user) and finish, or returns at once when
        finished jobs wait to be collected. A private queue returns at once
        when nothing waits or works, as ezpq's."""
        server_timeout = self._server_timeout(timeout)
        if show_progress:
            return self.waitpb(poll, timeout)
        if self._collector and server_timeout is not None:
            return self._call("wait_pending", self._qid, 1, server_timeout, True)
        return self._call("wait_pending", self._qid, 1, server_timeout)

    def waitpb(self, poll: float = 0, timeout: float = 0) -> int:
        """``wait()`` with a tqdm progress bar."""
        total = self.size(waiting=True, working=True)
        return self._progress(lambda below, t: self._call("wait_pending", self._qid, below, t),
                              total, timeout)

    def _progress(self, step: Callable[[int, Optional[float]], int], total: int, timeout: float = 0) -> int:
        """Update a progress bar each time fewer jobs are left: ``step(left,
        timeout)`` is answered by the server as soon as fewer than ``left``
        are (one call per change, no polling)."""
        from .progress import bar
        timeout = self._server_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        left = total
        with bar(total) as pb:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                n = step(max(left, 1), wait)
                if n < left:
                    pb.update(left - n)
                    left = n
                if n == 0 or (deadline is not None and time.monotonic() >= deadline):
                    return n

    def get(self, wait: bool = False, poll: float = 0, timeout: float = 0) -> Optional[dict]:
        """Pop the best completed job (lowest priority, then earliest), or None.

        Blocks when ``wait``, ``poll`` or ``timeout`` is given, until a job
        completes, the queue is empty, or ``timeout`` passes. On a shared
        ``qid`` with a ``timeout``, an empty queue is no answer: it waits up
        to ``timeout`` for a job to complete, one put later included (a
        collector started before its putters)."""
        if not (wait or poll or timeout):
            while True:
                job = self._call("get", self._qid, False, 0)
                if job is None or self._first(job):
                    return None if job is None else to_job_dict(job)
        server_timeout = self._server_timeout(timeout)
        deadline = None if server_timeout is None else time.monotonic() + server_timeout
        while True:
            if self._collector and server_timeout is not None:
                job = self._call("get", self._qid, True, server_timeout, True)
            else:
                job = self._call("get", self._qid, True, server_timeout)
            if job is None or self._first(job):
                return None if job is None else to_job_dict(job)
            if deadline is not None:   # handed again after a restart: this process had it
                server_timeout = max(deadline - time.monotonic(), 0.001)

    def collect(self, n: int = 0) -> List[dict]:
        """Pop ``n`` completed jobs (all when n <= 0), best first."""
        return [to_job_dict(s) for s in self._call("collect", self._qid, int(n)) if self._first(s)]

    def _first(self, job: dict) -> bool:
        """False for a result a durable server hands out again after a
        restart that this process already had (client/delivered.py)."""
        return Delivered.first(self._remote.state_id, job["seq"])

    def size(self, waiting: bool = False, working: bool = False, completed: bool = False) -> int:
        """Jobs waiting + working + completed (only the ones asked, if any)."""
        c = self._call("counts", self._qid)
        if not (waiting or working or completed):
            waiting = working = completed = True
        return (c["waiting"] if waiting else 0) + (c["working"] if working else 0) + (
            c["completed"] if completed else 0)

    def clear_waiting(self) -> int:
        """Cancel every waiting job of this queue; they go to the completed queue."""
        return self._call("cancel_all", self._qid, None, False)

    def stop_all(self, wait: bool = True) -> None:
        """Cancel waiting jobs and stop running ones; optionally wait for the stops."""
        self._call("cancel_all", self._qid, None, True)
        if wait:
            self.wait()

    def cancel(self, job_id: int) -> bool:
        """Cancel a waiting job or kill a running one; False if it had
        finished (collected or not); ``JobNotFound`` for an id this queue
        never gave out (one it reserved for later puts included)."""
        job_id = int(job_id)
        if self._buffered and job_id >= self._next_id:
            raise JobNotFound(f"no job {job_id} in queue {self._qid!r}")
        return self._call("cancel", self._qid, job_id)

    def log(self, job_id: int) -> str:
        """The job's stdout and stderr so far, as text (UTF-8; undecodable
        bytes replaced): written as it runs, kept after a timeout, kill or
        cancel, until the job is collected (``get``/``collect``; then
        ``JobNotFound``, as for an id never given out). "" when it printed
        nothing. At most the server's ``--max-log`` bytes are kept."""
        job_id = schema.check_int("job_id", job_id, 1, schema.INT64_MAX)   # the server checks it again
        parts, offset = [], 0
        while True:
            got = self._call("job_log", job_id, offset, self._qid)
            data = got["data"].encode("latin-1")
            parts.append(data)
            offset += len(data)
            if not data or offset >= got["size"]:
                return b"".join(parts).decode("utf-8", "replace")

    def jobs(self) -> List[dict]:
        """Snapshot of every job of this queue still on the server, in id order."""
        return [to_job_dict(s) for s in self._call("jobs", self._qid)]

    def n_submitted(self) -> int:
        return self._call("counts", self._qid)["submitted"]

    def n_completed(self) -> int:
        return self._call("counts", self._qid)["n_completed"]

    def n_workers(self) -> int:
        """Concurrent jobs allowed for this queue."""
        cap = self._call("counts", self._qid)["cap"]
        return cap or self._call("n_workers")

    def set_workers(self, n: int) -> None:
        """Change concurrency: the private server's workers, or this queue's cap."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= schema.MAX_SETTING:
            raise ValueError(f"n must be an int in 1..{schema.MAX_SETTING}, got {n!r}")
        if self._server is not None:
            self._call("set_workers", n)
        else:
            self._call("configure", self._qid, {"cap": n})

    def n_workers_free(self) -> int:
        return self.n_workers() - self._call("counts", self._qid)["running"]

    def is_working(self) -> bool:
        return self._call("counts", self._qid)["working"] > 0

    def is_busy(self) -> bool:
        return self.n_workers_free() <= 0 or self._call("counts", self._qid)["waiting"] > 0

    def is_empty(self) -> bool:
        return self.size() == 0

    def is_full(self) -> bool:
        return self._max_size > 0 and self.size() >= self._max_size

    def remaining_jobs(self) -> int:
        c = self._call("counts", self._qid)
        return c["submitted"] - c["n_completed"]

    def wait_worker(self, poll: float = 0, timeout: float = 0) -> bool:
        """Block until a worker is free for this queue; True if one is."""
        return self._call("wait_free", self._qid, self._server_timeout(timeout))

    def dispose(self) -> None:
        """Cancel this client's waiting jobs, stop its running ones, wait, disconnect.

        Embedded: also stops the private server. Jobs other clients put on
        the same qid are left alone."""
        if self._disposed:
            return
        try:
            cancelled = self._remote.call("cancel_all", self._qid, self._token, True)
            if cancelled and self._server is None:
                # on a shared server this is rarely what a script that just
                # submitted meant: say it once, and how to leave them running
                sys.stderr.write(f"ezpq: dispose() of queue {self._qid!r} cancelled {cancelled} of your "
                                 f"jobs (waiting or running); Queue.detach() leaves them running\n")
            self._remote.call("wait_client", self._token, 1, 30.0)
            self._remote.call("goodbye", self._token, self._qid, True)
        except ConnectionError as exc:  # the server is gone: nothing left to release there
            logger.warning("dispose(): %s", exc)
        finally:
            self._release()

    def detach(self) -> None:
        """Disconnect and leave this client's jobs to run (shared servers)."""
        if self._disposed:
            return
        try:
            self._flush()
            self._remote.call("goodbye", self._token, self._qid, False)
        finally:
            self._release()

    def _release(self) -> None:
        with self._buffer_cond:
            self._disposed = True
            self._buffer.clear()
            self._buffer_cond.notify_all()
        self._flusher.join(10)
        self._notices.join(10)
        self._remote.close()
        if self._server is not None:
            self._server.stop()


def _iterable(iterable: Any) -> Iterable:
    if not hasattr(iterable, "__iter__"):
        raise TypeError(f"iterable must be iterable, not {type(iterable).__name__}")
    return iterable
