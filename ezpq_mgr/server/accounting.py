"""The accounting log: one row per finished job, and ``report`` over it.

Rows hold every job-dict field but the payloads (output, args, kwargs), as
plain values, so they go to a CSV (``ezpq-server --log-file``) and to
``ezpq report``, which sums them like Slurm's ``sacct``: jobs, failures,
CPU seconds, peak and mean ``max_rss``, runtime, per user, function or qid.

The CSV is written by a background thread, never under the queue's lock,
and it is the only copy: ``report`` and ``accounting`` read this server
run's rows back from it as they go (memory stays flat however many jobs
ran). Without a log file the last ``MEMORY_ROWS`` rows are kept in memory.

A root server appends to this file, so it is opened like a privileged
daemon opens its logs: never through a symbolic link, never a file with
other hard links or another owner, never in a directory that someone else
could change; control characters in fields are escaped (``\\n``, ``\\x1b``)
so that one job is always one line. When the disk is full, rows wait in a
bounded buffer and are written when space returns; rows past the bound are
counted and the count is logged as an error, never dropped silently.
"""

from __future__ import annotations

import collections
import csv
import errno
import io
import itertools
import logging
import operator
import os
import queue
import re
import stat
import threading
import time
from datetime import datetime
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional

from ..job import FIELDS, TIMES
from .callers import describe_user

__all__ = ["AccountingLog", "LogFileError", "ROW_FIELDS", "report", "REPORT_KEYS", "REPORT_STATUSES",
           "peak_rss", "MEMORY_ROWS",
           "PENDING_ROWS"]

logger = logging.getLogger(__name__)

ROW_FIELDS = tuple(f for f in FIELDS if f not in ("output", "args", "kwargs", "job")) + ("uid", "job")
REPORT_KEYS = ("user", "function", "qid")

#: Without a log file, ``report`` sees at most this many recent rows.
MEMORY_ROWS = 10_000
#: With a log file that cannot be written (disk full), at most this many
#: rows wait in memory; later ones are counted as dropped.
PENDING_ROWS = 100_000
#: How often rows that wait for disk space are tried again (seconds).
RETRY_SECONDS = 0.5
_BATCH = 512  # rows per write(2)

#: JobRecord attributes kept per finished job (payloads and blobs never are)
_RAW_FIELDS = tuple(f for f in ROW_FIELDS
                    if f not in ("job", "lane", "callback", "qid", "status")) + ("seq", "lane_text")
_KEPT = _RAW_FIELDS + ("qid", "status")
_UID = _KEPT.index("uid")
_raw_values = operator.attrgetter(*_RAW_FIELDS)

_INTS = frozenset(("id", "priority", "exitcode", "max_rss", "max_rss_children", "pid", "uid", "retries",
                   "attempts", "max_memory", "job"))
_FLOATS = frozenset(("timeout", "runtime", "cpu_user", "cpu_system"))
_CSV_UID = ROW_FIELDS.index("uid")
_HEADER = (",".join(ROW_FIELDS) + "\n").encode()


class LogFileError(Exception):
    """The accounting log cannot be used safely; the message is one line."""


def _row(raw: tuple) -> dict:
    """A CSV-ready row (times as ISO text, lane as text) from kept values."""
    row = dict(zip(_KEPT, raw))
    row["job"] = row.pop("seq")
    row["lane"] = row.pop("lane_text")
    row["callback"] = None  # a pickled client-side value: the server never unpickles it
    for key in TIMES:
        if row.get(key) is not None:
            row[key] = datetime.fromtimestamp(row[key]).isoformat(sep=" ")
    return row


# ------------------------------------------------------------ escaping
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: "re.Match") -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _encode_row(raw: tuple, out: io.StringIO, writer) -> bytes:
    """One CSV line; control characters escaped after quoting (one regex
    search per row: a field that held a newline stays quoted, harmlessly)."""
    row = _row(raw)
    writer.writerow(["" if v is None else v for v in map(row.get, ROW_FIELDS)])
    line = out.getvalue()
    out.seek(0)
    out.truncate()
    body = line[:-1]  # without the line terminator
    if _CONTROL.search(body):
        line = _CONTROL.sub(_escape_char, body) + "\n"
    return line.encode("utf-8", "backslashreplace")


def _typed(fields: List[str]) -> dict:
    """A row read back from the CSV, with numbers as numbers and "" as None."""
    row = {}
    for key, value in zip(ROW_FIELDS, fields):
        if value == "":
            row[key] = None
        elif key in _INTS:
            try:
                row[key] = int(value)
            except ValueError:
                row[key] = value
        elif key in _FLOATS:
            try:
                row[key] = float(value)
            except ValueError:
                row[key] = value
        elif key == "cancelled":
            row[key] = value == "True"
        else:
            row[key] = value
    return row


