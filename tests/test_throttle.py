"""The in-flight limit with an injected clock: halve on a loss and keep issuing, learn the ceiling (pure)."""

from __future__ import annotations

import pytest

from dicom_transfer.throttle import Throttle


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(
    clock: FakeClock, *, max_in_flight: int = 8, recover_after: int = 3, pause_s: float = 0.0, cooldown_s: float = 10.0
) -> Throttle:
    return Throttle(
        max_in_flight=max_in_flight, recover_after=recover_after, pause_s=pause_s, cooldown_s=cooldown_s, clock=clock
    )


def test_starts_at_max_in_flight(clock: FakeClock):
    """A new throttle allows max_in_flight moves, holds nothing and has no changes."""
    t = make(clock, max_in_flight=4)
    assert t.limit == 4 and t.ceiling is None
    assert t.not_before <= clock() and t.hold_until <= clock()
    assert t.changes == []


def test_may_issue_respects_limit(clock: FakeClock):
    """may_issue is True below the limit and False at or above it."""
    t = make(clock, max_in_flight=3)
    assert [t.may_issue(n) for n in range(5)] == [True, True, True, False, False]


def test_a_drop_halves_and_issuing_goes_on_at_once(clock: FakeClock):
    """dropped() halves the limit and never stops issuing: may_issue below the new limit at the same instant."""
    t = make(clock, max_in_flight=8)
    change = t.dropped(clock(), "nothing delivered")
    assert (change["from"], change["to"], t.limit) == (8, 4, 4)
    assert t.may_issue(3) and not t.may_issue(4)
    assert t.drops == 1 and t.ceiling == 8


def test_losses_of_one_burst_cut_once(clock: FakeClock):
    """Drops of moves issued before the last cut belong to the same burst: counted, no second halving."""
    t = make(clock, max_in_flight=8)
    sent = clock()
    clock.advance(1)
    t.dropped(sent, "a")
    same = t.dropped(sent, "b")
    assert t.limit == 4 and same["to"] == 4 and "same burst" in same["why"] and t.drops == 2
    clock.advance(1)
    t.dropped(clock(), "c")  # issued after the cut: a new loss
    assert t.limit == 2


def test_odd_limits_halve_downwards_never_below_one(clock: FakeClock):
    """5 → 2, 3 → 1, 1 → 1 (each loss a new burst)."""
    limits = []
    for start in (5, 3, 1):
        t = make(clock, max_in_flight=start)
        t.dropped(clock(), "x")
        limits.append(t.limit)
    assert limits == [2, 1, 1]


def test_a_refusal_holds_only_while_our_moves_are_at_the_pacs(clock: FakeClock):
    """refused() halves and holds new moves for the cool-down while ours are in flight; none in flight ends it."""
    t = make(clock, max_in_flight=4, cooldown_s=10.0)
    change = t.refused(clock(), "0xA702")
    assert (t.limit, change["hold_s"], t.refusals) == (2, 10.0, 1)
    assert not t.may_issue(1)  # one of ours still there
    clock.advance(9.9)
    assert not t.may_issue(1)
    assert t.may_issue(0)  # the PACS has nothing of ours: idle, the hold is over
    assert t.may_issue(1)


def test_the_refusal_hold_ends_at_its_deadline_and_grows_per_refusal(clock: FakeClock):
    """The hold ends after cooldown_s × 2**k (k-th refusal in a row); a complete starts k again."""
    t = make(clock, max_in_flight=8, cooldown_s=10.0)
    holds = []
    for _ in range(3):
        clock.advance(1000)
        holds.append(t.refused(clock(), "A702")["hold_s"])
    assert holds == [10.0, 20.0, 40.0]
    assert t.hold_until == clock() + 40.0
    t.limit = 4  # room for more, one of ours still at the PACS
    clock.advance(39.9)
    assert not t.may_issue(1)
    clock.advance(0.1)
    assert t.may_issue(1)  # the deadline ends the hold even with ours in flight
    t.completed()
    clock.advance(1000)
    assert t.refused(clock(), "A702")["hold_s"] == 10.0


def test_recovers_by_one_after_streak_below_the_ceiling(clock: FakeClock):
    """Below the learned ceiling the limit grows by one every recover_after completes."""
    t = make(clock, max_in_flight=8, recover_after=3)
    t.dropped(clock(), "x")  # 8 → 4, ceiling 8
    seen = []
    for _ in range(9):
        t.completed()
        seen.append(t.limit)
    assert seen == [4, 4, 5, 5, 5, 6, 6, 6, 7]


def test_probing_the_ceiling_gets_exponentially_rarer_while_drops_repeat_there(clock: FakeClock):
    """Completes needed to grow to the ceiling: 1×, 2×, 4×, ... recover_after (×16 at most) as drops repeat."""
    t = make(clock, max_in_flight=3, recover_after=2)
    needs = []
    for _ in range(7):
        clock.advance(1)
        t.dropped(clock(), "x")  # at 3 (the ceiling): down to 1
        n = 0
        while t.limit < 3:
            t.completed()
            n += 1
        needs.append(n)
    # 1 → 2 always takes 2; 2 → 3 (the ceiling) takes 2 × 2**(repeats-1), capped at ×16.
    assert needs == [2 + 2, 2 + 4, 2 + 8, 2 + 16, 2 + 32, 2 + 32, 2 + 32]
    assert t.ceiling == 3 and t.repeats == 7


