"""Fixtures: every test must leave no process behind.

A test judges only processes this test session started: descendants of
pytest, and processes that carry this session's marker in their
environment or command line (an embedded server started in its own
session, and their descendants). Other people's ezpq processes on
the machine are not ours to judge or kill.
"""

import os
import shutil
import sys
import tempfile
import time
import uuid

import psutil
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

START_METHODS = ["fork", "spawn"]

#: Inherited by every process the suite starts (workers exec'd with a clean
#: environment are found as descendants of a marked server instead).
SESSION_MARK = os.environ.setdefault("EZPQ_TEST_SESSION", uuid.uuid4().hex)

#: Every temporary directory the suite makes (servers' sockets and logs, the
#: embedded servers' too: TMPDIR is inherited) lives under one root, removed
#: when the session ends. 0755, so that throwaway users reach their sockets.
#: Made in ``pytest_configure``, not at import: a process that merely imports
#: this module (a spawned child unpickling a test's function) makes none.
#: Removed in ``pytest_unconfigure``, which runs whatever ran (a session
#: fixture would not when every test is deselected, or with --collect-only),
#: and only by the process that made it.
_made_root = []


def pytest_configure(config):
    if "EZPQ_TEST_TMP_ROOT" not in os.environ:
        os.environ["EZPQ_TEST_TMP_ROOT"] = tempfile.mkdtemp(prefix="ezpq-test-")
        os.chmod(os.environ["EZPQ_TEST_TMP_ROOT"], 0o755)
        os.environ["TMPDIR"] = tempfile.tempdir = os.environ["EZPQ_TEST_TMP_ROOT"]
        _made_root.append(os.environ["EZPQ_TEST_TMP_ROOT"])


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if one of our ``ezpq-*`` temporary directories outlived
    it (an embedded server's ``ezpq-XXXX``, a test server's ``ezpq-srv-*``):
    every test and fixture has ended by now, so anything left is a leak that
    the root's removal below would otherwise hide. Judged by the process
    that made the root only (children that import this module have none)."""
    for root in _made_root:
        deadline = time.monotonic() + 5   # a server exiting removes its own
        while True:
            left = sorted(n for n in os.listdir(root) if n.startswith("ezpq-"))
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            reporter.ensure_newline()
            reporter.write_line(f"temporary directories left behind in {root}: {left}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    for root in _made_root:
        if os.path.basename(root).startswith("ezpq-test-"):
            shutil.rmtree(root, ignore_errors=True)


STDLIB_HELPERS = ("resource_tracker", "forkserver")  # one per interpreter, by multiprocessing


def _cmdline(p):
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "?"


def _ours(p) -> bool:
    try:
        if SESSION_MARK in " ".join(p.cmdline()):
            return True
        return p.environ().get("EZPQ_TEST_SESSION") == SESSION_MARK
    except psutil.Error:
        return False


def _ezpq_processes():
    """Processes of ours still alive: descendants of pytest, and ezpq
    processes (orphaned or in their own session) marked as this session's."""
    me = psutil.Process()
    found = {(p.pid, p.create_time()): p for p in me.children(recursive=True)
             if not any(h in _cmdline(p) for h in STDLIB_HELPERS)}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ezpq" in cmd and _ours(p):
            try:
                for q in [p] + p.children(recursive=True):
                    found[(q.pid, q.create_time())] = q
            except psutil.Error:
                pass
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail the test if any process it started is still alive 5 s after it ended."""
    before = set(_ezpq_processes())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = {key: p for key, p in _ezpq_processes().items() if key not in before}
        alive = []
        for p in left.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not alive, f"processes left behind: {[(p.pid, _cmdline(p)) for p in alive]}"


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param
