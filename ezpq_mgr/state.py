"""QueueState: every queue's jobs, as plain data, behind one Condition.

No processes and no I/O live here, so the whole scheduling logic is tested
with a fake clock (``tests/test_state.py``). The server's connection threads
and the supervisor thread share one ``QueueState``; each public method takes
the lock once ("lock the state once per unit of work") and every change that
someone may wait for ends in ``_changed()``.

One way to wait: every blocking call (``get``, ``wait_pending``,
``wait_client``, ``wait_free``, ``take_notices``, ``wait_jobs``) is a
``Deferred`` (replies.py) parked here with its condition; ``_changed()``
answers those whose condition now holds, under the lock, into the outbox,
and the lock itself (``StateLock``) sends the outbox when its outermost
holder lets go, whichever thread that is. No thread blocks on a condition,
nothing polls: an idle server makes no wake-ups.

A job's life is its ``Phase`` (job.py). Every change of phase goes through
``_move``, which checks it against ``TRANSITIONS`` and keeps every count
(per queue and phase, running jobs per user, undone jobs per client): no
other code touches a count. The verbs that move jobs::

    add ─> WAITING ─pick─> RUNNING ─release─> RETURNED
             │               │                   │
             │ cancel/skip   └──── finish ───────┴─> (retry: WAITING)
             v                          │
            DONE <─ mark_processed ─ HELD <─┘ (its client post-processes)
             │                          (or straight to DONE)
             └─ get/collect/pop_ids/expire/forget ─> GONE (record deleted)

Heap entries are ``(priority, seq)`` tuples (seq is the global submission
counter), so ties are FIFO and records are never compared. Stale entries
(cancelled jobs, lanes re-exposed) are dropped lazily when they reach the top.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import _thread
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .errors import JobNotFound, QueueFull
from .job import ERROR_STATES, TRANSITIONS, JobRecord, JobStatus, Phase
from .messages import KillRequest, Outcome
from .replies import Deferred, Outbox
from .schema import INT64_MAX, SETTINGS

__all__ = ["QueueState", "QueueInfo", "Outcome"]

# The phases as module constants: a class attribute of an Enum costs ~40 ns
# a lookup, and the hot path moves every job through five phases.
NEW, WAITING, RUNNING, RETURNED, HELD, DONE, GONE = Phase
#: _ALLOWED[frm][to]: TRANSITIONS as a table (no tuple built per move)
_ALLOWED = [[(frm, to) in TRANSITIONS for to in Phase] for frm in Phase]

FAILED_STATES = (JobStatus.FAILED, JobStatus.LOST, JobStatus.KILLED, JobStatus.TIMEOUT)


_OUTCOME_FIELDS = Outcome._fields[1:]   # all but status


@dataclasses.dataclass
class Lane:
    """Jobs of one (qid, lane): they run one at a time, best first."""

    heap: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    running: Optional[int] = None     # seq of the running job
    exposed: Optional[int] = None     # seq currently offered to the qid heap
    last_exit: Optional[int] = None   # exit code of the lane's last finished job
    last_id: Optional[int] = None     # and its id


@dataclasses.dataclass
class QueueInfo:
    """One qid: its settings and its jobs."""

    qid: str
    waiting: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    completed: List[Tuple[int, int, int]] = dataclasses.field(default_factory=list)
    ids: Dict[int, int] = dataclasses.field(default_factory=dict)   # id -> seq
    lanes: Dict[bytes, Lane] = dataclasses.field(default_factory=dict)
    next_id: int = 1
    #: jobs in each phase (indexed by Phase; kept by QueueState._move alone)
    count: List[int] = dataclasses.field(default_factory=lambda: [0] * len(Phase))
    n_submitted: int = 0               # ever accepted (NEW -> WAITING)
    n_completed: int = 0               # ever done (-> DONE)
    cap: int = 0                       # max concurrent jobs of this qid; 0 = none
    max_size: int = 0
    paused: bool = False
    auto_stop: bool = False
    auto_remove: bool = False
    holders: int = 0                   # open connections that use it (QueueState.hold_queue)

    @property
    def n_waiting(self) -> int:
        return self.count[WAITING]

    @property
    def n_running(self) -> int:
        return self.count[RUNNING]

    @property
    def n_working(self) -> int:
        """Running, returned or held: ezpq's "working" (not yet collectable)."""
        c = self.count
        return c[RUNNING] + c[RETURNED] + c[HELD]

    @property
    def n_done(self) -> int:
        """Done and not yet collected."""
        return self.count[DONE]

    @property
    def pending(self) -> int:
        return self.count[WAITING] + self.n_working


