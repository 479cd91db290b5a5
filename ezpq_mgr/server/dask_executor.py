"""DaskExecutor: the worker pool's role (supervisor.py) played against a
Dask distributed cluster (``ezpq-server --dask ADDRESS``, ``Queue(dask=)``).

The server keeps everything that decides order: the waiting jobs, lanes,
priorities, fair share, the completed queue (``QueueState``, unchanged).
Dask only runs what we hand it, and we hand it no more than it can start at
once: ``min(--workers, the cluster's worker threads)`` jobs, so no job
waits in Dask's own queue where our order would be lost.

Jobs go to *runners* (worker/dask_host.run_jobs): one long Dask task per
Dask worker thread we use, pinned to its worker (``workers=[address]``,
``allow_other_workers=False``), that takes one job at a time from its own
``distributed.Queue`` (its inbox), runs it in an ezpq worker process there
and puts the result in our results queue::

      QueueState ──pick()──> DaskExecutor ══RunOnRunner══> bridge ──inbox.put(job)──> runner (Dask task)
          ^                    │   ^                       │   ^                        │ runs it in an
          └─ finish(Outcome) ──┘   └═══RunnerResult════════┘   └── results queue <──────┘ ezpq process
                                       (bridgeproto: no pickle)    topic "all": workers join / leave

The ``distributed.Client`` lives in the *bridge* (dask_bridge.py), a
process of its own, never in this one: Dask unpickles what its scheduler
sends, so whoever reaches the scheduler or a Dask worker could otherwise
run code in the server (root, on a shared box). On a root server the
bridge runs as ``--dask-user`` (default ``nobody``). This side keeps every
decision (which job, which runner, when one starts or retires, what a
job's end means) and believes nothing the bridge says that it cannot
check: a RunnerResult only for the job it handed that runner, a
RunnerReady only for a runner it started; anything malformed, oversize
or out of turn ends the bridge (its running jobs ``lost``, or waiting
again while they have retries) and a new one is started after a bounded
backoff, as the supervisor does for a worker that breaks its protocol.

Why runners: a Dask task round trip (submit, schedule, run, report) is
~10 ms here, so a task per job with only as many in flight as threads did
~190 no-ops/s; a job handed over a ``distributed.Queue`` to a runner
already there is ~2 ms. Measured on the 2 x 1 LocalCluster, 2 runners, one
job each in flight, 3,000 no-ops, 3 rounds, median vs plain Dask's
``Client.submit`` of all at once: a ``distributed.Queue`` both ways 1.26x
(p50 of one hand-over 2.2 ms); results by ``Worker.log_event`` to
``subscribe_topic`` 1.24x (2.6 ms), and the scheduler keeps the last 1,000
of each topic, outputs included; an Actor mailbox on each worker (client
to worker directly) 0.95x (3.1 ms), as each sync call holds a client
thread, and actors pin state to a worker; Pub/Sub is gone from
distributed 2026.8. So: queues both ways. Items are msgpack (bytes, ints,
strings): the scheduler never unpickles a job.

The bridge's channel costs each job one frame each way (the server's
share ~13 us of encoding and decoding, bridgeproto.py) and a hop between
two processes, next to the ~2 ms of a hand-over through Dask.

- The order stays ours: a runner is handed a job only when it is free
  (none in its inbox, none running), so at most one job per runner and no
  more runners on a worker than it has threads; a better job put later
  overtakes any that wait with us.
- A runner with no job for ``RUNNER_IDLE`` seconds ends and frees its
  thread (adaptive clusters scale down); the next job starts a new one. It
  returns how many jobs it took: one handed to it as it gave up waits
  again, without using a retry. An idle queue makes no wake-ups here.
- No re-run behind our back: Dask re-runs a task whose worker died. A
  runner is pinned to its worker, so Dask cannot move it; when that worker
  leaves (its ``remove-worker`` event, or its absence from the cluster at
  the next look) its job is ``lost`` (or waits again while it has
  ``retries``), the runner's future is cancelled and its inbox released
  (anything left in it goes too).
- A cancel (or a skip) of a running job is recorded at once (exit code
  -9) and ``kill_job`` runs on its worker (``Client.run``): the tree of
  the process running it is killed there, or the runner skips it if it had
  not taken it yet. The runner stays busy until its (ignored) result comes,
  so the thread is free before the next job goes there.
- The scheduler lost: Dask cancels every future (running jobs are
  ``lost``); waiting jobs wait; the bridge's client reconnects within
  ``connect_timeout``, else the bridge tries a new client every
  ``RECONNECT_INTERVAL`` s until one connects.

Jobs on Dask run as the Dask workers' OS user (see README, *Past one
machine*); ``Outcome.host`` is the Dask host, ``pid`` the ezpq process
there; the figures are that process's own for that job.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import messages as m
from ..job import JobStatus
from ..messages import Outcome
from . import bridgeproto
from .dask_bridge import exec_argv
from .joblogs import LogBook
from .ratelimit import RateLimitedLog, TokenBucket
from .state import QueueState

logger = logging.getLogger(__name__)

__all__ = ["DaskExecutor", "DaskUnreachable", "DEFAULT_CONNECT_TIMEOUT", "RUNNER_IDLE", "MISBEHAVE_ENV"]

DEFAULT_CONNECT_TIMEOUT = 10.0   # seconds
#: a runner with no job for this long (seconds) ends and gives its Dask
#: thread back. Long enough that a steady stream with pauses (a client
#: thinking between puts, a lane's next job) keeps its runners: a new one
#: costs a task round trip (~10 ms) plus its queue set-up; short enough that
#: an adaptive cluster (``Adaptive``: 3 looks 1 s apart before a worker is
#: retired) sees the threads free before it would decide, and that another
#: user of the cluster waits little for them.
RUNNER_IDLE = 2.0
#: how long a bridge may take to start (import distributed) on top of the connect timeout (seconds)
BRIDGE_BOOT = 60.0
#: a replaced bridge's successor starts after this (seconds), doubling to BACKOFF_MAX
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
#: a bridge up this long without breaking resets the backoff (seconds)
BACKOFF_RESET = 60.0
#: a write to the bridge that blocks this long (seconds: it reads nothing) ends it
SEND_TIMEOUT = 10
#: runners given up whose late messages are still taken quietly (the newest ones)
KEEP_GONE = 4096
#: test hooks, read from the server's own environment (no client sets them).
#: MISBEHAVE_ENV: what the bridges do wrong, one word per bridge in order
#: ("a/b": the first does a, the second b): "garbage" or "wrong-seq" breaks
#: protocol at its first result; "silent-start" never says whether it
#: connected; "log-flood" sends dask_bridge.LOG_FLOOD log lines at once.
#: FIRST_WORD_ENV: seconds a replacement bridge has for its first word
#: (instead of the connect timeout + BRIDGE_BOOT).
MISBEHAVE_ENV = "EZPQ_TEST_DASK_BRIDGE_MISBEHAVE"
FIRST_WORD_ENV = "EZPQ_TEST_DASK_BRIDGE_FIRST_WORD"
#: messages no request of ours bounds (log lines, cluster news, failed
#: kills), a ClusterNow counting one more per 1,000 workers in it: a
#: bridge may send UNASKED_BURST at once and UNASKED_RATE a second more
#: (its own are a few a minute); past that it is ended. Whoever reaches
#: the scheduler runs code in the bridge, and a flood of them (handled
#: under the state's lock, each log line logged) held the lock for 14 s.
UNASKED_RATE, UNASKED_BURST = 50.0, 500.0
_UNASKED = (m.BridgeLog, m.ClusterNow, m.KillFailed, m.BridgeConnected, m.BridgeDisconnected)
_USER_PATH = "/usr/local/bin:/usr/bin:/bin"


class DaskUnreachable(ConnectionError):
    """The Dask scheduler cannot be reached; the message names its address."""


class _Violation(Exception):
    """The bridge said something out of turn."""


class _Runner:
    """One runner task on a Dask worker (worker/dask_host.run_jobs) as the
    server knows it: what it was handed and what it may still say."""
    __slots__ = ("key", "worker", "ready", "seq", "expect", "handed", "ended", "idle_since", "over")

    def __init__(self, key: str, worker: str):
        self.key, self.worker = key, worker
        self.ready = False               # it said so: it runs on its worker, waiting for a job
        self.seq: Optional[int] = None   # the job handed to it, until its result comes
        self.expect: Optional[int] = None   # the one job whose RunnerResult it may send
        self.handed = 0                  # jobs handed to it (its return: how many it took)
        self.ended = False               # retired or over: no more jobs for it
        self.over = False                # its RunnerEnded came
        self.idle_since = 0.0            # monotonic time its last job ended


class _Bridge:
    """One bridge process and our end of its channel."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, gen: int, reader: bridgeproto.FrameReader):
        self.proc, self.sock, self.gen, self.reader = proc, sock, gen, reader
        self.started = time.monotonic()


