"""Running one job: in a persistent worker process, or on a server thread.

A worker process loops ``recv RunJob → run → send Result (then
LateFigures)`` over its channel to the supervisor (the messages of
``messages.py``, in the format of ``workerproto``: the server never
unpickles what a worker sends). Between jobs it keeps nothing of the job but
a small cache of unpickled functions (a ``map`` sends the same function
bytes each time), and no process: whatever a job left running is killed as
soon as its result is sent (the worker is a child subreaper, so orphans of
the job's processes come back to it). A thread cannot be killed: a worker
of another user whose job left a Python thread behind says so with the
job's last message and exits (``leaving``), so that nothing of one job runs
into the next one's time, figures or output; the server then starts a
fresh worker. That is the worker's own word, so the server also checks
from outside that a worker it counts idle uses no CPU (supervisor.py).
Native threads a library keeps (a BLAS pool) are not Python threads and do
not make a worker leave; idle, they cost nothing.

Two ways in:

- ``exec_main``: a worker for another user than the server's. It is a fresh
  interpreter exec'd by the server (never a fork of it: nothing of the
  server's memory, descriptors or environment crosses over), started as
  root because the interpreter may live where only root can read it. It
  imports everything it needs first, then drops to the user (groups, gid,
  uid), clears the environment to the user's HOME/USER/LOGNAME/SHELL/PATH,
  and only then reads its first job.
- ``worker_main``: a worker for the server's own user, started by
  multiprocessing with the configured start method (fast); it closes every
  descriptor it inherited except its channel and lifeline.

Both notice the server's death through their lifeline: the read end of a
pipe whose write end only the server holds. At EOF the worker kills its
tree and exits, so a SIGKILLed server leaves no orphan. (PR_SET_PDEATHSIG
would be cleared by setuid, and an exec'd worker has no
``multiprocessing.parent_process``.)
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from .. import serialize
from . import workerproto
from ..job import JobStatus
from ..messages import Env, Figures
from ..stdlib_private import forget_mp_helpers
from ..shell import ShellResult
from .meter import JobMeter
from .procutil import become_subreaper, child_pids, kill_tree

__all__ = ["worker_main", "exec_main", "exec_argv", "run_call", "apply_env", "thread_cpu", "HOST"]

HOST = socket.gethostname()
_FN_CACHE_SIZE = 32

#: One finished run: (status, exitcode, output_blob, exception text).
CallResult = Tuple[JobStatus, int, Optional[bytes], Optional[str]]


def apply_env(env: Optional[Env]) -> None:
    """Run in the submitting client's working directory with its sys.path."""
    if env is None:
        return
    cwd, path = env
    if path is not None:
        sys.path[:] = list(path)
    if cwd is not None and os.getcwd() != cwd:
        os.chdir(cwd)


def run_call(fn_blob: bytes, args_blob: bytes, fn_cache: Optional[Dict[bytes, Any]] = None) -> CallResult:
    """Unpickle and call the job; never raises."""
    try:
        fn = fn_cache.get(fn_blob) if fn_cache is not None else None
        if fn is None:
            try:
                fn = serialize.load(fn_blob)
            except (ImportError, AttributeError) as exc:
                fn = _Unloadable(cannot_load_message(exc))
            if fn_cache is not None:
                if len(fn_cache) >= _FN_CACHE_SIZE:
                    fn_cache.clear()
                fn_cache[fn_blob] = fn
        if type(fn) is _Unloadable:  # said in one line, not a traceback per job
            return JobStatus.FAILED, 1, None, fn.why
        args, kwargs = serialize.load(args_blob)
        output = fn(*(args or ()), **(kwargs or {}))
    except BaseException:  # the job's own SystemExit/KeyboardInterrupt fail the job only
        return JobStatus.FAILED, 1, None, traceback.format_exc()
    blob, error = serialize.dump_output(output)
    if error is not None:
        return JobStatus.FAILED, 1, None, error
    if isinstance(output, ShellResult) and output["returncode"] != 0:
        return (JobStatus.FAILED, output["returncode"], blob,
                f"command exited with code {output['returncode']}")
    return JobStatus.COMPLETED, 0, blob, None


