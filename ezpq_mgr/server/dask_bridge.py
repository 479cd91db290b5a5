"""The Dask bridge: the process that holds the ``distributed.Client`` of a
server that runs its jobs on Dask, so that the server itself never does.

Why a process of its own: Dask's wire protocol unpickles whatever the
scheduler sends a client (``distributed.protocol`` calls ``pickle.loads``
on any pickled sub-header, whatever the client's deserializers say), and
schedulers are commonly unauthenticated; even with TLS every job on a Dask
worker can read that worker's credentials. So whoever reaches the
scheduler or a worker can run code in the process that holds our client.
That process is this one: on a root server it is a fresh interpreter
exec'd by the server that drops to an unprivileged user (``ezpq-server
--dask-user``, default ``nobody``) before it imports ``distributed`` or
connects, with only its channel to the server open; the server reads what
it says as it reads a worker (bridgeproto.py: no pickle, every field
checked, a Result only for the job it handed that runner) and replaces a
bridge that breaks the rules.

Everything that talks to Dask lives here: the runners (Dask tasks, one per
worker thread we use, worker/dask_host.run_jobs), their inboxes and the
results queue (``distributed.Queue``), the plugin on the workers, worker
membership (topic ``all`` and ``Client.nthreads``), kills
(``Client.run``) and reconnects. What decides (which job, which runner,
when one retires, what a job's end means) is the server's
(dask_executor.py)::

    server (DaskExecutor) ══ socketpair, bridgeproto ══ bridge ── distributed.Client ── scheduler
       StartRunner / RunOnRunner / KillOnRunner / Retire / Release / StopBridge ──>
       <── Connected / Cluster / RunnerReady / RunnerResult / RunnerEnded / Broken / Log

It is started as ``python -I -c ... exec_main()`` with its channel's
descriptor, the uid to run as (-1: stay), the scheduler's address, the
connect timeout, the server's token (our plugin's name on the workers),
the prefix of this bridge's queues and a test hook (``-`` normally). It exits when the channel closes (the
server died) or at ``StopBridge``.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from .. import messages as m
from . import bridgeproto

logger = logging.getLogger(__name__)

__all__ = ["exec_main", "exec_argv", "Bridge", "check_host_result"]

RECONNECT_INTERVAL = 2.0         # seconds between tries once the client gave up
#: while jobs run, the cluster's workers are read this often (seconds), in
#: case a worker left without its event reaching us; an idle bridge never looks
LOOK_INTERVAL = 5.0
#: how often our client sends its batched messages (a runner's submit, a
#: queue's release) to the scheduler: Dask's client waits up to 10 ms; its
#: workers use 2 ms
CLIENT_BATCH_INTERVAL = 0.002
#: a runner that hears nothing for this long (seconds) takes its server for
#: dead and ends (the server retires idle ones long before)
RUNNER_ORPHAN = 60.0
#: (test hook "log-flood") how many lines a flooding bridge sends
LOG_FLOOD = 5000

#: stdlib packages whose submodules are imported before dropping root: the
#: interpreter's own files may be readable by root only, and distributed
#: imports these lazily
_PRELOAD_PACKAGES = ("asyncio", "concurrent", "email", "encodings", "http", "importlib", "json", "logging",
                     "multiprocessing", "urllib", "xml", "collections", "ctypes", "sqlite3", "zoneinfo")
_NO_PRELOAD = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__",
                         "_tkinter", "lib2to3", "ensurepip", "venv", "pydoc_data", "test", "unittest", "doctest",
                         "pydoc", "tty", "pty", "curses", "_curses", "_curses_panel", "readline", "dbm",
                         "msilib", "winreg", "winsound", "nt", "msvcrt"})


def exec_argv(channel_fd: int, uid: int, address: str, connect_timeout: float, token: str, prefix: str,
              misbehave: Optional[str] = None) -> List[str]:
    """The command line of a bridge (``-I``: no PYTHON* variable or user
    site of the server's environment applies)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from ezpq_mgr.server.dask_bridge import exec_main; exec_main()")
    return [sys.executable, "-I", "-c", code, str(channel_fd), str(uid), address, repr(connect_timeout), token,
            prefix, misbehave or "-"]


def _preload_stdlib() -> None:
    """Import the standard library before dropping root (see _PRELOAD_PACKAGES);
    never ``distributed``: nothing of Dask runs as root."""
    import importlib
    import pkgutil
    names = getattr(sys, "stdlib_module_names", ())
    # private modules come with their public ones (``_asyncio`` imported
    # before ``asyncio`` leaves asyncio's tasks unseen by its timeouts)
    for name in sorted(n for n in set(names) - _NO_PRELOAD if not n.startswith("_")) or ("asyncio", "json", "logging", "socket", "ssl"):
        try:
            importlib.import_module(name)
        except Exception:
            pass
    for pkg in _PRELOAD_PACKAGES:
        mod = sys.modules.get(pkg)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), pkg + "."):
            if ".test" in info.name or "idle" in info.name or "__main__" in info.name:
                continue
            try:
                importlib.import_module(info.name)
            except Exception:
                pass


