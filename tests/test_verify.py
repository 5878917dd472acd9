"""Arrival proof: `judge` decides from the destination count, never from the job (pure)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from dicom_transfer.verify import Decision, Observation, Verdict, judge

STALL = 30.0
DEADLINE = 600.0
T0 = 1_000_000.0  # issue time on the fake clock


def obs(**kw) -> Observation:
    """An observation of a 50-instance series issued at T0, job still running, nothing there."""
    base = {
        "expected": 50,
        "count": 0,
        "issued_at": T0,
        "last_growth_at": T0,
        "job_ended_at": None,
        "job_succeeded": False,
        "delivered": 0,
        "now": T0 + 1,
    }
    base.update(kw)
    if "delivered" not in kw:
        base["delivered"] = base["count"]
    return Observation(**base)


def decide(o: Observation) -> Decision:
    return judge(o, stall_s=STALL, deadline_s=DEADLINE)


# -- known expected: the count decides ------------------------------------------------------


def test_full_count_arrives_while_job_still_runs():
    """count == expected is ARRIVED/"count" at once, even though the move job has not ended."""
    d = decide(obs(count=50, last_growth_at=T0 + 1, now=T0 + 1))
    assert d.verdict is Verdict.ARRIVED
    assert d.verified == "count"
    assert d.warning is None
    assert d.reason is None


def test_full_count_arrives_even_when_job_failed():
    """A Failure job (e.g. final 0xB000) does not matter once every instance is there."""
    d = decide(obs(count=50, job_ended_at=T0 + 2, job_succeeded=False, now=T0 + 3))
    assert d.verdict is Verdict.ARRIVED
    assert d.verified == "count"


def test_full_count_arrives_even_after_deadline():
    """The deadline does not turn a proven series short: the count is checked first."""
    d = decide(obs(count=50, now=T0 + DEADLINE + 100))
    assert d.verdict is Verdict.ARRIVED


def test_more_than_expected_arrives_with_warning():
    """count > expected is ARRIVED/"count" with a warning naming both numbers."""
    d = decide(obs(count=52, now=T0 + 1))
    assert d.verdict is Verdict.ARRIVED
    assert d.verified == "count"
    assert d.warning is not None
    assert "52" in d.warning and "50" in d.warning


def test_never_arrived_below_expected_whatever_the_job_says():
    """Exhaustively: with count < expected the verdict is never ARRIVED, for any job outcome or time."""
    expected = 6
    times = [T0, T0 + 1, T0 + STALL - 1, T0 + STALL, T0 + STALL + 1, T0 + 5 * STALL, T0 + DEADLINE, T0 + 10 * DEADLINE]
    checked = 0
    for count, ended, succeeded, now, growth_lag in itertools.product(
        range(expected), [False, True], [False, True], times, [0.0, STALL, 3 * STALL]
    ):
        last_growth = max(T0, now - growth_lag)
        o = obs(
            expected=expected,
            count=count,
            job_ended_at=(T0 if ended else None),
            job_succeeded=succeeded,
            last_growth_at=last_growth,
            now=now,
        )
        d = decide(o)
        assert d.verdict is not Verdict.ARRIVED, o
        assert d.verified is None, o
        if d.verdict is Verdict.SHORT:
            assert d.reason is not None and f"{count}/{expected}" in d.reason, (o, d)
        checked += 1
    assert checked == expected * 2 * 2 * len(times) * 3


def test_job_running_within_deadline_waits():
    """While the job runs and the deadline is far, a short count is WAIT, however long it's quiet."""
    d = decide(obs(count=10, last_growth_at=T0, now=T0 + 10 * STALL))
    assert d.verdict is Verdict.WAIT


def test_job_ended_and_quiet_for_stall_is_short():
    """Job ended, no growth for stall_s: SHORT with reason exactly "short: 37/50"."""
    ended = T0 + 5
    d = decide(obs(count=37, last_growth_at=T0 + 4, job_ended_at=ended, now=ended + STALL))
    assert d.verdict is Verdict.SHORT
    assert d.reason == "short: 37/50"
    assert d.pacs_full is False


def test_job_ended_quiet_less_than_stall_waits():
    """Job ended but quiet for less than stall_s: still WAIT (stragglers may arrive)."""
    ended = T0 + 5
    d = decide(obs(count=37, last_growth_at=T0 + 4, job_ended_at=ended, now=ended + STALL - 0.001))
    assert d.verdict is Verdict.WAIT


def test_growth_after_job_end_resets_stall_timer():
    """A count that grew after the job ended restarts the stall_s quiet period from the growth."""
    ended = T0 + 5
    grew = ended + 20
    base = obs(count=40, delivered=40, job_ended_at=ended, last_growth_at=grew, job_succeeded=True)
    # Measured from the job end it would be stalled; from the growth it is not.
    assert decide(replace(base, now=ended + STALL + 1)).verdict is Verdict.WAIT
    assert decide(replace(base, now=grew + STALL - 1)).verdict is Verdict.WAIT
    d = decide(replace(base, now=grew + STALL))
    assert d.verdict is Verdict.SHORT
    assert d.reason == "short: 40/50"


