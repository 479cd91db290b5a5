"""Process trees: find a job's descendants, stop and kill them all.

Trees are walked through ``/proc/<pid>/task/*/children`` (a few reads per
process, no scan of every process on the machine). Kills stop the whole tree
first and then kill it, repeating until nothing is left (``kill_tree``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Iterable, List, Optional

import psutil

logger = logging.getLogger(__name__)

__all__ = ["kill_tree", "descendants", "tree", "tree_rss", "own_peak", "descendant_pids", "peak_of", "vmhwm", "become_subreaper",
           "child_pids", "tree_pids", "is_alive"]


def become_subreaper() -> bool:
    """Linux: orphaned descendants of our jobs re-parent to us, not to init,
    so a job's grandchildren stay in its process tree (and get killed with it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> List[psutil.Process]:
    """Snapshot of ``pid``'s descendants (empty if it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def descendant_pids(pid: int) -> List[int]:
    """``pid``'s descendants, found through ``children`` files (psutil's
    ``children()`` reads every process's stat on the machine: ~2 ms on a
    quiet box, which a 50 ms sampler turned into 4 % of a core)."""
    return tree_pids(pid)[1:]


def peak_of(pid: int) -> int:
    """A process's own peak RSS so far (VmHWM, bytes), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return vmhwm(f.read()) or 0
    except OSError:
        return 0


def tree(pid: int) -> List[psutil.Process]:
    """``pid`` itself (if alive) and a snapshot of its descendants."""
    try:
        return [psutil.Process(pid)] + descendants(pid)
    except psutil.Error:
        return []


_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes. Found
    through ``children`` files and ``statm`` (the supervisor asks every 50
    ms per job with a ``max_memory``: psutil's ``children()`` would read
    every process's stat on the machine, ~2 ms a look)."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            pass   # gone meanwhile
    return total


def child_pids(pid: int) -> List[int]:
    """Direct children of ``pid`` (every thread's), [] if it is gone."""
    out: List[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def tree_pids(pid: int) -> List[int]:
    """``pid`` (if alive) and all its descendants, parents before children."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    out, i = [pid], 0
    seen = {pid}
    while i < len(out):
        for c in child_pids(out[i]):
            if c not in seen:
                seen.add(c)
                out.append(c)
        i += 1
    return out


def _state(pid: int) -> str:
    """The one-letter state of ``pid`` ('' when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split(None, 1)[0].decode()
    except (OSError, IndexError):
        return ""


def is_alive(pid: int) -> bool:
    """Running or stopped (a zombie is dead, merely not reaped yet)."""
    return _state(pid) not in ("", "Z", "X")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(roots: Iterable, timeout: float = 2.0) -> List[int]:
    """Kill ``roots`` (pids or psutil.Process) and all their descendants.

    First every process is stopped (SIGSTOP), and the tree re-read until no
    new process appears: a stopped process can neither fork nor re-parent
    its children, so nothing escapes the snapshot, and a SIGTERM handler
    that re-spawns never runs. Then SIGKILL, repeated (with a fresh look
    for children) until nothing is alive or ``timeout`` passes. ``grace``
    is accepted for old callers and ignored: a job gets no chance to clean
    up (its tree's real end signal is SIGKILL, which is what ``exitcode``
    reports). Returns the pids still alive afterwards (normally none)."""
    pids = [r if isinstance(r, int) else r.pid for r in roots]
    stopped: set = set()
    order: List[int] = []
    deadline = time.monotonic() + timeout
    stop_by = time.monotonic() + min(0.5, timeout / 2)
    while True:
        found = [p for r in pids + order for p in tree_pids(r) if p not in stopped]
        new = list(dict.fromkeys(found))
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
            stopped.add(p)
            order.append(p)
        # wait until they really stopped (kill() returns before): a process
        # still running could fork a child the next look would miss
        while time.monotonic() < stop_by and any(_state(p) in ("R", "S", "D") for p in new):
            time.sleep(0.001)
    for p in order:
        _signal(p, signal.SIGKILL)
    while True:
        alive = [p for p in order if is_alive(p)]
        extra = [c for p in alive for c in tree_pids(p) if c not in stopped]
        for c in extra:
            stopped.add(c)
            order.append(c)
            _signal(c, signal.SIGKILL)
        if not alive and not extra:
            return []
        if time.monotonic() > deadline:
            survivors = sorted(set(alive + extra))
            logger.error("processes survived SIGKILL: %s", survivors)
            return survivors
        for p in alive:
            _signal(p, signal.SIGKILL)
        time.sleep(0.002)


def vmhwm(status: bytes) -> Optional[int]:
    """The peak RSS (``VmHWM``, bytes) in the text of a ``/proc/<pid>/status``,
    None where the kernel gives none: the one reader of that line (the
    meters read the file through kept descriptors, ``own_peak`` by path)."""
    i = status.find(b"VmHWM:")
    if i < 0:
        return None
    return int(status[i + 6:status.index(b"kB", i)]) * 1024


def own_peak(proc: psutil.Process) -> int:
    """A process's own peak RSS so far (VmHWM), or its RSS where that is unknown."""
    try:
        with open(f"/proc/{proc.pid}/status", "rb") as f:
            peak = vmhwm(f.read())
        if peak is not None:
            return peak
    except OSError:
        pass
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0
