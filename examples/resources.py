"""The resource view: per-job CPU seconds and peak memory, and utilisation.

Jobs that burn CPU, jobs that hold memory, jobs that only sleep.
    python examples/resources.py [--fast] [--plot]
"""
import os
import sys
import time

import ezpq_mgr as ezpq

SCALE = 0.1 if "--fast" in sys.argv else 1.0


def work(x):
    kind = x % 3
    if kind == 0:  # burn CPU
        end = time.process_time() + 0.5 * SCALE
        while time.process_time() < end:
            pass
    elif kind == 1:  # hold memory
        block = bytearray((20 + 10 * x) * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.3 * SCALE)
    else:  # sleep
        time.sleep(0.5 * SCALE)
    return ("cpu", "memory", "sleep")[kind]


with ezpq.Queue(2) as Q:
    for x in range(12):
        Q.put(work, x, name=("cpu", "memory", "sleep")[x % 3])
    Q.wait()
    output = Q.collect()

for job in output:
    print('{:>2} {:<6} cpu {:5.2f} s  peak {:6.1f} MiB'.format(
        job['id'], job['output'], job['cpu_user'] + job['cpu_system'], job['max_rss'] / 2**20))
if "--plot" in sys.argv:
    os.makedirs('docs/imgs', exist_ok=True)
    plot = ezpq.Plot(output)
    plot.resources(color_by='name').save('docs/imgs/resources.png', verbose=False, width=7, height=5)
    plot.utilization().save('docs/imgs/utilization.png', verbose=False, width=7, height=4)
    print('> Saved docs/imgs/resources.png, docs/imgs/utilization.png')
