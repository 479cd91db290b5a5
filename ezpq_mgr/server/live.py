"""Running jobs' CPU % and resident memory *now*, for ``ezpq top``.

The accounting figures of a job (``cpu_*``, ``max_rss``) are known once it
ends; ``top`` wants what its worker's process tree uses at this moment. The
server samples those trees with psutil only when someone asks (the ``top``
call): nothing runs, and nothing is kept, while nobody does.

CPU % is the tree's CPU time over wall time between two samples of the same
worker (100 % is one core busy). A worker sampled for the first time (or the
first call after a pause longer than ``STALE``) is read twice, ``FIRST_GAP``
apart, so that the first answer is already a figure. A worker runs job after
job, so a figure just after a job changed mixes the two (as ``top`` does).
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Iterable, Optional, Tuple

import psutil

__all__ = ["LiveSampler"]

#: seconds between the two reads of a worker seen for the first time
FIRST_GAP = 0.2
#: a previous sample older than this is not used (seconds)
STALE = 30.0


def _tree_figures(pid: int) -> Optional[Tuple[float, float, int]]:
    """(create time, CPU seconds of the tree, RSS bytes of the tree) of
    ``pid`` and its descendants, None if it is gone. A descendant that ends
    between the reads is left out (its CPU time with it)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
        created = root.create_time()
    except psutil.Error:
        return None
    cpu, rss = 0.0, 0
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
        except psutil.Error:
            pass
    return created, cpu, rss


class LiveSampler:
    """CPU % and RSS of worker process trees, between calls. Thread-safe
    (one ``sample`` at a time); keeps the pids sampled within ``STALE``
    seconds (at most the server's workers)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Dict[int, Tuple[float, float, float]] = {}   # pid -> (when, created, cpu seconds)

    def sample(self, pids: Iterable[int]) -> Dict[int, Tuple[Optional[float], Optional[int]]]:
        """pid -> (CPU % since the previous sample, RSS bytes now); (None,
        None) for a pid that is gone. The lock only guards the remembered
        figures: the reads and the pause for a first figure happen outside
        it, so one user calling ``top`` in a loop on many connections never
        makes another user's ``top`` wait behind those pauses."""
        pids = list(dict.fromkeys(pids))
        with self._lock:
            now = self._clock()
            last = {pid: v for pid, v in self._last.items() if now - v[0] <= STALE}
        read = {pid: _tree_figures(pid) for pid in pids}
        first = [pid for pid, f in read.items()
                 if f is not None and (pid not in last or last[pid][1] != f[0])]
        if first:   # a figure from this very call: read those again a moment later
            for pid in first:
                last[pid] = (now,) + read[pid][:2]
            time.sleep(FIRST_GAP)
            now = self._clock()
            for pid in first:
                read[pid] = _tree_figures(pid)
        out: Dict[int, Tuple[Optional[float], Optional[int]]] = {}
        seen: Dict[int, Tuple[float, float, float]] = {}
        for pid, f in read.items():
            if f is None:
                out[pid] = (None, None)
                continue
            created, cpu, rss = f
            before = last.get(pid)
            pct = None
            if before is not None and before[1] == created and now > before[0]:
                pct = max(0.0, cpu - before[2]) / (now - before[0]) * 100.0
            out[pid] = (pct, rss)
            seen[pid] = (now, created, cpu)
        with self._lock:
            self._last = {pid: v for pid, v in self._last.items() if now - v[0] <= STALE}
            self._last.update(seen)
        return out
