"""A real ``ezpq-server`` subprocess shared by client processes, and the ``ezpq`` command."""

import csv
import json
import multiprocessing
import os
import pickle
import stat
import subprocess

import psutil
import pytest

import ezpq_mgr as ezpq
from ezpq_mgr.client.connection import Remote
from jobs import sleep_for, square, wait_until_running
from server_fixture import Server


@pytest.fixture(params=["unix", "tcp"])
def server(request):
    s = Server(request.param)
    yield s
    assert s.stop() in (0, None)  # None: the test ended it itself


def _own_results(address, key, qid, offset, out):
    with ezpq.Queue(address=address, authkey=key, qid=qid) as Q:
        jobs = Q.map(square, range(offset, offset + 50))
    out.put((qid, [j["output"] for j in jobs]))


def test_clients_with_their_own_qids_get_their_own_results(server):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_own_results, args=(server.address, server.key, f"q{i}", 100 * i, out))
             for i in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    assert got == {f"q{i}": [x * x for x in range(100 * i, 100 * i + 50)] for i in range(2)}


def _putter(address, key, qid, done):
    Q = ezpq.Queue(address=address, authkey=key, qid=qid)
    for x in range(5):
        Q.put(square, x)
    Q.detach()
    done.set()


def test_one_qid_is_shared_between_processes(server):
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    p = ctx.Process(target=_putter, args=(server.address, server.key, "together", done))
    p.start()
    assert done.wait(60)
    p.join(10)
    with ezpq.Queue(address=server.address, authkey=server.key, qid="together") as Q:
        assert Q.wait() == 0
        assert sorted(j["output"] for j in Q.collect()) == [0, 1, 4, 9, 16]


def test_dispose_leaves_the_other_clients_jobs_alone(server):
    a = ezpq.Queue(address=server.address, authkey=server.key, qid="mix")
    b = ezpq.Queue(address=server.address, authkey=server.key, qid="mix")
    try:
        b_job = b.put(sleep_for, 0.5)
        a.put(sleep_for, 30)
        a.dispose()
        assert b.get(wait=True)["id"] == b_job
        assert b.get() is None  # a's job was cancelled and forgotten with a
    finally:
        a.dispose()
        b.dispose()


def test_dispose_on_a_shared_server_says_what_it_cancelled(server, capsys):
    with ezpq.Queue(address=server.address, authkey=server.key, qid="exp2") as Q:
        Q.put(sleep_for, 30)
        Q.put(sleep_for, 30)
        Q.put(sleep_for, 30)
    err = capsys.readouterr().err
    assert err.count("cancelled 3 of your jobs") == 1 and "detach()" in err and "'exp2'" in err
    with ezpq.Queue(address=server.address, authkey=server.key, qid="exp2") as Q:
        Q.put(sleep_for, 0)
        Q.wait()
    assert "cancelled" not in capsys.readouterr().err   # nothing left to cancel: nothing said
    Q = ezpq.Queue(address=server.address, authkey=server.key, qid="exp2")
    Q.put(sleep_for, 30)
    Q.detach()
    assert "cancelled" not in capsys.readouterr().err
    with ezpq.Queue(address=server.address, authkey=server.key, qid="exp2") as Q:
        pass   # another client's job is not ours to cancel
    assert "cancelled" not in capsys.readouterr().err
    Remote(server.address, server.key).call("cancel_all", "exp2", None, True)


