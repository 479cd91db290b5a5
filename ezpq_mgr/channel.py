"""Messages on a ``multiprocessing`` Connection, with fewer syscalls and no
ForkingPickler.

``Connection.send`` pickles through ``ForkingPickler``, which copies the
copyreg dispatch table on every message (~1.3 us, more than pickling a small
message itself), and ``Connection.recv`` reads the 4-byte length and the
body with two syscalls (each ~5 us here, GIL release included). Our hot
messages (jobs to workers, results back, requests and replies between
clients and the server) are plain data, and every one of our connections
carries at most one message at a time in each direction (a request waits for
its reply), so ``recv`` reads header and body in one go. A second message
arriving early would break that rule: it is reported as an error, never
silently dropped. Wrapped connections (the JSON serializer of shared
servers) keep their own ``send``/``recv``.

Workers do not use this module: what a worker sends may have been written
by its job, so their channel is ``workerproto`` (no pickle, non-blocking).
"""

from __future__ import annotations

import os
import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any, Optional, Tuple

__all__ = ["send", "recv"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_CHUNK = 65536
_SIZE = struct.Struct("!i")
_BIG_SIZE = struct.Struct("!Q")


def send(conn: Any, obj: Any) -> None:
    if type(conn) is Connection:
        conn.send_bytes(pickle.dumps(obj, _PROTOCOL))
    else:
        conn.send(obj)


def _read(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    if not data:
        raise EOFError
    return data


def _at_least(fd: int, data: bytes, n: int) -> bytes:
    while len(data) < n:
        data += _read(fd, n - len(data))
    return data


def _bounds(buf: bytes) -> Optional[Tuple[int, int]]:
    """(start, end) of the first message in ``buf``; None while its header is incomplete."""
    if len(buf) < 4:
        return None
    size = _SIZE.unpack_from(buf)[0]
    if size != -1:
        return 4, 4 + size
    if len(buf) < 12:  # Connection's framing of messages over 2 GiB
        return None
    return 12, 12 + _BIG_SIZE.unpack_from(buf, 4)[0]


def _first(fd: int, buf: bytes) -> Tuple[bytes, int, int]:
    """``buf`` read on (blocking) until its first message is whole: (buf, start, end)."""
    buf = _at_least(fd, buf, 4)
    if _SIZE.unpack_from(buf)[0] == -1:
        buf = _at_least(fd, buf, 12)
    start, end = _bounds(buf)
    if len(buf) < end:
        parts, have = [buf], len(buf)
        while have < end:
            chunk = _read(fd, min(end - have, 1 << 20))
            parts.append(chunk)
            have += len(chunk)
        buf = b"".join(parts)
    return buf, start, end


def recv(conn: Any) -> Any:
    """One message, in (usually) one read."""
    if type(conn) is not Connection:
        return conn.recv()
    fd = conn.fileno()
    buf, start, end = _first(fd, _read(fd, _CHUNK))
    if len(buf) > end:
        raise OSError("ezpq protocol error: a second message arrived before the first was answered")
    return pickle.loads(memoryview(buf)[start:end])
