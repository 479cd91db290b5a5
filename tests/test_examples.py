"""Every ezpq README example runs unchanged with ``import ezpq_mgr as ezpq``,
under fork and spawn (the examples' sleeps scaled down by --fast)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

CASES = {
    "quickstart.py": "> Jobs: 60; all completed: True",
    "decorator.py": "> Jobs: 60; outputs in input order: True",
    "put_wait_collect.py": "> Output size: 60",
    "submit.py": "(0, 1), (0, 3), (0, 5)",
    "size.py": "Total: 60; Waiting: 0; Working: 0; Completed: 60",
    "get.py": "> Got 60 jobs; ids: True",
    "collect.py": "Queue size after: 0",
    "map_progress.py": "> Jobs: 120",
    "starmap.py": "'0^0 = 1', '1^1 = 1', '2^2 = 4', '3^3 = 27', '4^0 = 1'",
    "starmapkw.py": "'0^0 = 1', '1^1 = 1', '2^2 = 4', '3^3 = 27', '4^0 = 1'",
    "lanes.py": "any overlap within a lane: False",
    "lane_error.py": "> Statuses:",
    "lanes2.py": "> Statuses:",
    "resources.py": "peak",
    "dask_cluster.py": "all completed: True",
}
PLOTS = {"quickstart.py": "quickstart.png", "submit.py": "submit.png", "lanes.py": "lanes.png",
         "lane_error.py": "lane_error.png", "lanes2.py": "lanes2.png", "resources.py": "resources.png"}


def test_every_example_is_covered():
    """Every script in examples/ has a case here, and every case a script."""
    scripts = {f for f in os.listdir(EXAMPLES) if f.endswith(".py")}
    assert set(CASES) == scripts, (f"examples without a case: {sorted(scripts - set(CASES))}; "
                                   f"cases without a script: {sorted(set(CASES) - scripts)}")
    assert set(PLOTS) <= set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example(script, start_method, tmp_path):
    args = [sys.executable, os.path.join(EXAMPLES, script), "--fast"]
    if script in PLOTS and start_method == "spawn":
        args.append("--plot")
    env = dict(os.environ, EZPQ_START_METHOD=start_method)
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert CASES[script] in done.stdout, done.stdout + done.stderr
    if "--plot" in args:
        png = tmp_path / "docs" / "imgs" / PLOTS[script]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
