"""A real ``ezpq-server`` subprocess: clients connect, SIGTERM stops it cleanly."""

import os
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

import ezpq_mgr as ezpq
from jobs import sleep_for, square


@pytest.fixture
def server(tmp_path):
    sock = str(tmp_path / "ezpq.sock")
    keyfile = str(tmp_path / "key")
    proc = subprocess.Popen([sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()",
                             "--socket", sock, "--workers", "2", "--authkey-file", keyfile],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield proc, sock, keyfile
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_key_file_is_private_and_clients_share_it(server):
    proc, sock, keyfile = server
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    key = open(keyfile, "rb").read().strip()
    with ezpq.Queue(address=sock, authkey=key) as a, ezpq.Queue(address=sock, authkey=key) as b:
        assert a.n_workers() == 2
        a.put(square, 2)
        b.put(square, 3)
        assert a.get(wait=True)["output"] == 4 and a.get() is None
        assert b.get(wait=True)["output"] == 9


def test_sigterm_stops_server_and_workers(server):
    proc, sock, keyfile = server
    key = open(keyfile, "rb").read().strip()
    Q = ezpq.Queue(address=sock, authkey=key, n_workers=1)
    Q.put(sleep_for, 30)
    while not Q.is_working():
        Q.wait_worker(timeout=0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive
    with pytest.raises(ezpq.ConnectionError):
        Q.size()
    Q.dispose()  # the server is gone: releases locally, does not hang
