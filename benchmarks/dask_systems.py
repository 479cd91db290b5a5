"""The Dask column: ezpq_mgr over Dask (``Queue(dask=)``) against plain
Dask (``Client.submit``/``Client.map``) on the same LocalCluster of 2
worker processes x 1 thread, with the same no-op job.

Plain Dask is measured twice: as people use it (every task handed over at
once: Dask's own queue orders them), and with at most as many tasks in
flight as the cluster has threads, which is what ezpq hands Dask (our order
stays ours), so that the cost of that choice and the cost of ezpq's own
path can be told apart.
"""

import tempfile
import time

from jobs import child_sleeper, noop
from systems import EzpqMgr, _check, _pid_file_survivor


def local_cluster():
    import logging
    from distributed import LocalCluster
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None, silence_logs=logging.ERROR)


class EzpqOverDask(EzpqMgr):
    name = "ezpq_mgr over Dask"

    def __init__(self, address):
        super().__init__()
        self.address = address

    def make_queue(self, workers, **kw):
        return self.ezpq.Queue(workers, dask=self.address, **kw)

    # w3 is EzpqMgr's, on this make_queue

    def w4(self):
        pidfile = tempfile.mktemp()
        with self.make_queue(2) as Q:
            self.warm(Q)
            t = time.perf_counter()
            Q.put(child_sleeper, pidfile, timeout=0.5)
            job = Q.get(wait=True)
            reported = time.perf_counter() - t
        assert job["status"] == "timeout"
        return reported, _pid_file_survivor(pidfile)


class PlainDask:
    name = "plain Dask"

    def __init__(self, cluster):
        from distributed import Client
        self.client = Client(cluster, set_as_default=False)
        self.client.gather(self.client.map(noop, range(20), pure=False))

    def close(self):
        self.client.close()

    def w1_put(self, n, workers=2):
        t = time.perf_counter()
        futures = [self.client.submit(noop, i, pure=False) for i in range(n)]
        out = self.client.gather(futures)
        dt = time.perf_counter() - t
        _check(out, range(n))
        return n / dt

    def w1b_map(self, n, workers=2):
        t = time.perf_counter()
        out = self.client.gather(self.client.map(noop, range(n), pure=False))
        dt = time.perf_counter() - t
        _check(out, range(n))
        return n / dt

    def w1_capped(self, n, in_flight=2):
        """``n`` no-ops with at most ``in_flight`` handed to Dask at once."""
        from distributed import as_completed
        t = time.perf_counter()
        pending = as_completed([self.client.submit(noop, i, pure=False) for i in range(in_flight)],
                               loop=self.client.loop)
        sent, out = in_flight, []
        for future in pending:
            out.append(future.result())
            if sent < n:
                pending.add(self.client.submit(noop, sent, pure=False))
                sent += 1
        dt = time.perf_counter() - t
        _check(sorted(out), range(n))
        return n / dt

    def w3(self, rounds):
        lat = []
        for _ in range(rounds):
            t = time.perf_counter()
            assert self.client.submit(noop, 1, pure=False).result() == 1
            lat.append(time.perf_counter() - t)
        return lat

    def w4(self):
        """Dask has no timeout: the caller stops waiting, the task runs on."""
        pidfile = tempfile.mktemp()
        t = time.perf_counter()
        future = self.client.submit(child_sleeper, pidfile, pure=False)
        try:
            future.result(timeout=0.5)
        except Exception:
            pass
        reported = time.perf_counter() - t
        left = _pid_file_survivor(pidfile)   # kills the child it finds: the task then returns
        future.cancel()
        return reported, left
