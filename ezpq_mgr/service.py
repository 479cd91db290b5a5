"""The object a server exposes to its clients, one method per request.

``multiprocessing.managers`` serves every client connection on its own
thread, so these methods run concurrently; all shared data lives in
``QueueState`` behind its single lock. Replies are plain snapshots (dicts,
lists, numbers, bytes), never live containers. Every blocking call is parked
(``QueueState._answer_or_defer``) and answered the moment its condition
holds, or at its own timeout (0 or None: none); a client that disconnects
withdraws it. Clients make one call per wait, no loops.

On a shared server every request runs as its caller (``peers.current()``):
a queue name is private to its user (stored as ``"uid:qid"``), a job's
``user``/``uid`` are the caller's, never what the client claims, and a user
sees, collects and cancels only their own jobs; root and the server's owner
see all through the admin calls (``list_jobs``, ``cancel_job``, ...).

Nothing a client sends is trusted: every argument is checked here against
``schema`` (the client library checks the same at the call, but a hostile
client bypasses it), before anything changes. A client that disconnects
without ``goodbye`` (``detach()``/``dispose()``), e.g. SIGKILLed, has its
private queue disposed of as ``dispose()`` would; finished jobs nobody
collects are dropped after ``keep_finished`` seconds (their accounting rows
stay in the log).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import peers, schema
from .accounting import AccountingLog, report
from .errors import JobNotFound
from .job import JobRecord
from .replies import Deferred, at_disconnect, park, reply_channel
from .state import QueueState
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

__all__ = ["Service"]

#: Jobs one wait_jobs call may name (the check runs under the state's lock).
MAX_WAIT_JOBS = 100_000


def _parked(got: Any, visible: Callable[[Any], Any] = lambda answer: answer) -> Any:
    """A state wait's result as this call's reply: ``visible(answer)`` now,
    or, parked, later (the serving thread goes back to its connection)."""
    return park(got) if isinstance(got, Deferred) else visible(got)


def _int(what: str, value: Any, low: int = 0) -> int:
    return schema.check_int(what, value, low, schema.INT64_MAX)


_conn = threading.local()   # per connection: the client tokens it holds


class Service:
    """Thread-safe facade over the queue state and the worker pool."""

    EXPOSED = (
        "hello", "configure", "put", "reserve_ids", "counts", "get", "collect", "pop_ids",
        "wait_pending", "wait_client", "wait_free", "cancel", "cancel_all",
        "jobs", "job", "take_notices", "mark_processed", "set_holding",
        "goodbye", "set_workers", "n_workers", "info",
        "list_jobs", "show_job", "cancel_job", "wait_jobs", "report", "accounting", "whoami",
        "put_then",
    )

    def __init__(self, state: QueueState, supervisor: Supervisor, shared: bool = False,
                 accounting: Optional[AccountingLog] = None, keep_finished: Optional[float] = None):
        self.state = state
        self.supervisor = supervisor
        self.shared = shared
        self.log = accounting or AccountingLog()
        state.on_final = self._on_final
        self._env_ids: Dict[Tuple[str, Tuple[str, ...]], int] = {}
        self._next_env = itertools.count(1)
        self._clients: Dict[str, int] = {}      # client token -> uid
        self._private: Dict[str, str] = {}      # client token -> its private queue's key
        self._live: Dict[str, int] = {}         # client token -> its open connections
        self._lock = threading.Lock()
        self._closed = threading.Event()
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
    def _key(self, qid: str) -> str:
        """The caller's private name for ``qid`` on a shared server."""
        if type(qid) is not str or len(qid) > schema.MAX_QID or not qid.isprintable():
            schema.check_qid(qid)
        return f"{peers.current().uid}:{qid}" if self.shared else qid

    def _visible_qid(self, key: str) -> str:
        return key.partition(":")[2] if self.shared else key

    def _snap(self, snap: Optional[dict]) -> Optional[dict]:
        if snap is not None:
            snap["qid"] = self._visible_qid(snap["qid"])
        return snap

    def _client(self, token: str, known: bool = True) -> str:
        """Refuse a client token that belongs to another user (or, ``known``:
        that no ``hello`` registered)."""
        uid = self._clients.get(token) if type(token) is str else None
        if uid is None:
            schema.check_token(token)
            if known:
                raise ValueError("client: unknown client token (call hello first)")
            return token
        me = peers.current()
        if uid != me.uid and not me.privileged:
            raise PermissionError("that client belongs to another user")
        return token

    def _hold(self, client: str) -> None:
        """This connection speaks for ``client``: while any such connection
        is open the client is alive; when the last one closes without a
        ``goodbye``, its private queue is disposed of."""
        held = getattr(_conn, "clients", None)
        if held is None:
            held = _conn.clients = set()
            at_disconnect(self._disconnected)
        if client in held:
            return
        held.add(client)
        with self._lock:
            self._live[client] = self._live.get(client, 0) + 1

    def _disconnected(self) -> None:
        """(the closing connection's thread) Dispose of the private queue of
        every client whose last connection this was and that said no goodbye."""
        for client in getattr(_conn, "clients", ()):
            with self._lock:
                n = self._live.get(client, 1) - 1
                if n > 0:
                    self._live[client] = n
                    continue
                self._live.pop(client, None)
                key = self._private.pop(client, None)
            if key is not None:
                n = self.state.abandon(key, client)
                logger.info("client %s left without goodbye: %d of its jobs cancelled", client[:8], n)
                self.supervisor.wake()
        _conn.clients = set()

    def _may_touch(self, rec: JobRecord) -> bool:
        me = peers.current()
        return me.privileged or rec.uid == me.uid

    def _on_final(self, rec: JobRecord) -> None:
        self.log.record(rec, self._visible_qid(rec.qid))

    # --------------------------------------------------------------- clients
    def hello(self, client: str, cwd: str, sys_path: List[str], holding: bool,
              private_qid: Optional[str] = None) -> dict:
        """Register a client: its environment for jobs and its notice channel.

        ``private_qid``: the client's own queue (no ``qid`` given): if it
        disconnects without ``goodbye``, that queue's jobs are cancelled."""
        me = peers.current()
        schema.check_token(client)
        schema.check_text("cwd", cwd, schema.MAX_PATH)
        if type(sys_path) is not list:
            raise TypeError(f"sys_path must be a list, not {type(sys_path).__name__}")
        if len(sys_path) > schema.MAX_SYS_PATH:
            raise ValueError(f"sys_path: at most {schema.MAX_SYS_PATH} entries")
        for p in sys_path:
            schema.check_text("sys_path", p, schema.MAX_PATH)
        schema.check_bool("holding", holding)
        private = None if private_qid is None else self._key(private_qid)
        key = (cwd, tuple(sys_path))
        with self._lock:
            if client in self._clients and self._clients[client] != me.uid:
                raise PermissionError("that client token is taken")
            self._clients[client] = me.uid
            if private is not None:
                self._private[client] = private
            env_id = self._env_ids.get(key)
            if env_id is None:
                env_id = self._env_ids[key] = next(self._next_env)
                self.supervisor.envs[env_id] = (cwd, list(sys_path))
        self._hold(client)
        self.state.open_notices(client)
        if holding:
            self.state.set_holding(client, True)
        return {"env_id": env_id, "workers": self.supervisor.slots, "pid": os.getpid(),
                "shared": self.shared, "user": me.user, "uid": me.uid}

    def goodbye(self, client: str, qid: str, forget: bool = True) -> None:
        """A client leaves: release what it held, drop its uncollected results."""
        self._client(client)
        key = self._key(qid)
        schema.check_bool("forget", forget)
        with self._lock:
            private = self._private.pop(client, None)
        self.state.close_notices(client)
        if forget:
            self.state.forget_client(key, client, drop_queue=private == key)

    def set_holding(self, client: str, holding: bool) -> None:
        schema.check_bool("holding", holding)
        self.state.set_holding(self._client(client), holding)

    def take_notices(self, client: str, timeout: Optional[float]) -> Optional[List[dict]]:
        self._client(client)
        timeout = schema.wait_timeout(timeout)
        self._hold(client)

        def visible(notes):
            return None if notes is None else [self._snap(n) for n in notes]

        return _parked(self.state.take_notices(client, timeout, reply_channel(visible)), visible)

    def mark_processed(self, results: List[Tuple[int, Optional[bytes]]]) -> None:
        """The client post-processed these held jobs of its own (others are ignored)."""
        if type(results) is not list and type(results) is not tuple:
            raise TypeError(f"results must be a list of (seq, callback blob), not {type(results).__name__}")
        checked = []
        for pair in results:
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise TypeError("results must be (seq, callback blob) pairs")
            seq, blob = pair
            _int("seq", seq, 1)
            if blob is not None:
                schema.check_blob("callback_blob", blob)
            checked.append((seq, blob))
        with self.state.cond:
            mine = [(seq, blob) for seq, blob in checked
                    if seq in self.state.records and self._may_touch(self.state.records[seq])]
        self.state.mark_processed(mine)

    # ------------------------------------------------------------------ jobs
    def configure(self, qid: str, settings: Dict[str, Any]) -> dict:
        key = self._key(qid)
        self.state.configure(key, **schema.check_settings(settings))
        self.supervisor.wake()
        return self.state.counts(key)

    def reserve_ids(self, qid: str, n: int) -> int:
        return self.state.reserve_ids(self._key(qid),
                                      schema.check_int("n", n, 1, schema.MAX_RESERVE))

    def put(self, qid: str, records: List[dict]) -> List[int]:
        """Enqueue a batch of job records, all or nothing, as the caller.

        Every record is checked (``schema.check_record``) before any is
        enqueued; the per-batch facts (the client token is the caller's, the
        environment exists) once per distinct value."""
        me = peers.current()
        key = self._key(qid)
        schema.check_records(records)
        clients, envs = set(), set()
        recs = []
        for r in records:
            client, env_id = r["client"], r.get("env_id", 0)
            if client not in clients:
                self._client(client)
                clients.add(client)
            if env_id not in envs:
                if env_id and env_id not in self.supervisor.envs:
                    raise ValueError(f"env_id: unknown environment {env_id}")
                envs.add(env_id)
            r = dict(r)
            r.setdefault("id", 0)
            r.setdefault("name", None)
            r.setdefault("lane_key", None)
            r["user"], r["uid"] = me.user, me.uid
            recs.append(JobRecord(seq=0, qid=key, **r))
        ids = self.state.add(key, recs)
        self.supervisor.dispatch_now()
        return ids

    def put_then(self, qid: str, records: List[dict], method: str, args: list):
        """``put`` a client's buffered jobs, then make its next call: one
        round trip where there were two (a ``put`` then ``get(wait=True)``)."""
        if method not in self.EXPOSED or method == "put_then":
            raise AttributeError(f"method {method!r} is not exposed")
        if type(args) is not list:
            raise TypeError(f"args must be a list, not {type(args).__name__}")
        self.put(qid, records)
        return getattr(self, method)(*args)

    def cancel(self, qid: str, job_id: int) -> bool:
        done = self.state.cancel(self._key(qid), _int("job_id", job_id))
        self.supervisor.wake()
        return done

    def cancel_all(self, qid: str, client: Optional[str], running: bool) -> int:
        key = self._key(qid)
        if client is not None:
            schema.check_token(client)
        n = self.state.cancel_all(key, client, schema.check_bool("running", running))
        self.supervisor.wake()
        return n

    # --------------------------------------------------------------- results
    def counts(self, qid: str) -> dict:
        return self.state.counts(self._key(qid))

    def get(self, qid: str, wait: bool, timeout: Optional[float]) -> Tuple[Optional[dict], int]:
        def visible(answer):
            return self._snap(answer[0]), answer[1]

        key, timeout = self._key(qid), schema.wait_timeout(timeout)
        got = self.state.get(key, schema.check_bool("wait", wait), timeout, reply_channel(visible))
        return _parked(got, visible)

    def collect(self, qid: str, n: int) -> List[dict]:
        key = self._key(qid)
        n = schema.check_int("n", n, schema.INT64_MIN, schema.INT64_MAX)
        return [self._snap(s) for s in self.state.pop_completed(key, n)]

    def pop_ids(self, qid: str, ids: List[int]) -> List[Optional[dict]]:
        key = self._key(qid)
        return [self._snap(s) for s in self.state.pop_ids(key, schema.check_ids("ids", ids))]

    def wait_pending(self, qid: str, below: int, timeout: Optional[float]) -> int:
        """How many of the qid's jobs wait or work, once fewer than ``below``."""
        key, timeout = self._key(qid), schema.wait_timeout(timeout)
        below = schema.check_int("below", below, schema.INT64_MIN, schema.INT64_MAX)
        return _parked(self.state.wait_pending(key, below, timeout, reply_channel(int)))

    def wait_client(self, client: str, below: int, timeout: Optional[float]) -> int:
        """How many of the client's jobs are not done, once fewer than ``below``."""
        client, timeout = self._client(client), schema.wait_timeout(timeout)
        below = schema.check_int("below", below, schema.INT64_MIN, schema.INT64_MAX)
        return _parked(self.state.wait_client(client, below, timeout, reply_channel(int)))

    def wait_free(self, qid: str, timeout: Optional[float]) -> bool:
        """True once the qid could start a job now (ezpq's ``wait_worker``)."""
        key, timeout = self._key(qid), schema.wait_timeout(timeout)
        state, supervisor = self.state, self.supervisor

        def slots() -> int:   # the qid's cap, else the server's workers (the client's n_workers())
            q = state.queues.get(key)
            return (q.cap if q is not None and q.cap else 0) or supervisor.slots

        return _parked(self.state.wait_free(key, slots, timeout, reply_channel(bool)))

    def jobs(self, qid: str) -> List[dict]:
        return [self._snap(s) for s in self.state.jobs(self._key(qid))]

    def job(self, qid: str, job_id: int) -> dict:
        return self._snap(self.state.job(self._key(qid), _int("job_id", job_id)))

    # ------------------------------------------------- the ezpq command's calls
    def whoami(self) -> dict:
        me = peers.current()
        return {"uid": me.uid, "user": me.user, "privileged": me.privileged}

    def list_jobs(self, all_users: bool = False) -> List[dict]:
        """Every job still on the server that the caller may see (all: privileged)."""
        me = peers.current()
        schema.check_bool("all_users", all_users)
        with self.state.cond:
            recs = [r for r in self.state.records.values()
                    if r.uid == me.uid or (all_users and me.privileged)]
            return [self._snap(r.snapshot()) for r in sorted(recs, key=lambda r: r.seq)]

    def _record(self, seq: int) -> JobRecord:
        rec = self.state.records.get(_int("seq", seq, 1))
        if rec is None or not self._may_touch(rec):
            raise JobNotFound(f"no job {seq}")
        return rec

    def show_job(self, seq: int) -> dict:
        with self.state.cond:
            return self._snap(self._record(seq).snapshot())

    def cancel_job(self, seq: int) -> bool:
        with self.state.cond:
            rec = self._record(seq)
            qid, job_id = rec.qid, rec.id
        done = self.state.cancel(qid, job_id)
        self.supervisor.wake()
        return done

    def wait_jobs(self, seqs: List[int], timeout: Optional[float]) -> List[dict]:
        """These jobs (or all the caller's) once all finished, or as they
        stand when ``timeout`` passes."""
        me = peers.current()
        schema.check_ids("seqs", seqs, 1)
        timeout = schema.wait_timeout(timeout)
        if len(seqs) > MAX_WAIT_JOBS:
            raise ValueError(f"wait_jobs: at most {MAX_WAIT_JOBS} jobs per call, got {len(seqs)}")
        with self.state.cond:
            if seqs:
                recs = [self._record(s) for s in dict.fromkeys(seqs)]
            else:
                recs = [r for r in self.state.records.values() if r.uid == me.uid]
            unfinished = [r for r in recs if not r.finished]

            def done() -> bool:   # re-run at every change, under the lock: kept short
                while unfinished and unfinished[-1].finished:
                    unfinished.pop()
                return not unfinished or all(r.finished for r in unfinished)

            def answer() -> List[dict]:
                return [self._snap(r.snapshot()) for r in recs]

            return _parked(self.state.wait_for(done, answer, timeout, reply_channel(list)))

    def report(self, by: str, all_users: bool = True) -> List[dict]:
        return report(self.accounting(all_users), by)

    def accounting(self, all_users: bool = True) -> List[dict]:
        """Accounting rows the caller may see (all of them: privileged callers)."""
        me = peers.current()
        return self.log.visible(None if (all_users and me.privileged) else me.uid)

    # --------------------------------------------------------------- workers
    def set_workers(self, n: int) -> int:
        if not peers.current().privileged:
            raise PermissionError("only root or the server's owner may change the workers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers must be an int >= 1, got {n!r}")
        self.supervisor.set_slots(n)
        return n

    def n_workers(self) -> int:
        return self.supervisor.slots

    def info(self) -> dict:
        with self.state.cond:
            return {"workers": self.supervisor.slots, "running": self.state.n_running,
                    "pid": os.getpid(), "queues": len(self.state.queues),
                    "version": self.state.version, "shared": self.shared,
                    "parked_calls": len(self.state.deferred)}
