"""The same queue, its jobs run on a Dask distributed cluster.

    python examples/dask_cluster.py                        # a LocalCluster of 2 workers
    python examples/dask_cluster.py tcp://10.0.0.5:8786    # your scheduler
    python examples/dask_cluster.py --fast                 # sleeps scaled down 10x

The order (priorities, lanes), the job dicts and the figures are ezpq's;
Dask runs at most as many jobs as its workers have threads. Each job
reports the host and process that ran it, next to a Dask worker.
"""
import os
import random
import socket
import sys
import time

import ezpq_mgr as ezpq

SCALE = 0.1 if "--fast" in sys.argv else 1.0


def random_sleep(x):
    random.seed(x)
    n = random.uniform(0.5, 1.5) * SCALE
    time.sleep(n)
    return n, socket.gethostname(), os.getpid()


def main(address):
    start = time.time()
    with ezpq.Queue(6, dask=address) as Q:
        output = Q.map(random_sleep, range(20))
        late = Q.put(time.sleep, 30, timeout=2 * SCALE)   # killed on its Dask host
        killed = Q.get(wait=True)
    print('> Runtime: {:.1f} s'.format(time.time() - start))
    print('> Jobs: {}; all completed: {}'.format(
        len(output), all(job['status'] == 'completed' for job in output)))
    print('> Processes that ran them: {}'.format(sorted({job['pid'] for job in output})))
    print('> Job {} after its timeout: {}'.format(late, killed['status']))


if __name__ == "__main__":   # Dask starts its workers with spawn: the guard is needed
    addresses = [a for a in sys.argv[1:] if not a.startswith("--")]
    if addresses:
        main(addresses[0])
    else:
        from distributed import LocalCluster
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster:
            main(cluster.scheduler_address)
