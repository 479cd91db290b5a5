"""ezpq's quickstart, run with ezpq_mgr: 60 jobs of 0.5-1.5 s on 6 workers.

    python examples/quickstart.py          # ~10 s
    python examples/quickstart.py --fast   # sleeps scaled down 10x
"""
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


start = time.time()
with ezpq.Queue(6) as Q:
    output = Q.map(random_sleep, range(60))
end = time.time()
print('> Runtime: ' + str(end - start))

print('> Jobs: {}; all completed: {}'.format(
    len(output), all(job['status'] == 'completed' for job in output)))
print('> First job:', {k: output[0][k] for k in ('id', 'output', 'runtime', 'exitcode', 'cpu_user', 'max_rss')})

try:
    import pandas as pd
except ImportError:
    sys.exit(0)
df = pd.DataFrame(output)
print(df.head()[['id', 'output', 'runtime', 'exitcode']])

if "--plot" in sys.argv:
    os.makedirs('docs/imgs', exist_ok=True)
    plt = ezpq.Plot(output).build(show_legend=False)
    plt.save('docs/imgs/quickstart.png', verbose=False)
    print('> Saved docs/imgs/quickstart.png')
