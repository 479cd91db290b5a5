"""What a client may send, value by value: the rules for every field of a
job, every queue setting and every call argument.

A shared server serves users who do not trust each other, so every value a
client sends is checked twice: by the client library at the call that made
it (a ``TypeError``/``ValueError`` where the mistake is), and again by the
server (``Service``), which must hold whatever a hostile client puts on the
wire. Both use the functions below, so the two can never disagree. The
records that carry these values (a job, a post-processed job), and every
other message, are named in ``messages.py``, which checks them with these
rules (``messages.job_record`` builds the server's record of a job).

Why these bounds: a job's ``timeout`` becomes a wait in the supervisor
(``inf``/``nan`` or ~25 days overflow or spin it), ``priority`` is compared
with every other user's in the dispatch heap (a string breaks everyone's
``put``), names and texts go to tables and the accounting log (control
characters forge lines), and every field the server owns (status, times,
``processed``, uid, ...) is refused rather than overwritten, so a client
cannot put a job in a state the server did not make.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Dict, Optional, Tuple

__all__ = [
    "MAX_TIMEOUT", "MAX_RETRIES", "MAX_TEXT", "MAX_BLOB", "MAX_LANE_KEY", "MAX_IDS", "MAX_RESERVE",
    "INT64_MIN", "INT64_MAX", "SETTINGS", "RUNNERS", "check_settings", "check_text", "check_name", "check_int",
    "check_bool", "check_timeout", "check_priority", "check_retries", "check_max_memory",
    "check_qid", "check_token", "check_env", "check_ids", "check_blob", "wait_timeout", "client_timeout",
    "MAX_AFTER", "check_after", "check_dask_address",
]

DAY = 86400.0
MAX_TIMEOUT = 366 * DAY       # a job's timeout: 0 (none) or 0 < t <= 366 days
MAX_RETRIES = 1000
MAX_TEXT = 1024               # names, function names, lane texts: at most 1 KiB
MAX_QID = 256
MAX_TOKEN = 64                # client tokens (uuid4 hex: 32)
MAX_PATH = 4096
MAX_SYS_PATH = 1000           # entries of a client's sys.path
MAX_ENV = 64 * 1024           # characters of a client's cwd and sys.path together
MAX_BLOB = 256 * 1024 * 1024  # a pickled function/arguments/callback result
MAX_LANE_KEY = 64 * 1024      # a pickled lane (it is compared as bytes)
MAX_IDS = 10_000_000          # ids in one pop_ids / seqs in one call
MAX_RESERVE = 1 << 20         # job ids reserved by one call
MAX_AFTER = 1024              # jobs one job may wait for (after=): checked under the state's lock
MAX_SETTING = (1 << 31) - 1   # cap and max_size
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_INT_NAME = 10 ** MAX_TEXT   # an int name prints in at most ~1 KiB

RUNNERS = ("process", "thread")

#: Queue settings a client may change, with their type; ints are 0..MAX_SETTING.
SETTINGS: Dict[str, type] = {"cap": int, "max_size": int, "paused": bool,
                             "auto_stop": bool, "auto_remove": bool}


# ------------------------------------------------------------- scalars
def _kind(value: Any) -> str:
    return type(value).__name__


def check_int(what: str, value: Any, low: int, high: int) -> int:
    """An int (not a bool) in ``low..high``."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{what} must be an int, not {_kind(value)}")
        value = operator.index(value)   # numpy's ints, in the client library
    if not low <= value <= high:
        raise ValueError(f"{what} must be in {low}..{high}, got {value!r}")
    return value


