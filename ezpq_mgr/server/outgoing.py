"""A server's side of one client connection: bounded reads, sends that never block.

A reply may be sent by a thread that serves many clients (the supervisor
answering a parked ``get(wait=True)``). A client that stops reading (Ctrl-Z)
must stall nobody but itself, so every send is a non-blocking attempt: a
reply that fits in the socket buffer (the common case) leaves at once,
from the thread that made it, with no hand-off; the rest waits in this
connection's queue and the ``Flusher`` thread writes it as the client reads.
The connection's serving thread reads its next request only once that queue
is empty, so at most one reply per connection is ever held in memory. What
a user's connections hold that way, queued and not yet taken by their
sockets, counts in her ``--max-user-bytes`` (``UnsentBytes``): results she
has been handed but never reads cannot grow the server past her share.

Reads are the serving thread's own (blocking, on its own connection): a frame
longer than ``max_message`` is read and thrown away in fixed chunks, never
buffered, and answered with an error. A frame's buffer grows with the bytes
that came, never from its header's word alone (16 connections that each sent
a 64 MiB header and then nothing held 1 GiB of the server), and a message
begun must keep coming: a peer that sent part of one and then nothing for
``READ_TIMEOUT`` s is dropped and its buffer freed. Between messages a
connection may stay idle for as long as it likes.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
from typing import Any, Callable, Deque, Dict, Optional, Set

from .ratelimit import RateLimitedLog
from .callers import Identity
from ..transport import HEADER, describe_size

__all__ = ["PeerConnection", "Flusher", "UnsentBytes", "MessageTooLarge", "ReadTimeout", "READ_TIMEOUT"]

logger = logging.getLogger(__name__)

#: Seconds a message begun may go without a byte before its connection is
#: dropped: long enough for a client paused by a loaded machine, short
#: enough that stalled messages cannot pile up (the doorman's per-uid cap
#: bounds how many one user holds meanwhile).
READ_TIMEOUT = 30.0
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_FIRST_READ = 65536
_CHUNK = 1 << 20      # the rest of a large message is read through this much scratch
_DISCARD = 1 << 20
_JOIN_BELOW = 65536   # smaller replies are sent as one buffer
_log = RateLimitedLog(logger)   # a peer decides how often we would log


class MessageTooLarge(Exception):
    """A request over the server's limit (already discarded from the stream)."""


class ReadTimeout(EOFError):
    """A peer began a message and stopped sending it (already logged): the
    connection ends as if the peer had gone."""


class UnsentBytes:
    """Per user, the bytes of replies queued for its connections that their
    sockets have not taken yet: what a user holds in the server besides its
    jobs. A shared server counts them in the user's ``--max-user-bytes``:
    a collected result leaves its job's count, and a client that asks and
    never reads would otherwise have the server hold any number of them
    (40 collected 8 MB outputs, never read, grew it by 1 GB past a 16 MiB
    cap). Only replies the socket could not take at once are counted, and
    as the payload they carry (``of``): collecting her results moves them
    from her jobs' count to this one, hardly changing her total."""

    def __init__(self) -> None:
        self._by_uid: Dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, uid: int, n: int) -> None:
        with self._lock:
            left = self._by_uid.get(uid, 0) + n
            if left:
                self._by_uid[uid] = left
            else:
                del self._by_uid[uid]

    def of(self, uid: int) -> int:
        """The payload bytes of what is queued for ``uid``'s connections and
        not yet sent: 3/4 of them (a shared server's JSON carries bytes in
        base64, 4/3 of their size)."""
        return self._by_uid.get(uid, 0) * 3 // 4


