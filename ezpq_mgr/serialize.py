"""Pickling of what travels: functions and arguments out, outputs back.

Functions and arguments are pickled with cloudpickle in the client at
``put()`` time, so ``__main__`` functions, lambdas and closures work on any
server, and a value that cannot be pickled is reported right there, named.
"""

from __future__ import annotations

import collections
import pickle
import threading
import types
from typing import Any, Optional, Tuple

import cloudpickle

from .errors import UnpicklableError
from .stdlib_private import mp_main_module

__all__ = ["dump_function", "dump_call_args", "dump_value", "load", "load_or_none", "dump_output"]


def _short_repr(value: Any) -> str:
    """A value named in an error message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _main_by_value() -> None:
    """Make cloudpickle send the main script's objects by value wherever the
    client runs.

    cloudpickle sends ``__main__``'s functions and classes by value, but in a
    ``spawn``/``forkserver`` child (a pool worker too) the script is imported
    as ``__mp_main__``, a module it would pickle by reference, and no worker
    can import it. Registering it by value (once, when it appears) fixes
    that; a fork child, a thread, ``python -c`` and IPython cells already see
    ``__main__``."""
    mp_main = mp_main_module()
    if mp_main is not None and mp_main is not _registered[0]:
        try:
            cloudpickle.register_pickle_by_value(mp_main)
        except (ValueError, TypeError):  # not a real module (some embedders)
            pass
        _registered[0] = mp_main


_registered: list = [None]


#: Pickles of recently put functions, by identity (the entry keeps the
#: function alive, so its id stays its own): a script's own function travels
#: by value, which costs ~12 us a put against ~3 us by reference. As in Dask
#: (``distributed``'s ``cache_dumps``), a function is pickled once while it
#: stays in this cache: globals it refers to are captured at its first put.
_FN_CACHE: "collections.OrderedDict[int, Tuple[Any, bytes]]" = collections.OrderedDict()
_FN_CACHE_SIZE = 64
_fn_cache_lock = threading.Lock()


def dump_function(function: Any) -> bytes:
    """cloudpickle ``function``; raise UnpicklableError naming it on failure.

    Plain functions are cached by identity (see ``_FN_CACHE``); callable
    instances, whose state may change between puts, are pickled each time."""
    cacheable = type(function) is types.FunctionType
    if cacheable:
        hit = _FN_CACHE.get(id(function))
        if hit is not None and hit[0] is function:
            return hit[1]
    _main_by_value()
    try:
        blob = cloudpickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise UnpicklableError(f"function {_short_repr(function)} cannot be pickled: {exc}") from exc
    if cacheable:
        with _fn_cache_lock:
            _FN_CACHE[id(function)] = (function, blob)
            while len(_FN_CACHE) > _FN_CACHE_SIZE:
                _FN_CACHE.popitem(last=False)
    return blob


def dump_call_args(args: Optional[list], kwargs: Optional[dict]) -> bytes:
    """Pickle (args, kwargs); on failure name the argument that broke it.

    Plain pickle when that is safe (10x faster for small arguments); anything
    that refers to ``__main__`` goes through cloudpickle, by value, since a
    worker has another ``__main__``."""
    try:
        blob = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        if b"__main__" not in blob and b"__mp_main__" not in blob:
            return blob
    except Exception:
        pass
    _main_by_value()
    try:
        return cloudpickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for i, value in enumerate(args or ()):
            _probe(value, f"args[{i}]")
        for key, value in (kwargs or {}).items():
            _probe(value, f"kwargs[{key!r}]")
        raise UnpicklableError(f"arguments cannot be pickled: {exc}") from exc


def _probe(value: Any, where: str) -> None:
    try:
        cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise UnpicklableError(f"{where} = {_short_repr(value)} cannot be pickled: {exc}") from exc


def dump_value(value: Any, what: str = "value") -> bytes:
    """Pickle a small value (a lane, a callback result)."""
    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise UnpicklableError(f"{what} {_short_repr(value)} cannot be pickled: {exc}") from exc


def dump_output(value: Any) -> Tuple[Optional[bytes], Optional[str]]:
    """Pickle a job's output in the worker: (blob, None) or (None, error text)."""
    if value is None:
        return None, None
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), None
    except Exception:
        try:
            return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), None
        except Exception as exc:
            return None, (f"output {_short_repr(value)} of type {type(value).__name__} "
                          f"cannot be pickled: {exc!r}")


def load(blob: bytes) -> Any:
    return pickle.loads(blob)


def load_or_none(blob: Optional[bytes]) -> Any:
    return None if blob is None else pickle.loads(blob)
