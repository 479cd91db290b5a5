"""Command line: ``ezpq-server`` runs a shared server in the foreground;
``ezpq`` uses one like a small batch system (status, submit, cancel, wait,
show, report, plot, workers; pause, resume, priority, requeue, clean, top).

``ezpq-server`` exit codes: 0 stopped by SIGTERM/SIGINT, 1 failed while
serving, 2 refused to start (usage, an unsafe key or log file, a live server
or something not a socket at ``--socket``, an address in use, a Dask
scheduler that cannot be reached, ``--dask`` as root without
``--dask-any-user``, or a ``--dask-user`` that does not exist), with a
one-line reason on stderr, never a traceback.

``ezpq`` exit codes: 0 ok, 1 a job failed or was not found, 2 usage error
(argparse's own, a refused value, a missing optional package), 3 cannot
connect or not allowed, 130 interrupted (Ctrl-C). Every error is one line
on stderr, never a traceback. Job numbers on the
command line are server-wide (the ``job`` column), unlike a job dict's
per-queue ``id``.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import stat
import sys
from typing import List, Optional

from .client.connection import DEFAULT_PORT, authkey_path, describe_address, parse_address
from .job import JobStatus
from .server.accounting import peak_rss
from .server.callers import describe_user

logger = logging.getLogger(__name__)

__all__ = ["server_main", "main", "ensure_authkey", "claim_socket", "StartupError"]


class StartupError(Exception):
    """``ezpq-server`` cannot start; the message is one line for the user."""


def ensure_authkey(path: str) -> bytes:
    """Read the key file, creating it (random, mode 0600) when missing.

    Refused (``StartupError``): a key file owned by another user than the
    server's (that user could read or change our key), one that group or
    others can read, an empty one, and a dangling symbolic link (the key is
    never created through a link: ``O_EXCL`` does not follow it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise StartupError(f"key file {path}: {exc.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode) and not os.path.exists(path):
        raise StartupError(f"key file {path} is a dangling symlink (to {os.readlink(path)}); "
                           f"remove it or make it point at a key file")
    if st is None:
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot create key file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        logger.info("created authkey file %s", path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise StartupError(f"cannot read key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"key file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise StartupError(f"key file {path} is owned by {describe_user(st.st_uid)}, not by "
                               f"{describe_user(os.geteuid())} who runs the server; chown it or use another")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StartupError(f"key file {path} is readable by others (mode {oct(st.st_mode & 0o777)}); "
                               f"chmod 600 it")
        key = f.read(1 << 16).strip()
    if not key:
        raise StartupError(f"key file {path} is empty")
    return key


def _peer_pid(path: str) -> Optional[int]:
    """The pid of a server listening on the Unix socket ``path`` (0: one
    listens but is too busy to accept), None when nothing listens there."""
    import socket
    import struct
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except (socket.timeout, BlockingIOError):
        return 0
    finally:
        s.close()


def claim_socket(path: str) -> None:
    """Make ``path`` free for our listening socket, or say why not.

    Only a stale socket (nobody accepts on it) is removed. A live server
    there is never displaced, and nothing else is deleted or followed: not
    a symbolic link (dangling or not), not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"--socket {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"--socket {path} is a symlink (to {os.readlink(path)}); not following or "
                           f"removing it: remove it or choose another path")
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"--socket {path} exists and is not a socket; not removing it")
    pid = _peer_pid(path)
    if pid is not None:
        who = f"pid {pid}" if pid else "busy, pid unknown"
        raise StartupError(f"a server is already listening on {path} ({who}); stop it first or "
                           f"choose another --socket")
    os.unlink(path)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


#: ``ezpq-server`` exit codes: 0 stopped (SIGTERM/SIGINT), 1 failed while
#: serving, 2 refused to start (usage, key, socket, log file or address:
#: one line on stderr saying why).
EXIT_SERVER_STOPPED, EXIT_SERVER_FAILED, EXIT_SERVER_REFUSED = 0, 1, 2


def server_main(argv: Optional[List[str]] = None) -> None:
    """``ezpq-server``: serve a shared queue until SIGTERM/SIGINT.

    Exit codes: 0 stopped by SIGTERM/SIGINT; 1 failed while serving; 2
    refused to start (bad usage, unsafe key or log file, a live server or a
    non-socket at ``--socket``, an address in use), with a one-line reason
    on stderr, never a traceback."""
    import faulthandler
    import signal

    from .server.service import DEFAULT_MAX_USER_BYTES, DEFAULT_MAX_USER_JOBS

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack
    p = argparse.ArgumentParser(prog="ezpq-server", description="Run a shared ezpq_mgr server.",
                                epilog="exit codes: 0 stopped, 1 failed while serving, 2 refused to start")
    p.add_argument("--version", action="version", version=_version("ezpq-server"))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}",
                       help=f"HOST:PORT to listen on (default 127.0.0.1:{DEFAULT_PORT})")
    where.add_argument("--socket", help="Unix socket path to listen on instead of TCP")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="jobs run at once (default: the number of CPUs)")
    p.add_argument("--authkey-file", default=None, help=f"key file (default {authkey_path()})")
    p.add_argument("--log-file", default=None,
                   help="accounting CSV: one row per finished job (a regular file of the server's user, "
                        "in a directory only it and root can write, or a sticky one)")
    p.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None,
                   help="how the server's own user's workers start (another user's worker is always a "
                        "fresh interpreter; default: Python's default)")
    p.add_argument("--log-level", default="INFO", type=_log_level,
                   help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL; the log goes to stderr")
    p.add_argument("--max-message", type=_size, default="256M",
                   help="largest request a client may send, e.g. 64M, 1G (default 256M)")
    p.add_argument("--max-user-jobs", type=_count, default=DEFAULT_MAX_USER_JOBS, metavar="N",
                   help=f"jobs one user (not root, not this server's user) may have on the server at "
                        f"once, collected ones not counted (default {DEFAULT_MAX_USER_JOBS:,}; 0: no cap)")
    p.add_argument("--max-user-bytes", type=_job_size, default=DEFAULT_MAX_USER_BYTES, metavar="SIZE",
                   help="bytes of functions, arguments and outputs one user's jobs may hold on the server "
                        "at once, e.g. 512M, 2G (default 1G; 0: no cap)")
    p.add_argument("--allow-other-users", action="store_true",
                   help="a server not run as root: serve every user anyway, running their jobs as "
                        "this server's user (by default it serves only its own user)")
    p.add_argument("--keep-finished", type=float, default=86400.0, metavar="SECONDS",
                   help="drop finished jobs nobody collected after SECONDS (default 86400, one day; "
                        "0: keep them); their accounting rows stay in the log")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="keep the queue in an SQLite database in DIR (created 0700): waiting jobs and "
                        "uncollected results survive a restart, a crash or a SIGKILL")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="each job's stdout and stderr go to DIR/JOB.log (created 0711 for a root "
                        "server, each file 0600 owned by the job's user; 0700 otherwise); default "
                        "STATE_DIR/logs with --state-dir, else a private directory removed at exit")
    p.add_argument("--max-log", type=_job_size, default="16M", metavar="SIZE",
                   help="cap of one job's log in bytes, e.g. 1M, 64M (default 16M; 0: keep none); past it a line "
                        "says so and the rest is dropped")
    p.add_argument("--sync", choices=["normal", "full"], default="normal",
                   help="with --state-dir: normal (default) survives a kill of the server, full also "
                        "a power loss (SQLite synchronous=FULL: an fsync per group commit)")
    p.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="run the jobs on the Dask cluster of this scheduler (e.g. tcp://10.0.0.5:8786) "
                        "instead of local workers; --workers N then caps how many run at once")
    p.add_argument("--dask-any-user", action="store_true",
                   help="with --dask on a server run as root: accept that every user's jobs run as the "
                        "Dask workers' user (refused otherwise)")
    p.add_argument("--dask-user", default="nobody", metavar="NAME",
                   help="with --dask on a server run as root: the user the Dask bridge (the process that "
                        "holds the connection to the scheduler, dask_bridge.py) runs as (default nobody); "
                        "whoever reaches the scheduler can run code as this user, never as root")
    p.add_argument("--dask-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="with --dask: how long to try reaching the scheduler, at start and after losing "
                        "it (default 10 seconds; then retried every 2 seconds while running)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if not 0 < args.dask_timeout < float("inf"):
        p.error("--dask-timeout must be a finite number of seconds > 0")
    if args.dask is not None:
        from .schema import check_dask_address
        try:
            check_dask_address(args.dask)
        except ValueError as exc:
            p.error(f"--{exc}")
    if not 0 <= args.keep_finished < float("inf"):
        p.error("--keep-finished must be a finite number of seconds >= 0")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s ezpq-server[%(process)d] %(levelname)s %(message)s")
    from .server.main import ServerDied
    try:
        _serve(args)
    except StartupError as exc:
        print(f"ezpq-server: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(EXIT_SERVER_REFUSED)
    except ServerDied as exc:
        print(f"ezpq-server: {exc}", file=sys.stderr)
        sys.exit(EXIT_SERVER_FAILED)


def _serve(args: argparse.Namespace) -> None:
    """Check the key and the address, then serve until stopped. Anything
    that stops it before it is up is a ``StartupError`` (one line)."""
    from .server.accounting import LogFileError
    from .server.joblogs import LogDirError
    from .server.main import ServerDied, serve
    try:
        from .server.dask_executor import DaskUnreachable
    except ImportError:   # distributed is not installed: --dask says so when it is used
        DaskUnreachable = ()
    from .server.store import StoreError

    if args.dask is not None and os.geteuid() == 0 and not args.dask_any_user:
        from .server.main import DASK_AS_ROOT
        raise StartupError(DASK_AS_ROOT)
    if args.dask is not None and os.geteuid() == 0:
        import pwd
        try:
            pwd.getpwnam(args.dask_user)
        except KeyError:
            raise StartupError(f"--dask-user: no such user: {args.dask_user!r}") from None
    key = ensure_authkey(args.authkey_file or authkey_path())
    if args.socket:
        address = args.socket
        claim_socket(address)
    else:
        try:
            address = parse_address(args.address)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    ready = []

    def on_ready(bound) -> None:
        _socket_mode(bound)
        ready.append(bound)

    try:
        serve(address, key, args.workers, args.start_method, shared=True, log_file=args.log_file,
              on_ready=on_ready, max_message=args.max_message, allow_other_users=args.allow_other_users,
              keep_finished=args.keep_finished or None, state_dir=args.state_dir, sync=args.sync,
              log_dir=args.log_dir, max_log=args.max_log, dask=args.dask, dask_any_user=args.dask_any_user,
              dask_timeout=args.dask_timeout, dask_user=args.dask_user, max_user_jobs=args.max_user_jobs,
              max_user_bytes=args.max_user_bytes)
    except DaskUnreachable as exc:
        raise StartupError(f"--dask: {exc}") from None
    except LogFileError as exc:
        raise StartupError(f"--log-file: {exc}") from None
    except LogDirError as exc:
        raise StartupError(f"--log-dir: {exc}") from None
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    except (OSError, OverflowError, ValueError) as exc:
        if ready:
            raise
        logger.debug("start-up failed", exc_info=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StartupError(f"cannot serve on {describe_address(address)}: {why}") from None
    except ServerDied:
        raise
    except Exception as exc:  # anything else before the server was up: still one line
        if ready:
            raise
        logger.debug("start-up failed", exc_info=True)
        raise StartupError(f"cannot start: {type(exc).__name__}: {exc} (--log-level DEBUG shows where)") from None


def _version(prog: str) -> str:
    from . import __version__
    return f"{prog} (ezpq_mgr) {__version__}, Python {sys.version.split()[0]}"


def _bytes_of(text: str, units: dict, example: str) -> float:
    """A size on the command line: a number, or one with a suffix from
    ``units`` (powers of 1024), optionally followed by B or iB."""
    t = text.strip().upper()
    for tail in ("IB", "B"):
        if t.endswith(tail) and len(t) > len(tail):
            t = t[:-len(tail)]
            break
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        return float(t[:-1] if unit else t) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. {example})") from None


def _size(text: str) -> int:
    """``--max-message``: bytes, or with a K/M/G suffix (powers of 1024)."""
    n = _bytes_of(text, {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, "256M")
    if not 1024 <= n < 1 << 62:
        raise argparse.ArgumentTypeError(f"--max-message must be at least 1K, got {text!r}")
    return int(n)


def _count(text: str) -> int:
    """``--max-user-jobs``: a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n < 1 << 62:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return n


def _socket_mode(address) -> None:
    """A Unix socket is reachable by every local user: the authkey and
    SO_PEERCRED guard it, and each user sees only their own jobs."""
    if isinstance(address, str):
        os.chmod(address, 0o666)


# --------------------------------------------------------------------- ezpq
EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_CONNECT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Link:
    """The ``ezpq`` command's connection: the server's address and key
    (``submit`` opens a Queue of its own), the call channel, and who we are."""

    def __init__(self, args: argparse.Namespace):
        from .client.connection import Remote, default_authkey
        if args.socket:
            self.address = args.socket
        else:
            self.address = parse_address(args.address or os.environ.get("EZPQ_ADDRESS")
                                         or f"127.0.0.1:{DEFAULT_PORT}")
        self.key = default_authkey(args.authkey_file) if args.authkey_file else default_authkey()
        self.remote = Remote(self.address, self.key, shared=True)
        self.me = self.remote.call("whoami")["uid"]


def _fmt_bytes(n) -> str:
    if n in (None, ""):
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _fmt_s(x) -> str:
    return "-" if x in (None, "") else f"{float(x):.2f}"


def _table(rows: List[list], headers: List[str], widths: List[int]) -> str:
    """Fixed-width columns, cut to fit (the default widths fit 80 columns)."""
    def cell(v, w):
        v = "-" if v is None else str(v)
        return v if len(v) <= w else v[:w - 1] + "~"
    lines = [" ".join(cell(h, w).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append(" ".join(cell(v, w).ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _status_rows(snaps: List[dict]) -> str:
    rows = []
    for s in snaps:
        cpu = None if s.get("cpu_user") is None else s["cpu_user"] + (s.get("cpu_system") or 0)
        rows.append([s["seq"], s["qid"], s["id"], s["user"], s["name"], s["status"], s["priority"],
                     s.get("lane_text"), _fmt_s(s["runtime"]), _fmt_s(cpu), _fmt_bytes(peak_rss(s))])
    return _table(rows, ["job", "qid", "id", "user", "name", "status", "prio", "lane", "runtime", "cpu",
                         "peak"], [5, 8, 4, 8, 8, 9, 4, 4, 7, 6, 7])


def _public(snap: dict, me: int) -> dict:
    from .client.jobdict import to_job_dict
    d = to_job_dict(snap, trusted=snap.get("uid") == me)
    d["job"] = snap["seq"]
    return d


def _print_json(obj) -> None:
    import json
    print(json.dumps(obj, indent=1, default=str))


#: the statuses ``ezpq status --state`` filters on
STATES = tuple(s.value for s in JobStatus)


def _cmd_status(link, args):
    snaps = link.remote.call("list_jobs", True)
    if args.state:
        snaps = [s for s in snaps if s["status"] in args.state]
    if args.qid:
        snaps = [s for s in snaps if s["qid"] in args.qid]
    if args.user:
        snaps = [s for s in snaps if s["user"] in args.user]
    if args.json:
        _print_json([_public(s, link.me) for s in snaps])
    else:
        print(_status_rows(snaps))
    return EXIT_OK


def _cmd_submit(link, args):
    from .client.queue import Queue
    from .job import Job
    from .shell import run_command
    q = Queue(address=link.address, authkey=link.key, qid=args.qid)
    try:
        job = Job(run_command, args=[list(args.command), dict(os.environ)], name=args.name or args.command[0],
                  priority=args.priority, lane=args.lane, timeout=args.timeout,
                  max_memory=args.max_memory or None, retries=args.retries, suppress_errors=True)
        record = q._record(job)
        if args.after:   # job numbers, of any queue of yours (Python's after= names ids of its queue)
            record["after_jobs"] = list(args.after)
        numbers = q._call("submit", args.qid, record)   # the job's number comes with the reply
    finally:
        q.detach()
    if args.json:
        _print_json({"job": numbers["job"], "qid": args.qid, "id": numbers["id"]})
    else:
        print(numbers["job"])
    return EXIT_OK


def _cmd_cancel(link, args):
    from .errors import JobNotFound
    code, out = EXIT_OK, []
    for seq in args.jobs:
        try:
            out.append({"job": seq, "cancelled": link.remote.call("cancel_job", seq)})
        except JobNotFound:
            out.append({"job": seq, "cancelled": False, "error": "not found"})
            code = EXIT_JOB
    if args.json:
        _print_json(out)
    else:
        for r in out:
            print(f"{r['job']}: {'cancelled' if r['cancelled'] else r.get('error', 'already finished')}")
    return code


def _cmd_wait(link, args):
    done = link.remote.call("wait_jobs", args.jobs, args.timeout or None)   # answered when all are done
    snaps = link.remote.call("show_jobs", args.jobs)
    if args.json:
        _print_json([_public(s, link.me) for s in snaps])
    else:
        print(_status_rows(snaps))
    ok = done and all(s["status"] == "completed" for s in snaps)
    return EXIT_OK if ok else EXIT_JOB


def _cmd_show(link, args):
    _print_json(_public(link.remote.call("show_job", args.job), link.me))
    return EXIT_OK


def _print_log(link, job: int, offset: int) -> tuple:
    """Print job ``job``'s log from byte ``offset`` as far as it goes now
    (raw bytes: what the job wrote); (new offset, the last answer)."""
    out = sys.stdout.buffer
    while True:
        got = link.remote.call("job_log", job, offset)
        data = got["data"].encode("latin-1")
        if data:
            out.write(data)
            out.flush()
            offset += len(data)
        if not data or offset >= got["size"]:
            return offset, got


def _cmd_log(link, args):
    _print_log(link, args.job, 0)
    return EXIT_OK


def _cmd_follow(link, args):
    """Print the log as it grows until the job ends: each wait is one call
    parked on the server, answered when output comes or the job ends."""
    offset = 0
    while True:
        offset, got = _print_log(link, args.job, offset)
        if got["ended"]:   # read before the data: nothing more will come
            return EXIT_OK if got["status"] == "completed" else EXIT_JOB
        link.remote.call("wait_log", args.job, offset, None)


def _cmd_report(link, args):
    rows = link.remote.call("report", args.by, True)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    table = [[r[args.by], r["jobs"], r["completed"], r["failed"], r["timeout"], r["killed"], r["lost"],
              r["cancelled"] + r["skipped"], _fmt_s(r["cpu_seconds"]), _fmt_bytes(r["max_rss_peak"]),
              _fmt_s(r["runtime"])] for r in rows]
    # 80 columns: short headers (``--json`` has the full names)
    print(_table(table, [args.by, "jobs", "done", "fail", "tmout", "kill", "lost", "canc", "cpu_s", "peak",
                         "run_s"], [17, 5, 5, 4, 5, 4, 4, 4, 7, 7, 7]))
    return EXIT_OK


def _cmd_plot(link, args):
    from .plot import Plot, _import
    pd = _import("pandas")   # ImportError naming the extra to install
    _import("plotnine")
    rows = link.remote.call("accounting", True)
    if not rows:
        print("ezpq plot: no finished job to plot", file=sys.stderr)
        return EXIT_JOB
    Plot(pd.DataFrame(rows)).build(color_by=args.color_by, facet_by=args.facet_by).save(
        args.output, verbose=False)
    print(args.output)
    return EXIT_OK


def _cmd_workers(link, args):
    n = link.remote.call("set_workers", args.n)
    if args.json:
        _print_json({"workers": n})
    else:
        print(n)
    return EXIT_OK


def _cmd_pause(link, args, paused=True):
    qids = link.remote.call("pause_queues", args.qids or None, paused)
    if args.json:
        _print_json({"paused" if paused else "resumed": qids})
    elif qids:
        print("\n".join(f"{q}: {'paused' if paused else 'resumed'}" for q in qids))
    else:
        print(f"no queue of yours to {'pause' if paused else 'resume'} (none, or all are already)")
    return EXIT_OK


def _cmd_resume(link, args):
    return _cmd_pause(link, args, paused=False)


def _cmd_priority(link, args):
    r = link.remote.call("job_priority", args.job, args.priority)
    if args.json:
        _print_json(r)
    elif r["changed"]:
        print(f"{r['job']}: priority {r['priority']}")
    else:
        print(f"ezpq: job {r['job']} is {r['status']}: only a waiting job's priority can change",
              file=sys.stderr)
    return EXIT_OK if r["changed"] else EXIT_JOB


def _cmd_requeue(link, args):
    from .errors import JobNotFound
    code, out = EXIT_OK, []
    for seq in args.jobs:
        try:
            out.append(link.remote.call("requeue_job", seq))
        except (JobNotFound, ValueError) as exc:
            out.append({"from": seq, "error": str(exc)})
            code = EXIT_JOB
    if args.json:
        _print_json(out)
    else:
        for r in out:
            if "error" in r:
                print(f"ezpq: {r['error']}", file=sys.stderr)
            else:
                print(f"{r['from']}: requeued as {r['job']}")
    return code


def _cmd_clean(link, args):
    n = sum(link.remote.call("clean", q) for q in (args.qid or [None]))
    if args.json:
        _print_json({"forgotten": n})
    else:
        print(f"{n} finished job{'s' if n != 1 else ''} forgotten")
    return EXIT_OK


def _cmd_top(link, args):
    from .client.top import run_top
    return run_top(lambda: link.remote.call("top"), describe_address(link.address), args.interval)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ezpq", description="Use a shared ezpq-server.",
                                epilog="exit codes: 0 ok, 1 a job failed or was not found, 2 usage, "
                                       "3 cannot connect or not allowed, 130 interrupted")
    p.add_argument("--version", action="version", version=_version("ezpq"))
    p.add_argument("--address", help=f"HOST:PORT (default $EZPQ_ADDRESS or 127.0.0.1:{DEFAULT_PORT})")
    p.add_argument("--socket", help="Unix socket path of the server")
    p.add_argument("--authkey-file", help=f"key file (default $EZPQ_AUTHKEY or {authkey_path()})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)   # --json after the command too
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of a table")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, parents=[common], help=help)
        c.set_defaults(handler=handler)
        return c

    st = command("status", _cmd_status, "your jobs (root and the server's owner: all)")
    st.add_argument("--state", action="append", choices=STATES, metavar="STATE",
                    help="only jobs in this status (repeatable): " + ", ".join(STATES))
    st.add_argument("--qid", action="append", metavar="QID", help="only jobs of this queue (repeatable)")
    st.add_argument("--user", action="append", metavar="USER",
                    help="only jobs of this user name (repeatable; you see others' only as root or owner)")
    st.add_argument("--retry", type=_seconds, default=0, metavar="SECONDS",
                    help="keep trying to connect for SECONDS (a server that restarts)")
    s = command("submit", _cmd_submit, "run a shell command as a job: ezpq submit [options] -- CMD ARGS")
    s.add_argument("--priority", type=int, default=100,
                   help="lower runs first, as in ezpq (default 100)")
    s.add_argument("--lane", default=None,
                   help="jobs of one lane run one at a time, in order (default: no lane)")
    s.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="kill the job (and its children) after SECONDS of running; 0: never (default)")
    s.add_argument("--max-memory", type=_job_size, default=0, metavar="SIZE",
                   help="kill the job when its memory (with its children's) passes SIZE, "
                        "e.g. 512M or 2G; 0: no limit (default)")
    s.add_argument("--retries", type=int, default=0, metavar="N",
                   help="run the job again up to N times when it fails, times out, is killed or is lost, "
                        "0-1000 (default 0)")
    s.add_argument("--after", type=_job_numbers, default=None, metavar="JOB,JOB",
                   help="start only once these jobs (job numbers, comma-separated, any queue of yours) "
                        "have completed; if one ends otherwise this job is skipped (default: none)")
    s.add_argument("--name", default=None, help="the job's name (default: the command)")
    s.add_argument("--qid", default="cli", help="the queue to put it in (default 'cli')")
    s.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    c = command("cancel", _cmd_cancel, "cancel jobs")
    c.add_argument("jobs", type=int, nargs="+", metavar="JOB", help="job numbers (the job column)")
    w = command("wait", _cmd_wait, "wait for jobs (default: all of yours); 1 if any did not complete")
    w.add_argument("jobs", type=int, nargs="*", metavar="JOB", help="job numbers (default: all of yours)")
    w.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="give up after SECONDS (exit 1); 0: wait as long as it takes (default)")
    w.add_argument("--retry", type=_seconds, default=0, metavar="SECONDS",
                   help="when the server is unreachable or goes away, keep reconnecting for SECONDS "
                        "and wait again (a server with --state-dir that restarts keeps the jobs)")
    sh = command("show", _cmd_show, "one job as JSON")
    sh.add_argument("job", type=int, metavar="JOB", help="a job number (the job column)")
    lg = command("log", _cmd_log, "print a job's stdout and stderr (1 if no such job of yours)")
    lg.add_argument("job", type=int, metavar="JOB", help="a job number (the job column)")
    fo = command("follow", _cmd_follow, "print a job's output as it runs, until it ends "
                                        "(exit 0 if it completed, 1 otherwise)")
    fo.add_argument("job", type=int, metavar="JOB", help="a job number (the job column)")
    r = command("report", _cmd_report, "jobs, failures, CPU, memory, runtime per user/function/qid")
    r.add_argument("--by", choices=["user", "function", "qid"], default="user",
                   help="one row per user (default), function or qid")
    pl = command("plot", _cmd_plot, "Gantt chart of finished jobs (needs the plot extra)")
    pl.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="image to write; its suffix picks the format (.png, .pdf, .svg)")
    pl.add_argument("--color-by", default="user", help="column that colours the bars (default user)")
    pl.add_argument("--facet-by", default="qid", help="column with one panel per value (default qid)")
    pa = command("pause", _cmd_pause, "no more jobs of these queues of yours start (running ones go on)")
    pa.add_argument("qids", nargs="*", metavar="QID", help="queues to pause (default: all of yours)")
    rs = command("resume", _cmd_resume, "jobs of these paused queues of yours start again")
    rs.add_argument("qids", nargs="*", metavar="QID", help="queues to resume (default: all of yours)")
    pr = command("priority", _cmd_priority, "give a waiting job another priority (1 if it no longer waits)")
    pr.add_argument("job", type=int, metavar="JOB", help="a job number (the job column)")
    pr.add_argument("priority", type=int, metavar="N",
                    help="the new priority: lower runs first (submit's default is 100); in a lane the "
                         "job moves within its lane, which still runs one job at a time")
    rq = command("requeue", _cmd_requeue, "run finished jobs of yours again, each as a new job")
    rq.add_argument("jobs", type=int, nargs="+", metavar="JOB",
                    help="job numbers of finished jobs still on the server; each prints its new number")
    cl = command("clean", _cmd_clean, "forget your finished jobs, results nobody collected included "
                                      "(their accounting rows stay)")
    cl.add_argument("--qid", action="append", metavar="QID",
                    help="only jobs of this queue (repeatable; default: all your queues)")
    tp = command("top", _cmd_top, "live view: running jobs (CPU %%, memory now), waiting jobs, workers; "
                                  "q quits")
    tp.add_argument("--interval", type=_interval, default=1.0, metavar="SECONDS",
                    help="seconds between refreshes, 0.2-3600 (default 1)")
    wk = command("workers", _cmd_workers, "set the server's worker count (root/owner)")
    wk.add_argument("n", type=int, metavar="N", help="jobs run at once, >= 1")
    return p


def _job_numbers(text: str) -> tuple:
    """``--after``: job numbers separated by commas (``7,8``), as ``schema.check_after`` takes them."""
    from . import schema
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not job numbers: {text!r} (e.g. 7,8)") from None
    try:
        return schema.check_after("--after", numbers)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _job_size(text: str) -> int:
    """``--max-memory``, ``--max-log``, ``--max-user-bytes``: bytes, or with
    a K/M/G/T suffix (powers of 1024); 0 for none."""
    n = _bytes_of(text, {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}, "512M, 2G")
    if not 0 <= n < 1 << 62:
        raise argparse.ArgumentTypeError(f"not a size >= 0: {text!r}")
    return int(n)


def _interval(text: str) -> float:
    """``top --interval``: seconds between refreshes."""
    value = _seconds(text)
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0.2 to 3600: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def _run_retrying(args) -> int:
    """Run the command; with ``--retry SECONDS``, a connection that fails or
    breaks is made again (every 0.2 s) until SECONDS have passed since the
    first failure, and the command starts over (``wait`` waits again)."""
    import time
    from .errors import ConnectionError as EzpqConnectionError
    retry = getattr(args, "retry", 0)
    until = None
    while True:
        try:
            link = _Link(args)
            until = None   # connected: a later break gets its own SECONDS
            return args.handler(link, args)
        except EzpqConnectionError:
            now = time.monotonic()
            until = now + retry if until is None else until
            if now >= until:
                raise
            logger.debug("cannot reach the server; trying again", exc_info=True)
            time.sleep(min(0.2, until - now))


def main(argv: Optional[List[str]] = None) -> None:
    """``ezpq``: the client command. The commands raise; this alone turns
    what they raise into a one-line message and the documented exit code."""
    from .errors import ConnectionError as EzpqConnectionError, EzpqError
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "submit":
        if args.command and args.command[0] == "--":
            args.command = args.command[1:]
        if not args.command:
            parser.error("submit: no command given (ezpq submit [options] -- CMD ARGS...)")
    try:
        code = _run_retrying(args)
    except (EzpqConnectionError, PermissionError) as exc:
        print(f"ezpq: {exc}", file=sys.stderr)
        code = EXIT_CONNECT
    except EzpqError as exc:   # JobNotFound among them
        print(f"ezpq: {exc}", file=sys.stderr)
        code = EXIT_JOB
    except (TypeError, ValueError) as exc:  # refused input (ours or the server's check)
        print(f"ezpq: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except ImportError as exc:   # an optional package (the plot extra) is missing
        print(f"ezpq: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("ezpq: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
