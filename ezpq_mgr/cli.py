"""Command line: ``ezpq-server`` runs a shared server in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import stat
import sys
from typing import List, Optional

from .connection import DEFAULT_PORT, authkey_path, parse_address

logger = logging.getLogger(__name__)

__all__ = ["server_main", "ensure_authkey"]


def ensure_authkey(path: str) -> bytes:
    """Read the key file, creating it (random, mode 0600) when missing.

    Refuses a key file that group or others can read."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        logger.info("created authkey file %s", path)
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"ezpq-server: {path} is readable by others (mode {oct(mode & 0o777)}); "
                         f"chmod 600 it")
    with open(path, "rb") as f:
        key = f.read().strip()
    if not key:
        raise SystemExit(f"ezpq-server: {path} is empty")
    return key


def server_main(argv: Optional[List[str]] = None) -> None:
    """``ezpq-server``: serve a shared queue until SIGTERM/SIGINT."""
    from .server import serve

    p = argparse.ArgumentParser(prog="ezpq-server", description="Run a shared ezpq_mgr server.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}",
                       help=f"HOST:PORT to listen on (default 127.0.0.1:{DEFAULT_PORT})")
    where.add_argument("--socket", help="Unix socket path to listen on instead of TCP")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="concurrent jobs")
    p.add_argument("--authkey-file", default=None, help=f"key file (default {authkey_path()})")
    p.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s ezpq-server[%(process)d] %(levelname)s %(message)s")
    key = ensure_authkey(args.authkey_file or authkey_path())
    address = args.socket if args.socket else parse_address(args.address)
    if isinstance(address, str) and os.path.exists(address):
        os.unlink(address)
    serve(address, key, args.workers, args.start_method)
