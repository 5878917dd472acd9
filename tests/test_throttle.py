"""AIMD throttle with an injected clock: halve on "PACS is full", grow back by one (pure)."""

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
    """A new throttle allows max_in_flight moves and has no cool-down and no changes."""
    t = make(clock, max_in_flight=4)
    assert t.limit == 4
    assert t.not_before <= clock()
    assert t.changes == []


def test_may_issue_respects_limit(clock: FakeClock):
    """may_issue is True below the limit and False at or above it."""
    t = make(clock, max_in_flight=3)
    assert [t.may_issue(n) for n in range(5)] == [True, True, True, False, False]


def test_full_halves_limit_down_to_one(clock: FakeClock):
    """Each full() halves the limit (integer), never below 1."""
    t = make(clock, max_in_flight=8)
    limits = []
    for _ in range(5):
        t.full("A702")
        limits.append(t.limit)
    assert limits == [4, 2, 1, 1, 1]


def test_full_odd_limit_rounds_down(clock: FakeClock):
    """An odd limit halves downwards (5 → 2, 3 → 1)."""
    t = make(clock, max_in_flight=5)
    t.full("x")
    assert t.limit == 2
    t2 = make(clock, max_in_flight=3)
    t2.full("x")
    assert t2.limit == 1


def test_full_cooldown_grows_exponentially(clock: FakeClock):
    """The k-th consecutive full() sets not_before = now + cooldown_s * 2**(k-1)."""
    t = make(clock, max_in_flight=8, cooldown_s=10.0)
    for k in range(1, 6):
        clock.advance(10_000)  # well past any earlier cool-down
        change = t.full("A702")
        wait = 10.0 * 2 ** (k - 1)
        assert change["cooldown_s"] == wait
        assert t.not_before == clock() + wait


def test_cooldown_blocks_then_allows_issue(clock: FakeClock):
    """During the cool-down may_issue is False even with room; from not_before on it is True."""
    t = make(clock, max_in_flight=4, cooldown_s=10.0)
    t.full("A702")
    assert t.limit == 2
    assert not t.may_issue(0)
    clock.advance(9.999)
    assert not t.may_issue(0)
    clock.advance(0.001)
    assert t.may_issue(0)
    assert t.may_issue(1)
    assert not t.may_issue(2)


def test_cooldown_never_shortens_a_longer_wait(clock: FakeClock):
    """A later full() never moves not_before earlier than a wait already set."""
    t = make(clock, cooldown_s=10.0)
    t.full("a")
    t.full("b")  # second level: 20 s from now
    assert t.not_before == clock() + 20.0
    before = t.not_before
    t.completed()  # resets the level: next full is 10 s again
    t.full("c")
    assert t.not_before == before


def test_completed_resets_cooldown_level(clock: FakeClock):
    """After a complete, the next full() starts the cool-down sequence again at cooldown_s."""
    t = make(clock, cooldown_s=10.0)
    t.full("a")
    clock.advance(100)
    t.full("b")
    clock.advance(100)
    t.completed()
    change = t.full("c")
    assert change["cooldown_s"] == 10.0


def test_recovers_by_one_after_streak_up_to_max(clock: FakeClock):
    """After recover_after consecutive completes the limit grows by one, never past max_in_flight."""
    t = make(clock, max_in_flight=4, recover_after=3)
    t.full("A702")
    t.full("A702")
    assert t.limit == 1
    seen = []
    for _ in range(3 * 5):
        t.completed()
        seen.append(t.limit)
    assert seen == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4]
    assert t.limit == t.max_in_flight


def test_completed_returns_change_only_when_limit_grows(clock: FakeClock):
    """completed() returns a change dict exactly when the limit grows, else None."""
    t = make(clock, max_in_flight=2, recover_after=2)
    t.full("A702")
    assert t.completed() is None
    change = t.completed()
    assert change == {"from": 1, "to": 2, "why": "recovered"}
    assert t.completed() is None
    assert t.completed() is None  # at max: no growth, no change


def test_no_change_while_at_max(clock: FakeClock):
    """At max_in_flight, completes never record a change."""
    t = make(clock, max_in_flight=3, recover_after=1)
    for _ in range(10):
        assert t.completed() is None
    assert t.limit == 3
    assert t.changes == []


def test_full_resets_streak(clock: FakeClock):
    """A full() in the middle of a streak starts the count of consecutive completes again."""
    t = make(clock, max_in_flight=4, recover_after=3)
    t.full("a")  # 4 → 2
    t.completed()
    t.completed()
    t.full("b")  # 2 → 1, streak back to 0
    assert t.streak == 0
    t.completed()
    t.completed()
    assert t.limit == 1  # two completes after the reset are not enough
    t.completed()
    assert t.limit == 2


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


def test_pause_does_not_shorten_cooldown(clock: FakeClock):
    """An issue during a cool-down (pause shorter than the cool-down) keeps the cool-down."""
    t = make(clock, pause_s=1.0, cooldown_s=30.0)
    t.full("a")
    t.issued()
    assert t.not_before == clock() + 30.0


def test_change_dicts_have_from_to_why(clock: FakeClock):
    """Every change (full or recovery) is a dict with from/to/why, kept in order in `changes`."""
    t = make(clock, max_in_flight=4, recover_after=1, cooldown_s=5.0)
    first = t.full("C-MOVE status 0xA702")
    second = t.completed()
    assert first == {"from": 4, "to": 2, "why": "C-MOVE status 0xA702", "cooldown_s": 5.0}
    assert second == {"from": 2, "to": 3, "why": "recovered"}
    assert t.changes == [first, second]
    for change in t.changes:
        assert {"from", "to", "why"} <= change.keys()
        assert isinstance(change["from"], int) and isinstance(change["to"], int)


def test_full_at_one_still_records_the_event(clock: FakeClock):
    """full() at limit 1 keeps 1 but still returns a change (the cool-down is news)."""
    t = make(clock, max_in_flight=1)
    change = t.full("nothing delivered")
    assert change["from"] == 1 and change["to"] == 1
    assert change["why"] == "nothing delivered"
    assert not t.may_issue(0)
