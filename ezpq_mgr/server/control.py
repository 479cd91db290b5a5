"""Queue control: pause and resume queues, a waiting job's priority,
requeue a finished job, clean finished jobs, and ``top``'s live view.

``Control`` is a part of ``Service`` (service.py), written apart: its
methods are the service's (each takes the ``Caller`` first, checks every
argument with ``schema`` before anything changes) and use its helpers
(``_key``, ``_record``, ``_use``, the environment registry). Who may do
what, as for ``cancel``:

- a queue name is the caller's own (``"uid:qid"`` on a shared server), so
  ``pause_queues``/``set_priority``/``clean`` reach only the caller's
  queues and jobs, root's and the owner's included;
- ``job_priority`` (by job number) reaches the caller's jobs, root and the
  server's owner every job;
- ``requeue_job`` only the caller's own jobs, root's and the owner's
  included: the new job runs as its caller, and running another user's
  code as root would hand them root;
- ``top`` shows the caller's running jobs and queues, root and the owner
  everyone's; the server-wide figures (workers busy, jobs waiting) to all.

Everything goes through the state's methods, so a durable server journals
it (``configure`` -> ``on_queue``, ``set_priority`` -> ``on_priority``,
``add``/``forget_finished`` -> ``on_move``).
"""

from __future__ import annotations

import secrets
from typing import Dict, List, Optional

from .. import schema
from ..errors import JobNotFound
from ..messages import JOB_FIELDS, job_record
from .callers import Caller, owner, user_name
from .live import LiveSampler
from .queues import DONE, HELD, RUNNING

__all__ = ["Control"]

#: qids one pause_queues/resume call may name
MAX_QIDS = 4096


