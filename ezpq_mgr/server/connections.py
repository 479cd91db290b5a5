"""Serving one client connection: its requests, its Caller, its parked call.

A thread per authenticated connection reads a ``Request``, calls the
``Service`` method it names with the connection's ``Caller`` (callers.py)
first, and sends the ``Reply``; a call the service parked (waits.py) is
answered by whoever makes its answer possible, while this thread holds its
deadline, or withdraws it when the client sends again or leaves. The
calls whose answers can be big (listings) are answered one at a time per
user, so one user's many connections cannot crowd the others out.
"""

from __future__ import annotations

import logging
import math
import select
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from .. import wire
from ..errors import ServerError
from ..messages import ERROR, RETURN, Reply, Request
from .callers import DEFERRED, Caller, send_reply
from .outgoing import MessageTooLarge, PeerConnection

__all__ = ["ConnectionServer"]

logger = logging.getLogger(__name__)

#: poll() takes an int of milliseconds: a longer deadline is waited in steps
_MAX_POLL = 86400.0


def _hung_up(fd: int) -> bool:
    """The peer of socket ``fd`` is gone (without waiting)."""
    p = select.poll()
    p.register(fd, select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


class _Turn:
    """One user's turn at a big answer, and the connection its last one was
    queued on (a client that does not read it holds up only this user)."""

    __slots__ = ("lock", "unread")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unread: Optional[PeerConnection] = None


class ConnectionServer:
    """Serves the requests of authenticated connections, one thread each.

    A ``Request`` names a method and its arguments; only the service's
    ``exposed`` methods exist (the stdlib manager's built-ins, ``shutdown``
    and friends, do not). Each is answered by one ``Reply``: ``RETURN`` and
    the value, or ``ERROR`` and the exception."""

    def __init__(self, service: Any, exposed: Iterable[str], state: Any, loads: Callable[[bytes], Any],
                 stop_event: threading.Event, one_at_a_time: Iterable[str] = (),
                 from_the_log: Iterable[str] = ()):
        self.service = service
        self.exposed = frozenset(exposed)
        self.state = state
        self.loads = loads
        self.stop_event = stop_event
        #: a durable server's journal: blocks until what a reply reports is
        #: committed (``Store.barrier``); None: reply at once
        self.barrier: Optional[Callable[[], None]] = None
        #: a durable server's journal: the results a client was handed were
        #: read (its next request came), their removal may go to disk
        #: (``Store.handed_over``); None: nothing to write
        self.handed_over: Optional[Callable[[List[int]], None]] = None
        #: a shared server (JSON requests): a big one is refused unparsed
        #: when it holds more than wire.MAX_VALUES values
        self.shared = False
        #: the calls whose answers can be big (listings): a user's are made,
        #: encoded and queued one at a time, however many connections it
        #: opens, so the others' calls share the interpreter with one such
        #: answer, not eight (they never park); and each waits until the
        #: user's client has read the last one, so the server holds one
        #: unread big answer per user, not one per connection (64 listings
        #: never read held 1.7 GB)
        self.one_at_a_time = frozenset(one_at_a_time)
        self._turns: Dict[int, _Turn] = {}   # uid -> its turn at a big answer
        #: and one big answer is made at a time server-wide (never held
        #: waiting on a client): four users listing 50,000 jobs at once left
        #: a fifth user's put and get at 0.3-1.1 s, growing with their number
        self._one_big = threading.Lock()
        #: the big answers read from the accounting log (every user's rows,
        #: every earlier run's: seconds for a long log) take their own turn,
        #: so that they never hold up the listings: a user asking for her
        #: report again and again left another's ``ezpq status`` at 3-4 s
        one_read = threading.Lock()
        from_the_log = frozenset(from_the_log)
        self._big_turn = {m: one_read if m in from_the_log else self._one_big for m in self.one_at_a_time}
        self._turns_guard = threading.Lock()

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
        exposed = self.exposed
        while not self.stop_event.is_set():
            conn.wait_drained()  # one reply in flight per connection, at most
            if conn.closed:
                return
            try:
                body = conn.read()
                if caller.handed:   # it read our last reply: what that handed over is its own now
                    handed, caller.handed = caller.handed, []
                    caller.confirmed = handed   # (its ``ack`` says which, once committed)
                    if self.handed_over is not None:
                        self.handed_over(handed)
            except MessageTooLarge as exc:
                conn.send(Reply(ERROR, ValueError(f"ezpq server: {exc}")))
                continue
            except (EOFError, OSError, MemoryError, OverflowError):
                return  # gone, or a frame no memory can hold: this connection ends, not the server
            if self.shared:
                why = wire.values_over_limit(body)
                if why is not None:
                    conn.send(Reply(ERROR, ValueError(f"ezpq server: {why}")))
                    continue
            try:
                method, args = Request.parse(self.loads(body))
            except Exception:
                conn.send(Reply(ERROR, ValueError("ezpq server: malformed request")))
                continue
            if method not in exposed:
                conn.send(Reply(ERROR, AttributeError(f"method {method[:100]!r} is not exposed")))
            elif method in self.one_at_a_time:
                turn = self._turn(caller)
                with turn.lock:
                    if turn.unread is not None:
                        turn.unread.wait_drained()   # read by the user's client, or its connection gone
                    if conn.closed or _hung_up(conn.fd):
                        return   # the client left while it waited: nothing to make
                    with self._big_turn[method]:
                        self._answer(conn, caller, method, args)
                    turn.unread = conn
            else:
                self._answer(conn, caller, method, args)

    def _answer(self, conn: PeerConnection, caller: Caller, method: str, args: tuple) -> None:
        """Call the service's ``method`` and send its reply, or hold its
        deadline if the service parked the call."""
        try:
            msg = Reply(RETURN, getattr(self.service, method)(caller, *args))
        except Exception as e:
            msg = Reply(ERROR, e)
        if msg.value is DEFERRED:
            self._park(conn, caller)
            return
        if self.barrier is not None:
            try:
                self.barrier()
            except Exception as e:   # the state cannot be saved: say so, never acknowledge
                msg = Reply(ERROR, ServerError(str(e)))
        send_reply(conn, msg)

    def _turn(self, caller: Caller) -> "_Turn":
        """The caller's user's turn at a big answer (see ``one_at_a_time``)."""
        with self._turns_guard:
            turn = self._turns.get(caller.identity.uid)
            if turn is None:
                turn = self._turns[caller.identity.uid] = _Turn()
            return turn

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

