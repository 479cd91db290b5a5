"""Shell-command jobs (``ezpq submit -- CMD ARGS``): shared, since the job's
function (``run_command``) and its result (``ShellResult``) travel pickled by
reference between the ``ezpq`` command, a worker and a durable journal."""

from __future__ import annotations

import subprocess
from typing import Dict, List, Optional

__all__ = ["ShellResult", "run_command"]


class ShellResult(dict):
    """``{"returncode", "stdout", "stderr"}``; a non-zero returncode fails the job."""


#: what a POSIX shell answers for a command it cannot find, or cannot execute
NOT_FOUND, NOT_EXECUTABLE = 127, 126


def run_command(argv: List[str], env: Optional[Dict[str, str]] = None) -> ShellResult:
    """Run ``argv`` (no shell) in the job's working directory with ``env``.

    A command that cannot be started ends like it would in a shell: code 127
    (not found) or 126 (not executable), the reason on ``stderr``, rather
    than a Python traceback from subprocess."""
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        return ShellResult(returncode=NOT_FOUND, stdout="", stderr=f"{argv[0]}: command not found\n")
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        return ShellResult(returncode=NOT_EXECUTABLE, stdout="",
                           stderr=f"{argv[0]}: {exc.strerror or exc}\n")
    return ShellResult(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)
