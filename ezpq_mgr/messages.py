"""Every message between client, server, supervisor and worker, by name, and
the one schema of what a client may send.

Open this module to see what travels where. Each message is a small named
record (a ``NamedTuple``: as cheap as the bare tuple it replaces, and its
fields have names); how its bytes look is the business of the channel's
own module, which only encodes and decodes these records:

client ⇄ server (``transport.py`` frames; a shared server speaks JSON,
``wire.py``; the private server of an embedded queue pickle)::

    server                              client
      Challenge(nonce)        ──>                   (or Refusal(why): not served)
                              <──     Answer(digest, nonce)
      Welcome(digest, limits) ──>                   (or Refusal("wrong authkey"))
                              <──     Request(method, args)    (one at a time)
      Reply(kind, value)      ──>                   (kind RETURN or ERROR)

  A record travels as the tuple of its fields (a pickled NamedTuple would
  name its class: several times the bytes and the time) and the receiver
  names it again with ``Kind.parse``, which checks its shape. The calls a
  client may make are ``Service.EXPOSED``; their arguments are checked
  against the rules of ``schema.py`` (single values: ints, texts, timeouts,
  queue settings) and, for the two that carry records, here:

  - a job (``put``): a dict with the keys of ``JOB_FIELDS``;
    ``job_record`` checks it and builds the server's ``JobRecord`` from the
    checked values, field by field (never ``JobRecord(**dict)``: the wire
    schema is not the storage schema, and nothing a client adds reaches
    the record);
  - a post-processed job (``mark_processed``): ``Processed(seq, callback_blob)``.

server ⇄ worker (``workerproto.py``: fixed structs plus opaque bytes; the
server never unpickles what a worker sends)::

    supervisor                          worker
                              <──     Ready()
      RunJob(fn, args, env, as_thread) ──>
                              <──     Result(status, ..., figures, leaving)
                              <──     LateFigures(figures, leaving)  (when Result had none)
      Stop()                  ──>

  ``Figures`` are a job's CPU and memory; ``Env`` the client's working
  directory and sys.path a job runs in.

server ⇄ Dask bridge (``bridgeproto.py``: the same style of frames as the
worker's; the bridge, dask_bridge.py, is the process that holds the
``distributed.Client``, and Dask unpickles, so nothing it says is
believed unchecked)::

    DaskExecutor (server)                   bridge
                              <──     BridgeConnected() / BridgeUnreachable(why, fatal)
                              <──     ClusterNow(workers, left) / BridgeDisconnected(why)
      StartRunner(runner, worker) ──>
                              <──     RunnerReady(runner)
      RunOnRunner(runner, seq, ...) ──>
                              <──     RunnerResult(runner, seq, status, ..., log)
      KillOnRunner / RetireRunner / ReleaseRunner ──>
                              <──     RunnerEnded(runner, how, taken, why) / RunnerBroken / KillFailed
                              <──     BridgeLog(level, text)
      StopBridge()            ──>

supervisor ⇄ state (one process, under the state's lock): ``Outcome`` (how
a run ended, for ``QueueState.finish``) and ``KillRequest`` (a job the state
wants stopped, for the supervisor).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from . import schema
from .job import JobRecord, JobStatus
from .schema import INT64_MAX, INT64_MIN, MAX_BLOB, MAX_LANE_KEY, MAX_RETRIES, MAX_TEXT, MAX_TIMEOUT, MAX_TOKEN

__all__ = [
    "Challenge", "Answer", "Welcome", "Refusal", "Request", "Reply", "RETURN", "ERROR",
    "JOB_FIELDS", "REQUIRED", "FOLDED", "SERVER_FIELDS", "job_record", "job_records", "Processed", "After",
    "Env", "Figures", "NO_FIGURES", "Ready", "RunJob", "Result", "LateFigures", "Stop",
    "Outcome", "KillRequest",
    "StartRunner", "RunOnRunner", "KillOnRunner", "RetireRunner", "ReleaseRunner", "StopBridge",
    "BridgeConnected", "BridgeUnreachable", "BridgeDisconnected", "ClusterNow", "RunnerReady",
    "RunnerResult", "RunnerEnded", "RunnerBroken", "KillFailed", "BridgeLog",
]

_new = tuple.__new__   # a record from a tuple of its fields, ~3x faster than Kind(*fields)


def _kind(value: Any) -> str:
    return type(value).__name__


def _fields(kind: type, obj: Any) -> tuple:
    """``obj`` as the fields of a ``kind`` message (a list from JSON, a tuple from pickle)."""
    if (type(obj) is not tuple and type(obj) is not list) or len(obj) != len(kind._fields):
        raise TypeError(f"a {kind.__name__} message is {len(kind._fields)} fields, not {_kind(obj)}")
    return obj if type(obj) is tuple else tuple(obj)


# ================================================================ client ⇄ server
# ------------------------------------------------------------ the handshake
class Challenge(NamedTuple):
    """Server, first: prove you hold the key, against this nonce."""
    nonce: bytes


class Answer(NamedTuple):
    """Client: HMAC(key, "client:" + the server's nonce), and a nonce of its own."""
    digest: bytes
    nonce: bytes


class Welcome(NamedTuple):
    """Server: HMAC(key, "server:" + the client's nonce) (it holds the key
    too), and its limits (``max_message``) and ``durable`` (it has a
    ``--state-dir``: a reply to a ``put`` means the jobs are committed)."""
    digest: bytes
    limits: dict


class Refusal(NamedTuple):
    """Server, instead of a Challenge or a Welcome: one fixed line saying why."""
    why: str


# ---------------------------------------------------------------- calls
#: ``Reply.kind``: the call returned ``value`` / raised ``value``.
RETURN, ERROR = "#RETURN", "#ERROR"


class Request(NamedTuple):
    """A call of ``Service.<method>(*args)``."""
    method: str
    args: tuple

    @classmethod
    def parse(cls, obj: Any) -> "Request":
        method, args = _fields(cls, obj)
        if type(method) is not str or (type(args) is not list and type(args) is not tuple):
            raise TypeError("a request is (method name, list of arguments)")
        return _new(cls, (method, args))


class Reply(NamedTuple):
    """The answer to the one Request in flight on a connection."""
    kind: str      # RETURN or ERROR
    value: Any     # what the method returned, or the exception it raised

    @classmethod
    def parse(cls, obj: Any) -> "Reply":
        kind, value = _fields(cls, obj)
        if kind != RETURN and kind != ERROR:
            raise TypeError(f"unknown reply kind {kind!r}"[:100])
        return _new(cls, (kind, value))


# ------------------------------------------------------------ a job sent by a client
#: A job as a client sends it: a dict with these keys (``REQUIRED`` ones
#: always; the others default to the value given). ``id`` is 0 or an id the
#: client reserved (``reserve_ids``); ``env_id`` one its ``hello`` returned;
#: ``after`` ids of its own queue and ``after_jobs`` server-wide job numbers
#: it waits for (``After``).
JOB_FIELDS = {
    "client": None, "priority": None, "timeout": None, "function": None, "fn_blob": None,
    "args_blob": None,
    "id": 0, "name": None, "lane_key": None, "lane_text": None, "runner": "process",
    "suppress_errors": False, "stop_on_lane_error": False, "retries": 0, "max_memory": None,
    "env_id": 0, "after": None, "after_jobs": None,
}
REQUIRED = frozenset({"client", "priority", "timeout", "function", "fn_blob", "args_blob"})
#: Fields a client sends that the record keeps in another one
#: (``after_jobs`` goes into ``after``, with ``after``'s ids: ``After``).
FOLDED = frozenset({"after_jobs"})
_CLIENT_FIELDS = frozenset(JOB_FIELDS)

#: Fields only the server sets: refused in a job a client sends.
SERVER_FIELDS = frozenset({
    "seq", "qid", "user", "uid", "status", "submitted", "started", "ended", "processed",
    "exitcode", "cancelled", "output_blob", "exception", "callback_blob", "cpu_user",
    "cpu_system", "max_rss", "max_rss_method", "max_rss_children", "pid", "host", "attempts",
    "phase",
})


class After(NamedTuple):
    """The jobs a job waits for, as its client named them (checked, not yet
    resolved): ``ids`` of its own queue (Python's ``put(after=...)``) and
    server-wide job numbers (``ezpq submit --after``). A ``JobRecord``
    carries it in ``after`` until ``QueueState.add`` resolves it into the
    job numbers it keeps (or refuses the batch)."""
    ids: tuple
    jobs: tuple


def _bad_keys(r: dict) -> None:
    for key in r:
        if key in SERVER_FIELDS:
            raise ValueError(f"job record field {key!r} is set by the server, not by a client")
        if key not in _CLIENT_FIELDS:
            raise ValueError(f"unknown job record field {key!r}")
    missing = sorted(REQUIRED - r.keys())
    raise ValueError(f"job record lacks {', '.join(missing)}")


def job_record(r: Any, qid: str, user: str, uid: Optional[int]) -> JobRecord:
    """Check one job a client sent (types, ranges, fields) and build the
    server's record of it, as ``user``/``uid`` in queue ``qid``, from the
    checked values. ``TypeError``/``ValueError`` name the first bad field.

    The per-batch facts (the client token is the caller's, the environment
    exists) are the server's to check once per batch, not here. On the hot
    path (every ``put``): straight-line ``type(x) is ...`` tests, the
    general check only for a value that fails them (it raises)."""
    if type(r) is not dict:
        raise TypeError(f"a job record must be a dict, not {_kind(r)}")
    keys = r.keys()
    if not (keys <= _CLIENT_FIELDS and keys >= REQUIRED):
        _bad_keys(r)
    get = r.get
    priority = r["priority"]
    if type(priority) is not int or not INT64_MIN <= priority <= INT64_MAX:
        schema.check_priority(priority)
    timeout = r["timeout"]
    if (type(timeout) is not float and type(timeout) is not int) or not 0 <= timeout <= MAX_TIMEOUT:
        schema.check_timeout(timeout)
    name = get("name")
    if type(name) is not str or len(name) > MAX_TEXT or not name.isprintable():
        schema.check_name(name)
    function = r["function"]
    if type(function) is not str or len(function) > MAX_TEXT or not function.isprintable():
        schema.check_text("function", function)
    fn_blob = r["fn_blob"]
    if type(fn_blob) is not bytes or len(fn_blob) > MAX_BLOB:
        schema.check_blob("fn_blob", fn_blob)
    args_blob = r["args_blob"]
    if type(args_blob) is not bytes or len(args_blob) > MAX_BLOB:
        schema.check_blob("args_blob", args_blob)
    lane_key = get("lane_key")
    lane_text = get("lane_text")
    if lane_key is not None:
        schema.check_blob("lane_key", lane_key, MAX_LANE_KEY)
        if lane_text is not None:
            schema.check_text("lane_text", lane_text)
    elif lane_text is not None:
        raise ValueError("lane_text without a lane_key")
    retries = get("retries", 0)
    if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
        schema.check_retries(retries)
    max_memory = get("max_memory")
    if max_memory is not None and (type(max_memory) is not int or not 0 < max_memory <= INT64_MAX):
        schema.check_max_memory(max_memory)
    job_id = get("id", 0)
    if type(job_id) is not int or not 0 <= job_id <= INT64_MAX:
        schema.check_int("id", job_id, 0, INT64_MAX)
    suppress_errors = get("suppress_errors", False)
    if type(suppress_errors) is not bool:
        schema.check_bool("suppress_errors", suppress_errors)
    stop_on_lane_error = get("stop_on_lane_error", False)
    if type(stop_on_lane_error) is not bool:
        schema.check_bool("stop_on_lane_error", stop_on_lane_error)
    runner = get("runner", "process")
    if runner != "process" and runner != "thread":
        raise (TypeError if type(runner) is not str else ValueError)(
            f"runner must be one of {schema.RUNNERS}, got {runner!r}"[:200])
    env_id = get("env_id", 0)
    if type(env_id) is not int or not 0 <= env_id <= INT64_MAX:
        schema.check_int("env_id", env_id, 0, INT64_MAX)
    client = r["client"]
    if type(client) is not str or len(client) > MAX_TOKEN or not client.isprintable():
        schema.check_token(client)
    after = get("after")
    after_jobs = get("after_jobs")
    if after is not None or after_jobs is not None:
        after = schema.check_after("after", after)
        after_jobs = schema.check_after("after_jobs", after_jobs)
        if after or after_jobs:
            after = After(after or (), after_jobs or ())
    return JobRecord(seq=0, qid=qid, id=job_id, client=client, user=user, name=name, priority=priority,
                     lane_key=lane_key, timeout=timeout, function=function, fn_blob=fn_blob,
                     args_blob=args_blob, runner=runner, suppress_errors=suppress_errors,
                     stop_on_lane_error=stop_on_lane_error, retries=retries, max_memory=max_memory,
                     env_id=env_id, uid=uid, lane_text=lane_text, after=after)


def job_records(records: Any, qid: str, user: str, uid: Optional[int]) -> list:
    """A batch of jobs a client sent (a list), every one checked before
    any is built into a record: all or nothing."""
    if type(records) is not list and type(records) is not tuple:
        raise TypeError(f"records must be a list of job records, not {_kind(records)}")
    return [job_record(r, qid, user, uid) for r in records]


class Processed(NamedTuple):
    """Client: its callback (or log, or error message) for a held job ran;
    ``callback_blob`` is the callback's pickled result (None: none)."""
    seq: int
    callback_blob: Optional[bytes]

    @classmethod
    def parse(cls, obj: Any) -> "Processed":
        if (type(obj) is not list and type(obj) is not tuple and type(obj) is not cls) or len(obj) != 2:
            raise TypeError("results must be (seq, callback blob) pairs")
        seq, blob = obj
        schema.check_int("seq", seq, 1, INT64_MAX)
        if blob is not None:
            schema.check_blob("callback_blob", blob)
        return _new(cls, (seq, blob))


# ================================================================ server ⇄ worker
class Env(NamedTuple):
    """Where a job runs: its client's working directory and sys.path."""
    cwd: str
    sys_path: list


class Figures(NamedTuple):
    """A job's CPU seconds and peak memory (bytes; how it was measured), and
    the peak of the processes it started; None: not measured."""
    cpu_user: Optional[float]
    cpu_system: Optional[float]
    max_rss: Optional[int]
    max_rss_method: Optional[str]    # "vmhwm" or "sampled"
    max_rss_children: Optional[int]


NO_FIGURES = Figures(None, None, None, None, None)


class Ready(NamedTuple):
    """Worker: booted, waiting for its first job (a job goes only to a worker
    that said so, so its timeout counts from when it really starts)."""


class RunJob(NamedTuple):
    """Supervisor: run this job. ``env`` None: the same as the last job's."""
    fn_blob: bytes
    args_blob: bytes
    env: Optional[Env]
    as_thread: bool        # a thread job of a shared server: no RSS, this thread's CPU


class Stop(NamedTuple):
    """Supervisor: exit (a retired worker)."""


class Result(NamedTuple):
    """Worker: the job it was given ended (a result names no job: the
    supervisor knows which one it gave). ``figures`` None: a
    ``LateFigures`` follows (measured after this was sent)."""
    status: str            # "completed" or "failed"
    exitcode: int
    started: float         # time.time() at the job's start and end
    ended: float
    output: Optional[bytes]   # the output's pickle, opaque to the server
    exception: Optional[str]
    figures: Optional[Figures]
    leaving: bool          # (with figures) the worker exits after this job


class LateFigures(NamedTuple):
    """Worker: the figures of the job whose ``Result`` it sent last."""
    figures: Figures
    leaving: bool          # the worker exits after this job (it left threads)


# ================================================================ supervisor ⇄ state
class Outcome(NamedTuple):
    """How one run of a job ended, as the supervisor (from a worker's Result
    and figures, or from a death, kill or timeout) tells ``QueueState.finish``."""
    status: JobStatus
    exitcode: Optional[int]
    output_blob: Optional[bytes] = None
    exception: Optional[str] = None
    cpu_user: Optional[float] = None
    cpu_system: Optional[float] = None
    max_rss: Optional[int] = None
    max_rss_method: Optional[str] = None
    max_rss_children: Optional[int] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    started: Optional[float] = None    # when the worker really began (None: keep dispatch time)
    ended: Optional[float] = None


class KillRequest(NamedTuple):
    """State: stop job ``seq`` (a cancel, a skip); it ends with ``status`` and ``why``."""
    seq: int
    status: JobStatus
    why: str



# ================================================================ server ⇄ Dask bridge
class StartRunner(NamedTuple):
    """Server: start runner ``runner`` (a Dask task) pinned to ``worker``."""
    runner: str
    worker: str


class RunOnRunner(NamedTuple):
    """Server: hand job ``seq`` to ``runner`` (which said it is ready and is free)."""
    runner: str
    seq: int
    fn_blob: bytes
    args_blob: bytes
    env: Optional[str]          # the client's Env as JSON, or None
    as_thread: bool
    timeout: float              # seconds; 0: none
    max_memory: Optional[int]   # bytes


class KillOnRunner(NamedTuple):
    """Server: kill job ``seq`` running on ``runner`` (on ``worker``)."""
    runner: str
    worker: str
    seq: int
    why: str


class RetireRunner(NamedTuple):
    """Server: ``runner`` is idle: tell it to end (its thread goes back)."""
    runner: str


class ReleaseRunner(NamedTuple):
    """Server: ``runner`` is given up (its worker left): cancel it, free its inbox."""
    runner: str


class StopBridge(NamedTuple):
    """Server: clean up on the scheduler and exit."""


class BridgeConnected(NamedTuple):
    """Bridge: connected to the scheduler (at start, or again), set up there."""


class BridgeUnreachable(NamedTuple):
    """Bridge: it could not connect (``fatal``: it cannot run Dask at all,
    e.g. no distributed package); it exits after this."""
    why: str
    fatal: bool


class BridgeDisconnected(NamedTuple):
    """Bridge: the scheduler is lost; every runner is gone with it."""
    why: str


class ClusterNow(NamedTuple):
    """Bridge: the cluster's workers now ({address: threads}) and those
    that said they left since the last one."""
    workers: dict
    left: list


class RunnerReady(NamedTuple):
    """Bridge: ``runner`` runs on its worker and waits for a job."""
    runner: str


class RunnerResult(NamedTuple):
    """Bridge: job ``seq`` of ``runner`` ended (a dask_host.HostResult's fields)."""
    runner: str
    seq: int
    status: str                  # a JobStatus value
    exitcode: Optional[int]
    started: Optional[float]
    ended: Optional[float]
    output: Optional[bytes]      # the job's output pickle, opaque
    exception: Optional[str]
    figures: Optional[Figures]
    pid: Optional[int]
    host: str
    log: bytes


class RunnerEnded(NamedTuple):
    """Bridge: ``runner``'s task is over: ``how`` "finished" (it returned
    ``taken``, the jobs it took), "error" or "cancelled" (``why`` says)."""
    runner: str
    how: str
    taken: Optional[int]
    why: str


class RunnerBroken(NamedTuple):
    """Bridge: ``runner`` could not be started (``seq`` None) or handed job ``seq``."""
    runner: str
    seq: Optional[int]
    why: str


class KillFailed(NamedTuple):
    """Bridge: the kill of job ``seq`` on ``runner`` could not be sent."""
    runner: str
    seq: int
    why: str


class BridgeLog(NamedTuple):
    """Bridge: a line for the server's log (``level``: a logging level)."""
    level: int
    text: str
