"""Time windows with an injected epoch-second clock: overnight, day lists, DST (pure)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest

from dicom_transfer.window import DAYS, Window

ZURICH = "Europe/Zurich"
TZ = ZoneInfo(ZURICH)
HOUR = 3600.0

# A plain week in May 2026 (no DST change): Monday 4th .. Monday 11th.
MON, THU, FRI, SAT, SUN, NEXT_MON = (date(2026, 5, d) for d in (4, 7, 8, 9, 10, 11))
NEXT_FRI = date(2026, 5, 15)
# Europe/Zurich DST changes in 2026 (last Sundays of March and October).
SPRING = date(2026, 3, 29)  # 02:00 CET → 03:00 CEST: 02:xx does not exist
AUTUMN = date(2026, 10, 25)  # 03:00 CEST → 02:00 CET: 02:xx happens twice


def at(day: date, hh: int, mm: int = 0, *, fold: int = 0, tz: ZoneInfo = TZ) -> float:
    """Epoch seconds of a local wall-clock time (fold=1: the second of a repeated hour)."""
    return datetime.combine(day, time(hh, mm), tzinfo=tz).replace(fold=fold).timestamp()


def local(epoch: float, tz: ZoneInfo = TZ) -> datetime:
    return datetime.fromtimestamp(epoch, tz)


def overnight(days: tuple[str, ...] = DAYS) -> Window:
    return Window(time(20, 0), time(7, 0), ZURICH, days)


def test_calendar_assumptions():
    """The dates used below fall on the weekdays the tests name (guards the fixtures)."""
    names = " ".join(d.strftime("%a") for d in (MON, THU, FRI, SAT, SUN, NEXT_MON, NEXT_FRI))
    assert names == "Mon Thu Fri Sat Sun Mon Fri"
    assert SPRING.strftime("%a") == "Sun" and AUTUMN.strftime("%a") == "Sun"
    assert datetime.combine(SPRING, time(1, 59), tzinfo=TZ).utcoffset() == timedelta(hours=1)
    assert datetime.combine(SPRING, time(3, 0), tzinfo=TZ).utcoffset() == timedelta(hours=2)
    assert at(AUTUMN, 2, 30, fold=1) - at(AUTUMN, 2, 30, fold=0) == HOUR


# -- overnight window -------------------------------------------------------------------------


def test_overnight_open_late_evening_and_early_morning():
    """20:00–07:00 is open at 20:00, 23:00, 00:00 and 06:59."""
    w = overnight()
    for t in (at(THU, 20), at(THU, 23), at(FRI, 0), at(FRI, 6, 59), at(FRI, 6, 59) + 59.999):
        assert w.is_open(t), local(t)


def test_overnight_closed_from_end_to_start():
    """20:00–07:00 is closed at 07:00 (end is exclusive), 12:00 and 19:59."""
    w = overnight()
    for t in (at(FRI, 7), at(FRI, 12), at(FRI, 19, 59), at(FRI, 20) - 0.001):
        assert not w.is_open(t), local(t)


def test_overnight_closes_at_next_morning():
    """closes_at while open is the next 07:00 (from the evening) or today's 07:00 (from the night)."""
    w = overnight()
    assert w.closes_at(at(THU, 23)) == at(FRI, 7)
    assert w.closes_at(at(FRI, 6)) == at(FRI, 7)
    assert w.closes_at(at(THU, 20)) == at(FRI, 7)


def test_closes_at_is_none_when_closed():
    """closes_at is None outside the window."""
    w = overnight()
    assert w.closes_at(at(FRI, 12)) is None
    assert w.closes_at(at(FRI, 7)) is None


def test_next_open_from_closed_time_is_next_start():
    """next_open from a closed time is the next 20:00; from an open time it is now."""
    w = overnight()
    assert w.next_open(at(FRI, 12)) == at(FRI, 20)
    assert w.next_open(at(FRI, 7)) == at(FRI, 20)
    assert w.next_open(at(FRI, 23)) == at(FRI, 23)


# -- day lists ----------------------------------------------------------------------------


