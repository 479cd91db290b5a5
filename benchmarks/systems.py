"""One adapter per system under test: ezpq_mgr, ezpq 0.2.2, ProcessPoolExecutor,
multiprocessing.Pool. Each method runs one workload and returns its figures;
``None`` means the system cannot do it."""

import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile
import time

import psutil

from jobs import child_sleeper, noop, random_sleep, sleep_durations


def _check(outputs, expected):
    if list(outputs) != list(expected):
        raise AssertionError("wrong outputs")


def _pid_file_survivor(pidfile, wait=1.0):
    """Seconds later, is the child noted in pidfile still alive?"""
    time.sleep(wait)
    try:
        pid = int(open(pidfile).read())
    except (OSError, ValueError):
        return None
    try:
        p = psutil.Process(pid)
        alive = p.status() != psutil.STATUS_ZOMBIE
        if alive:
            p.kill()
        return alive
    except psutil.NoSuchProcess:
        return False


class _EzpqApi:
    """Workloads through ezpq's API (ezpq_mgr and ezpq 0.2.2 share it)."""

    ordered_map = True          # map returns jobs in input order

    def warm(self, Q):
        Q.map(noop, range(20))

    def pidfile_arg(self, pidfile):
        return pidfile

    def _outputs(self, jobs):
        out = [j["output"] for j in jobs]
        return out if self.ordered_map else sorted(out)

    def make_queue(self, workers, **kw):
        return self.ezpq.Queue(workers, **kw)

    def w1_put(self, n, workers=2):
        with self.make_queue(workers) as Q:
            self.warm(Q)
            t = time.perf_counter()
            for i in range(n):
                Q.put(noop, i)
            Q.wait()
            out = Q.collect()
            dt = time.perf_counter() - t
        _check(sorted(j["output"] for j in out), range(n))
        return n / dt

    def w1b_map(self, n, workers=2):
        with self.make_queue(workers) as Q:
            self.warm(Q)
            t = time.perf_counter()
            out = Q.map(noop, range(n))
            dt = time.perf_counter() - t
        _check(self._outputs(out), range(n))
        return n / dt

    def w2(self, n_jobs, workers):
        with self.ezpq.Queue(workers) as Q:
            self.warm(Q)
            t = time.perf_counter()
            out = Q.map(random_sleep, range(n_jobs))
            dt = time.perf_counter() - t
        expected = sleep_durations(n_jobs)
        _check(self._outputs(out), expected if self.ordered_map else sorted(expected))
        return dt

    def w3(self, rounds):
        lat = []
        with self.make_queue(2) as Q:
            self.warm(Q)
            for _ in range(rounds):
                t = time.perf_counter()
                Q.put(noop, 1)
                job = Q.get(wait=True)
                lat.append(time.perf_counter() - t)
                assert job["output"] == 1
        return lat

    def w4(self):
        pidfile = tempfile.mktemp()
        with self.ezpq.Queue(2) as Q:
            t = time.perf_counter()
            Q.put(child_sleeper, self.pidfile_arg(pidfile), timeout=0.5)
            Q.get(wait=True)
            reported = time.perf_counter() - t
        return reported, _pid_file_survivor(pidfile)


