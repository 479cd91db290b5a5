"""ezpq_mgr: an easy parallel queueing system, served by a manager server.

``import ezpq_mgr as ezpq`` runs ezpq 0.2.2's examples unchanged.
"""

from .client.queue import Queue
from .errors import (AuthenticationError, ConnectionError, EzpqError, JobNotFound,
                     QueueFull, ServerError, ServerLimit, UnpicklableError)
from .job import Job, JobStatus
from .plot import Plot, to_dataframe

__version__ = "0.3.0"

__all__ = [
    "Queue", "Job", "JobStatus", "Plot", "to_dataframe",
    "EzpqError", "QueueFull", "JobNotFound", "ServerError", "ServerLimit", "ConnectionError",
    "AuthenticationError", "UnpicklableError", "__version__",
]