def test_friday_window_runs_into_saturday_morning():
    """days=[fri]: Friday 20:00 → Saturday 07:00 is open (the window belongs to its start day)."""
    w = overnight(("fri",))
    for t in (at(FRI, 20), at(FRI, 23), at(SAT, 0), at(SAT, 3), at(SAT, 6, 59)):
        assert w.is_open(t), local(t)
    assert w.closes_at(at(SAT, 3)) == at(SAT, 7)


def test_friday_window_closed_other_nights():
    """days=[fri]: Saturday 21:00, Thursday 23:00, Friday 06:00 and Saturday 07:00 are closed."""
    w = overnight(("fri",))
    for t in (at(SAT, 21), at(THU, 23), at(FRI, 6), at(SAT, 7), at(FRI, 19, 59)):
        assert not w.is_open(t), local(t)


def test_friday_window_next_open():
    """days=[fri]: from Thursday 23:00 the next start is Friday 20:00; from Saturday 08:00, next Friday's."""
    w = overnight(("fri",))
    assert w.next_open(at(THU, 23)) == at(FRI, 20)
    assert w.next_open(at(SAT, 8)) == at(NEXT_FRI, 20)
    assert w.next_open(at(FRI, 20)) == at(FRI, 20)


def test_last_day_of_week_wraps_into_monday():
    """days=[sun] (the last day): Sunday 22:00 and Monday 06:00 are open, Monday 07:00 closed."""
    w = overnight(("sun",))
    assert w.is_open(at(SUN, 22))
    assert w.is_open(at(NEXT_MON, 6))
    assert w.closes_at(at(NEXT_MON, 6)) == at(NEXT_MON, 7)
    assert not w.is_open(at(NEXT_MON, 7))
    assert not w.is_open(at(NEXT_MON, 22))  # Monday is not a start day
    assert not w.is_open(at(SUN, 6))  # Saturday is not a start day: Saturday→Sunday is closed
    assert not w.is_open(at(SAT, 23))


def test_weekend_list_ending_on_sunday():
    """days=[fri, sat, sun]: every night from Friday 20:00 to Monday 07:00 is open, not Monday night."""
    w = overnight(("fri", "sat", "sun"))
    for t in (at(FRI, 21), at(SAT, 3), at(SAT, 22), at(SUN, 3), at(SUN, 22), at(NEXT_MON, 6, 59)):
        assert w.is_open(t), local(t)
    for t in (at(SAT, 12), at(SUN, 12), at(NEXT_MON, 7), at(NEXT_MON, 21), at(THU, 23)):
        assert not w.is_open(t), local(t)


def test_weekday_window_from_friday_evening_sleeps_over_the_weekend():
    """days mon..fri: after Saturday 07:00 the next start is Monday 20:00."""
    w = overnight(("mon", "tue", "wed", "thu", "fri"))
    assert w.is_open(at(SAT, 6))
    assert not w.is_open(at(SUN, 23))
    assert w.next_open(at(SAT, 7)) == at(NEXT_MON, 20)


def test_no_days_never_opens():
    """An empty day list is never open, and next_open says so instead of looping."""
    w = overnight(())
    assert not w.is_open(at(FRI, 23))
    with pytest.raises(ValueError):
        w.next_open(at(FRI, 12))


# -- same-day window ------------------------------------------------------------------------


def test_same_day_window():
    """08:00–17:00 is open from 08:00 to 16:59 and closed before, after and overnight."""
    w = Window(time(8, 0), time(17, 0), ZURICH)
    for t in (at(FRI, 8), at(FRI, 12), at(FRI, 16, 59)):
        assert w.is_open(t), local(t)
    for t in (at(FRI, 7, 59), at(FRI, 17), at(FRI, 23), at(SAT, 2)):
        assert not w.is_open(t), local(t)


def test_same_day_window_closes_and_reopens():
    """08:00–17:00: closes_at is today's 17:00; next_open is today's or tomorrow's 08:00."""
    w = Window(time(8, 0), time(17, 0), ZURICH)
    assert w.closes_at(at(FRI, 10)) == at(FRI, 17)
    assert w.next_open(at(FRI, 7)) == at(FRI, 8)
    assert w.next_open(at(FRI, 17, 30)) == at(SAT, 8)


