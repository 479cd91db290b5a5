"""psutil helpers for process trees: find a job's descendants, kill them all."""

from __future__ import annotations

import logging
import os
import signal
from typing import Iterable, List

import psutil

logger = logging.getLogger(__name__)

__all__ = ["kill_tree", "descendants", "tree", "tree_rss", "own_peak", "become_subreaper",
           "reap_zombies"]


def become_subreaper() -> bool:
    """Linux: orphaned descendants of our jobs re-parent to us, not to init,
    so a job's grandchildren stay in its process tree (and get killed with it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_zombies() -> None:
    """Collect exited children nobody waits for (orphans adopted as subreaper)."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError, OSError):
            pass


def descendants(pid: int) -> List[psutil.Process]:
    """Snapshot of ``pid``'s descendants (empty if it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def tree(pid: int) -> List[psutil.Process]:
    """``pid`` itself (if alive) and a snapshot of its descendants."""
    try:
        return [psutil.Process(pid)] + descendants(pid)
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes."""
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def kill_tree(procs: Iterable[psutil.Process], grace: float = 0.05) -> List[int]:
    """SIGTERM every process, wait ``grace`` s, SIGKILL the rest.

    Works on a snapshot taken before any signal (processes that started their
    own session are in it), so a parent dying first cannot hide its children;
    descendants the snapshot's processes started meanwhile are swept too.
    Returns the pids still alive afterwards (normally none).
    """
    procs = list(procs)
    known = {p.pid for p in procs}
    for p in list(procs):
        for child in descendants(p.pid):
            if child.pid not in known:
                known.add(child.pid)
                procs.append(child)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    alive = _living(psutil.wait_procs(procs, timeout=grace)[1])
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    survivors = [p.pid for p in _living(psutil.wait_procs(alive, timeout=1.0)[1])]
    if survivors:
        logger.error("processes survived SIGKILL: %s", survivors)
    return survivors


def _living(procs: List[psutil.Process]) -> List[psutil.Process]:
    """Drop zombies: dead, merely not yet reaped by their (new) parent."""
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def own_peak(proc: psutil.Process) -> int:
    """A process's own peak RSS so far (VmHWM), or its RSS where that is unknown."""
    try:
        with open(f"/proc/{proc.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0
