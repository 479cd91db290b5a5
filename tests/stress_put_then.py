"""Stress loop for issue 10 item 22 (``lost the ezpq server ... EOFError``
inside ``put_then``): runs examples/lanes2.py under spawn, several at once
so that the machine is busy, and counts the runs that fail.

    python tests/stress_put_then.py [runs] [parallel]

The cause it found: the supervisor's kill thread read ``returncode`` from a
psutil.Process that ``kill_tree`` had dropped as a zombie without waiting
for it (AttributeError). Before, the thread died silently and the job stayed
``working`` (the run hung, about 1 in 25 under load); once a dying server
thread stops the server, the client sees exactly item 22's EOFError.
tests/test_security.py reproduces it in one run with jobs that
take 30-65 ms to die on SIGTERM.
"""

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(_):
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, EZPQ_START_METHOD="spawn")
        try:
            done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "lanes2.py"), "--fast"],
                                  cwd=d, env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "hung"
        return "ok" if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    parallel = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, range(runs)))
    bad = [r for r in results if r != "ok"]
    print(f"{len(bad)} of {runs} runs failed")
    for r in sorted(set(bad)):
        print(f"  {bad.count(r)} x {r}")
    sys.exit(1 if bad else 0)
