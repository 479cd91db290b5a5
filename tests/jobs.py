"""Importable job functions, one per behaviour."""

import os
import subprocess
import sys
import time


def return_me(x):
    return x


def reciprocal(x):
    return 1 / x


def square(x):
    return x * x


def add(x, y=0, z=0):
    return x + y + z


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def fail(message="boom"):
    raise RuntimeError(message)


def exit_hard(code):
    os._exit(code)


def cwd_and_path():
    return os.getcwd(), list(sys.path)


def unpicklable_output():
    return lambda: None  # cloudpickle can do this; a generator it cannot


def generator_output():
    return (i for i in range(3))


def spawn_sleeper_tree(pidfile):
    """Start a child `sleep 30` and a grandchild in its own session, then hang."""
    child = subprocess.Popen(["sleep", "30"])
    grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    with open(pidfile, "w") as f:
        f.write(f"{child.pid} {grand.pid}\n")
    time.sleep(30)


def wait_for_file(path, limit=30):
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)
