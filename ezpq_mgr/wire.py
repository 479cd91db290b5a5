"""The control channel of a shared server: JSON, never pickle.

A shared ``ezpq-server`` talks to clients of several OS users, so it must
never unpickle what a client sends (a pickle can run any code). Both ends
use this serializer instead (framing and handshake: transport.py): tagged
JSON for the requests and replies: bytes (base64), tuples, and exceptions
of a fixed allowlist (ours and a few builtins, so ``QueueFull`` still
arrives as ``QueueFull``). Job
payloads stay opaque bytes until a worker running as their submitter loads
them. The embedded queue's private server (same owner) keeps plain pickle.
"""

from __future__ import annotations

import base64
import builtins
import json
from typing import Any, Optional

from . import errors

__all__ = ["dumps", "loads"]

_EXCEPTIONS = {name: getattr(errors, name) for name in errors.__all__}
_EXCEPTIONS.update({name: getattr(builtins, name) for name in (
    "TypeError", "ValueError", "KeyError", "LookupError", "RuntimeError", "AttributeError",
    "PermissionError", "NotImplementedError", "OSError", "Exception")})


def _encode(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return {"__b": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__t": [_encode(x) for x in obj]}
    if isinstance(obj, list):
        out = [_encode(x) for x in obj]
        return _Long(out) if len(out) > _SLICE else out
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"wire: dict keys must be strings, got {bad[0]!r}")
        if any(k.startswith("__") and len(obj) == 1 for k in obj):
            return {"__d": {k: _encode(v) for k, v in obj.items()}}
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, BaseException):
        name = type(obj).__name__ if type(obj).__name__ in _EXCEPTIONS else "EzpqError"
        args = [a if isinstance(a, (str, int, float, type(None))) else str(a) for a in obj.args]
        if name == "EzpqError" and type(obj) is not errors.EzpqError:
            args = [f"{type(obj).__name__}: {obj}"]
        return {"__e": [name, args]}
    raise TypeError(f"wire: cannot send a {type(obj).__name__}")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(x) for x in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (key, value), = obj.items()
            if key == "__b":
                return base64.b64decode(value)
            if key == "__t":
                return tuple(_decode(x) for x in value)
            if key == "__e":
                name, args = value
                return _EXCEPTIONS.get(name, errors.EzpqError)(*args)
            if key == "__d":
                return {k: _decode(v) for k, v in value.items()}
        return {k: _decode(v) for k, v in obj.items()}
    return obj


#: a list longer than this (a listing of many jobs) is written a slice at a
#: time: json's C encoder holds the GIL for the whole of one call (50,000
#: job rows, 28 MB: 0.32 s in which no other thread of the server runs)
_SLICE = 500
_SEPARATORS = (",", ":")


class _Long(list):
    """An encoded list longer than ``_SLICE``: dumped in slices (``_dump``)."""


def _has_long(enc: Any, depth: int = 0) -> bool:
    """Whether ``enc`` is or holds a ``_Long`` within the few top levels of
    a reply that ``_dump`` looks into (a Reply wraps its value in two)."""
    if isinstance(enc, _Long):
        return True
    if depth >= 3:
        return False
    if isinstance(enc, list):
        return any(_has_long(x, depth + 1) for x in enc if isinstance(x, (list, dict)))
    if isinstance(enc, dict) and len(enc) <= 4:
        return any(_has_long(v, depth + 1) for v in enc.values())
    return False


def _dump(enc: Any, parts: list, depth: int = 0) -> None:
    """Append ``enc``'s JSON to ``parts``: long lists a slice per C call, so
    other threads run between slices; a container holding one (``_has_long``)
    child by child; anything else in one call."""
    if isinstance(enc, _Long):
        parts.append("[")
        for i in range(0, len(enc), _SLICE):
            parts.append(("," if i else "") + json.dumps(enc[i:i + _SLICE], separators=_SEPARATORS)[1:-1])
        parts.append("]")
    elif not _has_long(enc, depth):
        parts.append(json.dumps(enc, separators=_SEPARATORS))
    elif isinstance(enc, list):
        parts.append("[")
        for i, x in enumerate(enc):
            if i:
                parts.append(",")
            _dump(x, parts, depth + 1)
        parts.append("]")
    else:
        parts.append("{")
        for i, (k, v) in enumerate(enc.items()):
            parts.append(("," if i else "") + json.dumps(k) + ":")
            _dump(v, parts, depth + 1)
        parts.append("}")


def dumps(obj: Any) -> bytes:
    enc = _encode(obj)
    if not _has_long(enc):
        return json.dumps(enc, separators=_SEPARATORS).encode()
    parts: list = []
    _dump(enc, parts)
    return "".join(parts).encode()


def loads(data: bytes) -> Any:
    return _decode(json.loads(data))


#: the most values one request may hold. ``json.loads`` holds the
#: interpreter for the whole parse (about 50 ns a value): one request of
#: 50 million zeros (100 MB, under --max-message) stalled every other user
#: for seconds. 8 million is about 0.4 s, and about 400,000 jobs in one
#: ``put`` (a job is some 20 values); a bigger request is refused unparsed.
MAX_VALUES = 8_000_000


def values_over_limit(data: bytes) -> Optional[str]:
    """Why ``data`` is refused unparsed (more than MAX_VALUES values), or None.
    Counted by its commas (C speed, ~10 ms for 100 MB): a value is a comma
    more, and a comma inside a string only counts against the sender. A
    text shorter than 2 * MAX_VALUES bytes is not counted: n values take at
    least 2n - 1 bytes."""
    if len(data) < 2 * MAX_VALUES:
        return None
    n = data.count(b",") + 1
    if n <= MAX_VALUES:
        return None
    return (f"a request of about {n:,} values is over this server's limit of {MAX_VALUES:,} "
            f"(send fewer jobs or ids per call)")
