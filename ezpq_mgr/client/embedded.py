"""The private server of an embedded queue: started, watched, stopped.

The server runs as ``python -m ezpq_mgr.server --embedded`` in a fresh
interpreter (never a fork or spawn of the client), so the client's
``__main__`` is not re-imported there and unguarded scripts work under
every start method. It listens on a Unix socket in a private 0700 temp
directory with a random authkey. Its stdin is a pipe from the client: when
the client closes it, or dies (SIGKILL included), the server stops and
kills its workers, then removes that temp directory itself (a client
ended by SIGKILL or SIGTERM cleans nothing up). It runs in its own session, so a Ctrl+C meant for the
client does not kill it before the client has cleaned up.

A process forked from the client (``os.fork``, a fork-started pool) does not
own the server: right after the fork its copy of the lifeline is pointed at
``/dev/null`` and its copy of the clean-up is dropped, so a long-lived child
neither keeps the server alive after the client dies nor deletes the
server's socket when it exits.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Optional

from ..errors import ServerError

__all__ = ["PrivateServer"]

START_TIMEOUT = 60.0
_LIVE: "weakref.WeakSet[PrivateServer]" = weakref.WeakSet()


SOCKET_NAME = "server.sock"
#: sun_path holds 108 bytes, the terminating NUL included
_MAX_SOCKET_PATH = 107


def _private_dir() -> str:
    """A fresh 0700 directory for the server's socket: in the temp dir, or
    in /tmp when the temp dir is too deep for a socket path (a long TMPDIR
    would otherwise make every embedded queue fail to start)."""
    room = _MAX_SOCKET_PATH - len(os.sep + SOCKET_NAME) - len(os.sep + "ezpq-") - 8
    if len(os.fsencode(tempfile.gettempdir())) <= room:
        return tempfile.mkdtemp(prefix="ezpq-")
    return tempfile.mkdtemp(prefix="ezpq-", dir="/tmp")


def _disown_after_fork() -> None:
    """In a forked child: let go of every private server of the parent."""
    for server in list(_LIVE):
        server._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_after_fork)


class PrivateServer:
    """A server process owned by this client."""

    def __init__(self, workers: int, start_method: Optional[str], prestart: bool,
                 state_dir: Optional[str] = None, dask: Optional[str] = None):
        self.dir = _private_dir()
        self.address = os.path.join(self.dir, SOCKET_NAME)
        self.authkey = os.urandom(32)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # above ezpq_mgr/client/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        ready_r, ready_w = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "ezpq_mgr.server", "--embedded", "--ready-fd", str(ready_w),
                 "--private-dir", self.dir],
                stdin=subprocess.PIPE, pass_fds=[ready_w], start_new_session=True, env=env,
            )
        except BaseException:
            os.close(ready_r)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            os.close(ready_w)
        self._owner = os.getpid()
        self._finalizer = weakref.finalize(self, _stop, self.popen, self.dir, 10.0)
        _LIVE.add(self)
        config = {"address": self.address, "authkey": self.authkey.hex(), "workers": workers,
                  "start_method": start_method, "prestart": prestart, "sys_path": sys.path,
                  "private_dir": self.dir, "state_dir": state_dir and os.path.abspath(state_dir),
                  "dask": dask}
        try:
            self.popen.stdin.write((json.dumps(config) + "\n").encode())
            self.popen.stdin.flush()
            self._await_ready(ready_r)
        except BaseException:
            self._finalizer()
            raise
        finally:
            os.close(ready_r)

    def _await_ready(self, fd: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"the private ezpq server did not start within {START_TIMEOUT:.0f} s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self.popen.wait(5)
                    raise ServerError(f"the private ezpq server exited during start-up (exit code {code})")
                data += chunk
        answer = json.loads(data)
        refused = answer.get("refused")
        if refused:   # e.g. its state dir is in use or damaged: the server's one line
            self.popen.wait(10)
            if answer.get("kind") == "DaskUnreachable":   # Queue(dask=): a ConnectionError naming it
                raise ConnectionError(refused)
            raise ServerError(f"the private ezpq server refused to start: {refused}")

    def stop(self, timeout: float = 10.0) -> None:
        """Close the lifeline and wait for the server to exit (kill it past ``timeout``)."""
        self._finalizer.detach()
        if os.getpid() == self._owner:
            _stop(self.popen, self.dir, timeout)

    def _disown(self) -> None:
        self._finalizer.detach()
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.popen.stdin.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _stop(popen: subprocess.Popen, directory: str, timeout: float) -> None:
    try:
        popen.stdin.close()
    except OSError:
        pass
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
    shutil.rmtree(directory, ignore_errors=True)
