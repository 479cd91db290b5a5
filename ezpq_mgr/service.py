"""The object a server exposes to its clients, one method per request.

``multiprocessing.managers`` serves every client connection on its own
thread, so these methods run concurrently; all shared data lives in
``QueueState`` behind its single lock. Replies are plain snapshots (dicts,
lists, numbers, bytes), never live containers. Blocking calls wait at most
``SLICE`` seconds, so a client that vanished cannot strand a server thread;
clients loop over slices.

On a shared server every request runs as its caller (``peers.current()``):
a queue name is private to its user (stored as ``"uid:qid"``), a job's
``user``/``uid`` are the caller's, never what the client claims, and a user
sees, collects and cancels only their own jobs; root and the server's owner
see all through the admin calls (``list_jobs``, ``cancel_job``, ...).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from . import peers
from .accounting import AccountingLog, report
from .errors import JobNotFound
from .job import JobRecord
from .replies import Deferred, park, reply_channel
from .state import QueueState
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

__all__ = ["Service", "SLICE"]

SLICE = 5.0


def _slice(timeout: Optional[float]) -> float:
    if timeout is None or timeout <= 0:
        return SLICE
    return min(float(timeout), SLICE)


class Service:
    """Thread-safe facade over the queue state and the worker pool."""

    EXPOSED = (
        "hello", "configure", "put", "reserve_ids", "counts", "get", "collect", "pop_ids",
        "wait_pending", "wait_client", "wait_change", "cancel", "cancel_all",
        "jobs", "job", "take_notices", "mark_processed", "set_holding",
        "goodbye", "set_workers", "n_workers", "info",
        "list_jobs", "show_job", "cancel_job", "wait_jobs", "report", "accounting", "whoami",
        "put_then",
    )

    def __init__(self, state: QueueState, supervisor: Supervisor, shared: bool = False,
                 accounting: Optional[AccountingLog] = None):
        self.state = state
        self.supervisor = supervisor
        self.shared = shared
        self.log = accounting or AccountingLog()
        state.on_final = self._on_final
        self._env_ids: Dict[Tuple[str, Tuple[str, ...]], int] = {}
        self._next_env = itertools.count(1)
        self._clients: Dict[str, int] = {}      # client token -> uid
        self._lock = threading.Lock()

    # -------------------------------------------------------------- helpers
    def _key(self, qid: str) -> str:
        """The caller's private name for ``qid`` on a shared server."""
        if not isinstance(qid, str):
            raise TypeError(f"qid must be a string, not {type(qid).__name__}")
        return f"{peers.current().uid}:{qid}" if self.shared else qid

    def _visible_qid(self, key: str) -> str:
        return key.partition(":")[2] if self.shared else key

    def _snap(self, snap: Optional[dict]) -> Optional[dict]:
        if snap is not None:
            snap["qid"] = self._visible_qid(snap["qid"])
        return snap

    def _client(self, token: str) -> str:
        """Refuse a client token that belongs to another user."""
        uid = self._clients.get(token)
        me = peers.current()
        if uid is not None and uid != me.uid and not me.privileged:
            raise PermissionError("that client belongs to another user")
        return token

    def _may_touch(self, rec: JobRecord) -> bool:
        me = peers.current()
        return me.privileged or rec.uid == me.uid

    def _on_final(self, rec: JobRecord) -> None:
        self.log.record(rec, self._visible_qid(rec.qid))

    # --------------------------------------------------------------- clients
    def hello(self, client: str, cwd: str, sys_path: List[str], holding: bool) -> dict:
        """Register a client: its environment for jobs and its notice channel."""
        me = peers.current()
        key = (cwd, tuple(sys_path))
        with self._lock:
            if client in self._clients and self._clients[client] != me.uid:
                raise PermissionError("that client token is taken")
            self._clients[client] = me.uid
            env_id = self._env_ids.get(key)
            if env_id is None:
                env_id = self._env_ids[key] = next(self._next_env)
                self.supervisor.envs[env_id] = (cwd, list(sys_path))
        self.state.open_notices(client)
        if holding:
            self.state.set_holding(client, True)
        return {"env_id": env_id, "workers": self.supervisor.slots, "pid": os.getpid(),
                "shared": self.shared, "user": me.user, "uid": me.uid}

    def goodbye(self, client: str, qid: str, forget: bool = True) -> None:
        """A client leaves: release what it held, drop its uncollected results."""
        self.state.close_notices(self._client(client))
        if forget:
            self.state.forget_client(self._key(qid), client)

    def set_holding(self, client: str, holding: bool) -> None:
        self.state.set_holding(self._client(client), holding)

    def take_notices(self, client: str, timeout: float) -> Optional[List[dict]]:
        notes = self.state.take_notices(self._client(client), _slice(timeout))
        return None if notes is None else [self._snap(n) for n in notes]

    def mark_processed(self, results: List[Tuple[int, Optional[bytes]]]) -> None:
        with self.state.cond:
            mine = [(seq, blob) for seq, blob in results
                    if seq in self.state.records and self._may_touch(self.state.records[seq])]
        self.state.mark_processed(mine)

    # ------------------------------------------------------------------ jobs
    def configure(self, qid: str, settings: Dict[str, Any]) -> dict:
        key = self._key(qid)
        self.state.configure(key, **settings)
        self.supervisor.wake()
        return self.state.counts(key)

    def reserve_ids(self, qid: str, n: int) -> int:
        return self.state.reserve_ids(self._key(qid), int(n))

    def put(self, qid: str, records: List[dict]) -> List[int]:
        """Enqueue a batch of job records, all or nothing, as the caller."""
        me = peers.current()
        key = self._key(qid)
        recs = []
        for r in records:
            r = dict(r)
            r.setdefault("id", 0)
            r["user"], r["uid"] = me.user, me.uid
            if r["client"] in self._clients:
                self._client(r["client"])
            recs.append(JobRecord(seq=0, qid=key, **r))
        ids = self.state.add(key, recs)
        self.supervisor.dispatch_now()
        return ids

    def put_then(self, qid: str, records: List[dict], method: str, args: list):
        """``put`` a client's buffered jobs, then make its next call: one
        round trip where there were two (a ``put`` then ``get(wait=True)``)."""
        if method not in self.EXPOSED or method == "put_then":
            raise AttributeError(f"method {method!r} is not exposed")
        self.put(qid, records)
        return getattr(self, method)(*args)

    def cancel(self, qid: str, job_id: int) -> bool:
        done = self.state.cancel(self._key(qid), job_id)
        self.supervisor.wake()
        return done

    def cancel_all(self, qid: str, client: Optional[str], running: bool) -> int:
        n = self.state.cancel_all(self._key(qid), client, running)
        self.supervisor.wake()
        return n

    # --------------------------------------------------------------- results
    def counts(self, qid: str) -> dict:
        return self.state.counts(self._key(qid))

    def get(self, qid: str, wait: bool, timeout: float) -> Tuple[Optional[dict], int]:
        def visible(answer):
            return self._snap(answer[0]), answer[1]

        got = self.state.get(self._key(qid), wait, _slice(timeout), reply_channel(visible))
        return park(got) if isinstance(got, Deferred) else visible(got)

    def collect(self, qid: str, n: int) -> List[dict]:
        return [self._snap(s) for s in self.state.pop_completed(self._key(qid), n)]

    def pop_ids(self, qid: str, ids: List[int]) -> List[Optional[dict]]:
        return [self._snap(s) for s in self.state.pop_ids(self._key(qid), ids)]

    def wait_pending(self, qid: str, below: int, timeout: float) -> int:
        return self.state.wait_pending(self._key(qid), below, _slice(timeout))

    def wait_client(self, client: str, timeout: float) -> int:
        return self.state.wait_client(self._client(client), _slice(timeout))

    def wait_change(self, version: int, timeout: float) -> int:
        return self.state.wait_change(version, _slice(timeout))

    def jobs(self, qid: str) -> List[dict]:
        return [self._snap(s) for s in self.state.jobs(self._key(qid))]

    def job(self, qid: str, job_id: int) -> dict:
        return self._snap(self.state.job(self._key(qid), job_id))

    # ------------------------------------------------- the ezpq command's calls
    def whoami(self) -> dict:
        me = peers.current()
        return {"uid": me.uid, "user": me.user, "privileged": me.privileged}

    def list_jobs(self, all_users: bool = False) -> List[dict]:
        """Every job still on the server that the caller may see (all: privileged)."""
        me = peers.current()
        with self.state.cond:
            recs = [r for r in self.state.records.values()
                    if r.uid == me.uid or (all_users and me.privileged)]
            return [self._snap(r.snapshot()) for r in sorted(recs, key=lambda r: r.seq)]

    def _record(self, seq: int) -> JobRecord:
        rec = self.state.records.get(seq)
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

    def wait_jobs(self, seqs: List[int], timeout: float) -> List[dict]:
        """Block up to ``timeout`` until these jobs (or all the caller's) finished."""
        me = peers.current()
        with self.state.cond:
            if seqs:
                recs = [self._record(s) for s in seqs]
            else:
                recs = [r for r in self.state.records.values() if r.uid == me.uid]
            self.state._wait_for(lambda: all(r.finished for r in recs), _slice(timeout))
            return [self._snap(r.snapshot()) for r in recs]

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
