"""The count schedule near a move's predicted end, and the move workers (no server)."""

from __future__ import annotations

import threading
import time

import pytest

from dicom_transfer.scheduler import HOT_POLL_S, Workers, hot_interval


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
