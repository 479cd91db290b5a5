"""Jobs: the user's ``Job`` request, the server's ``JobRecord``, and their states.

A ``Job`` is what a user builds (ezpq's class, same signature). The client
turns it into a ``JobRecord``: plain data only (numbers, strings, bytes), so
the server can keep, copy and journal it without ever unpickling user
objects. Function, arguments, lane and output travel as opaque pickles that
only the client and the worker load.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import operator
import signal
import sys
from typing import Any, Callable, Iterable, Optional

from . import schema

__all__ = ["Job", "JobStatus", "Phase", "TRANSITIONS", "JobRecord", "FIELDS", "FINISHED", "ERROR_STATES",
           "TIMES", "CRASH_SIGNALS", "death", "normalize_args"]


class JobStatus(str, enum.Enum):
    """Where a job is in its life. Every finished state is final."""

    WAITING = "waiting"
    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    KILLED = "killed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


class Phase(enum.IntEnum):
    """Where a job is on the server; its ``status`` says how it ended.

    Every change of phase goes through ``QueueState._move`` (the one place
    where counts are kept, and where a journal hooks in). The allowed
    changes are ``TRANSITIONS``::

        NEW ─> WAITING ─> RUNNING ─> RETURNED ─┐
                 ^  │        │  │              │
                 │  │        │  └──────────────┤ (a final status)
                 └──┼────────┴─ retry ─────────┤
                    │ cancelled/skipped        v
                    └───────────────────> HELD ─> DONE ─> GONE
                                          (or straight to DONE)
    """

    NEW = 0        # built from a client's record, not yet accepted
    WAITING = 1    # in its queue's (or lane's) waiting heap
    RUNNING = 2    # on a worker, holding one of the server's slots
    RETURNED = 3   # its function returned; its figures are on the way (no slot, not cancellable)
    HELD = 4       # final; its client's callback or log runs before it counts as done
    DONE = 5       # final and processed: get/collect may take it
    GONE = 6       # collected, expired or dropped: the record is deleted


#: (from, to) pairs ``QueueState._move`` allows; anything else is a bug.
TRANSITIONS = frozenset({
    (Phase.NEW, Phase.WAITING),
    (Phase.WAITING, Phase.RUNNING), (Phase.WAITING, Phase.DONE),
    (Phase.RUNNING, Phase.RETURNED), (Phase.RUNNING, Phase.WAITING),
    (Phase.RUNNING, Phase.HELD), (Phase.RUNNING, Phase.DONE),
    (Phase.RETURNED, Phase.WAITING), (Phase.RETURNED, Phase.HELD), (Phase.RETURNED, Phase.DONE),
    (Phase.HELD, Phase.DONE),
    (Phase.DONE, Phase.GONE),
})

#: Phases in which a job still counts against its client (not yet done).
UNDONE = frozenset({Phase.WAITING, Phase.RUNNING, Phase.RETURNED, Phase.HELD})


FINISHED = frozenset(
    {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.TIMEOUT,
        JobStatus.KILLED,
        JobStatus.CANCELLED,
        JobStatus.SKIPPED,
        JobStatus.LOST,
    }
)

#: Ends whose ``exception`` the submitting client prints (unless
#: ``suppress_errors``): the job's own error, not a limit it was given.
#: A tuple: its members equal their text too ("failed" in ERROR_STATES).
ERROR_STATES = (JobStatus.FAILED, JobStatus.LOST, JobStatus.KILLED)

#: A job's times (epoch seconds on the server, datetimes in a job dict).
TIMES = ("submitted", "started", "ended", "processed")

#: Signals a process raises against itself when it crashes. A job that dies
#: of one failed by its own doing (``failed``), unlike one ended by a signal
#: from outside (``killed``: SIGKILL, the OOM killer, SIGTERM).
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})


def death(exitcode: Optional[int]) -> "tuple[JobStatus, str]":
    """How a job whose worker process died under it ended: its status, and
    the signal's name and what it means, for ``exception`` ("" without one).
    A negative exit code is the signal: a crash signal (``CRASH_SIGNALS``)
    is the job's own failure, any other a kill from outside; an exit without
    a signal (``os._exit``) leaves the job ``lost``."""
    if exitcode is None or exitcode >= 0:
        return JobStatus.LOST, ""
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    if -exitcode in CRASH_SIGNALS:
        return JobStatus.FAILED, f"{name}: the job crashed"
    return JobStatus.KILLED, f"{name}: killed from outside"


#: Keys of a job dict, in order: ezpq 0.2.2's first, then ezpq_mgr's (``job``: the
#: server-wide job number the CLI shows; ``id`` is the per-queue one).
FIELDS = (
    "qid", "id", "name", "priority", "lane", "timeout", "function", "args",
    "kwargs", "submitted", "started", "ended", "processed", "exitcode",
    "cancelled", "runtime", "output", "exception", "callback",
    "status", "cpu_user", "cpu_system", "max_rss", "max_rss_method",
    "max_rss_children", "pid", "host", "user", "retries", "attempts",
    "max_memory", "job",
    "after",
)


def normalize_args(args: Any) -> Optional[list]:
    """ezpq's rule: a list/tuple is the positional arguments, None is none,
    anything else (a string included) is the single first argument."""
    if args is None:
        return None
    if isinstance(args, (list, tuple)):
        return list(args)
    return [args]


def plain_name(name: Any) -> Any:
    """A job name as the server keeps it: None, str, int or float as given,
    anything else as its ``str()``."""
    t = type(name)
    if name is None or t is str or t is int or t is float:
        return name
    if isinstance(name, int) and not isinstance(name, bool):
        return int(name)
    if isinstance(name, float):
        return float(name)
    return str(name)


class Job:
    """Defines what to run within an ``ezpq_mgr.Queue``, and how to run it.

    Same signature as ezpq 0.2.2's ``Job``, plus ``retries`` (run again up to
    N times after a failure), ``max_memory`` (bytes; kill the job past it)
    and ``after`` (ids of jobs of the same queue: this one runs once they
    all completed, and is ``skipped`` if one ends otherwise).
    Arguments are checked here (``schema``, the rules the server applies
    again) so bad input fails at the call that made it.
    """

    def __init__(
        self,
        function: Callable,
        args: Any = None,
        kwargs: Optional[dict] = None,
        name: Any = None,
        priority: int = 100,
        lane: Any = None,
        timeout: float = 0,
        suppress_errors: bool = False,
        stop_on_lane_error: bool = False,
        retries: int = 0,
        max_memory: Optional[int] = None,
        after: Optional[Iterable[int]] = None,
    ):
        if not callable(function):
            raise TypeError(f"function must be callable, not {type(function).__name__}")
        if kwargs is not None:
            try:
                kwargs = dict(kwargs)
            except (TypeError, ValueError):
                raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}") from None
            bad = [k for k in kwargs if not isinstance(k, str)]
            if bad:
                raise TypeError(f"kwargs keys must be strings, got {bad[0]!r}")
        priority = schema.check_priority(priority)
        try:
            hash(lane)
        except TypeError:
            raise TypeError(f"lane must be hashable, not {type(lane).__name__}") from None
        if lane is not None:
            schema.check_text("lane (as text)", str(lane))
        timeout = schema.check_timeout(timeout)
        retries = schema.check_retries(retries)
        max_memory = schema.check_max_memory(max_memory)
        schema.check_name(plain_name(name))
        if after is not None:   # (the usual job has none: no call on put's path)
            if type(after) is not list and type(after) is not tuple:
                if isinstance(after, (str, bytes)) or not isinstance(after, collections.abc.Iterable):
                    raise TypeError(f"after must be a list of job ids, not {type(after).__name__}")
                after = list(after)
            after = schema.check_after("after", after)
        self.function = function
        self.args = normalize_args(args)
        self.kwargs = kwargs
        self.name = name
        self.priority = priority
        self.lane = lane
        self.timeout = timeout
        self.suppress_errors = bool(suppress_errors)
        self.stop_on_lane_error = bool(stop_on_lane_error)
        self.retries = retries
        self.max_memory = max_memory
        self.after = after   # None or a tuple of ids, each once

    def __repr__(self) -> str:
        fn = getattr(self.function, "__name__", repr(self.function))
        return f"Job({fn}, args={self.args!r}, priority={self.priority}, lane={self.lane!r})"


# slots: 100,000 waiting jobs must fit in ~2 KiB each (no per-record __dict__)
_SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}


@dataclasses.dataclass(**_SLOTS)
class JobRecord:
    """One job as the server keeps it: plain data, no live handles."""

    seq: int                      # global submission order (unique key)
    qid: str
    id: int                       # per-queue id, 1, 2, ... as in ezpq
    client: str                   # token of the submitting Queue object
    user: str
    name: Any                     # str/int/float/None (other names are str()'d)
    priority: int
    lane_key: Optional[bytes]     # pickled lane, compared as bytes
    timeout: float
    function: str                 # the function's name
    fn_blob: bytes                # cloudpickled function (opaque to the server)
    args_blob: bytes              # pickled (args, kwargs) (opaque to the server)
    runner: str = "process"
    suppress_errors: bool = False
    stop_on_lane_error: bool = False
    retries: int = 0
    max_memory: Optional[int] = None
    env_id: int = 0               # which client environment (cwd, sys.path) to run in
    uid: Optional[int] = None     # the submitter's uid, as the server established it
    lane_text: Optional[str] = None   # str(lane), for tables and the accounting log
    #: the job numbers (seqs) it waits for, None: none. Between the client's
    #: record and ``QueueState.add``: the ``messages.After`` it named
    after: Any = None
    status: JobStatus = JobStatus.WAITING
    submitted: Optional[float] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    processed: Optional[float] = None
    exitcode: Optional[int] = None
    cancelled: bool = False
    output_blob: Optional[bytes] = None
    exception: Optional[str] = None
    callback_blob: Optional[bytes] = None
    cpu_user: Optional[float] = None
    cpu_system: Optional[float] = None
    max_rss: Optional[int] = None
    max_rss_method: Optional[str] = None
    max_rss_children: Optional[int] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    attempts: int = 0
    phase: Phase = Phase.NEW      # the server's own bookkeeping (never sent to clients)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def runtime(self) -> Optional[float]:
        """Seconds it ran (ended - started), None until both are known: the
        one place this is computed (snapshots, job dicts, the accounting log
        and ``ezpq status`` read it)."""
        started, ended = self.started, self.ended
        return None if started is None or ended is None else ended - started

    def snapshot(self) -> dict:
        """Plain-data copy for a client; the function blob stays on the server."""
        d = dict(zip(_SNAPSHOT_FIELDS, _snapshot_values(self)))
        d["status"] = self.status.value
        return d


_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord)
                         if f.name not in ("fn_blob", "phase")) + ("runtime",)
_snapshot_values = operator.attrgetter(*_SNAPSHOT_FIELDS)
