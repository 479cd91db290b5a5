"""The Dask bridge channel's bytes: a small versioned format for the
server ⇄ bridge messages of ``messages.py`` (StartRunner ... BridgeLog).

The bridge (dask_bridge.py) holds a ``distributed.Client``, and Dask's
wire protocol unpickles what the scheduler sends: whoever reaches the
scheduler or a Dask worker can run code in the bridge. So the server
reads the bridge as it reads a worker (workerproto.py): never a pickle,
every frame checked before it is believed. Frames are workerproto's
``HEADER`` (version, kind, two zero bytes, body length), then the
message's fields in its record's order, each by its type code in
``LAYOUTS``:

- ``s``/``S`` text (UTF-8, strict; ``S`` may be None), ``y``/``Y`` bytes
  (``Y`` may be None): a 4-byte length (0xFFFFFFFF: None), then the bytes;
- ``q``/``Q`` a signed 64-bit int, ``d``/``D`` a finite float, ``?`` a
  bool byte (0 or 1): the upper-case ones begin with a byte 0 (None) or 1;
- ``F`` a job's figures or None: a byte 0/1 then workerproto's figures struct;
- ``j`` JSON text (the cluster's workers), checked by the message's own rule.

``FrameReader`` judges each header as soon as its 8 bytes are in (version,
kind known for this direction, reserved bytes, size under
``max_message``), then decodes the body strictly (exact length, known
codes, finite numbers, the message's own rules); anything else raises
``ProtocolError``, and the server ends that bridge.

Cost (timeit on the 2-core test VM, a no-op job's messages): a
RunOnRunner encodes in ~5 us and decodes in ~8 us, a RunnerResult ~6 and
~7 us; the server's share per job is ~13 us (encode one, decode the
other), next to a Dask hand-over of ~2 ms.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Dict, List, Optional, Tuple

from .. import messages as m
from ..job import JobStatus
from ..worker.workerproto import HEADER, ProtocolError, _pack_figures, _unpack_figures

__all__ = ["VERSION", "ProtocolError", "FrameReader", "encode", "TO_BRIDGE", "TO_SERVER",
           "DEFAULT_MAX_MESSAGE", "MAX_TEXT"]

VERSION = 1
DEFAULT_MAX_MESSAGE = 256 << 20
#: the longest text field (a reason, a traceback, an address); the bridge cuts longer ones
MAX_TEXT = 1 << 20

#: kind byte -> (record, field types)
TO_BRIDGE = {
    1: (m.StartRunner, "ss"),
    2: (m.RunOnRunner, "sqyyS?dQ"),
    3: (m.KillOnRunner, "ssqs"),
    4: (m.RetireRunner, "s"),
    5: (m.ReleaseRunner, "s"),
    6: (m.StopBridge, ""),
}
TO_SERVER = {
    16: (m.BridgeConnected, ""),
    17: (m.BridgeUnreachable, "s?"),
    18: (m.BridgeDisconnected, "s"),
    19: (m.ClusterNow, "jj"),
    20: (m.RunnerReady, "s"),
    21: (m.RunnerResult, "sqsQDDYSFQsy"),
    22: (m.RunnerEnded, "ssQs"),
    23: (m.RunnerBroken, "sQs"),
    24: (m.KillFailed, "sqs"),
    25: (m.BridgeLog, "qs"),
}
_KIND = {rec: (kind, layout) for table in (TO_BRIDGE, TO_SERVER) for kind, (rec, layout) in table.items()}

_LEN = struct.Struct("!I")
_NONE = 0xFFFFFFFF
_Q = struct.Struct("!q")
_D = struct.Struct("!d")
_FIGS_SIZE = struct.calcsize("!BddqqB")


def _enc_field(code: str, value: Any, out: List[bytes]) -> None:
    if code in "sSjyY":
        if value is None:
            if code in "sjy":
                raise ValueError("a required field is None")
            out.append(_LEN.pack(_NONE))
            return
        if code == "j":
            value = json.dumps(value, separators=(",", ":"))
        b = value.encode("utf-8") if code in "sSj" else bytes(value)
        out.append(_LEN.pack(len(b)))
        out.append(b)
    elif code in "qQdD?F":
        if code in "QDF":
            if value is None:
                out.append(b"\x00")
                return
            out.append(b"\x01")
        if code in "qQ":
            out.append(_Q.pack(value))
        elif code in "dD":
            out.append(_D.pack(value))
        elif code == "?":
            out.append(b"\x01" if value else b"\x00")
        else:
            out.append(_pack_figures(value))
    else:
        raise ValueError(f"unknown field type {code!r}")


def encode(msg: tuple) -> bytes:
    """One message (a record of messages.py) as a frame."""
    kind, layout = _KIND[type(msg)]
    out: List[bytes] = []
    for code, value in zip(layout, msg):
        _enc_field(code, value, out)
    body = b"".join(out)
    return HEADER.pack(VERSION, kind, 0, len(body)) + body


def _dec_fields(layout: str, data: bytes, pos: int, end: int) -> list:
    values: list = []
    for code in layout:
        if code in "sSjyY":
            if pos + 4 > end:
                raise ProtocolError("truncated field")
            n = _LEN.unpack_from(data, pos)[0]
            pos += 4
            if n == _NONE:
                if code in "sjy":
                    raise ProtocolError("a required field is missing")
                values.append(None)
                continue
            if pos + n > end:
                raise ProtocolError("field longer than its message")
            raw = data[pos:pos + n]
            pos += n
            if code in "sSj":
                if n > MAX_TEXT:
                    raise ProtocolError("a text field over its limit")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError("a text field is not UTF-8") from None
                if code == "j":
                    try:
                        text = json.loads(text)
                    except ValueError:
                        raise ProtocolError("a JSON field is not JSON") from None
                values.append(text)
            else:
                values.append(bytes(raw))
            continue
        if code in "QDF":
            if pos >= end:
                raise ProtocolError("truncated field")
            flag = data[pos]
            pos += 1
            if flag > 1:
                raise ProtocolError("bad presence byte")
            if not flag:
                values.append(None)
                continue
        if code in "qQ":
            if pos + 8 > end:
                raise ProtocolError("truncated field")
            values.append(_Q.unpack_from(data, pos)[0])
            pos += 8
        elif code in "dD":
            if pos + 8 > end:
                raise ProtocolError("truncated field")
            x = _D.unpack_from(data, pos)[0]
            if not math.isfinite(x):
                raise ProtocolError("a number is not finite")
            values.append(x)
            pos += 8
        elif code == "?":
            if pos >= end or data[pos] > 1:
                raise ProtocolError("bad bool")
            values.append(data[pos] == 1)
            pos += 1
        elif code == "F":
            if pos + _FIGS_SIZE > end:
                raise ProtocolError("truncated figures")
            if data[pos] & 8:
                raise ProtocolError("bad figures")
            values.append(_unpack_figures(data, pos))
            pos += _FIGS_SIZE
    if pos != end:
        raise ProtocolError("trailing bytes after a message")
    return values


_STATUSES = frozenset(s.value for s in JobStatus)
_HOWS = frozenset({"finished", "error", "cancelled"})
MAX_WORKERS = 100_000


def _check(msg: tuple) -> tuple:
    """A decoded message's own rules (the server believes nothing else)."""
    if isinstance(msg, m.ClusterNow):
        workers, left = msg
        if not (isinstance(workers, dict) and isinstance(left, list)) or len(workers) > MAX_WORKERS \
                or len(left) > MAX_WORKERS:
            raise ProtocolError("a malformed cluster")
        for w, n in workers.items():
            if type(n) is not int or not 0 < n < 1 << 20:
                raise ProtocolError("a malformed cluster")
        if not all(isinstance(w, str) for w in left):
            raise ProtocolError("a malformed cluster")
    elif isinstance(msg, m.RunnerResult):
        if msg.status not in _STATUSES:
            raise ProtocolError("an unknown job status")
        for t in (msg.started, msg.ended):
            if t is not None and not 0.0 <= t <= 1e11:
                raise ProtocolError("a time out of range")
    elif isinstance(msg, m.RunnerEnded):
        if msg.how not in _HOWS:
            raise ProtocolError("an unknown way for a runner to end")
    elif isinstance(msg, m.BridgeLog):
        if not 0 <= msg.level <= 50:
            raise ProtocolError("a bad log level")
    return msg


