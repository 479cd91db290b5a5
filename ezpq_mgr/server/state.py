"""QueueState: every job's record and phase, behind one lock.

No processes and no I/O live here, so the whole scheduling logic is tested
with a fake clock (``tests/test_state.py``). The server's connection threads
and the supervisor thread share one ``QueueState``; each public method takes
the lock once ("lock the state once per unit of work") and every change that
someone may wait for ends in ``_changed()`` (waits.py: it answers the parked
calls whose condition now holds).

It owns the records, the queues (``QueueInfo``, queues.py), the one
transition function and what moves jobs: ``add``, ``finish``, ``release``,
``requeue``, cancels, a client's notices (jobs it post-processes) and its
departure. Four parts of it are written apart, as mixins whose methods run
on the state under its lock, with no indirection per job: ``Scheduling``
(scheduling.py: the heaps, lanes, ``pick``), ``Dependencies``
(dependencies.py: jobs that wait for others, ``after``), ``Results``
(results.py: ``get``, collect, expiry) and ``Waits`` (waits.py: parked calls).

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
"""

from __future__ import annotations

import collections
import heapq
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ..errors import JobNotFound, QueueFull
from ..job import ERROR_STATES, TRANSITIONS, JobRecord, JobStatus, Phase
from ..messages import KillRequest, Outcome
from ..schema import INT64_MAX, SETTINGS
from .queues import DONE, GONE, HELD, NEW, RETURNED, RUNNING, WAITING, QueueInfo
from .dependencies import Dependencies
from .results import Results
from .scheduling import Scheduling
from .waits import Deferred, Outbox, StateLock, Waits

__all__ = ["QueueState", "QueueInfo", "Outcome"]

#: _ALLOWED[frm][to]: TRANSITIONS as a table (no tuple built per move)
_ALLOWED = [[(frm, to) in TRANSITIONS for to in Phase] for frm in Phase]

#: dropped queues' id counters one owner keeps by name (QueueState.last_ids)
MAX_KEPT_IDS = 4096

FAILED_STATES = (JobStatus.FAILED, JobStatus.LOST, JobStatus.KILLED, JobStatus.TIMEOUT)


# ``finish`` unpacks an Outcome onto the record field by field in this order
# (one tuple unpacking: the supervisor calls it for every job)
if Outcome._fields != ("status", "exitcode", "output_blob", "exception", "cpu_user", "cpu_system",
                       "max_rss", "max_rss_method", "max_rss_children", "pid", "host", "started", "ended"):
    raise ImportError("messages.Outcome changed its fields: update QueueState.finish")


