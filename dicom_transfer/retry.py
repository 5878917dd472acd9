"""When a series is tried again.

A series that comes short for reasons of its own waits an exponential back-off with
jitter and spends an attempt. A move the PACS dropped or refused for resources (its
queue, not the series) goes back in line at once and spends nothing, up to
FREE_REQUEUES times a run; a series another run is moving is looked at again after
ELSEWHERE_WAIT_S. Pure logic: the scheduler writes the journal.
"""

from __future__ import annotations

import random

FREE_REQUEUES = 10  # losses (drops, refusals) of one series in a run that cost it no attempt
ELSEWHERE_WAIT_S = 2.0  # a series another run is moving (or arriving from elsewhere) is looked at again after this


class RetryPolicy:
    """Back-off for a series' own failures, free requeues for the PACS's, and the earliest retry due."""

    def __init__(self, backoff_s: float, backoff_max_s: float, rng: random.Random | None = None) -> None:
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.rng = rng or random.Random()
        self.next_due: float | None = None  # earliest `waiting_retry` known (kept in memory)
        self._losses: dict[str, int] = {}

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt `attempt + 1`: doubling from backoff_s, at most backoff_max_s, jittered."""
        base = min(self.backoff_max_s, self.backoff_s * (2 ** max(0, attempt - 1)))
        return base * (0.5 + self.rng.random() / 2)  # jitter: spread retries out

    def note(self, when: float | None) -> float | None:
        """A retry scheduled at `when` (kept as the earliest due if it is); returns `when`."""
        if when is not None and (self.next_due is None or when < self.next_due):
            self.next_due = when
        return when

    def free_requeue(self, uid: str) -> int | None:
        """Count one loss of `uid`; its number when it is still free, None once FREE_REQUEUES are spent."""
        n = self._losses[uid] = self._losses.get(uid, 0) + 1
        return n if n <= FREE_REQUEUES else None