class DaskExecutor:
    """Runs the state's jobs on a Dask cluster through a bridge process, at
    most ``slots`` at once (and never more than the cluster's threads). The
    same face as the Supervisor for the Service: ``slots``, ``envs``,
    ``wake``, ``dispatch_now``, ``set_slots``, ``start``, ``stop``.

    ``bridge_uid``: the user the bridge runs as (-1: the server's own);
    raises ``DaskUnreachable`` if its scheduler cannot be reached."""

    def __init__(self, state: QueueState, slots: int, address: str,
                 logs: Optional[LogBook] = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 bridge_uid: int = -1, max_message: int = bridgeproto.DEFAULT_MAX_MESSAGE):
        self.state = state
        self.slots = slots
        self.address = address
        self.logs = logs
        self.connect_timeout = connect_timeout
        self.bridge_uid = bridge_uid
        self.max_message = max_message
        self.envs: Dict[int, Any] = {}
        self.token = os.urandom(4).hex()     # keys of two servers (or runs) never meet
        self.cluster: Dict[str, int] = {}    # Dask worker address -> its threads
        self.connected = False               # the bridge is connected to the scheduler
        self._runners: Dict[str, _Runner] = {}   # runner key -> runner
        self._gone: "collections.OrderedDict[str, _Runner]" = collections.OrderedDict()
        self._running: Dict[int, _Runner] = {}   # seq -> the runner it was handed to
        self._n_runners = 0                  # runners started (their keys' numbers)
        self._next_retire: Optional[float] = None   # monotonic time an idle runner is due to retire
        #: why runners failed before they were ready: each fails one waiting
        #: job (as a task per job would), so that a cluster that cannot run
        #: ours (ezpq_mgr missing there) is told, not retried forever
        self._start_failures: List[str] = []
        #: running jobs we asked their host to kill: seq -> (status, why)
        self._killing: Dict[int, Tuple[JobStatus, str]] = {}
        self._cv = threading.Condition()
        self._inbox: "collections.deque[tuple]" = collections.deque()
        self._woken = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._bridge: Optional[_Bridge] = None
        self._gen = 0                        # bridges started
        self._next_start: Optional[float] = None   # monotonic time the next bridge is due
        self._backoff = BACKOFF_FIRST
        self._first_word_in = float(os.environ.get(FIRST_WORD_ENV) or connect_timeout + BRIDGE_BOOT)
        #: a new bridge's first word (connected or not) is due by then
        #: (monotonic); one that says nothing is ended like one that broke
        self._first_word_by: Optional[float] = None
        #: the bridge's own log lines and failed kills: whoever controls the
        #: cluster decides how many (logged by the reader thread, never under the lock)
        self._bridge_log = RateLimitedLog(logger)
        #: runners of an ended bridge: they wait on their inboxes, holding a
        #: Dask thread, until the next bridge tells them to end
        self._orphans: List[str] = []
        self._launch()
        self._await_connected()

    # ---------------------------------------------------------------- bridge
    def _launch(self) -> None:
        """Start a bridge: a fresh interpreter (exec, never a fork of the
        server), only its channel open, dropping to ``bridge_uid`` before
        it imports distributed."""
        ours, theirs = socket.socketpair()
        plan = os.environ.get(MISBEHAVE_ENV, "").split("/")
        misbehave = (plan[self._gen] or None) if self._gen < len(plan) else None
        self._gen += 1
        env = {"PATH": _USER_PATH}
        if self.bridge_uid < 0 and os.environ.get("HOME"):
            env["HOME"] = os.environ["HOME"]   # the server's user's Dask config
        try:
            proc = subprocess.Popen(
                exec_argv(theirs.fileno(), self.bridge_uid, self.address, self.connect_timeout, self.token,
                          f"ezpq-{self.token}-{self._gen}", misbehave),
                pass_fds=(theirs.fileno(),), close_fds=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        self._bridge = _Bridge(proc, ours, self._gen, bridgeproto.FrameReader(bridgeproto.TO_SERVER,
                                                                              self.max_message))

    def _await_connected(self) -> None:
        """At start: the bridge's first word, before the server says it is up."""
        bridge = self._bridge
        deadline = time.monotonic() + self.connect_timeout + BRIDGE_BOOT
        msgs: List[tuple] = []
        why = None
        try:
            while not msgs:
                left = deadline - time.monotonic()
                if left <= 0:
                    why = "the Dask bridge did not start in time"
                    break
                bridge.sock.settimeout(left)
                data = bridge.sock.recv(1 << 16)
                if not data:
                    why = f"the Dask bridge ended as it started (exit code {bridge.proc.wait(5)})"
                    break
                msgs = bridge.reader.feed(data)
        except (OSError, bridgeproto.ProtocolError, subprocess.TimeoutExpired) as e:
            why = f"the Dask bridge failed as it started: {e}"
        finally:
            bridge.sock.settimeout(None)
        first = msgs[0] if msgs else None
        if isinstance(first, m.BridgeConnected):
            self.connected = True
            for msg in msgs[1:]:
                self._post(("msg", bridge.gen, msg))
            return
        self._kill_bridge()
        if isinstance(first, m.BridgeUnreachable):
            if first.fatal:
                raise RuntimeError(first.why)
            raise DaskUnreachable(first.why if self.address in first.why
                                  else f"cannot reach the Dask scheduler at {self.address}: {first.why}")
        raise RuntimeError(why or "the Dask bridge said something else than that it connected")

    def _kill_bridge(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is None:
            return
        try:
            bridge.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        bridge.sock.close()
        if bridge.proc.poll() is None:
            try:
                bridge.proc.send_signal(signal.SIGKILL)
            except OSError:
                pass
        try:
            bridge.proc.wait(10)
        except subprocess.TimeoutExpired:
            logger.warning("dask: the bridge (pid %s) did not end", bridge.proc.pid)

    def _read_bridge(self, bridge: _Bridge) -> None:
        """The reader thread of one bridge: its messages, decoded and
        checked here (never under the state's lock), posted to the loop."""
        unasked = TokenBucket(UNASKED_RATE, UNASKED_BURST)
        while True:
            try:
                data = bridge.sock.recv(1 << 20)
            except OSError as e:
                self._post(("broken", bridge.gen, f"its channel failed ({e})"))
                return
            if not data:
                code = bridge.proc.poll()
                self._post(("broken", bridge.gen, "it ended" + ("" if code is None else f" (exit code {code})")))
                return
            try:
                msgs = bridge.reader.feed(data)
            except bridgeproto.ProtocolError as e:
                self._post(("broken", bridge.gen, f"it broke protocol ({e})"))
                return
            for msg in msgs:
                kind = type(msg)
                if kind in _UNASKED:
                    cost = 1 + (len(msg.workers) + len(msg.left)) // 1000 if kind is m.ClusterNow else 1
                    if not unasked.take(cost):
                        self._post(("broken", bridge.gen, f"it sent more than {UNASKED_BURST:g} messages at "
                                    f"once, or {UNASKED_RATE:g} a second, that were not answers"))
                        return
                    if kind is m.BridgeLog:   # logged here, never under the state's lock, a few a second
                        self._bridge_log(max(msg.level, logging.DEBUG), "dask bridge: %s", " ".join(
                            msg.text[:2000].split()).encode("ascii", "backslashreplace").decode())
                        continue
                self._post(("msg", bridge.gen, msg))

    def _tell(self, msgs: List[tuple]) -> None:
        """Send the bridge these messages (outside the lock); a bridge that
        does not take them is ended."""
        bridge = self._bridge
        if bridge is None or not msgs:
            return
        try:
            bridge.sock.sendall(b"".join(bridgeproto.encode(msg) for msg in msgs))
        except OSError as e:
            self._post(("broken", bridge.gen, f"it does not read its channel ({e})"))

    def _end_bridge(self, why: str) -> None:
        """End the bridge (it broke the rules, died or cannot connect): its
        running jobs lost (or waiting again with retries), a new one later."""
        bridge = self._bridge
        if bridge is not None and time.monotonic() - bridge.started > BACKOFF_RESET:
            self._backoff = BACKOFF_FIRST
        self._kill_bridge()
        self._first_word_by = None
        with self.state.cond:
            self.connected = False
            self.cluster = {}
            self._orphans += [r.key for r in self._runners.values()]
            self._orphans += [r.key for r in self._gone.values() if not r.over]
            self._lose_all(f"the Dask bridge was replaced while the job ran: {why}")
            self._gone.clear()
        self._next_start = time.monotonic() + self._backoff
        logger.warning("dask: the bridge to %s was ended: %s; a new one starts in %g s",
                       self.address, why, self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    # ------------------------------------------------------------ lifecycle
    def start(self, prestart: bool = True) -> None:
        self._start_reader()
        self._thread = threading.Thread(target=self.run, name="ezpq-dask", daemon=True)
        self._thread.start()

    def _start_reader(self) -> None:
        bridge = self._bridge
        if bridge is not None:
            threading.Thread(target=self._read_bridge, args=(bridge,), name="ezpq-dask-bridge",
                             daemon=True).start()

    def stop(self) -> None:
        """Running jobs end ``lost``; the bridge cancels the runners, takes
        our plugin off the workers (killing its processes there) and exits."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(10)
        with self.state.cond:
            self._lose_all("the server stopped while it ran")
        bridge = self._bridge
        if bridge is not None:
            self._tell([m.StopBridge()])
            try:
                bridge.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
            self._kill_bridge()

    def wake(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify()

    def dispatch_now(self) -> None:
        self.wake()

    def set_slots(self, n: int) -> None:
        with self.state.cond:
            self.slots = n
        self.wake()

    def _post(self, item: tuple) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._woken or self._stopping):
                    wait = None
                    if self._next_retire is not None:
                        wait = max(0.0, self._next_retire - time.monotonic())
                    for at in (self._next_start, self._first_word_by):
                        if at is not None:
                            due = max(0.0, at - time.monotonic())
                            wait = due if wait is None else min(wait, due)
                    if wait == 0.0:
                        break
                    self._cv.wait(wait)
                if self._stopping:
                    return
                items = list(self._inbox)
                self._inbox.clear()
                self._woken = False
            self._round(items)
            if self.logs is not None and self.logs.doomed:
                self.logs.sweep()

    def _round(self, items: List[tuple]) -> None:
        gen = self._bridge.gen if self._bridge is not None else None
        msgs = [item[2] for item in items if item[0] == "msg" and item[1] == gen]
        broken = next((item[2] for item in items if item[0] == "broken" and item[1] == gen), None)
        if broken is None:
            try:
                grown = self._append_logs(msgs)
                tell = self._handle(msgs, grown)
            except _Unreachable as e:
                broken, tell = f"it cannot reach the scheduler ({e})", []
            except _Violation as e:
                broken, tell = f"it broke protocol ({e})", []
        if broken is None and self._first_word_by is not None and time.monotonic() >= self._first_word_by:
            broken = f"it did not say whether it connected within {self._first_word_in:g} s"
        if broken is not None:
            self._end_bridge(broken)
            tell = []
        if self._bridge is None and self._next_start is not None and time.monotonic() >= self._next_start:
            self._next_start = None
            try:
                self._launch()
                self._start_reader()
                self._first_word_by = time.monotonic() + self._first_word_in
            except OSError as e:
                self._next_start = time.monotonic() + self._backoff
                logger.warning("dask: cannot start a bridge: %s", e)
        self._tell(tell)

    def _known(self, key: str) -> _Runner:
        runner = self._runners.get(key) or self._gone.get(key)
        if runner is None:
            raise _Violation(f"runner {key!r} is not one we started")
        return runner

    def _append_logs(self, msgs: List[tuple]) -> bool:
        """Each result's log appended to its job's (outside the lock), after
        checking that it is the job handed to that runner."""
        grown = False
        for msg in msgs:
            if type(msg) is m.RunnerResult:
                runner = self._known(msg.runner)
                if runner.expect != msg.seq:
                    raise _Violation(f"a result for job {msg.seq}, not the one handed to runner {msg.runner!r}")
                runner.expect = None
                if self.logs is not None and msg.log and self._running.get(msg.seq) is runner:
                    rec = self.state.records.get(msg.seq)
                    if rec is not None:
                        grown = self.logs.append(self.logs.sink(msg.seq, rec.uid), msg.log) or grown
        return grown

    def _handle(self, msgs: List[tuple], grown: bool) -> List[tuple]:
        """The bridge's messages, in order, under the lock; then what to
        tell it (kills, retirements, jobs, new runners)."""
        tell: List[tuple] = []
        now = time.monotonic()
        with self.state.cond:
            if grown:
                self.state._changed()
            for msg in msgs:
                kind = type(msg)
                if kind is m.RunnerResult:
                    self._record(msg, now)
                elif kind is m.RunnerReady:
                    runner = self._known(msg.runner)
                    if runner.ready:
                        raise _Violation(f"runner {msg.runner!r} said it was ready twice")
                    runner.ready, runner.idle_since = True, now
                elif kind is m.RunnerEnded:
                    runner = self._known(msg.runner)
                    if runner.over:
                        raise _Violation(f"runner {msg.runner!r} ended twice")
                    self._runner_ended(runner, msg)
                elif kind is m.RunnerBroken:
                    runner = self._known(msg.runner)
                    if msg.seq is None:
                        if runner.ready:
                            raise _Violation(f"runner {msg.runner!r} failed to start once it was ready")
                        if msg.runner in self._runners:
                            self._start_failures.append(msg.why)
                    else:
                        if runner.expect != msg.seq:
                            raise _Violation(f"runner {msg.runner!r} was not handed job {msg.seq}")
                        runner.expect = None
                        if self._running.get(msg.seq) is runner:
                            self._end(msg.seq, JobStatus.LOST, -9, msg.why)
                    if msg.runner in self._runners:
                        self._drop(runner)
                        tell.append(m.ReleaseRunner(runner.key))
                elif kind is m.KillFailed:
                    runner = self._known(msg.runner)
                    self._bridge_log(logging.WARNING, "dask: cancel of job %s on %s failed: %s", msg.seq,
                                     runner.worker, msg.why)
                    if self._running.get(msg.seq) is runner and msg.seq in self._killing:
                        self._end(msg.seq, JobStatus.LOST, -9, msg.why)
                elif kind is m.ClusterNow:
                    self._cluster(msg, tell)
                elif kind is m.BridgeConnected:
                    self.connected = True
                    self._first_word_by = None
                    tell.extend(m.ReleaseRunner(key) for key in self._orphans)
                    self._orphans = []
                elif kind is m.BridgeDisconnected:
                    self.connected = False
                    self.cluster = {}
                    self._lose_all(f"the connection to the Dask scheduler at {self.address} was lost "
                                   f"while the job ran")
                elif kind is m.BridgeUnreachable:
                    raise _Unreachable(msg.why)
                else:
                    raise _Violation(f"a {kind.__name__} message")
            for runner, seq, why in self._take_kills():
                tell.append(m.KillOnRunner(runner.key, runner.worker, seq, why))
            tell.extend(self._retire_idle())
            tell.extend(self._dispatch())
        return tell

    def _cluster(self, msg: m.ClusterNow, tell: List[tuple]) -> None:
        """The cluster's workers now: the runners of those that left are
        given up, their jobs lost (or waiting again with retries). Caller holds the lock."""
        self.cluster = dict(msg.workers)
        if self.cluster:
            logger.info("dask: %s workers, %s threads", len(self.cluster), sum(self.cluster.values()))
        left = set(msg.left)
        for runner in list(self._runners.values()):
            if runner.worker in left or runner.worker not in self.cluster:
                if runner.seq is not None and self._running.get(runner.seq) is runner:
                    self._end(runner.seq, JobStatus.LOST, -9, self._why_lost(runner))
                self._drop(runner)
                tell.append(m.ReleaseRunner(runner.key))

    def _retire_idle(self) -> List[tuple]:
        """Runners idle for RUNNER_IDLE: no more jobs for them; told to
        end. Until their tasks end their threads count as used. Caller holds the lock."""
        now = time.monotonic()
        retire, self._next_retire = [], None
        for runner in self._runners.values():
            if runner.ready and runner.seq is None and not runner.ended:
                due = runner.idle_since + RUNNER_IDLE
                if due <= now:
                    runner.ended = True
                    retire.append(m.RetireRunner(runner.key))
                elif self._next_retire is None or due < self._next_retire:
                    self._next_retire = due
        return retire

    def _why_lost(self, runner: _Runner) -> str:
        if not self.connected:
            return (f"the connection to the Dask scheduler at {self.address} was lost "
                    f"while the job ran")
        return f"the Dask worker {runner.worker} left while it ran the job"

    def _runner_ended(self, runner: _Runner, msg: m.RunnerEnded) -> None:
        """A runner's task is over. It ended by itself (idle, or told to):
        its count says whether it took the job last handed to it, which
        else waits again. Or it failed, or Dask cancelled it (its worker or
        the scheduler gone): its job is lost. Caller holds the lock."""
        runner.over = True
        if self._runners.pop(runner.key, None) is not None:
            self._forget(runner)
        runner.ended = True
        if not runner.ready and msg.how == "error":
            self._start_failures.append(f"the Dask runner on {runner.worker} failed as it started: {msg.why}")
        seq = runner.seq
        if seq is None or self._running.get(seq) is not runner:
            return
        if msg.how == "finished":
            if msg.taken == runner.handed:
                return   # it took it: its result is on its way
            if msg.taken == runner.handed - 1:
                del self._running[seq]
                runner.seq = runner.expect = None
                self.state.requeue(seq)   # never began: waits again where it was
                return
            why = f"the Dask runner on {runner.worker} ended with a wrong count ({msg.taken!r})"
        elif msg.how == "error":
            why = f"the Dask runner on {runner.worker} failed: {msg.why}"
        elif self.connected and runner.worker in self.cluster:
            why = f"the Dask runner on {runner.worker} was cancelled while it ran the job"
        else:
            why = self._why_lost(runner)
        self._end(seq, JobStatus.LOST, -9, why)

    def _forget(self, runner: _Runner) -> None:
        """Keep a given-up runner a while: its late messages are taken quietly."""
        self._gone[runner.key] = runner
        while len(self._gone) > KEEP_GONE:
            self._gone.popitem(last=False)

    def _drop(self, runner: _Runner) -> None:
        """Give up a runner (its worker left). Caller holds the lock."""
        runner.ended = True
        if self._runners.pop(runner.key, None) is not None:
            self._forget(runner)
        if runner.seq is not None and self._running.get(runner.seq) is runner:
            del self._running[runner.seq]
        runner.seq = None

    def _lose_all(self, why: str) -> None:
        """Every running job lost, every runner forgotten (the scheduler,
        the bridge or the server gone). Caller holds the lock."""
        for seq in list(self._running):
            self._end(seq, JobStatus.LOST, -9, why)
        for runner in list(self._runners.values()):
            self._drop(runner)

    def _end(self, seq: int, status: JobStatus, exitcode: int, why: str) -> None:
        """Record a job that will send no result (one being killed ends as
        it was asked to). Caller holds the lock."""
        runner = self._running.pop(seq, None)
        if runner is not None and runner.seq == seq:
            runner.seq = None
        asked = self._killing.pop(seq, None)
        if asked is not None:
            status, why, exitcode = asked[0], asked[1], -9
        host = _host_of(runner.worker) if runner is not None else None
        self.state.finish(seq, Outcome(status, exitcode, exception=why, host=host))

    def _take_kills(self) -> List[Tuple[_Runner, int, str]]:
        """Cancels and skips of running jobs: the runners to tell returned.
        Each is recorded when its runner's result comes (the figures it had
        used by then, read on its host before the kill, as a local kill
        has), with the status and reason asked for. Caller holds the lock."""
        kills = []
        for seq, status, why in self.state.take_kill_requests():
            runner = self._running.get(seq)
            if runner is None or seq in self._killing:
                continue
            self._killing[seq] = (status, why)
            kills.append((runner, seq, why))
        return kills

    # ------------------------------------------------------------- dispatch
    def _dispatch(self) -> List[tuple]:
        """Hand jobs to free runners while we have a slot, the last one used
        first (so that the others go idle and retire); when none is free and
        a job waits, start runners on workers with a thread to spare. A job
        is picked only for a runner that said it is ready: one that never
        started (its worker left first, or busy with another's task) holds
        no job, and the order is decided when a runner can take it. Caller
        holds the lock."""
        if self._bridge is None or not self.connected or not self.cluster:
            return []
        sends: List[tuple] = []
        while self._start_failures:
            rec = self.state.pick()
            if rec is None:
                break
            self.state.finish(rec.seq, Outcome(JobStatus.LOST, -9, exception=self._start_failures.pop(0)))
        cap = min(self.slots, sum(self.cluster.values()))
        free = [r for r in self._runners.values() if r.ready and r.seq is None and not r.ended]
        while self.state.n_running < cap and free:
            rec = self.state.pick()
            if rec is None:
                break
            runner = free.pop()
            rec.pid, rec.host = None, _host_of(runner.worker)   # the pid is the host's, known at the end
            env = self.envs.get(rec.env_id)
            runner.seq = runner.expect = rec.seq
            runner.handed += 1
            self._running[rec.seq] = runner
            self._runners[runner.key] = self._runners.pop(runner.key)   # most recently used last
            sends.append(m.RunOnRunner(runner.key, rec.seq, rec.fn_blob, rec.args_blob,
                                       None if env is None else json.dumps(list(env)), rec.runner == "thread",
                                       float(rec.timeout or 0), rec.max_memory))
        starting = sum(1 for r in self._runners.values() if not r.ready and not r.ended)
        room = cap - self.state.n_running - starting
        if free or room <= 0:
            return sends
        seen: List[Any] = []
        self.state.pick(lambda rec: seen.append(rec) or False)   # only looks: is a job runnable?
        if not seen:
            return sends
        # runners already starting will take as many waiting jobs: only the
        # rest need new ones (a round before the first is ready starts no second)
        room = min(room, sum(q.n_waiting for q in self.state.queues.values()) - starting)
        used: Dict[str, int] = collections.Counter(r.worker for r in self._runners.values())
        spare = {w: n - used.get(w, 0) for w, n in self.cluster.items()}
        for _ in range(room):
            worker = max(spare, key=spare.get)
            if spare[worker] <= 0:
                break
            spare[worker] -= 1
            self._n_runners += 1
            runner = _Runner(f"ezpq-{self.token}-{self._gen}-r{self._n_runners}", worker)
            self._runners[runner.key] = runner
            sends.append(m.StartRunner(runner.key, worker))
        return sends

    # -------------------------------------------------------------- results
    def _record(self, msg: m.RunnerResult, now: float) -> None:
        """A job's result (checked in _append_logs: the job handed to that
        runner). Caller holds the lock."""
        runner = self._known(msg.runner)
        seq = msg.seq
        if runner.seq == seq:
            runner.seq, runner.idle_since = None, now
        if self._running.get(seq) is not runner:   # ended meanwhile (its worker left)
            return
        del self._running[seq]
        fig = msg.figures or m.NO_FIGURES
        outcome = Outcome(JobStatus(msg.status), msg.exitcode, msg.output, msg.exception, fig.cpu_user,
                          fig.cpu_system, fig.max_rss, fig.max_rss_method, fig.max_rss_children, msg.pid,
                          msg.host, msg.started, msg.ended)
        asked = self._killing.pop(seq, None)
        if asked is not None:   # as asked, with what it had used by then
            outcome = outcome._replace(status=asked[0], exception=asked[1], output_blob=None,
                                       exitcode=outcome.exitcode if outcome.exitcode and
                                       outcome.exitcode < 0 else -9)
        self.state.finish(seq, outcome)


class _Unreachable(_Violation):
    """A (replacement) bridge could not connect: it exits; another is tried later."""


def _host_of(worker: str) -> str:
    """The host part of a Dask address (tcp://10.0.0.5:40123 -> 10.0.0.5)."""
    rest = worker.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