def test_same_day_window_on_fridays_only():
    """08:00–17:00 on [fri]: Saturday is closed and the next open after Friday is next Friday 08:00."""
    w = Window(time(8, 0), time(17, 0), ZURICH, ("fri",))
    assert w.is_open(at(FRI, 9))
    assert not w.is_open(at(SAT, 9))
    assert w.next_open(at(FRI, 18)) == at(NEXT_FRI, 8)


# -- time zones -----------------------------------------------------------------------------


def test_timezone_decides_wall_clock():
    """The same instant is judged on the window's own wall clock (Zurich 23:00 = New York 17:00)."""
    t = at(THU, 23)
    assert overnight().is_open(t)
    new_york = Window(time(20, 0), time(7, 0), "America/New_York")
    assert not new_york.is_open(t)
    assert new_york.next_open(t) == at(THU, 20, tz=ZoneInfo("America/New_York"))


def test_unknown_timezone_raises():
    """An unknown IANA name fails loudly (never silently UTC)."""
    w = Window(time(20, 0), time(7, 0), "Mars/Olympus_Mons")
    with pytest.raises(ZoneInfoNotFoundError):
        w.is_open(at(FRI, 12))


# -- DST ------------------------------------------------------------------------------------


def test_spring_forward_night_is_one_hour_shorter():
    """Saturday 28 March 20:00 CET → Sunday 29 March 07:00 CEST is 10 h, not 11 h."""
    w = overnight(("sat",))
    opens = w.next_open(at(SPRING - timedelta(days=1), 12))
    assert opens == at(SPRING - timedelta(days=1), 20)
    closes = w.closes_at(opens)
    assert closes == at(SPRING, 7)
    assert closes - opens == 10 * HOUR
    assert local(closes).strftime("%H:%M %Z") == "07:00 CEST"


def test_spring_forward_night_open_and_closed_at_wall_clock():
    """Across the spring change the window is open through the jump and closes at 07:00 CEST."""
    w = overnight()
    sat = SPRING - timedelta(days=1)
    for t in (at(sat, 20), at(SPRING, 1, 59), at(SPRING, 3), at(SPRING, 6, 59)):
        assert w.is_open(t), local(t)
    for t in (at(sat, 19, 59), at(SPRING, 7), at(SPRING, 12)):
        assert not w.is_open(t), local(t)
    # The jump itself: one second before 02:00 CET and the first second of CEST are both open.
    jump = at(SPRING, 3)
    assert local(jump - 1).strftime("%H:%M:%S %Z") == "01:59:59 CET"
    assert w.is_open(jump - 1) and w.is_open(jump)


def test_fall_back_night_is_one_hour_longer():
    """Saturday 24 October 20:00 CEST → Sunday 25 October 07:00 CET is 12 h, not 11 h."""
    w = overnight(("sat",))
    sat = AUTUMN - timedelta(days=1)
    opens = w.next_open(at(sat, 12))
    assert opens == at(sat, 20)
    closes = w.closes_at(opens)
    assert closes == at(AUTUMN, 7)
    assert closes - opens == 12 * HOUR
    assert local(closes).strftime("%H:%M %Z") == "07:00 CET"


def test_fall_back_night_open_during_both_repeated_hours():
    """Across the autumn change both 02:30s are open and the window closes at 07:00 CET."""
    w = overnight()
    sat = AUTUMN - timedelta(days=1)
    for t in (at(sat, 20), at(AUTUMN, 2, 30, fold=0), at(AUTUMN, 2, 30, fold=1), at(AUTUMN, 6, 59)):
        assert w.is_open(t), local(t)
    for t in (at(sat, 19, 59), at(AUTUMN, 7), at(AUTUMN, 12)):
        assert not w.is_open(t), local(t)
    assert w.closes_at(at(AUTUMN, 2, 30, fold=1)) == at(AUTUMN, 7)


def test_nights_after_the_changes_are_eleven_hours():
    """The Sunday-night windows after each change (no change inside) are 11 h again."""
    w = overnight(("sun",))
    for sunday in (SPRING, AUTUMN):
        opens = w.next_open(at(sunday, 12))
        assert opens == at(sunday, 20)
        assert w.closes_at(opens) - opens == 11 * HOUR


