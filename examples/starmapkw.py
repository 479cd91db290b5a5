"""ezpq's ``starmapkw`` example."""
import ezpq_mgr as ezpq


def my_pow(x, k):
    return '{}^{} = {}'.format(x, k, x**k)


# list of dicts to iterate over.
kwargs_list = [{'x': x, 'k': x % 4}  # (x, k)
               for x in range(100)]
# starmapkw
with ezpq.Queue(10) as Q:
    output = Q.starmapkw(my_pow, iterable=kwargs_list)

print([x['output'] for x in output[:10]])
