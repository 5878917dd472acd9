"""The in-flight limit: AIMD as TCP does it, never idle for a loss, and a learned ceiling.

Pure logic with an injected clock; the scheduler asks `may_issue(in_flight)` and reports
outcomes. Every change is returned as an event dict for the journal and the log.

- A **dropped** move (acknowledged, then nothing; or overtaken by a later one) halves the
  limit and issuing goes on at once at the new limit: TCP never stops sending after a
  loss, it sends at the smaller window. Losses of moves issued before the last cut
  belong to the same burst and cut nothing more (once per window, as TCP does).
- An explicit **refusal** for resources (C-MOVE 0xA7xx) halves the limit too and holds new
  moves for a growing cool-down, but only while moves of ours are still at the PACS: once
  none is, the PACS is idle as far as we can see, and the hold ends.
- After `recover_after` completes in a row the limit grows by one, up to `max_in_flight`.
- **Ceiling**: the limit at which moves were last lost. Growing to it again takes
  `recover_after × 2**(repeats-1)` completes (at most ×16) while losses repeat there; a
  limit that holds at or above it for `recover_after` completes lifts it (the PACS
  changed). A resumed run starts from the journal's last `snapshot()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_DOUBLINGS = 4  # probing above a ceiling is at most 16× rarer than recovering below it


@dataclass
class Throttle:
    max_in_flight: int
    recover_after: int
    pause_s: float
    cooldown_s: float
    clock: Callable[[], float]
    limit: int = 0
    streak: int = 0  # consecutive completes since the last loss or growth
    ceiling: int | None = None  # the limit at which moves were last lost
    repeats: int = 0  # losses in a row at that ceiling
    drops: int = 0  # moves dropped (acknowledged, nothing delivered), this journal
    refusals: int = 0  # moves refused for resources (0xA7xx), this journal
    cut_at: float = float("-inf")  # the last cut: losses of moves issued before it are the same burst
    hold_until: float = 0.0  # after a refusal: no new move while ours are at the PACS, until then
    hold_level: int = 0
    not_before: float = 0.0  # no new move before this time (pause_s)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.limit = self.limit or self.max_in_flight

    def may_issue(self, in_flight: int) -> bool:
        now = self.clock()
        if in_flight >= self.limit or now < self.not_before:
            return False
        if now < self.hold_until:
            if in_flight > 0:
                return False
            self.hold_until = 0.0  # nothing of ours at the PACS: it is idle, the hold is over
        return True

    def space(self, seconds: float) -> None:
        """No new move for `seconds` from now (a spacing; never shortens one already set)."""
        self.not_before = max(self.not_before, self.clock() + seconds)

    def issued(self) -> None:
        """A move was issued: the next waits at least `pause_s`."""
        self.not_before = max(self.not_before, self.clock() + self.pause_s)

    def completed(self) -> dict[str, Any] | None:
        """A series was proven complete: maybe lift the ceiling, maybe grow the limit by one."""
        self.streak += 1
        self.hold_level = 0
        lifted = self.ceiling is not None and self.limit >= self.ceiling and self.streak >= self.recover_after
        if lifted:
            self.ceiling, self.repeats = None, 0
        if self.limit < self.max_in_flight and self.streak >= self.needed():
            self.streak = 0
            return self._change(self.limit + 1, "recovered" + ("; ceiling lifted" if lifted else ""), "up")
        return self._change(self.limit, "ceiling lifted", "up") if lifted else None

    def needed(self) -> int:
        """Completes in a row before the limit may grow by one."""
        if self.ceiling is None or self.limit + 1 < self.ceiling:
            return self.recover_after
        return self.recover_after * 2 ** min(max(self.repeats - 1, 0), MAX_DOUBLINGS)

    def dropped(self, issued_at: float, why: str, at_limit: int | None = None) -> dict[str, Any]:
        """A move was acknowledged and dropped: halve (once per burst), keep issuing.

        `at_limit`: the limit when the move was issued; a drop found after the limit grew
        belongs to the limit it was sent under (that is the ceiling it proves).
        """
        self.drops += 1
        return self._loss(issued_at, why, at_limit)

    def refused(self, issued_at: float, why: str, at_limit: int | None = None) -> dict[str, Any]:
        """The PACS refused a move for resources: halve (once per burst) and hold while ours are there."""
        self.refusals += 1
        hold = self.cooldown_s * 2**self.hold_level
        self.hold_level += 1
        self.hold_until = max(self.hold_until, self.clock() + hold)
        change = self._loss(issued_at, why, at_limit)
        change["hold_s"] = hold
        return change

    def _loss(self, issued_at: float, why: str, at_limit: int | None) -> dict[str, Any]:
        self.streak = 0
        if issued_at < self.cut_at:  # sent before the last cut: the same burst
            return self._change(self.limit, why + " (same burst)", "down")
        level = self.limit if at_limit is None else max(1, min(self.limit, at_limit))
        if self.ceiling == level:
            self.repeats += 1
        else:
            self.ceiling, self.repeats = level, 1
        self.cut_at = self.clock()
        return self._change(max(1, level // 2), why, "down")

    def snapshot(self) -> dict[str, Any]:
        """What a resumed run starts from (recorded in the journal with every change)."""
        return {
            "limit": self.limit, "ceiling": self.ceiling, "repeats": self.repeats,
            "drops": self.drops, "refusals": self.refusals,
        }  # fmt: skip

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Start from a journal's last snapshot (limit kept within 1..max_in_flight)."""
        limit = snapshot.get("limit")
        if isinstance(limit, int):
            self.limit = max(1, min(self.max_in_flight, limit))
        ceiling = snapshot.get("ceiling")
        self.ceiling = ceiling if isinstance(ceiling, int) and ceiling <= self.max_in_flight else None
        self.repeats = int(snapshot.get("repeats") or 0) if self.ceiling is not None else 0
        self.drops = int(snapshot.get("drops") or 0)
        self.refusals = int(snapshot.get("refusals") or 0)

    def _change(self, new: int, why: str, kind: str) -> dict[str, Any]:
        """`kind`: "up" (grew back, or the ceiling lifted) or "down" (a loss); the report draws it."""
        old, self.limit = self.limit, new
        change = {"from": old, "to": new, "why": why, "kind": kind, **self.snapshot()}
        self.changes.append(change)
        return change
