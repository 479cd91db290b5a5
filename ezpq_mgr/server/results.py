"""Results: completed jobs leaving the server (get, collect, expiry).

``Results`` is a part of ``QueueState`` (state.py), written apart: its
methods run on the state, under its lock. A done job waits in its queue's
completed heap, ``(priority, id, seq)``: best first, then in id order,
until ``get`` (the best one, or parked until there is one: waits.py),
``pop_completed`` (``collect``) or ``pop_ids`` takes it, or it is dropped
``keep_finished`` seconds after it ended (``expire_finished``).
"""

from __future__ import annotations

import heapq
from typing import List, Optional, Tuple

from .queues import DONE, QueueInfo

__all__ = ["Results"]


class Results:
    """``QueueState``'s completed jobs, as they leave. Uses the state's
    ``records``, ``queues``, ``_forget``, ``_size`` and the waits."""

    def pop_completed(self, qid: str, n: int = 1) -> List[dict]:
        """Remove and return up to ``n`` (all if n <= 0) completed jobs, best first."""
        with self.cond:
            return self._pop_completed(qid, n)

    def _pop_completed(self, qid: str, n: int) -> List[dict]:
        q = self.queues.get(qid)
        if q is None:
            return []
        out = []
        self.handing = True   # (store.py: a result handed out is removed on disk once it was read)
        try:
            while q.completed and (n <= 0 or len(out) < n):
                _, _, seq = heapq.heappop(q.completed)
                rec = self.records.get(seq)
                if rec is not None and rec.qid == qid and rec.phase is DONE:
                    out.append(rec.snapshot())
                    self._forget(q, rec)
        finally:
            self.handing = False
        if out:
            self._changed()
        return out

    def pop_ids(self, qid: str, ids: List[int]) -> List[Optional[dict]]:
        """Remove and return these completed jobs, in the order asked (None if not done)."""
        with self.cond:
            q = self.queues.get(qid) or QueueInfo(qid)
            out = []
            self.handing = True
            try:
                for job_id in ids:
                    rec = self.records.get(q.ids.get(job_id, -1))
                    if rec is None or rec.phase is not DONE:
                        out.append(None)
                        continue
                    out.append(rec.snapshot())
                    self._forget(q, rec)
            finally:
                self.handing = False
            self._changed()
            return out

    def expire_finished(self, before: float, batch: int = 10_000) -> int:
        """Drop completed jobs nobody collected that were processed before
        ``before`` (their accounting rows were written when they ended).
        Holds the lock for at most ``batch`` jobs at a time."""
        dropped = 0
        while True:
            with self.cond:
                order, records, touched = self.done_order, self.records, {}
                n = 0
                while order and n < batch:
                    rec = records.get(order[0])
                    if rec is not None and rec.phase is DONE and rec.processed >= before:
                        break
                    order.popleft()
                    if rec is None or rec.phase is not DONE:
                        continue
                    q = self.queues[rec.qid]
                    self._forget(q, rec)
                    touched[q.qid] = q
                    n += 1
                for q in touched.values():  # their completed heaps hold the dropped jobs' entries
                    if len(q.completed) > 2 * q.n_done + 64:
                        q.completed = [e for e in q.completed if e[2] in records]
                        heapq.heapify(q.completed)
                dropped += n
                if n:
                    self._changed()
                if n < batch:
                    return dropped

    def get(self, qid: str, wait: bool, timeout: Optional[float], reply=None, arrivals: bool = False):
        """Pop the best completed job; optionally wait up to ``timeout`` for one.

        Returns (job or None, jobs left in the queue) so the client knows
        whether waiting longer can ever succeed; or, given a ``reply``
        channel and nothing to answer yet, a ``Deferred`` that sends it later.
        A queue with nothing waiting or working answers None at once
        (ezpq's "nothing left, return now"), unless ``arrivals`` (a
        collector on a shared qid, with a timeout): then only a completed
        job is an answer, one put later included, or the timeout."""
        with self.cond:
            queues = self.queues

            def answer() -> Tuple[Optional[dict], int]:
                got = self._pop_completed(qid, 1)
                q = queues.get(qid)
                return (got[0] if got else None), (0 if q is None else self._size(q))

            if not wait:
                return answer()
            if arrivals:   # the queue is looked up at each change: it may not exist yet
                def ready() -> bool:
                    q = queues.get(qid)
                    return q is not None and q.n_done > 0
            else:
                q = queues.get(qid) or QueueInfo(qid)   # an unknown qid is not stored

                def ready() -> bool:
                    return q.n_done or q.pending == 0
            return self._answer_or_defer(ready, answer, timeout, reply)
