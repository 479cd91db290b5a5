"""Dependencies: a job that runs only once the jobs it names have completed.

``put(..., after=[ids])`` (ids of the same queue) and ``ezpq submit --after
7,8`` (server-wide job numbers) name jobs already on the server, of the
same user. ``Dependencies`` is a part of ``QueueState`` (state.py), written
apart like ``Scheduling``: its methods run on the state, under its lock.

- At ``add`` (``_resolve_after``), before anything changes: every job named
  must be on the server and the caller's own (its uid, root's included: no
  other user's job decides when or whether a job runs), else the whole
  batch is refused with a ``ValueError``; a job cannot name itself. Since
  only jobs already on the server can be named, a cycle cannot be made. A
  job already collected (or dropped) is refused too: its end is no longer
  known. The record keeps the job numbers (seqs) it waits for.
- Then (``_admit``): all already completed: it waits like any job. One
  already ended otherwise: it is ``skipped`` at once. Else it is *blocked*:
  in phase WAITING (it counts as waiting for ``size``/``wait``) but in no
  heap and no lane, so it never blocks another job; ``unmet`` counts what
  it still waits for and ``dependents`` lists it under each of them.
- When a job reaches its final state (``QueueState._move`` calls
  ``_after_ended``, in that same transition), its dependents are released
  (into their queue's heap or lane, as a new job would be) once nothing
  else is unmet, or ``skipped`` (``exception`` says which job ended how;
  ``exitcode`` is that job's) if it ended in any other status than
  completed; a skip ends the job, so it cascades to its own dependents.
  The cascade runs from a work list, not by recursion: a chain of 100,000
  jobs skips without a deep stack.

Cost: nothing per job without ``after`` but ``_move`` testing whether any
job has dependents at all (an empty dict) when a job ends; per job with
``after``, one lookup per job named at ``add`` and at each of their ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

from ..job import JobRecord, JobStatus
from ..messages import After
from .queues import DONE, HELD

if TYPE_CHECKING:
    from .queues import QueueInfo

__all__ = ["Dependencies"]


class Dependencies:
    """``QueueState``'s dependencies between jobs. Uses the state's
    ``records``, ``queues``, ``_enqueue`` and ``_done``; owns ``unmet``
    (seq -> how many jobs it still waits for) and ``dependents`` (seq ->
    seqs of the blocked jobs waiting for it)."""

    unmet: Dict[int, int]
    dependents: Dict[int, List[int]]

    def _init_dependencies(self) -> None:
        self.unmet = {}
        self.dependents = {}
        self._ended: List[JobRecord] = []   # the cascade's work list
        self._cascading = False

    def _resolve_after(self, q: QueueInfo, rec: JobRecord) -> tuple:
        """(lock held, before anything of the batch changes) The job numbers
        ``rec`` waits for, from the ``After`` its client named: ids of its
        queue ``q`` and job numbers. ``ValueError`` for one not on the
        server, another user's, or the job itself."""
        after: After = rec.after
        records, seqs = self.records, {}
        for job_id in after.ids:
            if job_id == rec.id:
                raise ValueError(f"after: job {job_id} cannot wait for itself")
            seq = q.ids.get(job_id)
            if seq is None:
                if job_id < q.next_id:
                    raise ValueError(f"after: job {job_id} of this queue is not on the server (not put "
                                     f"yet, or already collected: how it ended is no longer known)")
                raise ValueError(f"after: no job {job_id} in this queue")
            seqs[seq] = None
        for seq in after.jobs:
            dep = records.get(seq)
            if dep is None or dep.uid != rec.uid:
                raise ValueError(f"after: no job {seq} of yours on this server (a job number never "
                                 f"given out, another user's, or a job already collected)")
            seqs[seq] = None
        return tuple(seqs)

    def _admit(self, q: QueueInfo, rec: JobRecord) -> None:
        """(lock held) A job that just moved to WAITING: into its heap, or,
        with unmet dependencies, blocked; skipped at once if one of them
        already ended otherwise than completed. A dependency no longer on
        the server (restore only: it was collected while this job waited)
        has completed: had it ended otherwise, this job would have been
        skipped in the same transition."""
        after = rec.after
        if after is None:
            self._enqueue(q, rec)
            return
        records, waiting_for = self.records, []
        for seq in after:
            dep = records.get(seq)
            if dep is None:
                continue
            if dep.phase is DONE or dep.phase is HELD:
                if dep.status is not JobStatus.COMPLETED:
                    self._skip_after(q, rec, dep)
                    return
            else:
                waiting_for.append(seq)
        if not waiting_for:
            self._enqueue(q, rec)
            return
        self.unmet[rec.seq] = len(waiting_for)
        for seq in waiting_for:
            self.dependents.setdefault(seq, []).append(rec.seq)

    def _skip_after(self, q: QueueInfo, rec: JobRecord, dep: JobRecord) -> None:
        """(lock held) A waiting job is skipped: ``dep``, a job it waits for, ended otherwise."""
        self.unmet.pop(rec.seq, None)
        self._skip(q, rec, dep.exitcode, f"after: job {dep.seq} (id {dep.id} of its queue), which this "
                                         f"job waits for, ended {dep.status.value}")

    def _after_ended(self, rec: JobRecord) -> None:
        """(lock held; ``_move``, as ``rec`` reaches its final state) Release
        or skip the jobs blocked on ``rec``, and theirs in turn."""
        work = self._ended
        work.append(rec)
        if self._cascading:   # a skip below ended a job: the loop takes it
            return
        self._cascading = True
        try:
            records, unmet, dependents = self.records, self.unmet, self.dependents
            while work:
                ended = work.pop()
                unmet.pop(ended.seq, None)   # a blocked job itself ended (cancelled, skipped)
                for seq in dependents.pop(ended.seq, ()):
                    child = records.get(seq)
                    left = unmet.get(seq)
                    if child is None or left is None:   # ended meanwhile (skipped by another)
                        continue
                    q = self.queues[child.qid]
                    if ended.status is not JobStatus.COMPLETED:
                        self._skip_after(q, child, ended)
                    elif left > 1:
                        unmet[seq] = left - 1
                    else:
                        del unmet[seq]
                        self._enqueue(q, child)
        finally:
            self._cascading = False
            work.clear()
