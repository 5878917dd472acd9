"""The count schedule near a move's predicted end, the move workers, drop detection (no server)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicom_transfer.flights import (
    HOT_POLL_S,
    OVERTAKEN_GRACE_S,
    START_GRACE_MIN_S,
    Flight,
    Pace,
    Workers,
    hot_interval,
    predicted_end,
)


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


# -- Workers: the threads that run blocking moves ------------------------------------------


def flight(expected: int | None = 50, baseline: int = 0) -> Flight:
    return Flight("1.2.3", "1.2", expected, 1, issued_at=100.0, baseline=baseline)


def test_before_anything_arrives_the_end_comes_from_the_whole_move_pace() -> None:
    assert predicted_end(flight(), None, None) == pytest.approx(100.02)  # nothing measured yet
    assert predicted_end(flight(), 0.002, 0.001) == pytest.approx(100.0 + 0.85 * 50 * 0.002)
    assert predicted_end(flight(baseline=20), 0.002, None) == pytest.approx(100.0 + 0.85 * 30 * 0.002)


def test_once_it_delivers_the_end_comes_from_what_is_left_at_the_arrival_pace() -> None:
    f = flight()
    f.last_growth = (100.040, 41)
    assert predicted_end(f, 0.002, 0.001) == pytest.approx(100.040 + 0.85 * 9 * 0.001)
    f.last_growth = (100.049, 49)
    assert predicted_end(f, 0.002, 0.001) == pytest.approx(100.049 + 0.85 * 1 * 0.001)
    assert predicted_end(f, 0.002, None) == pytest.approx(100.0 + 0.85 * 50 * 0.002)  # no arrival pace yet


def test_a_count_without_growth_leaves_the_end_where_it_was_so_a_stall_backs_off() -> None:
    f = flight()
    f.last_growth = (100.040, 41)
    end = predicted_end(f, 0.002, 0.001)
    f.count, f.counted_at = 41, 101.0  # counted again, nothing more came
    assert predicted_end(f, 0.002, 0.001) == end
    assert hot_interval(101.0 - end, 0.05) == 0.05  # a second late: every poll_s, not every 2 ms


def test_an_unknown_expected_count_keeps_the_issue_based_end() -> None:
    f = flight(expected=None)
    f.last_growth = (100.040, 41)
    assert predicted_end(f, 0.002, 0.001) == pytest.approx(100.0 + 0.85 * 1 * 0.002)


def test_an_idle_worker_takes_the_next_call_and_a_busy_one_gets_company() -> None:
    workers = Workers("test")
    names: list[str] = []
    done = threading.Event()
    workers.run(lambda: (names.append(threading.current_thread().name), done.set()))
    assert done.wait(5)
    for _ in range(50):  # the worker files itself as idle just after the call returns
        if workers._idle:
            break
        time.sleep(0.01)
    done.clear()
    workers.run(lambda: (names.append(threading.current_thread().name), done.set()))
    assert done.wait(5)
    assert names == ["test-1", "test-1"] and workers.started == 1

    release = threading.Event()
    blocked = threading.Event()
    workers.run(lambda: (blocked.set(), release.wait(5)))  # a hung move holds its worker...
    assert blocked.wait(5)
    second = threading.Event()
    workers.run(second.set)  # ...and the next call still runs, on a new thread
    assert second.wait(5)
    assert workers.started == 2
    release.set()
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-"))


def test_an_idle_worker_ends_after_idle_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Workers, "IDLE_S", 0.05)
    workers = Workers("ending")
    ran = threading.Event()
    workers.run(ran.set)
    assert ran.wait(5)
    deadline = time.monotonic() + 5
    while any(t.name == "ending-1" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "ending-1" for t in threading.enumerate())
    assert workers._idle == []
    again = threading.Event()
    workers.run(again.set)  # a new worker starts
    assert again.wait(5) and workers.started == 2


# -- dropped moves: "a later move arrived whole" ---------------------------------------


def overtaken_case(tmp_path: Path, completions: list[tuple[float, float]], now: float,
                   s_to_first: float | None = None, others: tuple[Flight, ...] = ()) -> bool:  # fmt: skip
    """Move A issued at t=0, acknowledged at 0.01, nothing delivered; `completions` are
    (issued_at, complete at) of other moves of the run, `others` the moves still in
    flight. Is A judged dropped at `now`?"""
    pace = Pace(poll_s=0.05, stall_s=30.0)
    pace.completions.extend(completions)
    pace.last_arrival_at = max((at for _, at in completions), default=0.0)
    pace.s_to_first = s_to_first
    flight = Flight("1.2.3", "1.2", expected=10, attempt=1, issued_at=0.0, baseline=0)
    flight.job_ended_at, flight.job_succeeded, flight.counted_at = 0.01, True, now
    return pace.dropped(flight, (flight, *others), now)


def test_a_move_is_dropped_once_a_later_one_is_whole_for_the_grace(tmp_path: Path) -> None:
    later_whole_at = 0.4
    assert not overtaken_case(tmp_path, [(0.001, later_whole_at)], later_whole_at + OVERTAKEN_GRACE_S / 2)
    assert overtaken_case(tmp_path, [(0.001, later_whole_at)], later_whole_at + OVERTAKEN_GRACE_S)
    # A PACS known to start a move fast: had ours been queued behind the later one, it would
    # have started within the start grace (0.2 s here), which is then the wait.
    assert not overtaken_case(tmp_path, [(0.001, later_whole_at)], later_whole_at + 0.19, s_to_first=0.05)
    assert overtaken_case(tmp_path, [(0.001, later_whole_at)], later_whole_at + 0.2, s_to_first=0.05)


def test_an_earlier_move_arriving_says_nothing_about_ours(tmp_path: Path) -> None:
    """The PACS serves its queue in order: a move issued before ours may finish first."""
    assert not overtaken_case(tmp_path, [(-0.001, 0.4)], 10.0)


def test_no_move_whole_after_ours_means_no_drop_yet(tmp_path: Path) -> None:
    """Moves sent together may reach the PACS in either order: one merely delivering (not
    whole) may be ahead of ours in the PACS's queue, so it proves nothing (the stall rule
    still applies)."""
    assert not overtaken_case(tmp_path, [], 10.0)


def test_a_quiet_pacs_with_nothing_earlier_of_ours_dropped_it(tmp_path: Path) -> None:
    """Nothing issued before ours in flight and the PACS quiet for 4x a lone move's start: dropped."""
    last_arrival = 0.4  # an earlier move's last instance
    assert not overtaken_case(tmp_path, [(-0.1, last_arrival)], last_arrival + 0.39, s_to_first=0.1)
    assert overtaken_case(tmp_path, [(-0.1, last_arrival)], last_arrival + 0.4, s_to_first=0.1)
    # The grace never goes below START_GRACE_MIN_S however fast a lone move starts.
    assert not overtaken_case(tmp_path, [(-0.1, 0.4)], 0.4 + START_GRACE_MIN_S * 0.9, s_to_first=0.001)


def test_a_move_of_ours_still_ahead_in_the_queue_means_no_drop(tmp_path: Path) -> None:
    """An earlier move of ours still in flight may be what the PACS is busy with: no drop by quiet."""
    earlier = Flight("1.2.4", "1.2", expected=10, attempt=1, issued_at=-0.5, baseline=0)
    assert not overtaken_case(tmp_path, [], 100.0, s_to_first=0.01, others=(earlier,))
