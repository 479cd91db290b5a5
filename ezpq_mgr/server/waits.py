"""Waits: parked calls, answered by the thread that makes their answer possible.

A client's ``get(wait=True)`` used to park its server thread on a condition
until the supervisor thread recorded a result, then wake it to reply: two
threads and a GIL hand-off on every job's critical path. Instead the call
registers a ``Deferred`` with the state and its thread goes back to the
connection. Whoever makes the answer possible (the supervisor reading a
worker's result, a cancel on another connection) computes the answer under
the state's lock (``Waits._changed``, run after every change) into the
``Outbox``, and the lock itself (``StateLock``) sends the outbox on the
waiting clients' connections when its outermost holder lets go, whichever
thread that is. The serving thread keeps the deadline (connections.py): if
nothing answered in time it sends the timeout answer itself. No thread
blocks on a condition, nothing polls: an idle server makes no wake-ups.

A client sends nothing on a connection until its last call was answered,
and the serving thread reads no request while a reply is still queued, so
at most one reply per connection is outstanding. Sends never block (see
outgoing.py): a stopped client cannot stall the supervisor that answers it.

``Waits`` is a part of ``QueueState`` (state.py), written apart: the wait
conditions (``wait_pending``, ``wait_client``, ``wait_free``,
``wait_for``), parking (``_answer_or_defer``) and settling them.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Callable, Optional

from ..stdlib_private import CRLock, rlock_is_owned

__all__ = ["Deferred", "Outbox", "StateLock", "Waits"]


class Deferred:
    """One parked call: how to tell it can be answered, how to answer, where to send."""

    __slots__ = ("ready", "answer", "send", "deadline", "result", "settled")

    def __init__(self, ready: Callable[[], bool], answer: Callable[[], Any],
                 send: Callable[[Any], None], timeout: Optional[float]):
        self.ready = ready
        self.answer = answer
        self.send = send
        self.deadline = math.inf if timeout is None else time.monotonic() + max(0.0, timeout)
        self.result: Any = None
        self.settled = False   # answered (maybe not yet sent) or withdrawn


class Outbox:
    """Answers computed under the state's lock, sent after it is released."""

    def __init__(self) -> None:
        self.items: "collections.deque[Deferred]" = collections.deque()
        #: a durable server's journal keeps an answer until what it reports is
        #: committed (``Store.hold``: True when it took it); None: send at once
        self.hold: Optional[Callable[[Deferred], bool]] = None

    def put(self, d: Deferred) -> None:
        self.items.append(d)

    def __bool__(self) -> bool:
        return bool(self.items)

    def deliver(self) -> None:
        """Send every pending answer (any thread; each is sent exactly once)."""
        while self.items:
            try:
                d = self.items.popleft()
            except IndexError:
                return
            if self.hold is not None and self.hold(d):
                continue
            d.send(d.result)


class StateLock(CRLock):
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
        if self._outbox.items and not rlock_is_owned(self):
            self._outbox.deliver()


class Waits:
    """``QueueState``'s parked calls: park a condition, answer what holds
    after every change (``_changed``), settle at a deadline or withdraw.
    A part of ``QueueState`` (state.py), written apart; uses its ``cond``,
    ``outbox`` and ``deferred``."""

    def wait_client(self, client: str, below: int, timeout: Optional[float], reply=None):
        """How many of a client's jobs are not done, once fewer than ``below``
        (1: all done) or when ``timeout`` passes."""
        with self.cond:
            pending = self.client_pending
            return self._answer_or_defer(lambda: pending.get(client, 0) < below,
                                         lambda: pending.get(client, 0), timeout, reply)

    def wait_pending(self, qid: str, below: int, timeout: Optional[float], reply=None,
                     arrivals: bool = False):
        """How many of the qid's jobs wait or work, once fewer than ``below``
        (1: none) or when ``timeout`` passes.

        ``arrivals`` (a collector on a shared qid, with a timeout): an empty
        queue is not an answer yet; it waits for jobs to arrive, then for
        them to finish: ready once fewer than ``below`` wait or work and
        either a job was put since the call or finished jobs wait to be
        collected."""
        with self.cond:
            def pending() -> int:
                q = self.queues.get(qid)
                return 0 if q is None else q.pending
            if not arrivals:
                return self._answer_or_defer(lambda: pending() < below, pending, timeout, reply)
            first = self.queues.get(qid)
            before = 0 if first is None else first.n_submitted

            def settled() -> bool:   # (a queue made anew meanwhile counts from 0)
                q = self.queues.get(qid)
                return q is not None and q.pending < below and (
                    q.n_done > 0 or q.n_submitted > (before if q is first else 0))
            return self._answer_or_defer(settled, pending, timeout, reply)

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
