"""The worker channel's bytes: a small versioned format for the named
messages of ``messages.py`` (Ready, RunJob, Result, LateFigures, Stop).

A worker runs untrusted code (the job) in the same process that talks to
the server, so anything a worker sends may have been written by the job.
The server therefore never unpickles what a worker sends: every message is
a fixed ``struct`` of plain fields plus length-prefixed opaque byte strings
(the job's output pickle is carried as-is, and only the submitter's own
client unpickles it). The same format is used on every server, root or
not, shared or embedded, so there is one parser to get right.

Frame: ``HEADER`` = version (1 byte), kind (1 byte), two zero bytes, body
length (4 bytes, big-endian), then the body. The kind byte names the
message (never its length). Worker to server:

- ``READY`` (``Ready``): booted and waiting for a job (empty body).
- ``RESULT`` (``Result``): the job's status, exit code, start and end
  times, a flags byte (1: ``FIGS`` follow in this message; 2, only with 1:
  the worker leaves after this job), then two blobs: output pickle,
  exception text.
- ``FIGURES`` (``LateFigures``): ``FIGS`` of the job whose result was sent
  last (measured after the result went out, see meter.py); its ``present``
  bit 8 says the worker leaves after this job.

A worker "leaves" (of another user's: threads the job started are still
there, see run.py) by saying so in the message that ends the job, and
then exits without reading anything: the server may already have written
the next job to it, and knows from the flag that this job never started.

Server to worker: ``JOB`` (``RunJob``: flags, function pickle, arguments
pickle, and the client's environment as JSON when it changed) and ``STOP``
(``Stop``). The encoders take a message's fields in its record's order
(``encode_result(*result)``), so the hot path builds no record to send one;
the decoders return the records.

A result names no job: the server knows which job it gave to which worker
and believes nothing else. ``FrameReader`` checks every header (version,
kind, reserved bytes, size against ``max_message``) before it waits for a
body, and decodes bodies strictly (exact length, known codes, finite
numbers): any deviation raises ``ProtocolError``, which ends the worker.

Cost (timeit on the 2-core test VM, a no-op job's messages): encode and
decode of its RESULT then FIGURES ~1.95 us, of its JOB ~0.8 us; pickling
and unpickling the tuples this replaces took ~1.1 us and ~0.4 us. So about
1.2 us a job more, of a no-op job's ~80 us round trip; the price of never
unpickling a worker's bytes and of checking every field.
"""

from __future__ import annotations

import json
import math
import struct
from typing import List, Optional, Tuple

from ..messages import NO_FIGURES, Env, Figures, LateFigures, Ready, Result, RunJob, Stop

__all__ = ["VERSION", "READY", "JOB", "RESULT", "FIGURES", "STOP", "ProtocolError",
           "FrameReader", "encode_ready", "encode_stop", "encode_job", "decode_job",
           "encode_result", "encode_figures", "DEFAULT_MAX_MESSAGE", "HEADER", "NO_FIGURES"]

#: How a job's ``exception`` starts when its worker could not load its
#: function; the client prints such an error once per function, not per job.
CANNOT_LOAD = "the worker cannot load this job's function"

VERSION = 1
READY, JOB, RESULT, FIGURES, STOP = 1, 2, 3, 4, 5
#: The record (messages.py) each kind of frame carries.
RECORDS = {READY: Ready, JOB: RunJob, RESULT: Result, FIGURES: LateFigures, STOP: Stop}
DEFAULT_MAX_MESSAGE = 256 << 20

HEADER = struct.Struct("!BBHI")
_LEN = struct.Struct("!I")
_NONE = 0xFFFFFFFF
#: status code, exit code, started, ended, flags (1 figures in this message, 2 the worker leaves)
_RES = struct.Struct("!Biddb")
#: present bits (1 cpu, 2 rss, 4 rss of children; 8 the worker leaves after
#: this job), cpu user, cpu system, rss, rss children, method
_FIGS = struct.Struct("!BddqqB")
_JOBFLAGS = struct.Struct("!B")

STATUSES = ("completed", "failed")
_STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}
METHODS = (None, "vmhwm", "sampled")
_METHOD_CODE = {m: i for i, m in enumerate(METHODS)}


class ProtocolError(Exception):
    """A worker sent something the format does not allow."""


_READY = HEADER.pack(VERSION, READY, 0, 0)
_STOP = HEADER.pack(VERSION, STOP, 0, 0)


