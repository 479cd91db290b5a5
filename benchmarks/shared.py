"""W5: several client processes sharing one ezpq-server."""

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

from jobs import noop


def _client(address, key, n, start, results, job=noop, buffer_puts=None):
    import ezpq_mgr
    with ezpq_mgr.Queue(address=address, authkey=key, buffer_puts=buffer_puts) as Q:
        results.put("connected")
        start.wait()
        ids = [Q.put(job, i) for i in range(n)]
        Q.wait()
        out = Q.collect()
    results.put((os.getpid(), sorted(j["output"] for j in out) == list(range(n)),
                 sorted(j["id"] for j in out) == sorted(ids), time.perf_counter()))


def w5(clients=4, n=1000, workers=2, job=noop, state_dir=False, buffer_puts=None):
    """Aggregate jobs/s of ``clients`` spawned processes x ``n`` no-op jobs
    (``job``: pass one defined in the caller's main script); and whether
    each client got exactly its own results. ``state_dir``: the server
    keeps its queue in a state dir (``--state-dir``, a fresh one);
    ``buffer_puts``: the clients' ``Queue(buffer_puts=...)``."""
    tmp = tempfile.mkdtemp(prefix="ezpq-bench-")
    sock, keyfile = os.path.join(tmp, "s.sock"), os.path.join(tmp, "key")
    server = subprocess.Popen([sys.executable, "-c", "from ezpq_mgr.cli import server_main; server_main()",
                               "--socket", sock, "--workers", str(workers), "--authkey-file", keyfile,
                               "--log-level", "WARNING",
                               *(["--state-dir", os.path.join(tmp, "state")] if state_dir else [])])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("ezpq-server did not start")
            time.sleep(0.01)
        key = open(keyfile, "rb").read().strip()
        ctx = multiprocessing.get_context("spawn")
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_client, args=(sock, key, n, start, results, job, buffer_puts)) for _ in range(clients)]
        for p in procs:
            p.start()
        for _ in procs:  # every client connected before the clock starts
            assert results.get(timeout=60) == "connected"
        t0 = time.perf_counter()
        start.set()
        got = [results.get(timeout=300) for _ in procs]
        dt = max(g[3] for g in got) - t0
        for p in procs:
            p.join()
        return clients * n / dt, all(g[1] and g[2] for g in got)
    finally:
        server.terminate()
        server.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)