# ------------------------------------------------------ opening safely
def _check_directory(log: str, path: str, st: os.stat_result, me: int, writers: int) -> None:
    if st.st_uid not in (0, me):
        raise LogFileError(f"{log}: directory {path} is owned by {describe_user(st.st_uid)}, who could replace the log")
    if st.st_mode & writers and not st.st_mode & stat.S_ISVTX:
        raise LogFileError(f"{log}: directory {path} is writable by others without the sticky bit "
                           f"(mode {oct(st.st_mode & 0o7777)})")


def open_log(path: str) -> int:
    """Open (creating it, mode 0640) the CSV for appending and reading; an
    ``O_APPEND`` descriptor, or ``LogFileError`` saying why not.

    Refused: a symbolic link (``O_NOFOLLOW``), anything but a regular file,
    a file with other hard links, owned by another user or writable by
    others; a file whose directory is owned by another user than us or
    root, or is group- or other-writable without the sticky bit; and one
    below a directory that is owned by another user or other-writable
    without the sticky bit (a group-writable ``/var/log``, root:syslog 0775
    on Debian, is accepted)."""
    me = os.geteuid()
    directory, name = os.path.split(os.path.abspath(path))
    real = os.path.realpath(directory)
    try:
        checked = os.stat(real)
        _check_directory(path, real, checked, me, stat.S_IWGRP | stat.S_IWOTH)
        part = os.path.dirname(real)
        while True:
            _check_directory(path, part, os.stat(part), me, stat.S_IWOTH)
            if part == os.path.dirname(part):
                break
            part = os.path.dirname(part)
        dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise LogFileError(f"cannot open the directory of {path}: {exc.strerror}") from None
    opened = os.fstat(dir_fd)
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(dir_fd)
        raise LogFileError(f"{path}: directory {real} changed while it was checked")
    try:
        try:
            fd = os.open(name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o640, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LogFileError(f"{path} is a symbolic link; give the real path") from None
            raise LogFileError(f"cannot open {path}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LogFileError(f"{path} is not a regular file")
        if st.st_uid != me:
            raise LogFileError(f"{path} is owned by {describe_user(st.st_uid)}, not by {describe_user(me)}")
        if st.st_nlink > 1:
            raise LogFileError(f"{path} has {st.st_nlink} hard links; use a file of its own")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise LogFileError(f"{path} is writable by others (mode {oct(st.st_mode & 0o777)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------- rows
class Rows(list):
    """Accounting rows, read from the CSV each time they are iterated, so
    that a report over a million jobs never holds them all.

    A ``list`` so that the wire (JSON) and pickle send it as one: both
    iterate it (``__reduce__`` makes a plain list)."""

    def __init__(self, source: Callable[[], Iterator[dict]]):
        super().__init__()
        self._source = source

    def __iter__(self) -> Iterator[dict]:
        return self._source()

    def __len__(self) -> int:
        return sum(1 for _ in self._source())

    def __bool__(self) -> bool:
        return next(self._source(), None) is not None

    def __getitem__(self, index):
        return [r for r in self][index]

    def __eq__(self, other) -> bool:
        return [r for r in self] == (list(other) if isinstance(other, (list, tuple)) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Rows({[r for r in self]!r})"

    def __reduce__(self):
        return (list, ([r for r in self],))


class _Flush(threading.Event):
    """A reader's request to the writer: write what you can, then tell me
    where the file ends and which rows still wait."""

    end = 0
    waiting: List[bytes] = []


_NOTHING = object()  # the queue had nothing (a retry is due)


class AccountingLog:
    """Rows of finished jobs: appended to a CSV, or (without one) the last
    ``MEMORY_ROWS`` in memory.

    ``record`` runs under the queue's lock as each job ends, so it only
    copies a few attributes; rows are formatted when written or read."""

    def __init__(self, path: Optional[str] = None, memory_rows: int = MEMORY_ROWS,
                 pending_limit: int = PENDING_ROWS):
        self.path = path
        self._recent: Deque[tuple] = collections.deque(maxlen=memory_rows)
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._writer: Optional[threading.Thread] = None
        self._fd = -1
        if path:
            self._fd = open_log(path)
            self._limit = pending_limit
            self._unwritten: Deque[bytes] = collections.deque()  # writer thread only
            self._start = self._prepare()
            self._limit += len(self._unwritten)  # a header that waits is not a row
            self._head_done = 0     # bytes of _unwritten[0] already in the file
            self._dropped = 0       # rows past the bound since the disk filled
            self._stalled: Optional[str] = None   # why writing stopped, once warned
            self._retry_at = 0.0    # monotonic time of the next try while stalled
            self._out = io.StringIO()
            self._csv = csv.writer(self._out, lineterminator="\n")
            self._writer = threading.Thread(target=self._write_loop, name="ezpq-accounting", daemon=True)
            self._writer.start()

    def _prepare(self) -> int:
        """Write the header to a new file (or end a torn last line: the disk
        filled while a row was written); the offset where this run's rows
        start. If even that cannot be written, it waits with the rows."""
        size = os.fstat(self._fd).st_size
        first = _HEADER if size == 0 else (b"" if os.pread(self._fd, 1, size - 1) == b"\n" else b"\n")
        if first:
            try:
                n = os.write(self._fd, first)
            except OSError:
                n = 0
            if n < len(first):
                self._unwritten.append(first[n:])
        return size + (len(first) if first == _HEADER else 0)

    # ------------------------------------------------------------ record
    def record(self, rec, qid: str) -> None:
        """Keep a finished JobRecord's figures (``qid`` as its user sees it)."""
        raw = _raw_values(rec) + (qid, rec.status.value)
        if self._writer is not None:
            self._queue.put(raw)
        else:
            with self._lock:
                self._recent.append(raw)

    def visible(self, uid: Optional[int]) -> List[dict]:
        """Rows of one user (None: all): every row of the CSV, earlier runs of
        the server included, read as they are iterated (with the rows that
        still wait to be written)."""
        if self._writer is None:
            with self._lock:
                raws = list(self._recent)
            return [_row(r) for r in raws if uid is None or r[_UID] == uid]
        request = _Flush()
        self._queue.put(request)
        if request.wait(10):
            end, waiting = request.end, request.waiting
        else:  # the writer is stuck in a write: what the file holds now
            end, waiting = os.fstat(self._fd).st_size, []
        return Rows(lambda: self._read(uid, end, waiting))

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(10)
            if not self._writer.is_alive() and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # ------------------------------------------------------------ reading
    def max_job(self) -> int:
        """The largest job number (``job`` column) in the file before this
        run (0: none), so that this run's numbers continue after it and the
        column stays unique across restarts. Reads the whole file once, at start."""
        if self._writer is None:
            return 0
        col, top = ROW_FIELDS.index("job"), 0
        for fields in csv.reader(self._lines(self._start, [], since=0)):
            if len(fields) == len(ROW_FIELDS):
                try:
                    top = max(top, int(fields[col]))
                except ValueError:
                    pass   # the header, or a torn line
        return top

    def _lines(self, end: int, waiting: List[bytes], since: int = 0) -> Iterator[str]:
        pos, rest = since, b""   # from the start: a restarted server reports its history too
        while pos < end:
            chunk = os.pread(self._fd, min(1 << 16, end - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        for line in (rest + b"".join(waiting)).split(b"\n"):
            if line:
                yield line.decode("utf-8", "replace")

    def _read(self, uid: Optional[int], end: int, waiting: List[bytes]) -> Iterator[dict]:
        want = None if uid is None else str(uid)
        for fields in csv.reader(self._lines(end, waiting)):
            if len(fields) != len(ROW_FIELDS) or fields == list(ROW_FIELDS):
                continue  # a torn line (the disk filled, then the server stopped)
            if want is None or fields[_CSV_UID] == want:
                yield _typed(fields)

    # ------------------------------------------------------------ writing
    def _write_loop(self) -> None:
        """Never ends but on ``close``: a failing write keeps the rows waiting
        (tried again every ``RETRY_SECONDS``), a bug is logged, not fatal."""
        while True:
            wait = max(0.0, self._retry_at - time.monotonic()) if self._unwritten else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = _NOTHING
            stop, requests = False, []
            try:
                while item is not _NOTHING:  # each row as it comes: a burst is never all held
                    if item is None:
                        stop = True
                    elif isinstance(item, _Flush):
                        requests.append(item)
                    else:
                        self._keep(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = _NOTHING
                self._write(force=stop)
            except Exception:  # a bug must not end the accounting for good
                logger.exception("accounting log %s: unexpected error while writing", self.path)
            finally:
                for request in requests:
                    self._answer(request)
                item = None
            if stop:
                if self._unwritten or self._dropped:
                    logger.error("accounting log %s: %d rows could not be written and are LOST "
                                 "(and %d were DROPPED before)", self.path, len(self._unwritten), self._dropped)
                return

    def _answer(self, request: _Flush) -> None:
        try:
            request.end = os.fstat(self._fd).st_size
            request.waiting = list(self._unwritten)
            if request.waiting and self._head_done:
                request.waiting[0] = request.waiting[0][self._head_done:]
        finally:
            request.set()

    def _keep(self, raw: tuple) -> None:
        if len(self._unwritten) >= self._limit:
            self._write()  # a burst, or a full disk (then tried at most every RETRY_SECONDS)
        if len(self._unwritten) >= self._limit:
            self._dropped += 1
            if self._dropped == 1:
                logger.error("accounting log %s: %d rows wait to be written, the most kept; further rows "
                             "are DROPPED until it can be written (their count is logged then)",
                             self.path, self._limit)
            return
        try:
            self._unwritten.append(_encode_row(raw, self._out, self._csv))
        except Exception:
            logger.exception("accounting log %s: cannot format a row (job %s)", self.path, raw[-3:])
        if len(self._unwritten) >= _BATCH:
            self._write()

    def _write(self, force: bool = False) -> None:
        """Write what waits, ``_BATCH`` rows per write(2); on failure keep it
        all (a partly written row goes on where it stopped) and warn once."""
        if self._stalled is not None and not force and time.monotonic() < self._retry_at:
            return
        waited = len(self._unwritten)
        while self._unwritten:
            batch = b"".join(itertools.islice(self._unwritten, 0, _BATCH))
            try:
                n = os.write(self._fd, memoryview(batch)[self._head_done:])
            except OSError as exc:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                if self._stalled is None:
                    self._stalled = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
                    logger.warning("accounting log %s: %s; up to %d rows wait in memory and are written "
                                   "when it can be written again", self.path, self._stalled, self._limit)
                return
            n += self._head_done
            while self._unwritten and n >= len(self._unwritten[0]):
                n -= len(self._unwritten.popleft())
            self._head_done = n
        if self._stalled is not None:
            logger.warning("accounting log %s: written again (%d rows had waited)", self.path, waited)
            if self._dropped:
                logger.error("accounting log %s: %d rows were DROPPED while it could not be written "
                             "(more than %d waited)", self.path, self._dropped, self._limit)
            self._stalled, self._dropped = None, 0


#: the finished statuses ``report`` counts one by one (``failed`` is only
#: the jobs that raised or exited non-zero, not every status but completed)
REPORT_STATUSES = ("completed", "failed", "timeout", "killed", "lost", "cancelled", "skipped")


def peak_rss(row: dict) -> Optional[float]:
    """A job's peak memory as ``status``/``report`` show it: the larger of the
    job's own ``max_rss`` and its children's (a shell job's command is a
    child of the worker: its 300 MB are ``max_rss_children``). None: neither known."""
    own, kids = row.get("max_rss"), row.get("max_rss_children")
    values = [float(v) for v in (own, kids) if v not in (None, "")]
    return max(values) if values else None


def report(rows: Iterable[dict], by: str) -> List[dict]:
    """Per ``by`` value: jobs, a count per finished status, cpu seconds,
    peak and mean memory (``peak_rss``: with children), runtime.

    Sums as it goes: ``rows`` may stream from the log file."""
    if by not in REPORT_KEYS:
        raise ValueError(f"report by must be one of {REPORT_KEYS}, not {by!r}")
    groups: Dict[str, dict] = {}
    for r in rows:
        key = str(r.get(by))
        g = groups.get(key)
        if g is None:
            g = groups[key] = {by: key, "jobs": 0, **{s: 0 for s in REPORT_STATUSES}, "cpu_seconds": 0.0,
                               "max_rss_peak": None, "_rss_sum": 0.0, "_rss_n": 0, "runtime": 0.0}
        g["jobs"] += 1
        status = r.get("status")
        if status in g and status in REPORT_STATUSES:
            g[status] += 1
        g["cpu_seconds"] += float(r.get("cpu_user") or 0) + float(r.get("cpu_system") or 0)
        rss = peak_rss(r)
        if rss is not None:
            g["max_rss_peak"] = rss if g["max_rss_peak"] is None else max(g["max_rss_peak"], rss)
            g["_rss_sum"] += rss
            g["_rss_n"] += 1
        g["runtime"] += float(r.get("runtime") or 0)
    out = []
    for key, g in sorted(groups.items()):
        total, n = g.pop("_rss_sum"), g.pop("_rss_n")
        g["max_rss_mean"] = total / n if n else None
        out.append(g)
    return out
