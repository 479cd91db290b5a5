"""``ezpq top`` in a pseudo-terminal, as a user runs it: it shows a running
job with its CPU % and memory now, quits on ``q`` (exit 0), and ends with
one line and the documented code when the server goes away (3) or on
Ctrl-C (130); never a traceback."""

import json
import os
import pty
import re
import select
import subprocess
import time

import pytest

from server_fixture import Server
from test_cli import run_cli

#: a shell job that keeps one core busy and holds ~40 MB (RSS shown >= that)
BUSY = ["python3", "-c", "b = bytearray(40 << 20)\nwhile True: b[0] = 1"]


@pytest.fixture
def server():
    s = Server("unix", workers=1)
    yield s
    s.stop()


class Terminal:
    """A command on a pty of 100 columns; ``screen`` is all it printed."""

    def __init__(self, argv):
        master, slave = pty.openpty()
        import fcntl
        import struct
        import termios
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        self.fd = master
        self.proc = subprocess.Popen(   # its own session, the pty its controlling terminal (Ctrl-C works)
            argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            env={**os.environ, "TERM": "xterm", "COLUMNS": "100", "LINES": "40"})
        os.close(slave)
        self.screen = b""

    def read(self, seconds=0.1):
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:   # the command ended and closed its side
                    return
                if not chunk:
                    return
                self.screen += chunk

    def text(self):
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.screen.decode(errors="replace"))

    def wait_for(self, pattern, limit=30.0):
        deadline = time.monotonic() + limit
        while not re.search(pattern, self.text()):
            assert time.monotonic() < deadline, f"never showed {pattern!r}:\n{self.text()[-3000:]}"
            self.read(0.1)
        return re.search(pattern, self.text())

    def finish(self, limit=15.0):
        deadline = time.monotonic() + limit
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "ezpq top did not end"
            self.read(0.05)
        self.read(0.2)
        os.close(self.fd)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.close(self.fd)
        except OSError:
            pass


def _submit(server, *args):
    code, out, err = run_cli(server, "--json", "submit", *args)
    assert code == 0, err
    return json.loads(out)["job"]


def test_top_shows_a_running_job_and_quits_on_q(server):
    job = _submit(server, "--qid", "hot", "--", *BUSY)
    waiting = _submit(server, "--qid", "later", "--", "true")
    t = Terminal([*server.cli_args, "top", "--interval", "0.5"])
    try:
        # the job's row: its number, qid, CPU % (a busy core: tens of %), RSS in M, runtime
        row = t.wait_for(rf"\n\s*{job}\s+hot\s+1\s+\S+\s+python3\s+(\d+)%\s+([\d.]+)M\s+\d+:\d\d")
        deadline = time.monotonic() + 30
        while int(row.group(1)) < 30 or float(row.group(2)) < 40:   # a later refresh has the figures
            assert time.monotonic() < deadline, t.text()[-3000:]
            t.read(0.5)
            row = list(re.finditer(rf"\n\s*{job}\s+hot\s+1\s+\S+\s+python3\s+(\d+)%\s+([\d.]+)M", t.text()))[-1]
        assert re.search(r"workers 1/1 busy", t.text())
        assert re.search(r"\n\s*\S+\s+later\s+1\s+0", t.text()), "the waiting count per queue"
        os.write(t.fd, b"q")
        assert t.finish() == 0
        assert "Traceback" not in t.text()
    finally:
        t.kill()
        run_cli(server, "cancel", str(job), str(waiting))


def test_top_ends_with_one_line_when_the_server_goes_away(server):
    t = Terminal([*server.cli_args, "top", "--interval", "0.2"])
    try:
        t.wait_for(r"workers 0/1 busy")
        server.stop()
        assert t.finish() == 3
        assert "Traceback" not in t.text()
        assert re.search(r"ezpq: lost the ezpq server at .*\n?\s*$", t.text()), t.text()[-500:]
    finally:
        t.kill()


def test_top_on_ctrl_c_exits_130(server):
    t = Terminal([*server.cli_args, "top"])
    try:
        t.wait_for(r"workers 0/1 busy")
        os.write(t.fd, b"\x03")   # the terminal's interrupt key: SIGINT to its foreground group
        assert t.finish() == 130
        assert "Traceback" not in t.text() and "ezpq: interrupted" in t.text()
    finally:
        t.kill()


def test_a_first_sample_pauses_only_its_own_caller():
    """The sampler pauses FIRST_GAP for a process it has not seen (so its
    first CPU % covers a moment); that pause used to hold the sampler's one
    lock, so a user calling top in a loop for new processes made every
    other caller's top wait behind it (the second attack pass)."""
    import threading
    from ezpq_mgr.server import live

    sampler = live.LiveSampler()
    known = os.getpid()
    sampler.sample([known])   # seen: no pause for it from now on
    others = []
    started = threading.Event()
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(20)]
    try:
        def newcomer_loop():
            started.set()
            for p in procs:            # each a first sample: FIRST_GAP each, 4 s in all
                sampler.sample([p.pid])

        t = threading.Thread(target=newcomer_loop)
        t.start()
        started.wait(5)
        for _ in range(10):
            t0 = time.monotonic()
            pct, rss = sampler.sample([known])[known]
            others.append(time.monotonic() - t0)
            assert rss and rss > 0
        t.join(30)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert max(others) < live.FIRST_GAP / 2, others
