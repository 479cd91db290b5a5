"""ezpq's lane error handling: stop a lane after a job fails."""
import os
import random
import sys
import time

import ezpq_mgr as ezpq

SCALE = 0.1 if "--fast" in sys.argv else 1.0


def reciprocal(x):
    time.sleep(0.1 * SCALE)  # slow things down
    return 1/x      # will throw DivideByZero exception


with ezpq.Queue(6) as Q:
    for i in range(100):
        Q.put(reciprocal, random.randint(0, 10), lane=i % 5, suppress_errors=True, stop_on_lane_error=True)
    Q.wait()
    output = Q.collect()

print('> Statuses:', {s: sum(j['status'] == s for j in output) for s in sorted({j['status'] for j in output})})
if "--plot" in sys.argv:
    os.makedirs('docs/imgs', exist_ok=True)
    plt = ezpq.Plot(output).build(facet_by='lane', color_by='exitcode', color_pal=['red', 'blue'])
    plt.save('docs/imgs/lane_error.png', verbose=False)
    print('> Saved docs/imgs/lane_error.png')
