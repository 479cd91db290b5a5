"""The object a server exposes to its clients, one method per request.

The connection server (connections.py) serves every client connection on
its own thread, so these methods run concurrently; all shared data lives in
``QueueState`` behind its single lock. Replies are plain snapshots (dicts,
lists, numbers, bytes), never live containers. Every blocking call is parked
(``QueueState._answer_or_defer``) and answered the moment its condition
holds, or at its own timeout (0 or None: none); a client that disconnects
withdraws it. Clients make one call per wait, no loops.

On a shared server every request runs as its caller (``callers.Caller``, the
first argument of every method, made once per connection):
a queue name is private to its user (stored as ``"uid:qid"``), a job's
``user``/``uid`` are the caller's, never what the client claims, and a user
sees, collects and cancels only their own jobs; root and the server's owner
see all through the admin calls (``list_jobs``, ``cancel_job``, ...).

Nothing a client sends is trusted: every argument is checked here against
``schema`` and ``messages`` (the client library checks the same at the
call, but a hostile client bypasses it), before anything changes; a job's
record is built from the checked values (``messages.job_record``), never
from the client's dict. A client that disconnects
without ``goodbye`` (``detach()``/``dispose()``), e.g. SIGKILLed, has its
private queue disposed of as ``dispose()`` would; finished jobs nobody
collects are dropped after ``keep_finished`` seconds (their accounting rows
stay in the log).

What a client registers is freed when nothing refers to it any more, and
one user holds only so much at once (root and the server's owner are not
capped): its token and notice channel at ``goodbye`` or when its last
connection closes (``MAX_CLIENTS_PER_USER`` live at once); an environment
(working directory and sys.path, see ``schema.check_env``) once no client
and no job still on the server (unfinished, or finished and not yet
collected) refers to it (``MAX_ENV_BYTES_PER_USER``); a queue once
no connection uses it and it holds nothing a new one would not
(``QueueState._drop_if_idle``; ``MAX_QUEUES_PER_USER``). Before, none of
it was ever freed: 100 hellos with a big sys.path held 390 MB of a root
server, and a client looping hello with fresh tokens grew it for ever.
The registry is guarded by the state's lock, under which a job's end
releases its environment.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import schema
from .callers import Caller, Identity
from .control import Control
from .joblogs import LogBook
from ..messages import Env, Processed, job_records
from .accounting import AccountingLog, report
from ..errors import JobNotFound, ServerLimit
from ..job import JobRecord, JobStatus
from .waits import Deferred
from .state import QueueState
from .supervisor import Supervisor
from ..transport import describe_size

logger = logging.getLogger(__name__)

__all__ = ["Service"]

#: Jobs one wait_jobs call may name (the check runs under the state's lock).
MAX_WAIT_JOBS = 100_000
#: What one user may hold at once on a server (root and its owner: no cap).
#: A Queue is one client and uses one queue; its environment (working
#: directory and sys.path) is shared by the user's clients and jobs with the
#: same one, and a sys.path by those with the same sys.path: a job submitted
#: from each of 10,000 directories costs ~10,000 working directories, one
#: sys.path. Environments are counted in (about) the bytes they take.
MAX_CLIENTS_PER_USER = 1024
MAX_ENV_BYTES_PER_USER = 16 * 1024 * 1024
MAX_QUEUES_PER_USER = 4096
#: What one user's jobs may hold on a shared server at once (root and the
#: owner: no cap; ``--max-user-jobs``, ``--max-user-bytes``): jobs not yet
#: collected, and the bytes of their functions, arguments and outputs. A
#: waiting job costs ~700 bytes besides its payload: 250,000 jobs ~175 MB.
DEFAULT_MAX_USER_JOBS = 250_000
DEFAULT_MAX_USER_BYTES = 1 << 30
_SLOT = 64   # about what a str, a tuple or a dict entry costs beyond its characters
#: A listing (list_jobs, jobs) copies this many jobs per hold of the state's
#: lock: a user's 50,000 jobs listed at once held it ~0.15 s, in which
#: nobody's put, dispatch or result moved
LIST_SLICE = 1000


def _env_cost(cwd: str) -> int:
    """An environment's bytes, its sys.path apart (its objects and entries)."""
    return len(cwd) + 8 * _SLOT


def _path_cost(path: Tuple[str, ...]) -> int:
    return sum(len(p) for p in path) + _SLOT * (2 * len(path) + 4)


def _parked(caller: Caller, got: Any, visible: Callable[[Any], Any] = lambda answer: answer) -> Any:
    """A state wait's result as this call's reply: ``visible(answer)`` now,
    or, parked, later (the serving thread goes back to its connection)."""
    return caller.park(got) if isinstance(got, Deferred) else visible(got)


def _int(what: str, value: Any, low: int = 0) -> int:
    return schema.check_int(what, value, low, schema.INT64_MAX)


class _Client:
    """A registered client token: whose it is, its environment, its private
    queue, how many open connections speak for it; ``leaving`` once it said
    goodbye while its notice reader still has notices to take."""

    __slots__ = ("token", "uid", "env_id", "private", "live", "leaving")

    def __init__(self, token: str, uid: int):
        self.token, self.uid = token, uid
        self.env_id, self.private, self.live, self.leaving = 0, None, 0, False


class _Env:
    """An environment of one user, and how many clients and unfinished
    jobs refer to it."""

    __slots__ = ("key", "uid", "refs", "cost")

    def __init__(self, key: tuple, uid: int, cost: int):
        self.key, self.uid, self.refs, self.cost = key, uid, 1, cost


