"""A directory the server keeps private files in (its state, its jobs' logs).

Given by the administrator (``--state-dir``, ``--log-dir``), it must be
the server's own: a directory that is not a symbolic link (which another
user could point elsewhere), owned by the user who runs the server, and
writable by nobody else (who could swap or plant files in it). One check,
used by store.py and joblogs.py, each raising its own error with it.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from .callers import describe_user

__all__ = ["own_dir_problem"]


def own_dir_problem(path: str, what: str, mode: str) -> Optional[str]:
    """Why ``path`` cannot hold the server's private files, as one line
    that begins with ``what`` (e.g. "--state-dir /var/lib/ezpq") and says
    the fix (``mode``: the chmod it wants); None when it can. Raises
    OSError when it cannot be looked at."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory (or is a symbolic link)"
    if st.st_uid != os.geteuid():
        return (f"{what} is owned by {describe_user(st.st_uid)}, not by {describe_user(os.geteuid())} "
                f"who runs the server; chown it or use another")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by others (mode {oct(st.st_mode & 0o777)}); chmod {mode} it"
    return None