def exec_main() -> None:
    """Entry point: ``channel uid address timeout token prefix misbehave``."""
    fd, uid = int(sys.argv[1]), int(sys.argv[2])
    address, timeout, token, prefix, misbehave = sys.argv[3], float(sys.argv[4]), *sys.argv[5:8]
    if uid >= 0 and os.geteuid() == 0 and uid != 0:
        _preload_stdlib()
        from ..worker.run import become_user
        become_user(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            os._exit(3)
    sock = socket.socket(fileno=fd)
    bridge = Bridge(sock, address, timeout, token, prefix, None if misbehave == "-" else misbehave)
    bridge.serve()
    os._exit(0)


class _ChannelLog(logging.Handler):
    """The bridge's warnings, as BridgeLog lines in the server's log."""

    def __init__(self, bridge: "Bridge"):
        super().__init__(logging.WARNING)
        self.bridge = bridge

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bridge.send(m.BridgeLog(record.levelno, bridgeproto.text(record.getMessage(), 2000)))
        except Exception:
            pass


class _Runner:
    """One runner task on a Dask worker and its inbox."""
    __slots__ = ("key", "worker", "inbox", "future", "seq")

    def __init__(self, key: str, worker: str):
        self.key, self.worker = key, worker
        self.inbox: Any = None
        self.future: Any = None
        self.seq: Optional[int] = None   # the job handed to it, until its result comes


class Bridge:
    """The Dask side of a DaskExecutor, driven by the server's messages."""

    def __init__(self, sock: socket.socket, address: str, connect_timeout: float, token: str, prefix: str,
                 misbehave: Optional[str] = None):
        self.sock = sock
        self.address = address
        self.connect_timeout = connect_timeout
        self.token = token
        self.plugin = f"ezpq-{token}"
        self.misbehave = misbehave
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._inbox: "collections.deque[tuple]" = collections.deque()
        self._stopping = False
        self._runners: Dict[str, _Runner] = {}
        self.cluster: Dict[str, int] = {}
        self._left: List[str] = []
        self._look = True
        self._next_look = 0.0
        self._next_try = 0.0
        self._client: Any = None
        self._comm: Any = None
        self._lost = False                   # said Disconnected, not yet Connected again
        self._outbox: Any = None
        self._outbox_name = f"{prefix}-results"   # one per bridge: a replaced one's runners never reach us
        self._started: set = set()           # runner keys we started: only their results go to the server
        self._outbox_set = threading.Event()

    # --------------------------------------------------------------- channel
    def send(self, msg: tuple) -> None:
        data = bridgeproto.encode(msg)
        with self._send_lock:
            self.sock.sendall(data)

    def _read_channel(self) -> None:
        """The server's messages, posted to the loop; EOF: the server is gone."""
        reader = bridgeproto.FrameReader(bridgeproto.TO_BRIDGE)
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            try:
                msgs = reader.feed(data) if data else None
            except bridgeproto.ProtocolError:
                msgs = None
            if msgs is None:
                os._exit(1)   # the server died: our client's end releases our runners
            for msg in msgs:
                self._post(("cmd", msg))

    # ------------------------------------------------------------- lifecycle
    def serve(self) -> None:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger().addHandler(_ChannelLog(self))
        logging.getLogger("distributed").setLevel(logging.ERROR)
        if self.misbehave == "silent-start":   # (test hook) never says whether it connected; leaves with the server
            while self.sock.recv(1 << 16):
                pass
            return
        try:
            self._client = self._connect()
        except Exception as e:
            fatal = not isinstance(e, ConnectionError)
            self.send(m.BridgeUnreachable(bridgeproto.text(str(e)), fatal))
            return
        self.send(m.BridgeConnected())
        if self.misbehave == "log-flood":   # (test hook) one line of its own words after another
            self.misbehave = None
            for i in range(LOG_FLOOD):
                self.send(m.BridgeLog(logging.WARNING, f"flood {i}"))
        threading.Thread(target=self._read_channel, name="ezpq-bridge-channel", daemon=True).start()
        threading.Thread(target=self._read_results, name="ezpq-bridge-results", daemon=True).start()
        self.run()

    def _connect(self):
        try:
            from distributed import Client
        except ImportError:
            raise RuntimeError("running jobs on Dask needs the distributed package "
                               "(pip install 'ezpq_mgr[dask]')") from None
        try:
            client = Client(self.address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise ConnectionError(f"cannot reach the Dask scheduler at {self.address}: "
                                  f"{' '.join(str(e).split()) or type(e).__name__}") from None
        try:
            self._setup(client)
        except BaseException:
            client.close()
            raise
        return client

    def _setup(self, client) -> None:
        """On a (new) scheduler: our plugin on every worker, its events
        followed, our results queue there."""
        from distributed import Queue
        from ..worker.dask_host import EzpqPlugin
        client.register_plugin(EzpqPlugin(self.plugin), name=self.plugin)
        client.subscribe_topic("all", self._on_event)
        self._comm = client.scheduler_comm
        if hasattr(self._comm, "interval"):
            self._comm.interval = CLIENT_BATCH_INTERVAL
        self._outbox = Queue(self._outbox_name, client=client)
        self._outbox_set.set()
        self._look = True

    def _post(self, item: tuple) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    def _on_event(self, event) -> None:
        """The scheduler's topic ``all`` (on the client's event loop: post only)."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict) and msg.get("action") in ("add-worker", "remove-worker"):
            self._post(("workers", msg.get("worker"), msg.get("action")))

    def _read_results(self) -> None:
        """Each item the runners put in the results queue, posted to the loop."""
        while not self._stopping:
            outbox = self._outbox
            try:
                msg = outbox.get()
            except Exception as e:   # the scheduler is lost: wait for the next one's queue
                if self._stopping:
                    return
                logger.debug("dask: results queue: %s", e)
                self._outbox_set.clear()
                if self._outbox is outbox:
                    self._outbox_set.wait(RECONNECT_INTERVAL)
                continue
            if msg is not None:   # straight to the server: no hand-off to the loop on the hot path
                try:
                    self._result(msg)
                except OSError:
                    os._exit(1)   # the server is gone
                except Exception as e:
                    logger.warning("dask: a result could not be passed on: %s", e)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._stopping):
                    busy = any(r.seq is not None for r in self._runners.values())
                    if self._client is None:
                        wait: Optional[float] = max(0.0, self._next_try - time.monotonic())
                    elif busy or not self.cluster or self._client.status != "running":
                        wait = max(0.0, self._next_look - time.monotonic())
                    else:
                        wait = None
                    if wait == 0.0:
                        self._look = True
                        break
                    self._cv.wait(wait)
                items = list(self._inbox)
                self._inbox.clear()
            if self._round(items):
                return

    def _round(self, items: List[tuple]) -> bool:
        """One turn of the loop; True: stop now."""
        for item in items:
            if item[0] == "workers":
                self._look = True
                if item[2] == "remove-worker" and isinstance(item[1], str):
                    self._left.append(item[1])
        if self._client is None or self._client.status in ("closed", "closing"):
            self._reconnect()
        elif self._client.status == "running" and self._client.scheduler_comm is not self._comm:
            self._resync()
        if self._client is None or self._client.status != "running":
            self._lose("the connection to the Dask scheduler was lost")
        elif self._look:
            self._read_cluster()
        for item in items:
            kind = item[0]
            if kind == "runner":
                self._runner_ended(item[1], item[2])
            elif kind == "cmd":
                if isinstance(item[1], m.StopBridge):
                    self._stop()
                    return True
                self._command(item[1])
        return False

    def _lose(self, why: str) -> None:
        """The scheduler is lost: every runner gone with it (said once)."""
        self.cluster = {}
        self._look = True
        self._runners.clear()
        if not self._lost:
            self._lost = True
            self.send(m.BridgeDisconnected(why))

    def _resync(self) -> None:
        logger.info("dask: reconnected to %s", self.address)
        self._lose("the connection to the Dask scheduler was lost")
        try:
            self._setup(self._client)
        except Exception as e:
            logger.warning("dask: cannot set up on %s again: %s", self.address, e)
            return
        self._lost = False
        self.send(m.BridgeConnected())

    def _reconnect(self) -> None:
        if time.monotonic() < self._next_try:
            return
        old, self._client = self._client, None
        if old is not None:
            try:
                old.close()
            except Exception:
                pass
            self._lose("the connection to the Dask scheduler was lost")
        try:
            self._client = self._connect()
        except Exception as e:
            self._next_try = time.monotonic() + RECONNECT_INTERVAL
            logger.warning("dask: %s (next try in %g s)", e, RECONNECT_INTERVAL)
            return
        self._look = True
        self._lost = False
        self.send(m.BridgeConnected())

    def _read_cluster(self) -> None:
        self._next_look = time.monotonic() + LOOK_INTERVAL
        try:
            cluster = {str(w): int(n) for w, n in dict(self._client.nthreads()).items()}
        except Exception as e:
            logger.warning("dask: cannot read the cluster's workers: %s", e)
            return
        self._look = False
        if cluster != self.cluster or self._left:
            self.cluster = cluster
            left, self._left = self._left, []
            self.send(m.ClusterNow(cluster, left))

    # -------------------------------------------------------------- runners
    def _command(self, msg: tuple) -> None:
        if isinstance(msg, m.StartRunner):
            self._start(msg.runner, msg.worker)
            return
        runner = self._runners.get(msg.runner)
        if runner is None and isinstance(msg, m.ReleaseRunner) and msg.runner not in self._started:
            self._end_orphan(msg.runner)
            return
        if runner is None:   # gone with its worker or the scheduler: the server hears of it
            if isinstance(msg, m.RunOnRunner):
                self.send(m.RunnerBroken(msg.runner, msg.seq, "its Dask runner is gone"))
            return
        if isinstance(msg, m.RunOnRunner):
            import json
            try:
                env = None if msg.env is None else json.loads(msg.env)
                runner.seq = msg.seq
                runner.inbox.put([msg.seq, msg.fn_blob, msg.args_blob, env, msg.as_thread, msg.timeout,
                                  msg.max_memory])
            except Exception as e:
                runner.seq = None
                self.send(m.RunnerBroken(runner.key, msg.seq, bridgeproto.text(f"could not hand the job to "
                                                                                f"Dask: {e}")))
        elif isinstance(msg, m.KillOnRunner):
            try:
                from ..worker.dask_host import kill_job
                self._client.run(kill_job, self.plugin, runner.key, msg.seq, msg.why, workers=[runner.worker],
                                 wait=False)
            except Exception as e:
                self.send(m.KillFailed(runner.key, msg.seq, bridgeproto.text(str(e))))
        elif isinstance(msg, m.RetireRunner):
            try:
                runner.inbox.put(None)   # it returns; its future's end says so
            except Exception as e:
                logger.debug("dask: retiring runner %s: %s", runner.key, e)
        elif isinstance(msg, m.ReleaseRunner):
            self._runners.pop(runner.key, None)
            self._release(runner)

    def _start(self, key: str, worker: str) -> None:
        from distributed import Queue
        from ..worker.dask_host import run_jobs
        runner = _Runner(key, worker)
        self._runners[key] = runner   # before it can say it is ready (read by the results thread)
        self._started.add(key)
        try:
            runner.inbox = Queue(f"{key}-in", client=self._client)
            runner.future = self._client.submit(
                run_jobs, self.plugin, f"{key}-in", self._outbox_name, RUNNER_ORPHAN, key=key,
                workers=[worker], allow_other_workers=False, pure=False, retries=0)
            runner.future.add_done_callback(lambda f, key=key: self._post(("runner", key, f)))
        except Exception as e:
            self._runners.pop(key, None)
            self.send(m.RunnerBroken(key, None, bridgeproto.text(f"could not start a Dask runner on {worker}: {e}")))

    def _end_orphan(self, key: str) -> None:
        """A runner of the bridge this one replaced: it waits on its inbox,
        holding its Dask thread, until told to end."""
        from distributed import Queue
        try:
            inbox = Queue(f"{key}-in", client=self._client)
            inbox.put(None)
            inbox.close()
        except Exception as e:
            logger.debug("dask: ending runner %s of the previous bridge: %s", key, e)

    def _release(self, runner: _Runner) -> None:
        """A given-up runner: its task cancelled (Dask must not run it again
        somewhere; the plugin kills its job's process), told to end, its
        inbox released."""
        if runner.inbox is None:
            return
        try:
            if runner.future is not None and not runner.future.done():
                self._client.cancel([runner.future], force=True)
                runner.inbox.put(None)
            runner.inbox.close()
        except Exception as e:
            logger.debug("dask: releasing runner %s: %s", runner.key, e)

    def _runner_ended(self, key: str, future: Any) -> None:
        runner = self._runners.pop(key, None)
        if runner is None or runner.future is not future:
            return
        taken, why = None, ""
        how = future.status
        if how == "finished":
            try:
                taken = future.result(timeout=1)
            except Exception:
                taken = None
            if type(taken) is not int:
                how, why = "error", f"the Dask runner on {runner.worker} ended with a wrong count ({taken!r})"
                taken = None
        elif how == "error":
            try:
                exc = future.exception(timeout=1)
            except Exception as e:
                exc = e
            why = f"{type(exc).__name__}: {exc}"
        else:
            how = "cancelled"
            why = f"the Dask runner on {runner.worker} was cancelled ({future.status})"
        self.send(m.RunnerEnded(key, how, taken, bridgeproto.text(why)))
        try:
            runner.inbox.close()
        except Exception:
            pass

    def _result(self, msg: Any) -> None:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[1] is None:   # [key, None]: ready
            if isinstance(msg[0], str) and msg[0] in self._runners:
                self.send(m.RunnerReady(msg[0]))
            return
        if not (isinstance(msg, (list, tuple)) and len(msg) == 12 and isinstance(msg[0], str)
                and type(msg[1]) is int):
            logger.warning("dask: a malformed message in the results queue: dropped")
            return
        key, seq = msg[0], msg[1]
        if key not in self._started:
            return
        runner = self._runners.get(key)
        if runner is not None and runner.seq == seq:
            runner.seq = None
        elif runner is not None:
            return
        result = check_host_result(key, seq, msg[2:], "?" if runner is None else runner.worker)
        if self.misbehave == "garbage":
            self.misbehave = None
            with self._send_lock:
                self.sock.sendall(b"\x01\x15\x00\x00\x00\x00\x00\x04junk")
            return
        if self.misbehave == "wrong-seq":
            self.misbehave = None
            result = result._replace(seq=seq + 1000)
        self.send(result)

    def _stop(self) -> None:
        """Cancel the runners, remove our plugin (killing its processes on
        the workers), close the client."""
        self._stopping = True
        client = self._client
        if client is None:
            return
        try:
            for r in list(self._runners.values()):
                self._release(r)
            client.unregister_worker_plugin(self.plugin)
            client.unsubscribe_topic("all")
            if self._outbox is not None:
                self._outbox.put(None)   # the reader's last item
                self._outbox.close()
        except Exception as e:   # the scheduler is gone: its workers' lifelines end the processes
            logger.debug("dask: could not clean up on the scheduler: %s", e)
        try:
            client.close()
        except Exception:
            pass


def check_host_result(key: str, seq: int, res: Any, worker: str) -> m.RunnerResult:
    """A ``HostResult`` as a RunnerResult, checked field by field: anything
    malformed makes the job ``lost``."""
    from ..job import JobStatus
    statuses = {s.value for s in JobStatus}
    try:
        status, exitcode, started, ended, output, exception, figures, pid, host, log = res
        if status not in statuses:
            raise ValueError(f"status {status!r}")
        if not (exitcode is None or type(exitcode) is int) or not (pid is None or type(pid) is int):
            raise TypeError("exitcode/pid")
        if not (output is None or type(output) is bytes) or not (exception is None or type(exception) is str):
            raise TypeError("output/exception")
        if type(host) is not str or type(log) is not bytes:
            raise TypeError("host/log")
        for t in (started, ended):
            if t is not None and type(t) is not float:
                raise TypeError("times")
        if figures is not None:
            cu, cs, rss, method, children = figures
            for x in (cu, cs):
                if x is not None and type(x) is not float:
                    raise TypeError("figures")
            for x in (rss, children):
                if x is not None and type(x) is not int:
                    raise TypeError("figures")
            figures = m.Figures(cu, cs, rss, method, children)
        return m.RunnerResult(key, seq, status, exitcode, started, ended, output, bridgeproto.text(exception),
                              figures, pid, bridgeproto.text(host, 1000), log)
    except (TypeError, ValueError, KeyError) as e:
        return m.RunnerResult(key, seq, JobStatus.LOST.value, -9, None, None, None,
                              f"the Dask worker {worker} sent a malformed result ({type(e).__name__}: {e})",
                              None, None, "", b"")
