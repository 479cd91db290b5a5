"""ezpq's ``map`` and ``wait`` with tqdm progress bars."""
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
    output = Q.map(random_sleep, range(60), show_progress=True)

with ezpq.Queue(6) as Q:
    for x in range(60):
        Q.put(random_sleep, x)
    Q.wait(show_progress=True)
    output += Q.collect()
print('> Jobs: {}'.format(len(output)))
