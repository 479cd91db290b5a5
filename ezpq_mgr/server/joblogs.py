"""Job logs: each job's stdout and stderr, in a file of its own.

A worker's descriptors 1 and 2 are pipes whose read ends only the server
holds (supervisor.py; a job's children and shell commands inherit them, so
their output is caught too). The supervisor reads them without blocking in
its selector and appends what comes to the job's log here, never under the
queue's lock. Why the server writes the file rather than the job: the server
then knows the moment a log grows (``ezpq follow`` is a parked call answered
then, no polling), it enforces the size cap (a job cannot fill the disk), and
the file is never where a job could redirect it.

Files are created like a privileged daemon creates its logs: in a directory
the server owns and nobody else can write (checked at start, ``LogDir``),
``O_CREAT|O_EXCL|O_NOFOLLOW`` (a name found there is checked: a regular file
with one link and the expected owner, else replaced), mode 0600, and on a
root server handed to the submitter (``fchown``): readable by that user and
root only. Other users never get them from the server either: ``Service``
serves a log only to the job's owner (and root/the server's owner).

A log is created at the job's first byte (a job that prints nothing costs no
file), capped at ``max_log`` bytes (the head is kept, then one line
``[log truncated at N bytes]`` and the rest is counted and dropped), and
removed when the server forgets the job (collected, cleaned or expired); a
timeout, kill or cancel keeps it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional

from .owndir import own_dir_problem

__all__ = ["LogBook", "JobLog", "Echo", "LogDirError", "DEFAULT_MAX_LOG", "truncated_marker"]

logger = logging.getLogger(__name__)

#: the default cap of one job's log (``ezpq-server --max-log``)
DEFAULT_MAX_LOG = 16 << 20
#: at most this many bytes per ``read`` reply (``ezpq log`` pages through)
READ_LIMIT = 1 << 20


class LogDirError(Exception):
    """The log directory is unsafe or cannot be made; a one-line reason."""


def truncated_marker(cap: int) -> bytes:
    return f"\n[log truncated at {cap} bytes]\n".encode()


class JobLog:
    """One job's log: where it goes, how much was written, whose it is."""

    __slots__ = ("seq", "uid", "directory", "size", "dropped", "created", "gone")

    def __init__(self, seq: int, uid: Optional[int], directory: str):
        self.seq = seq
        self.uid = uid           # the owner its file is handed to (None: the server's user)
        self.directory = directory
        self.size = 0            # bytes in the file (the marker included)
        self.dropped = 0         # bytes past the cap, not written
        self.created = False
        self.gone = False        # the job was forgotten: nothing more is written

    @property
    def path(self) -> str:   # made when needed: a job that prints nothing never pays for it
        return os.path.join(self.directory, f"{self.seq}.log")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _check_dir(path: str, shared_root: bool) -> None:
    why = own_dir_problem(path, f"log directory {path}", "711")
    if why is not None:
        raise LogDirError(why)


