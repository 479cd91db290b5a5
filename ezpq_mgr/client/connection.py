"""Reaching a server: addresses, authkeys, and errors that say what failed.

Every failure to reach or keep a server (nothing listening, wrong key, the
server gone mid-call) surfaces as ``ezpq_mgr.ConnectionError`` or its
subclass ``AuthenticationError``, naming the address.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
from typing import Callable, Optional, Tuple, Union

from .. import transport
from ..errors import AuthenticationError, ConnectionError
from ..messages import RETURN, Reply, Request
from .delivered import Delivered

__all__ = ["Remote", "parse_address", "describe_address", "default_authkey", "authkey_path", "DEFAULT_PORT"]

DEFAULT_PORT = 50515
Address = Union[str, Tuple[str, int]]


def parse_address(address: Union[str, tuple, list]) -> Address:
    """``(host, port)``, ``"host:port"``, ``":port"`` or a Unix socket path."""
    if isinstance(address, (tuple, list)):
        if len(address) != 2:
            raise ValueError(f"address must be (host, port), got {address!r}")
        return (str(address[0]), int(address[1]))
    if not isinstance(address, str) or not address:
        raise TypeError(f"address must be a (host, port) tuple or a string, not {address!r}")
    if "/" in address or address.endswith(".sock"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is neither HOST:PORT nor a socket path")
    return (host or "127.0.0.1", int(port))


def authkey_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "ezpq", "authkey")


def default_authkey(path: Optional[str] = None) -> bytes:
    """``$EZPQ_AUTHKEY``, else the key file's text (there is no built-in key)."""
    env = os.environ.get("EZPQ_AUTHKEY")
    if env and path is None:
        return env.encode()
    path = path or authkey_path()
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise AuthenticationError(
            f"no authkey: set EZPQ_AUTHKEY, pass authkey=, or create {path} "
            f"(ezpq-server creates it when missing)") from None


def describe_address(address: Address) -> str:
    """An address as the user writes it: a socket path, or HOST:PORT."""
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def as_authkey(authkey: Union[bytes, str]) -> bytes:
    """The key as bytes: ``str`` (the key file's text, ``$EZPQ_AUTHKEY``) is
    UTF-8 encoded; anything else but bytes is a ``TypeError``."""
    if isinstance(authkey, str):
        return authkey.encode("utf-8")
    if isinstance(authkey, (bytes, bytearray)):
        return bytes(authkey)
    raise TypeError(f"authkey must be bytes or str, not {type(authkey).__name__}")


_generation = 0   # bumped in a forked child: the parent's connections are not ours


def _after_fork() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


#: Calls whose answer may hand results out (a durable server keeps their
#: rows until the client acknowledges the answer: client/delivered.py)
_HANDING = frozenset({"get", "collect", "pop_ids"})


def _hands_out(method: str, args: tuple, result) -> bool:
    """Did this (non-empty) answer hand results out?"""
    if method == "put_then":
        method = args[2] if len(args) > 2 else ""
    if method not in _HANDING:
        return False
    return not isinstance(result, list) or any(r is not None for r in result)


