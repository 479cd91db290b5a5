"""Job functions for the benchmarks (importable, so every system can pickle them)."""

import random
import subprocess
import time


def noop(x=None):
    return x


def random_sleep(x):
    """ezpq's quickstart job scaled down 10x: 0.05-0.15 s, seeded by x."""
    random.seed(x)
    n = random.uniform(0.05, 0.15)
    time.sleep(n)
    return n


def sleep_durations(n_jobs):
    out = []
    for x in range(n_jobs):
        random.seed(x)
        out.append(random.uniform(0.05, 0.15))
    return out


def child_sleeper(pidfile):
    """Start `sleep 30` as a child, note its pid, and wait for it."""
    child = subprocess.Popen(["sleep", "30"])
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(child.pid))
    import os
    os.rename(pidfile + ".tmp", pidfile)
    child.wait()


def sleep(seconds):
    time.sleep(seconds)
