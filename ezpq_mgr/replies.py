"""Deferred replies: a blocked call is answered by the thread that unblocks it.

A client's ``get(wait=True)`` used to park its server thread on a condition
until the supervisor thread recorded a result, then wake it to reply: two
threads and a GIL hand-off on every job's critical path. Instead the call
registers a ``Deferred`` with the state and its thread goes back to the
connection. Whoever makes the answer possible (the supervisor reading a
worker's result, a cancel on another connection) computes the answer under
the state's lock and sends it on the waiting client's connection right after
releasing that lock. The serving thread keeps the deadline: if nothing
answered in time it sends the timeout answer itself.

A client sends nothing on a connection until its last call was answered,
and the serving thread reads no request while a reply is still queued, so
at most one reply per connection is outstanding. Sends never block (see
outgoing.py): a stopped client cannot stall the supervisor that answers it.
"""

from __future__ import annotations

import collections
import logging
import math
import select
import threading
import time
from typing import Any, Callable, Iterable, Optional

from .errors import ServerError
from .messages import ERROR, RETURN, Reply, Request
from .outgoing import MessageTooLarge, PeerConnection
from .peers import DEFERRED, Caller, send_reply

#: poll() takes an int of milliseconds: a longer deadline is waited in steps
_MAX_POLL = 86400.0

__all__ = ["DEFERRED", "Deferred", "Outbox", "ConnectionServer"]

logger = logging.getLogger(__name__)


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


class ConnectionServer:
    """Serves the requests of authenticated connections, one thread each.

    A ``Request`` names a method and its arguments; only the service's
    ``exposed`` methods exist (the stdlib manager's built-ins, ``shutdown``
    and friends, do not). Each is answered by one ``Reply``: ``RETURN`` and
    the value, or ``ERROR`` and the exception."""

    def __init__(self, service: Any, exposed: Iterable[str], state: Any, loads: Callable[[bytes], Any],
                 stop_event: threading.Event):
        self.service = service
        self.exposed = frozenset(exposed)
        self.state = state
        self.loads = loads
        self.stop_event = stop_event
        #: a durable server's journal: blocks until what a reply reports is
        #: committed (``Store.barrier``); None: reply at once
        self.barrier: Optional[Callable[[], None]] = None

    def serve(self, conn: PeerConnection) -> None:
        """The serving thread of one connection, until the client leaves."""
        caller = Caller(conn.identity, conn)
        try:
            self._loop(conn, caller)
        finally:
            caller.conn = None
            conn.close()
            caller.disconnected()  # the client left: what the service asked to run then

    def _loop(self, conn: PeerConnection, caller: Caller) -> None:
        service, exposed = self.service, self.exposed
        while not self.stop_event.is_set():
            conn.wait_drained()  # one reply in flight per connection, at most
            if conn.closed:
                return
            try:
                body = conn.read()
            except MessageTooLarge as exc:
                conn.send(Reply(ERROR, ValueError(f"ezpq server: {exc}")))
                continue
            except (EOFError, OSError, MemoryError, OverflowError):
                return  # gone, or a frame no memory can hold: this connection ends, not the server
            try:
                method, args = Request.parse(self.loads(body))
            except Exception:
                conn.send(Reply(ERROR, ValueError("ezpq server: malformed request")))
                continue
            if method not in exposed:
                msg = Reply(ERROR, AttributeError(f"method {method[:100]!r} is not exposed"))
            else:
                try:
                    msg = Reply(RETURN, getattr(service, method)(caller, *args))
                except Exception as e:
                    msg = Reply(ERROR, e)
            if msg.value is DEFERRED:
                self._park(conn, caller)
                continue
            if self.barrier is not None:
                try:
                    self.barrier()
                except Exception as e:   # the state cannot be saved: say so, never acknowledge
                    msg = Reply(ERROR, ServerError(str(e)))
            send_reply(conn, msg)

    def _park(self, conn: PeerConnection, caller: Caller) -> None:
        """Hold the deadline of our deferred call (sleeping in poll until
        then: whoever answers it sends the answer itself, see StateLock).
        Data from the client means it has its answer (or is gone): withdraw
        the call if still parked."""
        d, caller.parked = caller.parked, None
        poller = caller.poller
        if poller is None:  # conn.poll() would build a selector per call
            poller = caller.poller = select.poll()
            poller.register(conn.fd, select.POLLIN)
        while True:
            left = d.deadline - time.monotonic()
            if left <= 0:
                self.state.settle(d, answer=True)
                return
            if conn.has_buffered_input or poller.poll(
                    None if left == math.inf else max(1, math.ceil(min(left, _MAX_POLL) * 1000))):
                self.state.settle(d, answer=False)
                return

