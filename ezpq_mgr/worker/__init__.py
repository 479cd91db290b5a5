"""The worker side: what runs in a worker process.

``run.py`` (a worker's loop: run one job, send its result; also a thread
job on a server thread), ``workerproto.py`` (the worker channel's bytes),
``meter.py`` (measuring a job and a worker) and ``procutil.py`` (process
trees: kill, reap, subreaper).
The supervisor (server side) starts workers and speaks ``workerproto``.
"""
