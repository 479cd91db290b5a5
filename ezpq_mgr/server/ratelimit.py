"""Rates that someone else decides (a peer, a job, a Dask worker through
the bridge): a token bucket (at most a burst, then a steady trickle), and
log lines kept to one, with what was dropped counted in the next line that
gets through, so that nobody can fill the server's log or spend its time
on writing it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["TokenBucket", "RateLimitedLog"]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second. Not locked: one
    thread uses it, or its owner locks."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; False (nothing
        spent) when there are not."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True


class RateLimitedLog:
    """At most ``burst`` lines, refilled at ``rate`` per second; what was
    dropped is counted in the next line that gets through."""

    def __init__(self, log: logging.Logger, rate: float = 5.0, burst: int = 20):
        self._log = log
        self._bucket = TokenBucket(rate, burst)
        self._dropped = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            if not self._bucket.take():
                self._dropped += 1
                return
            dropped, self._dropped = self._dropped, 0
        if dropped:
            msg += " (%d similar lines suppressed)"
            args += (dropped,)
        self._log.log(level, msg, *args)
