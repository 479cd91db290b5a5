"""ezpq's synchronous lanes: jobs of one lane run one at a time, in order."""
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
        Q.put(random_sleep, x, lane=x % 5)
    Q.wait()
    output = Q.collect()

by_lane = {}
for job in output:
    by_lane.setdefault(job['lane'], []).append((job['started'], job['ended']))
overlap = any(a[1] > b[0] for spans in by_lane.values()
              for a, b in zip(sorted(spans), sorted(spans)[1:]))
print('> Lanes: {}; any overlap within a lane: {}'.format(sorted(by_lane), overlap))
if "--plot" in sys.argv:
    os.makedirs('docs/imgs', exist_ok=True)
    ezpq.Plot(output).build(color_by='lane', show_legend=False).save('docs/imgs/lanes.png', verbose=False)
    print('> Saved docs/imgs/lanes.png')
