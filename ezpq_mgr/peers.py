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
import os
import pwd
import threading

__all__ = ["describe_user", "Identity", "current", "serve_as", "owner", "user_name"]

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


def describe_user(uid: int) -> str:
    """``alice (uid 1000)``, or ``uid 1000`` for a uid with no name: for messages."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@functools.lru_cache(maxsize=1)
def owner() -> Identity:
    """The server's own user (looked up once: pwd is slow)."""
    uid = os.getuid()
    return Identity(uid, os.getgid(), user_name(uid), True)


def current() -> Identity:
    """The identity of the client whose request this thread is serving."""
    return getattr(_local, "identity", None) or owner()


def serve_as(identity: Identity) -> None:
    """This thread now serves requests of ``identity`` (its connection's peer)."""
    _local.identity = identity
