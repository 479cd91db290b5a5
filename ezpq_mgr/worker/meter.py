"""JobMeter: one job's CPU seconds and peak memory, in a persistent worker;
ProcMeter: the same read from outside by the server, for another user's worker.

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
  That thread exists because a child still running when the job ends (or a
  grandchild whose parent never waited for it) is in no rusage figure.
- Our own threads are not the job's: the samplers' CPU (each keeps its own
  running total, ``RUSAGE_THREAD`` after each look: ~1 us per 50 ms) is
  taken out of the job's ``cpu_*``; it is the worker's cost. They find
  children through ``/proc/<pid>/task/*/children`` (~50 us a look, where
  psutil's ``children()`` read every process on the machine: ~2 ms, which
  charged a ``sleep 30`` 1.27 CPU-s).
- ``mark`` (the server's own workers): a small shared array where ``arm``
  leaves the job's CPU baseline and the sampler its children's peak, so
  that the supervisor can give a job it kills (timeout, memory, cancel)
  the figures it had used by then (``mark_figures``).

JobMeter runs inside the worker, in the process the job runs in, so its
figures are the job's word: a job can patch it or write its own FIGURES. On
a root server another user's figures are therefore taken by ``ProcMeter``,
from the server's side, through ``/proc`` (see its docstring); the
server's own workers keep JobMeter alone (nothing added to their hot path).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Dict, List, Optional, Tuple

import psutil

from ..messages import Figures
from .procutil import descendant_pids, peak_of, tree_pids, vmhwm

__all__ = ["JobMeter", "ProcMeter", "MARK_SIZE", "mark_figures", "SAMPLER_NAME"]

_SELF, _CHILDREN = resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN
_THREAD = getattr(resource, "RUSAGE_THREAD", None)
_getrusage = resource.getrusage

#: The OS name of the sampler threads (``/proc/<pid>/task/<tid>/comm``), so
#: that the server can tell them from the job's threads.
SAMPLER_NAME = b"ezpq-sampler"
#: Doubles in a worker's mark: CPU baseline (user, system: the worker's and
#: its reaped children's seconds less the samplers'), the child sampler's
#: thread id, the largest peak of the job's children it saw (bytes).
MARK_SIZE = 5     # and 1.0 where the worker's peak mark is reset per job (else VmHWM is not the job's)
_ZERO = (0.0, 0.0)


def _sampler_cpu() -> Tuple[float, float]:
    """(user, system) seconds of the calling thread (a sampler's own cost)."""
    if _THREAD is None:
        return (time.thread_time(), 0.0)
    ru = _getrusage(_THREAD)
    return ru.ru_utime, ru.ru_stime


def _name_thread() -> None:
    """Name the calling thread SAMPLER_NAME for the kernel (Python names a
    thread only for itself)."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(SAMPLER_NAME), 0, 0, 0)   # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class JobMeter:
    """``arm()`` while idle, ``begin()`` as a job starts, ``stop()`` after it:
    the job's figures.

    ``resets`` False (another user's worker): never reset the peak mark
    between jobs; the server does, as it reads it from outside (ProcMeter),
    and a reset of ours after sending a job's figures could come before
    the server's reading of that job's peak. The mark then still starts at
    each job (the server's reset), give or take the moments between."""

    PAGE = os.sysconf("SC_PAGE_SIZE")
    SLACK = 64 * 1024          # rss may move this much between reset and read
    CHILD_INTERVAL = 0.05

    def __init__(self, resets: bool = True, mark=None) -> None:
        self._resets = resets
        # a memoryview of the shared doubles: a store costs ~40 ns, a ctypes item ~150 ns
        self._mark = None if mark is None else memoryview(mark).cast("B").cast("d")
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
        # the samplers' own CPU: each writes its running total; the job's baseline of their sum
        self._child_cpu = self._rss_cpu = _ZERO
        self._ours0 = self._ours_last = _ZERO
        started = threading.Event()
        threading.Thread(target=self._child_loop, args=(started,), name="ezpq-child-peak",
                         daemon=True).start()
        started.wait()
        if mark is not None:
            mark[4] = 1.0 if self.exact and resets else 0.0
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
            if self._resets:
                os.write(self._clear_fd, b"5")
        else:
            self._sampled = self._proc.memory_info().rss
        if reuse and self._last is not None:
            self._self0, self._ours0 = self._last, self._ours_last
        else:
            self._self0 = _getrusage(_SELF)
            self._ours0 = self._child_cpu if self._rss_cpu is _ZERO else self._ours()
        if self._children0 is None or self._saw_children:
            # else the last job's end figure still holds: no child was reaped since
            self._children0 = _getrusage(_CHILDREN)
        self._child_peak = 0
        self._saw_children = False
        mark = self._mark
        if mark is not None:
            s0, c0, o0 = self._self0, self._children0, self._ours0
            mark[0] = s0.ru_utime + c0.ru_utime - o0[0]
            mark[1] = s0.ru_stime + c0.ru_stime - o0[1]
            mark[3] = 0.0

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
        # our samplers' CPU since the baseline is not the job's (the usual
        # no-op job: no sampler said anything since, the same tuple)
        o1 = self._ours_last = self._child_cpu if self._rss_cpu is _ZERO else self._ours()
        o0 = self._ours0
        ou = os_ = 0.0
        if o1 is not o0:
            ou, os_ = o1[0] - o0[0], o1[1] - o0[1]
        if self.exact:
            rss, method = self._peak(s1.ru_maxrss), "vmhwm"
        else:
            self._sampling.clear()
            rss, method = max(self._sampled, self._proc.memory_info().rss), "sampled"
        if c1 == c0 and not self._saw_children:  # the usual job: it started no process
            if o1 is o0:
                return Figures(s1.ru_utime - s0.ru_utime, s1.ru_stime - s0.ru_stime, rss, method, None), False
            return Figures(max(0.0, s1.ru_utime - s0.ru_utime - ou), max(0.0, s1.ru_stime - s0.ru_stime - os_),
                           rss, method, None), False
        peak = self._child_peak
        if c1.ru_maxrss > c0.ru_maxrss:
            peak = max(peak, c1.ru_maxrss * 1024)
        self._saw_children = True   # the caller reaps orphans: re-read the baseline
        return Figures(max(0.0, s1.ru_utime - s0.ru_utime + c1.ru_utime - c0.ru_utime - ou),
                       max(0.0, s1.ru_stime - s0.ru_stime + c1.ru_stime - c0.ru_stime - os_),
                       rss, method, peak or None), True

    def _ours(self) -> Tuple[float, float]:
        """CPU seconds (user, system) our samplers have used, as they last said."""
        a, b = self._child_cpu, self._rss_cpu
        return (a[0] + b[0], a[1] + b[1])

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
        return vmhwm(os.pread(self._status_fd, 8192, 0))

    def _rss_loop(self) -> None:
        _name_thread()
        while True:
            self._sampling.wait()
            time.sleep(0.01)
            try:
                self._sampled = max(self._sampled, self._proc.memory_info().rss)
            except psutil.Error:
                pass
            self._rss_cpu = _sampler_cpu()

    def _child_loop(self, started: threading.Event) -> None:
        _name_thread()
        if self._mark is not None:
            self._mark[2] = threading.get_native_id()
        started.set()
        while True:
            self._child_cpu = _sampler_cpu()   # before it blocks: all it used is said
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
                    self._child_cpu = _sampler_cpu()
                    continue  # sample only a job that has run a whole interval
                procs = descendant_pids(self._pid)
                peak = max((peak_of(p) for p in procs), default=0)
                if self._gen == gen and self._active:
                    self._saw_children = self._saw_children or bool(procs)
                    self._child_peak = max(self._child_peak, peak)
                    if self._mark is not None and peak > self._mark[3]:
                        self._mark[3] = peak
                self._child_cpu = _sampler_cpu()


TICKS = os.sysconf("SC_CLK_TCK")


def _thread_ticks(stat: bytes) -> Tuple[int, int]:
    """(user, system) clock ticks of one thread's ``/proc/<pid>/task/<tid>/stat``
    (its own: the children fields there are the whole process's)."""
    f = stat[stat.rindex(b")") + 2:].split()
    return int(f[11]), int(f[12])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mark_figures(pid: int, mark) -> Figures:
    """The figures so far of the job in the server's own worker ``pid``,
    read from ``/proc`` just before the supervisor kills it (timeout,
    memory limit, cancel): CPU of the worker and its live descendants since
    the job's baseline in ``mark``, less the child sampler's; the worker's
    peak since the job began (VmHWM, reset then); the children's peak as
    the sampler saw it and as the live ones' VmHWM say now. CPU is exact to
    a clock tick (10 ms) plus what ran between this reading and the kill.
    Raises OSError when the worker is gone."""
    u, s = _ticks(_read(f"/proc/{pid}/stat"))
    peak = vmhwm(_read(f"/proc/{pid}/status")) if mark[4] else None
    children = int(mark[3])
    for child in tree_pids(pid)[1:]:
        try:
            cu, cs = _ticks(_read(f"/proc/{child}/stat"))
            children = max(children, vmhwm(_read(f"/proc/{child}/status")) or 0)
        except (OSError, ValueError, IndexError):
            continue   # gone meanwhile: reaped into the worker's counters
        u, s = u + cu, s + cs
    try:
        su, ss = _thread_ticks(_read(f"/proc/{pid}/task/{int(mark[2])}/stat"))
    except (OSError, ValueError, IndexError):
        su = ss = 0
    return Figures(max(0.0, (u - su) / TICKS - mark[0]), max(0.0, (s - ss) / TICKS - mark[1]),
                   peak, None if peak is None else "vmhwm", children or None)


def _ticks(stat: bytes) -> Tuple[int, int]:
    """(user, system) clock ticks of one ``/proc/<pid>/stat``: the process's
    own (every thread, exited ones included) plus its reaped children's."""
    f = stat[stat.rindex(b")") + 2:].split()
    return int(f[11]) + int(f[13]), int(f[12]) + int(f[14])


class ProcMeter:
    """Another user's worker seen from outside, by the (root) server: CPU and
    peak memory as the kernel counts them, which the job running in that
    worker cannot forge.

    - CPU: ``utime + cutime`` and ``stime + cstime`` of the worker's
      ``/proc/<pid>/stat`` (every thread; children it reaped), plus the same
      of each live descendant (found through every thread's ``children``),
      so that a job's processes count whether or not they were reaped yet
      (a child's counters move into its parent's when it is reaped: the sum
      does not drop). In clock ticks (10 ms); each reading is the next one's
      baseline, so a worker's jobs add up to all the CPU it used.
    - Peak memory: ``VmHWM`` of ``/proc/<pid>/status``, the mark reset at
      each reading through ``/proc/<pid>/clear_refs`` (root may write
      another user's). None where the kernel has no clear_refs.
    - Our sampler thread's CPU is not the job's: the thread named
      SAMPLER_NAME when the gauge opens (at the worker's Ready, before any
      job's code ran, so the job cannot pick it) has its ticks taken out,
      but at most ``SAMPLER_BUDGET`` of the wall time between readings
      (plus a tick): a job that gets its code run in that thread (it can
      patch the sampler's functions) hides no more than that.

    Its files stay open (a pread each, no path lookup; a dead worker's
    reads fail with OSError, never a reused pid's). Cost per ``take()`` on
    the 2-core test VM, a worker with 4 threads and no child: ~20 us.

    What it cannot see: children reaped without a wait (the job set SIGCHLD
    to SIG_IGN or SA_NOCLDWAIT: the kernel adds their CPU to nobody), and a
    peak the job hid by writing its own clear_refs just before it returned.
    """

    __slots__ = ("pid", "_stat", "_status", "_task", "_clear", "_children", "_mark", "_sampler",
                 "_sampler_mark", "_when")

    #: The share of wall time the sampler may be charged to us (an honest
    #: one uses ~0.1 %: ~50 us a look every 50 ms).
    SAMPLER_BUDGET = 0.02

    def __init__(self, pid: int):
        self.pid = pid
        self._children: Dict[str, int] = {}   # tid -> its open children file
        self._clear: Optional[int] = None
        opened: List[int] = []
        try:
            for name, flags in (("stat", os.O_RDONLY), ("status", os.O_RDONLY),
                                ("task", os.O_RDONLY | os.O_DIRECTORY)):
                opened.append(os.open(f"/proc/{pid}/{name}", flags))
            try:
                self._clear = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
            except OSError:
                pass
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        self._stat, self._status, self._task = opened
        self._mark = (0, 0)
        self._sampler = self._find_sampler()
        self._sampler_mark = (0, 0)
        self._when = time.monotonic()
        self.take()

    def _find_sampler(self) -> Optional[int]:
        """The open stat file of the worker's sampler thread (None: none)."""
        for tid in os.listdir(self._task):
            try:
                if _read(f"/proc/{self.pid}/task/{tid}/comm").strip() == SAMPLER_NAME:
                    return os.open(f"/proc/{self.pid}/task/{tid}/stat", os.O_RDONLY)
            except OSError:
                continue
        return None

    def _sampler_ticks(self, elapsed: float) -> Tuple[int, int]:
        """The sampler's (user, system) ticks since the last reading, within
        its budget for ``elapsed`` seconds."""
        try:
            u, s = _thread_ticks(os.pread(self._sampler, 1024, 0))
        except (OSError, ValueError, IndexError):
            return 0, 0
        u0, s0 = self._sampler_mark
        self._sampler_mark = (u, s)
        budget = int(elapsed * self.SAMPLER_BUDGET * TICKS) + 1
        du = min(max(0, u - u0), budget)
        return du, min(max(0, s - s0), budget - du)

    def cpu(self) -> Tuple[int, int, int]:
        """(user, system) ticks of the worker and its live descendants, and
        how many descendants it has."""
        u, s = _ticks(os.pread(self._stat, 1024, 0))
        n = 0
        for child in self._child_pids():
            for pid in tree_pids(child):
                try:
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        cu, cs = _ticks(f.read())
                except (OSError, ValueError, IndexError):
                    continue   # gone meanwhile: it is in its parent's counters now
                u, s, n = u + cu, s + cs, n + 1
        return u, s, n

    def take(self) -> Tuple[float, float, Optional[int]]:
        """CPU seconds (user, system) since the last ``take()`` and the peak
        RSS since then (bytes, None if unknown); resets the peak."""
        u, s, _ = self.cpu()
        peak = None
        if self._clear is not None:
            peak = vmhwm(os.pread(self._status, 4096, 0))
            os.write(self._clear, b"5")
        u0, s0 = self._mark
        # a child reaped between our reads can be missed once: never go back
        self._mark = (max(u, u0), max(s, s0))
        su = ss = 0
        if self._sampler is not None:
            now = time.monotonic()
            su, ss = self._sampler_ticks(now - self._when)
            self._when = now
        return max(0, u - u0 - su) / TICKS, max(0, s - s0 - ss) / TICKS, peak

    def _child_pids(self) -> List[int]:
        """Children of every thread of the worker (threads looked up anew
        each time: a new thread's children count too)."""
        tids = os.listdir(self._task)
        fds = self._children
        if len(tids) != len(fds) or any(t not in fds for t in tids):
            for tid in [t for t in fds if t not in tids]:
                os.close(fds.pop(tid))
            for tid in tids:
                if tid not in fds:
                    try:
                        fds[tid] = os.open(f"/proc/{self.pid}/task/{tid}/children", os.O_RDONLY)
                    except OSError:
                        pass   # that thread ended meanwhile
        out: List[int] = []
        for fd in fds.values():
            data = os.pread(fd, 65536, 0)
            if data:
                out.extend(int(x) for x in data.split())
        return out

    def close(self) -> None:
        """Close its files (once: their numbers may be reused afterwards)."""
        fds = ([self._stat, self._status, self._task, self._clear, self._sampler]
               + list(self._children.values()))
        self._stat = self._status = self._task = self._clear = self._sampler = -1
        self._children.clear()
        for fd in fds:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
