"""The server process: builds the parts, serves until told to stop.

``serve()`` builds the state, the worker pool, the ``Service``, the
listener with its doorman and the connection server, wires the durable
journal in (``--state-dir``), and then blocks until it is told to stop:
SIGTERM/SIGINT, or, for the private server of an embedded queue,
end-of-file on its stdin (the client closed it, or died: even a SIGKILLed
client closes its end of the pipe, so the private server never outlives
it). Stopping kills every worker's process tree and removes the socket file.

``embedded_main`` is that private server's main, run as ``python -m
ezpq_mgr.server --embedded`` (``__main__.py``) by ``client/embedded.py``;
the ``ezpq-server`` command (``cli.py``) calls ``serve()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import select
import shutil
import signal
import stat
import sys
import threading
from typing import List, Optional, Union

from .. import transport, wire
from ..schema import check_dask_address
from . import callers
from .accounting import AccountingLog
from .doorman import Doorman
from .joblogs import DEFAULT_MAX_LOG, LogBook
from .outgoing import Flusher, PeerConnection, UnsentBytes
from .connections import ConnectionServer
from .service import DEFAULT_MAX_USER_BYTES, DEFAULT_MAX_USER_JOBS, Service
from .state import QueueState
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

__all__ = ["serve", "ServerDied"]

class ServerDied(Exception):
    """A server thread died of an unexpected exception: the server stopped
    instead of living on. ``serve`` raises it; the mains (``ezpq-server``,
    the embedded server) exit with status 1, so that systemd restarts it."""


_WORKER_FRAME_LIMIT = (1 << 32) - 1

#: why a root server refuses --dask without --dask-any-user
DASK_AS_ROOT = ("--dask on a server run as root would run every user's jobs as the Dask workers' "
                "user, not as their submitter; add --dask-any-user to accept that")


def serve(address: Union[str, tuple], authkey: bytes, workers: int,
          start_method: Optional[str] = None, prestart: bool = True,
          shared: bool = True, log_file: Optional[str] = None,
          on_ready=None, stop_event: Optional[threading.Event] = None,
          max_message: Optional[int] = transport.DEFAULT_MAX_MESSAGE,
          allow_other_users: bool = False, keep_finished: Optional[float] = None,
          state_dir: Optional[str] = None, sync: str = "normal",
          log_dir: Optional[str] = None, max_log: int = DEFAULT_MAX_LOG,
          dask: Optional[str] = None, dask_any_user: bool = False,
          dask_timeout: Optional[float] = None, dask_user: str = "nobody",
          max_user_jobs: int = DEFAULT_MAX_USER_JOBS, max_user_bytes: int = DEFAULT_MAX_USER_BYTES) -> None:
    """Run a server until ``stop_event`` is set or SIGTERM/SIGINT arrives.

    ``shared``: several users may connect: JSON on the wire (never pickle),
    per-user queues, jobs run as their submitter when we are root. The
    private server of an embedded queue (one user) passes False, and no
    message limit (its client is its owner). ``keep_finished``: drop
    finished jobs nobody collected after that many seconds (None: keep
    them until collected).

    A non-root server serves only its owner's uid over a Unix socket, since
    it cannot run anyone else's jobs as them; ``allow_other_users`` lets
    everyone in, their jobs running as the owner (logged at start).

    ``state_dir``: keep the queue in an SQLite database there (store.py),
    restored at start; ``sync`` "full" also survives a power loss. A
    directory in use, damaged or unwritable raises ``StoreError`` before
    anything is served.

    ``log_dir``: where each job's output goes (joblogs.py; default
    ``<state_dir>/logs`` with a state dir, else a private directory removed
    at the end); ``max_log``: the cap of one job's log, in bytes. An unsafe
    directory raises ``LogDirError`` before anything is served.

    ``max_user_jobs``, ``max_user_bytes``: what one user other than root
    and the owner may hold on a shared server at once (jobs not collected;
    the bytes of their functions, arguments and outputs); 0: no cap.

    ``dask``: run the jobs on the Dask cluster of that scheduler
    (dask_executor.py) instead of local workers; ``workers`` then caps how
    many run at once. Unreachable: ``DaskUnreachable`` (a ConnectionError
    naming it), within ``dask_timeout`` seconds. A shared server run as
    root refuses it (``ValueError``) unless ``dask_any_user``: the jobs
    would run as the Dask workers' user, not as their submitters. The
    Dask client lives in a bridge process (dask_bridge.py); a shared root
    server runs it as ``dask_user`` (an unknown one: ``ValueError``),
    any other as the server's own user.

    Any thread dying of an unexpected exception is logged and stops the
    server with ``ServerDied`` (exit status 1); so does a state database
    that cannot be written any more (disk full)."""
    if dask is not None:
        dask = check_dask_address(dask)
        if shared and os.geteuid() == 0 and not dask_any_user:
            raise ValueError(DASK_AS_ROOT)
        bridge_uid = -1
        if shared and os.geteuid() == 0:
            import pwd
            try:
                bridge_uid = pwd.getpwnam(dask_user).pw_uid
            except KeyError:
                raise ValueError(f"--dask-user: no such user: {dask_user!r}") from None
    stop = stop_event or threading.Event()
    died: List[str] = []

    def thread_died(args) -> None:
        if args.exc_type is SystemExit:
            return
        died.append(getattr(args.thread, "name", "?"))
        logger.critical("server thread %s died; stopping the server",
                        getattr(args.thread, "name", "?"),
                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        stop.set()

    # what start-up opens is closed again if a later step refuses the start;
    # once it is listening, the server's own shutdown closes it
    with contextlib.ExitStack() as opened:
        accounting = AccountingLog(log_file)  # first: an unsafe log file refuses the start (LogFileError)
        opened.callback(accounting.close)
        store = None
        if state_dir is not None:
            from .store import Store
            store = Store(state_dir, sync)
            opened.callback(store.close)
        if log_dir is None and state_dir is not None:
            log_dir = os.path.join(state_dir, "logs")
        logs = LogBook(log_dir, max_log, chown=shared and os.geteuid() == 0)
        opened.callback(logs.close)
        state = QueueState()
        # a worker's messages (a job's output) obey the server's limit; a private
        # server has none, so only the worker format's own 4 GiB frame bound holds
        worker_limit = min(max_message, _WORKER_FRAME_LIMIT) if shared and max_message else _WORKER_FRAME_LIMIT
        if dask is None:
            supervisor = Supervisor(state, workers, start_method, shared=shared, subreaper=True,
                                    max_message=worker_limit, logs=logs, echo=not shared)
        else:
            from .dask_executor import DEFAULT_CONNECT_TIMEOUT, DaskExecutor
            supervisor = DaskExecutor(state, workers, dask, logs=logs,
                                      connect_timeout=dask_timeout or DEFAULT_CONNECT_TIMEOUT,
                                      bridge_uid=bridge_uid, max_message=worker_limit)
        logs.on_doomed = supervisor.wake
        service = Service(state, supervisor, shared=shared, accounting=accounting,
                          keep_finished=keep_finished, logs=logs, max_user_jobs=max_user_jobs,
                          max_user_bytes=max_user_bytes)
        state.seq = accounting.max_job()   # job numbers continue after the log's largest
        if store is not None:
            store.restore(state, service)
            service.count_restored()
        logs.restore(state.records)   # earlier runs' logs: kept for known jobs, else removed
        listener = transport.listen(address)
        opened.pop_all()
    ours = _identity(address) if isinstance(address, str) else None
    previous_hook = threading.excepthook
    threading.excepthook = thread_died
    if not shared:
        max_message = None
    server_stop = threading.Event()
    flusher = Flusher()
    dumps = wire.dumps if shared else _pickle_dumps
    connections = ConnectionServer(service, Service.EXPOSED, state, wire.loads if shared else pickle.loads,
                                   server_stop, one_at_a_time=Service.LISTINGS,
                                   from_the_log=Service.FROM_THE_LOG)
    connections.shared = shared

    unsent = UnsentBytes() if shared else None
    if unsent is not None:
        service.unsent = unsent.of

    def admit(sock, identity, release) -> None:
        conn = PeerConnection(sock, identity, dumps, flusher, max_message, on_close=release, unsent=unsent)
        threading.Thread(target=connections.serve, args=(conn,), name=f"ezpq-client-{identity.user}",
                         daemon=True).start()

    doorman = Doorman(listener, authkey, admit, {"max_message": max_message, "durable": store is not None,
                                                "state_id": None if store is None else store.state_id()},
                      allow_other_users=allow_other_users)
    if store is not None:   # before any job moves: every move is journaled
        def journal_failed(why: str) -> None:
            died.append("ezpq-journal")
            stop.set()
        store.on_failure = journal_failed
        store.attach(state, service)
        state.outbox.hold = store.hold
        connections.barrier = store.barrier
        connections.handed_over = store.handed_over
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    supervisor.start(prestart=bool(prestart))
    threads = [threading.Thread(target=flusher.run, name="ezpq-flusher", daemon=True),
               threading.Thread(target=doorman.run, name="ezpq-doorman", daemon=True)]
    for t in threads:
        t.start()
    where = listener.getsockname()
    logger.info("ezpq server pid %s listening on %s with %s workers%s", os.getpid(), where, workers,
                f" on the Dask cluster at {dask}" if dask else "")
    me = callers.owner()
    if shared and me.uid != 0:
        if allow_other_users:
            logger.warning("--allow-other-users: this server runs as %s, so every user's jobs run as "
                           "%s (and can read %s's files)", me.user, me.user, me.user)
        else:
            logger.info("serving only %s: a server that is not root cannot run jobs as other users",
                        me.user)
    if on_ready is not None:
        on_ready(address if isinstance(address, str) else where[:2])
    try:
        _wait_for_stop(stop)
    finally:
        logger.info("ezpq server stopping")
        server_stop.set()
        doorman.stop()
        flusher.stop()
        for t in threads:
            t.join(5)
        service.close()
        supervisor.stop()
        logs.close()
        if store is not None:
            store.close()
        accounting.close()
        listener.close()
        if ours is not None and _identity(address) == ours:
            try:
                os.unlink(address)  # only our own socket: never what replaced it since
            except OSError:
                pass
        threading.excepthook = previous_hook
    if died:
        raise ServerDied(f"server thread {', '.join(died)} died (its traceback is in the log)")


def _wait_for_stop(stop: threading.Event) -> None:
    """Block until ``stop`` is set, with signal handlers still able to run.

    A SIGTERM may be delivered to any of our threads; Python then runs its
    handler only when the main thread next runs bytecode, which a main
    thread blocked in ``Event.wait()`` never does (a server ignored a
    SIGTERM about once in 20 stops under load). So the main thread waits on
    a pipe that the signal wakeup fd and ``stop`` both write to: no wake-up
    while idle, and every signal handled at once."""
    if threading.current_thread() is not threading.main_thread():
        stop.wait()
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def kick() -> None:
        stop.wait()
        try:
            os.write(w, b"s")
        except OSError:
            pass

    threading.Thread(target=kick, name="ezpq-stop-kick", daemon=True).start()
    try:
        while not stop.is_set():
            select.select([r], [], [])
            os.read(r, 4096)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        # w stays open: the kick thread may still write to it; closed at exit


def _pickle_dumps(msg: tuple) -> bytes:
    """A ``Reply`` as the tuple of its fields (``messages.py``)."""
    return pickle.dumps(tuple(msg), pickle.HIGHEST_PROTOCOL)


def _identity(path: str) -> Optional[tuple]:
    """(device, inode) of the socket at ``path`` (None: none there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def embedded_main() -> None:
    """Private server of one client: config on stdin's first line, stdin EOF = stop.

    ``kill -USR1`` on it prints every thread's stack to its stderr (a wedged
    server can be diagnosed without a debugger)."""
    import faulthandler
    faulthandler.register(signal.SIGUSR1)
    ready_fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
    # known before the config arrives: a client killed right after making
    # its directory (before it could send the config) leaves nothing either
    private_dir = sys.argv[sys.argv.index("--private-dir") + 1] if "--private-dir" in sys.argv else None
    stdin_fd = os.dup(0)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(stdin_fd, 1)
        if not chunk:
            _remove_private_dir(private_dir, os.path.join(private_dir or "", "server.sock"))
            return
        line += chunk
    config = json.loads(line)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.path[:] = config["sys_path"] + [p for p in sys.path if p not in config["sys_path"]]
    logging.basicConfig(level=os.environ.get("EZPQ_LOG_LEVEL", "WARNING"),
                        format="ezpq-server[%(process)d] %(levelname)s %(message)s")
    stop = threading.Event()

    def watch_stdin() -> None:
        # os.read on the raw fd: a thread blocked in sys.stdin would hold its
        # buffer lock across fork() and deadlock the worker's stdin close.
        while os.read(stdin_fd, 4096):
            pass
        stop.set()

    def ready(address) -> None:
        os.write(ready_fd, (json.dumps({"address": address}) + "\n").encode())
        os.close(ready_fd)

    threading.Thread(target=watch_stdin, name="ezpq-lifeline", daemon=True).start()
    from .store import StoreError
    try:
        serve(config["address"], bytes.fromhex(config["authkey"]), config["workers"],
              config.get("start_method"), config.get("prestart", True), shared=False,
              on_ready=ready, stop_event=stop, state_dir=config.get("state_dir"),
              log_dir=config.get("private_dir") and os.path.join(config["private_dir"], "logs"),
              dask=config.get("dask"))
    except (StoreError, ConnectionError) as exc:   # Queue(state_dir=/dask=) that cannot be used: the client says why
        os.write(ready_fd, (json.dumps({"refused": str(exc), "kind": type(exc).__name__}) + "\n").encode())
    except ServerDied as exc:
        logger.critical("%s", exc)
        sys.exit(1)
    finally:
        _remove_private_dir(config.get("private_dir"), config["address"])


def _remove_private_dir(directory: Optional[str], address: str) -> None:
    """The client made ``directory`` (0700) for this server's socket alone.
    The server removes it as it exits, so that a client ended by SIGKILL or
    SIGTERM (which runs no clean-up of its own) leaves nothing in the temp
    dir. Only that directory, only when the socket was in it, and never
    through a symlink: ``rmtree`` refuses to follow one."""
    if not directory or os.path.dirname(address) != directory or os.path.islink(directory):
        return
    shutil.rmtree(directory, ignore_errors=True)

