"""JobMeter: one job's CPU seconds and peak memory, in a persistent worker.

Figures must be the job's own, never left over from an earlier job of the
same worker, and cheap enough for no-op jobs. The worker takes the end
readings right after it has sent the job's result and sends the figures in a
second message (the job completes with them): on a busy 2-core VM any system
call between a job's end and its result's send cost 3-7 % of no-op
throughput, far more than the call itself; after the send it costs nothing
measurable. So a job's CPU includes sending its result.

- CPU: ``getrusage`` deltas of this process and of its waited-for children
  around the job (the counters psutil's ``cpu_times()`` reads, children
  fields included), so a ``subprocess.run`` child's CPU counts. One job's
  end reading is the next job's baseline.
- ``max_rss``: the kernel's high-water mark, reset before each job by
  writing 5 to ``/proc/self/clear_refs``, read back through ``getrusage``
  when that is known to equal the reset mark, else from ``VmHWM``.
  ``getrusage`` reports max(the mark, a figure the kernel fixed when this
  process was exec'd: the peak of the image it replaced, e.g. a large
  server that spawned us). That figure never changes afterwards (a thread
  exiting does not raise it; a test holds the kernel to this), so it is at
  most the first figure we read; whenever the job's reading is above that,
  it is the mark itself; otherwise it is used when within 64 KiB of the RSS
  then (``statm``; the mark is never below the RSS), else ``VmHWM`` is read.
  Method ``"vmhwm"``. Where the reset is impossible, psutil samples RSS every
  10 ms: method ``"sampled"`` (short spikes can be missed).
- ``max_rss_children``: the largest peak among the job's descendants that a
  sampler thread saw (every 50 ms once the job has run that long; each
  child's own VmHWM, so spikes between samples count), and the peak of
  children reaped during the job (``RUSAGE_CHILDREN.ru_maxrss`` when it grew).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Optional, Tuple

import psutil

from .procutil import descendants, own_peak

__all__ = ["JobMeter"]

#: (cpu_user, cpu_system, max_rss, max_rss_method, max_rss_children)
Figures = Tuple[float, float, int, str, Optional[int]]

_SELF, _CHILDREN = resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN
_getrusage = resource.getrusage


class JobMeter:
    """``arm()`` while idle, ``begin()`` as a job starts, ``stop()`` after it:
    the job's figures."""

    PAGE = os.sysconf("SC_PAGE_SIZE")
    SLACK = 64 * 1024          # rss may move this much between reset and read
    CHILD_INTERVAL = 0.05

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._pid = os.getpid()
        try:
            self._clear_fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self._status_fd = os.open("/proc/self/status", os.O_RDONLY)
            self._statm_fd = os.open("/proc/self/statm", os.O_RDONLY)
            os.write(self._clear_fd, b"5")
            self.exact = self._read_hwm() is not None
            # The kernel's getrusage maxrss is max(a figure fixed at exec, the
            # resettable mark). That fixed figure is at most this; above it,
            # the mark alone shows (see _peak).
            self._floor = _getrusage(_SELF).ru_maxrss
        except OSError:
            self.exact = False
        self._self0 = self._children0 = self._last = None
        self._sampled = 0
        self._sampling = threading.Event()
        # the children sampler: flags only on the hot path, a wake-up only after idleness
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._sleeping = False
        self._active = False
        self._gen = 0
        self._child_peak = 0
        self._saw_children = False
        threading.Thread(target=self._child_loop, name="ezpq-child-peak", daemon=True).start()
        if not self.exact:
            threading.Thread(target=self._rss_loop, name="ezpq-rss-sampler", daemon=True).start()

    # ------------------------------------------------------------- per job
    def arm(self, reuse: bool = False) -> None:
        """Reset the peak and take the CPU baselines for the next job.

        Called while the worker waits for that job, so the syscalls are off
        the critical path; the job's own unpickling then counts as its cost.
        ``reuse``: the last ``stop()`` reading is the baseline (one system
        call less; the few microseconds between count to the next job)."""
        if self.exact:
            os.write(self._clear_fd, b"5")
        else:
            self._sampled = self._proc.memory_info().rss
        self._self0 = self._last if reuse and self._last is not None else _getrusage(_SELF)
        if self._children0 is None or self._saw_children:
            # else the last job's end figure still holds: no child was reaped since
            self._children0 = _getrusage(_CHILDREN)
        self._child_peak = 0
        self._saw_children = False

    def begin(self) -> None:
        """The job starts now: let the samplers watch it."""
        if not self.exact:
            self._sampling.set()
        self._gen += 1
        self._active = True
        if self._sleeping:
            with self._lock:
                self._idle.notify()

    def stop(self) -> Tuple[Figures, bool]:
        """The job's figures, and whether it started any process."""
        self._active = False
        s1, c1 = _getrusage(_SELF), _getrusage(_CHILDREN)
        s0, c0 = self._self0, self._children0
        self._last = s1
        if self.exact:
            rss, method = self._peak(s1.ru_maxrss), "vmhwm"
        else:
            self._sampling.clear()
            rss, method = max(self._sampled, self._proc.memory_info().rss), "sampled"
        if c1 == c0 and not self._saw_children:  # the usual job: it started no process
            return (s1.ru_utime - s0.ru_utime, s1.ru_stime - s0.ru_stime, rss, method, None), False
        peak = self._child_peak
        if c1.ru_maxrss > c0.ru_maxrss:
            peak = max(peak, c1.ru_maxrss * 1024)
        self._saw_children = True   # the caller reaps orphans: re-read the baseline
        return (s1.ru_utime - s0.ru_utime + c1.ru_utime - c0.ru_utime,
                s1.ru_stime - s0.ru_stime + c1.ru_stime - c0.ru_stime, rss, method, peak or None), True

    def _peak(self, maxrss_kib: int) -> int:
        """The job's peak from getrusage's maxrss = max(exec-time figure, mark).

        Above the bound of the exec-time figure it is the mark itself; else
        it is the mark when within SLACK of the RSS now (the mark is never
        below that, so it is then exact to SLACK); else VmHWM says."""
        if maxrss_kib > self._floor:
            return maxrss_kib * 1024
        rss = int(os.pread(self._statm_fd, 256, 0).split()[1]) * self.PAGE
        if maxrss_kib * 1024 <= rss + self.SLACK:
            return maxrss_kib * 1024
        return self._read_hwm() or 0

    # ------------------------------------------------------------- helpers
    def _read_hwm(self) -> Optional[int]:
        data = os.pread(self._status_fd, 8192, 0)
        i = data.find(b"VmHWM:")
        if i < 0:
            return None
        return int(data[i + 6:data.index(b"kB", i)]) * 1024

    def _rss_loop(self) -> None:
        while True:
            self._sampling.wait()
            time.sleep(0.01)
            try:
                self._sampled = max(self._sampled, self._proc.memory_info().rss)
            except psutil.Error:
                pass

    def _child_loop(self) -> None:
        while True:
            with self._lock:
                self._sleeping = True
                slept_at = self._gen  # wake for any job begun since (it may be over already)
                self._idle.wait_for(lambda: self._gen != slept_at)
                self._sleeping = False
            last_gen = -1
            while self._active or self._gen != last_gen:  # block only after an idle interval
                was_active, last_gen = self._active, self._gen
                time.sleep(self.CHILD_INTERVAL)
                gen = self._gen
                if not (was_active and self._active and gen == last_gen):
                    continue  # sample only a job that has run a whole interval
                procs = descendants(self._pid)
                peak = max((own_peak(p) for p in procs), default=0)
                if self._gen == gen and self._active:
                    self._saw_children = self._saw_children or bool(procs)
                    self._child_peak = max(self._child_peak, peak)
