"""The accounting log: one row per finished job, and ``report`` over it.

Rows hold every job-dict field but the payloads (output, args, kwargs), as
plain values, so they go to a CSV (``ezpq-server --log-file``) and to
``ezpq report``, which sums them like Slurm's ``sacct``: jobs, failures,
CPU seconds, peak and mean ``max_rss``, runtime, per user, function or qid.
The CSV is written by a background thread, never under the queue's lock.
"""

from __future__ import annotations

import csv
import operator
import os
import queue
import threading
from datetime import datetime
from typing import Dict, List, Optional

from .job import FIELDS

__all__ = ["AccountingLog", "ROW_FIELDS", "report", "REPORT_KEYS"]

ROW_FIELDS = tuple(f for f in FIELDS if f not in ("output", "args", "kwargs")) + ("uid", "job")
REPORT_KEYS = ("user", "function", "qid")
_TIMES = ("submitted", "started", "ended", "processed")


#: JobRecord attributes kept per finished job (payloads and blobs never are)
_RAW_FIELDS = tuple(f for f in ROW_FIELDS
                    if f not in ("job", "lane", "callback", "qid", "status", "runtime")) + ("seq", "lane_text")
_KEPT = _RAW_FIELDS + ("qid", "status")
_UID = _KEPT.index("uid")
_raw_values = operator.attrgetter(*_RAW_FIELDS)


def _row(raw: tuple) -> dict:
    """A CSV-ready row (times as ISO text, lane as text) from kept values."""
    row = dict(zip(_KEPT, raw))
    row["job"] = row.pop("seq")
    row["lane"] = row.pop("lane_text")
    row["callback"] = None  # a pickled client-side value: the server never unpickles it
    if row.get("started") is not None and row.get("ended") is not None:
        row["runtime"] = row["ended"] - row["started"]
    for key in _TIMES:
        if row.get(key) is not None:
            row[key] = datetime.fromtimestamp(row[key]).isoformat(sep=" ")
    return row


class AccountingLog:
    """Rows of finished jobs, in memory and (optionally) appended to a CSV.

    ``record`` runs under the queue's lock as each job ends, so it only
    copies a few attributes; rows are formatted when read or written."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self._raw: List[tuple] = []
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._writer: Optional[threading.Thread] = None
        if path:
            self._writer = threading.Thread(target=self._write_loop, name="ezpq-accounting", daemon=True)
            self._writer.start()

    def record(self, rec, qid: str) -> None:
        """Keep a finished JobRecord's figures (``qid`` as its user sees it)."""
        raw = _raw_values(rec) + (qid, rec.status.value)
        with self._lock:
            self._raw.append(raw)
        if self._writer is not None:
            self._queue.put(raw)

    def visible(self, uid: Optional[int]) -> List[dict]:
        """Rows of one user (None: all)."""
        with self._lock:
            raws = list(self._raw)
        return [_row(r) for r in raws if uid is None or r[_UID] == uid]

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(10)

    def _write_loop(self) -> None:
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
            if new:
                writer.writeheader()
            while True:
                raw = self._queue.get()
                if raw is None:
                    return
                writer.writerow(_row(raw))
                f.flush()


def report(rows: List[dict], by: str) -> List[dict]:
    """Per ``by`` value: jobs, failed, cpu seconds, peak and mean max_rss, runtime."""
    if by not in REPORT_KEYS:
        raise ValueError(f"report by must be one of {REPORT_KEYS}, not {by!r}")
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(by)), []).append(r)
    out = []
    for key in sorted(groups):
        rs = groups[key]
        rss = [float(r["max_rss"]) for r in rs if r.get("max_rss") not in (None, "")]
        out.append({
            by: key,
            "jobs": len(rs),
            "failed": sum(r.get("status") != "completed" for r in rs),
            "cpu_seconds": sum(float(r.get("cpu_user") or 0) + float(r.get("cpu_system") or 0) for r in rs),
            "max_rss_peak": max(rss) if rss else None,
            "max_rss_mean": sum(rss) / len(rss) if rss else None,
            "runtime": sum(float(r.get("runtime") or 0) for r in rs),
        })
    return out
