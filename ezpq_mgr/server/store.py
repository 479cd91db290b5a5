"""The durable server's state on disk: an SQLite journal, and the restore.

``ezpq-server --state-dir DIR`` keeps ``DIR/state.db`` (stdlib ``sqlite3``,
WAL mode), next to ``DIR/lock``. Nothing here runs on the hot path under
the queue's lock but appending a tuple: the state calls our hooks (lock
held) and one journal thread writes what piled up meanwhile in ONE
transaction (group commit), then lets go of the replies that waited for it::

    QueueState._move ──on_move──┐                      ┌─> commit ─> replies released
    QueueState (ids, settings, ─┼─> _pending (list) ─> │ journal thread: coalesce per
    priorities), Service (envs) ┘   under the lock     │ job, executemany, COMMIT

What must be on disk before what is said (the rule): **no reply leaves the
server before everything journaled until it was computed is committed**
(``barrier`` for a connection's direct replies, ``hold`` for the answers
of parked calls that other threads send). So a ``put`` is acknowledged only
once its jobs are committed, and a ``get``/``collect`` hands a result over
once everything before it is committed. The removal of a result handed
out (``get``, ``collect``, ``pop_ids``) is not even journaled until the
client read the reply: it says so at once with an ``ack`` (its next request
on that connection; ``handed_over``), whose answer comes once the removal is
committed. So a result is handed over **at least once**, never lost to a
SIGKILL before the client read it: after the restart it is on the server
again. The client knows a result it already had by the database's
``state_id`` and the job's number (never reused) and drops it
(``client/delivered.py``): every result reaches its process once. A client
killed between the reply and its ``ack`` leaves those rows behind: a
restart hands them out again.
Moves nobody is told about (a job starting, finishing) wait up to
``COALESCE`` (5 ms) for others, unless a reply needs them sooner: a job
that starts and ends meanwhile costs one row; a job that started within
that window before a SIGKILL may run again instead of coming back ``lost``.

Schema (``SCHEMA_VERSION``; ``PRAGMA user_version``, and ``application_id``
marks the file as ours)::

    meta(key PRIMARY KEY, value)        'seq': the server-wide job number,
                                        'state_id': this database's identity
    queues(qid PRIMARY KEY, next_id, cap, max_size, paused, auto_stop, auto_remove)
    ids(qid PRIMARY KEY, next_id)       a dropped queue's id counter (version 2):
                                        QueueState.last_ids, so no id is reused
    envs(env_id PRIMARY KEY, uid, cwd, sys_path)   a job's working directory
                                                   and sys.path (JSON list)
    lanes(qid, lane_key, last_id, last_exit)       a lane whose last job failed (version
                                        4): its stop_on_lane_error jobs are skipped
    jobs(seq PRIMARY KEY, <STATIC>, <MUTABLE>)     one row per job on the server;
                                        its ``after`` (version 3): the job
                                        numbers it waits for, a JSON list, or NULL

A job's row is inserted when it is accepted (its payloads are opaque BLOBs,
never unpickled here), updated at each later phase change (the
``MUTABLE`` columns only), deleted when it is collected or dropped; a job
that is accepted and collected within one group commit never touches the
disk. Collected jobs leave nothing behind: their accounting row is the
history. The next version adds a function to ``MIGRATIONS`` (old version
-> new, run in one transaction at open); a file of a newer or unknown
version, or one that is not ours, refuses the start, never an empty start
over it.

Restore (``restore``): waiting jobs wait again in their order (a job
waiting for others blocked again, or skipped if one of them ended
otherwise, lost now included; one no longer on the server was collected,
so it had completed); jobs that
were running (or had returned, their figures unsent) run again when they
have ``retries`` left, else end ``lost``; held and done jobs are done,
unchanged; ids (of dropped queues too), job numbers and queue settings
continue where they were.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from typing import Callable, Dict, List, Optional

from ..job import JobRecord, JobStatus, Phase
from .owndir import own_dir_problem

__all__ = ["Store", "StoreError", "SCHEMA_VERSION", "DB_NAME"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4
#: PRAGMA application_id: "EZPQ"; a file without it is not ours
APPLICATION_ID = 0x455A5051
DB_NAME = "state.db"
#: How long the journal lets moves nobody waits for pile up before it
#: commits them (what a reply waits for is committed at once). A W1 of
#: 5,000 buffered puts: 69 commits instead of 1,516, server CPU per job
#: 82 us instead of 116. A job started within it before a SIGKILL may run
#: again rather than come back lost.
COALESCE = 0.005
LOCK_NAME = "lock"

#: Columns set when a job is accepted, never changed after (but a waiting
#: job's priority: ``on_priority``).
STATIC = ("seq", "qid", "id", "client", "user", "uid", "name", "priority", "lane_key", "lane_text",
          "timeout", "function", "fn_blob", "args_blob", "runner", "suppress_errors",
          "stop_on_lane_error", "retries", "max_memory", "env_id", "submitted", "after")
#: Columns a phase change may change (written as a whole at each).
MUTABLE = ("phase", "status", "started", "ended", "processed", "exitcode", "cancelled", "output_blob",
           "exception", "callback_blob", "cpu_user", "cpu_system", "max_rss", "max_rss_method",
           "max_rss_children", "pid", "host", "attempts")
_BOOLS = ("suppress_errors", "stop_on_lane_error", "cancelled")
QUEUE_COLUMNS = ("qid", "next_id", "cap", "max_size", "paused", "auto_stop", "auto_remove")

_SCHEMA = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value);
CREATE TABLE queues(qid TEXT PRIMARY KEY, next_id INTEGER NOT NULL, cap INTEGER, max_size INTEGER,
                    paused INTEGER, auto_stop INTEGER, auto_remove INTEGER);
CREATE TABLE envs(env_id INTEGER PRIMARY KEY, uid INTEGER, cwd TEXT, sys_path TEXT);
CREATE TABLE ids(qid TEXT PRIMARY KEY, next_id INTEGER NOT NULL);
CREATE TABLE lanes(qid TEXT NOT NULL, lane_key BLOB NOT NULL, last_id INTEGER, last_exit INTEGER,
                   PRIMARY KEY(qid, lane_key));
CREATE TABLE jobs(seq INTEGER PRIMARY KEY, {", ".join(c for c in STATIC + MUTABLE if c != "seq")});
"""


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 2 keeps the id counters of dropped queues (version 1 forgot them)."""
    db.execute("CREATE TABLE ids(qid TEXT PRIMARY KEY, next_id INTEGER NOT NULL)")


def _v2_to_v3(db: sqlite3.Connection) -> None:
    """Version 3 keeps the jobs a job waits for (``after``); older jobs wait for none."""
    db.execute("ALTER TABLE jobs ADD COLUMN after")


def _v3_to_v4(db: sqlite3.Connection) -> None:
    """Version 4 keeps each lane whose last job failed (``lanes``), so that
    its later ``stop_on_lane_error`` jobs are still skipped after a restart."""
    db.execute("CREATE TABLE lanes(qid TEXT NOT NULL, lane_key BLOB NOT NULL, last_id INTEGER, "
               "last_exit INTEGER, PRIMARY KEY(qid, lane_key))")


#: version -> function(conn) that brings a database of that version to the next
MIGRATIONS: Dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}

_PRIORITY = STATIC.index("priority")   # a waiting job's priority may change (on_priority)
_INSERT = f"INSERT OR REPLACE INTO jobs({', '.join(STATIC + MUTABLE)}) VALUES ({', '.join('?' * len(STATIC + MUTABLE))})"
_UPDATE = f"UPDATE jobs SET {', '.join(c + '=?' for c in MUTABLE)} WHERE seq=?"


def _static(rec: JobRecord) -> tuple:
    return (rec.seq, rec.qid, rec.id, rec.client, rec.user, rec.uid, rec.name, rec.priority, rec.lane_key,
            rec.lane_text, rec.timeout, rec.function, rec.fn_blob, rec.args_blob, rec.runner,
            rec.suppress_errors, rec.stop_on_lane_error, rec.retries, rec.max_memory, rec.env_id,
            rec.submitted, None if rec.after is None else json.dumps(rec.after))


def _mutable(rec: JobRecord) -> tuple:
    return (int(rec.phase), rec.status.value, rec.started, rec.ended, rec.processed, rec.exitcode,
            rec.cancelled, rec.output_blob, rec.exception, rec.callback_blob, rec.cpu_user, rec.cpu_system,
            rec.max_rss, rec.max_rss_method, rec.max_rss_children, rec.pid, rec.host, rec.attempts)


class StoreError(Exception):
    """The state directory or database cannot be used; one line for the user."""


class Store:
    """``DIR/state.db`` of one server: opened (and locked) by ``__init__``,
    loaded into a state by ``restore``, written by the journal thread
    (``start`` .. ``close``)."""

    def __init__(self, directory: str, sync: str = "normal"):
        if sync not in ("normal", "full"):
            raise StoreError(f"--sync must be normal or full, not {sync!r}")
        self.dir = os.path.abspath(directory)
        self.path = os.path.join(self.dir, DB_NAME)
        self.sync = sync
        self._lock_fd = -1
        self.db: Optional[sqlite3.Connection] = None
        self._prepare_dir()
        try:
            self._open()
        except BaseException:
            self._unlock()
            raise
        # the journal (filled under the state's lock, emptied by the journal thread)
        self._pending: List[tuple] = []
        self._appended = 0           # entries ever appended (a reply's mark)
        self._committed = 0          # entries ever committed
        self._cv = threading.Condition(threading.Lock())
        self._held: List[tuple] = []    # (mark, Deferred) answers waiting for their commit
        self._wake = threading.Event()
        self._urgent = threading.Event()   # a reply waits for the next commit
        self._closing = False
        self.failed: Optional[str] = None   # why writing stopped (the server stops)
        self.on_failure: Callable[[str], None] = lambda why: None
        self._thread: Optional[threading.Thread] = None
        self._state = None
        self.batches = 0             # commits made (tests, benchmarks)

    # ------------------------------------------------------------- opening
    def _prepare_dir(self) -> None:
        """DIR: created 0700; else a directory of ours (not a symlink) that
        nobody else may write. Then its lock: one server per DIR."""
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            why = own_dir_problem(self.dir, f"--state-dir {self.dir}", "700")
        except OSError as exc:
            raise StoreError(f"--state-dir {self.dir}: cannot create it: {exc.strerror}") from None
        if why is not None:
            raise StoreError(why)
        lock = os.path.join(self.dir, LOCK_NAME)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"--state-dir {self.dir}: cannot write in it: {exc.strerror}") from None
        try:
            # a POSIX record lock: held by this process alone (a forked worker
            # does not inherit it), released by the kernel when it dies
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                pid = "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"--state-dir {self.dir} is in use by another ezpq-server (pid {pid}); "
                                 f"stop it first or choose another directory") from None
            raise StoreError(f"--state-dir {self.dir}: cannot lock {lock}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is a courtesy for the message above; the lock is what counts
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _open(self) -> None:
        """Open (or create) the database; refuse one that is damaged, not
        ours, or of a version we cannot migrate from."""
        new = not os.path.exists(self.path)
        old_umask = os.umask(0o077)    # the -wal and -shm files too: 0600
        try:
            if new:
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                except OSError as exc:
                    raise StoreError(f"cannot create {self.path}: {exc.strerror}") from None
            elif os.path.islink(self.path) or not os.path.isfile(self.path):
                raise StoreError(f"{self.path} is not a regular file; not using it")
            try:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open {self.path}: {exc}") from None
            try:
                self._check(db, new)
            except sqlite3.Error as exc:
                db.close()
                raise StoreError(f"{self.path} is damaged or not an ezpq state database ({exc}); "
                                 f"refusing to start over it: move it away to start empty") from None
            except BaseException:
                db.close()
                raise
        finally:
            os.umask(old_umask)
        self.db = db

    def _check(self, db: sqlite3.Connection, new: bool) -> None:
        db.execute("PRAGMA journal_mode=WAL").fetchone()
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        app = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and app == 0 and not tables:   # a new (or empty) file: ours now
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
            return
        if app != APPLICATION_ID:
            raise StoreError(f"{self.path} is an SQLite database but not an ezpq state database; "
                             f"refusing to start over it")
        if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and any(
                v not in MIGRATIONS for v in range(version, SCHEMA_VERSION))) or version < 1:
            raise StoreError(f"{self.path} has schema version {version}, this ezpq_mgr reads version "
                             f"{SCHEMA_VERSION} (and migrates from {sorted(MIGRATIONS) or 'none older'}); "
                             f"refusing to start over it")
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](db)
                logger.info("migrated %s from schema version %s to %s", self.path, v, v + 1)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"meta", "queues", "envs", "jobs", "ids", "lanes"} - tables
        if missing:
            raise StoreError(f"{self.path} lacks the tables {sorted(missing)}; refusing to start over it")

    def state_id(self) -> str:
        """This database's identity, made once (a random token in ``meta``):
        clients key what they were handed by it, so a result handed out
        again after a restart is recognised (``client/delivered.py``)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='state_id'").fetchone()
        if row is not None:
            return str(row[0])
        token = secrets.token_hex(16)
        self.db.execute("INSERT INTO meta(key, value) VALUES ('state_id', ?)", (token,))
        return token

    # ------------------------------------------------------------- restore
    def restore(self, state, service) -> dict:
        """Load the database into ``state`` (before the server serves, so
        no lock contention; no hooks installed yet). Returns figures."""
        t0 = time.perf_counter()
        db = self.db
        # the columns in JobRecord's own order, so a row is its positional
        # arguments (100,000 jobs: ~4x faster than keywords); a field we do
        # not store keeps its default
        fields = [f.name for f in dataclasses.fields(JobRecord)]
        names = tuple(f for f in fields if f in STATIC + MUTABLE)
        positional = list(names) == fields
        try:
            seq_row = db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()
            queues = db.execute(f"SELECT {', '.join(QUEUE_COLUMNS)} FROM queues").fetchall()
            last_ids = db.execute("SELECT qid, next_id FROM ids").fetchall()
            envs = db.execute("SELECT env_id, uid, cwd, sys_path FROM envs").fetchall()
            lane_rows = db.execute("SELECT qid, lane_key, last_id, last_exit FROM lanes").fetchall()
            rows = db.execute(f"SELECT {', '.join(names)} FROM jobs ORDER BY seq").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path} is damaged ({exc}); refusing to start over it: "
                             f"move it away to start empty") from None
        statuses = {s.value: s for s in JobStatus}
        phases = list(Phase)
        NEW, WAITING = Phase.NEW, Phase.WAITING
        max_seq = int(seq_row[0]) if seq_row else 0
        now = state.clock()
        changed: List[JobRecord] = []
        n = {"waiting": 0, "lost": 0, "retried": 0, "done": 0}
        with state.cond:
            for qid, next_id in last_ids:   # an owner's floor ("owner:\0") is no queue's
                if qid.endswith("\0"):
                    state.last_ids[qid] = int(next_id)
                else:
                    state.keep_ids(qid, int(next_id), state.owner_of(qid))
            for row in queues:
                q = state.queue(row[0])
                q.next_id = max(q.next_id, int(row[1]))
                for name, value in zip(QUEUE_COLUMNS[2:], row[2:]):
                    setattr(q, name, bool(value) if name in ("paused", "auto_stop", "auto_remove") else int(value or 0))
            jobs = []
            refs: Dict[int, int] = {}
            for row in rows:
                rec = JobRecord(*row) if positional else JobRecord(**dict(zip(names, row)))
                phase = phases[rec.phase]
                rec.phase = NEW
                rec.status = statuses[rec.status]
                rec.suppress_errors = rec.suppress_errors == 1
                rec.stop_on_lane_error = rec.stop_on_lane_error == 1
                rec.cancelled = rec.cancelled == 1
                if rec.after is not None:
                    rec.after = tuple(json.loads(rec.after))
                jobs.append((rec, phase))
                if rec.env_id:   # a job holds its environment while on the server (requeue)
                    refs[rec.env_id] = refs.get(rec.env_id, 0) + 1
            if jobs:
                max_seq = max(max_seq, jobs[-1][0].seq)
            service.restore_envs({r[0]: (r[1], r[2], tuple(json.loads(r[3]))) for r in envs}, refs)
            dropped_envs = [r[0] for r in envs if r[0] not in refs]
            state.seq = max(state.seq, max_seq)
            q = None
            lost_lanes = set()
            for rec, phase in jobs:
                if q is None or q.qid != rec.qid:
                    q = state.queue(rec.qid)
                if q.next_id <= rec.id:
                    q.next_id = rec.id + 1
                state.records[rec.seq] = rec
                q.ids[rec.id] = rec.seq
                processed = rec.processed
                if phase is WAITING:   # the jobs it waits for have lower seqs: restored already
                    state._move(q, rec, WAITING)
                    state._admit(q, rec)
                    n["waiting"] += 1
                elif phase in (Phase.RUNNING, Phase.RETURNED):
                    state._move(q, rec, Phase.WAITING)
                    if rec.attempts <= rec.retries:   # run again: attempts counts the lost one
                        rec.status = JobStatus.WAITING
                        rec.started = rec.pid = rec.host = None
                        state._enqueue(q, rec)
                        n["retried"] += 1
                    else:
                        rec.status = JobStatus.LOST
                        rec.exitcode, rec.ended = None, now
                        rec.exception = "the server restarted while this job ran"
                        state._done(q, rec, held_ok=False)
                        n["lost"] += 1
                        if rec.lane_key is not None:   # its lane's last job now: no failure to remember
                            lost_lanes.add((rec.qid, bytes(rec.lane_key)))
                else:   # HELD (its client's callback will not run now) or DONE
                    state._move(q, rec, Phase.WAITING)
                    state._complete(q, rec)
                    if processed is not None:
                        rec.processed = processed
                    n["done"] += 1
                if rec.phase is not phase:
                    changed.append(rec)
            forgotten_lanes = self._restore_lanes(state, lane_rows, lost_lanes, changed)
        state.version += 1
        # what the restore changed is the journal's first batch
        self._pending.extend(("U", rec.seq, _mutable(rec)) for rec in changed if rec.phase is not Phase.GONE)
        self._pending.extend(("D", rec.seq) for rec in changed if rec.phase is Phase.GONE)
        self._pending.extend(("ED", e) for e in dropped_envs)
        self._pending.extend(("L", key, None) for key in forgotten_lanes)
        self._appended = len(self._pending)
        n["seconds"] = time.perf_counter() - t0
        n["jobs"] = len(rows)
        logger.info("restored %s jobs from %s in %.2f s: %s waiting, %s running again, %s lost "
                    "(running when the server stopped), %s done", len(rows), self.path, n["seconds"],
                    n["waiting"], n["retried"], n["lost"], n["done"])
        return n

    @staticmethod
    def _restore_lanes(state, rows: list, lost: set, changed: List[JobRecord]) -> List[tuple]:
        """(lock held, after the jobs) Each lane whose last job failed
        remembers it again, and skips its waiting ``stop_on_lane_error`` jobs
        as it would have (those go to ``changed``). A lane whose running job
        came back lost forgets it (a lost job is no failure, as in
        ``QueueState.finish``): the keys to delete are returned."""
        from .scheduling import Lane
        forget = []
        for qid, key, last_id, last_exit in rows:
            key = bytes(key)
            if (qid, key) in lost:
                forget.append((qid, key))
                continue
            q = state.queue(qid)
            lane = q.lanes.get(key)
            if lane is None:
                lane = q.lanes[key] = Lane()
            lane.last_id, lane.last_exit = last_id, last_exit
            state._count_failed_lane(q, key, lane)   # its owner's cap holds across restarts
            queued = [seq for _, seq in lane.heap]
            state._settle(q, lane)
            changed.extend(state.records[seq] for seq in queued
                           if seq in state.records and state.records[seq].phase is not Phase.WAITING)
        return forget

    # ---------------------------------------------------------- the hooks
    def attach(self, state, service) -> None:
        """Install the hooks and start the journal thread."""
        self._state = state
        state.on_move = self.on_move
        state.on_queue = self.on_queue
        state.on_priority = self.on_priority
        state.on_lane = self.on_lane
        service.on_env = self.on_env
        self._thread = threading.Thread(target=self._run, name="ezpq-journal", daemon=True)
        self._thread.start()
        if self._pending:
            self._wake.set()

    def on_move(self, rec: JobRecord, frm: Phase, to: Phase) -> None:
        """(state lock held) Journal one phase change. RETURNED is not
        written: on disk the job stays RUNNING, which a restore treats the
        same way (a row less per job)."""
        if to is Phase.RETURNED:
            return
        if frm is Phase.NEW:
            self._pending.append(("I", rec.seq, _static(rec), _mutable(rec)))
        elif to is Phase.GONE:
            # a result handed out (get, collect) is removed on disk only once
            # its client read the reply (``handed_over``); others now
            if self._state.handing:
                return
            self._pending.append(("D", rec.seq))
        else:
            self._pending.append(("U", rec.seq, _mutable(rec)))
        self._appended += 1
        if not self._wake.is_set():
            self._wake.set()

    def on_queue(self, q, dropped: bool = False) -> None:
        """(state lock held) A queue's id counter or settings changed, or it
        was dropped (its id counter kept in ``ids`` if the state keeps it)."""
        if dropped:
            self._pending.append(("QD", q.qid, self._state.last_ids.get(q.qid)))
        else:
            self._pending.append(("Q", (q.qid, q.next_id, q.cap, q.max_size, int(q.paused),
                                        int(q.auto_stop), int(q.auto_remove))))
        self._appended += 1
        if not self._wake.is_set():
            self._wake.set()

    def on_lane(self, q, key: bytes, lane) -> None:
        """(state lock held) A lane's last job failed (kept), or a later one
        did not (forgotten: a lane without a failure needs no row)."""
        if lane.last_exit not in (0, None):
            self._pending.append(("L", (q.qid, key), (q.qid, key, lane.last_id, lane.last_exit)))
        else:
            self._pending.append(("L", (q.qid, key), None))
        self._appended += 1
        if not self._wake.is_set():
            self._wake.set()

    def on_priority(self, rec: JobRecord) -> None:
        """(state lock held) A waiting job's priority changed (``ezpq priority``)."""
        self._pending.append(("P", rec.seq, rec.priority))
        self._appended += 1
        if not self._wake.is_set():
            self._wake.set()

    def on_env(self, env_id: int, key: Optional[tuple]) -> None:
        """(state lock held) An environment (uid, cwd, sys_path) was made (or freed: None)."""
        if key is None:
            self._pending.append(("ED", env_id))
        else:
            uid, cwd, path = key
            self._pending.append(("E", (env_id, uid, cwd, json.dumps(list(path)))))
        self._appended += 1
        if not self._wake.is_set():
            self._wake.set()

    def handed_over(self, seqs: List[int]) -> None:
        """(a connection's thread) The client read the reply that handed it
        these results (its next request came): their rows go with the next
        commit. Until then a restart brings them back, so a result lost
        with its reply (the server killed before the client read it) is
        handed out again: at least once, never lost."""
        with self._state.cond:
            self._pending.extend(("D", seq) for seq in seqs)
            self._appended += len(seqs)   # the ``ack``'s answer waits for them
        if not self._wake.is_set():
            self._wake.set()

    # -------------------------------------------------------- the replies
    def barrier(self) -> None:
        """Block until everything journaled so far is committed (a
        connection's thread, before its reply). ``StoreError`` if the
        journal cannot write any more."""
        mark = self._appended
        if self._committed >= mark:
            return
        self._urgent.set()
        with self._cv:
            while self._committed < mark and self.failed is None:
                self._cv.wait()
        if self._committed < mark:
            raise StoreError(f"the server cannot save its state: {self.failed}")

    def hold(self, d) -> bool:
        """(Outbox) Keep a parked call's answer until what it reports is
        committed: True when taken (the journal thread sends it then)."""
        mark = self._appended
        if self._committed >= mark:
            return False
        with self._cv:
            if self._committed >= mark:
                return False
            self._held.append((mark, d))
        self._urgent.set()
        return True

    # ------------------------------------------------------ journal thread
    def _run(self) -> None:
        state, db = self._state, self.db
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._urgent.is_set() and not self._closing:
                # nobody waits for these moves (jobs starting, ending): let
                # more come for a moment, so that a job that starts and ends
                # meanwhile is one row written, in one commit with the others
                self._urgent.wait(COALESCE)
            self._urgent.clear()
            with state.cond:
                batch, self._pending = self._pending, []
                mark = self._appended
            if batch:
                try:
                    self._write(db, batch)
                except Exception as exc:   # disk full, I/O error, the file removed
                    why = f"{self.path}: {exc}"
                    self.failed = why
                    logger.critical("cannot write the state database %s; stopping the server "
                                    "(what was committed is kept)", why)
                    with self._cv:
                        self._cv.notify_all()
                    self.on_failure(why)
                    return
                self.batches += 1
            with self._cv:
                self._committed = mark
                self._cv.notify_all()
                ready = [d for m, d in self._held if m <= mark]
                if ready:
                    self._held = [(m, d) for m, d in self._held if m > mark]
            for d in ready:
                d.send(d.result)
            if self._closing:
                if not self._pending:
                    return
                self._wake.set()

    def _write(self, db: sqlite3.Connection, batch: List[tuple]) -> None:
        """One transaction for a batch, coalesced: a job's last row wins,
        a job inserted and deleted within the batch is never written."""
        inserts: Dict[int, tuple] = {}
        updates: Dict[int, tuple] = {}
        deletes = []
        queues: Dict[str, Optional[tuple]] = {}
        dropped: Dict[str, Optional[int]] = {}   # qid -> its id counter (None: forget it)
        envs: Dict[int, Optional[tuple]] = {}
        priorities: Dict[int, int] = {}   # seq -> new priority of a job already on disk
        lanes: Dict[tuple, Optional[tuple]] = {}   # (qid, lane_key) -> its row (None: delete it)
        lanes_dropped = set()             # qids dropped: their lanes go (before later rows)
        top = 0
        for e in batch:
            kind = e[0]
            if kind == "U":
                seq = e[1]
                ins = inserts.get(seq)
                if ins is not None:
                    inserts[seq] = (ins[0], e[2])
                else:
                    updates[seq] = e[2]
            elif kind == "I":
                inserts[e[1]] = (e[2], e[3])
                if e[1] > top:
                    top = e[1]
            elif kind == "P":
                seq = e[1]
                ins = inserts.get(seq)
                if ins is not None:   # inserted in this batch: its row says it
                    inserts[seq] = (ins[0][:_PRIORITY] + (e[2],) + ins[0][_PRIORITY + 1:], ins[1])
                else:
                    priorities[seq] = e[2]
            elif kind == "D":
                seq = e[1]
                priorities.pop(seq, None)
                if inserts.pop(seq, None) is None:
                    updates.pop(seq, None)
                    deletes.append((seq,))
            elif kind == "Q":
                queues[e[1][0]] = e[1]   # an ids row of its past life may stay: restore takes the max
            elif kind == "QD":
                queues[e[1]] = None
                dropped[e[1]] = e[2]
                lanes_dropped.add(e[1])
                for k in [k for k in lanes if k[0] == e[1]]:
                    del lanes[k]
            elif kind == "L":
                lanes[e[1]] = e[2]
            elif kind == "E":
                envs[e[1][0]] = e[1]
            elif kind == "ED":
                envs[e[1]] = None
        db.execute("BEGIN")
        try:
            if inserts:
                db.executemany(_INSERT, [s + m for s, m in inserts.values()])
            if updates:
                db.executemany(_UPDATE, [m + (seq,) for seq, m in updates.items()])
            if priorities:
                db.executemany("UPDATE jobs SET priority=? WHERE seq=?", [(p, seq) for seq, p in priorities.items()])
            if deletes:
                db.executemany("DELETE FROM jobs WHERE seq=?", deletes)
            if queues:
                db.executemany("INSERT OR REPLACE INTO queues VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [q for q in queues.values() if q is not None])
                db.executemany("DELETE FROM queues WHERE qid=?", [(k,) for k, q in queues.items() if q is None])
                db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?)",
                               [(k, n) for k, n in dropped.items() if n is not None])
                db.executemany("DELETE FROM ids WHERE qid=?", [(k,) for k, n in dropped.items() if n is None])
            if lanes_dropped:
                db.executemany("DELETE FROM lanes WHERE qid=?", [(qid,) for qid in lanes_dropped])
            if lanes:
                db.executemany("INSERT OR REPLACE INTO lanes VALUES (?, ?, ?, ?)",
                               [v for v in lanes.values() if v is not None])
                db.executemany("DELETE FROM lanes WHERE qid=? AND lane_key=?",
                               [k for k, v in lanes.items() if v is None])
            if envs:
                db.executemany("INSERT OR REPLACE INTO envs VALUES (?, ?, ?, ?)",
                               [v for v in envs.values() if v is not None])
                db.executemany("DELETE FROM envs WHERE env_id=?", [(k,) for k, v in envs.items() if v is None])
            if top:
                db.execute("INSERT INTO meta VALUES ('seq', ?) ON CONFLICT(key) DO UPDATE SET "
                           "value=max(value, excluded.value)", (top,))
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def close(self) -> None:
        """Write what is left, stop the journal thread, close the database and unlock DIR."""
        if self._thread is not None:
            self._closing = True
            self._wake.set()
            self._urgent.set()   # not a moment's wait more
            self._thread.join(30)
            if self._thread.is_alive():
                logger.error("the journal did not finish writing within 30 s")
        logger.info("journal: %s commits for %s entries", self.batches, self._appended)
        if self.db is not None and self.failed is None:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        if self.db is not None:
            self.db.close()
            self.db = None
        self._unlock()
        with self._cv:   # a reply still waiting now would wait for ever: it is refused
            if self.failed is None:
                self.failed = "the server stopped before it could save this"
            self._cv.notify_all()