def check_bool(what: str, value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{what} must be a bool, not {_kind(value)}")
    return value


def check_text(what: str, value: Any, limit: int = MAX_TEXT) -> str:
    """A printable string (no control characters) of at most ``limit`` characters."""
    if type(value) is not str:
        raise TypeError(f"{what} must be a string, not {_kind(value)}")
    if len(value) > limit:
        raise ValueError(f"{what} must be at most {limit} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError(f"{what} must be printable (no newline or control character): {value[:80]!r}")
    return value


def check_name(value: Any) -> Any:
    """A job name: None, a printable string of at most 1 KiB, an int or a finite float."""
    t = type(value)
    if t is str:
        return check_text("name", value)
    if value is None:
        return value
    if t is int:
        if -_MAX_INT_NAME < value < _MAX_INT_NAME:
            return value
        raise ValueError("name: an int name must print in at most 1 KiB")
    if t is float:
        if math.isfinite(value):
            return value
        raise ValueError(f"name must be a finite number, got {value!r}")
    raise TypeError(f"name must be a string, an int, a float or None, not {_kind(value)}")


def check_timeout(value: Any) -> float:
    """A job's timeout in seconds: 0 (none) or 0 < t <= 366 days, finite."""
    if type(value) is not float and type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"timeout must be a number of seconds, not {_kind(value)}")
        value = float(value)
    if not 0 <= value <= MAX_TIMEOUT:   # nan fails every comparison
        raise ValueError(f"timeout must be 0 (none) or 0 < timeout <= {MAX_TIMEOUT:.0f} s "
                         f"(366 days), got {value!r}")
    return value


def check_priority(value: Any) -> int:
    return check_int("priority", value, INT64_MIN, INT64_MAX)


def check_retries(value: Any) -> int:
    return check_int("retries", value, 0, MAX_RETRIES)


def check_max_memory(value: Any) -> Optional[int]:
    return None if value is None else check_int("max_memory", value, 1, INT64_MAX)


def check_blob(what: str, value: Any, limit: int = MAX_BLOB) -> bytes:
    if type(value) is not bytes:
        raise TypeError(f"{what} must be bytes, not {_kind(value)}")
    if len(value) > limit:
        raise ValueError(f"{what} must be at most {limit} bytes, got {len(value)}")
    return value


def check_qid(value: Any) -> str:
    return check_text("qid", value, MAX_QID)


def check_token(value: Any) -> str:
    return check_text("client", value, MAX_TOKEN)


def check_env(cwd: Any, sys_path: Any) -> Tuple[str, ...]:
    """A client's environment for its jobs: its working directory and
    sys.path, printable paths, at most ``MAX_SYS_PATH`` entries and
    ``MAX_ENV`` characters in all (the server keeps it while the client or
    one of its jobs lives: 1,000 entries of 4 KiB each were 4 MB a hello)."""
    check_text("cwd", cwd, MAX_PATH)
    if type(sys_path) is not list:
        raise TypeError(f"sys_path must be a list, not {_kind(sys_path)}")
    if len(sys_path) > MAX_SYS_PATH:
        raise ValueError(f"sys_path: at most {MAX_SYS_PATH} entries, got {len(sys_path)}")
    total = len(cwd)
    for p in sys_path:
        check_text("sys_path", p, MAX_PATH)
        total += len(p)
    if total > MAX_ENV:
        raise ValueError(f"sys_path: the working directory and sys.path take {total} characters, "
                         f"at most {MAX_ENV}")
    return tuple(sys_path)


def check_ids(what: str, value: Any, low: int = 0) -> list:
    """A list of ints (job ids or seqs), at most MAX_IDS of them."""
    if type(value) is not list and type(value) is not tuple:
        raise TypeError(f"{what} must be a list of ints, not {_kind(value)}")
    if len(value) > MAX_IDS:
        raise ValueError(f"{what}: at most {MAX_IDS} per call, got {len(value)}")
    for x in value:
        if type(x) is not int or not low <= x <= INT64_MAX:
            check_int(what, x, low, INT64_MAX)
    return list(value)


def check_after(what: str, value: Any) -> Optional[Tuple[int, ...]]:
    """The jobs a job waits for (``after``): None, or a list or tuple of at
    most ``MAX_AFTER`` ints >= 1 (ids of its queue, or job numbers), each
    once (repeats are dropped, the order kept); an empty list is None. The
    bound keeps the check, done under the state's lock, and the record short."""
    if value is None:
        return None
    if type(value) is not list and type(value) is not tuple:
        raise TypeError(f"{what} must be a list of ints, not {_kind(value)}")
    if len(value) > MAX_AFTER:
        raise ValueError(f"{what}: a job may wait for at most {MAX_AFTER} jobs, got {len(value)}")
    for x in value:
        if type(x) is not int or not 1 <= x <= INT64_MAX:
            check_int(what, x, 1, INT64_MAX)
    return tuple(dict.fromkeys(operator.index(x) for x in value)) or None


#: A blocking call's longest finite timeout (longer ones are clamped).
MAX_WAIT = 366 * 86400.0


def wait_timeout(value: Any) -> Optional[float]:
    """A blocking call's timeout at the server: None or 0 mean none (the
    call is parked until its condition holds or its client leaves); a
    finite number >= 0 is clamped to ``MAX_WAIT``; nan, inf and negatives
    are refused."""
    if value is None:
        return None
    if type(value) is not float and type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {_kind(value)}")
    if not 0 <= value < math.inf:
        raise ValueError(f"timeout must be a finite number >= 0, got {value!r}")
    return None if value == 0 else min(float(value), MAX_WAIT)


def client_timeout(value: Any) -> float:
    """A client library call's own timeout (``wait``, ``get``, ...): a number
    >= 0; 0, None and inf mean none. NaN is refused: it would make the
    call loop forever without waiting."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, not {_kind(value)}")
    if not value >= 0:
        raise ValueError(f"timeout must be >= 0, got {value!r}")
    return 0.0 if value == math.inf else float(value)


_DASK_SCHEMES = ("tcp", "tls", "ucx", "inproc", "ws", "wss")


def check_dask_address(value: Any) -> str:
    """A Dask scheduler's address (``--dask``, ``Queue(dask=)``):
    ``[SCHEME://]HOST:PORT``, plain text without whitespace or control
    characters (it is logged and put in error messages)."""
    if not isinstance(value, str):
        raise TypeError(f"dask must be a scheduler address (str) such as 'tcp://10.0.0.5:8786', "
                        f"not {_kind(value)}")
    if not value or len(value) > MAX_PATH or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"dask must be a scheduler address such as 'tcp://10.0.0.5:8786', got {value!r}")
    scheme, sep, rest = value.partition("://")
    if sep and scheme not in _DASK_SCHEMES:
        raise ValueError(f"dask: unknown scheme {scheme!r} in {value!r} (one of {', '.join(_DASK_SCHEMES)})")
    if not (rest if sep else value).strip("/"):
        raise ValueError(f"dask must name a host, got {value!r}")
    return value


# -------------------------------------------------------------- settings
def check_settings(settings: Any) -> Dict[str, Any]:
    """Queue settings: only the keys of ``SETTINGS``, each of its type and range."""
    if type(settings) is not dict:
        raise TypeError(f"queue settings must be a dict, not {_kind(settings)}")
    for key, value in settings.items():
        kind = SETTINGS.get(key) if type(key) is str else None
        if kind is None:
            raise ValueError(f"unknown queue setting {key!r} (allowed: {', '.join(SETTINGS)})")
        if kind is bool:
            check_bool(key, value)
        else:
            check_int(key, value, 0, MAX_SETTING)
    return settings
