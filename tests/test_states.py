"""The series state machine: one Enum, one table, illegal pairs named (pure, no I/O)."""

from __future__ import annotations

import pytest

from dicom_transfer.errors import IllegalTransition
from dicom_transfer.states import TRANSITIONS, Event, State, next_state

CONTRACT_NAMES = {"pending", "queried", "moving", "verifying", "waiting_retry", "complete", "failed"}
RELAY_NAMES = {"held_local", "forwarding"}  # added by relay mode (transfer.mode: relay)


def reachable_from(start: State) -> set[State]:
    """Every state reachable from `start` by following the table."""
    seen = {start}
    todo = [start]
    while todo:
        state = todo.pop()
        for (src, _event), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def illegal_pairs() -> list[tuple[State, Event]]:
    return [(s, e) for s in State for e in Event if (s, e) not in TRANSITIONS]


def test_state_names_are_the_contract():
    """The state values are exactly the names DESIGN.md promises to reports and `status`."""
    assert {s.value for s in State} == CONTRACT_NAMES | RELAY_NAMES


def test_relay_path_and_its_failures():
    """Relay: moving → held_local → forwarding → complete; a failed forward goes back to held_local, not to a move."""
    state = next_state(State.MOVING, Event.HELD)
    assert state is State.HELD_LOCAL
    assert next_state(state, Event.FORWARD) is State.FORWARDING
    assert next_state(State.FORWARDING, Event.ARRIVED) is State.COMPLETE
    assert next_state(State.FORWARDING, Event.SHORT) is State.HELD_LOCAL
    assert next_state(State.FORWARDING, Event.RECLAIM) is State.HELD_LOCAL
    assert next_state(State.FORWARDING, Event.LOST_LOCAL) is State.PENDING
    with pytest.raises(IllegalTransition):
        next_state(State.HELD_LOCAL, Event.ARRIVED)  # complete only from a forward's count (or reclaim's PRESENT)


def test_every_state_reachable_from_pending():
    """Every state can be reached from `pending` through the table."""
    assert reachable_from(State.PENDING) == set(State)


def test_happy_path_walks_the_main_line():
    """pending → queried → moving → verifying → complete is allowed event by event."""
    state = State.PENDING
    for event, expected in [
        (Event.QUERIED, State.QUERIED),
        (Event.ISSUED, State.MOVING),
        (Event.JOB_ENDED, State.VERIFYING),
        (Event.ARRIVED, State.COMPLETE),
    ]:
        state = next_state(state, event)
        assert state is expected


def test_retry_loop_goes_back_to_pending():
    """A short series waits for its retry and comes back as pending."""
    state = next_state(State.VERIFYING, Event.SHORT)
    assert state is State.WAITING_RETRY
    assert next_state(state, Event.RETRY_DUE) is State.PENDING


@pytest.mark.parametrize("terminal", [State.COMPLETE, State.FAILED])
def test_terminal_states_have_no_outgoing_pair(terminal: State):
    """complete and failed are terminal: no (state, event) key starts from them."""
    assert [key for key in TRANSITIONS if key[0] is terminal] == []
    for event in Event:
        with pytest.raises(IllegalTransition):
            next_state(terminal, event)


def test_only_complete_and_failed_are_terminal():
    """Every non-terminal state has at least one way out."""
    with_exit = {src for src, _ in TRANSITIONS}
    assert set(State) - with_exit == {State.COMPLETE, State.FAILED}


@pytest.mark.parametrize(("state", "event"), illegal_pairs())
def test_illegal_pair_names_state_and_event(state: State, event: Event):
    """Every pair outside the table raises IllegalTransition whose message names both."""
    with pytest.raises(IllegalTransition) as info:
        next_state(state, event)
    message = str(info.value)
    assert state.value in message
    assert event.value in message
    assert info.value.state == state.value
    assert info.value.event == event.value


def test_illegal_pairs_exist_for_sanity():
    """The table is not total: the illegal-pair test above has something to check."""
    assert len(illegal_pairs()) > 0
    assert (State.COMPLETE, Event.ISSUED) in illegal_pairs()


def test_table_keys_and_values_are_enum_members():
    """Table keys are (State, Event) and every value is a State."""
    for (state, event), dst in TRANSITIONS.items():
        assert isinstance(state, State)
        assert isinstance(event, Event)
        assert isinstance(dst, State)


def test_next_state_matches_table_for_every_legal_pair():
    """next_state returns exactly the table's value for every legal pair."""
    for (state, event), dst in TRANSITIONS.items():
        assert next_state(state, event) is dst


def test_next_state_accepts_plain_strings():
    """The journal stores values as text: next_state takes them and returns a State."""
    assert next_state("pending", "queried") is State.QUERIED  # type: ignore[arg-type]


def test_unknown_state_name_is_rejected():
    """A state name that is not in the Enum is never silently mapped."""
    with pytest.raises(ValueError):
        next_state("done", Event.ARRIVED)  # type: ignore[arg-type]


def test_in_flight_property():
    """Exactly moving and verifying are in flight (reclaimed at start-up)."""
    assert {s for s in State if s.in_flight} == {State.MOVING, State.VERIFYING}


def test_terminal_property():
    """Exactly complete and failed are terminal; none is both terminal and in flight."""
    assert {s for s in State if s.terminal} == {State.COMPLETE, State.FAILED}
    assert not any(s.terminal and s.in_flight for s in State)


def test_reclaim_only_from_in_flight_states():
    """RECLAIM applies to in-flight rows only: moves land in verifying, relay forwards back in held_local."""
    sources = {src for (src, event) in TRANSITIONS if event is Event.RECLAIM}
    assert sources == {s for s in State if s.in_flight} | {State.FORWARDING}
    assert {TRANSITIONS[(s, Event.RECLAIM)] for s in sources if s.in_flight} == {State.VERIFYING}
    assert TRANSITIONS[(State.FORWARDING, Event.RECLAIM)] is State.HELD_LOCAL


def test_complete_only_by_proof():
    """complete is entered only by ARRIVED (count proof) or PRESENT (pre-check count)."""
    events = {event for (_src, event), dst in TRANSITIONS.items() if dst is State.COMPLETE}
    assert events == {Event.ARRIVED, Event.PRESENT}


def test_give_up_from_every_non_terminal_state():
    """Every non-terminal state can give up and fail (no series is stuck forever)."""
    for state in State:
        if not state.terminal:
            assert next_state(state, Event.GIVE_UP) is State.FAILED