CANNOT_LOAD = workerproto.CANNOT_LOAD


class _Unloadable:
    """A function whose pickle refers to a module this worker cannot import
    (cached like a function, so each later job fails at once)."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


def cannot_load_message(exc: BaseException) -> str:
    """What to do when a function's module is missing in the worker."""
    module = getattr(exc, "name", None)
    if not module and isinstance(exc, AttributeError):  # "Can't get attribute 'f' on <module 'm' ...>"
        text = str(exc)
        start = text.find("<module '")
        module = text[start + 9:text.find("'", start + 9)] if start >= 0 else None
    where = f"defined in module {module!r}, which" if module else "defined in a module that"
    return (f"{CANNOT_LOAD}: it is {where} the worker cannot import ({type(exc).__name__}: {exc}). "
            f"Define the function in the main script (it then travels by value), or install "
            f"the module where the server runs.")


def thread_cpu() -> Tuple[float, float]:
    """(user, system) CPU seconds of the calling thread."""
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_THREAD)
        return ru.ru_utime, ru.ru_stime
    except (ImportError, AttributeError, OSError):
        import time
        return time.thread_time(), 0.0


def _watch_lifeline(fd: int) -> None:
    """Exit, killing the job's processes, when the server is gone (EOF on
    ``fd``: the server holds the only write end)."""
    def watch() -> None:
        # poll first: the read end is shared by every worker, and a job may
        # have made it non-blocking (the flag is shared too)
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            poller.poll()
            try:
                if not os.read(fd, 1):
                    break
            except BlockingIOError:
                continue
            except OSError:
                break
        kill_tree(child_pids(os.getpid()))
        os._exit(1)

    threading.Thread(target=watch, name="ezpq-lifeline", daemon=True).start()


def _close_inherited(keep: List[int]) -> None:
    """Close every descriptor but stdio and ``keep`` (a forked worker holds
    copies of the server's: listener, log, clients, other workers' pipes)."""
    try:
        fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def become_user(uid: int) -> None:
    """Drop root for ``uid`` (groups, gid, uid) and take the user's own
    environment (nothing of the server's), before any job is read."""
    import ctypes
    import pwd
    pw = pwd.getpwuid(uid)
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(uid)
    os.environ.clear()
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name,
                      SHELL=pw.pw_shell or "/bin/sh", PATH=USER_PATH)
    try:  # setuid made us non-dumpable: /proc/self would stay root's (no clear_refs)
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


USER_PATH = "/usr/local/bin:/usr/bin:/bin"

#: Imported before the drop: the interpreter's own files may be readable by
#: root only, and a job's pickle or code may need any of these.
PRELOAD = ("base64", "bisect", "bz2", "calendar", "collections", "concurrent.futures", "contextlib",
           "copy", "csv", "ctypes", "dataclasses", "datetime", "decimal", "difflib", "email",
           "enum", "fnmatch", "fractions", "functools", "getpass", "glob", "gzip", "hashlib",
           "heapq", "hmac", "http.client", "importlib", "inspect", "io", "ipaddress", "itertools",
           "json", "locale", "logging", "lzma", "math", "mmap", "multiprocessing",
           "multiprocessing.pool", "numbers", "operator", "pathlib", "pickle", "platform",
           "pprint", "queue", "random", "re", "resource", "secrets", "selectors", "shlex",
           "shutil", "signal", "socket", "sqlite3", "ssl", "stat", "statistics", "string",
           "struct", "subprocess", "tempfile", "textwrap", "threading", "timeit", "typing",
           "unicodedata", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
           "zipfile", "zlib", "cloudpickle", "psutil", "ezpq_mgr")


def _preload() -> None:
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module missing here is the job's business
            pass


