"""ezpq's ``Job`` + ``submit`` example: even numbers get a higher priority."""
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
        priority = x % 2  # give even numbers higher priority.
        job = ezpq.Job(random_sleep, args=x, priority=priority)
        Q.submit(job)
    Q.wait()
    output = Q.collect()

print('> First 10 collected (priority, id):', [(j['priority'], j['id']) for j in output[:10]])
if "--plot" in sys.argv:
    os.makedirs('docs/imgs', exist_ok=True)
    ezpq.Plot(output).build(color_by='priority').save('docs/imgs/submit.png', verbose=False)
    print('> Saved docs/imgs/submit.png')
