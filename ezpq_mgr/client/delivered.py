"""Results this process was handed by a durable server: each reaches it once.

A durable server (``--state-dir``) hands a result over before the job's
removal is on disk (server/store.py): a SIGKILL in that instant would
otherwise lose the result, now it only means the job is on the server again
after the restart, and a ``get``/``collect`` hands it out a second time.
This process remembers the ids it was handed, per database (the server's
``state_id``, sent at the handshake) and qid, and drops a second delivery.

Job ids of a qid are never reused by a durable server, so an id seen before
is a redelivery. Only the last ``REMEMBERED`` ids per qid are kept: a
redelivered result is one handed out within the last group commit before
the kill (well under a millisecond of deliveries). Process-wide, because a
client typically makes a new ``Queue`` after reconnecting.
"""

from __future__ import annotations

import collections
import threading
from typing import Deque, Dict, Optional, Set, Tuple

__all__ = ["Delivered", "REMEMBERED"]

#: ids remembered per (state_id, qid)
REMEMBERED = 4096


class _Seen:
    __slots__ = ("order", "ids")

    def __init__(self) -> None:
        self.order: Deque[int] = collections.deque()
        self.ids: Set[int] = set()


class Delivered:
    """``first(state_id, qid, job_id)``: True the first time this process
    is handed that job (and remembers it), False for a redelivery. A server
    without a state dir (``state_id`` None) never hands a result twice."""

    _lock = threading.Lock()
    _seen: Dict[Tuple[str, str], _Seen] = {}

    @classmethod
    def first(cls, state_id: Optional[str], qid: str, job_id: int) -> bool:
        if state_id is None:
            return True
        with cls._lock:
            seen = cls._seen.get((state_id, qid))
            if seen is None:
                seen = cls._seen[(state_id, qid)] = _Seen()
            if job_id in seen.ids:
                return False
            seen.ids.add(job_id)
            seen.order.append(job_id)
            if len(seen.order) > REMEMBERED:
                seen.ids.discard(seen.order.popleft())
            return True

    @classmethod
    def forget(cls, state_id: Optional[str], qid: str) -> None:
        """A private queue was let go of: its random name may be drawn
        again, and a new queue of that name counts its ids from 1."""
        with cls._lock:
            cls._seen.pop((state_id, qid), None)
