"""The object a server exposes to its clients, one method per request.

``multiprocessing.managers`` serves every client connection on its own
thread, so these methods run concurrently; all shared data lives in
``QueueState`` behind its single Condition. Replies are plain snapshots
(dicts, lists, numbers, bytes), never live containers. Blocking calls wait
at most ``SLICE`` seconds, so a client that vanished cannot strand a server
thread; clients loop over slices.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from .job import JobRecord
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
    )

    def __init__(self, state: QueueState, supervisor: Supervisor, embedded: bool = False):
        self.state = state
        self.supervisor = supervisor
        self.embedded = embedded
        self._env_ids: Dict[Tuple[str, Tuple[str, ...]], int] = {}
        self._next_env = itertools.count(1)
        self._lock = threading.Lock()

    # --------------------------------------------------------------- clients
    def hello(self, client: str, cwd: str, sys_path: List[str], holding: bool) -> dict:
        """Register a client: its environment for jobs and its notice channel."""
        key = (cwd, tuple(sys_path))
        with self._lock:
            env_id = self._env_ids.get(key)
            if env_id is None:
                env_id = self._env_ids[key] = next(self._next_env)
                self.supervisor.envs[env_id] = (cwd, list(sys_path))
        self.state.open_notices(client)
        if holding:
            self.state.set_holding(client, True)
        return {"env_id": env_id, "workers": self.supervisor.slots, "pid": os.getpid(),
                "embedded": self.embedded}

    def goodbye(self, client: str, qid: str, forget: bool = True) -> None:
        """A client leaves: release what it held, drop its uncollected results."""
        self.state.close_notices(client)
        if forget:
            self.state.forget_client(qid, client)

    def set_holding(self, client: str, holding: bool) -> None:
        self.state.set_holding(client, holding)

    def take_notices(self, client: str, timeout: float) -> Optional[List[dict]]:
        return self.state.take_notices(client, _slice(timeout))

    def mark_processed(self, results: List[Tuple[int, Optional[bytes]]]) -> None:
        self.state.mark_processed(results)

    # ------------------------------------------------------------------ jobs
    def configure(self, qid: str, settings: Dict[str, Any]) -> dict:
        self.state.configure(qid, **settings)
        self.supervisor.wake()
        return self.state.counts(qid)

    def reserve_ids(self, qid: str, n: int) -> int:
        return self.state.reserve_ids(qid, int(n))

    def put(self, qid: str, records: List[dict]) -> List[int]:
        """Enqueue a batch of job records, all or nothing."""
        recs = [JobRecord(seq=0, qid=qid, **r) if "id" in r else JobRecord(seq=0, qid=qid, id=0, **r)
                for r in records]
        ids = self.state.add(qid, recs)
        self.supervisor.wake()
        return ids

    def cancel(self, qid: str, job_id: int) -> bool:
        done = self.state.cancel(qid, job_id)
        self.supervisor.wake()
        return done

    def cancel_all(self, qid: str, client: Optional[str], running: bool) -> int:
        n = self.state.cancel_all(qid, client, running)
        self.supervisor.wake()
        return n

    # --------------------------------------------------------------- results
    def counts(self, qid: str) -> dict:
        return self.state.counts(qid)

    def get(self, qid: str, wait: bool, timeout: float) -> Tuple[Optional[dict], int]:
        return self.state.get(qid, wait, _slice(timeout))

    def collect(self, qid: str, n: int) -> List[dict]:
        return self.state.pop_completed(qid, n)

    def pop_ids(self, qid: str, ids: List[int]) -> List[Optional[dict]]:
        return self.state.pop_ids(qid, ids)

    def wait_pending(self, qid: str, below: int, timeout: float) -> int:
        return self.state.wait_pending(qid, below, _slice(timeout))

    def wait_client(self, client: str, timeout: float) -> int:
        return self.state.wait_client(client, _slice(timeout))

    def wait_change(self, version: int, timeout: float) -> int:
        return self.state.wait_change(version, _slice(timeout))

    def jobs(self, qid: str) -> List[dict]:
        return self.state.jobs(qid)

    def job(self, qid: str, job_id: int) -> dict:
        return self.state.job(qid, job_id)

    # --------------------------------------------------------------- workers
    def set_workers(self, n: int) -> int:
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
                    "version": self.state.version}