class EzpqMgr(_EzpqApi):
    name = "ezpq_mgr"

    def __init__(self, state_dir=False, buffer_puts=None):
        import ezpq_mgr
        self.ezpq = ezpq_mgr
        self.state_dir = state_dir   # each queue in a fresh --state-dir (durable server)
        self.buffer_puts = buffer_puts   # Queue(buffer_puts=...): None is the default
        self._dirs = []

    def make_queue(self, workers, **kw):
        if self.buffer_puts is not None:
            kw["buffer_puts"] = self.buffer_puts
        if self.state_dir:
            d = tempfile.mkdtemp(prefix="ezpq-bench-state-")
            self._dirs.append(d)
            kw["state_dir"] = os.path.join(d, "state")
        return self.ezpq.Queue(workers, **kw)

    def cleanup(self):
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def w6_restart(self, n):
        """W6 on a state dir: n waiting jobs, the server stopped; then the
        seconds from a new Queue on that dir until it sees all n waiting
        (a fresh server interpreter, the restore, the connection), the
        database's bytes per job, and the drain rate after the restart."""
        d = tempfile.mkdtemp(prefix="ezpq-bench-w6-")
        try:
            state = os.path.join(d, "state")
            Q = self.ezpq.Queue(2, auto_start=False, state_dir=state)
            qid = Q._qid
            for i in range(n):
                Q.put(noop, i)
            assert Q.size(waiting=True) == n
            Q.detach()
            size = sum(os.path.getsize(os.path.join(state, f)) for f in os.listdir(state))
            t = time.perf_counter()
            Q = self.ezpq.Queue(2, auto_start=False, state_dir=state, qid=qid)
            assert Q.size(waiting=True) == n
            load = time.perf_counter() - t
            t = time.perf_counter()
            Q.start()
            Q.wait()
            drain = n / (time.perf_counter() - t)
            assert len(Q.collect()) == n
            Q.dispose()
            return load, size / n, drain
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def w6(self, n):
        with self.ezpq.Queue(2, auto_start=False) as Q:
            server = psutil.Process(Q._server.popen.pid)
            rss0 = server.memory_info().rss
            t = time.perf_counter()
            for i in range(n):
                Q.put(noop, i)
            assert Q.size(waiting=True) == n
            submit = n / (time.perf_counter() - t)
            rss1 = server.memory_info().rss
            t = time.perf_counter()
            Q.start()
            Q.wait()
            drain = n / (time.perf_counter() - t)
            assert len(Q.collect()) == n
        return submit, (rss1 - rss0) / n, drain

    def w7(self, seconds=5.0):
        with self.ezpq.Queue(2) as Q:
            Q.put(time.sleep, seconds + 2)
            Q.put(time.sleep, seconds + 2)
            while Q.size(working=True) < 2:
                Q.wait_worker(timeout=0.01)
            server = psutil.Process(Q._server.popen.pid)
            me = psutil.Process()
            c0 = sum(server.cpu_times()[:2]) + sum(me.cpu_times()[:2])
            time.sleep(seconds)
            c1 = sum(server.cpu_times()[:2]) + sum(me.cpu_times()[:2])
            Q.stop_all()
        return 100.0 * (c1 - c0) / seconds


class Ezpq022(_EzpqApi):
    name = "ezpq 0.2.2"
    ordered_map = False  # its map returns every completed job, by priority

    def __init__(self):
        import ezpq
        self.ezpq = ezpq

    def warm(self, Q):
        pass  # 20 warm-up jobs would cost it a second

    def pidfile_arg(self, pidfile):
        return [pidfile]  # ezpq splits a bare string into characters


class _Executor:
    def w1_put(self, n, workers=2):
        with self.make(workers) as ex:
            self.warm(ex)
            t = time.perf_counter()
            futs = [ex.submit(noop, i) if hasattr(ex, "submit") else ex.apply_async(noop, (i,))
                    for i in range(n)]
            out = [f.result() if hasattr(f, "result") else f.get() for f in futs]
            dt = time.perf_counter() - t
        _check(out, range(n))
        return n / dt

    def w1b_map(self, n, workers=2):
        with self.make(workers) as ex:
            self.warm(ex)
            t = time.perf_counter()
            out = list(self.map(ex, n))
            dt = time.perf_counter() - t
        _check(out, range(n))
        return n / dt

    def w2(self, n_jobs, workers):
        with self.make(workers) as ex:
            self.warm(ex)
            t = time.perf_counter()
            out = list(ex.map(random_sleep, range(n_jobs), chunksize=1) if hasattr(ex, "submit")
                       else ex.imap(random_sleep, range(n_jobs), chunksize=1))
            dt = time.perf_counter() - t
        _check(out, sleep_durations(n_jobs))
        return dt

    def w3(self, rounds):
        lat = []
        with self.make(2) as ex:
            self.warm(ex)
            for _ in range(rounds):
                t = time.perf_counter()
                r = ex.submit(noop, 1).result() if hasattr(ex, "submit") else ex.apply_async(noop, (1,)).get()
                lat.append(time.perf_counter() - t)
                assert r == 1
        return lat

    def warm(self, ex):
        list(ex.map(noop, range(20)))


class ProcessPool(_Executor):
    name = "ProcessPoolExecutor"

    def make(self, workers):
        return concurrent.futures.ProcessPoolExecutor(workers)

    def map(self, ex, n):
        return ex.map(noop, range(n), chunksize=1)


class MpPool(_Executor):
    name = "multiprocessing.Pool"

    def make(self, workers):
        return multiprocessing.Pool(workers)

    def map(self, ex, n):
        return ex.map(noop, range(n))  # its default chunking
