"""Who is calling: the OS user of each client connection.

A shared server serves every connection on its own thread. Over a Unix
socket the kernel tells us the peer's uid (``SO_PEERCRED``); the server
believes that, never what a client says. Over TCP there is no such fact:
any holder of the authkey acts as the server's owner (use the Unix socket
for several users). The private server of an embedded queue has one user.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import pwd
import socket
import struct
import threading
from multiprocessing import managers

__all__ = ["Identity", "current", "IdentityServer", "owner", "user_name"]

logger = logging.getLogger(__name__)
_local = threading.local()


@dataclasses.dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    user: str
    privileged: bool   # root or the server's owner: sees and cancels every job


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=1)
def owner() -> Identity:
    """The server's own user (looked up once: pwd is slow)."""
    uid = os.getuid()
    return Identity(uid, os.getgid(), user_name(uid), True)


def current() -> Identity:
    """The identity of the client whose request this thread is serving."""
    return getattr(_local, "identity", None) or owner()


def peer_identity(conn) -> Identity:
    """The connection's peer (Unix socket), or the owner (TCP)."""
    fd = conn.fileno()
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
            return owner()
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    finally:
        sock.close()
    privileged = uid == 0 or uid == os.getuid()
    return Identity(uid, gid, user_name(uid), privileged)


class IdentityServer(managers.Server):
    """A manager Server that remembers each connection's peer on its thread,
    and logs (then survives) a refused connection: the stdlib's accepter
    thread dies on a wrong authkey, which would lock every client out."""

    def accepter(self):
        while True:
            try:
                c = self.listener.accept()
            except multiprocessing.AuthenticationError as exc:
                logger.warning("refused a connection: %s", exc)
                continue
            except OSError as exc:
                if getattr(self, "stop_event", None) is not None and self.stop_event.is_set():
                    return
                logger.warning("accept failed: %s", exc)
                continue
            threading.Thread(target=self.handle_request, args=(c,), daemon=True).start()

    def handle_request(self, conn):
        try:
            _local.identity = peer_identity(conn)
        except OSError:
            _local.identity = owner()
        return super().handle_request(conn)
