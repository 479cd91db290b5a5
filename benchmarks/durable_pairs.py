"""The durable server against the in-memory one, in paired rounds: jobs/s and
the server's CPU per job for a loop of buffered puts (``buffer_puts=True``)
and a map, 5,000 no-ops on 2 workers each. Paired (the same round runs both,
back to back) because this kind of VM drifts by 2x over a day.

    python benchmarks/durable_pairs.py [ROUNDS]
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import noop  # noqa: E402

import ezpq_mgr  # noqa: E402


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def one(kind: str, durable: bool, n: int = 5000):
    """(jobs/s, server CPU µs per job) of one run."""
    tmp = tempfile.mkdtemp(prefix="ezpq-bench-pairs-")
    try:
        kw = {"state_dir": os.path.join(tmp, "state")} if durable else {}
        if kind == "put" and durable:
            kw["buffer_puts"] = True
        with ezpq_mgr.Queue(2, **kw) as Q:
            Q.map(noop, range(50))   # workers warm
            server = psutil.Process(Q._server.popen.pid)
            cpu0, t0 = cpu_seconds(server), time.perf_counter()
            if kind == "map":
                Q.map(noop, range(n))
            else:
                for i in range(n):
                    Q.put(noop, i)
                Q.wait()
                Q.collect()
            elapsed, cpu1 = time.perf_counter() - t0, cpu_seconds(server)
        return n / elapsed, (cpu1 - cpu0) / n * 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    runs = {}
    for _ in range(rounds):
        for kind in ("put", "map"):
            for durable in (False, True):
                runs.setdefault((kind, durable), []).append(one(kind, durable))
    for (kind, durable), got in runs.items():
        print(f"{kind} {'durable' if durable else 'memory '} jobs/s {statistics.median(g[0] for g in got):,.0f}"
              f"  server us/job {statistics.median(g[1] for g in got):.1f}")
    for kind in ("put", "map"):
        ratios = [runs[(kind, True)][i][0] / runs[(kind, False)][i][0] for i in range(rounds)]
        print(f"{kind} durable/memory: median {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