def encode_ready() -> bytes:
    return _READY


def encode_stop() -> bytes:
    return _STOP


# ------------------------------------------------------------ worker -> server
def _pack_figures(fig: Figures) -> bytes:
    cu, cs, rss, method, rch = fig
    present = (1 if cu is not None else 0) | (2 if rss is not None else 0) | (4 if rch is not None else 0)
    return _FIGS.pack(present, cu or 0.0, cs or 0.0, rss or 0, rch or 0, _METHOD_CODE.get(method, 0))


_RESULT_HEAD = struct.Struct("!BBHI" + _RES.format[1:])
_FIGURES_FRAME = struct.Struct("!BBHI" + _FIGS.format[1:])
_NONE_LEN = _LEN.pack(_NONE)


def encode_result(status: str, exitcode: int, started: float, ended: float,
                  out: Optional[bytes], exc: Optional[str], figures: Optional[Figures],
                  leaving: bool = False) -> bytes:
    """A ``Result``, from its fields; ``figures`` None: a ``LateFigures``
    follows (and says whether the worker leaves); else ``leaving`` says it."""
    e = None if exc is None else exc.encode("utf-8", "replace")
    size = _RES.size + 8 + (0 if out is None else len(out)) + (0 if e is None else len(e))
    if figures is not None:
        size += _FIGS.size
    head = _RESULT_HEAD.pack(VERSION, RESULT, 0, size, _STATUS_CODE[status], exitcode, started, ended,
                             0 if figures is None else (3 if leaving else 1))
    return b"".join((head, b"" if figures is None else _pack_figures(figures),
                     _NONE_LEN if out is None else _LEN.pack(len(out)), out or b"",
                     _NONE_LEN if e is None else _LEN.pack(len(e)), e or b""))


def encode_figures(figures: Figures, leaving: bool = False) -> bytes:
    """A ``LateFigures``, from its fields."""
    cu, cs, rss, method, rch = figures
    present = ((1 if cu is not None else 0) | (2 if rss is not None else 0) | (4 if rch is not None else 0)
               | (8 if leaving else 0))
    return _FIGURES_FRAME.pack(VERSION, FIGURES, 0, _FIGS.size, present, cu or 0.0, cs or 0.0, rss or 0,
                               rch or 0, _METHOD_CODE.get(method, 0))


def _finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise ProtocolError(f"{what} is not a finite number")
    return x


_isfinite = math.isfinite
_new = tuple.__new__   # a record from its fields' tuple: the cheapest way to name them
_LATEST = 1e11   # seconds since 1970 (year 5138): any real clock is below, NaN is not


def _unpack_figures(data, pos: int, _unpack=_FIGS.unpack_from) -> Figures:
    present, cu, cs, rss, rch, method = _unpack(data, pos)
    if present & ~15 or method > 2:
        raise ProtocolError("bad figures")
    if rss < 0 or rch < 0 or not (0 <= cu < 1e12 and 0 <= cs < 1e12):
        raise ProtocolError("figures out of range")
    if present == 3:  # the usual: no children
        return _new(Figures, (cu, cs, rss, METHODS[method], None))
    return _new(Figures, (cu if present & 1 else None, cs if present & 1 else None,
                          rss if present & 2 else None, METHODS[method] if present & 2 else None,
                          rch if present & 4 else None))


def _take_blob(data, pos: int, end: int) -> Tuple[Optional[bytes], int]:
    if pos + 4 > end:
        raise ProtocolError("truncated field")
    n = _LEN.unpack_from(data, pos)[0]
    pos += 4
    if n == _NONE:
        return None, pos
    if pos + n > end:
        raise ProtocolError("field longer than its message")
    return data[pos:pos + n], pos + n


def _decode_result(data, pos: int, end: int) -> Result:
    if end - pos < _RES.size:
        raise ProtocolError("truncated result")
    code, exitcode, started, ended, flags = _RES.unpack_from(data, pos)
    if code > 1 or flags & ~3 or flags == 2:
        raise ProtocolError("bad result header")
    if not (0.0 <= started <= _LATEST and 0.0 <= ended <= _LATEST):   # NaN fails too
        raise ProtocolError("a time out of range (not a date)")
    pos += _RES.size
    figures = None
    if flags:
        if end - pos < _FIGS.size:
            raise ProtocolError("truncated figures")
        if data[pos] & 8:
            raise ProtocolError("bad figures")   # in a result, bit 2 of its flags says it
        figures = _unpack_figures(data, pos)
        pos += _FIGS.size
    out, pos = _take_blob(data, pos, end)
    exc, pos = _take_blob(data, pos, end)
    if pos != end:
        raise ProtocolError("trailing bytes after a result")
    if exc is not None:
        exc = exc.decode("utf-8", "replace")
    return _new(Result, (STATUSES[code], exitcode, started, ended, out, exc, figures, flags == 3))


