"""The ezpq_mgr exception family.

Every exception raised by ezpq_mgr on purpose is one of these (or a builtin
``TypeError``/``ValueError`` for bad arguments). They travel from the server
to clients inside pickled replies, so each one must survive a pickle round
trip: they keep their message in ``args`` and add no required arguments::

    Exception
    ├── EzpqError
    │   ├── QueueFull
    │   ├── ServerLimit
    │   ├── JobNotFound          (also LookupError)
    │   ├── ServerError
    │   ├── ConnectionError      (also builtin ConnectionError)
    │   │   └── AuthenticationError
    │   └── UnpicklableError     (also TypeError)
    └── ...
"""

import builtins

__all__ = [
    "EzpqError",
    "QueueFull",
    "ServerLimit",
    "JobNotFound",
    "ServerError",
    "ConnectionError",
    "AuthenticationError",
    "UnpicklableError",
]


class EzpqError(Exception):
    """Base class of every ezpq_mgr error."""


class QueueFull(EzpqError):
    """``put``/``submit`` past the queue's ``max_size``; nothing was enqueued."""


class ServerLimit(EzpqError):
    """A shared server's cap on what one user holds at once (clients,
    environments, queues) was reached; nothing was changed."""


class JobNotFound(EzpqError, LookupError):
    """No job with that id in this queue (or not one you may see)."""


class ServerError(EzpqError):
    """The server failed to start or answered with an internal error."""


class ConnectionError(EzpqError, builtins.ConnectionError):  # noqa: A001
    """No server at the address, or the server went away mid-call."""


class AuthenticationError(ConnectionError):
    """The server refused our authkey (or we refused its)."""


class UnpicklableError(EzpqError, TypeError):
    """A function, its arguments or its output cannot be pickled."""