def test_deadline_is_short_timed_out_even_while_job_runs():
    """Past the deadline a short series is SHORT with "timed out", job running or not."""
    for ended in (None, T0 + 1):
        d = decide(obs(count=12, job_ended_at=ended, last_growth_at=T0 + DEADLINE - 1, now=T0 + DEADLINE))
        assert d.verdict is Verdict.SHORT
        assert d.reason is not None
        assert "timed out" in d.reason
        assert "12/50" in d.reason


def test_just_before_deadline_still_waits():
    """One tick before the deadline a running move is still WAIT."""
    d = decide(obs(count=12, now=T0 + DEADLINE - 0.001))
    assert d.verdict is Verdict.WAIT


def test_nothing_delivered_is_pacs_full():
    """A short verdict with nothing delivered this attempt flags pacs_full (stalled or timed out)."""
    stalled = decide(obs(count=0, delivered=0, job_ended_at=T0 + 1, job_succeeded=True, now=T0 + 1 + STALL))
    assert stalled.verdict is Verdict.SHORT and stalled.pacs_full is True
    timed_out = decide(obs(count=0, delivered=0, now=T0 + DEADLINE))
    assert timed_out.verdict is Verdict.SHORT and timed_out.pacs_full is True


def test_partial_pre_existing_count_with_nothing_new_is_pacs_full():
    """pacs_full follows `delivered` (this attempt), not the total count at the destination."""
    d = decide(obs(count=30, delivered=0, job_ended_at=T0 + 1, now=T0 + 1 + STALL))
    assert d.verdict is Verdict.SHORT
    assert d.reason == "short: 30/50"
    assert d.pacs_full is True


def test_something_delivered_is_not_pacs_full():
    """A short series that received something is short, but not a sign of a full PACS."""
    d = decide(obs(count=30, delivered=5, job_ended_at=T0 + 1, now=T0 + 1 + STALL))
    assert d.verdict is Verdict.SHORT
    assert d.pacs_full is False


# -- unknown expected: the stable count decides ---------------------------------------------


def unknown(**kw) -> Observation:
    return obs(expected=None, **kw)


def test_unknown_expected_success_and_stable_is_stable_count():
    """Unknown expected: job Success + count stable for stall_s + count > 0 → ARRIVED/"stable-count"."""
    ended = T0 + 10
    d = decide(unknown(count=20, last_growth_at=T0 + 9, job_ended_at=ended, job_succeeded=True, now=ended + STALL))
    assert d.verdict is Verdict.ARRIVED
    assert d.verified == "stable-count"
    assert d.warning is None


def test_unknown_expected_not_yet_stable_waits():
    """Unknown expected: a count that grew less than stall_s ago is WAIT."""
    ended = T0 + 10
    d = decide(unknown(count=20, last_growth_at=ended + 5, job_ended_at=ended, job_succeeded=True, now=ended + STALL))
    assert d.verdict is Verdict.WAIT


def test_unknown_expected_never_arrives_while_job_runs():
    """Unknown expected: no ARRIVED before the job ended, however stable the count looks."""
    for now in (T0 + STALL, T0 + 5 * STALL, T0 + DEADLINE - 1):
        d = decide(unknown(count=20, last_growth_at=T0 + 1, job_ended_at=None, now=now))
        assert d.verdict is Verdict.WAIT


def test_unknown_expected_with_zero_count_is_short():
    """Unknown expected and nothing at the destination: SHORT (pacs_full), never ARRIVED."""
    ended = T0 + 1
    d = decide(unknown(count=0, job_ended_at=ended, job_succeeded=True, now=ended + STALL))
    assert d.verdict is Verdict.SHORT
    assert d.reason == "short: 0/?"
    assert d.pacs_full is True


def test_unknown_expected_with_failed_job_is_short():
    """Unknown expected and a failed job: SHORT even with a stable, non-zero count."""
    ended = T0 + 1
    d = decide(unknown(count=20, last_growth_at=T0 + 1, job_ended_at=ended, job_succeeded=False, now=ended + STALL))
    assert d.verdict is Verdict.SHORT
    assert d.reason == "short: 20/?"
    assert d.pacs_full is False


def test_unknown_expected_past_deadline_is_short_timed_out():
    """Unknown expected, job still running at the deadline: SHORT "timed out"."""
    d = decide(unknown(count=20, now=T0 + DEADLINE))
    assert d.verdict is Verdict.SHORT
    assert d.reason is not None and "timed out" in d.reason and "20/?" in d.reason


def test_decision_is_pure():
    """judge has no hidden state: the same observation gives the same decision."""
    o = obs(count=37, job_ended_at=T0 + 1, now=T0 + 1 + STALL)
    assert decide(o) == decide(o)


def test_stall_needs_a_count_read_after_the_quiet_period() -> None:
    """Time alone proves nothing: a count read before stall_s had passed keeps the series waiting."""
    ended = T0 + 5
    late = obs(count=30, last_growth_at=T0 + 4, job_ended_at=ended, job_succeeded=True, now=ended + 100)
    assert decide(replace(late, seen_at=ended + 1)).verdict is Verdict.WAIT  # we were not looking
    assert decide(replace(late, seen_at=ended + STALL)).verdict is Verdict.SHORT
    assert decide(late).verdict is Verdict.SHORT  # seen_at None: read at `now`
