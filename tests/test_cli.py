"""The ``ezpq`` and ``ezpq-server`` commands as a user meets them: help,
``--version``, the submit options, filters, and every error as one line
with its documented exit code (never a traceback)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ezpq_mgr.cli import _parser
from ezpq_mgr.client.connection import Remote
from server_fixture import Server

SERVER = [sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()"]


@pytest.fixture
def server():
    """A server per test: the workers a server starts during a test (after
    a kill) are that test's processes, and must be gone at its end."""
    s = Server("unix")
    yield s
    assert s.stop() in (0, None)


def run_cli(server, *args, env=None, timeout=120):
    done = subprocess.run([*server.cli_args, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    return done.returncode, done.stdout, done.stderr


def one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_version_of_both_commands():
    from ezpq_mgr import __version__
    for cmd in ([sys.executable, "-m", "ezpq_mgr"], SERVER):
        done = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and __version__ in done.stdout, done


def test_every_option_has_help():
    parser = _parser()
    missing = []
    subs = [a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]
    for name, sub in subs[0].choices.items():
        for action in sub._actions:
            if action.help in (None, "") and action.dest != "help":
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert not missing, missing


def test_a_missing_command_fails_like_a_shell_with_127(server):
    code, out, err = run_cli(server, "--json", "submit", "--", "no-such-command-ezpq")
    assert code == 0, err
    job = json.loads(out)["job"]
    code, out, _ = run_cli(server, "wait", str(job))
    assert code == 1 and "failed" in out
    shown = json.loads(run_cli(server, "show", str(job))[1])
    assert shown["exitcode"] == 127 and shown["output"]["returncode"] == 127
    assert "command not found" in shown["output"]["stderr"]
    assert "Traceback" not in json.dumps(shown)


def test_submit_takes_max_memory_and_retries(server):
    code, out, err = run_cli(server, "--json", "submit", "--max-memory", "64M", "--retries", "2",
                             "--lane", "L", "--qid", "opts", "--", "true")
    assert code == 0, err
    job = json.loads(out)["job"]
    assert run_cli(server, "wait", str(job))[0] == 0
    shown = json.loads(run_cli(server, "show", str(job))[1])
    assert shown["max_memory"] == 64 * 2**20 and shown["retries"] == 2
    assert shown["qid"] == "opts" and shown["lane"] == "L"
    for bad in (["--max-memory", "lots"], ["--retries", "many"], ["--timeout", "soon"]):
        code, _, err = run_cli(server, "submit", *bad, "--", "true")
        assert code == 2 and "Traceback" not in err, err
    code, _, err = run_cli(server, "submit", "--retries", "5000", "--", "true")
    assert code == 2 and one_line(err) and "retries" in err


def test_a_command_over_its_max_memory_is_killed(server):
    code, out, err = run_cli(server, "--json", "submit", "--max-memory", "40M", "--", sys.executable, "-c",
                             "import time; b = bytearray(200 * 2**20); time.sleep(30)")
    job = json.loads(out)["job"]
    code, out, _ = run_cli(server, "wait", "--timeout", "60", str(job))
    shown = json.loads(run_cli(server, "show", str(job))[1])
    assert code == 1 and shown["status"] == "killed", shown


def test_status_filters(server):
    ok = json.loads(run_cli(server, "--json", "submit", "--qid", "fa", "--", "true")[1])["job"]
    bad = json.loads(run_cli(server, "--json", "submit", "--qid", "fb", "--", "false")[1])["job"]
    run_cli(server, "wait", str(ok), str(bad))
    done = json.loads(run_cli(server, "--json", "status", "--state", "failed")[1])
    assert bad in {j["job"] for j in done} and ok not in {j["job"] for j in done}
    assert {j["status"] for j in done} == {"failed"}
    both = json.loads(run_cli(server, "--json", "status", "--qid", "fa", "--qid", "fb")[1])
    assert {j["job"] for j in both} == {ok, bad}
    me = both[0]["user"]
    assert {j["job"] for j in json.loads(run_cli(server, "--json", "status", "--user", me)[1])} >= {ok, bad}
    assert json.loads(run_cli(server, "--json", "status", "--user", "nobody-here")[1]) == []
    code, _, err = run_cli(server, "status", "--state", "sleepy")
    assert code == 2 and "Traceback" not in err


def test_bad_address_is_one_line():
    env = dict(os.environ, EZPQ_ADDRESS="localhost", EZPQ_AUTHKEY="k")
    done = subprocess.run([sys.executable, "-m", "ezpq_mgr", "status"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and one_line(done.stderr) and "localhost" in done.stderr


def test_ctrl_c_on_wait_exits_130(server):
    job = json.loads(run_cli(server, "--json", "submit", "--", "sleep", "30")[1])["job"]
    remote = Remote(server.address, server.key)
    before = remote.call("info")["parked_calls"]
    proc = subprocess.Popen([*server.cli_args, "wait", str(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while remote.call("info")["parked_calls"] <= before:   # its wait is parked at the server
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run_cli(server, "cancel", str(job))
    assert proc.returncode == 130 and one_line(err) and "interrupted" in err, err


def test_plot_without_pandas_is_one_line(server, tmp_path):
    code = ("import sys; sys.modules['pandas'] = None; sys.modules['plotnine'] = None; "
            "from ezpq_mgr.cli import main; main(sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, *server.cli_args[3:], "plot", "-o",
                           str(tmp_path / "p.png")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and one_line(done.stderr) and "pip install" in done.stderr, done.stderr


def test_server_on_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*SERVER, "--address", f"127.0.0.1:{port}", "--authkey-file",
                               str(tmp_path / "key"), "--log-level", "WARNING"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and one_line(done.stderr), done.stderr
    assert "in use" in done.stderr and str(port) in done.stderr


def test_a_shell_jobs_environment_is_never_printed(server):
    secret = "s3cr3t-" + os.urandom(8).hex()
    env = dict(os.environ, EZPQ_TEST_SECRET=secret)
    code, out, err = run_cli(server, "--json", "submit", "--qid", "envq", "--", "sh", "-c",
                             'test -n "$EZPQ_TEST_SECRET"', env=env)
    job = json.loads(out)["job"]
    code, out, _ = run_cli(server, "wait", str(job), env=env)
    assert code == 0                    # the job saw its environment
    outputs = [run_cli(server, "show", str(job))[1], run_cli(server, "--json", "status")[1],
               run_cli(server, "status")[1], run_cli(server, "--json", "wait", str(job))[1]]
    assert all(secret not in text for text in outputs)
    shown = json.loads(outputs[0])
    assert shown["args"][0] == ["sh", "-c", 'test -n "$EZPQ_TEST_SECRET"']
    assert "not shown" in shown["args"][1]


def test_status_and_report_show_a_shell_commands_peak_and_each_status(server):
    code, out, err = run_cli(server, "--json", "submit", "--qid", "big", "--", sys.executable, "-c",
                             "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])")
    job = json.loads(out)["job"]
    assert run_cli(server, "wait", str(job))[0] == 0
    lines = run_cli(server, "status", "--qid", "big")[1].splitlines()
    header, row = lines[0].split(), lines[1].split()
    assert header[-1] == "peak" and row[0] == str(job)
    assert row[-1].endswith("M") and float(row[-1][:-1]) >= 300, row
    rows = json.loads(run_cli(server, "--json", "report", "--by", "qid")[1])
    big = [r for r in rows if r["qid"] == "big"][0]
    assert big["max_rss_peak"] >= 300 * 2**20 and big["completed"] == 1
    assert set(big) >= {"completed", "failed", "timeout", "killed", "lost", "cancelled", "skipped"}
    table = run_cli(server, "report", "--by", "qid")[1]
    assert all(len(line) <= 80 for line in table.splitlines())
