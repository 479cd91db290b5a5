"""A server's side of one client connection: bounded reads, sends that never block.

A reply may be sent by a thread that serves many clients (the supervisor
answering a parked ``get(wait=True)``). A client that stops reading (Ctrl-Z)
must stall nobody but itself, so every send is a non-blocking attempt: a
reply that fits in the socket buffer (the common case) leaves at once,
from the thread that made it, with no hand-off; the rest waits in this
connection's queue and the ``Flusher`` thread writes it as the client reads.
The connection's serving thread reads its next request only once that queue
is empty, so at most one reply per connection is ever held in memory.

Reads are the serving thread's own (blocking, on its own connection): a frame
longer than ``max_message`` is read and thrown away in fixed chunks, never
buffered, and answered with an error.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
from typing import Any, Callable, Deque, Optional, Set

from .peers import Identity
from .transport import HEADER, describe_size

__all__ = ["PeerConnection", "Flusher", "MessageTooLarge"]

_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_FIRST_READ = 65536
_DISCARD = 1 << 20
_JOIN_BELOW = 65536   # smaller replies are sent as one buffer


class MessageTooLarge(Exception):
    """A request over the server's limit (already discarded from the stream)."""


class PeerConnection:
    """One authenticated client connection, as the server sees it."""

    def __init__(self, sock: socket.socket, identity: Identity, dumps: Callable[[Any], bytes],
                 flusher: "Flusher", max_message: Optional[int] = None,
                 on_close: Optional[Callable[[], None]] = None):
        self.sock = sock
        self.fd = sock.fileno()
        self.identity = identity
        self.max_message = max_message
        self._dumps = dumps
        self._flusher = flusher
        self._on_close = on_close
        self._rbuf = b""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending: Deque[memoryview] = collections.deque()
        self.closed = False

    # -------------------------------------------------------------- reads
    @property
    def has_buffered_input(self) -> bool:
        return bool(self._rbuf)

    def _recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        if not data:
            raise EOFError
        return data

    def read(self) -> bytes:
        """The next request's body (blocking); ``MessageTooLarge`` for an
        oversize one, whose bytes were dropped as they came."""
        buf = self._rbuf or self._recv(_FIRST_READ)
        while len(buf) < HEADER.size:
            buf += self._recv(_FIRST_READ)
        size = HEADER.unpack_from(buf)[0]
        end = HEADER.size + size
        if self.max_message is not None and size > self.max_message:
            self._rbuf = b""
            self._discard(size - (len(buf) - HEADER.size), buf[end:] if len(buf) > end else b"")
            raise MessageTooLarge(
                f"a message of {describe_size(size)} is over this server's limit of "
                f"{describe_size(self.max_message)} (ezpq-server --max-message)")
        if len(buf) >= end:
            self._rbuf = buf[end:]
            return buf[HEADER.size:end]
        body = bytearray(size)
        have = len(buf) - HEADER.size
        body[:have] = buf[HEADER.size:]
        view = memoryview(body)
        while have < size:
            k = self.sock.recv_into(view[have:], min(size - have, 1 << 22))
            if not k:
                raise EOFError
            have += k
        self._rbuf = b""
        return bytes(body) if size < _JOIN_BELOW else body

    def _discard(self, left: int, extra: bytes) -> None:
        if left <= 0:
            self._rbuf = extra
            return
        scratch = bytearray(_DISCARD)
        view = memoryview(scratch)
        while left > 0:
            k = self.sock.recv_into(view, min(left, _DISCARD))
            if not k:
                raise EOFError
            left -= k

    # -------------------------------------------------------------- sends
    def send(self, obj: Any) -> None:
        """Queue ``obj`` as the next reply and send what the socket takes now
        (any thread; never blocks on the peer)."""
        body = self._dumps(obj)
        if len(body) < _JOIN_BELOW:  # the common case: one buffer, one attempt, no hand-off
            data = HEADER.pack(len(body)) + body
            with self._lock:
                if self.closed:
                    return
                if self._pending:
                    self._pending.append(memoryview(data))
                else:
                    try:
                        n = self.sock.send(data, _MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        n = 0
                    except OSError:
                        self._fail()
                        return
                    if n == len(data):
                        return
                    self._pending.append(memoryview(data)[n:])
            self._flusher.add(self)
            return
        parts = [memoryview(HEADER.pack(len(body))), memoryview(body)]
        with self._lock:
            if self.closed:
                return
            self._pending.extend(parts)
            if len(self._pending) == len(parts) and self._write_some():
                return
        self._flusher.add(self)

    def _write_some(self) -> bool:
        """(lock held) Write what the socket takes; True once nothing is left
        (sent, or the peer is gone)."""
        pending = self._pending
        while pending:
            try:
                if len(pending) == 1:
                    n = self.sock.send(pending[0], _MSG_DONTWAIT)
                else:
                    n = self.sock.sendmsg(list(pending)[:64], [], _MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self._fail()
                return True
            while n and pending:
                head = pending[0]
                if n >= len(head):
                    n -= len(head)
                    pending.popleft()
                else:
                    pending[0] = head[n:]
                    n = 0
        self._drained.notify_all()
        return True

    def flush(self) -> bool:
        """Called by the flusher when the socket is writable."""
        with self._lock:
            if self.closed:
                return True
            return self._write_some()

    def wait_drained(self) -> None:
        """Block (this connection's serving thread only) until every reply is out."""
        if not self._pending:
            return
        with self._lock:
            while self._pending and not self.closed:
                self._drained.wait()

    # ------------------------------------------------------------- ending
    def _fail(self) -> None:
        """(lock held) The peer is gone: drop what was queued, wake the reader."""
        self.closed = True
        self._pending.clear()
        self._drained.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._pending.clear()
            self._drained.notify_all()
            self.sock.close()
        if self._on_close is not None:
            self._on_close()


class Flusher:
    """One thread that finishes the replies their sender could not finish."""

    def __init__(self) -> None:
        self._conns: Set[PeerConnection] = set()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopped = False

    def add(self, conn: PeerConnection) -> None:
        with self._lock:
            self._conns.add(conn)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or stopping

    def stop(self) -> None:
        self._stopped = True
        self._wake()

    def run(self) -> None:
        try:
            while not self._stopped:
                with self._lock:
                    waiting = list(self._conns)
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                conns = {}
                for conn in waiting:  # closed ones first: their fd may be reused by a live one
                    if conn.closed:
                        self._done(conn)
                    else:
                        conns[conn.fd] = conn
                        poller.register(conn.fd, select.POLLOUT)
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif fd in conns and conns[fd].flush():
                        self._done(conns[fd])
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _done(self, conn: PeerConnection) -> None:
        with self._lock:
            self._conns.discard(conn)
