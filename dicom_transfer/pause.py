"""A party that cannot serve for now: the source unreachable, the destination full.

While paused nothing new is issued and no series spends an attempt (it was not the
series' fault). The party is probed on a capped, doubling back-off; a pause that lasts
longer than `transfer.unreachable_s` with nothing in flight stops the run (exit 3,
resumable). Pure logic with an injected clock: the scheduler does the probing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FIRST_PROBE_S = 1.0
LONGEST_PROBE_S = 30.0


@dataclass
class Pause:
    """One party's pause: since when, when to probe next, and why (for the log and the stop reason)."""

    party: str  # "source", "destination"
    clock: Callable[[], float]
    since: float | None = None
    probe_at: float | None = None
    wait: float = FIRST_PROBE_S
    why: str = ""

    def __bool__(self) -> bool:
        return self.since is not None

    def begin(self, why: str) -> bool:
        """Pause (or stay paused) for `why`; True when this starts a new pause (log it once)."""
        now = self.clock()
        new = self.since is None
        if new:
            self.since, self.wait = now, FIRST_PROBE_S
        elif self.probe_at is None:  # a trial after a probe failed again: wait longer
            self.wait = min(self.wait * 2, LONGEST_PROBE_S)
        self.why = why
        if self.probe_at is None:
            self.probe_at = now + self.wait
        return new

    def due(self, now: float) -> bool:
        """Paused, waiting for a probe, and the probe is due."""
        return self.since is not None and self.probe_at is not None and now >= self.probe_at

    def probe_failed(self, now: float) -> None:
        self.wait = min(self.wait * 2, LONGEST_PROBE_S)
        self.probe_at = now + self.wait

    def end(self) -> float:
        """The party serves again; returns how long the pause lasted."""
        lasted = self.clock() - (self.since or self.clock())
        self.since = self.probe_at = None
        self.why = ""
        return lasted

    def too_long(self, now: float, limit_s: float) -> bool:
        return self.since is not None and now - self.since > limit_s