class Remote:
    """Calls the server's Service, translating failures.

    Each thread has its own connection (a call waits for its reply, so
    threads cannot share one); a forked child opens its own. A shared
    server speaks JSON (wire.py), the private server of an embedded queue
    pickle. A call is one ``Request``, answered by one ``Reply``. The
    server's ``max_message`` is learnt at the handshake and checked before
    sending: an oversize call raises ``ValueError`` here."""

    def __init__(self, address: Address, authkey: Union[bytes, str], shared: bool = True):
        authkey = as_authkey(authkey)
        self.address = address
        self.where = describe_address(address)
        self._authkey = bytes(authkey)
        #: a shared server's bound on one request's values, checked here too (None: a private server)
        self._values_over_limit: Optional[Callable[[bytes], Optional[str]]] = None
        if shared:
            from .. import wire
            self._dumps, self._loads = wire.dumps, wire.loads
            self._values_over_limit = wire.values_over_limit
        else:
            self._dumps, self._loads = _pickle_dumps, pickle.loads
        ack = self._dumps(Request("ack", ()))
        self._ack_frame = transport.HEADER.pack(len(ack)) + ack
        self._local = threading.local()
        self.max_message: Optional[int] = None
        self.durable = False   # the server has a --state-dir (learnt at the handshake)
        self.state_id: Optional[str] = None   # its database's identity (client/delivered.py)
        self._connection()

    def _connection(self) -> socket.socket:
        local = self._local
        sock = getattr(local, "sock", None)
        if sock is not None and local.generation == _generation:
            return sock
        try:
            sock, info = transport.connect(self.address, self._authkey)
        except AuthenticationError as exc:
            raise AuthenticationError(f"ezpq server at {self.where} refused the authkey: {exc}") from None
        except transport.Refused as exc:
            raise ConnectionError(str(exc)) from None
        except ConnectionError as exc:
            raise ConnectionError(f"cannot connect to an ezpq server at {self.where}: {exc}") from None
        except (OSError, EOFError) as exc:  # TimeoutError included
            raise ConnectionError(f"cannot connect to an ezpq server at {self.where}: {exc!r}") from None
        self.max_message = info.get("max_message")
        self.durable = info.get("durable") is True
        state_id = info.get("state_id")
        self.state_id = state_id if isinstance(state_id, str) else None
        local.sock, local.generation, local.acks, local.rest = sock, _generation, 0, b""
        return sock

    def call(self, method: str, *args, sent: Optional[Callable[[], None]] = None):
        """Call ``method`` on the server and return its answer. ``sent()``
        runs once the request is on the wire, before the answer is awaited
        (the client's send lock is released there: the answer of a parked
        call may take long)."""
        body = self._dumps(Request(method, args))
        limit = self.max_message
        if limit is not None and len(body) > limit:
            raise ValueError(f"this call to {method!r} is {transport.describe_size(len(body))}, over the "
                             f"server's limit of {transport.describe_size(limit)} (ezpq-server --max-message)")
        if self._values_over_limit is not None:
            why = self._values_over_limit(body)
            if why is not None:
                raise ValueError(f"this call to {method!r} is {why}")
        sock = self._connection()
        local = self._local
        try:
            if len(body) < 65536:
                sock.sendall(transport.HEADER.pack(len(body)) + body)
            else:
                sock.sendall(transport.HEADER.pack(len(body)))
                sock.sendall(body)
            if sent is not None:
                sent()
            while local.acks:   # the answers to our acks come first (client/delivered.py)
                self._take_ack(self._loads(self._recv(sock)))
                local.acks -= 1
            reply = self._loads(self._recv(sock))
            if local.rest:
                raise ConnectionError("ezpq protocol error: a reply arrived that nobody asked for")
        except (EOFError, OSError) as exc:
            self._drop()
            raise ConnectionError(f"lost the ezpq server at {self.where}: {exc!r}") from None
        except BaseException:  # Ctrl+C in a long wait: its answer must not be read as the next one's
            self._drop()
            raise
        try:
            kind, result = Reply.parse(reply)
        except (TypeError, ValueError):
            kind, result = type(reply).__name__, None
        if kind == RETURN:
            if self.durable and result and _hands_out(method, args, result):
                self._ack(sock)
            return result
        if isinstance(result, BaseException):
            raise result
        raise ConnectionError(f"unexpected answer from the ezpq server at {self.where}: {kind!r}")

    def _ack(self, sock: socket.socket) -> None:
        """Tell a durable server we read the reply that handed us results,
        without waiting for its answer (read before the next reply): it
        deletes their rows then, and answers once that is committed."""
        try:
            sock.sendall(self._ack_frame)
            self._local.acks += 1
        except OSError:   # gone: the results come back after its restart, and are dropped then
            self._drop()

    def _take_ack(self, reply) -> None:
        try:
            kind, seqs = Reply.parse(reply)
        except (TypeError, ValueError):
            return
        if kind == RETURN and isinstance(seqs, list):
            Delivered.confirmed(self.state_id, (s for s in seqs if isinstance(s, int)))

    def check_record(self, record: dict) -> dict:
        """``ValueError`` now, at ``put()``, for a job the server would refuse
        as too large (JSON carries bytes as base64: 4/3 of their size)."""
        limit = self.max_message
        if limit is not None:
            size = sum(len(v) for v in record.values() if isinstance(v, (bytes, bytearray)))
            if size * 4 // 3 + 4096 > limit:
                raise ValueError(f"this job's function and arguments take {transport.describe_size(size)}, "
                                 f"over the server's limit of {transport.describe_size(limit)} "
                                 f"(ezpq-server --max-message)")
        return record

    def _recv(self, sock: socket.socket):
        """One reply: header and (usually) body in one read. What came after
        it (an ack's answer is followed by the next reply) waits in ``rest``."""
        local = self._local
        data, local.rest = local.rest, b""
        if not data:
            data = sock.recv(65536)
            if not data:
                raise EOFError
        while len(data) < transport.HEADER.size:
            more = sock.recv(65536)
            if not more:
                raise EOFError
            data += more
        end = transport.HEADER.size + transport.HEADER.unpack_from(data)[0]
        if len(data) >= end:
            local.rest = data[end:]
            return data[transport.HEADER.size:end]
        body = bytearray(end - transport.HEADER.size)
        have = len(data) - transport.HEADER.size
        body[:have] = data[transport.HEADER.size:]
        view = memoryview(body)
        while have < len(body):
            k = sock.recv_into(view[have:])
            if not k:
                raise EOFError
            have += k
        return body

    def _drop(self) -> None:
        sock = getattr(self._local, "sock", None)
        self._local.sock = None
        if sock is not None and self._local.generation == _generation:
            sock.close()

    def close(self) -> None:
        """Drop this thread's connection to the server."""
        try:
            self._drop()
        except Exception:
            pass


def _pickle_dumps(msg: tuple) -> bytes:
    """A message record as the tuple of its fields (``messages.py``)."""
    return pickle.dumps(tuple(msg), pickle.HIGHEST_PROTOCOL)
