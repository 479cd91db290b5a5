"""The client side: what runs in the user's process.

``queue.py`` (``Queue``, ezpq's API), ``connection.py`` (reaching a server),
``embedded.py`` (starting a private server), ``jobdict.py`` (a finished
job as ezpq's dict, the CSV log) and ``progress.py`` (the progress bar).
Nothing here runs in the server or in a worker.
"""
