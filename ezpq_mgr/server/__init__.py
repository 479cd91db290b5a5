"""The server side: the server process and everything that runs in it.

``main.py`` (the process), ``doorman.py``, ``outgoing.py``,
``connections.py`` and ``callers.py`` (connections and who calls),
``service.py`` (the requests; ``control.py`` its queue-control and
``top`` calls, ``live.py`` the running jobs' CPU % and RSS now), ``state.py`` with ``queues.py``,
``scheduling.py``, ``results.py`` and ``waits.py`` (the jobs),
``supervisor.py`` (the worker pool), ``accounting.py`` (the log),
``joblogs.py`` (each job's output), ``store.py`` (the durable journal)
and ``owndir.py`` (the directories the last two keep their files in). ``python -m ezpq_mgr.server
--embedded`` runs the private server of an embedded queue (``__main__.py``).
Imports nothing itself: a worker that imports ``ezpq_mgr`` pays for none of it.
"""
