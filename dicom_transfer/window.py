"""Time windows: when new moves may be issued. The clock is injected (epoch seconds).

A window opens at `start` local time on each listed day and closes at `end`; an end at or
before the start wraps to the next day (Friday 20:00 → Saturday 07:00 is Friday's window).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Window:
    start: time
    end: time
    timezone: str
    days: tuple[str, ...] = DAYS

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _span(self, day: date) -> tuple[float, float]:
        """Epoch seconds of the window that starts on `day` (local), wall-clock times."""
        end_day = day if self.end > self.start else day + timedelta(days=1)
        return self._instant(day, self.start), self._instant(end_day, self.end)

    def _instant(self, day: date, wall: time) -> float:
        """When the local clock first reads `wall` or later on `day`.

        A wall time skipped by a spring DST change maps to the jump itself; a repeated one
        (autumn) to its first occurrence.
        """
        naive = datetime.combine(day, wall)
        t0 = naive.replace(tzinfo=self.tz).timestamp()  # fold=0
        if datetime.fromtimestamp(t0, self.tz).replace(tzinfo=None) == naive:
            return t0
        lo, hi = int(naive.replace(tzinfo=self.tz, fold=1).timestamp()), int(t0)  # the jump is in (lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, self.tz).replace(tzinfo=None) >= naive:
                hi = mid
            else:
                lo = mid + 1
        return float(lo)

    def _spans_near(self, now: float, ahead_days: int = 8) -> list[tuple[float, float]]:
        today = datetime.fromtimestamp(now, self.tz).date()
        spans = []
        for offset in range(-1, ahead_days):
            day = today + timedelta(days=offset)
            if DAYS[day.weekday()] in self.days:
                spans.append(self._span(day))
        return spans

    def spans(self, a: float, b: float) -> list[tuple[float, float]]:
        """The windows (start, end) that overlap [a, b], in order."""
        days = int((b - a) // 86400) + 2
        return sorted({(s, e) for s, e in self._spans_near(a, days) if e > a and s < b})

    def is_open(self, now: float) -> bool:
        return any(a <= now < b for a, b in self._spans_near(now, 1))

    def closes_at(self, now: float) -> float | None:
        """End of the window open at `now`, or None when closed."""
        ends = [b for a, b in self._spans_near(now, 1) if a <= now < b]
        return max(ends) if ends else None

    def next_open(self, now: float) -> float:
        """`now` if open, else the start of the next window."""
        if self.is_open(now):
            return now
        starts = [a for a, _ in self._spans_near(now) if a > now]
        if not starts:
            raise ValueError("window never opens (no days listed)")
        return min(starts)
