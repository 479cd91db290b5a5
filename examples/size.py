"""ezpq's ``size`` example: print the queue's sizes until it is done."""
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


def print_sizes(Q):
    msg = 'Total: {0}; Waiting: {1}; Working: {2}; Completed: {3}'.format(
        Q.size(),
        Q.size(waiting=True),
        Q.size(working=True),
        Q.size(completed=True)
    )
    print(msg)


with ezpq.Queue(6) as Q:
    # enqueue jobs
    for x in range(60):
        Q.put(random_sleep, x)
    # repeatedly print sizes until complete.
    while Q.size(waiting=True, working=True):
        print_sizes(Q)
        time.sleep(1 * SCALE)
    print_sizes(Q)
