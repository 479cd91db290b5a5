"""Sending on a ``multiprocessing`` Connection without ForkingPickler.

``Connection.send`` pickles through ``ForkingPickler``, which copies the
copyreg dispatch table on every message (~1.3 us, more than pickling a small
message itself). Our hot messages (jobs to workers, results back, replies to
clients) are plain data, so plain ``pickle`` is enough. Wrapped connections
(the JSON serializer of shared servers) keep their own ``send``.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["send"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def send(conn: Any, obj: Any) -> None:
    if type(conn) is Connection:
        conn.send_bytes(pickle.dumps(obj, _PROTOCOL))
    else:
        conn.send(obj)