class QueueState(Scheduling, Dependencies, Results, Waits):
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
        #: (lock held) a waiting job's priority changed (``set_priority``):
        #: the durable server's journal, None otherwise
        self.on_priority: Optional[Callable[[JobRecord], None]] = None
        #: (lock held) a lane's memory of a failed last job (which skips its
        #: later ``stop_on_lane_error`` jobs) was set or cleared: (queue,
        #: lane key, lane); the durable server's journal, None otherwise
        self.on_lane: Optional[Callable[[QueueInfo, bytes, Any], None]] = None
        #: (lock held) True while results.py hands results out (get, collect,
        #: pop_ids): their records go now, their rows once the reply was read
        self.handing = False
        #: (lock held) a job's record is deleted (GONE): the service lets go
        #: of its environment then, not at its end, so that a finished job
        #: can be requeued in it (``Service.requeue_job``)
        self.on_gone: Optional[Callable[[JobRecord], None]] = None
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
        #: table. Only qids named by their clients are kept: a private queue
        #: (random qid, no ``qid`` given) its own client disposed of is
        #: forgotten (``_drop_if_empty``), else every ``with Queue():`` would
        #: cost one. One owner keeps at most ``MAX_KEPT_IDS`` of them by name
        #: (a user naming 40,000 queues grew a root server by 16 MiB in 6 s,
        #: without end): past that its oldest is forgotten into the owner's
        #: floor (the key ``owner:\0``, no qid's), where its new queues start,
        #: so that no id is reused.
        self.last_ids: Dict[str, int] = {}
        self._kept_of: Dict[object, Dict[str, None]] = {}   # owner -> its qids in last_ids, oldest first
        self.queues_of: Dict[object, int] = {}   # owner -> how many queues it has
        #: owner -> (qid, lane key) of its lanes kept for a failure, oldest first (scheduling.py)
        self.failed_lanes_of: Dict[object, Dict[Tuple[str, bytes], bool]] = {}
        self.failed_lane_bytes: Dict[object, int] = {}   # owner -> the bytes of those lanes' keys
        self._init_dependencies()                # unmet, dependents (dependencies.py)

    # ----------------------------------------------------------------- queues
    def queue(self, qid: str) -> QueueInfo:
        """The QueueInfo of ``qid``, created on first use. Caller holds the lock."""
        q = self.queues.get(qid)
        if q is None:
            q = self.queues[qid] = QueueInfo(qid)
            owner = self.owner_of(qid)
            if self.last_ids:
                next_id = self.last_ids.pop(qid, None)
                if next_id is None:
                    next_id = self.last_ids.get(f"{owner}:\0", 1)
                else:
                    self._kept_of.get(owner, {}).pop(qid, None)
                q.next_id = next_id
            self.queues_of[owner] = self.queues_of.get(owner, 0) + 1
        return q

    def _drop_queue(self, q: QueueInfo, keep_ids: bool = True) -> None:
        """Forget a queue (lock held): its settings and counters; its id
        counter is kept in ``last_ids`` (unless not ``keep_ids``)."""
        if self.queues.get(q.qid) is not q:
            return
        del self.queues[q.qid]
        owner = self.owner_of(q.qid)
        if keep_ids and q.next_id > 1:
            self.keep_ids(q.qid, q.next_id, owner)
        if self.on_queue is not None:
            self.on_queue(q, dropped=True)
        left = self.queues_of.get(owner, 1) - 1
        if left > 0:
            self.queues_of[owner] = left
        else:
            self.queues_of.pop(owner, None)

    def keep_ids(self, qid: str, next_id: int, owner: object) -> None:
        """(lock held) Remember a dropped queue's id counter; past
        ``MAX_KEPT_IDS`` of ``owner``'s, its oldest goes into its floor."""
        self.last_ids[qid] = next_id
        if owner is None:   # a private server: one user
            return
        kept = self._kept_of.setdefault(owner, {})
        kept[qid] = None
        if len(kept) > MAX_KEPT_IDS:
            old = next(iter(kept))
            del kept[old]
            floor = f"{owner}:\0"
            self.last_ids[floor] = max(self.last_ids.get(floor, 1), self.last_ids.pop(old))
            if self.on_queue is not None:   # the durable server's ids table follows
                self.on_queue(QueueInfo(old), dropped=True)
                self.on_queue(QueueInfo(floor), dropped=True)

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
            waits = [rec for rec in records if rec.after is not None]
            if waits:   # named jobs resolved to job numbers, or the batch refused
                resolved = [self._resolve_after(q, rec) for rec in waits]
                for rec, seqs in zip(waits, resolved):
                    rec.after = seqs
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
                if rec.after is None:
                    self._enqueue(q, rec)
                else:
                    self._admit(q, rec)
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
            if self.on_gone is not None:
                self.on_gone(rec)
        if self.on_move is not None:
            self.on_move(rec, frm, to)
        if self.dependents and (to is HELD or (to is DONE and frm is not HELD)):
            self._after_ended(rec)   # its dependents released or skipped, in this transition


    # --------------------------------------------------------------- finish
    def finish(self, seq: int, outcome: Outcome) -> None:
        """Record a working job's outcome (retry it, hold it, or complete it)."""
        with self.cond:
            rec = self.records.get(seq)
            if rec is None or rec.phase not in (RUNNING, RETURNED):
                return
            q = self.queues[rec.qid]
            (_, rec.exitcode, rec.output_blob, rec.exception, rec.cpu_user, rec.cpu_system, rec.max_rss,
             rec.max_rss_method, rec.max_rss_children, rec.pid, rec.host, started, rec.ended) = outcome
            if started is not None:   # None: the dispatch time stays
                rec.started = started
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
                    was_failed = lane.last_exit not in (0, None)
                    lane.last_exit, lane.last_id, lane.exposed = rec.exitcode, rec.id, None
                    if was_failed or lane.last_exit not in (0, None):
                        if self.on_lane is not None:
                            self.on_lane(q, rec.lane_key, lane)
                        self._count_failed_lane(q, rec.lane_key, lane)
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

    def _skip(self, q: QueueInfo, rec: JobRecord, exitcode: Optional[int], why: str) -> None:
        """(lock held) A waiting job that will never run, because of how
        another ended (its lane's last job, a job it waits for): ``skipped``,
        that job's exit code, the reason in ``exception``."""
        rec.status = JobStatus.SKIPPED
        rec.cancelled = True
        rec.exitcode = exitcode
        rec.exception = why
        self._done(q, rec, held_ok=False)

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

    # --------------------------------------------------------- queue control
    def set_priority(self, seq: int, priority: int) -> bool:
        """Give a waiting job another priority; it is re-sorted at once.
        False for a job that is not waiting (running, finished or unknown).

        In its queue it now ranks by the new priority (ties: submission
        order). In a lane, the lane's jobs still run one at a time, best
        first: the job moves within its lane, and the lane competes in its
        queue with its best waiting job's priority. The old heap entry is
        left behind, stale (``_head`` checks an entry's priority)."""
        with self.cond:
            rec = self.records.get(seq)
            if rec is None or rec.phase is not WAITING:
                return False
            if rec.priority == priority:
                return True
            q = self.queues[rec.qid]
            old = (rec.priority, seq)
            rec.priority = priority
            if seq in self.unmet:
                pass   # blocked (dependencies.py): in no heap yet; released at its new priority
            elif rec.lane_key is None:
                heapq.heappush(q.waiting, (priority, seq))
            else:
                lane = q.lanes[rec.lane_key]
                lane.heap.remove(old)
                heapq.heapify(lane.heap)
                heapq.heappush(lane.heap, (priority, seq))
                if lane.exposed == seq:
                    lane.exposed = None   # offered again at its new priority (or another is)
                self._settle(q, lane)
            if self.on_priority is not None:
                self.on_priority(rec)
            self._changed()
            return True

    def forget_finished(self, uid: object, qid: Optional[str] = None) -> int:
        """Drop the done jobs of user ``uid`` (of queue ``qid`` only, if
        given), results nobody collected included; how many. Jobs whose
        client still post-processes them (held) stay."""
        with self.cond:
            if qid is not None:
                q = self.queues.get(qid)
                seqs = list(q.ids.values()) if q is not None else []
            else:
                seqs = list(self.records)
            n = 0
            for seq in seqs:
                rec = self.records.get(seq)
                if rec is not None and rec.phase is DONE and rec.uid == uid:
                    self._forget(self.queues[rec.qid], rec)
                    n += 1
            if n:
                self._changed()
            return n

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
            # newest first: a job is cancelled before a job it waits for
            # ends (which would skip it)
            for seq in sorted(q.ids.values(), reverse=True):
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

    # --------------------------------------------------------- clients leaving
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


