"""Shell-command jobs (``ezpq submit -- CMD ARGS``): shared, since the job's
function (``run_command``) and its result (``ShellResult``) travel pickled by
reference between the ``ezpq`` command, a worker and a durable journal."""

from __future__ import annotations

import os
import selectors
import subprocess
from typing import Dict, List, Optional

__all__ = ["ShellResult", "run_command", "TAIL"]


class ShellResult(dict):
    """``{"returncode", "stdout", "stderr"}``; a non-zero returncode fails the job.
    ``stdout``/``stderr`` are the last ``TAIL`` bytes of each (the whole
    output is in the job's log: ``ezpq log JOB``)."""


#: what a POSIX shell answers for a command it cannot find, or cannot execute
NOT_FOUND, NOT_EXECUTABLE = 127, 126
#: bytes of each stream kept in a shell job's output
TAIL = 4096


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _failed(code: int, why: str) -> ShellResult:
    try:
        _write_all(2, why.encode())
    except OSError:
        pass
    return ShellResult(returncode=code, stdout="", stderr=why)


def run_command(argv: List[str], env: Optional[Dict[str, str]] = None) -> ShellResult:
    """Run ``argv`` (no shell) in the job's working directory with ``env``.

    Its stdout and stderr are copied as they come to ours (descriptors 1
    and 2: in a worker, the job's log), and the last ``TAIL`` bytes of each
    are kept for the result. A command that cannot be started ends like it
    would in a shell: code 127 (not found) or 126 (not executable), the
    reason on ``stderr``, rather than a Python traceback from subprocess."""
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        return _failed(NOT_FOUND, f"{argv[0]}: command not found\n")
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        return _failed(NOT_EXECUTABLE, f"{argv[0]}: {exc.strerror or exc}\n")
    tails = {1: bytearray(), 2: bytearray()}
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, 1)
        sel.register(proc.stderr, selectors.EVENT_READ, 2)
        while sel.get_map():
            for key, _ in sel.select():
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                try:
                    _write_all(key.data, data)
                except OSError:   # our own output is gone: the tails still count
                    pass
                tail = tails[key.data]
                tail += data
                if len(tail) > TAIL:
                    del tail[:len(tail) - TAIL]
    proc.stdout.close()
    proc.stderr.close()
    code = proc.wait()
    return ShellResult(returncode=code, stdout=tails[1].decode("utf-8", "replace"),
                       stderr=tails[2].decode("utf-8", "replace"))
