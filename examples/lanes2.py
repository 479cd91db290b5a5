"""ezpq's lanes with timeouts: 60 jobs in 5 lanes, each killed past 1 s."""
import os
import random
import sys
import time

import ezpq_mgr as ezpq

SCALE = 0.1 if "--fast" in sys.argv else 1.0


def random_sleep(x):
    random.seed(x)
    n = random.uniform(0.5, 1.5) * SCALE
    time.sleep(n)
    return n


with ezpq.Queue(6) as Q:
    for x in range(60):
        lane = x % 5
        Q.put(random_sleep, x, timeout=1 * SCALE, lane=lane)
    Q.wait()
    output = Q.collect()

print('> Statuses:', {s: sum(j['status'] == s for j in output) for s in sorted({j['status'] for j in output})})
if "--plot" in sys.argv:
    os.makedirs('docs/imgs', exist_ok=True)
    plt = ezpq.Plot(output).build(facet_by='lane', show_legend=False)
    plt.save('docs/imgs/lanes2.png', verbose=False)
    print('> Saved docs/imgs/lanes2.png')
