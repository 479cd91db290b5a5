"""Scheduling: which waiting job runs next (lanes, priorities, fair share).

``Scheduling`` is a part of ``QueueState`` (state.py), written apart: its
methods run on the state, under its lock, as if written there (no
indirection per job). Order: lowest priority first; among equals the user
with the fewest running jobs (fair share), then submission order. A lane
(``Lane``) runs its jobs one at a time, best first: only its best waiting
job is offered to its queue's heap (``_settle``), and after one of its jobs
failed the ``stop_on_lane_error`` jobs behind it are skipped.

Heap entries are ``(priority, seq)`` tuples (seq is the global submission
counter), so ties are FIFO and records are never compared. Stale entries
(cancelled jobs, lanes re-exposed, a priority changed: ``set_priority``)
are dropped lazily when they reach the top.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from ..job import JobRecord, JobStatus
from .queues import RUNNING, WAITING

if TYPE_CHECKING:
    from .queues import QueueInfo

__all__ = ["Lane", "Scheduling", "MAX_FAILED_LANES", "MAX_FAILED_LANE_BYTES"]

#: lanes one owner (a shared server's user) keeps only because their last
#: job failed, and the bytes of their keys (up to 64 KiB each): past
#: either, her oldest is forgotten (a ``stop_on_lane_error`` job put in it
#: later then runs). 1,000 failing jobs, each in a lane of its own with a
#: 64 KiB key, grew a root server by 98 MiB, without end (fifth attack pass);
#: now a user holds at most ~6 MiB of them.
MAX_FAILED_LANES = 4096
MAX_FAILED_LANE_BYTES = 4 << 20


@dataclasses.dataclass
class Lane:
    """Jobs of one (qid, lane): they run one at a time, best first."""

    heap: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    running: Optional[int] = None     # seq of the running job
    exposed: Optional[int] = None     # seq currently offered to the qid heap
    last_exit: Optional[int] = None   # exit code of the lane's last finished job
    last_id: Optional[int] = None     # and its id


class Scheduling:
    """``QueueState``'s waiting heaps and lanes, and ``pick`` (the
    supervisor's: the next job to run). Uses the state's ``records``,
    ``queues``, ``user_running``, ``_move`` and ``_done``; and for the lanes
    each owner keeps for a failure, ``owner_of``, ``failed_lanes_of``,
    ``failed_lane_bytes`` and ``on_lane``."""

    def _enqueue(self, q: QueueInfo, rec: JobRecord) -> None:
        entry = (rec.priority, rec.seq)
        if rec.lane_key is None:
            heapq.heappush(q.waiting, entry)
            return
        lane = q.lanes.get(rec.lane_key)
        if lane is None:
            lane = q.lanes[rec.lane_key] = Lane()
        heapq.heappush(lane.heap, entry)
        self._settle(q, lane)

    def _settle(self, q: QueueInfo, lane: Lane) -> None:
        """If the lane is idle: skip the jobs that asked to stop after its last
        job failed, then offer its best waiting job to the qid heap."""
        if lane.running is not None:
            return
        self._clean_lane(lane)
        failed = lane.last_exit not in (0, None)
        while failed and lane.heap and self.records[lane.heap[0][1]].stop_on_lane_error:
            nxt = self.records[heapq.heappop(lane.heap)[1]]
            self._skip(q, nxt, lane.last_exit, f"stop_on_lane_error=True and preceding job "
                                               f"({lane.last_id}) exit code is {lane.last_exit}")
            self._clean_lane(lane)
        if not lane.heap:
            return
        best = lane.heap[0]
        if lane.exposed != best[1]:
            lane.exposed = best[1]
            heapq.heappush(q.waiting, best)

    def _drop_lane_if_idle(self, q: QueueInfo, key: bytes, lane: Lane) -> None:
        """Forget a lane with nothing waiting or running whose last job did
        not fail: a new Lane behaves the same (one per lane key ever used
        stayed, each holding its key of up to 64 KiB). A lane whose last
        job failed is kept: it skips later ``stop_on_lane_error`` jobs."""
        if (lane.running is None and not lane.heap and lane.last_exit in (0, None)
                and q.lanes.get(key) is lane):
            del q.lanes[key]
            if not q.ids:
                self._drop_if_idle(q)

    def _count_failed_lane(self, q: QueueInfo, key: bytes, lane: Lane) -> None:
        """(lock held) A lane's last job failed, or a later one did not:
        keep its owner's count of lanes kept for a failure, forgetting her
        oldest past ``MAX_FAILED_LANES`` or ``MAX_FAILED_LANE_BYTES`` of
        keys. A private server (no owners) counts nothing."""
        owner = self.owner_of(q.qid)
        if owner is None:
            return
        kept = self.failed_lanes_of.setdefault(owner, {})
        size = self.failed_lane_bytes.get(owner, 0)
        if kept.pop((q.qid, key), None) is not None:
            size -= len(key)
        if lane.last_exit not in (0, None):
            kept[(q.qid, key)] = True
            size += len(key)
        while len(kept) > MAX_FAILED_LANES or size > MAX_FAILED_LANE_BYTES:
            qid, old_key = next(iter(kept))
            del kept[(qid, old_key)]
            size -= len(old_key)
            old_q = self.queues.get(qid)
            old = old_q.lanes.get(old_key) if old_q is not None else None
            if old is None:
                continue
            old.last_exit = old.last_id = None
            if self.on_lane is not None:   # the durable server's row goes too
                self.on_lane(old_q, old_key, old)
            self._drop_lane_if_idle(old_q, old_key, old)
        if kept:
            self.failed_lane_bytes[owner] = size
        else:
            del self.failed_lanes_of[owner]
            self.failed_lane_bytes.pop(owner, None)

    def _clean_lane(self, lane: Lane) -> None:
        while lane.heap:
            rec = self.records.get(lane.heap[0][1])
            if rec is not None and rec.phase is WAITING:
                return
            heapq.heappop(lane.heap)

    def _head(self, q: QueueInfo) -> Optional[JobRecord]:
        """The qid's best runnable waiting job, dropping stale heap entries."""
        while q.waiting:
            priority, seq = q.waiting[0]
            rec = self.records.get(seq)
            if rec is not None and rec.phase is WAITING and rec.priority == priority:
                if rec.lane_key is None:
                    return rec
                lane = q.lanes.get(rec.lane_key)
                if lane is not None and lane.running is None and lane.exposed == seq:
                    return rec
            heapq.heappop(q.waiting)
        return None

    def pick(self, runnable: Callable[[JobRecord], bool] = lambda rec: True) -> Optional[JobRecord]:
        """Take the next job to run and mark it working. Caller holds the lock.

        Order: lowest priority first; among equals the user with the fewest
        running jobs (fair share), then submission order. If the best job
        cannot run yet (``runnable`` says no: its user's worker is booting),
        nothing starts: the slot is kept for it rather than given to a
        lower-ranked job.
        """
        best_key, best = None, None
        for q in self.queues.values():
            if q.paused or not q.waiting or (q.cap and q.n_running >= q.cap):
                continue
            rec = self._head(q)
            if rec is None:
                continue
            key = (rec.priority, self.user_running.get(rec.user, 0), rec.seq)
            if best_key is None or key < best_key:
                best_key, best = key, rec
        if best is None or not runnable(best):
            return None
        q = self.queues[best.qid]
        heapq.heappop(q.waiting)
        if best.lane_key is not None:
            lane = q.lanes[best.lane_key]
            lane.heap.remove((best.priority, best.seq))
            heapq.heapify(lane.heap)
            lane.running, lane.exposed = best.seq, None
        best.status = JobStatus.WORKING
        best.started = self.clock()
        best.attempts += 1
        self._move(q, best, RUNNING)
        self.version += 1
        return best
