"""The retry policy and the gates in front of every move (pure logic, clock injected)."""

from __future__ import annotations

import random

from dicom_transfer.config import load_config
from dicom_transfer.issuing import IssuePolicy
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
