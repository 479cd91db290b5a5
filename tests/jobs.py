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
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{child.pid} {grand.pid}\n")
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(30)


def wait_for_file(path, limit=30):
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def burn_cpu(seconds):
    """Spin until this process used ``seconds`` of CPU; returns os.times() delta."""
    t0 = os.times()
    while True:
        t = os.times()
        used = (t.user - t0.user) + (t.system - t0.system)
        if used >= seconds:
            return used


def touch_memory_in_a_thread(mib):
    """Peak in a thread that exits before the job returns (its memory freed)."""
    import threading
    t = threading.Thread(target=touch_memory, args=(mib,))
    t.start()
    t.join()
    return mib


def touch_memory(mib):
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


def child_burns_cpu(seconds):
    code = ("import os\nt0=os.times()\n"
            f"while (os.times().user-t0.user)+(os.times().system-t0.system) < {seconds}: pass\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def child_touches_memory(mib):
    code = (f"b=bytearray({mib}*1024*1024)\nfor i in range(0,len(b),4096): b[i]=1\n"
            "import time; time.sleep(0.3)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def segfault():
    import ctypes
    ctypes.string_at(0)


def raise_signal(signum):
    """Die of ``signum`` sent to ourselves, as a crash would (the default
    action, even where Python or a test runner installed a handler)."""
    import signal
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(10)


def write_pid_and_sleep(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(30)


def wait_until_running(Q, job_id, timeout=20):
    """Poll the job's state until it runs, with a deadline (a real event
    to wait on, not a pause that hopes the job started meanwhile). Not
    there yet is waiting too: a put another thread flushed may still be
    on its way on that thread's connection."""
    deadline = time.monotonic() + timeout
    while True:
        status = {j["id"]: j["status"] for j in Q.jobs()}.get(job_id, "not there yet")
        if status == "working":
            return
        assert status in ("waiting", "not there yet") and time.monotonic() < deadline, \
            f"job {job_id} is {status}"
        time.sleep(0.01)


def touch_then_burn(mib, seconds, path=None):
    """Touch ``mib`` MiB, then spin for ``seconds`` of CPU; with ``path``,
    write it once a first half second of CPU is used (a job to stop from
    outside: its figures by then are known to be at least that)."""
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    if path:
        burn_cpu(0.5)
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
    return burn_cpu(seconds)


def child_touches_then_burns(mib, seconds):
    """A child process that touches ``mib`` MiB and spins ``seconds``."""
    code = (f"b=bytearray({mib}*1024*1024)\nfor i in range(0,len(b),4096): b[i]=1\n"
            "import os\nt0=os.times()\n"
            f"while (os.times().user-t0.user)+(os.times().system-t0.system) < {seconds}: pass\n")
    subprocess.run([sys.executable, "-c", code], check=True)
