"""Turning the server's plain snapshots into ezpq job dicts, and back to CSV."""

from __future__ import annotations

import csv
import logging
import os
from datetime import datetime
from typing import Optional

from .. import serialize
from ..job import FIELDS, TIMES

logger = logging.getLogger(__name__)

__all__ = ["to_job_dict", "log_csv"]

def _load(blob: Optional[bytes], what: str):
    try:
        return serialize.load_or_none(blob)
    except Exception as exc:  # e.g. the output's class is not importable here
        return f"<{what} cannot be unpickled here: {exc!r}>"


def _unopened(blob: Optional[bytes], what: str) -> Optional[str]:
    """A payload shown by its size only (another user's: never unpickled)."""
    return None if blob is None else f"<{what}: {len(blob)} bytes, not unpickled>"


def _hide_environment(function: Optional[str], args):
    """A shell job (``ezpq submit``) carries its submitter's whole
    environment as its second argument: secrets, and megabytes of it. It is
    kept for the run, never shown: the job dict's ``args`` is the command
    alone, with a note of how many variables were passed."""
    if (function == "run_command" and isinstance(args, (list, tuple)) and len(args) == 2
            and isinstance(args[1], dict)):
        return [args[0], f"<environment: {len(args[1])} variables, not shown>"]
    return args


def to_job_dict(snap: dict, trusted: bool = True) -> dict:
    """ezpq's job dict (in ezpq's key order, then ours) from a server snapshot.

    ``job`` is the server-wide job number, the one ``ezpq status/show/
    cancel/wait`` take; ``id`` stays the per-queue number of ezpq's API.

    ``trusted=False`` (another user's job, seen by root) never unpickles its
    payloads: a pickle runs code, so they are shown as their size only."""
    load = _load if trusted else _unopened
    args, kwargs = (_load(snap["args_blob"], "arguments") or (None, None)) if trusted else (
        _unopened(snap["args_blob"], "arguments"), None)
    d = {key: snap.get(key) for key in FIELDS}
    d["job"] = snap.get("seq")   # the server-wide job number (the CLI's); ``id`` is the queue's
    d["args"], d["kwargs"] = _hide_environment(snap.get("function"), args), kwargs
    d["lane"] = _load(snap["lane_key"], "lane") if trusted else snap.get("lane_text")
    d["output"] = load(snap["output_blob"], "output")
    d["callback"] = load(snap["callback_blob"], "callback result")
    if d["after"] is not None:   # the job numbers it waited for: a list, over JSON or pickle
        d["after"] = list(d["after"])
    for key in TIMES:
        if snap[key] is not None:
            d[key] = datetime.fromtimestamp(snap[key])
    return d


def log_csv(job: dict, path: str = "ezpq_log.csv", append: bool = True) -> int:
    """Write one job dict as a CSV row (header when the file is new). 0 ok, -1 error."""
    try:
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        mode = "a" if (exists and append) else "w"
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(job.keys()))
            if mode == "w":
                writer.writeheader()
            writer.writerow(job)
        return 0
    except OSError as exc:
        logger.error("cannot write the job log %s: %s", path, exc)
        return -1
