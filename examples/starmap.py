"""ezpq's ``starmap`` example."""
import ezpq_mgr as ezpq


def my_pow(x, k):
    return '{}^{} = {}'.format(x, k, x**k)


# list of lists to iterate over.
args_list = [[x, x % 4]  # (x, k)
             for x in range(100)]
# starmap
with ezpq.Queue(10) as Q:
    output = Q.starmap(my_pow, iterable=args_list)

print([x['output'] for x in output[:10]])