class _Path:
    """A sys.path of one user, shared by its environments (``refs``)."""

    __slots__ = ("path", "list", "refs", "cost")

    def __init__(self, path: Tuple[str, ...]):
        self.path, self.list, self.refs, self.cost = path, list(path), 0, _path_cost(path)


class _Held:
    """What one connection holds: the clients it spoke for (token ->
    _Client) and the queues it used (key -> QueueInfo), let go when it closes."""

    __slots__ = ("clients", "queues", "prune_at")

    def __init__(self) -> None:
        self.clients: Dict[str, _Client] = {}
        self.queues: Dict[str, Any] = {}
        self.prune_at = 8


def _put_bytes(rec: JobRecord) -> int:
    """What a job holds of its user's ``--max-user-bytes`` from its put
    until its record goes: its function and arguments, its lane key (the
    lane's pickle, up to 64 KiB: 250,000 jobs could hold 16 GB uncounted),
    and its name, lane text and function name (up to 1 KiB each; a name
    not given becomes the job's id at its put, and counts 0 both times)."""
    name = rec.name
    return (len(rec.fn_blob) + len(rec.args_blob) + len(rec.lane_key or b"") + len(rec.lane_text or "")
            + len(rec.function) + (len(name) if type(name) is str else 0))


class Service(Control):
    """Thread-safe facade over the queue state and the worker pool (its
    queue-control and ``top`` calls in control.py)."""

    EXPOSED = (
        "hello", "configure", "put", "reserve_ids", "counts", "get", "collect", "pop_ids", "ack",
        "wait_pending", "wait_client", "wait_free", "cancel", "cancel_all",
        "jobs", "take_notices", "mark_processed",
        "goodbye", "set_workers", "n_workers", "info",
        "submit", "list_jobs", "show_job", "show_jobs", "cancel_job", "wait_jobs", "report", "accounting", "whoami",
        "put_then",
        "pause_queues", "set_priority", "job_priority", "requeue_job", "clean", "top",
        "job_log", "wait_log",
    )
    #: the calls whose answers can be big (every job of a user, the
    #: accounting rows): one user's are answered one at a time, however many
    #: connections it opens (ConnectionServer.one_at_a_time); a user listing
    #: 50,000 jobs on 8 connections at once had 8 threads encoding ~30 MB
    #: each, and another user's put and get took up to 1.2 s instead of 0.02
    LISTINGS = frozenset({"jobs", "list_jobs", "show_jobs", "accounting", "report", "top", "job_log"})
    #: the listings read from the accounting log: they take turns among
    #: themselves, not with the others (ConnectionServer.from_the_log)
    FROM_THE_LOG = frozenset({"accounting", "report"})

    def __init__(self, state: QueueState, supervisor: Supervisor, shared: bool = False,
                 accounting: Optional[AccountingLog] = None, keep_finished: Optional[float] = None,
                 logs: Optional[LogBook] = None, max_user_jobs: int = DEFAULT_MAX_USER_JOBS,
                 max_user_bytes: int = DEFAULT_MAX_USER_BYTES):
        self.state = state
        self.logs = logs   # the jobs' output (joblogs.py); None: none is captured
        self.supervisor = supervisor
        self.shared = shared
        self.log = accounting or AccountingLog()
        state.on_final = self._on_final
        state.on_gone = self._on_gone
        if shared:
            state.owner_of = self._owner_of
        # the registry: under the state's lock (a job's record deleted releases its environment)
        self._envs: Dict[int, _Env] = {}
        self._env_ids: Dict[Tuple[int, str, Tuple[str, ...]], int] = {}   # (uid, cwd, sys_path)
        self._paths: Dict[Tuple[int, Tuple[str, ...]], _Path] = {}       # (uid, sys_path)
        self._next_env = itertools.count(1)     # never reused: a worker remembers the last it got
        self._clients: Dict[str, _Client] = {}
        self._holds: Dict[int, List[int]] = {}  # uid -> [clients, bytes of environments] it holds
        self._closed = threading.Event()
        #: (lock held) uid -> [jobs on the server, bytes of their payloads and
        #: outputs]; kept on a shared server only (the private one has one
        #: user, and its put path stays as short as it was)
        self._jobs_held: Optional[Dict[int, List[int]]] = {} if shared else None
        self._outputs: Dict[int, int] = {}   # seq -> output bytes counted in _jobs_held
        self.max_user_jobs = max_user_jobs or None     # 0: no cap
        self.max_user_bytes = max_user_bytes or None
        #: uid -> bytes of replies queued for its connections, not yet sent
        #: (outgoing.UnsentBytes; a shared server's): they count in
        #: --max-user-bytes like the jobs' payloads
        self.unsent: Callable[[int], int] = lambda uid: 0
        #: (lock held) an environment was made (env_id, key) or freed (env_id, None):
        #: the durable server's journal (store.py), None otherwise
        self.on_env: Optional[Callable[[int, Optional[tuple]], None]] = None
        self.keep_finished = keep_finished
        if keep_finished:
            state.expiring = True
            threading.Thread(target=self._expire_loop, name="ezpq-expire", daemon=True).start()

    def close(self) -> None:
        """Stop the background expiry (the server is stopping)."""
        self._closed.set()

    def _expire_loop(self) -> None:
        """Drop finished jobs nobody collected within ``keep_finished`` s."""
        keep = float(self.keep_finished)
        period = min(max(keep / 4, 0.05), 60.0)
        while not self._closed.wait(period):
            try:
                self.state.expire_finished(self.state.clock() - keep)
            except Exception:  # never let the janitor die silently
                logger.exception("expiring finished jobs failed")

    # -------------------------------------------------------------- helpers
    def _key(self, caller: Caller, qid: str) -> str:
        """The caller's private name for ``qid`` on a shared server."""
        if type(qid) is not str or len(qid) > schema.MAX_QID or not qid.isprintable():
            schema.check_qid(qid)
        return f"{caller.identity.uid}:{qid}" if self.shared else qid

    def _visible_qid(self, key: str) -> str:
        return key.partition(":")[2] if self.shared else key

    def _snap(self, snap: Optional[dict]) -> Optional[dict]:
        if snap is not None:
            snap["qid"] = self._visible_qid(snap["qid"])
        return snap

    def _client(self, caller: Caller, token: str, known: bool = True) -> str:
        """Refuse a client token that belongs to another user (or, ``known``:
        that no ``hello`` registered)."""
        c = self._clients.get(token) if type(token) is str else None
        if c is None:
            schema.check_token(token)
            if known:
                raise ValueError("client: unknown client token (call hello first)")
            return token
        me = caller.identity
        if c.uid != me.uid and not me.privileged:
            raise PermissionError("that client belongs to another user")
        return token

    @staticmethod
    def _owner_of(key: str) -> str:
        return key.partition(":")[0]

    # ------------------------------------------------------------- registry
    def _held(self, caller: Caller) -> _Held:
        """What this connection holds (let go by ``_disconnected``)."""
        held = caller.held
        if held is None:
            held = caller.held = _Held()
            caller.at_disconnect(self._disconnected)
        return held

    def _count(self, uid: int, which: int, delta: int) -> None:
        """(lock held) Add ``delta`` to the clients (0) or environment bytes (1) of ``uid``."""
        holds = self._holds.setdefault(uid, [0, 0])
        holds[which] += delta
        if holds == [0, 0]:
            del self._holds[uid]

    def _cap(self, me: Identity, limit: int, why: str) -> None:
        """(lock held) ``ServerLimit`` if ``me`` already has ``limit`` clients."""
        n = self._holds.get(me.uid, (0, 0))[0]
        if n >= limit and not me.privileged:
            raise ServerLimit(f"at most {limit} clients per user at once on this server: "
                              f"{me.user} has {n} ({why})")

    def _env_acquire(self, me: Identity, cwd: str, path: Tuple[str, ...]) -> int:
        """(lock held) The id of ``me``'s environment (cwd, path), one more
        reference; ``ServerLimit`` for a new one past the caller's bytes."""
        env_id = self._env_ids.get((me.uid, cwd, path))
        if env_id is not None:
            self._envs[env_id].refs += 1
            return env_id
        shared = self._paths.get((me.uid, path))
        cost = _env_cost(cwd)
        new = cost + (0 if shared is not None else _path_cost(path))
        held = self._holds.get(me.uid, (0, 0))[1]
        if held + new > MAX_ENV_BYTES_PER_USER and not me.privileged:
            raise ServerLimit(f"at most {describe_size(MAX_ENV_BYTES_PER_USER)} of environments per user "
                              f"at once on this server: {me.user} holds {describe_size(held)}, this one "
                              f"takes {describe_size(new)} (working directories and sys.paths of live "
                              f"clients and jobs still on the server)")
        if shared is None:
            shared = self._paths[(me.uid, path)] = _Path(path)
            self._count(me.uid, 1, shared.cost)
        shared.refs += 1
        key = (me.uid, cwd, shared.path)
        env_id = self._env_ids[key] = next(self._next_env)
        self._envs[env_id] = _Env(key, me.uid, cost)
        self.supervisor.envs[env_id] = Env(cwd, shared.list)
        self._count(me.uid, 1, cost)
        if self.on_env is not None:
            self.on_env(env_id, key)
        return env_id

    def restore_envs(self, envs: Dict[int, Tuple[int, str, Tuple[str, ...]]], refs: Dict[int, int]) -> None:
        """(lock held; before serving) The environments of jobs restored from
        a state dir: ``envs`` env_id -> (uid, cwd, sys_path), each with
        ``refs`` jobs on the server (those without any are not kept). New ids
        continue after the largest (a worker remembers the last it got)."""
        for env_id, (uid, cwd, path) in envs.items():
            n = refs.get(env_id, 0)
            if not n or (uid, cwd, path) in self._env_ids:
                continue
            shared = self._paths.get((uid, path))
            if shared is None:
                shared = self._paths[(uid, path)] = _Path(path)
                self._count(uid, 1, shared.cost)
            shared.refs += 1
            key = (uid, cwd, shared.path)
            self._env_ids[key] = env_id
            env = self._envs[env_id] = _Env(key, uid, _env_cost(cwd))
            env.refs = n
            self.supervisor.envs[env_id] = (cwd, shared.list)
            self._count(uid, 1, env.cost)
        # after the largest a job still names too: a result handed out but not
        # confirmed keeps its row after its environment's was dropped (store.py)
        self._next_env = itertools.count(max(max(envs, default=0), max(refs, default=0)) + 1)

    def _env_release(self, env_id: int, n: int = 1) -> None:
        """(lock held) ``n`` references fewer; freed at none (its id is never
        reused), and so is its sys.path when no other environment has it."""
        env = self._envs.get(env_id)
        if env is None:
            return
        env.refs -= n
        if env.refs > 0:
            return
        del self._envs[env_id]
        del self._env_ids[env.key]
        if self.on_env is not None:
            self.on_env(env_id, None)
        self.supervisor.envs.pop(env_id, None)
        uid, _, path = env.key
        self._count(uid, 1, -env.cost)
        shared = self._paths[(uid, path)]
        shared.refs -= 1
        if not shared.refs:
            del self._paths[(uid, path)]
            self._count(uid, 1, -shared.cost)

    def _free(self, c: _Client) -> None:
        """(lock held) Forget a client: its token, its reference to its environment."""
        if self._clients.get(c.token) is not c:
            return
        del self._clients[c.token]
        self._env_release(c.env_id)
        self._count(c.uid, 0, -1)

    def _hold(self, caller: Caller, c: _Client) -> None:
        """(lock held) This connection speaks for ``c``: while any such
        connection is open the client is alive; when the last one closes
        without a ``goodbye``, its private queue is disposed of and its
        token freed. Clients this connection spoke for that are gone are
        let go now and then, so that a connection looping hello/goodbye on
        fresh tokens holds nothing."""
        held = self._held(caller)
        old = held.clients.get(c.token)
        if old is c:
            return
        if old is not None:
            self._let_go(old)
        elif len(held.clients) >= held.prune_at:
            for token, other in list(held.clients.items()):
                if self._clients.get(token) is not other:
                    del held.clients[token]
                    self._let_go(other)
            held.prune_at = 2 * len(held.clients) + 8
        held.clients[c.token] = c
        c.live += 1

    def _let_go(self, c: _Client) -> Optional[int]:
        """(lock held) One connection fewer speaks for ``c``. At none: a
        client still registered left without goodbye (its private queue is
        abandoned: how many of its jobs were cancelled is returned) or said
        it and its notices are still unread; either way it is freed."""
        c.live -= 1
        if c.live > 0:
            return None
        current = self._clients.get(c.token)
        if current is c:
            self._free(c)
            if c.private is not None:
                return self.state.abandon(c.private, c.token)
            self.state.drop_notices(c.token)
        elif current is None:
            self.state.drop_notices(c.token)
        return None

    def _use(self, caller: Caller, key: str) -> None:
        """This connection uses queue ``key`` (creating it): it is kept at
        least until the connection closes. ``ServerLimit`` for a new queue
        past the caller's cap."""
        held = self._held(caller)
        q = held.queues.get(key)
        if q is not None and self.state.queues.get(key) is q:
            return
        me = caller.identity
        with self.state.cond:
            if key not in self.state.queues and self.shared and not me.privileged:
                n = self.state.queues_of.get(self._owner_of(key), 0)
                if n >= MAX_QUEUES_PER_USER:
                    raise ServerLimit(
                        f"at most {MAX_QUEUES_PER_USER} queues per user at once on this server: {me.user} "
                        f"has {n} (an empty queue is dropped once no client uses it, unless paused or capped)")
            if q is not None:
                self.state.release_queue(q)   # dropped and made again since: hold the new one
            held.queues[key] = self.state.hold_queue(key)

    def _disconnected(self, caller: Caller) -> None:
        """(the closing connection's thread) Let go of what it held: the
        private queue of every client whose last connection this was and
        that said no goodbye is disposed of; tokens, notice channels,
        environments and idle queues nobody refers to any more are freed."""
        held, caller.held = caller.held, None
        if held is None:
            return
        gone = []
        with self.state.cond:
            for c in held.clients.values():
                n = self._let_go(c)
                if n is not None:
                    gone.append((c.token, n))
            for q in held.queues.values():
                self.state.release_queue(q)
        for token, n in gone:
            logger.info("client %s left without goodbye: %d of its jobs cancelled", token[:8], n)
        if gone:
            self.supervisor.wake()

    def _may_touch(self, caller: Caller, rec: JobRecord) -> bool:
        me = caller.identity
        return me.privileged or rec.uid == me.uid

    def _on_final(self, rec: JobRecord) -> None:
        """(state lock held) A job ended for good: its row; its output now
        counts in what its user holds (until it is collected). An output
        that would take the user past --max-user-bytes is not kept: the job
        ends ``failed``, saying why (a put is small, what it returns is not:
        counted only after, 20 jobs of 1 MB each held 20 MB past a 2 MiB cap)."""
        if self._jobs_held is not None:
            size = len(rec.output_blob or b"")
            before = self._outputs.pop(rec.seq, 0)   # a requeued job ends again
            if size and self.max_user_bytes and rec.uid not in (0, os.getuid()):
                held = self._jobs_held.get(rec.uid, (0, 0))[1] - before + self.unsent(rec.uid)
                if held + size > self.max_user_bytes:
                    rec.status, rec.output_blob = JobStatus.FAILED, None
                    rec.exception = (f"its output ({describe_size(size)}) is not kept: {rec.user} would "
                                     f"hold more than {describe_size(self.max_user_bytes)} of jobs' "
                                     f"functions, arguments and outputs (--max-user-bytes); collect or "
                                     f"clean finished ones")
                    size = 0
            if size:
                self._outputs[rec.seq] = size
            self._hold_jobs(rec.uid, 0, size - before)
        self.log.record(rec, self._visible_qid(rec.qid))

    # ------------------------------------------------- what a user holds
    def _hold_jobs(self, uid: int, jobs: int, size: int) -> None:
        """(lock held) ``uid`` holds ``jobs`` more jobs and ``size`` more bytes."""
        held = self._jobs_held.get(uid)
        if held is None:
            held = self._jobs_held[uid] = [0, 0]
        held[0] += jobs
        held[1] += size
        if held == [0, 0]:
            del self._jobs_held[uid]

    def _check_share(self, me: Identity, jobs: int, size: int) -> None:
        """(lock held) ``ServerLimit`` if ``jobs`` more jobs of ``size``
        payload bytes would take ``me`` past a cap (root and the owner: none)."""
        if me.privileged:
            return
        n, b = self._jobs_held.get(me.uid, (0, 0))
        b += self.unsent(me.uid)   # results handed over that her client has not read
        if self.max_user_jobs and n + jobs > self.max_user_jobs:
            raise ServerLimit(f"at most {self.max_user_jobs:,} jobs per user on this server "
                              f"(--max-user-jobs): {me.user} has {n:,} not collected; collect or "
                              f"clean finished ones, or put fewer at once")
        if self.max_user_bytes and b + size > self.max_user_bytes:
            raise ServerLimit(f"at most {describe_size(self.max_user_bytes)} of jobs' functions, "
                              f"arguments and outputs per user on this server (--max-user-bytes): "
                              f"{me.user} holds {describe_size(b)}, these take {describe_size(size)}; "
                              f"collect or clean finished ones")

    def count_restored(self) -> None:
        """(before serving) What the jobs restored from a state dir hold."""
        if self._jobs_held is None:
            return
        with self.state.cond:
            for rec in self.state.records.values():
                out = len(rec.output_blob or b"") + len(rec.callback_blob or b"")
                if out and rec.finished:
                    self._outputs[rec.seq] = out
                else:
                    out = 0
                self._hold_jobs(rec.uid, 1, _put_bytes(rec) + out)

    def _on_gone(self, rec: JobRecord) -> None:
        """(state lock held) A job's record is deleted (collected, cleaned,
        expired): its environment is needed no more. Kept until then, not
        only until the job ends, so that ``requeue_job`` runs it again where
        it ran; the cost is the same one release per job, later. Its log
        goes too (joblogs.py: a dict pop; the file, if any, is removed
        outside the lock)."""
        if rec.env_id:
            self._env_release(rec.env_id)
        if self.logs is not None:
            self.logs.forget(rec.seq)
        if self._jobs_held is not None:
            self._hold_jobs(rec.uid, -1, -_put_bytes(rec) - self._outputs.pop(rec.seq, 0))

    # --------------------------------------------------------------- clients
    def hello(self, caller: Caller, client: str, cwd: str, sys_path: List[str], holding: bool,
              private_qid: Optional[str] = None) -> dict:
        """Register a client: its environment for jobs and its notice channel.

        ``private_qid``: the client's own queue (no ``qid`` given): if it
        disconnects without ``goodbye``, that queue's jobs are cancelled."""
        me = caller.identity
        schema.check_token(client)
        path = schema.check_env(cwd, sys_path)
        schema.check_bool("holding", holding)
        private = None if private_qid is None else self._key(caller, private_qid)
        with self.state.cond:
            c = self._clients.get(client)
            if c is not None and c.uid != me.uid:
                raise PermissionError("that client token is taken")
            if c is None:
                self._cap(me, MAX_CLIENTS_PER_USER,
                          "a Queue is one until its detach() or dispose(), or until its connections close")
            env_id = self._env_acquire(me, cwd, path)
            if c is None:
                c = self._clients[client] = _Client(client, me.uid)
                self._count(me.uid, 0, 1)
            else:   # hello again: the new environment replaces the old one
                self._env_release(c.env_id)
            c.env_id, c.leaving = env_id, False
            if private is not None:
                c.private = private
            self._hold(caller, c)
            self.state.open_notices(client)
            if holding:
                self.state.set_holding(client, True)
        return {"env_id": env_id, "workers": self.supervisor.slots, "pid": os.getpid(),
                "shared": self.shared, "user": me.user, "uid": me.uid}

    def goodbye(self, caller: Caller, client: str, qid: str, forget: bool = True) -> None:
        """A client leaves: release what it held, drop its uncollected
        results; its token is freed once its notice reader has taken what
        is left (at once if nothing is)."""
        self._client(caller, client)
        key = self._key(caller, qid)
        schema.check_bool("forget", forget)
        with self.state.cond:
            c = self._clients.get(client)
            private = None
            if c is not None:
                private, c.private = c.private, None
                c.leaving = True
            if not self.state.close_notices(client) and c is not None:
                self._free(c)
            held = self._held(caller)
            if c is not None and held.clients.get(client) is c:   # this connection speaks for it no more
                del held.clients[client]
                self._let_go(c)
        if forget:
            self.state.forget_client(key, client, drop_queue=private == key)

    def take_notices(self, caller: Caller, client: str, timeout: Optional[float]) -> Optional[List[dict]]:
        self._client(caller, client)
        timeout = schema.wait_timeout(timeout)
        c = self._clients.get(client)
        if c is not None and self._held(caller).clients.get(client) is not c:
            with self.state.cond:
                if self._clients.get(client) is c:
                    self._hold(caller, c)

        def visible(notes):
            if notes is None:   # closed and drained: a client that said goodbye is gone now
                with self.state.cond:
                    c = self._clients.get(client)
                    if c is not None and c.leaving:
                        self._free(c)
                return None
            return [self._snap(n) for n in notes]

        return _parked(caller, self.state.take_notices(client, timeout, caller.reply_channel(visible)), visible)

    def mark_processed(self, caller: Caller, results: List[Processed]) -> None:
        """The client post-processed these held jobs of its own (others are ignored)."""
        if type(results) is not list and type(results) is not tuple:
            raise TypeError(f"results must be a list of (seq, callback blob), not {type(results).__name__}")
        checked = [Processed.parse(r) for r in results]
        records = self.state.records
        with self.state.cond:
            mine = [(seq, blob) for seq, blob in checked
                    if seq in records and self._may_touch(caller, records[seq])]
            kept = [(seq, blob) for seq, blob in mine if blob]
            if not kept or self._jobs_held is None:
                self.state.mark_processed(mine)
                return
            # the callbacks' results stay on the server until collected: they count in --max-user-bytes
            self._check_share(caller.identity, 0, sum(len(blob) for _, blob in kept))
            self.state.mark_processed(mine)
            for seq, blob in kept:
                rec = records.get(seq)
                if rec is not None and rec.callback_blob is blob:   # taken (a held job, processed now)
                    self._outputs[seq] = self._outputs.get(seq, 0) + len(blob)
                    self._hold_jobs(rec.uid, 0, len(blob))

    # ------------------------------------------------------------------ jobs
    def configure(self, caller: Caller, qid: str, settings: Dict[str, Any]) -> dict:
        key = self._key(caller, qid)
        schema.check_settings(settings)
        self._use(caller, key)
        self.state.configure(key, **settings)
        self.supervisor.wake()
        return self.state.counts(key)

    def reserve_ids(self, caller: Caller, qid: str, n: int) -> int:
        key = self._key(caller, qid)
        n = schema.check_int("n", n, 1, schema.MAX_RESERVE)
        self._use(caller, key)
        return self.state.reserve_ids(key, n)

    def put(self, caller: Caller, qid: str, records: List[dict]) -> List[int]:
        """Enqueue a batch of job records, all or nothing, as the caller;
        their per-queue ids."""
        return [rec.id for rec in self._add(caller, qid, records)]

    def _add(self, caller: Caller, qid: str, records: List[dict]) -> List[JobRecord]:
        """``put``'s work; the records as stored (their ``seq`` is set).

        Every record is checked, and the server's record of it built from
        the checked values (``messages.job_records``), before any is
        enqueued; the per-batch facts (the client token is the caller's, the
        environment is the caller's) once per distinct value. Each job holds
        its environment until it ends for good."""
        me = caller.identity
        key = self._key(caller, qid)
        recs = job_records(records, key, me.user, me.uid)
        clients, envs = set(), {}
        for rec in recs:
            client, env_id = rec.client, rec.env_id
            if client not in clients:
                self._client(caller, client)
                clients.add(client)
            envs[env_id] = envs.get(env_id, 0) + 1
        self._use(caller, key)
        with self.state.cond:
            for env_id in envs:
                env = self._envs.get(env_id) if env_id else None
                if env_id and (env is None or env.uid != me.uid):
                    raise ValueError(f"env_id: unknown environment {env_id}")
            held = None
            if self._jobs_held is not None:
                held = (len(recs), sum(map(_put_bytes, recs)))
                self._check_share(me, *held)
                self._hold_jobs(me.uid, *held)
            # the jobs hold their environments before they are added: one
            # may end within add (skipped: a job it waits for ended otherwise)
            for env_id, n in envs.items():
                if env_id:
                    self._envs[env_id].refs += n
            try:
                self.state.add(key, recs)
            except BaseException:   # refused: nothing was added
                for env_id, n in envs.items():
                    if env_id:
                        self._envs[env_id].refs -= n
                if held is not None:
                    self._hold_jobs(me.uid, -held[0], -held[1])
                raise
        self.supervisor.dispatch_now()
        return recs

    def put_then(self, caller: Caller, qid: str, records: List[dict], method: str, args: list):
        """``put`` a client's buffered jobs, then make its next call: one
        round trip where there were two (a ``put`` then ``get(wait=True)``)."""
        if method not in self.EXPOSED or method == "put_then":
            raise AttributeError(f"method {method!r} is not exposed")
        if type(args) is not list:
            raise TypeError(f"args must be a list, not {type(args).__name__}")
        self.put(caller, qid, records)
        return getattr(self, method)(caller, *args)

    def cancel(self, caller: Caller, qid: str, job_id: int) -> bool:
        done = self.state.cancel(self._key(caller, qid), _int("job_id", job_id))
        self.supervisor.wake()
        return done

    def cancel_all(self, caller: Caller, qid: str, client: Optional[str], running: bool) -> int:
        key = self._key(caller, qid)
        if client is not None:
            schema.check_token(client)
        n = self.state.cancel_all(key, client, schema.check_bool("running", running))
        self.supervisor.wake()
        return n

    # --------------------------------------------------------------- results
    def counts(self, caller: Caller, qid: str) -> dict:
        return self.state.counts(self._key(caller, qid))

    def get(self, caller: Caller, qid: str, wait: bool, timeout: Optional[float],
            arrivals: bool = False) -> Optional[dict]:
        """The best completed job (None: none, or none before ``timeout``).
        ``arrivals``: wait for jobs put later too (``QueueState.get``)."""
        def visible(answer):
            if answer[0] is not None:
                caller.handed.append(answer[0]["seq"])
            return self._snap(answer[0])

        key, timeout = self._key(caller, qid), schema.wait_timeout(timeout)
        got = self.state.get(key, schema.check_bool("wait", wait), timeout, caller.reply_channel(visible),
                             schema.check_bool("arrivals", arrivals))
        return _parked(caller, got, visible)

    def ack(self, caller: Caller) -> List[int]:
        """The client read the reply that handed it results (client/delivered.py):
        their job numbers, answered once their removal is committed (the
        connection's reply waits for it, see connections.py and store.py)."""
        seqs, caller.confirmed = caller.confirmed, []
        return seqs

    def collect(self, caller: Caller, qid: str, n: int) -> List[dict]:
        key = self._key(caller, qid)
        n = schema.check_int("n", n, schema.INT64_MIN, schema.INT64_MAX)
        got = self.state.pop_completed(key, n)
        caller.handed.extend(s["seq"] for s in got)
        return [self._snap(s) for s in got]

    def pop_ids(self, caller: Caller, qid: str, ids: List[int]) -> List[Optional[dict]]:
        key = self._key(caller, qid)
        got = self.state.pop_ids(key, schema.check_ids("ids", ids))
        caller.handed.extend(s["seq"] for s in got if s is not None)
        return [self._snap(s) for s in got]

    def wait_pending(self, caller: Caller, qid: str, below: int, timeout: Optional[float],
                     arrivals: bool = False) -> int:
        """How many of the qid's jobs wait or work, once fewer than ``below``.
        ``arrivals``: an empty queue waits for jobs to arrive and finish
        (``QueueState.wait_pending``)."""
        key, timeout = self._key(caller, qid), schema.wait_timeout(timeout)
        below = schema.check_int("below", below, schema.INT64_MIN, schema.INT64_MAX)
        arrivals = schema.check_bool("arrivals", arrivals)
        return _parked(caller, self.state.wait_pending(key, below, timeout, caller.reply_channel(int),
                                                       arrivals))

    def wait_client(self, caller: Caller, client: str, below: int, timeout: Optional[float]) -> int:
        """How many of the client's jobs are not done, once fewer than ``below``."""
        client, timeout = self._client(caller, client), schema.wait_timeout(timeout)
        below = schema.check_int("below", below, schema.INT64_MIN, schema.INT64_MAX)
        return _parked(caller, self.state.wait_client(client, below, timeout, caller.reply_channel(int)))

    def wait_free(self, caller: Caller, qid: str, timeout: Optional[float]) -> bool:
        """True once the qid could start a job now (ezpq's ``wait_worker``)."""
        key, timeout = self._key(caller, qid), schema.wait_timeout(timeout)
        state, supervisor = self.state, self.supervisor

        def slots() -> int:   # the qid's cap, else the server's workers (the client's n_workers())
            q = state.queues.get(key)
            return (q.cap if q is not None and q.cap else 0) or supervisor.slots

        return _parked(caller, self.state.wait_free(key, slots, timeout, caller.reply_channel(bool)))

    def jobs(self, caller: Caller, qid: str) -> List[dict]:
        key = self._key(caller, qid)
        with self.state.cond:
            q = self.state.queues.get(key)
            seqs = sorted(q.ids.values()) if q is not None else []
        return self._snapshots(seqs)

    def _snapshots(self, seqs: List[int]) -> List[dict]:
        """The jobs ``seqs`` as plain data, ``LIST_SLICE`` per hold of the
        state's lock (a job gone meanwhile is left out): a listing is a copy
        of each job as it stood, not of all jobs at one instant."""
        out: List[dict] = []
        records = self.state.records
        for i in range(0, len(seqs), LIST_SLICE):
            with self.state.cond:
                for seq in seqs[i:i + LIST_SLICE]:
                    rec = records.get(seq)
                    if rec is not None:
                        out.append(self._snap(rec.snapshot()))
        return out

    # ------------------------------------------------- the ezpq command's calls
    def whoami(self, caller: Caller) -> dict:
        me = caller.identity
        return {"uid": me.uid, "user": me.user, "privileged": me.privileged}

    def submit(self, caller: Caller, qid: str, record: dict) -> dict:
        """``ezpq submit``: enqueue one job; its server-wide number (``job``,
        what the other ezpq commands take) and its per-queue ``id``."""
        rec = self._add(caller, qid, [record])[0]
        return {"job": rec.seq, "id": rec.id}

    def list_jobs(self, caller: Caller, all_users: bool = False) -> List[dict]:
        """Every job still on the server that the caller may see (all: privileged)."""
        me = caller.identity
        schema.check_bool("all_users", all_users)
        everyone = all_users and me.privileged
        with self.state.cond:
            seqs = [seq for seq, r in self.state.records.items() if everyone or r.uid == me.uid]
        seqs.sort()
        return self._snapshots(seqs)

    def _record(self, caller: Caller, seq: int) -> JobRecord:
        rec = self.state.records.get(_int("seq", seq, 1))
        if rec is None or not self._may_touch(caller, rec):
            raise JobNotFound(f"no job {seq}")
        return rec

    def show_job(self, caller: Caller, seq: int) -> dict:
        with self.state.cond:
            return self._snap(self._record(caller, seq).snapshot())

    def cancel_job(self, caller: Caller, seq: int) -> bool:
        with self.state.cond:
            rec = self._record(caller, seq)
            qid, job_id = rec.qid, rec.id
        done = self.state.cancel(qid, job_id)
        self.supervisor.wake()
        return done

    # ------------------------------------------------------------------ logs
    def _log_record(self, caller: Caller, job: int, qid: Optional[str]) -> JobRecord:
        """(lock held) The job whose log is asked for: ``job`` is its
        server-wide number, or with ``qid`` its id in the caller's queue
        ``qid`` (``Queue.log``). Another user's job is "not found", as in ``show``."""
        if qid is None:
            return self._record(caller, job)
        job = _int("job", job, 1)
        q = self.state.queues.get(self._key(caller, qid))
        rec = self.state.records.get(q.ids.get(job, 0)) if q is not None else None
        if rec is None or not self._may_touch(caller, rec):
            raise JobNotFound(f"no job {job} in queue {qid!r}")
        return rec

    def job_log(self, caller: Caller, job: int, offset: int = 0, qid: Optional[str] = None) -> dict:
        """A job's output from byte ``offset``, at most ``joblogs.READ_LIMIT``
        bytes a call: ``{"job", "data" (the bytes as latin-1 text: JSON
        carries them unchanged), "offset", "size", "ended", "status"}``.
        ``ended`` is read first: once it is True, ``data`` up to ``size`` is
        all the job wrote (the supervisor drains a job's pipes before it
        records its end). Only the job's owner (root and the server's owner:
        anyone's); the file is read outside the state's lock."""
        offset = _int("offset", offset)
        with self.state.cond:
            rec = self._log_record(caller, job, qid)
            seq, ended, status = rec.seq, rec.finished, rec.status.value
        data = self.logs.read(seq, offset) if self.logs is not None else b""
        size = self.logs.size(seq) if self.logs is not None else 0
        return {"job": seq, "data": data.decode("latin-1"), "offset": offset,
                "size": max(size, offset + len(data)), "ended": ended, "status": status}

    def wait_log(self, caller: Caller, job: int, offset: int, timeout: Optional[float],
                 qid: Optional[str] = None) -> dict:
        """``{"size", "ended"}`` once the job's log is longer than ``offset``
        bytes or the job has ended (or when ``timeout`` passes): ``ezpq
        follow``'s one way to wait, a parked call answered by the supervisor
        the moment it appends output (no polling)."""
        offset = _int("offset", offset)
        timeout = schema.wait_timeout(timeout)
        logs = self.logs
        with self.state.cond:
            rec = self._log_record(caller, job, qid)
            seq, records = rec.seq, self.state.records

            def ended() -> bool:
                return rec.finished or seq not in records

            def ready() -> bool:   # under the lock at every change: kept short
                return ended() or (logs is not None and logs.size(seq) > offset)

            def answer() -> dict:
                return {"size": logs.size(seq) if logs is not None else 0, "ended": ended()}

            return _parked(caller, self.state.wait_for(ready, answer, timeout, caller.reply_channel(dict)))

    def wait_jobs(self, caller: Caller, seqs: List[int], timeout: Optional[float]) -> bool:
        """True once these jobs (or all the caller's) have all finished,
        False if ``timeout`` passes first. Only a bool: the rows come from
        ``show_jobs``, built by the caller's own thread, a slice per hold of
        the lock (a parked answer is built under the lock by whichever thread
        made it ready, the supervisor's often: 100 parked waits over 30,000
        jobs each answered with every row held it for minutes)."""
        me = caller.identity
        schema.check_ids("seqs", seqs, 1)
        timeout = schema.wait_timeout(timeout)
        if len(seqs) > MAX_WAIT_JOBS:
            raise ValueError(f"wait_jobs: at most {MAX_WAIT_JOBS} jobs per call, got {len(seqs)}")
        with self.state.cond:
            if seqs:
                recs = [self._record(caller, s) for s in dict.fromkeys(seqs)]
            else:
                recs = [r for r in self.state.records.values() if r.uid == me.uid]
            unfinished = [r for r in recs if not r.finished]
            del recs
            first = [0]   # unfinished[:first[0]] have finished (a finished job stays so)

            def done() -> bool:   # re-run at every change, under the lock: kept short
                # each job is passed once after it ended, never scanned again: a
                # parked call behind 100,000 ended jobs and one that waits (its
                # caller's) costs one look per change, not 100,000 (it did, on
                # every parked connection, at every change of the server)
                i, n = first[0], len(unfinished)
                while i < n and unfinished[i].finished:
                    i += 1
                first[0] = i
                return i == n

            return _parked(caller, self.state.wait_for(done, done, timeout, caller.reply_channel(bool)))

    def show_jobs(self, caller: Caller, seqs: List[int]) -> List[dict]:
        """These jobs of the caller's (all of them: ``[]``) as they stand,
        each once; JobNotFound for one that is not the caller's or gone."""
        schema.check_ids("seqs", seqs, 1)
        if len(seqs) > MAX_WAIT_JOBS:
            raise ValueError(f"show_jobs: at most {MAX_WAIT_JOBS} jobs per call, got {len(seqs)}")
        if not seqs:
            return self.list_jobs(caller)
        seqs = list(dict.fromkeys(seqs))
        with self.state.cond:
            for seq in seqs:
                self._record(caller, seq)
        return self._snapshots(seqs)

    def report(self, caller: Caller, by: str, all_users: bool = True) -> List[dict]:
        return report(self.accounting(caller, all_users), by)

    def accounting(self, caller: Caller, all_users: bool = True) -> List[dict]:
        """Accounting rows the caller may see (all of them: privileged callers)."""
        me = caller.identity
        return self.log.visible(None if (all_users and me.privileged) else me.uid)

    # --------------------------------------------------------------- workers
    def set_workers(self, caller: Caller, n: int) -> int:
        if not caller.identity.privileged:
            raise PermissionError("only root or the server's owner may change the workers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers must be an int >= 1, got {n!r}")
        self.supervisor.set_slots(n)
        return n

    def n_workers(self, caller: Caller) -> int:
        return self.supervisor.slots

    def info(self, caller: Caller) -> dict:
        with self.state.cond:
            return {"workers": self.supervisor.slots, "running": self.state.n_running,
                    "pid": os.getpid(), "queues": len(self.state.queues),
                    "clients": len(self._clients), "environments": len(self._envs),
                    "version": self.state.version, "shared": self.shared,
                    "parked_calls": len(self.state.deferred)}
