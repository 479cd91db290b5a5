"""Fixtures: every test must leave no process behind."""

import os
import sys
import time

import psutil
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

START_METHODS = ["fork", "spawn"]


STDLIB_HELPERS = ("resource_tracker", "forkserver")  # one per interpreter, by multiprocessing


def _cmdline(p):
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "?"


def _ezpq_processes():
    """Processes of ours still alive: descendants of pytest, and orphaned ezpq servers."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)
             if not any(h in _cmdline(p) for h in STDLIB_HELPERS)}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ezpq_mgr.server" in cmd or "ezpq-server" in cmd:
            found[p.pid] = p
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail the test if any process it started is still alive 5 s after it ended."""
    before = set(_ezpq_processes())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = {pid: p for pid, p in _ezpq_processes().items() if pid not in before}
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
