"""Reaching a server: addresses, authkeys, and errors that say what failed.

Every failure to reach or keep a server (nothing listening, wrong key, the
server gone mid-call) surfaces as ``ezpq_mgr.ConnectionError`` or its
subclass ``AuthenticationError``, naming the address.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import managers
import os
from typing import Optional, Tuple, Union

from . import channel
from .errors import AuthenticationError, ConnectionError

__all__ = ["Remote", "parse_address", "default_authkey", "authkey_path", "DEFAULT_PORT"]

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


def _describe(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def as_authkey(authkey: Union[bytes, str]) -> bytes:
    """The key as bytes: ``str`` (the key file's text, ``$EZPQ_AUTHKEY``) is
    UTF-8 encoded; anything else but bytes is a ``TypeError``."""
    if isinstance(authkey, str):
        return authkey.encode("utf-8")
    if isinstance(authkey, (bytes, bytearray)):
        return bytes(authkey)
    raise TypeError(f"authkey must be bytes or str, not {type(authkey).__name__}")


class Remote:
    """Calls the server's Service through a manager proxy, translating failures."""

    def __init__(self, address: Address, authkey: Union[bytes, str], shared: bool = True):
        from . import wire
        from .server import ServerManager

        authkey = as_authkey(authkey)
        self.address = address
        self.where = _describe(address)
        self._plain = not shared
        manager = ServerManager(address=address, authkey=authkey,
                                serializer=wire.SERIALIZER if shared else "pickle")
        try:
            manager.connect()
            self._proxy = manager.service()
        except multiprocessing.AuthenticationError as exc:
            raise AuthenticationError(f"ezpq server at {self.where} refused the authkey: {exc}") from None
        except (OSError, EOFError) as exc:  # TimeoutError included
            raise ConnectionError(f"cannot connect to an ezpq server at {self.where}: {exc!r}") from None

    def call(self, method: str, *args):
        try:
            if self._plain:
                return self._call_plain(method, args)
            return self._proxy._callmethod(method, args)
        except (EOFError, BrokenPipeError, ConnectionResetError, ConnectionRefusedError,
                FileNotFoundError) as exc:
            raise ConnectionError(f"lost the ezpq server at {self.where}: {exc!r}") from None
        except multiprocessing.AuthenticationError as exc:
            raise AuthenticationError(f"ezpq server at {self.where} refused the authkey: {exc}") from None

    def _call_plain(self, method: str, args: tuple):
        """The proxy's ``_callmethod`` on a pickle connection, without
        ForkingPickler's per-message cost (see channel.py)."""
        proxy = self._proxy
        try:
            conn = proxy._tls.connection
        except AttributeError:
            proxy._connect()
            conn = proxy._tls.connection
        channel.send(conn, (proxy._id, method, args, {}))
        kind, result = channel.recv(conn)
        if kind == "#RETURN":
            return result
        raise managers.convert_to_error(kind, result)

    def close(self) -> None:
        """Drop this process's connections to the server."""
        try:
            self._proxy._close()
        except Exception:
            pass
