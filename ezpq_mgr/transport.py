"""The byte-level protocol between a client and a server: frames and the handshake.

Every message is a frame: an 8-byte big-endian length, then that many bytes
(JSON on a shared server, pickle on a client's private one). A connection
begins with a mutual HMAC handshake that a server can run without blocking
(``doorman.py`` runs all of them on one thread, with a deadline):

1. server: ``EZPQ/1 `` + 32 random bytes (its nonce); or ``NO `` + one line
   saying why this peer is refused (another user on a non-root server,
   too many connections)
2. client: ``EZPQ/1 `` + HMAC-SHA256(key, "client:" + server nonce) + its own nonce
3. server: ``OK `` + HMAC-SHA256(key, "server:" + client nonce) + JSON of
   the server's limits (``max_message``); or ``NO wrong authkey``

The refusal texts are fixed strings: a peer that has not proven the key is
never sent a traceback, a path or anything the server computed from its bytes.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from typing import Any, Dict, Optional, Tuple, Union

from .errors import AuthenticationError, ConnectionError

__all__ = ["HEADER", "MAGIC", "frame", "recv_frame", "connect", "listen", "challenge",
           "check_answer", "welcome", "refusal", "DEFAULT_MAX_MESSAGE", "CONNECT_TIMEOUT",
           "AUTH_TIMEOUT", "BACKLOG", "Refused", "describe_size"]

HEADER = struct.Struct("!Q")
MAGIC = b"EZPQ/1 "
NONCE = 32
DIGEST = 32
ANSWER_SIZE = len(MAGIC) + DIGEST + NONCE
HANDSHAKE_LIMIT = 4096          # no handshake frame is longer
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024
CONNECT_TIMEOUT = 10.0          # the client gives up on a server that does not answer
AUTH_TIMEOUT = 5.0              # the server closes a peer that has not authenticated
BACKLOG = 512                   # 50 clients connecting at once must all get in
WRONG_KEY = "wrong authkey"
Address = Union[str, Tuple[str, int]]


class Refused(ConnectionError):
    """The server refused this peer before or after the key was checked."""


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def describe_size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: Optional[int] = None) -> bytes:
    """One frame, blocking (a client, or a test); ``limit`` guards handshakes."""
    size = HEADER.unpack(recv_exact(sock, HEADER.size))[0]
    if limit is not None and size > limit:
        raise ConnectionError(f"not an ezpq server: a {size}-byte handshake frame")
    return recv_exact(sock, size)


def _mac(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()


# ------------------------------------------------------------ server side
def challenge() -> Tuple[bytes, bytes]:
    """(nonce, the frame that sends it)."""
    nonce = os.urandom(NONCE)
    return nonce, frame(MAGIC + nonce)


def check_answer(key: bytes, nonce: bytes, body: bytes) -> Optional[bytes]:
    """The client's nonce if ``body`` proves it holds ``key``, else None."""
    if len(body) != ANSWER_SIZE or not body.startswith(MAGIC):
        return None
    digest = body[len(MAGIC):len(MAGIC) + DIGEST]
    if not hmac.compare_digest(digest, _mac(key, b"client:", nonce)):
        return None
    return body[len(MAGIC) + DIGEST:]


def welcome(key: bytes, client_nonce: bytes, info: Dict[str, Any]) -> bytes:
    return frame(b"OK " + _mac(key, b"server:", client_nonce) + json.dumps(info).encode())


def refusal(text: str) -> bytes:
    return frame(b"NO " + text.encode())


def listen(address: Address) -> socket.socket:
    """A listening socket (a Unix socket is created mode 0600; the caller
    opens it up once the server is ready)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
    else:
        infos = socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM)
        family = infos[0][0] if infos else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    sock.listen(max(BACKLOG, getattr(socket, "SOMAXCONN", 128)))
    return sock


# ------------------------------------------------------------ client side
def _open(address: Address, deadline: float, timeout: float) -> socket.socket:
    """Connect; a Unix socket whose backlog is momentarily full (EAGAIN) is
    retried until the deadline instead of failing at once."""
    delay = 0.005
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {timeout:g} s")
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(left)
            try:
                sock.connect(address)
                return sock
            except (BlockingIOError, InterruptedError):
                sock.close()
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.EAGAIN, errno.EINTR):
                    raise
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)
        else:
            sock = socket.create_connection(address, timeout=left)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock


def connect(address: Address, authkey: bytes,
            timeout: Optional[float] = None) -> Tuple[socket.socket, Dict[str, Any]]:
    """A connected, authenticated (blocking) socket and the server's limits.

    Raises ``AuthenticationError`` for a wrong key (either side's),
    ``Refused`` when the server will not serve us, ``TimeoutError`` when it
    does not answer within ``timeout`` (default ``CONNECT_TIMEOUT``),
    ``OSError`` when nothing listens."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    sock = _open(address, deadline, timeout)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            first = recv_frame(sock, HANDSHAKE_LIMIT)
            if first.startswith(b"NO "):
                raise Refused(first[3:].decode(errors="replace"))
            if not first.startswith(MAGIC) or len(first) != len(MAGIC) + NONCE:
                raise ConnectionError("not an ezpq server (unknown greeting)")
            mine = os.urandom(NONCE)
            sock.sendall(frame(MAGIC + _mac(authkey, b"client:", first[len(MAGIC):]) + mine))
            reply = recv_frame(sock, HANDSHAKE_LIMIT)
        except socket.timeout:
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        except EOFError:
            raise ConnectionError("the server closed the connection during the handshake") from None
        if reply.startswith(b"NO "):
            text = reply[3:].decode(errors="replace")
            if text == WRONG_KEY:
                raise AuthenticationError("the server refused the authkey")
            raise Refused(text)
        if not reply.startswith(b"OK ") or not hmac.compare_digest(
                reply[3:3 + DIGEST], _mac(authkey, b"server:", mine)):
            raise AuthenticationError("the server does not know our authkey")
        info = json.loads(reply[3 + DIGEST:] or b"{}")
        sock.settimeout(None)
        return sock, info
    except BaseException:
        sock.close()
        raise
