"""Adaptive in-flight limit (AIMD, as TCP does): halve on "PACS is full", grow back slowly.

Pure logic with an injected clock; the scheduler asks `may_issue(in_flight)` and reports
outcomes. Every change is returned as an event dict for the journal and the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Throttle:
    max_in_flight: int
    recover_after: int
    pause_s: float
    cooldown_s: float
    clock: Callable[[], float]
    limit: int = 0
    streak: int = 0  # consecutive completes since the last "full"
    cooldown_level: int = 0
    not_before: float = 0.0  # no new move before this time (pause or cool-down)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.limit = self.limit or self.max_in_flight

    def may_issue(self, in_flight: int) -> bool:
        return in_flight < self.limit and self.clock() >= self.not_before

    def issued(self) -> None:
        """A move was issued: the next waits at least `pause_s`."""
        self.not_before = max(self.not_before, self.clock() + self.pause_s)

    def completed(self) -> dict[str, Any] | None:
        """A series was proven complete; after `recover_after` in a row the limit grows by one."""
        self.streak += 1
        self.cooldown_level = 0
        if self.streak >= self.recover_after and self.limit < self.max_in_flight:
            self.streak = 0
            return self._change(self.limit + 1, "recovered")
        return None

    def cooling(self) -> bool:
        """In a cool-down: a further "full" now belongs to the same burst (halve once per burst)."""
        return self.clock() < self.not_before and self.cooldown_level > 0

    def full(self, why: str, since: float | None = None) -> dict[str, Any]:
        """The PACS refused for resources or dropped a move: halve, and cool down longer each time.

        `since`: when the PACS was last seen working (the cool-down counts from then, so a
        PACS already idle is not left waiting a second time).
        """
        self.streak = 0
        self.cooldown_level += 1
        wait = self.cooldown_s * (2 ** (self.cooldown_level - 1))
        start = self.clock() if since is None else min(self.clock(), since)
        self.not_before = max(self.not_before, start + wait)
        change = self._change(max(1, self.limit // 2), why)
        change["cooldown_s"] = wait
        return change

    def _change(self, new: int, why: str) -> dict[str, Any]:
        old, self.limit = self.limit, new
        change = {"from": old, "to": new, "why": why}
        self.changes.append(change)
        return change
