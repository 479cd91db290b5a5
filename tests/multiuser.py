"""Throwaway OS users for multi-user and security tests (needs root).

``users`` (a pytest fixture, import it into the test module) creates the
users with ``useradd`` and removes them afterwards; ``run_as(pw, fn, ...)``
runs ``fn`` in a forked child that dropped to that user, so a server learns
who it is from SO_PEERCRED only.
"""

import multiprocessing
import os
import pwd
import subprocess

import pytest

#: Two user names; ``$EZPQ_TEST_USERS`` changes the prefix, so that two
#: suites on one machine never add or delete each other's users.
_PREFIX = os.environ.get("EZPQ_TEST_USERS", "ezpqtest")
USERS = (f"{_PREFIX}_a", f"{_PREFIX}_b")
FORK = multiprocessing.get_context("fork")

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/useradd"),
                                reason="needs root and useradd (CI runs as root)")


@pytest.fixture(scope="module")
def users():
    for name in USERS:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    yield {name: pwd.getpwnam(name) for name in USERS}
    for name in USERS:
        subprocess.run(["userdel", name], capture_output=True)


def become(pw):
    """Drop this process to ``pw`` (groups, gid, uid)."""
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def _as_user(pw, fn, args, out, cwd):
    try:
        become(pw)
        if cwd:
            os.chdir(cwd)
        out.put(("ok", fn(*args)))
    except BaseException as exc:  # report, never hang the test
        out.put(("error", repr(exc)))


def run_as(pw, fn, *args, timeout=120, cwd=None):
    """Run fn(*args) in a forked child that became ``pw``; return its result.

    ``cwd`` defaults to the ``dir`` of the first argument (a test server)."""
    if cwd is None and args and hasattr(args[0], "dir"):
        cwd = args[0].dir
    out = FORK.Queue()
    p = FORK.Process(target=_as_user, args=(pw, fn, args, out, cwd))
    p.start()
    try:
        kind, value = out.get(timeout=timeout)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    assert kind == "ok", value
    return value


def start_as(pw, fn, *args, cwd=None):
    """Start fn(*args) as ``pw`` in a forked child; returns (process, result queue)."""
    if cwd is None and args and hasattr(args[0], "dir"):
        cwd = args[0].dir
    out = FORK.Queue()
    p = FORK.Process(target=_as_user, args=(pw, fn, args, out, cwd))
    p.start()
    return p, out
