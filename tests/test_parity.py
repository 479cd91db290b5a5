"""ezpq 0.2.2's own unit tests (test/test_processes.py, test_threads.py), ported.

Run for both job runners and under fork and spawn.
"""

import random
from multiprocessing import Process
from threading import Thread

import pytest

import ezpq_mgr as ezpq
from jobs import reciprocal, return_me

N = 1000


@pytest.fixture(params=[Process, Thread], ids=["process", "thread"])
def Q(request, start_method):
    queue = ezpq.Queue(job_runner=request.param, auto_start=True, n_workers=5,
                       start_method=start_method)
    yield queue
    queue.dispose()


@pytest.fixture
def inputs():
    in_list = list(range(N))
    random.shuffle(in_list)
    return tuple(in_list)


def test_priority(Q, inputs):
    Q._stop()
    for i, x in enumerate(inputs):
        Q.put(function=return_me, args=x, priority=-i)  # should result in reversed inputs.
    Q.start()
    Q.wait()
    out_list = tuple(job['output'] for job in Q.collect())
    assert tuple(reversed(inputs)) == out_list


def test_map(Q, inputs):
    job_data = Q.map(function=return_me, iterable=inputs)
    assert inputs == tuple(job['output'] for job in job_data)


def test_starmap(Q, inputs):
    job_data = Q.starmap(function=return_me, iterable=[[x] for x in inputs])
    assert inputs == tuple(job['output'] for job in job_data)


def test_starmapkw(Q, inputs):
    job_data = Q.starmapkw(function=return_me, iterable=[{'x': x} for x in inputs])
    assert inputs == tuple(job['output'] for job in job_data)


def test_lanes(Q, inputs):
    for i, x in enumerate(inputs):
        Q.put(function=return_me, args=x, lane=i % Q.n_workers())  # returns in order
    Q.wait()
    assert inputs == tuple(x['output'] for x in Q.collect())


def test_lane_error(Q):
    for i in range(100):
        Q.put(reciprocal, random.randint(0, 5), lane=i % 5, suppress_errors=True,
              stop_on_lane_error=True)
    Q.wait()
    output = Q.collect()
    assert len(output) == 100
    # every job after a failure in its lane was skipped, with the failure's exit code
    by_lane = {}
    for job in sorted(output, key=lambda j: j['id']):
        by_lane.setdefault(job['lane'], []).append(job)
    # so a lane ran up to its first failing job (reciprocal(0)) and no further
    expected = sum(next((i + 1 for i, j in enumerate(jobs) if j['args'] == [0]), len(jobs))
                   for jobs in by_lane.values())
    started = [x for x in output if x['started'] is not None]
    assert len(started) == expected
    assert any(x['status'] == 'failed' for x in output)
    for jobs in by_lane.values():
        for prev, job in zip(jobs, jobs[1:]):
            if prev['exitcode'] not in (0, None):
                assert job['status'] == 'skipped' and job['cancelled']
                assert job['exitcode'] == prev['exitcode'] and job['started'] is None


def test_size(Q, inputs):
    for x in inputs:
        Q.put(function=return_me, args=x)
    sizes = [Q.size() for i in range(len(inputs)) for _ in [Q.get(wait=True)]]
    # numbers in `sizes` should decrement by 1 until reaching 0.
    assert sizes == list(reversed(range(len(inputs))))


def test_terminate(start_method, inputs):
    Q = ezpq.Queue(job_runner=Process, n_workers=5, start_method=start_method)
    try:
        for x in inputs:
            Q.put(function=return_me, args=x, priority=x)
        Q.stop_all()
        output = Q.collect()
        assert sorted(x['id'] for x in output) == list(range(1, len(inputs) + 1))
        assert {x['status'] for x in output} <= {'completed', 'cancelled'}
    finally:
        Q.dispose()


def test_empty(Q):
    assert Q.size() == 0
