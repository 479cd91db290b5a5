"""A user's main script, run by tests/test_clients.py as ``python client_matrix.py
LOCATION [ADDRESS KEYFILE]``: it defines a function, a lambda, a closure and a
class in its ``__main__`` and runs them on an ezpq_mgr queue from LOCATION (the
script itself, a spawn/forkserver/fork child, a ProcessPoolExecutor or
multiprocessing.Pool worker, a thread). Prints one JSON line: the outputs.
"""

import concurrent.futures
import json
import multiprocessing
import sys
import threading

import ezpq_mgr as ezpq


def square(x):
    return x * x


cube = lambda x: x ** 3  # noqa: E731 (a lambda is the point)


def make_adder(k):
    def add(x):
        return x + k
    return add


class Box:
    """An instance of a main-script class, as an argument and as a callable."""

    def __init__(self, value):
        self.value = value

    def __call__(self, x):
        return self.value * x


def unbox(box):
    return box.value + 1


def run_all(address=None, keyfile=None):
    """Each kind of main-script object as a job; their outputs, in order."""
    kw = {}
    if address:
        kw = {"address": address, "authkey": open(keyfile, "rb").read().strip()}
    with ezpq.Queue(2, **kw) as Q:
        ids = [Q.put(square, 3), Q.put(cube, 3), Q.put(make_adder(10), 3),
               Q.put(unbox, [Box(41)]), Q.put(Box(5), 3)]
        Q.wait()
        jobs = {j["id"]: j for j in Q.collect()}
    return [[jobs[i]["status"], jobs[i]["output"], jobs[i]["exception"]] for i in ids]


def _into(out, address, keyfile):
    out.put(run_all(address, keyfile))


def main():
    location = sys.argv[1]
    address, keyfile = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else (None, None)
    if location == "main":
        result = run_all(address, keyfile)
    elif location in ("spawn", "forkserver", "fork"):
        ctx = multiprocessing.get_context(location)
        out = ctx.Queue()
        p = ctx.Process(target=_into, args=(out, address, keyfile))
        p.start()
        result = out.get(timeout=60)
        p.join(10)
    elif location == "fork_with_queue":
        # the parent holds a live Queue while fork children make their own:
        # each child must get its own connection (no crossed replies)
        kw = {}
        if address:
            kw = {"address": address, "authkey": open(keyfile, "rb").read().strip()}
        ctx = multiprocessing.get_context("fork")
        with ezpq.Queue(1, **kw) as Q:
            Q.put(square, 7)
            out = ctx.Queue()
            children = [ctx.Process(target=_into, args=(out, address, keyfile)) for _ in range(2)]
            for p in children:
                p.start()
            mine = Q.get(wait=True, timeout=60)
            results = [out.get(timeout=60) for _ in children]
            for p in children:
                p.join(10)
        assert mine["output"] == 49, mine
        assert results[0] == results[1], results
        result = results[0]
    elif location == "ppe":
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            result = ex.submit(run_all, address, keyfile).result(timeout=60)
    elif location == "pool":
        with multiprocessing.get_context("forkserver").Pool(1) as pool:
            result = pool.apply(run_all, (address, keyfile))
    elif location == "thread":
        box = []
        t = threading.Thread(target=lambda: box.append(run_all(address, keyfile)))
        t.start()
        t.join(60)
        result = box[0]
    else:
        raise SystemExit(f"unknown location {location!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