def exec_argv(channel_fd: int, lifeline_fd: int, uid: int, accounting: bool,
              outputs: Optional[List[int]] = None) -> List[str]:
    """The command line of an exec'd worker (``-I``: no PYTHON* variable or
    user site of the server's environment applies)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # above ezpq_mgr/worker/
    code = f"import sys; sys.path.insert(0, {root!r}); from ezpq_mgr.worker.run import exec_main; exec_main()"
    return [sys.executable, "-I", "-c", code, str(channel_fd), str(lifeline_fd), str(uid),
            "1" if accounting else "0", ",".join(str(fd) for fd in outputs or ()) or "-"]


def exec_main() -> None:
    """Entry point of an exec'd worker: ``channel lifeline uid accounting outputs``."""
    channel_fd, lifeline_fd, uid, accounting = (int(x) for x in sys.argv[1:5])
    outputs = [int(x) for x in sys.argv[5].split(",")] if sys.argv[5:6] not in ([], ["-"]) else []
    _preload()
    become_user(uid)
    _watch_lifeline(lifeline_fd)
    become_subreaper()
    if _serve(channel_fd, accounting == 1, strict=True, outputs=outputs):
        _exit()


def worker_main(conn, lifeline, accounting: bool = True, mark=None, outputs: Optional[list] = None) -> None:
    """Entry point of a multiprocessing worker (the server's own user).
    ``mark``: the shared array where its meter leaves each job's baseline
    (meter.MARK_SIZE doubles), for the figures of a job the server kills.
    ``outputs``: the write ends of its jobs' output pipes (see ``_serve``)."""
    channel_fd, lifeline_fd = conn.fileno(), lifeline.fileno()
    out_fds = [c.fileno() for c in outputs or ()]
    _close_inherited([channel_fd, lifeline_fd] + out_fds)
    forget_mp_helpers()
    _watch_lifeline(lifeline_fd)
    become_subreaper()
    if _serve(channel_fd, accounting, mark=mark, outputs=out_fds):
        _exit()


def _exit() -> None:
    """Leave now, told to stop or leaving: a thread a job left behind
    (non-daemon ones included) must not keep the worker alive. (At EOF the
    interpreter ends as usual: the server is gone, or a job shut the
    channel and the server ends the worker itself.)"""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(0)


class _Channel:
    """The worker's end: blocking frames, also when the job has set the
    shared descriptor non-blocking."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf = b""

    def _wait(self, event: int) -> None:
        poller = select.poll()
        poller.register(self.fd, event)
        poller.poll()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def _read(self) -> bytes:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)  # below the mmap threshold: no mmap per job
            except BlockingIOError:
                self._wait(select.POLLIN)
                continue
            if not data:
                raise EOFError
            return data

    def recv(self) -> Tuple[int, bytes]:
        """(kind, body) of the server's next message."""
        buf = self._buf
        while len(buf) < workerproto.HEADER.size:
            buf += self._read()
        _, kind, _, size = workerproto.HEADER.unpack_from(buf)
        end = workerproto.HEADER.size + size
        if len(buf) < end:
            parts, have = [buf], len(buf)
            while have < end:
                chunk = self._read()
                parts.append(chunk)
                have += len(chunk)
            buf = b"".join(parts)
        self._buf = buf[end:]
        return kind, buf[workerproto.HEADER.size:end]


def _sweep_children(children_fd: Optional[int], meter_saw: bool) -> None:
    """Kill whatever the job left running (and reap it). The hot path pays
    one pread of our main thread's ``children`` (~1 us); only a job that
    started processes pays for a look at every thread."""
    if children_fd is not None and not meter_saw:
        if not os.pread(children_fd, 64, 0):
            return
    # repeated: an orphan of a dying child is re-parented to us a moment
    # after that child's exit, so one pass can miss it
    for _ in range(50):
        left = child_pids(os.getpid())
        if not left:
            break
        kill_tree(left)
        _reap()
    _reap()


def _reap() -> None:
    """Collect every exited child (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _line_buffered() -> None:
    """A job's ``print`` reaches its log line by line, as on a terminal
    (stdout on a pipe would wait for 8 KiB)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError, OSError):   # replaced by something else
            pass


