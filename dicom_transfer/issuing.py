"""Whether a new move may go out now: the in-flight limit, the time window, the parties' pauses.

`IssuePolicy` gathers what gates issuing: the throttle (`throttle.py`: the limit, a pause
between moves, a refusal's hold), the time window (`window.py`), and a pause per party
(`pause.py`: the source unreachable, the destination full). It decides; the scheduler
probes the parties and writes the journal.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import TransferConfig, WindowConfig
from .pause import Pause
from .throttle import Throttle
from .window import Window


class IssuePolicy:
    """The gates in front of every new move."""

    def __init__(self, t: TransferConfig, window: WindowConfig | None, clock: Callable[[], float]) -> None:
        self.unreachable_s = t.unreachable_s
        self.throttle = Throttle(
            max_in_flight=t.max_in_flight, recover_after=t.recover_after, pause_s=t.pause_s,
            cooldown_s=t.cooldown_s, clock=clock,
        )  # fmt: skip
        self.window = Window(window.start, window.end, window.timezone, window.days) if window else None
        self.source = Pause("source", clock)  # the source stopped answering (association failures)
        self.destination = Pause("destination", clock)  # the destination stores nothing (full)

    def window_open(self, now: float) -> bool:
        return self.window is None or self.window.is_open(now)

    def wakeups(self, now: float, open_now: bool) -> list[float | None]:
        """When a gate may open by itself (for the idle loop's sleep)."""
        times: list[float | None] = [self.throttle.not_before, self.source.probe_at, self.destination.probe_at]
        if not open_now and self.window is not None:
            times.append(self.window.next_open(now))
        return times

    def gone_too_long(self, now: float) -> str | None:
        """The stop reason once the source (or the destination) has been out longer than unreachable_s."""
        if self.source.too_long(now, self.unreachable_s):
            return f"the source did not answer for {now - (self.source.since or now):.0f} s"
        if self.destination.too_long(now, self.unreachable_s):
            since = self.destination.since or now
            return f"the destination stored nothing for {now - since:.0f} s ({self.destination.why})"
        return None