class LogBook:
    """Every job log of a server: create, append (capped), read, forget.

    ``directory`` None: a private one is made and removed at ``close``.
    ``chown``: hand each file to the job's submitter (a root shared server);
    the directory is then 0711 (users may read their own file by path),
    else 0700 (logs are read through the server). Thread-safe: the
    supervisor appends, connection threads read, the state's lock forgets."""

    def __init__(self, directory: Optional[str] = None, max_log: int = DEFAULT_MAX_LOG,
                 chown: bool = False):
        if isinstance(max_log, bool) or not isinstance(max_log, int) or max_log < 0:
            raise ValueError(f"max_log must be an int >= 0 (bytes), not {max_log!r}")
        self.max_log = max_log
        self.chown = chown
        mode = 0o711 if chown else 0o700
        self._private = directory is None
        try:
            if directory is None:
                directory = tempfile.mkdtemp(prefix="ezpq-logs-")
            else:
                try:
                    os.mkdir(directory, mode)
                except FileExistsError:
                    pass
            directory = os.path.abspath(directory)
            _check_dir(directory, chown)
            os.chmod(directory, mode)
        except OSError as e:
            raise LogDirError(f"log directory {directory}: {e.strerror or e}") from None
        self.directory = directory
        self.logs: Dict[int, JobLog] = {}
        self.doomed: List[str] = []     # files of forgotten jobs, removed by sweep
        self.on_doomed: Optional[Callable[[], None]] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ writing
    def sink(self, seq: int, uid: Optional[int]) -> JobLog:
        """The log of job ``seq``, made when its first bytes come (a retry
        goes on in the same one); the file waits for ``append``. Under the
        lock: a kill's helper thread may drain the same job's pipes."""
        log = self.logs.get(seq)
        if log is None:
            with self._lock:
                log = self.logs.get(seq)
                if log is None:
                    log = self.logs[seq] = JobLog(seq, uid if self.chown and uid else None, self.directory)
        return log

    def append(self, log: JobLog, data: bytes) -> bool:
        """Write ``data`` to ``log`` up to the cap; True when the file grew."""
        with self._lock:
            if log.gone:
                return False
            if log.dropped:   # past the cap, the marker written: counted only
                log.dropped += len(data)
                return False
            try:
                fd = self._open(log)
            except OSError as e:   # said once: this job's output is not kept from here on
                log.gone = True
                logger.error("job %s: cannot open its log %s: %s", log.seq, log.path, e.strerror or e)
                return False
            try:
                room = max(0, self.max_log - log.size)   # a restored log may be full already
                chunk = data
                if len(data) > room:   # the cap: its head, then one line says so
                    chunk = data[:room] + truncated_marker(self.max_log)
                    log.dropped = len(data) - room
                n = 0
                view = memoryview(chunk)
                while n < len(view):
                    n += os.write(fd, view[n:])
                log.size += n
                if log.gone:   # forgotten while it was made (see forget)
                    _unlink(log.path)
                    return False
                return True
            except OSError as e:   # disk full: what did not fit is lost, said once per chunk
                logger.error("job %s: cannot write its log %s: %s", log.seq, log.path, e.strerror or e)
                return False
            finally:
                os.close(fd)

    def _open(self, log: JobLog) -> int:
        """The log's file for appending, made safely on first use. Caller holds _lock.

        ``O_NONBLOCK``: the file is its submitter's, who may take a file lease
        on it (``F_SETLEASE``); a blocking open would then wait in the
        supervisor until they let go (or ``lease-break-time``, 45 s) and stall
        every job. Non-blocking, such an open fails at once (``EAGAIN``): that
        job's output is not kept from there on, nobody else's is delayed."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        if log.created:
            return os.open(log.path, flags)
        try:
            fd = os.open(log.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = self._reuse(log, flags)
        else:
            try:
                if log.uid is not None:
                    os.fchown(fd, log.uid, -1)
                os.fchmod(fd, 0o600)
            except OSError:
                os.close(fd)
                raise
        log.created = True
        log.size = os.fstat(fd).st_size
        return fd

    def _reuse(self, log: JobLog, flags: int) -> int:
        """A file of that name is there: a restored server's log of the same
        job (numbers are never reused) goes on; anything else (a link, a
        file of another owner) is removed and the log made anew."""
        try:
            fd = os.open(log.path, flags)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES):
                raise
            fd = -1
        if fd >= 0:
            st = os.fstat(fd)
            if (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                    and st.st_uid == (os.geteuid() if log.uid is None else log.uid)):
                return fd
            os.close(fd)
        logger.warning("job %s: %s was not its log; replaced", log.seq, log.path)
        try:
            os.unlink(log.path)
        except IsADirectoryError:
            shutil.rmtree(log.path, ignore_errors=True)
        fd = os.open(log.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        if log.uid is not None:
            os.fchown(fd, log.uid, -1)
        return fd

    # ------------------------------------------------------------ reading
    def size(self, seq: int) -> int:
        log = self.logs.get(seq)
        return 0 if log is None else log.size

    def read(self, seq: int, offset: int, limit: int = READ_LIMIT) -> bytes:
        """Up to ``limit`` bytes of job ``seq``'s log from ``offset`` (b"": none yet)."""
        log = self.logs.get(seq)
        if log is None or not log.created or log.gone:
            return b""
        try:
            fd = os.open(log.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return b""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            return os.pread(fd, limit, offset)
        finally:
            os.close(fd)

    # ----------------------------------------------------------- forgetting
    def forget(self, seq: int) -> None:
        """The server forgot job ``seq``: its log goes too. Called under the
        state's lock, so no I/O here: the file is removed by ``sweep`` (the
        supervisor thread, woken by ``on_doomed``); a job that wrote nothing
        costs a dict pop. ``gone`` is set before ``created`` is read, and
        ``append`` sets ``created`` before it reads ``gone``: a file made
        meanwhile is removed by one of the two."""
        log = self.logs.pop(seq, None)
        if log is None:
            return
        log.gone = True
        if log.created:
            self.doomed.append(log.path)
            if self.on_doomed is not None:
                self.on_doomed()

    def sweep(self) -> None:
        """Remove the files of forgotten jobs (outside the state's lock)."""
        while self.doomed:
            path = self.doomed.pop()
            with self._lock:
                _unlink(path)

    def restore(self, known: Dict[int, Any]) -> None:
        """At start (a durable server's ``--state-dir``, or a ``--log-dir``
        used before): the logs of jobs the server still knows are read and
        appended to again; every other ``N.log`` (a job forgotten while the
        server was down or killed) is removed. Only names of that shape, never
        through a link (``lstat``)."""
        for name in os.listdir(self.directory):
            stem, dot, ext = name.partition(".")
            if ext != "log" or not stem.isdigit():
                continue
            path = os.path.join(self.directory, name)
            seq = int(stem)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rec = known.get(seq)
            owner = getattr(rec, "uid", None) if self.chown else None
            owner = owner or None   # root's own jobs: the server's file
            if (rec is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                    and st.st_uid == (os.geteuid() if owner is None else owner)):
                log = self.logs.get(seq)
                if log is None:
                    log = self.logs[seq] = JobLog(seq, owner, self.directory)
                    log.created, log.size = True, st.st_size
                    if log.size > self.max_log:
                        log.dropped = 1   # already cut
            elif not stat.S_ISDIR(st.st_mode):
                _unlink(path)

    def close(self) -> None:
        """A private directory is removed with every log in it; a given one is kept."""
        if self._private:
            shutil.rmtree(self.directory, ignore_errors=True)


#: bytes of job output a private server holds for its terminal at most
ECHO_BUFFER = 1 << 20


class Echo:
    """A private server's copy of its jobs' output to its own stdout and
    stderr (its client's terminal: a job's ``print`` shows as it did before
    logs existed). Written by a thread of its own with a bounded buffer, so a
    terminal that does not read (Ctrl-S, a full pipe) never stalls the
    supervisor; past ``ECHO_BUFFER`` bytes waiting, output is not echoed
    (it is still in the log) and a one-line note says how much."""

    def __init__(self) -> None:
        import collections
        self._items: "collections.deque" = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0
        self._skipped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ezpq-echo", daemon=True)
        self._thread.start()

    def put(self, stream: int, data: bytes) -> None:
        """``stream`` 0: stdout, 1: stderr."""
        with self._cond:
            if self._pending + len(data) > ECHO_BUFFER:
                self._skipped += len(data)
                return
            self._pending += len(data)
            self._items.append((stream, data))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                stream, data = self._items.popleft()
                skipped, self._skipped = self._skipped, 0
            if skipped:
                _write_all(2, f"[ezpq: {skipped} bytes of job output not shown here (the terminal "
                              f"did not keep up); Queue.log(id) has them]\n".encode())
            _write_all(1 + stream, data)
            with self._cond:
                self._pending -= len(data)

    def close(self, timeout: float = 1.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:   # a closed terminal: nothing more to show
        pass
