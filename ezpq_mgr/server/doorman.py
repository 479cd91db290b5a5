"""The door of a server: accept connections and authenticate them, on one
thread, without ever blocking on a peer.

The stdlib's manager ran the HMAC challenge on a thread per connection with
no deadline: idle strangers (no key needed) held a thread and a descriptor
each until the server ran out of both, and then its accept loop spun on
EMFILE. Here one thread accepts and runs every handshake with non-blocking
sockets and a selector; a peer that has not authenticated within
``AUTH_TIMEOUT`` is closed; one uid (or TCP host) holds at most
``max_per_peer`` connections (the server's owner and root are not capped);
running out of descriptors pauses accepting, with growing pauses, instead
of spinning. Only an authenticated peer gets a serving thread.

Refusals are logged (uid over the Unix socket, address over TCP) through a
rate limit: a peer must not be able to fill the disk with our log.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict

from .. import transport
from .callers import Identity, owner, user_name
from .ratelimit import RateLimitedLog

__all__ = ["Doorman", "MAX_PER_PEER"]

logger = logging.getLogger(__name__)

MAX_PER_PEER = 256
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_CREDS = struct.Struct("3i")


class _Pending:
    __slots__ = ("sock", "who", "key", "identity", "nonce", "deadline", "buf")

    def __init__(self, sock, who, key, identity, nonce, deadline):
        self.sock, self.who, self.key, self.identity = sock, who, key, identity
        self.nonce, self.deadline, self.buf = nonce, deadline, b""


class Doorman:
    """Accepts on ``listener`` and hands each authenticated socket (made
    blocking) to ``admit(sock, identity, release)``; ``release()`` must be
    called once that connection is closed (it frees the peer's slot)."""

    def __init__(self, listener: socket.socket, authkey: bytes,
                 admit: Callable[[socket.socket, Identity, Callable[[], None]], None],
                 info: Dict[str, Any], allow_other_users: bool = False,
                 max_per_peer: int = MAX_PER_PEER, auth_timeout: float = transport.AUTH_TIMEOUT):
        self.listener = listener
        self.unix = listener.family == socket.AF_UNIX
        self._key = bytes(authkey)
        self._admit = admit
        self._info = info
        me = owner()
        # a non-root server cannot switch users: it would run everyone's jobs as itself
        self._only_uid = None if (me.uid == 0 or allow_other_users) else me.uid
        self._max_per_peer = max_per_peer
        self._auth_timeout = auth_timeout
        self._open: Dict[Any, int] = {}
        self._lock = threading.Lock()
        self._pending: Dict[int, _Pending] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopped = False
        self._paused_until = 0.0
        self._pause = 0.05
        self.log = RateLimitedLog(logger)

    # ------------------------------------------------------------ control
    def stop(self) -> None:
        self._stopped = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def open_connections(self, key: Any) -> int:
        with self._lock:
            return self._open.get(key, 0)

    # --------------------------------------------------------------- loop
    def run(self) -> None:
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopped:
                self._sel_timeout_loop()
        finally:
            for p in list(self._pending.values()):
                self._drop(p)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _sel_timeout_loop(self) -> None:
        now = time.monotonic()
        deadlines = [p.deadline for p in self._pending.values()]
        if self._paused_until:
            deadlines.append(self._paused_until)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                self._accept_some()
            elif key.data == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            else:
                self._on_readable(key.data)
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            self.log(logging.WARNING, "closed a connection from %s: not authenticated within %.0f s",
                     p.who, self._auth_timeout)
            self._drop(p)
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._sel.register(self.listener, selectors.EVENT_READ, None)

    def _accept_some(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                self._pause = 0.05
                return
            except OSError as exc:
                if self._stopped:
                    return
                if exc.errno in _OUT_OF_FDS:
                    # the backlog keeps the waiting peers; retry once some leave
                    self.log(logging.ERROR, "cannot accept connections: %s; pausing %.2f s",
                             os.strerror(exc.errno), self._pause)
                    self._sel.unregister(self.listener)
                    self._paused_until = time.monotonic() + self._pause
                    self._pause = min(self._pause * 2, 2.0)
                    return
                self.log(logging.WARNING, "accept failed: %s", exc)
                continue
            self._greet(sock, addr)

    # ------------------------------------------------------------ a peer
    def _greet(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        if self.unix:
            try:
                _pid, uid, gid = _CREDS.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
            except OSError:
                sock.close()
                return
            name = user_name(uid)
            identity = Identity(uid, gid, name, uid == 0 or uid == os.getuid())
            who, key = f"uid {uid} ({name})", uid
            capped = not identity.privileged
        else:
            identity = owner()  # TCP: any key holder acts as the owner
            host = addr[0] if isinstance(addr, tuple) else str(addr)
            who, key, capped = f"{host}:{addr[1]}" if isinstance(addr, tuple) else host, host, True
        if self._only_uid is not None and self.unix and identity.uid != self._only_uid:
            text = f"this server runs as {owner().user} and cannot run jobs as {identity.user}"
            self._refuse(sock, who, text)
            return
        with self._lock:
            n = self._open.get(key, 0)
            if capped and n >= self._max_per_peer:
                refused = True
            else:
                refused = False
                self._open[key] = n + 1
        if refused:
            self._refuse(sock, who, f"too many connections from one user (limit {self._max_per_peer})")
            return
        nonce, hello = transport.challenge()
        p = _Pending(sock, who, key, identity, nonce, time.monotonic() + self._auth_timeout)
        try:
            sock.send(hello)  # tiny: fits any fresh socket's buffer
            self._sel.register(sock, selectors.EVENT_READ, p)
        except OSError:
            self._drop(p)
            return
        self._pending[sock.fileno()] = p

    def _on_readable(self, p: _Pending) -> None:
        try:
            chunk = p.sock.recv(transport.HANDSHAKE_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(p)
            return
        p.buf += chunk
        if len(p.buf) < transport.HEADER.size:
            return
        size = transport.HEADER.unpack_from(p.buf)[0]
        if size != transport.ANSWER_SIZE:
            self._refuse_pending(p, "not an ezpq client")
            return
        if len(p.buf) < transport.HEADER.size + size:
            return
        body = p.buf[transport.HEADER.size:transport.HEADER.size + size]
        client_nonce = transport.check_answer(self._key, p.nonce, body)
        if client_nonce is None or len(p.buf) != transport.HEADER.size + size:
            self._refuse_pending(p, transport.WRONG_KEY)
            return
        self._unwatch(p)
        sock = p.sock
        try:
            sock.send(transport.welcome(self._key, client_nonce, self._info))
            sock.setblocking(True)
        except OSError:
            self._release(p.key)
            sock.close()
            return
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                self._release(p.key)
        try:
            self._admit(sock, p.identity, release)
        except Exception as exc:  # e.g. no thread can be started: the peer is turned away
            self.log(logging.ERROR, "could not serve a connection from %s: %s", p.who, exc)
            release()
            sock.close()

    # ----------------------------------------------------------- endings
    def _refuse(self, sock: socket.socket, who: str, text: str) -> None:
        self.log(logging.WARNING, "refused a connection from %s: %s", who, text)
        try:
            sock.send(transport.refusal(text))
        except OSError:
            pass
        sock.close()

    def _refuse_pending(self, p: _Pending, text: str) -> None:
        self._unwatch(p)
        self._release(p.key)
        self._refuse(p.sock, p.who, text)

    def _unwatch(self, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, p: _Pending) -> None:
        self._unwatch(p)
        self._release(p.key)
        p.sock.close()

    def _release(self, key: Any) -> None:
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)
