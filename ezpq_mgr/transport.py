"""The byte-level protocol between a client and a server: frames and the handshake.

Every message is a frame: an 8-byte big-endian length, then that many bytes
(JSON on a shared server, pickle on a client's private one). A connection
begins with a mutual HMAC handshake that a server can run without blocking
(``doorman.py`` runs all of them on one thread, with a deadline):

1. server, ``Challenge``: ``EZPQ/1 `` + 32 random bytes (its nonce); or
   ``Refusal``: ``NO `` + one line saying why this peer is refused (another
   user on a non-root server, too many connections)
2. client, ``Answer``: ``EZPQ/1 `` + HMAC-SHA256(key, "client:" + server
   nonce) + its own nonce
3. server, ``Welcome``: ``OK `` + HMAC-SHA256(key, "server:" + client nonce)
   + JSON of the server's limits (``max_message``); or ``Refusal``: ``NO
   wrong authkey``

Each message is a record of ``messages.py``; its first bytes name it (the
answer's fixed size is checked, never used to tell messages apart). Then
the client sends ``Request`` frames and the server answers each with a
``Reply``.

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
from .messages import Answer, Challenge, Refusal, Welcome

__all__ = ["HEADER", "MAGIC", "frame", "recv_frame", "connect", "listen", "challenge",
           "check_answer", "welcome", "refusal", "encode_handshake", "parse_greeting", "parse_answer",
           "parse_welcome", "DEFAULT_MAX_MESSAGE", "CONNECT_TIMEOUT",
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


# ------------------------------------------------------------ the handshake's bytes
_OK, _NO = b"OK ", b"NO "


def encode_handshake(msg: Any) -> bytes:
    """The frame of a ``Challenge``, ``Answer``, ``Welcome`` or ``Refusal``."""
    kind = type(msg)
    if kind is Challenge:
        return frame(MAGIC + msg.nonce)
    if kind is Answer:
        return frame(MAGIC + msg.digest + msg.nonce)
    if kind is Welcome:
        return frame(_OK + msg.digest + json.dumps(msg.limits).encode())
    if kind is Refusal:
        return frame(_NO + msg.why.encode())
    raise TypeError(f"not a handshake message: {kind.__name__}")


def parse_greeting(body: bytes) -> Union[Challenge, Refusal]:
    """The server's first frame (client side)."""
    if body.startswith(_NO):
        return Refusal(body[3:].decode(errors="replace"))
    if not body.startswith(MAGIC) or len(body) != len(MAGIC) + NONCE:
        raise ConnectionError("not an ezpq server (unknown greeting)")
    return Challenge(body[len(MAGIC):])


def parse_answer(body: bytes) -> Optional[Answer]:
    """The client's answer (server side); None: not one."""
    if len(body) != ANSWER_SIZE or not body.startswith(MAGIC):
        return None
    return Answer(body[len(MAGIC):len(MAGIC) + DIGEST], body[len(MAGIC) + DIGEST:])


def parse_welcome(body: bytes) -> Union[Welcome, Refusal]:
    """The server's second frame (client side); its digest is not checked here."""
    if body.startswith(_NO):
        return Refusal(body[3:].decode(errors="replace"))
    if not body.startswith(_OK) or len(body) < len(_OK) + DIGEST:
        raise AuthenticationError("the server does not know our authkey")
    return Welcome(body[3:3 + DIGEST], json.loads(body[3 + DIGEST:] or b"{}"))


# ------------------------------------------------------------ server side
def challenge() -> Tuple[bytes, bytes]:
    """(nonce, the frame of its ``Challenge``)."""
    nonce = os.urandom(NONCE)
    return nonce, encode_handshake(Challenge(nonce))


def check_answer(key: bytes, nonce: bytes, body: bytes) -> Optional[bytes]:
    """The client's nonce if ``body`` is an ``Answer`` that proves it holds ``key``, else None."""
    answer = parse_answer(body)
    if answer is None or not hmac.compare_digest(answer.digest, _mac(key, b"client:", nonce)):
        return None
    return answer.nonce


def welcome(key: bytes, client_nonce: bytes, info: Dict[str, Any]) -> bytes:
    """The frame of the ``Welcome`` for a client that proved the key."""
    return encode_handshake(Welcome(_mac(key, b"server:", client_nonce), info))


def refusal(text: str) -> bytes:
    """The frame of a ``Refusal`` (a fixed text: nothing computed from the peer's bytes)."""
    return encode_handshake(Refusal(text))


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
            greeting = parse_greeting(recv_frame(sock, HANDSHAKE_LIMIT))
            if type(greeting) is Refusal:
                raise Refused(greeting.why)
            mine = os.urandom(NONCE)
            sock.sendall(encode_handshake(Answer(_mac(authkey, b"client:", greeting.nonce), mine)))
            reply = parse_welcome(recv_frame(sock, HANDSHAKE_LIMIT))
        except socket.timeout:
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        except EOFError:
            raise ConnectionError("the server closed the connection during the handshake") from None
        if type(reply) is Refusal:
            if reply.why == WRONG_KEY:
                raise AuthenticationError("the server refused the authkey")
            raise Refused(reply.why)
        if not hmac.compare_digest(reply.digest, _mac(authkey, b"server:", mine)):
            raise AuthenticationError("the server does not know our authkey")
        sock.settimeout(None)
        return sock, reply.limits
    except BaseException:
        sock.close()
        raise
