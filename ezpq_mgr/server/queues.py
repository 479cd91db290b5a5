"""One queue's jobs as plain data: ``QueueInfo``, and the phases as constants.

A qid's settings, its heaps of waiting and completed jobs, its lanes, its
id -> seq map and its jobs counted per phase. Only ``QueueState._move``
(state.py) changes a count; scheduling.py orders the heaps.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, List, Tuple

from ..job import Phase

if TYPE_CHECKING:
    from .scheduling import Lane

__all__ = ["QueueInfo", "NEW", "WAITING", "RUNNING", "RETURNED", "HELD", "DONE", "GONE"]

# The phases as module constants: a class attribute of an Enum costs ~40 ns
# a lookup, and the hot path moves every job through five phases.
NEW, WAITING, RUNNING, RETURNED, HELD, DONE, GONE = Phase


@dataclasses.dataclass
class QueueInfo:
    """One qid: its settings and its jobs."""

    qid: str
    waiting: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    completed: List[Tuple[int, int, int]] = dataclasses.field(default_factory=list)
    ids: Dict[int, int] = dataclasses.field(default_factory=dict)   # id -> seq
    lanes: Dict[bytes, Lane] = dataclasses.field(default_factory=dict)
    next_id: int = 1
    #: jobs in each phase (indexed by Phase; kept by QueueState._move alone)
    count: List[int] = dataclasses.field(default_factory=lambda: [0] * len(Phase))
    n_submitted: int = 0               # ever accepted (NEW -> WAITING)
    n_completed: int = 0               # ever done (-> DONE)
    cap: int = 0                       # max concurrent jobs of this qid; 0 = none
    max_size: int = 0
    paused: bool = False
    auto_stop: bool = False
    auto_remove: bool = False
    holders: int = 0                   # open connections that use it (QueueState.hold_queue)

    @property
    def n_waiting(self) -> int:
        return self.count[WAITING]

    @property
    def n_running(self) -> int:
        return self.count[RUNNING]

    @property
    def n_working(self) -> int:
        """Running, returned or held: ezpq's "working" (not yet collectable)."""
        c = self.count
        return c[RUNNING] + c[RETURNED] + c[HELD]

    @property
    def n_done(self) -> int:
        """Done and not yet collected."""
        return self.count[DONE]

    @property
    def pending(self) -> int:
        return self.count[WAITING] + self.n_working
