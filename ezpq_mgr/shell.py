"""Shell-command jobs (``ezpq submit -- CMD ARGS``): shared, since the job's
function (``run_command``) and its result (``ShellResult``) travel pickled by
reference between the ``ezpq`` command, a worker and a durable journal."""

from __future__ import annotations

import subprocess
from typing import Dict, List, Optional

__all__ = ["ShellResult", "run_command"]


class ShellResult(dict):
    """``{"returncode", "stdout", "stderr"}``; a non-zero returncode fails the job."""


def run_command(argv: List[str], env: Optional[Dict[str, str]] = None) -> ShellResult:
    """Run ``argv`` (no shell) in the job's working directory with ``env``."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, errors="replace")
    return ShellResult(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)
