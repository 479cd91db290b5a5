"""Start a real ``ezpq-server`` subprocess for tests (Unix socket or TCP)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ezpq_mgr.client.connection import Remote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ezpq-server in a 0755 directory (other users can reach its socket)."""

    def __init__(self, kind="unix", workers=2, start_method="fork", log=True, extra=()):
        self.dir = tempfile.mkdtemp(prefix="ezpq-srv-")
        os.chmod(self.dir, 0o755)
        self.keyfile = os.path.join(self.dir, "key")
        self.log_file = os.path.join(self.dir, "acct.csv") if log else None
        if kind == "unix":
            self.address = os.path.join(self.dir, "s.sock")
            where = ["--socket", self.address]
        else:
            self.address = ("127.0.0.1", free_port())
            where = ["--address", f"127.0.0.1:{self.address[1]}"]
        cmd = [sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()", *where,
               "--workers", str(workers), "--authkey-file", self.keyfile, "--start-method", start_method,
               "--log-level", "WARNING"]
        if self.log_file:
            cmd += ["--log-file", self.log_file]
        cmd += list(extra)
        # its temporary files (the jobs' logs without --log-dir) in its own
        # directory too, so a test that kills it leaves nothing behind
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, TMPDIR=self.dir))
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "ezpq-server exited during start-up"
            assert time.monotonic() < deadline, "ezpq-server did not start"
            if os.path.exists(self.keyfile):
                try:
                    self.key = open(self.keyfile, "rb").read().strip()
                    if self.key:
                        Remote(self.address, self.key).call("info")
                        break
                except Exception:
                    pass
            time.sleep(0.02)

    @property
    def cli_args(self):
        where = ["--socket", self.address] if isinstance(self.address, str) else [
            "--address", f"{self.address[0]}:{self.address[1]}"]
        return [sys.executable, "-m", "ezpq_mgr", *where, "--authkey-file", self.keyfile]

    def stop(self, keep_files=False):
        """SIGTERM and wait, then remove its directory (``keep_files``: not
        yet, the test reads its log; a later ``stop()`` removes it). Its exit
        code (None if it had already ended)."""
        try:
            return None if self.proc.poll() is not None else terminate(self.proc)
        finally:
            if not keep_files:
                shutil.rmtree(self.dir, ignore_errors=True)


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM a server we started and wait for it; one that does not stop
    within 15 s prints its threads' stacks (SIGUSR1) and is killed. Its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # its threads' stacks, to stderr
            time.sleep(0.5)
            proc.kill()
            proc.wait()
    return proc.returncode
