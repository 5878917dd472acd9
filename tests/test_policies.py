"""The retry policy and the gates in front of every move (pure logic, clock injected)."""

from __future__ import annotations

import random
import time
from pathlib import Path

from dicom_transfer.config import load_config
from dicom_transfer.flights import Flight
from dicom_transfer.issuing import IssuePolicy
from dicom_transfer.journal import Journal
from dicom_transfer.parties import Parties
from dicom_transfer.retry import FREE_REQUEUES, RetryPolicy


def test_backoff_doubles_with_jitter_up_to_the_longest() -> None:
    """backoff(k) lies in [0.5, 1] x min(backoff_max_s, backoff_s x 2**(k-1))."""
    policy = RetryPolicy(5.0, 60.0, random.Random(3))
    for attempt, base in ((1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (5, 60.0), (9, 60.0)):
        waits = [policy.backoff(attempt) for _ in range(50)]
        assert all(base / 2 <= w <= base for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > base / 10  # jittered, not one value


def test_note_keeps_the_earliest_retry_due() -> None:
    """note() returns its argument and keeps the earliest time as next_due; None changes nothing."""
    policy = RetryPolicy(1.0, 10.0)
    assert policy.note(50.0) == 50.0 and policy.next_due == 50.0
    policy.note(70.0)
    policy.note(None)
    assert policy.next_due == 50.0
    policy.note(20.0)
    assert policy.next_due == 20.0


def test_losses_are_free_up_to_the_limit_per_series() -> None:
    """free_requeue counts per series: 1..FREE_REQUEUES are free, the next is None (attempts again)."""
    policy = RetryPolicy(1.0, 10.0)
    assert [policy.free_requeue("a") for _ in range(FREE_REQUEUES)] == list(range(1, FREE_REQUEUES + 1))
    assert policy.free_requeue("a") is None
    assert policy.free_requeue("b") == 1


def test_issue_policy_names_the_party_gone_too_long_and_wakes_for_the_window() -> None:
    """gone_too_long names the source or the destination (with why) after unreachable_s; wakeups include the window."""
    now = [1_000_000.0]
    cfg = load_config(None, env={}, overrides={"transfer.unreachable_s": 60, "window": {
        "start": "20:00", "end": "07:00", "timezone": "UTC"}})  # fmt: skip
    policy = IssuePolicy(cfg.transfer, cfg.window, lambda: now[0])
    assert policy.gone_too_long(now[0]) is None
    policy.destination.begin("storage full: 1.0 of 1 MB used")
    now[0] += 61
    assert policy.gone_too_long(now[0]) == "the destination stored nothing for 61 s (storage full: 1.0 of 1 MB used)"
    policy.source.begin("Connection refused")
    assert policy.gone_too_long(now[0] + 61).startswith("the source did not answer for 61 s")
    closed_at = 1_000_000.0 - 1_000_000.0 % 86400 + 12 * 3600  # noon UTC: outside 20:00-07:00
    assert not policy.window_open(closed_at)
    assert closed_at + 8 * 3600 in policy.wakeups(closed_at, open_now=False)


class NoFigures:
    """A destination that cannot tell whether it is full (no MaximumStorageSize)."""

    def storage_full(self) -> None:
        return None


def test_three_failed_empty_moves_in_a_row_pause_on_the_destination(tmp_path: Path) -> None:
    """The streak rule: only 0xCxxx answers with nothing arriving, in a row, once series have arrived; a drop
    (no status), a refusal for resources, a partial arrival or an arrival breaks it; a probe during the pause
    that comes back empty keeps the pause."""
    cfg = load_config(None, env={})
    journal = Journal(tmp_path / "j.sqlite")
    policy = IssuePolicy(cfg.transfer, cfg.window, time.monotonic)
    parties = Parties(cfg, journal, None, NoFigures(), policy)  # type: ignore[arg-type]

    def move(uid: str, dimse: int | None, count: int = 0) -> str | None:
        flight = Flight(uid, "1.2", 10, 1, 0.0, baseline=0, job_dimse=dimse, count=count)
        return parties.destination_refuses(flight)

    assert [move(u, 0xC000) for u in "abcd"] == [None] * 4  # nothing ever arrived: the series' own problems
    parties.destination_stores()  # a series arrived
    assert move("a", 0xC000) is None and move("b", 0xC000) is None
    assert move("c", None) is None  # a drop from a full queue: the throttle's, breaks the streak
    assert move("d", 0xC000) is None and move("e", 0xA702) is None and move("f", 0xC000) is None
    assert move("g", 0xC000, count=4) is None  # some of it arrived
    assert move("h", 0xC001) is None and move("h", 0xC001) is None  # one series twice is not a streak
    assert move("i", 0xC000) is None and not policy.destination
    why = move("j", 0xC000)
    assert why is not None and "the last 3 series moved delivered nothing" in why and "0xC000" in why
    assert policy.destination  # paused: nothing new is issued until a probe
    assert move("k", 0xC000) is not None  # a probe that came back empty: still paused
    parties.destination_stores()
    assert not policy.destination and move("l", 0xC000) is None
    journal.close()