class PeerConnection:
    """One authenticated client connection, as the server sees it."""

    def __init__(self, sock: socket.socket, identity: Identity, dumps: Callable[[Any], bytes],
                 flusher: "Flusher", max_message: Optional[int] = None,
                 on_close: Optional[Callable[[], None]] = None, unsent: Optional[UnsentBytes] = None):
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
        self._unsent = unsent   # the users' tally of unsent bytes (None: not kept)
        self._queued = 0        # what this connection counts in it
        self._poller: Optional[select.poll] = None
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
        oversize one, whose bytes were dropped as they came; ``ReadTimeout``
        when the peer stopped in the middle of one.

        Waiting for a request has no deadline; once its first bytes came,
        every further read must get some within ``READ_TIMEOUT``. A request
        that came whole in the first read (the common case) costs one recv."""
        buf = self._rbuf or self._recv(_FIRST_READ)
        while len(buf) < HEADER.size:
            buf += self._recv_begun(_FIRST_READ, len(buf), None)
        size = HEADER.unpack_from(buf)[0]
        end = HEADER.size + size
        if self.max_message is not None and size > self.max_message:
            self._rbuf = b""
            self._discard(size, size - (len(buf) - HEADER.size), buf[end:] if len(buf) > end else b"")
            raise MessageTooLarge(
                f"a message of {describe_size(size)} is over this server's limit of "
                f"{describe_size(self.max_message)} (ezpq-server --max-message)")
        if len(buf) >= end:
            self._rbuf = buf[end:]
            return buf[HEADER.size:end]
        self._rbuf = b""
        return self._read_rest(size, buf[HEADER.size:])

    def _read_rest(self, size: int, head: bytes) -> bytes:
        """The rest of a ``size``-byte body whose ``head`` came: the buffer
        grows by what each read brings (bytearray appends over-allocate, so
        the copies are amortized), never ahead of it; so does the scratch
        it is read through (64 KiB, doubled by each read that fills it)."""
        body = bytearray(head)
        scratch = memoryview(bytearray(min(size - len(body), _FIRST_READ)))
        while len(body) < size:
            k = self._recv_begun_into(scratch, min(size - len(body), len(scratch)), len(body), size)
            body += scratch[:k]
            if k == len(scratch) < _CHUNK and len(body) < size:
                scratch = memoryview(bytearray(min(2 * k, _CHUNK, size - len(body))))
        return bytes(body) if size < _JOIN_BELOW else body

    def _wait_begun(self, have: int, size: Optional[int]) -> None:
        """A message is begun (``have`` bytes of its body, or of its header
        when ``size`` is None): wait for more, at most ``READ_TIMEOUT`` s."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        if self._poller.poll(READ_TIMEOUT * 1000):
            return
        what = "a message header" if size is None else f"a message of {describe_size(size)}"
        _log(logging.WARNING, "closed a connection from uid %d (%s): %s begun (%d bytes came), "
             "then nothing for %.0f s", self.identity.uid, self.identity.user, what, have, READ_TIMEOUT)
        raise ReadTimeout(f"nothing for {READ_TIMEOUT:g} s in the middle of a message")

    def _recv_begun(self, n: int, have: int, size: Optional[int]) -> bytes:
        """Up to ``n`` bytes of a message begun (see ``_wait_begun``)."""
        try:
            if _MSG_DONTWAIT:
                data = self.sock.recv(n, _MSG_DONTWAIT)
            else:
                raise BlockingIOError
        except (BlockingIOError, InterruptedError):
            self._wait_begun(have, size)
            data = self.sock.recv(n)
        if not data:
            raise EOFError
        return data

    def _recv_begun_into(self, view: memoryview, n: int, have: int, size: int) -> int:
        """``_recv_begun`` into ``view``; how many bytes came."""
        try:
            if _MSG_DONTWAIT:
                k = self.sock.recv_into(view, n, _MSG_DONTWAIT)
            else:
                raise BlockingIOError
        except (BlockingIOError, InterruptedError):
            self._wait_begun(have, size)
            k = self.sock.recv_into(view, n)
        if not k:
            raise EOFError
        return k

    def _discard(self, size: int, left: int, extra: bytes) -> None:
        if left <= 0:
            self._rbuf = extra
            return
        scratch = memoryview(bytearray(min(left, _FIRST_READ)))
        while left > 0:
            k = self._recv_begun_into(scratch, min(left, len(scratch)), size - left, size)
            left -= k
            if k == len(scratch) < _DISCARD:
                scratch = memoryview(bytearray(min(2 * k, _DISCARD)))

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
                self._count_queued()
            self._flusher.add(self)
            return
        parts = [memoryview(HEADER.pack(len(body))), memoryview(body)]
        with self._lock:
            if self.closed:
                return
            self._pending.extend(parts)
            done = len(self._pending) == len(parts) and self._write_some()
            self._count_queued()
            if done:
                return
        self._flusher.add(self)

    def _count_queued(self) -> None:
        """(lock held) Tell the users' tally what this connection now holds
        unsent (its queue is a reply's few buffers: summed, not tracked)."""
        if self._unsent is not None:
            now = sum(map(len, self._pending))
            if now != self._queued:
                self._unsent.add(self.identity.uid, now - self._queued)
                self._queued = now

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
            done = self._write_some()
            self._count_queued()
            return done

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
        self._drop_queued()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _drop_queued(self) -> None:
        """(lock held) Closed: what was queued is dropped (and leaves its
        user's tally), and whoever waits for it to drain is woken."""
        self.closed = True
        self._pending.clear()
        self._count_queued()
        self._drained.notify_all()

    def close(self) -> None:
        with self._lock:
            self._drop_queued()
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
