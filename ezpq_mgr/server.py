"""The server process: a ``BaseManager`` serving one ``Service``.

``serve()`` builds the state, the worker pool and the manager's listener,
then blocks until it is told to stop: SIGTERM/SIGINT, or, for the private
server of an embedded queue, end-of-file on its stdin (the client closed
it, or died: even a SIGKILLed client closes its end of the pipe, so the
private server never outlives it). Stopping kills every worker's process
tree and removes the socket file.

Run as ``python -m ezpq_mgr.server --embedded`` by ``embedded.py``; the
``ezpq-server`` command (``cli.py``) calls ``serve()`` too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import threading
from multiprocessing.managers import BaseManager
from typing import Optional, Union

from . import wire
from .accounting import AccountingLog
from .replies import ReplyingServer
from .service import Service
from .state import QueueState
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

__all__ = ["ServerManager", "serve"]

_SERVICE: Optional[Service] = None


def _get_service() -> Service:
    if _SERVICE is None:
        raise RuntimeError("no ezpq service in this process")
    return _SERVICE


class ServerManager(BaseManager):
    """The manager both sides use: the server serves, clients connect."""


ServerManager.register("service", callable=_get_service, exposed=Service.EXPOSED)


def serve(address: Union[str, tuple], authkey: bytes, workers: int,
          start_method: Optional[str] = None, prestart: bool = True,
          shared: bool = True, log_file: Optional[str] = None,
          on_ready=None, stop_event: Optional[threading.Event] = None,
          keep_finished: Optional[float] = None) -> None:
    """Run a server until ``stop_event`` is set or SIGTERM/SIGINT arrives.

    ``shared``: several users may connect: JSON on the wire (never pickle),
    per-user queues, jobs run as their submitter when we are root. The
    private server of an embedded queue (one user) passes False.
    ``keep_finished``: drop finished jobs nobody collected after that many
    seconds (None: keep them until collected)."""
    global _SERVICE
    stop = stop_event or threading.Event()
    accounting = AccountingLog(log_file)  # first: an unsafe log file refuses the start (LogFileError)
    state = QueueState()
    supervisor = Supervisor(state, workers, start_method, shared=shared, subreaper=True)
    _SERVICE = Service(state, supervisor, shared=shared, accounting=accounting,
                       keep_finished=keep_finished)
    serializer = wire.SERIALIZER if shared else "pickle"
    try:
        server = ReplyingServer(ServerManager._registry, address, authkey, serializer)
    except BaseException:
        accounting.close()
        raise
    server.state = state
    ours = None
    if isinstance(address, str):
        os.chmod(address, 0o600)
        ours = _identity(address)
        _no_blind_unlink(server.listener)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    supervisor.start(prestart=bool(prestart))
    server.stop_event = threading.Event()  # serve_forever() would make it; we run the accepter ourselves
    threading.Thread(target=server.accepter, name="ezpq-accepter", daemon=True).start()
    logger.info("ezpq server pid %s listening on %s with %s workers", os.getpid(), server.address, workers)
    if on_ready is not None:
        on_ready(server.address)
    try:
        while not stop.wait():
            pass
    finally:
        logger.info("ezpq server stopping")
        server.stop_event.set()
        _SERVICE.close()
        supervisor.stop()
        accounting.close()
        try:
            server.listener.close()
        except OSError:
            pass
        if ours is not None and _identity(address) == ours:
            try:
                os.unlink(address)  # only our own socket: never what replaced it since
            except OSError:
                pass


def _no_blind_unlink(listener) -> None:
    """multiprocessing's Unix listener unlinks its path when closed and at
    exit, whatever is there by then (another server's socket, a file that
    replaced ours); ``serve`` removes its own socket itself instead."""
    inner = getattr(listener, "_listener", None)
    unlink = getattr(inner, "_unlink", None)
    if unlink is not None:
        unlink.cancel()
        inner._unlink = None


def _identity(path: str) -> Optional[tuple]:
    """(device, inode) of the socket at ``path`` (None: none there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _main_embedded() -> None:
    """Private server of one client: config on stdin's first line, stdin EOF = stop.

    ``kill -USR1`` on it prints every thread's stack to its stderr (a wedged
    server can be diagnosed without a debugger)."""
    import faulthandler
    faulthandler.register(signal.SIGUSR1)
    ready_fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
    stdin_fd = os.dup(0)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(stdin_fd, 1)
        if not chunk:
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
    serve(config["address"], bytes.fromhex(config["authkey"]), config["workers"],
          config.get("start_method"), config.get("prestart", True), shared=False,
          on_ready=ready, stop_event=stop)


if __name__ == "__main__":
    if "--embedded" in sys.argv:
        _main_embedded()