class Control:
    """The service's queue-control and ``top`` calls (mixed into ``Service``)."""

    _live: Optional[LiveSampler] = None

    def pause_queues(self, caller: Caller, qids: Optional[List[str]], paused: bool) -> List[str]:
        """Pause (no new job of theirs starts; running ones go on) or resume
        these queues of the caller's, sorted, or (``qids`` None) all of
        them: those it changed. A named qid that does not exist yet is made
        (paused, it is kept: jobs put later wait)."""
        schema.check_bool("paused", paused)
        if qids is not None:
            if type(qids) is not list:
                raise TypeError(f"qids must be a list of queue names or None, not {type(qids).__name__}")
            if len(qids) > MAX_QIDS:
                raise ValueError(f"qids: at most {MAX_QIDS} per call, got {len(qids)}")
            keys = list(dict.fromkeys(self._key(caller, q) for q in qids))
            for key in keys:
                self._use(caller, key)
        else:
            me = str(caller.identity.uid)
            with self.state.cond:
                keys = [k for k in self.state.queues if not self.shared or self._owner_of(k) == me]
        changed = []
        for key in keys:
            with self.state.cond:
                q = self.state.queues.get(key)
                if q is None or (q.paused == paused and qids is None):
                    continue
                if q.paused != paused:
                    self.state.configure(key, paused=paused)
            changed.append(self._visible_qid(key))
        if changed:
            self.supervisor.wake()
        return sorted(changed)

    def set_priority(self, caller: Caller, qid: str, job_id: int, priority: int) -> bool:
        """``Queue.set_priority``: give a waiting job of the caller's queue
        another priority; False when it is no longer waiting (running,
        finished, collected), ``JobNotFound`` for an id the queue never gave out."""
        key = self._key(caller, qid)
        job_id = schema.check_int("job_id", job_id, 1, schema.INT64_MAX)
        priority = schema.check_priority(priority)
        with self.state.cond:
            q = self.state.queues.get(key)
            seq = q.ids.get(job_id) if q is not None else None
            if seq is None:
                if q is not None and job_id < q.next_id:
                    return False   # it was, and is collected or dropped (as cancel)
                raise JobNotFound(f"no job {job_id} in queue {qid!r}")
            done = self.state.set_priority(seq, priority)
        self.supervisor.wake()
        return done

    def job_priority(self, caller: Caller, seq: int, priority: int) -> dict:
        """``ezpq priority JOB N``: the job's status and priority after the
        change (the same when it was not waiting any more)."""
        priority = schema.check_priority(priority)
        with self.state.cond:
            rec = self._record(caller, seq)
            changed = self.state.set_priority(rec.seq, priority)
            answer = {"job": rec.seq, "changed": changed, "status": rec.status.value,
                      "priority": rec.priority}
        self.supervisor.wake()
        return answer

    def requeue_job(self, caller: Caller, seq: int) -> dict:
        """``ezpq requeue JOB``: run a finished job again as a new job (new
        number and id) in its queue, with the same function, arguments,
        settings and environment, as the caller; its client is none (a
        fresh token nobody holds, as a submitted job's once ``ezpq submit``
        has left). Refused for a job that still waits or runs, and for
        another user's job (even for root: it would run as root)."""
        me = caller.identity
        with self.state.cond:
            old = self._record(caller, seq)
            if old.uid != me.uid:
                raise PermissionError(f"job {seq} is {old.user}'s: a requeued job runs as you, so you "
                                      f"may requeue only your own")
            if old.phase is not DONE and old.phase is not HELD:
                raise ValueError(f"job {seq} is {old.status.value}: only a finished job can be requeued "
                                 f"(cancel it first)")
            fields = {name: getattr(old, name) for name in JOB_FIELDS if hasattr(old, name)}
            key, env_id = old.qid, old.env_id
        fields["client"] = secrets.token_hex(16)
        fields["id"] = 0
        fields["after"] = None   # what it waited for was settled when it ran: the new job waits for none
        if fields.get("name") == old.id:
            fields["name"] = None   # it was named by its id: the new one is named by its own
        rec = job_record(fields, key, me.user, me.uid)   # checked again, as any put
        self._use(caller, key)
        with self.state.cond:
            env = self._envs.get(env_id) if env_id else None
            if env_id and env is None:   # the old job left since (collected, cleaned)
                raise JobNotFound(f"no job {seq}")
            held = None
            if self._jobs_held is not None:   # a new job, as any put: within the caps, counted
                held = (1, len(rec.fn_blob) + len(rec.args_blob))
                self._check_share(me, *held)
                self._hold_jobs(me.uid, *held)
            try:
                self.state.add(key, [rec])
            except BaseException:
                if held is not None:
                    self._hold_jobs(me.uid, -held[0], -held[1])
                raise
            if env is not None:
                env.refs += 1
        self.supervisor.dispatch_now()
        return {"job": rec.seq, "id": rec.id, "qid": self._visible_qid(key), "from": seq}

    def clean(self, caller: Caller, qid: Optional[str] = None) -> int:
        """``ezpq clean``: forget the caller's finished jobs (of ``qid``
        only, if given), results nobody collected included; how many."""
        key = None if qid is None else self._key(caller, qid)
        return self.state.forget_finished(caller.identity.uid, key)

    def top(self, caller: Caller) -> dict:
        """``ezpq top``: the running jobs the caller may see, each with its
        worker's process tree's CPU % and RSS now (sampled here, outside the
        state's lock), runtime and pid; waiting and running counts per
        queue (the caller's; root and the owner: all); workers busy and
        total and jobs waiting on the whole server."""
        me = caller.identity
        every = me.privileged
        mine = str(me.uid)
        now = self.state.clock()
        running, queues = [], []
        with self.state.cond:
            records = self.state.records
            waiting_total = 0
            for key, q in self.state.queues.items():
                waiting_total += q.n_waiting
                if not (every or not self.shared or self._owner_of(key) == mine):
                    continue
                if q.n_waiting or q.n_running or q.paused:
                    queues.append([key, q.n_waiting, q.n_running, q.paused])
                if q.n_running:
                    for s in q.ids.values():
                        rec = records[s]
                        if rec.phase is RUNNING:
                            running.append({"job": rec.seq, "qid": self._visible_qid(key), "id": rec.id,
                                            "user": rec.user, "name": rec.name, "pid": rec.pid,
                                            "runtime": None if rec.started is None else now - rec.started})
            busy, workers = self.state.n_running, self.supervisor.slots
        if self._live is None:
            self._live = LiveSampler()
        figures = self._live.sample([j["pid"] for j in running if j["pid"]])
        for j in running:
            j["cpu_percent"], j["rss"] = figures.get(j["pid"], (None, None))
        names: Dict[str, str] = {}
        out_queues = []
        for key, n_waiting, n_running, paused in sorted(queues):
            who = self._owner_of(key) if self.shared else None
            if who not in names:
                names[who] = owner().user if who is None else user_name(int(who))
            out_queues.append({"user": names[who], "qid": self._visible_qid(key), "waiting": n_waiting,
                               "running": n_running, "paused": paused})
        running.sort(key=lambda j: j["job"])
        return {"workers": workers, "busy": busy, "waiting_total": waiting_total, "running": running,
                "queues": out_queues}
