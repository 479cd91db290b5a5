"""Results this process was handed by a durable server: each reaches it once.

A durable server (``--state-dir``) deletes a handed-out result's row only
once the client has acknowledged the reply that carried it (server/store.py,
``handed_over``): a SIGKILL before that cannot lose the result, it is on
the server again after the restart and is handed out again. This process
tells such a second delivery from a new result by the job's server-wide
number (never reused by a durable server) per database (the server's
``state_id``, sent at the handshake), and drops it.

The protocol (``Remote.call``): after a reply that hands results out, the
client sends ``ack`` at once without waiting for its answer; the server's
answer to it comes after the rows' removal is committed and names the job
numbers it confirms, read before the next reply on that connection. So
this process remembers a job number only from the reply that handed it to
the answer of its ``ack``, one round trip later: a collect of any size is
recognised whole, and nothing accumulates.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterable, Optional, Set

__all__ = ["Delivered"]


class Delivered:
    """``first(state_id, seq)``: True the first time this process is handed
    job ``seq`` since its removal was last confirmed, False for a second
    delivery. ``confirmed`` forgets what the server said is removed for
    good. A server without a state dir (``state_id`` None) never hands a
    result twice: nothing is kept."""

    _lock = threading.Lock()
    _seen: Dict[str, Set[int]] = {}   # state_id -> job numbers handed, removal not yet confirmed

    @classmethod
    def first(cls, state_id: Optional[str], seq: int) -> bool:
        if state_id is None:
            return True
        with cls._lock:
            seen = cls._seen.get(state_id)
            if seen is None:
                seen = cls._seen[state_id] = set()
            if seq in seen:
                return False
            seen.add(seq)
            return True

    @classmethod
    def confirmed(cls, state_id: Optional[str], seqs: Iterable[int]) -> None:
        """The server committed these results' removal: they never come back."""
        if state_id is None:
            return
        with cls._lock:
            seen = cls._seen.get(state_id)
            if seen is not None:
                seen.difference_update(seqs)
                if not seen:
                    del cls._seen[state_id]
