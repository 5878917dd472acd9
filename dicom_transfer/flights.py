"""Moves in flight: what is known of each, and when to look at the destination again.

`Flight` is one series whose move is out (memory only; the journal has the durable part).
`Pace` holds what the run has measured about its moves and the rules that read it: when
a young move is counted (from its predicted end), when a quiet one counts as dropped, and
how long a PACS takes to start a move. `Workers` run blocking moves. No I/O here: the
scheduler counts and writes the journal; these decide.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from .orthanc import JobStatus, is_association_failure
from .states import State

RECOUNT_EVERY_S = 1.0  # `/changes` is a hint: re-count in-flight series at least this often
# A young move (job not ended, younger than HOT_S) is counted at the destination from its
# predicted end (the measured seconds per instance × instances to move) every HOT_POLL_S,
# then ever less often (HOT_BACKOFF × time past that end, up to poll_s): a series is whole
# there before the PACS's final C-MOVE response ends the job, so the count sees it first.
HOT_S, HOT_POLL_S, HOT_BACKOFF = 2.0, 0.002, 0.1
OVERTAKEN_GRACE_S = 0.5  # a later move whole this long, ours acknowledged and empty: ours was dropped
START_GRACE_MIN_S = 0.2  # the least quiet at an otherwise idle PACS that proves a move dropped
# After a proof, while another of our moves keeps the PACS busy, the next move waits this
# share of a series' time (at most SETTLE_MAX_S) for the PACS to end the one just proven.
SETTLE_SHARE, SETTLE_MAX_S = 0.25, 0.1


@dataclass
class Flight:
    """One series whose move is in flight."""

    uid: str
    study_uid: str
    expected: int | None
    attempt: int
    issued_at: float
    baseline: int  # destination count when this attempt was issued
    state: State = State.MOVING  # the row's state in the journal
    job_id: str | None = None
    future: Future[JobStatus] | None = None  # a blocking move running in a worker thread
    job_ended_at: float | None = None
    job_detail: str | None = None
    first_issued_at: float | None = None
    job_succeeded: bool = False
    subset: bool = False  # this attempt moves only the missing instances
    issued_here: bool = True  # False for a move reclaimed from an earlier run
    job_error: str | None = None
    job_dimse: int | None = None
    count: int = 0
    last_growth_at: float = 0.0
    counted_at: float = 0.0
    job_asked_at: float = 0.0  # last `GET /jobs/{id}`: asked at most every poll_s
    first_growth: tuple[float, int] | None = None  # (when, count): the first count above baseline
    alone: bool = False  # nothing else of ours was in flight when it was issued
    limit: int | None = None  # the in-flight limit when it was issued (a loss is charged to it)
    last_growth: tuple[float, int] | None = None  # (when, count): the last count that grew

    @property
    def unreachable(self) -> bool:
        """The move failed because the PACS could not be reached and nothing came: no stall wait."""
        return (
            self.job_ended_at is not None
            and not self.job_succeeded
            and self.count <= self.baseline
            and is_association_failure(self.job_error)
        )


def hot_interval(late: float, poll_s: float) -> float | None:
    """How often to count a move `late` seconds past its predicted end (None: not yet due).

    Every HOT_POLL_S at first, then a tenth of the time already past, up to `poll_s`: the
    end is seen within a few ms when the prediction holds, and a slow move costs a few
    dozen counts, not hundreds.
    """
    if late < 0:
        return None
    return min(poll_s, max(HOT_POLL_S, HOT_BACKOFF * late))


def moving_average(average: float | None, sample: float) -> float:
    return sample if average is None else 0.7 * average + 0.3 * sample


def predicted_end(flight: Flight, s_per_instance: float | None, s_per_delivered: float | None) -> float:
    """When a move should end, slightly early (the hot look counts from then).

    Before anything arrived: from its issue and the whole-move pace of the moves before it
    (association and set-up included). Once it delivers: from its last growing count and
    the pace at which instances arrive, so each count that finds it short aims the next at
    what is left, and a 50-instance move is counted ~3 times instead of every 2 ms from
    15 % before its end. A count that finds no growth moves nothing, so a stall backs off.
    """
    if s_per_instance is None:
        return flight.issued_at + 0.02  # no measure yet: a gentler 20 ms poll
    if flight.last_growth is not None and s_per_delivered is not None and flight.expected:
        at, count = flight.last_growth
        return at + 0.85 * max(1, flight.expected - count) * s_per_delivered
    todo = max(1, (flight.expected or 0) - flight.baseline)
    return flight.issued_at + 0.85 * todo * s_per_instance


class Pace:
    """What the run has measured about its moves (moving averages), and the rules that read it."""

    def __init__(self, poll_s: float, stall_s: float) -> None:
        self.poll_s, self.stall_s = poll_s, stall_s
        self.s_per_instance: float | None = None  # a move's seconds per instance, issue to proof
        self.s_per_delivered: float | None = None  # seconds between arrivals once a move delivers
        self.s_to_first: float | None = None  # a lone move: issue to first arrival
        self.s_per_series: float | None = None  # issue to proof
        self.completions: deque[tuple[float, float]] = deque(maxlen=64)  # (issued_at, proven at)
        self.last_arrival_at = 0.0  # when any in-flight series last grew

    # -- counting -------------------------------------------------------------------------

    def predicted_end(self, flight: Flight) -> float:
        return predicted_end(flight, self.s_per_instance, self.s_per_delivered)

    @staticmethod
    def young_job(flight: Flight, now: float) -> bool:
        """A move whose end is near and only a count will show: looked at from its predicted end.

        A move job still running and younger than HOT_S; or a move the PACS answered
        before sending (an asynchronous PACS) that is delivering, its last growth younger
        than HOT_S: nothing else wakes the loop when its last instance lands, and with one
        move in flight the PACS waits for that. A blocking move still running wakes the
        loop itself when it returns.
        """
        if flight.job_ended_at is None:
            return flight.future is None and now - flight.issued_at < HOT_S
        return (
            flight.last_growth is not None
            and flight.expected is not None
            and flight.count < flight.expected
            and now - flight.last_growth[0] < HOT_S
        )

    def hot_interval(self, flight: Flight, now: float) -> float | None:
        """How often to count a young move now; None while it is not (or no longer) near its end."""
        if not self.young_job(flight, now):
            return None
        return hot_interval(now - self.predicted_end(flight), self.poll_s)

    def next_hot_look(self, flights: Iterable[Flight], now: float) -> float | None:
        """Seconds until a young move should next be counted; None when none is near."""
        waits = []
        for flight in flights:
            if not self.young_job(flight, now):
                continue
            interval = self.hot_interval(flight, now)
            if interval is None:
                waits.append(self.predicted_end(flight) - now)
            else:
                waits.append(flight.counted_at + interval - now)
        return max(HOT_POLL_S / 2, min(waits)) if waits else None

    def count_due(self, flight: Flight, now: float, *, changed: bool, ended: bool) -> bool:
        """Whether to count this flight at the destination in this pass."""
        every = RECOUNT_EVERY_S if flight.job_ended_at is None else min(RECOUNT_EVERY_S, self.stall_s / 4)
        return (
            ended
            or changed
            or now - flight.counted_at >= (self.hot_interval(flight, now) or every)
            # a move that ended short is counted again whenever another one grew
            or (flight.job_ended_at is not None and flight.counted_at < self.last_arrival_at)
        )

    def counted(self, flight: Flight, count: int, now: float) -> bool:
        """Note a count; True when it grew."""
        grew = count > flight.count
        if grew:
            flight.last_growth_at = self.last_arrival_at = now
            flight.last_growth = (now, count)
            if flight.first_growth is None and count > flight.baseline:
                flight.first_growth = (now, count)
        flight.count, flight.counted_at = count, now
        return grew

    def proven(self, flight: Flight, now: float) -> None:
        """A move proven whole: update the measures (moves reclaimed from an earlier run say nothing)."""
        if not flight.issued_here:
            return
        moved = flight.count - flight.baseline
        if moved > 0:
            self.s_per_instance = moving_average(self.s_per_instance, (now - flight.issued_at) / moved)
            if flight.first_growth is not None and flight.count > flight.first_growth[1]:
                at, count = flight.first_growth
                pace = (flight.counted_at - at) / (flight.count - count)
                self.s_per_delivered = moving_average(self.s_per_delivered, pace)
        if flight.alone and flight.first_growth is not None:
            self.s_to_first = moving_average(self.s_to_first, flight.first_growth[0] - flight.issued_at)
        self.completions.append((flight.issued_at, now))
        self.s_per_series = moving_average(self.s_per_series, now - flight.issued_at)

    @staticmethod
    def pacs_done(flight: Flight) -> bool:
        """Whether the PACS has ended this move: its final answer came after the series' instances.

        An asynchronous PACS answers before it sends (the answer says nothing of the end),
        and a move proven by its count may be whole before the PACS's final answer.
        """
        if flight.job_ended_at is None:
            return False
        return flight.first_growth is None or flight.job_ended_at >= flight.first_growth[0]

    def settle_s(self) -> float:
        """How long to leave a PACS to end a move (answer, release) before the next goes out."""
        return min(SETTLE_MAX_S, SETTLE_SHARE * (self.s_per_series or 0.0))

    # -- drops ----------------------------------------------------------------------------

    def dropped(self, flight: Flight, flights: Iterable[Flight], now: float) -> bool:
        """Acknowledged, nothing came, and the PACS has moved on: dropped.

        PACS serve their move queue in order; waiting `stall_s` after the whole queue went
        quiet would find the drop only at the end of a busy pipeline. Either a move issued
        after it is *whole* for OVERTAKEN_GRACE_S or `start_grace`, whichever is shorter
        (not merely delivering: moves sent together may reach the PACS in either order,
        and one queued behind it starts once it is done), or nothing of ours issued before
        it is still in flight and the PACS has been quiet for longer than a move takes to
        start there (`start_grace`).
        """
        if not (
            flight.job_ended_at is not None
            and flight.job_succeeded
            and flight.count <= flight.baseline
            and flight.counted_at >= self.last_arrival_at  # our count is not older than theirs
            and now - flight.job_ended_at >= OVERTAKEN_GRACE_S
        ):
            return False
        later = [at for issued, at in self.completions if issued > flight.issued_at]
        if later:  # had ours been queued behind it, it would have started by now
            return now - min(later) >= min(OVERTAKEN_GRACE_S, self.start_grace())
        if any(f.issued_at < flight.issued_at for f in flights if f is not flight):
            return False
        quiet_since = max(self.last_arrival_at, flight.issued_at, flight.job_ended_at)
        return now - quiet_since >= self.start_grace()

    def start_grace(self) -> float:
        """How long a PACS with nothing else of ours may stay quiet before a move counts as dropped.

        Four times the measured time from a lone move's issue to its first arrival (at
        least START_GRACE_MIN_S), and never longer than `stall_s`. A PACS serving its
        queue in order starts the next move as soon as the one before it ends.
        """
        if self.s_to_first is None:
            return self.stall_s
        return min(self.stall_s, max(START_GRACE_MIN_S, 4 * self.s_to_first))


class Workers:
    """Daemon threads for blocking calls. An idle one takes the next call, so a move does
    not wait for a thread to start (~0.1 ms); another starts only when all are busy.
    Daemons, so a hung move never blocks exit; one idle for IDLE_S ends.
    """

    IDLE_S = 30.0

    def __init__(self, name: str) -> None:
        self.name = name
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []  # idle workers' inboxes
        self._lock = threading.Lock()
        self.started = 0

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            self.started += 1
            name = f"{self.name}-{self.started}"
            threading.Thread(target=self._serve, args=(inbox,), name=name, daemon=True).start()
        inbox.put(job)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            try:
                job = inbox.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                continue  # handed a job just as the wait ran out
            job()
            with self._lock:
                self._idle.append(inbox)
