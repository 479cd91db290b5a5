"""The client side: what runs in the user's process.

``queue.py`` (``Queue``, ezpq's API), ``connection.py`` (reaching a server),
``embedded.py`` (starting a private server), ``jobdict.py`` (a finished
job as ezpq's dict, the CSV log), ``delivered.py`` (each result of a
durable server once per process), ``progress.py`` (the progress bar) and
``top.py`` (``ezpq top``'s live view).
Nothing here runs in the server or in a worker.
"""
