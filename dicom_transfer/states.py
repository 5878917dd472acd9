"""Series states, events, and the one transition table (contract: state names)."""

from __future__ import annotations

from enum import Enum

from .errors import IllegalTransition


class State(str, Enum):
    """Where one series stands. The names appear in reports and `status`."""

    PENDING = "pending"  # planned; not yet queried at the source (or due for a retry)
    QUERIED = "queried"  # expected count known; waiting for its turn to move
    MOVING = "moving"  # a C-MOVE was issued (job id recorded) and has not ended
    VERIFYING = "verifying"  # the move ended; counting at the destination
    WAITING_RETRY = "waiting_retry"  # short or refused; `next_attempt_at` says when
    # Relay mode (`transfer.mode: relay`): the PACS moves to the local Orthanc, the controller forwards.
    HELD_LOCAL = "held_local"  # proven whole at the local Orthanc; waiting to be forwarded (`next_attempt_at`)
    FORWARDING = "forwarding"  # being sent from the local Orthanc to the destination
    COMPLETE = "complete"  # the destination holds every expected instance (terminal)
    FAILED = "failed"  # gave up; `reason` says why (terminal)

    @property
    def terminal(self) -> bool:
        return self in (State.COMPLETE, State.FAILED)

    @property
    def in_flight(self) -> bool:
        return self in (State.MOVING, State.VERIFYING)


class Event(str, Enum):
    """What happened to a series."""

    QUERIED = "queried"  # C-FIND gave the series and (maybe) its instance count
    NOT_FOUND = "not_found"  # the source does not have it
    PRESENT = "present"  # pre-check: the destination already holds all of it
    ISSUED = "issued"  # C-MOVE started
    JOB_ENDED = "job_ended"  # the move job finished (any outcome, or vanished)
    ARRIVED = "arrived"  # the destination count proves the series whole
    SHORT = "short"  # fewer than expected arrived, or the move was refused: retry later
    GIVE_UP = "give_up"  # no attempts left, or an error that no retry fixes
    RETRY_DUE = "retry_due"  # the back-off is over
    RECLAIM = "reclaim"  # found in flight at start-up (previous run stopped or crashed)
    REQUEUED = "requeued"  # the PACS dropped or refused the move (its queue, not the series): in line again
    HELD = "held"  # relay: the local Orthanc's count proves the series whole there
    FORWARD = "forward"  # relay: sending it from the local Orthanc to the destination began
    LOST_LOCAL = "lost_local"  # relay: the local Orthanc no longer holds it whole: move it again


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.PENDING, E.QUERIED): S.QUERIED,
    (S.PENDING, E.NOT_FOUND): S.FAILED,
    (S.PENDING, E.PRESENT): S.COMPLETE,
    (S.PENDING, E.SHORT): S.WAITING_RETRY,  # the query itself failed (source busy)
    (S.PENDING, E.GIVE_UP): S.FAILED,
    (S.QUERIED, E.PRESENT): S.COMPLETE,
    (S.QUERIED, E.ISSUED): S.MOVING,
    (S.QUERIED, E.SHORT): S.WAITING_RETRY,  # refused before a job existed
    (S.QUERIED, E.GIVE_UP): S.FAILED,
    (S.MOVING, E.ARRIVED): S.COMPLETE,
    (S.MOVING, E.JOB_ENDED): S.VERIFYING,
    (S.MOVING, E.SHORT): S.WAITING_RETRY,
    (S.MOVING, E.GIVE_UP): S.FAILED,
    (S.MOVING, E.RECLAIM): S.VERIFYING,
    (S.MOVING, E.REQUEUED): S.QUERIED,
    (S.VERIFYING, E.ARRIVED): S.COMPLETE,
    (S.VERIFYING, E.SHORT): S.WAITING_RETRY,
    (S.VERIFYING, E.GIVE_UP): S.FAILED,
    (S.VERIFYING, E.RECLAIM): S.VERIFYING,
    (S.VERIFYING, E.REQUEUED): S.QUERIED,
    (S.WAITING_RETRY, E.RETRY_DUE): S.PENDING,
    (S.WAITING_RETRY, E.GIVE_UP): S.FAILED,
    # relay mode: the first half ends at the local Orthanc, the second at the destination
    (S.PENDING, E.HELD): S.HELD_LOCAL,  # pre-check: the local Orthanc already holds it whole
    (S.QUERIED, E.HELD): S.HELD_LOCAL,
    (S.MOVING, E.HELD): S.HELD_LOCAL,
    (S.VERIFYING, E.HELD): S.HELD_LOCAL,
    (S.HELD_LOCAL, E.FORWARD): S.FORWARDING,
    (S.HELD_LOCAL, E.PRESENT): S.COMPLETE,  # reclaim: the destination holds it whole already
    (S.HELD_LOCAL, E.LOST_LOCAL): S.PENDING,
    (S.HELD_LOCAL, E.GIVE_UP): S.FAILED,
    (S.FORWARDING, E.ARRIVED): S.COMPLETE,  # the destination count proves it (the local copy goes after)
    (S.FORWARDING, E.SHORT): S.HELD_LOCAL,  # the forward failed: again after a back-off, no new move
    (S.FORWARDING, E.RECLAIM): S.HELD_LOCAL,  # found at start-up, the destination short: forward again
    (S.FORWARDING, E.LOST_LOCAL): S.PENDING,
    (S.FORWARDING, E.GIVE_UP): S.FAILED,
}


def next_state(state: State, event: Event) -> State:
    """The state after `event` in `state`; raises IllegalTransition naming both."""
    try:
        return TRANSITIONS[(State(state), Event(event))]
    except KeyError:
        raise IllegalTransition(State(state).value, Event(event).value) from None