class StateLock(_thread.RLock):
    """The state's (re-entrant) lock. Leaving its outermost hold sends the
    answers queued in the outbox meanwhile, so an answer made possible by any
    change is sent at once, by the thread that made the change, outside the
    lock (a large result is never written while the lock is held).

    A subclass of the C ``RLock``: entering is the C ``acquire`` itself, and
    only the exit runs Python (the lock is taken several times per job)."""

    def __new__(cls, outbox: Outbox) -> "StateLock":
        self = super().__new__(cls)
        self._outbox = outbox
        return self

    def __init__(self, outbox: Outbox) -> None:
        pass

    def __exit__(self, *exc) -> None:
        self.release()
        if self._outbox.items and not self._is_owned():
            self._outbox.deliver()


class QueueState:
    """All queues of one server. Thread-safe: every public method holds
    ``cond`` (the ``StateLock``); methods documented "caller holds the lock"
    are for the supervisor and the service, inside their own ``with state.cond``."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 on_final: Optional[Callable[[JobRecord], None]] = None):
        self.outbox = Outbox()               # answers of parked calls, sent once the lock is free
        self.cond = StateLock(self.outbox)   # ``with state.cond:`` = hold the lock
        self.clock = clock
        self.on_final = on_final    # called (lock held) once per job reaching a final state
        self.records: Dict[int, JobRecord] = {}
        self.queues: Dict[str, QueueInfo] = {}
        self.seq = 0
        self.n_running = 0                          # jobs in RUNNING, all queues (slots taken)
        self.user_running: Dict[str, int] = {}      # user -> its jobs in RUNNING
        self.holding_clients: set = set()          # clients that post-process jobs
        self.notices: Dict[str, List[int]] = {}    # client -> seqs to tell it about
        self.closing: set = set()                   # clients whose notices end when drained
        self.kill_requests: List[KillRequest] = []
        self.client_pending: Dict[str, int] = {}  # client -> its jobs not yet DONE
        self.on_move: Optional[Callable[[JobRecord, Phase, Phase], None]] = None  # (lock held)
        #: (lock held) a queue's id counter or settings changed (dropped=True: it is forgotten);
        #: the durable server's journal (store.py), None otherwise
        self.on_queue: Optional[Callable[..., None]] = None
        self.version = 0                            # bumped on every change
        self.deferred: List[Deferred] = []   # parked calls, answered by _changed
        self.abandoned: Dict[str, str] = {}  # client gone without goodbye -> its private qid
        self.expiring = False                # keep done_order for expire_finished
        self.done_order: "collections.deque[int]" = collections.deque()  # completed seqs, oldest first
        self.owner_of: Callable[[str], object] = lambda qid: None   # whose a queue is, for queues_of
        #: a dropped queue's id counter (qid -> its next id), taken back when
        #: the qid is named again, so that no id is ever reused. The cost of a
        #: dropped queue that gave out ids: one entry, ~120 bytes + its qid
        #: (<= schema.MAX_QID), and a row of the durable server's ``ids``
        #: table. Not capped per user (forgetting would mean reusing), but only
        #: qids named by their clients are kept: a private queue (random qid,
        #: no ``qid`` given) its own client disposed of is forgotten
        #: (``_drop_if_empty``), else every ``with Queue():`` would cost one.
        self.last_ids: Dict[str, int] = {}
        self.queues_of: Dict[object, int] = {}   # owner -> how many queues it has

    # ----------------------------------------------------------------- queues
    def queue(self, qid: str) -> QueueInfo:
        """The QueueInfo of ``qid``, created on first use. Caller holds the lock."""
        q = self.queues.get(qid)
        if q is None:
            q = self.queues[qid] = QueueInfo(qid)
            if self.last_ids:
                q.next_id = self.last_ids.pop(qid, 1)
            owner = self.owner_of(qid)
            self.queues_of[owner] = self.queues_of.get(owner, 0) + 1
        return q

    def _drop_queue(self, q: QueueInfo, keep_ids: bool = True) -> None:
        """Forget a queue (lock held): its settings and counters; its id
        counter is kept in ``last_ids`` (unless not ``keep_ids``)."""
        if self.queues.get(q.qid) is not q:
            return
        del self.queues[q.qid]
        if keep_ids and q.next_id > 1:
            self.last_ids[q.qid] = q.next_id
        if self.on_queue is not None:
            self.on_queue(q, dropped=True)
        owner = self.owner_of(q.qid)
        left = self.queues_of.get(owner, 1) - 1
        if left > 0:
            self.queues_of[owner] = left
        else:
            self.queues_of.pop(owner, None)

    def hold_queue(self, qid: str) -> QueueInfo:
        """An open connection uses ``qid`` (creating it): it is kept while
        held, whatever it holds (``release_queue`` when the connection closes)."""
        with self.cond:
            q = self.queue(qid)
            q.holders += 1
            return q

    def release_queue(self, q: QueueInfo) -> None:
        with self.cond:
            q.holders -= 1
            self._drop_if_idle(q)

    def _drop_if_idle(self, q: QueueInfo) -> None:
        """Drop a queue that nothing refers to any more and that remembers
        nothing a new one would not (lock held): no connection uses it, no
        job of it is on the server (its id counter is kept), no
        lane remembers a failure, and it is neither paused nor capped (the
        settings a client does not send again when it configures a queue).
        Without this, every qid ever named stayed for the server's life."""
        if (q.holders <= 0 and not q.ids and q.pending == 0 and not q.lanes and not q.paused
                and not q.cap):
            self._drop_queue(q)

    def configure(self, qid: str, **settings) -> None:
        """Set queue settings (cap, max_size, paused, auto_stop, auto_remove):
        only those (``schema.SETTINGS``; the Service checked their values)."""
        for key, value in settings.items():
            kind = SETTINGS.get(key)
            if kind is None:
                raise ValueError(f"unknown queue setting {key!r}")
            if type(value) is not kind:
                raise TypeError(f"{key} must be a {kind.__name__}, not {type(value).__name__}")
        with self.cond:
            q = self.queue(qid)
            for key, value in settings.items():
                setattr(q, key, value)
            if self.on_queue is not None:
                self.on_queue(q)
            self._changed()

    def set_holding(self, client: str, holding: bool) -> None:
        """A holding client runs callbacks/logging before its jobs count as done."""
        with self.cond:
            if holding:
                self.holding_clients.add(client)
            elif client in self.holding_clients:
                self.holding_clients.discard(client)
                self._release_held(client)
                self._changed()

    # ------------------------------------------------------------------- add
    def add(self, qid: str, records: List[JobRecord]) -> List[int]:
        """Enqueue a batch, all or nothing; returns the new per-queue ids."""
        with self.cond:
            q = self.queue(qid)
            if q.max_size > 0 and self._size(q) + len(records) > q.max_size:
                raise QueueFull(
                    f"queue {qid!r} holds {self._size(q)} of max_size={q.max_size} jobs; "
                    f"cannot add {len(records)} more"
                )
            reserved = [rec.id for rec in records if rec.id]
            if reserved:  # only ids this queue handed out, each once
                if len(set(reserved)) != len(reserved):
                    raise ValueError("id: the same job id twice in one batch")
                for job_id in reserved:
                    if not 0 < job_id < q.next_id or job_id in q.ids:
                        raise ValueError(f"id: job id {job_id} was not reserved or is taken")
            now = self.clock()
            ids = []
            for rec in records:
                self.seq += 1
                rec.seq = self.seq
                rec.qid = qid
                if not rec.id:  # clients that buffer puts reserve their ids first
                    rec.id = q.next_id
                    q.next_id += 1
                if rec.name is None:
                    rec.name = rec.id
                rec.submitted = now
                rec.status = JobStatus.WAITING
                self.records[rec.seq] = rec
                q.ids[rec.id] = rec.seq
                self._move(q, rec, WAITING)
                self._enqueue(q, rec)
                ids.append(rec.id)
            if self.on_queue is not None:
                self.on_queue(q)
            self._changed()
            return ids

    def reserve_ids(self, qid: str, n: int) -> int:
        """Set aside ``n`` job ids for a client that buffers its puts; returns the first."""
        with self.cond:
            q = self.queue(qid)
            first = q.next_id
            if first + n > INT64_MAX:
                raise ValueError(f"n: queue {qid!r} has no {n} job ids left")
            q.next_id += n
            if self.on_queue is not None:
                self.on_queue(q)
            return first

    # ------------------------------------------------------------ the move
    def _move(self, q: QueueInfo, rec: JobRecord, to: Phase) -> None:
        """Move ``rec`` to phase ``to``: the one place where a job changes
        phase and where every count changes with it. Caller holds the lock."""
        frm = rec.phase
        if not _ALLOWED[frm][to]:
            raise AssertionError(f"job {rec.seq} of {q.qid!r}: no move from {frm.name} to {to.name}")
        rec.phase = to
        count = q.count
        count[to] += 1   # count[GONE]: ever deleted
        if frm is not NEW:
            count[frm] -= 1
        if frm is RUNNING:
            self.n_running -= 1
            self.user_running[rec.user] -= 1
        elif to is RUNNING:
            self.n_running += 1
            self.user_running[rec.user] = self.user_running.get(rec.user, 0) + 1
        if frm is NEW:
            q.n_submitted += 1
            self.client_pending[rec.client] = self.client_pending.get(rec.client, 0) + 1
        elif to is DONE:
            rec.processed = self.clock()
            q.n_completed += 1
            left = self.client_pending.get(rec.client, 1) - 1
            if left:
                self.client_pending[rec.client] = left
            else:
                self.client_pending.pop(rec.client, None)
        elif to is GONE:
            self.records.pop(rec.seq, None)
            if q.ids.get(rec.id) == rec.seq:
                del q.ids[rec.id]
        if self.on_move is not None:
            self.on_move(rec, frm, to)

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
            nxt.status = JobStatus.SKIPPED
            nxt.cancelled = True
            nxt.exitcode = lane.last_exit
            nxt.exception = (f"stop_on_lane_error=True and preceding job ({lane.last_id}) "
                             f"exit code is {lane.last_exit}")
            self._done(q, nxt, held_ok=False)
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

    def _clean_lane(self, lane: Lane) -> None:
        while lane.heap:
            rec = self.records.get(lane.heap[0][1])
            if rec is not None and rec.phase is WAITING:
                return
            heapq.heappop(lane.heap)

    # ------------------------------------------------------------- dispatch
    def _head(self, q: QueueInfo) -> Optional[JobRecord]:
        """The qid's best runnable waiting job, dropping stale heap entries."""
        while q.waiting:
            seq = q.waiting[0][1]
            rec = self.records.get(seq)
            if rec is not None and rec.phase is WAITING:
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

    # --------------------------------------------------------------- finish
    def finish(self, seq: int, outcome: Outcome) -> None:
        """Record a working job's outcome (retry it, hold it, or complete it)."""
        with self.cond:
            rec = self.records.get(seq)
            if rec is None or rec.phase not in (RUNNING, RETURNED):
                return
            q = self.queues[rec.qid]
            for name in _OUTCOME_FIELDS:
                value = getattr(outcome, name)
                if value is not None or name != "started":
                    setattr(rec, name, value)
            if rec.ended is None:
                rec.ended = self.clock()
            rec.status = outcome.status
            rec.cancelled = outcome.status in (JobStatus.TIMEOUT, JobStatus.CANCELLED, JobStatus.SKIPPED)
            lane = q.lanes.get(rec.lane_key) if rec.lane_key is not None else None
            if lane is not None:
                lane.running = None
            if outcome.status in FAILED_STATES and rec.attempts <= rec.retries:
                self._retry(q, rec)
            else:
                self._done(q, rec)
                if lane is not None:
                    lane.last_exit, lane.last_id, lane.exposed = rec.exitcode, rec.id, None
                    self._settle(q, lane)
                    self._drop_lane_if_idle(q, rec.lane_key, lane)
            self._changed()

    def release(self, seq: int) -> None:
        """A working job's function has returned; its figures are on their way.
        It stays working (not collectable, still cancellable: until its
        figures arrive the supervisor cannot tell a real result from one the
        job forged while it runs on) but gives up its slot, so its worker
        can take the next job meanwhile."""
        with self.cond:
            rec = self.records.get(seq)
            if rec is None or rec.phase is not RUNNING:
                return
            self._move(self.queues[rec.qid], rec, RETURNED)
            self.version += 1

    def requeue(self, seq: int) -> None:
        """A running job that never started (handed to a worker that was
        still on its last job, and that worker was then killed or left)
        goes back to waiting, where it was in line; the attempt does not
        count. If it was asked to stop meanwhile it ends so instead. Caller
        may hold the lock."""
        with self.cond:
            rec = self.records.get(seq)
            if rec is None or rec.phase is not RUNNING:
                return
            asked = next((r for r in self.kill_requests if r.seq == seq), None)
            if asked is not None:
                self.kill_requests.remove(asked)
                self.finish(seq, Outcome(asked.status, None, exception=asked.why))
                return
            q = self.queues[rec.qid]
            if rec.lane_key is not None and rec.lane_key in q.lanes:
                q.lanes[rec.lane_key].running = None
            rec.attempts -= 1
            rec.status = JobStatus.WAITING
            rec.started = rec.pid = rec.host = None
            self._move(q, rec, WAITING)
            self._enqueue(q, rec)
            self._changed()

    def _retry(self, q: QueueInfo, rec: JobRecord) -> None:
        rec.status = JobStatus.WAITING
        rec.started = rec.ended = rec.exitcode = None
        rec.cancelled = False
        self._move(q, rec, WAITING)
        self._enqueue(q, rec)

    def _done(self, q: QueueInfo, rec: JobRecord, held_ok: bool = True) -> None:
        """A job reached a final state: hand it to its client or complete it."""
        if self.on_final is not None:
            self.on_final(rec)
        # A job whose error its client prints is held until printed, so that
        # the client's wait() returns only after the error is on its stderr.
        error = rec.status in ERROR_STATES and not rec.suppress_errors
        holding = held_ok and (error or rec.client in self.holding_clients)
        if (holding or error) and rec.client in self.notices:
            self.notices[rec.client].append(rec.seq)
        if holding and rec.client in self.notices:
            self._move(q, rec, HELD)
        else:
            self._complete(q, rec)
        if q.auto_stop and q.pending == 0:
            q.paused = True

    def _complete(self, q: QueueInfo, rec: JobRecord) -> None:
        """The job is done: collectable, or dropped at once when nobody will
        collect it (its client vanished, or the queue has auto_remove)."""
        self._move(q, rec, DONE)
        client = rec.client
        if client in self.abandoned:
            self._move(q, rec, GONE)
            if not self.client_pending.get(client):
                self._forget_abandoned(client)
            if not q.ids:
                self._drop_if_idle(q)
        elif q.auto_remove:
            self._forget(q, rec)
        else:
            heapq.heappush(q.completed, (rec.priority, rec.id, rec.seq))
            if self.expiring:
                self.done_order.append(rec.seq)

    def _forget(self, q: QueueInfo, rec: JobRecord) -> None:
        """Drop a done job; its completed-heap entry is skipped later."""
        self._move(q, rec, GONE)
        if not q.ids:
            self._drop_if_idle(q)

    # ------------------------------------------------ client post-processing
    def open_notices(self, client: str) -> None:
        with self.cond:
            self.notices.setdefault(client, [])

    def take_notices(self, client: str, timeout: Optional[float], reply=None):
        """Finished jobs this client must look at, as soon as there are some
        (or ``timeout`` passes: an empty list). None once the client's
        notices are closed and drained."""
        with self.cond:
            def answer() -> Optional[List[dict]]:
                seqs = self.notices.get(client)
                if seqs is None or (not seqs and client in self.closing):
                    self.notices.pop(client, None)
                    self.closing.discard(client)
                    return None
                self.notices[client] = []
                out = []
                for seq in seqs:
                    rec = self.records.get(seq)
                    if rec is not None:
                        snap = rec.snapshot()
                        snap["held"] = rec.phase is HELD
                        out.append(snap)
                return out

            return self._answer_or_defer(
                lambda: self.notices.get(client, True) or client in self.closing, answer, timeout, reply)

    def mark_processed(self, results: Iterable[Tuple[int, Optional[bytes]]]) -> None:
        """The client ran its callback/log for these held jobs; complete them.

        Only held jobs (finished, not yet processed) of a holding client:
        completing a running job would free its slot twice, never."""
        with self.cond:
            for seq, callback_blob in results:
                rec = self.records.get(seq)
                if rec is None or rec.phase is not HELD or rec.client not in self.notices:
                    continue
                rec.callback_blob = callback_blob
                self._complete(self.queues[rec.qid], rec)
            self._changed()

    def close_notices(self, client: str) -> bool:
        """The client goes away: complete what it held; its notice reader
        gets what is left, then None. True while some are left to read (an
        empty channel is closed at once: its reader gets None all the same)."""
        with self.cond:
            if client in self.holding_clients:
                self.holding_clients.discard(client)
                self._release_held(client)
            left = bool(self.notices.get(client))
            if left:
                self.closing.add(client)
            else:
                self.notices.pop(client, None)
                self.closing.discard(client)
            self._changed()
            return left

    def drop_notices(self, client: str) -> None:
        """Nobody will read this client's notices any more (its last
        connection closed): complete what it held, forget the channel."""
        with self.cond:
            if client in self.holding_clients:
                self.holding_clients.discard(client)
                self._release_held(client)
            self.notices.pop(client, None)
            self.closing.discard(client)
            self._changed()

    def _release_held(self, client: str) -> None:
        for rec in list(self.records.values()):
            if rec.client == client and rec.phase is HELD:
                self._complete(self.queues[rec.qid], rec)

    # ---------------------------------------------------------------- cancel
    def cancel(self, qid: str, job_id: int) -> bool:
        """Cancel a waiting job or ask the supervisor to stop a running one.
        False for a job that has finished, collected (or dropped) or not:
        ``JobNotFound`` only for an id the queue never gave out."""
        with self.cond:
            q = self.queues.get(qid)
            seq = q.ids.get(job_id) if q else None
            rec = self.records.get(seq) if seq else None
            if rec is None:
                if q is not None and 0 < job_id < q.next_id:
                    return False
                raise JobNotFound(f"no job {job_id} in queue {qid!r}")
            done = self._cancel(q, rec)
            self._changed()
            return done

    def _cancel(self, q: QueueInfo, rec: JobRecord) -> bool:
        if rec.phase is WAITING:
            rec.status = JobStatus.CANCELLED
            rec.cancelled = True
            self._done(q, rec, held_ok=False)
            if rec.lane_key is not None and rec.lane_key in q.lanes:
                lane = q.lanes[rec.lane_key]
                if lane.exposed == rec.seq:
                    lane.exposed = None
                self._settle(q, lane)
                self._drop_lane_if_idle(q, rec.lane_key, lane)
            return True
        if rec.phase is RUNNING or rec.phase is RETURNED:  # figures on their way: it may still run
            self.kill_requests.append(KillRequest(rec.seq, JobStatus.CANCELLED, "cancelled by request"))
            return True
        return False

    def cancel_all(self, qid: str, client: Optional[str] = None, running: bool = True) -> int:
        """Cancel the qid's waiting jobs (and stop running ones): only ``client``'s if given."""
        with self.cond:
            q = self.queues.get(qid)
            if q is None:
                return 0
            n = 0
            for seq in sorted(q.ids.values()):
                rec = self.records[seq]
                if client is not None and rec.client != client:
                    continue
                if rec.phase is WAITING or (running and rec.phase in (RUNNING, RETURNED)):
                    n += self._cancel(q, rec)
            self._changed()
            return n

    def take_kill_requests(self) -> List[KillRequest]:
        """For the supervisor: running jobs that must be stopped. Caller holds the lock."""
        out, self.kill_requests = self.kill_requests, []
        return out

    # ---------------------------------------------------------------- output
    def pop_completed(self, qid: str, n: int = 1) -> List[dict]:
        """Remove and return up to ``n`` (all if n <= 0) completed jobs, best first."""
        with self.cond:
            return self._pop_completed(qid, n)

    def _pop_completed(self, qid: str, n: int) -> List[dict]:
        q = self.queues.get(qid)
        if q is None:
            return []
        out = []
        while q.completed and (n <= 0 or len(out) < n):
            _, _, seq = heapq.heappop(q.completed)
            rec = self.records.get(seq)
            if rec is not None and rec.qid == qid and rec.phase is DONE:
                out.append(rec.snapshot())
                self._forget(q, rec)
        if out:
            self._changed()
        return out

    def pop_ids(self, qid: str, ids: List[int]) -> List[Optional[dict]]:
        """Remove and return these completed jobs, in the order asked (None if not done)."""
        with self.cond:
            q = self.queues.get(qid) or QueueInfo(qid)
            out = []
            for job_id in ids:
                rec = self.records.get(q.ids.get(job_id, -1))
                if rec is None or rec.phase is not DONE:
                    out.append(None)
                    continue
                out.append(rec.snapshot())
                self._forget(q, rec)
            self._changed()
            return out

    def forget_client(self, qid: str, client: str, drop_queue: bool = False) -> int:
        """Drop a departing client's completed jobs that nobody collected
        (and, ``drop_queue``, its private queue once empty)."""
        with self.cond:
            q = self.queues.get(qid)
            if q is None:
                return 0
            gone = [self.records[s] for s in list(q.ids.values())
                    if self.records[s].client == client and self.records[s].phase is DONE]
            for rec in gone:
                self._forget(q, rec)
            if not self.client_pending.get(client):  # its running jobs still count
                self.client_pending.pop(client, None)
            if drop_queue:
                self._drop_if_empty(qid)
            self._changed()
            return len(gone)

    def _drop_if_empty(self, qid: str) -> None:
        """Drop a private queue its client disposed of (its random qid is
        not remembered: see ``last_ids``)."""
        q = self.queues.get(qid)
        if q is not None and not q.ids and q.pending == 0:
            self._drop_queue(q, keep_ids=False)

    def abandon(self, qid: str, client: str) -> int:
        """A client vanished without goodbye: dispose of its private queue
        ``qid`` as ``dispose()`` would (cancel its waiting jobs, stop its
        running ones); its jobs are dropped as they end. Returns how many
        were cancelled or asked to stop."""
        with self.cond:
            self.abandoned[client] = qid
            self.holding_clients.discard(client)
            self._release_held(client)
            self.notices.pop(client, None)
            self.closing.discard(client)
            n = self.cancel_all(qid, client, running=True)
            q = self.queues.get(qid)
            if q is not None:
                for rec in [self.records[s] for s in list(q.ids.values())]:
                    if rec.client == client and rec.phase is DONE:
                        self._forget(q, rec)
            if not self.client_pending.get(client):
                self._forget_abandoned(client)
            self._changed()
            return n

    def _forget_abandoned(self, client: str) -> None:
        """The last job of a vanished client ended: forget the client and its queue."""
        qid = self.abandoned.pop(client, None)
        self.client_pending.pop(client, None)
        if qid is not None:
            self._drop_if_empty(qid)

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

    def wait_client(self, client: str, below: int, timeout: Optional[float], reply=None):
        """How many of a client's jobs are not done, once fewer than ``below``
        (1: all done) or when ``timeout`` passes."""
        with self.cond:
            pending = self.client_pending
            return self._answer_or_defer(lambda: pending.get(client, 0) < below,
                                         lambda: pending.get(client, 0), timeout, reply)

    def get(self, qid: str, wait: bool, timeout: Optional[float], reply=None):
        """Pop the best completed job; optionally wait up to ``timeout`` for one.

        Returns (job or None, jobs left in the queue) so the client knows
        whether waiting longer can ever succeed; or, given a ``reply``
        channel and nothing to answer yet, a ``Deferred`` that sends it later."""
        with self.cond:
            q = self.queues.get(qid) or QueueInfo(qid)   # an unknown qid is not stored

            def answer() -> Tuple[Optional[dict], int]:
                got = self._pop_completed(qid, 1)
                return (got[0] if got else None), self._size(q)

            if not wait:
                return answer()
            return self._answer_or_defer(lambda: q.n_done or q.pending == 0, answer, timeout, reply)

    def wait_pending(self, qid: str, below: int, timeout: Optional[float], reply=None):
        """How many of the qid's jobs wait or work, once fewer than ``below``
        (1: none) or when ``timeout`` passes."""
        with self.cond:
            def pending() -> int:
                q = self.queues.get(qid)
                return 0 if q is None else q.pending
            return self._answer_or_defer(lambda: pending() < below, pending, timeout, reply)

    def wait_free(self, qid: str, slots: Callable[[], int], timeout: Optional[float], reply=None):
        """True once the qid could start a job at once (nothing of it waits
        and fewer of it run than ``slots()``, its concurrency), else False
        when ``timeout`` passes: ezpq's ``wait_worker``."""
        with self.cond:
            def free() -> bool:
                q = self.queues.get(qid)
                return q is None or (q.n_waiting == 0 and q.n_running < slots())
            return self._answer_or_defer(free, free, timeout, reply)

    def wait_for(self, ready: Callable[[], bool], answer: Callable, timeout: Optional[float], reply=None):
        """Park a caller's own condition (the service's ``wait_jobs``): the
        same mechanism as every wait here. ``ready`` runs under the lock at
        every change: keep it short."""
        with self.cond:
            return self._answer_or_defer(ready, answer, timeout, reply)

    # ---------------------------------------------------------------- counts
    @staticmethod
    def _size(q: QueueInfo, waiting=True, working=True, completed=True) -> int:
        return (q.n_waiting if waiting else 0) + (q.n_working if working else 0) + (
            q.n_done if completed else 0)

    def counts(self, qid: str) -> dict:
        with self.cond:
            q = self.queues.get(qid) or QueueInfo(qid)
            return {
                "waiting": q.n_waiting, "working": q.n_working,
                "completed": q.n_done, "submitted": q.n_submitted,
                "n_completed": q.n_completed, "paused": q.paused, "cap": q.cap,
                "running": q.n_running, "max_size": q.max_size,
            }

    def jobs(self, qid: str) -> List[dict]:
        with self.cond:
            q = self.queues.get(qid)
            if q is None:
                return []
            return [self.records[s].snapshot() for s in sorted(q.ids.values())]

    def job(self, qid: str, job_id: int) -> dict:
        with self.cond:
            q = self.queues.get(qid)
            seq = q.ids.get(job_id) if q else None
            if seq is None:
                raise JobNotFound(f"no job {job_id} in queue {qid!r}")
            return self.records[seq].snapshot()

    def _answer_or_defer(self, ready: Callable[[], bool], answer: Callable,
                         timeout: Optional[float], reply):
        """(lock held) ``answer()`` now if ``ready()`` or if there is no
        ``reply`` channel to answer later (a caller in this process, a test);
        else a ``Deferred``: parked until ``ready()`` (answered by whichever
        thread makes it so) or its deadline (``timeout`` s; None: none)."""
        if reply is None or ready():
            return answer()
        d = Deferred(ready, answer, reply, timeout)
        self.deferred.append(d)
        return d

    def settle(self, d: Deferred, answer: bool) -> None:
        """End a parked call: answer it as it stands (its deadline passed), or
        withdraw it (its client moved on or left). No-op if already answered."""
        with self.cond:
            if d.settled:
                return
            d.settled = True
            self.deferred.remove(d)
            if answer:
                d.result = d.answer()
                self.outbox.put(d)

    def _changed(self) -> None:
        self.version += 1
        if self.deferred:
            for d in [d for d in self.deferred if d.ready()]:
                if not d.settled and d.ready():  # an earlier answer may have taken its job
                    d.settled = True
                    self.deferred.remove(d)
                    d.result = d.answer()
                    self.outbox.put(d)