class FrameReader:
    """One end of the channel: bytes in, checked messages out (``kinds``:
    the table of the direction it reads)."""

    def __init__(self, kinds: Dict[int, Tuple[type, str]], max_message: int = DEFAULT_MAX_MESSAGE):
        self.kinds = kinds
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> List[tuple]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        try:
            while len(buf) - pos >= 8:
                version, kind, reserved, size = HEADER.unpack_from(buf, pos)
                if version != VERSION or reserved:
                    raise ProtocolError(f"not a version {VERSION} frame")
                if kind not in self.kinds:
                    raise ProtocolError(f"unknown message kind {kind}")
                if size > self.max_message:
                    raise ProtocolError(f"a {size}-byte message is over the {self.max_message}-byte limit")
                end = pos + 8 + size
                if end > len(buf):
                    break
                rec, layout = self.kinds[kind]
                out.append(_check(tuple.__new__(rec, _dec_fields(layout, bytes(buf[pos + 8:end]), 0, size))))
                pos = end
        except struct.error as e:
            raise ProtocolError(str(e)) from None
        del buf[:pos]
        return out


def text(s: Optional[str], limit: int = MAX_TEXT // 4) -> Optional[str]:
    """``s`` cut to a size any reader takes (in characters; UTF-8 is at most 4 bytes each)."""
    return s if s is None or len(s) <= limit else s[:limit - 1] + "…"