def _serve(fd: int, accounting: bool, strict: bool = False, mark=None,
           outputs: Optional[List[int]] = None) -> bool:
    """Read jobs, run them, send results, until STOP or EOF; True when told
    to stop or leaving (then the caller exits at once), False at EOF.

    ``accounting`` False turns the per-job CPU and memory figures off (they
    are then None); the benchmarks use it to show what accounting costs.
    ``outputs``: four pipes, [stdout, stderr] for odd jobs then for even
    ones; each job gets its pair as descriptors 1 and 2 (its children and
    commands inherit them) and the server appends what comes to that job's
    log. Alternating means a byte a job writes late never lands in the next
    job's log. The next job's pair is put in place as soon as a job is
    over, while the worker waits: the two ``dup2`` are then off the path
    from a job's arrival to its result. ``strict`` (a worker of another user than the server's): after a job
    that left a Python thread running, say so in its last message and
    return (the worker leaves). A worker of the server's own user runs code
    as trusted as the server itself and keeps its hot path as it was."""
    chan = _Channel(fd)
    meter = JobMeter(resets=not strict, mark=mark) if accounting else None
    fn_cache: Dict[bytes, Any] = {}
    try:
        children_fd: Optional[int] = os.open(f"/proc/self/task/{os.getpid()}/children", os.O_RDONLY)
    except OSError:
        children_fd = None
    if meter:
        meter.arm()
    own_threads = threading.active_count()   # ours: main, lifeline, the meter's
    leaving = False
    if outputs:
        _line_buffered()
    jobs = 0
    chan.send(workerproto.encode_ready())
    no_figures = workerproto.NO_FIGURES
    while True:
        if outputs:
            # the next job's pair, set while we wait for it: two system
            # calls that would otherwise sit between its arrival and its result
            pair = (jobs & 1) * 2
            os.dup2(outputs[pair], 1)
            os.dup2(outputs[pair + 1], 2)
        try:
            kind, body = chan.recv()
        except (EOFError, OSError):
            return False
        if kind != workerproto.JOB:
            return True
        fn_blob, args_blob, env, as_thread = workerproto.decode_job(body)   # a RunJob
        del body
        jobs += 1
        try:
            apply_env(env)
        except OSError as e:
            cwd = env[0] if env else None
            why = f"cannot enter the job's working directory {cwd!r} as this user: {e}"
            now = time.time()
            try:
                chan.send(workerproto.encode_result("failed", 1, now, now, None, why, no_figures))
            except (EOFError, OSError):
                return False
            continue
        if as_thread:  # a thread job of a shared server: this thread's CPU, no RSS
            u0, s0 = thread_cpu()
        elif meter:
            meter.begin()
        started = time.time()
        status, exitcode, out, exc = run_call(fn_blob, args_blob, fn_cache)
        ended = time.time()
        figures = None  # a measured job's figures follow its result
        if as_thread:
            u1, s1 = thread_cpu()
            figures = Figures(u1 - u0, s1 - s0, None, None, None)
        elif not meter:
            figures = no_figures
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        spawned = False
        if strict and figures is not None:
            leaving = threading.active_count() > own_threads
        try:
            chan.send(workerproto.encode_result(status.value, exitcode, started, ended, out, exc, figures,
                                                leaving))
            if figures is None:
                # measured now: a system call before the send would delay the
                # result by far more than its own cost (see meter.py)
                figures, spawned = meter.stop()
                leaving = strict and threading.active_count() > own_threads
                chan.send(workerproto.encode_figures(figures, leaving))
        except (EOFError, OSError) as e:
            if getattr(e, "errno", None) not in (None, errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise
            return False
        _sweep_children(children_fd, spawned or leaving)   # leaving: every thread's children
        if leaving:
            return True
        if meter:  # for the next job, while the supervisor reads this result
            meter.arm(reuse=not as_thread)
