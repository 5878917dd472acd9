"""The count schedule near a move's predicted end (pure logic, no server)."""

from __future__ import annotations

import pytest

from dicom_transfer.scheduler import HOT_POLL_S, hot_interval


def test_not_due_before_the_predicted_end() -> None:
    assert hot_interval(-0.001, 0.05) is None
    assert hot_interval(-5.0, 0.05) is None


@pytest.mark.parametrize("late", [0.0, 0.001, 0.01, 0.02])
def test_counted_every_few_ms_right_after_it(late: float) -> None:
    assert hot_interval(late, 0.05) == HOT_POLL_S


def test_backs_off_with_the_time_past_the_end_up_to_poll_s() -> None:
    intervals = [hot_interval(late, 0.05) for late in (0.02, 0.05, 0.1, 0.3, 0.5, 1.0, 10.0)]
    assert intervals == sorted(intervals)  # type: ignore[type-var]
    assert hot_interval(0.1, 0.05) == pytest.approx(0.01)
    assert hot_interval(1.0, 0.05) == 0.05
    assert hot_interval(10.0, 0.05) == 0.05


def test_counts_in_a_slow_second_stay_few() -> None:
    """A move 1 s later than predicted is counted a few dozen times, not every 2 ms."""
    late, counts = 0.0, 0
    while late < 1.0:
        step = hot_interval(late, 0.05)
        assert step is not None
        late += step
        counts += 1
    assert counts < 60
    assert counts > 1.0 / 0.05  # never slower than the plain poll