def test_n_workers_caps_a_connected_queue(server):
    with ezpq.Queue(1, address=server.address, authkey=server.key) as Q:
        assert Q.n_workers() == 1
        jobs = Q.map(sleep_for, [0.2, 0.2, 0.2])
    spans = sorted((j["started"], j["ended"]) for j in jobs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once


def test_a_jobs_lane_comes_back_as_it_was_put(server):
    """The server keeps a lane's key (its pickled value, up to 64 KiB) as
    sent: its own client shows the lane itself, a long one too (a key
    the server replaced by a digest came back as "cannot be unpickled")."""
    lanes = ["L", "a lane named with more than thirty-two characters", ("tuple", 7), "y" * 1000]
    with ezpq.Queue(1, address=server.address, authkey=server.key, qid="lanes") as Q:
        for lane in lanes:
            Q.put(abs, -1, lane=lane)
        Q.wait()
        assert [j["lane"] for j in sorted(Q.collect(), key=lambda j: j["id"])] == lanes


def test_put_errors_arrive_with_their_type(server):
    with ezpq.Queue(address=server.address, authkey=server.key, max_size=1, auto_start=False) as Q:
        Q.put(square, 1)
        with pytest.raises(ezpq.QueueFull):
            Q.put(square, 2)
        with pytest.raises(ezpq.JobNotFound):
            Q.cancel(42)


def test_key_file_is_private(server):
    assert stat.S_IMODE(os.stat(server.keyfile).st_mode) == 0o600


def test_refuses_a_key_file_others_can_read(tmp_path):
    key = tmp_path / "key"
    key.write_text("abc\n")
    key.chmod(0o644)
    import sys
    done = subprocess.run([sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()",
                           "--socket", str(tmp_path / "s"), "--authkey-file", str(key)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "readable by others" in done.stderr


def test_wrong_key_and_no_server(server, tmp_path):
    for _ in range(2):
        with pytest.raises(ezpq.AuthenticationError):
            ezpq.Queue(address=server.address, authkey=b"wrong")
    with ezpq.Queue(address=server.address, authkey=server.key) as Q:  # still serving
        assert Q.map(square, [2])[0]["output"] == 4
    with pytest.raises(ezpq.ConnectionError, match="cannot connect"):
        ezpq.Queue(address=str(tmp_path / "none.sock"), authkey=b"k")


def test_server_never_unpickles_what_a_client_sends(server, tmp_path):
    from multiprocessing.connection import Client
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    from ezpq_mgr import transport, wire
    from ezpq_mgr.messages import ERROR, Reply
    with pytest.raises(Exception):  # the stdlib's client cannot even complete the handshake
        Client(server.address, authkey=server.key).send_bytes(pickle.dumps(Evil()))
    sock = transport.connect(server.address, server.key)[0]  # authenticated, then a raw pickle
    try:
        sock.sendall(transport.frame(pickle.dumps(Evil())))
        kind, exc = Reply.parse(wire.loads(transport.recv_frame(sock)))
        assert kind == ERROR and "malformed request" in str(exc)
    finally:
        sock.close()
    assert not marker.exists()
    assert Remote(server.address, server.key).call("info")["shared"] is True


def run_cli(server, *args):
    done = subprocess.run([*server.cli_args, *args], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_cli_end_to_end(server, tmp_path):
    code, out, err = run_cli(server, "submit", "--name", "hello", "--", "echo", "hi there")
    assert code == 0, err
    ok = int(out)
    code, out, _ = run_cli(server, "--json", "submit", "--priority", "1", "--", "sh", "-c", "exit 3")
    bad = json.loads(out)["job"]
    code, out, _ = run_cli(server, "submit", "--timeout", "30", "--", "sleep", "30")
    slow = int(out)
    code, out, _ = run_cli(server, "wait", str(ok), str(bad))
    assert code == 1 and "failed" in out and "completed" in out
    code, out, _ = run_cli(server, "show", str(ok))
    shown = json.loads(out)
    assert code == 0 and shown["output"] == {"returncode": 0, "stdout": "hi there\n", "stderr": ""}
    assert shown["status"] == "completed" and shown["name"] == "hello"
    code, out, _ = run_cli(server, "show", str(bad))
    assert json.loads(out)["exitcode"] == 3 and json.loads(out)["status"] == "failed"
    code, out, _ = run_cli(server, "status")
    assert code == 0 and all(len(line) <= 80 for line in out.splitlines())
    assert {"completed", "failed", "working"} <= set(out.split())
    code, out, _ = run_cli(server, "status", "--json")
    assert {j["job"] for j in json.loads(out)} >= {ok, bad, slow}
    code, out, _ = run_cli(server, "cancel", str(slow))
    assert code == 0 and "cancelled" in out
    code, out, _ = run_cli(server, "wait", str(slow))
    assert code == 1 and "cancelled" in out
    code, out, _ = run_cli(server, "cancel", "999")
    assert code == 1
    code, out, _ = run_cli(server, "show", "999")
    assert code == 1
    code, out, _ = run_cli(server, "report", "--by", "function")
    assert code == 0 and "run_command" in out
    code, out, _ = run_cli(server, "--json", "report")
    rows = json.loads(out)
    assert rows[0]["jobs"] == 3 and rows[0]["failed"] == 1 and rows[0]["cancelled"] == 1
    assert rows[0]["completed"] == 1 and rows[0]["timeout"] == rows[0]["killed"] == rows[0]["lost"] == 0
    png = tmp_path / "p.png"
    code, out, _ = run_cli(server, "plot", "-o", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(server, "workers", "3")
    assert code == 0 and out.strip() == "3"
    assert Remote(server.address, server.key).call("n_workers") == 3
    code, _, err = run_cli(server, "frobnicate")
    assert code == 2
    code, _, err = run_cli(server, "submit", "--")
    assert code == 2 and "no command given" in err and "Traceback" not in err


def test_cli_submit_prints_the_number_of_the_job_it_made(server):
    """The number comes from the server's reply to the submit itself: jobs
    submitted meanwhile on the same qid (by a Queue or another submit) do
    not change it."""
    with ezpq.Queue(address=server.address, authkey=server.key, qid="cli") as Q:
        Q.put(sleep_for, 0, name="queued by a Queue")
        code, out, err = run_cli(server, "--json", "submit", "--name", "mine", "--", "true")
        Q.put(sleep_for, 0, name="after")
        assert code == 0, err
        made = json.loads(out)
        shown = json.loads(run_cli(server, "show", str(made["job"]))[1])
        assert shown["name"] == "mine" and shown["id"] == made["id"] == 2 and made["qid"] == "cli"
        Q.wait()


def test_report_totals_equal_the_accounting_csv(server):
    with ezpq.Queue(address=server.address, authkey=server.key) as Q:
        Q.map(square, range(10))
        Q.put(sleep_for, "x", suppress_errors=True)  # fails
        Q.wait()
    rows = Remote(server.address, server.key).call("report", "user", True)
    assert server.stop(keep_files=True) == 0  # flushes the CSV
    with open(server.log_file, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert rows[0]["jobs"] == len(csv_rows) == 11
    assert rows[0]["failed"] == sum(r["status"] == "failed" for r in csv_rows) == 1
    assert rows[0]["completed"] == sum(r["status"] == "completed" for r in csv_rows) == 10
    cpu = sum(float(r["cpu_user"]) + float(r["cpu_system"]) for r in csv_rows)
    assert rows[0]["cpu_seconds"] == pytest.approx(cpu)
    assert rows[0]["max_rss_peak"] == max(float(r["max_rss"]) for r in csv_rows)
    assert {"output", "args", "kwargs"}.isdisjoint(csv_rows[0])


def test_cli_cannot_connect():
    import sys
    done = subprocess.run([sys.executable, "-m", "ezpq_mgr", "--socket", "/nonexistent/s.sock", "status"],
                          capture_output=True, text=True, env=dict(os.environ, EZPQ_AUTHKEY="k"), timeout=30)
    assert done.returncode == 3 and "cannot connect" in done.stderr


def test_sigterm_stops_server_and_workers(server):
    Q = ezpq.Queue(address=server.address, authkey=server.key, n_workers=1)
    wait_until_running(Q, Q.put(sleep_for, 30))
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    assert tree
    assert server.stop(keep_files=True) == 0  # SIGTERM
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive
    with pytest.raises(ezpq.ConnectionError):
        Q.size()
    Q.dispose()  # the server is gone: releases locally, does not hang
    if server.log_file:
        rows = list(csv.DictReader(open(server.log_file)))
        assert [r["status"] for r in rows] == ["lost"]  # the killed job is recorded


def test_environment_names_the_server(server, monkeypatch):
    addr = server.address if isinstance(server.address, str) else f"{server.address[0]}:{server.address[1]}"
    monkeypatch.setenv("EZPQ_ADDRESS", addr)
    monkeypatch.setenv("EZPQ_AUTHKEY", server.key.decode())
    with ezpq.Queue() as Q:
        assert Q._server is None  # connected, not embedded
        assert Q.map(square, [3])[0]["output"] == 9


def test_thread_jobs_run_in_a_worker_process_not_the_server(server):
    import threading
    with ezpq.Queue(address=server.address, authkey=server.key, job_runner=threading.Thread) as Q:
        Q.put(os.getpid)
        job = Q.get(wait=True)
    assert job["output"] != server.proc.pid and job["max_rss"] is None


def test_a_blocked_get_notices_a_dead_server(server):
    import threading
    Q = ezpq.Queue(address=server.address, authkey=server.key)
    job_id = Q.put(sleep_for, 30)
    errors = []
    started = threading.Event()

    def blocked():
        started.set()
        try:
            Q.get(wait=True)
        except ezpq.ConnectionError as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    assert started.wait(5)
    wait_until_running(Q, job_id)
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    server.proc.kill()
    server.proc.wait()
    t.join(10)
    assert not t.is_alive() and errors
    psutil.wait_procs(tree, timeout=5)  # workers follow their server
    Q.dispose()


def test_a_server_that_never_answers_fails_within_10_s(tmp_path, monkeypatch):
    import socket
    import time
    from ezpq_mgr import transport
    monkeypatch.setattr(transport, "CONNECT_TIMEOUT", 1.0)
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(path)
    mute.listen()  # accepts, never speaks
    try:
        t = time.monotonic()
        with pytest.raises(ezpq.ConnectionError, match="mute.sock"):
            ezpq.Queue(address=path, authkey=b"k")
        assert time.monotonic() - t < 10
    finally:
        mute.close()
