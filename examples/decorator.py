"""ezpq's decorator example: ``@ezpq.Queue(6)`` maps the function over an iterable."""
import random
import sys
import time

import ezpq_mgr as ezpq

SCALE = 0.1 if "--fast" in sys.argv else 1.0


@ezpq.Queue(6)
def random_sleep(x):
    random.seed(x)
    n = random.uniform(0.5, 1.5) * SCALE
    time.sleep(n)
    return n


output = random_sleep(iterable=range(60))
print('> Jobs: {}; outputs in input order: {}'.format(
    len(output), [job['args'][0] for job in output] == list(range(60))))
