"""Arrival proof: from what the destination holds and how the move went, decide.

Pure logic, no I/O: the scheduler gathers an `Observation`, `judge` returns a `Decision`.
A C-MOVE's success says nothing reliable about arrival; only the destination count does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    WAIT = "wait"  # keep watching
    ARRIVED = "arrived"  # proven complete
    SHORT = "short"  # will not complete by itself: retry or fail


@dataclass(frozen=True)
class Observation:
    """What is known about one in-flight series at time `now` (seconds, same clock)."""

    expected: int | None  # None: the source gave no count
    count: int  # instances of the series at the destination now
    issued_at: float
    last_growth_at: float  # when `count` last grew (issued_at if never)
    job_ended_at: float | None  # None while the move job runs
    job_succeeded: bool
    delivered: int  # instances that arrived since this attempt was issued
    now: float
    seen_at: float | None = None  # when `count` was read (None: at `now`)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    verified: str | None = None  # "count" | "stable-count"
    reason: str | None = None
    warning: str | None = None
    pacs_full: bool = False  # nothing delivered: the PACS may have dropped the move


def judge(obs: Observation, *, stall_s: float, deadline_s: float) -> Decision:
    """Decide one series. Never ARRIVED while the destination holds fewer than expected."""
    if obs.expected is not None and obs.count >= obs.expected:
        warning = None
        if obs.count > obs.expected:
            warning = f"received {obs.count} > expected {obs.expected}: the source gained instances"
        return Decision(Verdict.ARRIVED, verified="count", warning=warning)

    shown = f"{obs.count}/{obs.expected if obs.expected is not None else '?'}"
    nothing = obs.delivered == 0
    if obs.now - obs.issued_at >= deadline_s:
        return Decision(Verdict.SHORT, reason=f"short: {shown} (move timed out)", pacs_full=nothing)
    if obs.job_ended_at is None:
        return Decision(Verdict.WAIT)

    # A stall is proven by a count read stall_s after the last growth, never by time alone:
    # a controller that was not looking (starved, suspended) has seen no quiet.
    quiet_since = max(obs.last_growth_at, obs.job_ended_at)
    seen = obs.now if obs.seen_at is None else obs.seen_at
    if seen - quiet_since < stall_s:
        return Decision(Verdict.WAIT)
    if obs.expected is None and obs.job_succeeded and obs.count > 0:
        return Decision(Verdict.ARRIVED, verified="stable-count")
    return Decision(Verdict.SHORT, reason=f"short: {shown}", pacs_full=nothing)
