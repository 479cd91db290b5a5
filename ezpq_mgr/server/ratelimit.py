"""Log lines that someone else decides the rate of (a peer, a job, a Dask
worker through the bridge): at most a burst, then a steady trickle, with
what was dropped counted in the next line that gets through, so that nobody
can fill the server's log or spend its time on writing it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most ``burst`` lines, refilled at ``rate`` per second; what was
    dropped is counted in the next line that gets through."""

    def __init__(self, log: logging.Logger, rate: float = 5.0, burst: int = 20):
        self._log, self._rate, self._burst = log, rate, burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._dropped = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                self._dropped += 1
                return
            self._tokens -= 1
            dropped, self._dropped = self._dropped, 0
        if dropped:
            msg += " (%d similar lines suppressed)"
            args += (dropped,)
        self._log.log(level, msg, *args)