def test_a_probe_that_holds_lifts_the_ceiling(clock: FakeClock):
    """recover_after completes at or above the ceiling forget it (the PACS changed): growth is plain again."""
    t = make(clock, max_in_flight=4, recover_after=2)
    t.dropped(clock(), "x")  # 4 → 2, ceiling 4
    for _ in range(2):
        t.completed()  # → 3
    for _ in range(2):
        t.completed()  # → 4 (ceiling reached, repeats 1: no extra wait)
    assert t.limit == 4 and t.ceiling == 4
    t.completed()
    change = t.completed()
    assert t.ceiling is None and change is not None and "ceiling lifted" in change["why"] and change["kind"] == "up"


def test_queue_shrinks_then_grows_back_within_two_recoveries(clock: FakeClock):
    """A PACS going from 3 slots to 1 and back: down at once, back to 3 within 2 × recover_after completes."""
    t = make(clock, max_in_flight=3, recover_after=5)
    clock.advance(1)
    t.dropped(clock(), "queue of 1")  # at 3: → 1
    for _ in range(5):
        t.completed()  # → 2 (below the ceiling 3)
    clock.advance(1)
    t.dropped(clock(), "queue of 1")  # at 2: → 1, ceiling 2
    assert t.limit == 1 and t.ceiling == 2
    n = 0
    while t.limit < 3:  # the PACS has 3 slots again: nothing is dropped any more
        t.completed()
        n += 1
    assert n <= 2 * 5


def test_snapshot_restores_the_learned_state(clock: FakeClock):
    """A resumed run starts at the snapshot's limit and ceiling (kept within 1..max_in_flight)."""
    t = make(clock, max_in_flight=4)
    t.dropped(clock(), "x")
    snap = t.snapshot()
    assert snap == {"limit": 2, "ceiling": 4, "repeats": 1, "drops": 1, "refusals": 0}
    again = make(clock, max_in_flight=4)
    again.restore(snap)
    assert again.snapshot() == snap
    smaller = make(clock, max_in_flight=1)
    smaller.restore(snap)
    assert smaller.limit == 1 and smaller.ceiling is None


def test_no_change_while_at_max(clock: FakeClock):
    """At max_in_flight with no ceiling, completes never record a change."""
    t = make(clock, max_in_flight=3, recover_after=1)
    for _ in range(10):
        assert t.completed() is None
    assert t.limit == 3
    assert t.changes == []


def test_a_loss_resets_the_streak(clock: FakeClock):
    """A drop in the middle of a streak starts the count of consecutive completes again."""
    t = make(clock, max_in_flight=8, recover_after=3)
    t.dropped(clock(), "a")  # 8 → 4
    t.completed()
    t.completed()
    clock.advance(1)
    t.dropped(clock(), "b")  # 4 → 2, streak back to 0
    assert t.streak == 0
    t.completed()
    t.completed()
    assert t.limit == 2
    t.completed()
    assert t.limit == 3


def test_pause_spaces_issues(clock: FakeClock):
    """After issued(), the next move waits pause_s even with room in the limit."""
    t = make(clock, max_in_flight=4, pause_s=2.5)
    assert t.may_issue(0)
    t.issued()
    assert not t.may_issue(1)
    clock.advance(2.4)
    assert not t.may_issue(1)
    clock.advance(0.1)
    assert t.may_issue(1)
    t.issued()
    assert not t.may_issue(2)


def test_zero_pause_allows_back_to_back_issues(clock: FakeClock):
    """pause_s = 0 lets moves be issued at once up to the limit."""
    t = make(clock, max_in_flight=3, pause_s=0.0)
    for n in range(3):
        assert t.may_issue(n)
        t.issued()
    assert not t.may_issue(3)


def test_change_dicts_carry_from_to_why_and_the_state(clock: FakeClock):
    """Every change is a dict with from/to/why/kind and the snapshot, kept in order in `changes`."""
    t = make(clock, max_in_flight=4, recover_after=1, cooldown_s=5.0)
    first = t.refused(clock(), "C-MOVE status 0xA702")
    second = t.completed()
    assert first == {"from": 4, "to": 2, "why": "C-MOVE status 0xA702", "kind": "down", "limit": 2, "ceiling": 4,
                     "repeats": 1, "drops": 0, "refusals": 1, "hold_s": 5.0}  # fmt: skip
    assert second is not None and (second["from"], second["to"], second["why"], second["kind"]) == (
        2, 3, "recovered", "up")  # fmt: skip
    assert t.changes == [first, second]


def test_a_late_found_drop_counts_at_the_limit_it_was_sent_under(clock: FakeClock):
    """A drop found after the limit grew cuts from (and sets the ceiling at) the limit of its issue."""
    t = make(clock, max_in_flight=4, recover_after=1)
    t.limit = 3
    sent = clock()
    clock.advance(1)
    change = t.dropped(sent, "late", at_limit=2)
    assert (t.ceiling, t.limit, change["to"]) == (2, 1, 1)