def _refuse_header(version: int, kind: int, reserved: int, size: int, limit: int) -> None:
    if version != VERSION or reserved:
        raise ProtocolError(f"not a version {VERSION} frame")
    if kind not in _WORKER_KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    raise ProtocolError(f"a {size}-byte message is over the {limit}-byte limit")


_unpack_header = HEADER.unpack_from
_FIGS_SIZE = _FIGS.size
_READY_MSG = Ready()


_WORKER_KINDS = (READY, RESULT, FIGURES)


class FrameReader:
    """The server's end of one worker's channel: bytes in, messages out.

    ``feed`` takes whatever a non-blocking read returned and gives back the
    messages it completed; a frame begun is kept (as chunks, joined once it
    is whole). The header is judged as soon as its 8 bytes are in, so an
    oversize or garbage frame is refused before anything is waited for or
    stored."""

    __slots__ = ("max_message", "_chunks", "_have", "_need")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE):
        self.max_message = max_message
        self._chunks: List[bytes] = []
        self._have = 0
        self._need = 0

    @property
    def partial(self) -> bool:
        """A frame has begun and is not complete."""
        return bool(self._chunks)

    def feed(self, data: bytes) -> List[tuple]:
        """The messages (``Ready``, ``Result``, ``LateFigures``) ``data`` completed."""
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
        messages = []
        pos, n = 0, len(data)
        need = 8
        limit = self.max_message
        try:
            while n - pos >= 8:
                version, kind, reserved, size = _unpack_header(data, pos)
                if version != VERSION or reserved or size > limit or kind not in _WORKER_KINDS:
                    _refuse_header(version, kind, reserved, size, limit)
                end = pos + 8 + size
                if end > n:
                    need = 8 + size
                    break
                if kind == RESULT:
                    messages.append(_decode_result(data, pos + 8, end))
                elif kind == FIGURES:
                    if size != _FIGS_SIZE:
                        raise ProtocolError("bad figures size")
                    messages.append(_new(LateFigures, (_unpack_figures(data, pos + 8), data[pos + 8] > 7)))
                elif size:
                    raise ProtocolError("a ready message has no body")
                else:
                    messages.append(_READY_MSG)
                pos = end
        except struct.error as e:
            raise ProtocolError(str(e)) from None
        if pos < n:
            rest = data[pos:] if pos else data
            self._chunks = [rest]
            self._have = len(rest)
            self._need = need
        return messages


# ------------------------------------------------------------ server -> worker
def encode_job(fn_blob: bytes, args_blob: bytes, env: Optional[Env], as_thread: bool) -> List[bytes]:
    """A ``RunJob``, from its fields, as buffers for ``writev`` (the pickles
    are not copied)."""
    env_b = b"" if env is None else json.dumps(list(env)).encode()
    flags = (1 if as_thread else 0) | (2 if env is not None else 0)
    size = 1 + 4 + len(fn_blob) + 4 + len(args_blob) + (4 + len(env_b) if env is not None else 0)
    head = HEADER.pack(VERSION, JOB, 0, size) + _JOBFLAGS.pack(flags) + _LEN.pack(len(fn_blob))
    tail = _LEN.pack(len(env_b)) + env_b if env is not None else b""
    if size < 65536:
        return [b"".join((head, fn_blob, _LEN.pack(len(args_blob)), args_blob, tail))]
    return [head, fn_blob, _LEN.pack(len(args_blob)), args_blob] + ([tail] if tail else [])


def decode_job(body: bytes) -> RunJob:
    """The ``RunJob`` of a JOB body (from the server: trusted)."""
    flags, end = body[0], len(body)
    fn, pos = _take_blob(body, 1, end)
    args, pos = _take_blob(body, pos, end)
    env = None
    if flags & 2:
        env_b, pos = _take_blob(body, pos, end)
        env = Env(*json.loads(env_b))
    return RunJob(fn, args, env, bool(flags & 1))
