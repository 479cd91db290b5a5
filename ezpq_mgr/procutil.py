"""psutil helpers: kill a whole process tree, measure one job's CPU and peak memory.

Per-job figures from a persistent worker must not include earlier jobs:
CPU is a ``cpu_times()`` delta around the job (children fields included, so
waited-for subprocesses count), and on Linux the peak-RSS high-water mark is
reset before each job by writing ``5`` to ``/proc/self/clear_refs`` and read
back from ``VmHWM``. Where that reset is not possible, the peak is sampled.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Iterable, List, Optional, Tuple

import psutil

logger = logging.getLogger(__name__)

__all__ = ["kill_tree", "descendants", "PeakMemory", "ChildPeak", "cpu_seconds",
           "become_subreaper", "reap_zombies"]


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


def cpu_seconds(proc: psutil.Process) -> Tuple[float, float]:
    """(user, system) CPU seconds of ``proc`` plus its waited-for children."""
    t = proc.cpu_times()
    return (t.user + getattr(t, "children_user", 0.0),
            t.system + getattr(t, "children_system", 0.0))


class ChildPeak:
    """Largest peak RSS among a job's descendants that psutil saw.

    A sampler thread wakes every ``interval`` s while a job runs and reads each
    live descendant's own high-water mark (VmHWM where Linux has it, so a
    spike between samples still counts); children reaped during the job add
    ``RUSAGE_CHILDREN``'s ``ru_maxrss`` when it grew."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._running = threading.Event()
        self._peak = 0
        self._ru0 = 0
        threading.Thread(target=self._sample_loop, name="ezpq-child-peak", daemon=True).start()

    @staticmethod
    def _ru_maxrss() -> int:
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        except (ImportError, OSError):
            return 0

    def start(self) -> None:
        self._peak = 0
        self._ru0 = self._ru_maxrss()
        self._running.set()

    def _sample_loop(self) -> None:
        while True:
            self._running.wait()
            for child in descendants(self._proc.pid):
                self._peak = max(self._peak, _own_peak(child))
            time.sleep(self.interval)

    def stop(self) -> Optional[int]:
        self._running.clear()
        ru1 = self._ru_maxrss()
        peak = max(self._peak, ru1 if ru1 > self._ru0 else 0)
        return peak or None


def _own_peak(proc: psutil.Process) -> int:
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


class PeakMemory:
    """Peak RSS of this process for one job at a time.

    ``start()`` before the job, ``stop()`` after: returns (bytes, method),
    method being ``"vmhwm"`` (kernel high-water mark, exact) or ``"sampled"``
    (psutil every 10 ms; misses spikes shorter than that).
    """

    CLEAR_REFS = "/proc/self/clear_refs"
    STATUS = "/proc/self/status"

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._exact = self._can_reset()
        self._stop_evt: Optional[threading.Event] = None
        self._sampled = 0

    def _can_reset(self) -> bool:
        try:
            self._reset()
            return self._read_hwm() is not None
        except OSError:
            return False

    def _reset(self) -> None:
        with open(self.CLEAR_REFS, "w") as f:
            f.write("5")

    def _read_hwm(self) -> Optional[int]:
        with open(self.STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self) -> None:
        if self._exact:
            self._reset()
            return
        self._sampled = self._proc.memory_info().rss
        self._stop_evt = threading.Event()
        threading.Thread(target=self._sample, args=(self._stop_evt,), daemon=True).start()

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.01):
            try:
                self._sampled = max(self._sampled, self._proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> Tuple[int, str]:
        if self._exact:
            return self._read_hwm() or 0, "vmhwm"
        self._stop_evt.set()
        self._sampled = max(self._sampled, self._proc.memory_info().rss)
        return self._sampled, "sampled"
