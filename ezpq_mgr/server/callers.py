"""Who is calling: the OS user of each client connection, and its ``Caller``.

A shared server serves every connection on its own thread. Over a Unix
socket the kernel tells us the peer's uid (``SO_PEERCRED``); the server
believes that, never what a client says. Over TCP there is no such fact:
any holder of the authkey acts as the server's owner (use the Unix socket
for several users). The private server of an embedded queue has one user.

A ``Caller`` is made once per connection by the connection server and passed
explicitly as the first argument of every ``Service`` method: its identity,
its reply channel (the connection), the call it parked, what the service
asked to run when it disconnects, and what it holds (the service's
registry). Nothing about the caller is kept in thread-locals.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pwd
from typing import TYPE_CHECKING, Any, Callable, List, Optional

from ..errors import EzpqError
from ..messages import ERROR, RETURN, Reply

if TYPE_CHECKING:
    from .outgoing import PeerConnection

__all__ = ["describe_user", "Identity", "Caller", "DEFERRED", "owner", "send_reply", "user_name"]

logger = logging.getLogger(__name__)

#: What a service method returns when its answer will be sent later.
DEFERRED = object()


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


class Caller:
    """One client connection as the service sees it (made once per connection).

    ``identity``: who; ``conn``: where replies go (None: an in-server caller,
    whose waits block instead of parking); ``parked``: the Deferred its last
    call parked; ``hooks``: run with the caller when the connection closes;
    ``held``: what the service's registry keeps for this connection;
    ``handed``: job numbers of the results its last reply carried, whose
    removal a durable server writes once the client's next request shows
    that reply was read (server/store.py)."""

    __slots__ = ("identity", "conn", "parked", "hooks", "held", "poller", "handed")

    def __init__(self, identity: Identity, conn: "Optional[PeerConnection]" = None):
        self.identity = identity
        self.conn = conn
        self.parked: Any = None
        self.hooks: List[Callable[["Caller"], None]] = []
        self.held: Any = None
        self.poller: Any = None   # the serving thread's poll() of conn, made at its first park
        self.handed: List[int] = []

    def reply_channel(self, transform: Callable[[Any], Any]) -> Optional[Callable[[Any], None]]:
        """A sender of ``transform(answer)`` to this caller, or None when it
        has no connection (the call must block). The send never blocks: what
        the client does not take now is left to the connection's flusher
        (see outgoing.py)."""
        conn = self.conn
        if conn is None:
            return None

        def send(answer: Any) -> None:
            try:
                msg = Reply(RETURN, transform(answer))
            except Exception as exc:
                msg = Reply(ERROR, exc)
            send_reply(conn, msg)

        return send

    def park(self, d: Any) -> object:
        """Called by a service method: this call (parked as ``d``) is answered later."""
        self.parked = d
        return DEFERRED

    def at_disconnect(self, fn: Callable[["Caller"], None]) -> None:
        """Called by a service method: run ``fn(caller)`` on the serving
        thread when this caller's connection closes."""
        self.hooks.append(fn)

    def disconnected(self) -> None:
        """(the serving thread, its connection closed) Run the hooks, once."""
        hooks, self.hooks = self.hooks, []
        for fn in hooks:
            try:
                fn(self)
            except Exception:
                logger.exception("a disconnect hook failed")


def send_reply(conn: "PeerConnection", msg: Reply) -> None:
    """Send ``msg`` on ``conn``; an answer our serializer refuses becomes an error reply."""
    try:
        conn.send(msg)
    except Exception as exc:
        logger.error("cannot send a reply: %s", exc)
        conn.send(Reply(ERROR, EzpqError(f"the server could not send its answer: {exc}")))
