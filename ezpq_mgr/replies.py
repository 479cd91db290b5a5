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

A client's proxy sends nothing on a connection until its last call was
answered, so at most one reply per connection is ever outstanding, and the
deferred send never interleaves with the serving thread's own.
"""

from __future__ import annotations

import collections
import select
import sys
import threading
import time
from multiprocessing import util
from traceback import format_exc
from typing import Any, Callable, Optional

from . import channel
from .peers import IdentityServer

__all__ = ["DEFERRED", "Deferred", "Outbox", "ReplyingServer", "at_disconnect", "park",
           "reply_channel"]

#: What a service method returns when its answer will be sent later.
DEFERRED = object()

_local = threading.local()
_SAFETY_POLL = 1.0   # a parked serving thread re-checks its outbox this often


class Deferred:
    """One parked call: how to tell it can be answered, how to answer, where to send."""

    __slots__ = ("ready", "answer", "send", "deadline", "result", "settled")

    def __init__(self, ready: Callable[[], bool], answer: Callable[[], Any],
                 send: Callable[[Any], None], timeout: float):
        self.ready = ready
        self.answer = answer
        self.send = send
        self.deadline = time.monotonic() + max(0.0, timeout)
        self.result: Any = None
        self.settled = False   # answered (maybe not yet sent) or withdrawn


class Outbox:
    """Answers computed under the state's lock, sent after it is released."""

    def __init__(self) -> None:
        self._items: "collections.deque[Deferred]" = collections.deque()

    def put(self, d: Deferred) -> None:
        self._items.append(d)

    def __contains__(self, d: Deferred) -> bool:
        return d in self._items

    def deliver(self) -> None:
        """Send every pending answer (any thread; each is sent exactly once)."""
        while self._items:
            try:
                d = self._items.popleft()
            except IndexError:
                return
            d.send(d.result)


def reply_channel(transform: Callable[[Any], Any]) -> Optional[Callable[[Any], None]]:
    """A sender of ``transform(answer)`` to the client this thread serves, or
    None when this thread serves no client connection (the call must block)."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        return None

    def send(answer: Any) -> None:
        try:
            channel.send(conn, ("#RETURN", transform(answer)))
        except Exception:  # the client is gone: nobody to tell
            util.info("could not send a deferred reply: %s", format_exc())

    return send


class ReplyingServer(IdentityServer):
    """A manager Server whose serving loop understands ``DEFERRED``.

    ``state`` supplies ``outbox`` (delivered after every call) and
    ``settle(deferred, answer)`` (answer now, or withdraw)."""

    state: Any = None

    def handle_request(self, conn):
        try:
            super().handle_request(conn)
        finally:  # the client disconnected (or was refused): run its hooks
            for fn in getattr(_local, "at_disconnect", ()):
                try:
                    fn()
                except Exception:
                    util.info("a disconnect hook failed: %s", format_exc())

    def serve_client(self, conn):
        _local.conn = conn
        id_to_obj = self.id_to_obj
        while not self.stop_event.is_set():
            try:
                request = channel.recv(conn)
            except (EOFError, OSError):
                return
            try:
                ident, methodname, args, kwds = request
                obj, exposed, _ = id_to_obj[ident]
                if methodname not in exposed:
                    raise AttributeError(f"method {methodname!r} is not exposed")
                try:
                    res = getattr(obj, methodname)(*args, **kwds)
                except Exception as e:
                    msg = ("#ERROR", e)
                else:
                    msg = ("#RETURN", res)
            except Exception:
                msg = ("#TRACEBACK", format_exc())
            outbox = self.state.outbox
            outbox.deliver()
            if msg[1] is DEFERRED:
                self._park(conn, _local.parked)
                continue
            try:
                try:
                    channel.send(conn, msg)
                except Exception:
                    conn.send(("#UNSERIALIZABLE", format_exc()))
            except Exception:
                conn.close()
                sys.exit(1)

    def _park(self, conn, d: Deferred) -> None:
        """Hold the deadline of our deferred call. Data from the client means
        it has its answer (or is gone): withdraw the call if still parked."""
        outbox = self.state.outbox
        poller = getattr(_local, "poller", None)
        if poller is None:  # conn.poll() builds a selector per call: 10x slower
            poller = _local.poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
        while True:
            left = d.deadline - time.monotonic()
            if left <= 0:
                self.state.settle(d, answer=True)
                break
            if poller.poll(max(1, int(min(left, _SAFETY_POLL) * 1000))):
                self.state.settle(d, answer=False)
                break
            if d in outbox:
                outbox.deliver()
        outbox.deliver()


def park(d: Deferred) -> object:
    """Called by a service method: this thread's call is answered later."""
    _local.parked = d
    return DEFERRED


def at_disconnect(fn: Callable[[], None]) -> None:
    """Called by a service method: run ``fn()`` on this thread when its
    client's connection closes."""
    hooks = getattr(_local, "at_disconnect", None)
    if hooks is None:
        hooks = _local.at_disconnect = []
    hooks.append(fn)
