"""The only place that touches private internals of the standard library.

Everything else in ezpq_mgr uses documented APIs. Each touch point below
says what it reaches, why nothing public does the job, and on which Python
versions it was checked (3.9 to 3.13: attributes read with ``getattr`` and
a default, so a version that renamed one loses the nicety, never works
wrongly or crashes).

- ``multiprocessing.forkserver._forkserver`` (``_forkserver_pid``,
  ``_forkserver_address``, ``_forkserver_alive_fd``) and
  ``multiprocessing.resource_tracker._resource_tracker`` (``_pid``,
  ``_fd``): the helper processes multiprocessing starts on its own. The
  supervisor is a child subreaper that kills children it does not know
  (``mp_helper_pids``: spare these); a worker closes every descriptor it
  inherited and must then make multiprocessing forget the helpers' (now
  closed, maybe reused) descriptors, so that a job using multiprocessing
  starts its own (``forget_mp_helpers``). Present since 3.4 / 3.8.
- ``sys.modules["__mp_main__"]``: the name a ``spawn``/``forkserver`` child
  imports the main script under (``multiprocessing.spawn``); the client
  registers it with cloudpickle by value (``mp_main_module``). Since 3.4.
- ``_thread.RLock`` and its ``_is_owned()``: ``threading.RLock`` is a
  factory, not a class; the state's lock subclasses the C lock so that
  entering it runs no Python, and asks whether this thread still holds it
  after a release (``rlock_is_owned``: its outermost holder sends the
  parked answers). ``_is_owned`` is what ``threading.Condition`` itself
  uses; present in every Python 3.
"""

from __future__ import annotations

import _thread
import sys
from types import ModuleType
from typing import Optional, Set

__all__ = ["CRLock", "rlock_is_owned", "mp_helper_pids", "forget_mp_helpers", "mp_main_module"]

#: The C re-entrant lock, a class that can be subclassed.
CRLock = _thread.RLock
#: ``rlock_is_owned(lock)``: True while this thread holds ``lock`` (a CRLock).
rlock_is_owned = _thread.RLock._is_owned

_FORKSERVER = ("multiprocessing.forkserver", "_forkserver",
               ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid"))
_RESOURCE_TRACKER = ("multiprocessing.resource_tracker", "_resource_tracker", ("_fd", "_pid"))


def _helper(module: str, name: str) -> object:
    """multiprocessing's singleton ``module.name``, if that module was imported."""
    return getattr(sys.modules.get(module), name, None)


def mp_helper_pids() -> Set[int]:
    """The pids of the forkserver and resource tracker multiprocessing
    started in this process (none: an empty set)."""
    pids = set()
    for module, name, _ in (_FORKSERVER, _RESOURCE_TRACKER):
        helper = _helper(module, name)
        pid = getattr(helper, "_forkserver_pid", None) or getattr(helper, "_pid", None)
        if pid:
            pids.add(pid)
    return pids


def forget_mp_helpers() -> None:
    """Make multiprocessing forget its helpers' descriptors and pids (this
    process just closed them): it starts new helpers when next needed."""
    for module, name, fields in (_RESOURCE_TRACKER, _FORKSERVER):
        helper = _helper(module, name)
        for field in fields:
            if hasattr(helper, field):
                setattr(helper, field, None)


def mp_main_module() -> Optional[ModuleType]:
    """The main script as a spawn/forkserver child imported it, if it did."""
    return sys.modules.get("__mp_main__")