def test_small_hours_window_across_spring_change():
    """01:00–05:00 on 29 March lasts 3 h (01:00 CET → 05:00 CEST) and is open right after the jump."""
    w = Window(time(1, 0), time(5, 0), ZURICH)
    opens = w.next_open(at(SPRING, 0, 30))
    assert opens == at(SPRING, 1)
    assert w.closes_at(opens) == at(SPRING, 5)
    assert w.closes_at(opens) - opens == 3 * HOUR
    assert w.is_open(at(SPRING, 3))
    assert not w.is_open(at(SPRING, 5))


def test_small_hours_window_across_fall_change():
    """01:00–05:00 on 25 October lasts 5 h (01:00 CEST → 05:00 CET), open in both 02:xx hours."""
    w = Window(time(1, 0), time(5, 0), ZURICH)
    opens = w.next_open(at(AUTUMN, 0, 30))
    assert opens == at(AUTUMN, 1)
    assert w.closes_at(opens) - opens == 5 * HOUR
    assert w.is_open(at(AUTUMN, 2, 15, fold=0)) and w.is_open(at(AUTUMN, 2, 15, fold=1))
    assert not w.is_open(at(AUTUMN, 5))


def test_end_in_repeated_hour_closes_at_first_occurrence():
    """22:00–02:30 on the autumn night closes at the first 02:30 (CEST): 4.5 h."""
    w = Window(time(22, 0), time(2, 30), ZURICH)
    sat = AUTUMN - timedelta(days=1)
    assert w.closes_at(at(sat, 23)) == at(AUTUMN, 2, 30, fold=0)
    assert not w.is_open(at(AUTUMN, 2, 30, fold=1))


def test_start_in_spring_gap_opens_at_the_jump():
    """A window starting at 02:30 on the spring-forward day opens when the clock jumps to 03:00 CEST."""
    w = Window(time(2, 30), time(7, 0), ZURICH)
    assert w.next_open(at(SPRING, 1)) == at(SPRING, 3)
    assert w.is_open(at(SPRING, 3, 15))


def test_end_in_spring_gap_closes_at_the_jump():
    """A window ending at 02:30 on the spring-forward night closes when the clock jumps to 03:00 CEST."""
    w = Window(time(22, 0), time(2, 30), ZURICH)
    sat = SPRING - timedelta(days=1)
    assert w.closes_at(at(sat, 23)) == at(SPRING, 3)
    assert not w.is_open(at(SPRING, 3, 10))


# -- a whole year against a wall-clock reference ---------------------------------------------


def reference_open(t: float, start: time, end: time, days: tuple[str, ...]) -> bool:
    """Open per the wall clock: today's window (if today is a start day) or yesterday's overnight one."""
    now = local(t)
    wall = now.time().replace(tzinfo=None)
    today = DAYS[now.weekday()] in days
    yesterday = DAYS[(now.weekday() - 1) % 7] in days
    if end > start:
        return today and start <= wall < end
    return (today and wall >= start) or (yesterday and wall < end)


@pytest.mark.parametrize(
    ("start", "end", "days"),
    [
        (time(20, 0), time(7, 0), DAYS),
        (time(20, 0), time(7, 0), ("fri",)),
        (time(21, 30), time(6, 15), ("sat", "sun")),
        (time(8, 0), time(17, 0), ("mon", "tue", "wed", "thu", "fri")),
    ],
)
def test_whole_year_matches_wall_clock(start: time, end: time, days: tuple[str, ...]):
    """Every 37 minutes through 2026 (both DST changes), is_open/closes_at/next_open agree with the wall clock."""
    w = Window(start, end, ZURICH, days)
    t = at(date(2026, 1, 1), 0)
    stop = at(date(2027, 1, 1), 0)
    while t < stop:
        is_open = w.is_open(t)
        assert is_open == reference_open(t, start, end, days), local(t)
        if is_open:
            closes = w.closes_at(t)
            assert closes is not None and closes > t
            assert local(closes).time() == end
            assert not w.is_open(closes)
            assert w.next_open(t) == t
        else:
            opens = w.next_open(t)
            assert opens > t
            assert local(opens).time() == start
            assert DAYS[local(opens).weekday()] in days
            assert w.is_open(opens) and not w.is_open(opens - 1)
        t += 37 * 60  # drifts through every minute of the hour
