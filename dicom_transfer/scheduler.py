"""The scheduler: series through their states, a bounded few at a time, each proven.

States, events and the transition table live in `states.py` (re-exported here); the
journal applies each transition as one guarded transaction. This module decides *when*:
queries run a little ahead of the moves, at most `limit` moves are in flight (AIMD,
`throttle.py`), every wait has a deadline, and nothing is complete without a count.
"""

from __future__ import annotations

import heapq
import json
import queue
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from .cget import every_get_silent, refused_as_such, sent_nothing, silent_reason
from .config import Config
from .errors import DestinationUnknown, JournalFull, MoveRefused, OrthancError, Unreachable
from .flights import HOT_POLL_S, OVERTAKEN_GRACE_S, Flight, Pace, Workers, hot_interval, predicted_end
from .issuing import IssuePolicy
from .journal import Journal, SeriesRow
from .lookahead import Lookahead
from .orthanc import (
    BLOCKING,
    GET_JOB,
    Destination,
    JobStatus,
    LocalOrthanc,
    SeriesAnswer,
    choose_move_method,
    dimse_from_error,
)
from .parties import Parties
from .pause import Pause
from .relay import Forwarded, Relay
from .retry import ELSEWHERE_WAIT_S, FREE_REQUEUES, RetryPolicy
from .runlock import SeriesClaims
from .states import TRANSITIONS, Event, State, next_state
from .verify import Decision, Observation, Verdict, judge

__all__ = [
    "TRANSITIONS", "Event", "State", "next_state", "Scheduler", "RunResult", "short_uid",
    # re-exported from flights.py for callers that knew them here
    "HOT_POLL_S", "OVERTAKEN_GRACE_S", "Flight", "Workers", "hot_interval", "predicted_end",
]  # fmt: skip

log = structlog.get_logger("dicom_transfer")

CHANGES_EVERY_S = 0.2  # while jobs run, ask the destination's `/changes` at most this often
PENDING_CHUNK = 64  # pending rows read per SELECT (only this loop moves rows out of `pending`)
PROGRESS_EVERY_S = 0.5  # progress callbacks (a COUNT over the journal) at most this often


def short_uid(uid: str) -> str:
    """The tail of a UID, enough to tell series apart in logs."""
    return uid if len(uid) <= 12 else "…" + uid[-10:]


@dataclass
class RunResult:
    """How a run ended: `stopped` means work is left (exit 3)."""

    stopped: bool = False
    stop_reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)


class AfterArrival(Protocol):
    """Optional steps on each proven-complete series (export, tags, anonymisation).

    `run` must be idempotent and resumable (it keeps its own state in the journal's
    database); `pending` lists complete series whose steps are not done yet.
    """

    def run(self, series_uid: str) -> bool:
        """False when the series' steps must wait (their disk is full): it is offered again later."""
        ...

    def pending(self) -> list[str]: ...

    def waiting(self, now: float, limit_s: float) -> str | None:
        """A stop reason once the steps have waited longer than `limit_s` (for room); else None."""
        ...

    def copy_count(self, series_uid: str) -> int:
        """Instances of the series' anonymised copy at the destination (0 when none)."""
        ...


class StopFlag:
    """Set from a signal handler; the loop stops issuing and returns."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


class Scheduler:
    """Drives every series of a journal to `complete` or `failed`."""

    def __init__(
        self,
        cfg: Config,
        journal: Journal,
        local: LocalOrthanc,
        dest: Destination,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        until_window_end: bool = False,
        stop: StopFlag | None = None,
        on_progress: Callable[[dict[str, int]], None] | None = None,
        rng: random.Random | None = None,
        after: AfterArrival | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.cfg = cfg
        self.t = cfg.transfer
        self.journal = journal
        self.local = local
        self.dest = dest
        self.clock = clock
        self.sleep = sleep
        self.until_window_end = until_window_end
        self.stop = stop if stop is not None else StopFlag()  # a StopFlag is falsy until set
        self.on_progress = on_progress
        self.policy = IssuePolicy(self.t, cfg.window, clock)  # limit, window, parties' pauses
        self.throttle = self.policy.throttle
        self.retry = RetryPolicy(self.t.backoff_s, self.t.backoff_max_s, rng)
        self.pace = Pace(self.t.poll_s, self.t.stall_s)  # measures of the moves; counts and drops
        self.parties = Parties(cfg, journal, local, dest, self.policy)  # source down, destination full
        self.flights: dict[str, Flight] = {}
        self.method = self.t.move_method
        self.change_mark = 0
        # Rows in `queried`, by batch order (seq), as last written: the next move needs no SELECT.
        self._ready: list[tuple[int, SeriesRow]] = []
        self._progress_at = 0.0
        self._changes_at = 0.0
        self._moved_ok = False  # a move of this run delivered: 0xA801 is then not a config error
        self._series_only: set[str] = set()
        self._returned: queue.SimpleQueue[None] = queue.SimpleQueue()  # a blocking move or a list returned
        self._listers = Workers("list")
        self.lookahead = Lookahead(
            local, dest, cfg.source.modality, clock, spawn=self._listers.run, wake=lambda: self._returned.put(None)
        )
        # Series in flight on this machine, shared with other runs to the same destination.
        self.claims = SeriesClaims(f"{cfg.destination_url()}|{cfg.destination.aet}")
        self.after = after
        # Relay mode: `dest` is the local Orthanc (where moves land), `relay` forwards to the destination.
        self.relay = relay
        self.target_aet = relay.store.aet() if relay is not None else cfg.destination.aet
        if relay is not None:
            relay.wake = lambda: self._returned.put(None)  # a forward ended: the loop writes it
        self.after_queue: deque[str] = deque(after.pending() if after else ())
        self._mover: LocalOrthanc | None = None  # own client for blocking moves' threads
        self._workers = Workers("move")
        self._pending: deque[SeriesRow] = deque()  # the next `pending` rows, read in chunks
        self._left_queried: set[str] = set()
        self._first_alone = True  # the first query of the run asks one series, not a list
        self._told: list[tuple[Callable[..., Any], str, dict[str, Any]]] = []  # logged once the pass is done

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run until every series is complete or failed, or until told to stop."""
        if self.method == "auto":
            self.method = choose_move_method(self.local.version(), self.t.retrieve)
        self.change_mark = self.dest.last_change()
        self.journal.defer_checkpoints()
        learned = self.journal.meta("throttle")
        if learned:  # a resumed run starts at the learned limit and ceiling
            self.throttle.restore(json.loads(learned))
        self.journal.record("run.start", {"method": self.method, **self.throttle.snapshot()})
        log.info("run.start", method=self.method, max_in_flight=self.t.max_in_flight)
        self._reclaim()
        self._ready = [(row.seq, row) for row in self.journal.rows(State.QUERIED)]
        # Left `queried` by a run that stopped between a move and its record: counted first.
        self._left_queried = {row.uid for _, row in self._ready}
        self.retry.next_due = self.journal.next_retry_at()
        result = RunResult()
        full = False  # the journal's disk: nothing more can be written, the next run reclaims
        try:
            result = self._loop()
        except Unreachable as exc:
            result = RunResult(True, f"a party stopped answering: {exc}")
            raise
        except JournalFull:
            full = True
            raise
        finally:
            if not full:
                self.journal.flush()  # proofs made in the last pass
            self._log_told()
            self.claims.close()
            self._last_deletes()
            if not full:
                result.counts = self.journal.counts()
                self.journal.record("run.stop", {"stopped": result.stopped, "reason": result.stop_reason})
        return result

    def _loop(self) -> RunResult:
        result = RunResult()
        while True:
            now = self.clock()
            if self.stop:
                result = RunResult(True, self.stop.reason)
                break
            open_now = self.policy.window_open(now)
            held = self.relay is not None and bool(self.relay.held)  # forwards touch no PACS: they drain first
            if not open_now and not self.flights and self.until_window_end and not held:
                result = RunResult(True, "outside the time window")
                break
            gone = None if self.flights else self.policy.gone_too_long(now) or self._relay_stuck(now, open_now)
            if gone:
                result = RunResult(True, gone)
                break
            progressed = self._release_retries(now)
            # Judge the flights first: a series proven whole frees its slot, and the next
            # one (queried ahead while the last one moved) goes out in the same pass.
            progressed |= self._poll_flights()
            progressed |= self._relay_step(now)
            if open_now and self.parties.source_up(now) and self.parties.destination_up(now):
                progressed |= self._issue()
                progressed |= self._query_ahead()
            self.journal.flush()  # proofs no next move carried (the last one, a closed window)
            self._log_told()
            self.journal.checkpoint()  # now that the next move is out
            if not self.flights and self._nothing_left():
                self._drain_after()
                if not self.after_queue or self.after is None:
                    break
                if self.stop:
                    continue  # stopped while steps were left: a stop, not an end
                waited = self.after.waiting(now, self.t.unreachable_s)
                if waited:
                    result = RunResult(True, waited)
                    break
                self._idle(open_now)  # the steps wait for room: only they are left
                continue
            if not progressed and not self._after_one():
                self._idle(open_now)
        return result

    def _tell(self, event: str, warn: bool = False, **fields: Any) -> None:
        """An info event of the hot path, logged at the end of the loop pass.

        Between the proof of one series and the move of the next, rendering and writing
        a log line cost ~0.1-0.2 ms each (caches are cold after a move); at the end of
        the pass the next move is already on its way. Order is kept; nothing is dropped.
        """
        self._told.append((log.warning if warn else log.info, event, fields))

    def _log_told(self) -> None:
        told, self._told = self._told, []
        for say, event, fields in told:
            say(event, **fields)

    def _after_one(self) -> bool:
        """Run the after-arrival steps of one series, in the gaps while moves run."""
        if not self.after_queue or self.after is None:
            return False
        uid = self.after_queue.popleft()
        if self.after.run(uid):
            return True
        self.after_queue.append(uid)  # its steps wait (no room for their files): offered again later
        return False

    def _drain_after(self) -> None:
        while not self.stop and self._after_one():
            pass

    def _nothing_left(self) -> bool:
        return not self._ready and not self._pending and not self.journal.has_work()

    def _idle(self, open_now: bool) -> None:
        """Sleep until something may change: a poll tick, a due retry or the window."""
        now = self.clock()
        if not self.flights:
            wakeups = [self.journal.next_retry_at(), *self.policy.wakeups(now, open_now)]
            if self.relay is not None:
                wakeups.append(self.relay.next_due())
            future = [w - now for w in wakeups if w is not None and w > now]
            wait = min(future) if future else self.t.poll_s
            wait = max(self.t.poll_s, min(wait, 5.0))  # wake up now and then for signals
            self._report_progress()
            self._nap(wait)
            return
        hot = self.pace.next_hot_look(self.flights.values(), now)
        self._report_progress()
        running = [f.future for f in self.flights.values() if f.future is not None and not f.future.done()]
        if running and len(running) == len(self.flights):
            # Only blocking moves in flight: wake up the moment one returns, or to count.
            try:  # every blocking move posts here when it returns (a stale post: one spare pass)
                self._returned.get(timeout=hot if hot is not None else self.t.poll_s * 20)
            except queue.Empty:
                pass
            return
        self._nap(self.t.poll_s if hot is None else min(self.t.poll_s, hot))

    def _nap(self, seconds: float) -> None:
        """Sleep; while a list C-FIND runs on a worker, wake up as soon as it is done."""
        if not self.lookahead.busy() and not (self.relay is not None and self.relay.busy):
            self.sleep(seconds)
            return
        try:
            self._returned.get(timeout=seconds)
        except queue.Empty:
            pass

    def _report_progress(self) -> None:
        now = time.monotonic()
        if self.on_progress is not None and now - self._progress_at >= PROGRESS_EVERY_S:
            self._progress_at = now
            info = self.journal.counts()
            info["instances"] = self.journal.totals()["instances"]
            info["limit"] = self.throttle.limit
            self.on_progress(info)

    # -- start-up: reclaim what a previous run left in flight -----------------------

    def _reclaim(self) -> None:
        """Rows left `moving`/`verifying` are verified again, never assumed complete."""
        if self.relay is not None:
            self._reclaim_relay()
        now = self.clock()
        for row in self.journal.rows(State.MOVING, State.VERIFYING):
            count = self.dest.count(row.uid)
            self.journal.transition(row.uid, row.state, Event.RECLAIM, f"count={count}", received=count)
            flight = Flight(
                uid=row.uid,
                study_uid=row.study_uid or "",
                expected=row.expected,
                attempt=row.attempts,
                issued_at=now,
                baseline=count,
                job_id=row.job_id,
                job_ended_at=now,
                job_succeeded=False,
                count=count,
                last_growth_at=now,
                state=State.VERIFYING,
                first_issued_at=row.first_issued_at,
                issued_here=False,
            )
            if row.job_id:
                status = self.local.job_status(row.job_id)
                if not status.ended:
                    flight.job_ended_at = None  # still running in the local Orthanc: keep waiting
                flight.job_succeeded = status.succeeded
            self.claims.take(row.uid)  # ours: the run that moved it is gone (it held the journal)
            self.flights[row.uid] = flight
            log.info("series.reclaimed", series=short_uid(row.uid), count=count, expected=row.expected)

    # -- relay mode: held at the local Orthanc, forwarded to the destination ------------

    def _held(self, uid: str, state: State, count: int, expected: int, first_issued_at: float | None,
              *, defer: bool = False, **fields: Any) -> None:  # fmt: skip
        """The local count proves the series whole: `held_local`, and in line for its forward."""
        assert self.relay is not None
        self.journal.transition(
            uid, state, Event.HELD, f"count={count} at local", defer=defer,
            received=count, reason=None, next_attempt_at=None, **fields,
        )  # fmt: skip
        self.relay.hold(uid, expected, first_issued_at)

    def _at_destination(self, row: SeriesRow, answer: SeriesAnswer, expected: int) -> bool:
        """Relay pre-check: the destination already holds the series whole → complete, no move."""
        assert self.relay is not None
        self.relay.dest.hint(row.uid, answer.patient_id, answer.study_uid)
        have = self._with_copy(row.uid, self.relay.dest.count(row.uid, lookup=False), expected)  # across the link
        if have < expected:
            return False
        self._present(row.uid, State.PENDING, have, f"count={have} at destination",
                      study_uid=answer.study_uid, expected=expected)  # fmt: skip
        return True

    def _relay_step(self, now: float) -> bool:
        """Write what the forward worker found, and hand it the next held series."""
        relay = self.relay
        if relay is None:
            return False
        progressed = False
        for done in relay.results():
            self._forwarded(done)
            progressed = True
        progressed |= relay.delete_left(now) > 0
        held = relay.take(now)
        if held is not None:
            attempt = held.tries + 1
            self.journal.transition(held.uid, State.HELD_LOCAL, Event.FORWARD, f"attempt={attempt}")
            relay.start(held)
            self._tell("forward.started", series=short_uid(held.uid), expected=held.expected, attempt=attempt)
            progressed = True
        return progressed

    def _forwarded(self, done: Forwarded) -> None:
        assert self.relay is not None
        now = self.clock()
        held = self.relay.held.get(done.uid)
        if held is None:  # pragma: no cover - every forward starts from a held series
            return
        if done.outcome == "arrived":
            self.relay.finished(done.uid)
            if self.relay.out:  # the destination takes forwards again
                paused_s = round(self.relay.out.end(), 1)
                self.journal.record("destination.stores", {"paused_s": paused_s})
                log.info("destination.stores", paused_s=paused_s)
            first = held.first_issued_at
            self.journal.transition(
                done.uid, State.FORWARDING, Event.ARRIVED, f"count={done.count} sent={done.sent}",
                received=done.count, verified="count", finished_at=now,
                seconds=(now - first) if first else None, reason=None, next_attempt_at=None,
            )  # fmt: skip
            self._tell("series.complete", series=short_uid(done.uid), received=done.count, expected=held.expected,
                       forwarded=done.sent, forward_s=round(done.seconds, 3), local_deleted=done.deleted)  # fmt: skip
            if not done.deleted:
                self.relay.left_behind(done.uid, now)
            if self.after is not None:
                self.after_queue.append(done.uid)
            return
        if done.outcome == "lost":
            self.relay.finished(done.uid)
            if self.retry.free_requeue(done.uid) is None:  # lost again and again: not a passing fault
                final = f"{done.reason} (lost at the local Orthanc {FREE_REQUEUES + 1} times in this run)"
                self.journal.transition(done.uid, State.FORWARDING, Event.GIVE_UP, final, reason=final)
                log.warning("series.failed", series=short_uid(done.uid), reason=final)
                return
            self.journal.transition(done.uid, State.FORWARDING, Event.LOST_LOCAL, done.reason,
                                    received=0, reason=done.reason)  # fmt: skip
            self._pending.clear()  # back in `pending`: read again, in batch order
            log.warning("series.lost_local", series=short_uid(done.uid), why=done.reason)
            return
        held.tries += 1
        held.failures += 1 if done.refused else 0
        reason = done.reason or "forward short"
        if done.out and self.relay.out.begin(reason):  # not the series' fault: moves go on, the run may stop
            event = "destination.full" if done.full else "destination.unreachable"
            self.journal.record(event, {"why": reason})
            log.warning(event, why=reason, destination=self.relay.dest.url)
        if held.failures >= self.t.max_attempts:
            self.relay.finished(done.uid)
            final = f"{reason} after {held.failures} forwards"
            self.journal.transition(done.uid, State.FORWARDING, Event.GIVE_UP, final, reason=final)
            log.warning("series.failed", series=short_uid(done.uid), reason=final)
            return
        when = now + self.retry.backoff(held.tries)
        self.journal.transition(done.uid, State.FORWARDING, Event.SHORT, reason, reason=reason, next_attempt_at=when)
        self.relay.hold(done.uid, held.expected, held.first_issued_at, at=when)
        log.info("forward.retry", series=short_uid(done.uid), why=reason, retry_in=round(when - now, 1))

    def _reclaim_relay(self) -> None:
        """Rows left `forwarding`/`held_local`: the destination is counted first, nothing sent twice."""
        assert self.relay is not None
        for row in self.journal.rows(State.FORWARDING, State.HELD_LOCAL):
            expected = row.expected or row.received
            if row.patient_id is not None and row.study_uid:
                self.relay.dest.hint(row.uid, row.patient_id, row.study_uid)
            count = self.relay.dest.count(row.uid)
            if count >= expected:
                self.relay.store.delete_series(row.uid)  # proven whole at the destination: the local copy goes
                event = Event.ARRIVED if row.state is State.FORWARDING else Event.PRESENT
                now = self.clock()
                self.journal.transition(
                    row.uid, row.state, event, f"count={count} at destination (reclaimed)",
                    received=count, verified="count", finished_at=now, reason=None, next_attempt_at=None,
                    seconds=(now - row.first_issued_at) if row.first_issued_at else None,
                )  # fmt: skip
                log.info("series.reclaimed", series=short_uid(row.uid), count=count, at="destination")
                if self.after is not None:
                    self.after_queue.append(row.uid)
                continue
            if row.state is State.FORWARDING:
                self.journal.transition(row.uid, State.FORWARDING, Event.RECLAIM, f"count={count} at destination")
            self.relay.hold(row.uid, expected, row.first_issued_at)
            log.info("series.reclaimed", series=short_uid(row.uid), count=count, expected=expected, at="local")

    def _relay_stuck(self, now: float, open_now: bool) -> str | None:
        """Why the run must stop: series wait for room at the local Orthanc that no forward can make,
        or the destination has taken no forward for `unreachable_s` and no move is left to make now."""
        if self.relay is None:
            return None
        stuck = self.relay.stuck(now, self.t.unreachable_s) if self._ready else None
        if stuck is None and self.relay.out.too_long(now, self.t.unreachable_s):
            counts = self.journal.counts()
            moves_left = open_now and bool(self._ready or self._pending or counts["pending"] or counts["queried"])
            stuck = self.relay.gone(now, self.t.unreachable_s, moves_left)
        return stuck

    def _last_deletes(self) -> None:
        """One more try at the local copies whose delete failed; those still there are named."""
        if self.relay is None or not self.relay.left:
            return
        self.relay.delete_left(self.clock(), all_now=True)
        if self.relay.left:
            log.warning("relay.local_left", count=len(self.relay.left),
                        series=[short_uid(uid) for uid in sorted(self.relay.left)[:20]],
                        why="complete at the destination; deleting the local copy failed")  # fmt: skip

    # -- retries ----------------------------------------------------------------------

    def _release_retries(self, now: float) -> bool:
        if self.retry.next_due is None or now < self.retry.next_due:
            return False  # known from memory: no query on every pass of the loop
        due = self.journal.due_retries(now)
        for row in due:
            self.journal.transition(row.uid, State.WAITING_RETRY, Event.RETRY_DUE)
        if due:
            self._pending.clear()  # back in `pending`, ahead of later rows: read again
        self.retry.next_due = self.journal.next_retry_at()
        return bool(due)

    # -- queries (a small look-ahead before the moves) ---------------------------------

    def _query_ahead(self) -> bool:
        want = self.t.lookahead + self.throttle.limit - len(self._ready)
        if want <= 0:
            return False
        self.lookahead.collect()
        rows = self._next_pending(want)
        if self.lookahead.waits_for(rows):  # their list C-FIND is on its way
            self._pending.extendleft(reversed(rows))
            return False
        if self._first_alone and not self.flights and not self._ready and len(rows) > 1:
            # Nothing moves and nothing is ready (the run's start): the first series is asked
            # alone so that its move starts now; the list C-FIND for the rest runs during it.
            self._first_alone = False
            self._pending.extendleft(reversed(rows[1:]))
            rows = rows[:1]
            self._query(rows[0])
            return True
        size = self.lookahead.size(self.pace.s_per_series, self.throttle.limit)
        if self.lookahead.wants(rows):
            self.lookahead.ask(self.journal.rows(State.PENDING, limit=size))
            if self.lookahead.waits_for(rows):
                self._pending.extendleft(reversed(rows))
                return False
        for row in rows:
            known = self.lookahead.take(row.uid)
            if known is not None:
                self._use_answer(row, known.answer, known.have, listed=known.checked)
            else:
                self._query(row)  # not in a list answer (or too old): one C-FIND decides
        if rows and self.lookahead.low(size):  # the next list, while the answers in hand are moved
            self.lookahead.ask(self.journal.rows(State.PENDING, limit=self.lookahead.held() + size))
        return bool(rows)

    def _next_pending(self, want: int) -> list[SeriesRow]:
        """The next `want` pending rows in batch order, from one SELECT per PENDING_CHUNK."""
        if len(self._pending) < want:
            self._pending = deque(self.journal.rows(State.PENDING, limit=max(want, PENDING_CHUNK)))
        return [self._pending.popleft() for _ in range(min(want, len(self._pending)))]

    def _query(self, row: SeriesRow) -> None:
        source = self.cfg.source.modality
        try:
            answers = self.local.find_series(source, row.uid, row.study_uid)
        except Unreachable:
            raise
        except OrthancError as exc:
            hint = "" if row.study_uid else " (a hierarchical PACS needs the StudyInstanceUID in the batch)"
            self._query_failed(row, f"C-FIND failed: {exc.details or exc.message}{hint}")
            return
        answer = next((a for a in answers if a.series_uid == row.uid), None)
        if answer is None:
            self.journal.transition(row.uid, State.PENDING, Event.NOT_FOUND, reason="not found at source")
            log.warning("series.not_found", series=short_uid(row.uid))
            return
        self._use_answer(row, answer)

    def _use_answer(self, row: SeriesRow, answer: SeriesAnswer, have: int | None = None, listed: bool = False) -> None:
        """Record the source's count (or skip a series the destination already holds whole).

        `have`: the destination's count when already known; `listed`: the batch count of a
        list query did not see it, so no lookup under another PatientID is needed.
        """
        expected, sop_uids = answer.expected, None
        if expected is None:
            sop_uids = self._source_instances(answer.study_uid, row.uid)
            expected = len(sop_uids) if sop_uids else None
        self.dest.hint(row.uid, answer.patient_id, answer.study_uid)
        if self.relay is not None and expected is not None and self._at_destination(row, answer, expected):
            return
        if have is None:
            have = self.dest.count(row.uid, lookup=not listed)
        if self.relay is None:  # in relay mode moves land at the local Orthanc: no copy is made there
            have = self._with_copy(row.uid, have, expected)
        if expected is not None and have >= expected:
            self._whole(row, State.PENDING, have, expected, study_uid=answer.study_uid)
            return
        sop = tuple(sorted(sop_uids)) if sop_uids else None
        self.journal.transition(
            row.uid, State.PENDING, Event.QUERIED, f"expected={expected} have={have}",
            study_uid=answer.study_uid, expected=expected, received=have, sop_uids=sop,
        )  # fmt: skip
        queried = replace(row, state=State.QUERIED, study_uid=answer.study_uid, expected=expected,
                          received=have, sop_uids=sop)  # fmt: skip
        heapq.heappush(self._ready, (row.seq, queried))

    def _with_copy(self, uid: str, have: int, expected: int | None) -> int:
        """The destination's count of a series, or of its anonymised copy when the original is short there.

        With anonymize.delete_original the original is gone from the destination once done.
        """
        if expected is not None and have < expected and self.after is not None:
            return max(have, self.after.copy_count(uid))
        return have

    def _whole(self, row: SeriesRow, state: State, have: int, expected: int, **fields: Any) -> None:
        """Whole where moves land before any move: held for its forward in relay mode, else complete."""
        if self.relay is not None:
            self._held(row.uid, state, have, expected, row.first_issued_at, **fields)
        else:
            self._present(row.uid, state, have, f"count={have}", **{**fields, "expected": expected})

    def _present(self, uid: str, state: State, have: int, detail: str, **fields: Any) -> None:
        """The destination already holds the series whole: complete without a move."""
        self.journal.transition(
            uid, state, Event.PRESENT, detail, received=have, verified="count", finished_at=self.clock(), **fields
        )
        log.info("series.present", series=short_uid(uid), count=have)
        if self.after is not None:
            self.after_queue.append(uid)

    def _source_instances(self, study_uid: str, series_uid: str) -> set[str] | None:
        """IMAGE-level C-FIND, or None when the source refuses it."""
        try:
            return set(self.local.find_instances(self.cfg.source.modality, study_uid, series_uid))
        except Unreachable:
            raise
        except OrthancError as exc:
            log.info("series.image_query_refused", series=short_uid(series_uid), error=exc.message)
            return None

    def _query_failed(self, row: SeriesRow, reason: str) -> None:
        if self.parties.source_failure(reason):  # not this series' fault: no attempt spent
            self._paused(row.uid, State.PENDING, "source unreachable", self.policy.source)
            return
        attempts = row.attempts + 1
        if attempts >= self.t.max_attempts:
            self.journal.transition(row.uid, State.PENDING, Event.GIVE_UP, reason=reason, attempts=attempts)
            log.warning("series.failed", series=short_uid(row.uid), reason=reason)
            return
        when = self.clock() + self.retry.backoff(attempts)
        self.journal.transition(
            row.uid, State.PENDING, Event.SHORT, reason,
            attempts=attempts, next_attempt_at=self.retry.note(when), reason=reason,
        )  # fmt: skip
        log.info("series.query_retry", series=short_uid(row.uid), attempt=attempts, error=reason)

    # -- moves ------------------------------------------------------------------------

    def _issue(self) -> bool:
        if self.relay is not None and self._ready and self.relay.full(self.clock()):
            return False  # the local Orthanc holds relay.max_local_gb: moves wait for forwards to free it
        issued = False
        while self._ready and self.throttle.may_issue(len(self.flights)):
            self._start(heapq.heappop(self._ready)[1])
            issued = True
        return issued

    def _missing(self, row: SeriesRow) -> list[str] | None:
        """SOPInstanceUIDs to move when the destination already holds part of the series."""
        if row.received <= 0:
            return None
        source = set(row.sop_uids) if row.sop_uids else self._source_instances(row.study_uid or "", row.uid)
        if not source:
            return None
        missing = sorted(source - self.dest.sop_uids(row.uid))
        return missing or None

    def _claim(self, row: SeriesRow) -> SeriesRow | None:
        """The row, free to move; None when another run moves it (it is looked at again later).

        Another run on this machine holding the series waits this one out. When another
        run to the same destination is alive, part of the series is there already (perhaps
        arriving from a run elsewhere), or a previous run left it `queried` (it may have
        stopped after sending the move, before recording it), the destination is counted
        first: whole is complete without a move, a count that changed since the query is
        left to settle.
        """
        if not self.claims.take(row.uid):
            self._elsewhere(row, "in flight in another run on this machine")
            return None
        left = row.uid in self._left_queried
        self._left_queried.discard(row.uid)
        if row.received <= 0 and not self.claims.others() and not left:
            return row
        count = self.dest.count(row.uid)
        if row.expected is not None and count >= row.expected:
            self.claims.release(row.uid)
            self._whole(row, State.QUERIED, count, row.expected)
            return None
        if count != row.received:
            self.claims.release(row.uid)
            self._elsewhere(row, f"arriving at the destination ({row.received} -> {count} instances)")
            return None
        return row

    def _elsewhere(self, row: SeriesRow, why: str) -> None:
        """Another run moves this series: look again after ELSEWHERE_WAIT_S (no attempt spent)."""
        when = self.retry.note(self.clock() + ELSEWHERE_WAIT_S)
        self.journal.transition(
            row.uid, State.QUERIED, Event.SHORT, why, reason=f"waiting: {why}", next_attempt_at=when
        )
        log.info("series.elsewhere", series=short_uid(row.uid), why=why)

    def _start(self, row: SeriesRow) -> None:
        if self._claim(row) is None:
            return
        now = self.clock()
        attempt = row.attempts + 1
        baseline = row.received  # counted by the query's pre-check, moments ago
        subset = None if row.uid in self._series_only else self._missing(row)
        self.throttle.issued()
        flight = Flight(row.uid, row.study_uid or "", row.expected, attempt, now, baseline)
        flight.count, flight.last_growth_at, flight.counted_at = baseline, now, now
        flight.first_issued_at = row.first_issued_at or now
        flight.subset = bool(subset)
        flight.alone, flight.limit = not self.flights, self.throttle.limit
        self.flights[row.uid] = flight

        def issued(job_id: str | None) -> None:
            # Recorded (with its job id) once sent and before it is waited on: a crash in
            # between leaves a `queried` row that the next run counts before moving it (see
            # `_claim`): never a lost move, nor a `moving` row with no job.
            self.journal.transition(
                row.uid, State.QUERIED, Event.ISSUED,
                f"attempt={attempt}" + (f" instances={len(subset)}" if subset else ""),
                attempts=attempt, issued_at=now, move_method=self.method, job_id=job_id,
                first_issued_at=row.first_issued_at or now,
            )  # fmt: skip

        if self.method == BLOCKING:
            flight.future = self._spawn_blocking_move(row.study_uid or "", row.uid, subset)
            issued(None)  # while the worker sends it
            self._tell("move.issued", series=short_uid(row.uid), attempt=attempt, expected=row.expected,
                       instances=len(subset) if subset else None)  # fmt: skip
            return
        try:
            job = self.local.start_move(
                self.method, self.cfg.source.modality, self.target_aet,
                row.study_uid or "", row.uid, self.t.move_timeout_s, subset,
            )  # fmt: skip
        except Unreachable:
            del self.flights[row.uid]  # nothing was issued: the row stays `queried`
            self.claims.release(row.uid)
            raise
        except OrthancError as exc:
            issued(None)
            self._refused(flight, exc)
            return
        except MoveRefused as exc:
            issued(None)
            self._short(flight, State.MOVING, Decision(Verdict.SHORT, reason=f"move refused: {exc}"))
            return
        # Its status is asked after poll_s, not at once: a job just created is running, and
        # the GET would land on the local Orthanc as it starts the move (~0.5 ms a series).
        flight.job_id, flight.job_asked_at = job, self.clock()
        issued(job)
        self._tell(
            "move.issued", series=short_uid(row.uid), attempt=attempt, expected=row.expected,
            instances=len(subset) if subset else None, job=job,
        )  # fmt: skip

    def _spawn_blocking_move(self, study_uid: str, series_uid: str, subset: list[str] | None) -> Future[JobStatus]:
        """Run a synchronous C-MOVE on a worker thread; the future holds its outcome."""
        if self._mover is None:
            self._mover = self.local.clone()
        mover, future = self._mover, Future[JobStatus]()
        source, target = self.cfg.source.modality, self.target_aet
        args = (source, target, study_uid, series_uid, self.t.move_timeout_s, subset)

        def work() -> None:
            try:
                future.set_result(mover.move_blocking(*args))
            except Unreachable as exc:
                if "cannot connect" in exc.message:  # the local Orthanc itself is gone: stop (exit 3)
                    future.set_exception(exc)
                else:
                    future.set_result(JobStatus("Failure", f"no answer to the move: {exc.message}"))
            except OrthancError as exc:  # no answer in time: the count will tell
                future.set_result(JobStatus("Failure", f"no answer to the move: {exc.message}"))
            except BaseException as exc:  # pragma: no cover - surfaced in the main thread
                future.set_exception(exc)
            finally:
                self._returned.put(None)  # wake the loop

        self._workers.run(work)
        return future

    def _refused(self, flight: Flight, exc: OrthancError) -> None:
        status = dimse_from_error(exc)
        self._check_a801(status)
        flight.job_dimse = status
        self._short(flight, State.MOVING, Decision(Verdict.SHORT, reason=f"move refused: {exc.details or exc.message}"))

    # -- watching the flights ------------------------------------------------------------

    def _poll_flights(self) -> bool:
        if not self.flights:
            return False
        now = self.clock()
        ended = {f.uid for f in list(self.flights.values()) if self._poll_job(f, now)}
        changed = False
        # A blocking move wakes the loop when it returns; counts while it runs only matter
        # to judge a move that ended short (stall clock, overtaken moves) or a move job.
        watch = any(
            f.future is None or (f.job_ended_at is not None and f.uid not in ended) for f in self.flights.values()
        )
        if watch and now - self._changes_at >= CHANGES_EVERY_S:
            # A hint, not proof: it says when a re-count is worth its REST call.
            changed, self.change_mark = self.dest.changed_since(self.change_mark)
            self._changes_at = now
        progressed = bool(ended)
        for flight in list(self.flights.values()):
            if self.pace.count_due(flight, now, changed=changed, ended=flight.uid in ended):
                self._recount(flight, now)
            state = flight.state
            decision = judge(
                Observation(
                    expected=flight.expected,
                    count=flight.count,
                    issued_at=flight.issued_at,
                    # A PACS still sending (any series) is working through its queue: ours
                    # may simply be next, so the stall clock runs from the last arrival.
                    last_growth_at=max(flight.last_growth_at, self.pace.last_arrival_at),
                    job_ended_at=flight.job_ended_at,
                    job_succeeded=flight.job_succeeded,
                    delivered=flight.count - flight.baseline,
                    now=now,
                    seen_at=flight.counted_at,
                ),
                stall_s=self.t.stall_s,
                deadline_s=self.t.move_timeout_s,
            )
            if decision.verdict is Verdict.ARRIVED:
                self._arrived(flight, state, decision)  # moving → complete needs no job_ended row
                progressed = True
                continue
            if decision.verdict is Verdict.WAIT and flight.unreachable:
                decision = Decision(Verdict.SHORT, reason=f"move failed: {flight.job_error}")
            elif decision.verdict is Verdict.WAIT and self.pace.dropped(flight, self.flights.values(), now):
                decision = Decision(Verdict.SHORT, reason="dropped: a later move arrived whole first", pacs_full=True)
            self._record_job_end(flight)
            if decision.verdict is Verdict.SHORT:
                self._short(flight, flight.state, decision)
                progressed = True
        return progressed

    def _record_job_end(self, flight: Flight) -> None:
        if flight.job_ended_at is not None and flight.state is State.MOVING:
            self.journal.transition(flight.uid, State.MOVING, Event.JOB_ENDED, flight.job_detail)
            flight.state = State.VERIFYING

    def _poll_job(self, flight: Flight, now: float) -> bool:
        if flight.job_ended_at is not None:
            return False
        if flight.future is not None:
            if not flight.future.done():
                return False
            status = flight.future.result()
        elif flight.job_id is not None:
            if now - flight.job_asked_at < self.t.poll_s:
                return False  # the hot look counts at the destination instead
            flight.job_asked_at = now
            status = self.local.job_status(flight.job_id)
        else:
            return False
        if not status.ended:
            return False
        flight.job_ended_at = now
        flight.job_succeeded = status.succeeded
        flight.job_error, flight.job_dimse = status.error, status.dimse_status
        self._check_a801(status.dimse_status)
        refused = None if self._moved_ok else refused_as_such(self.method, status, self.cfg.source.modality)
        if refused is not None:  # a source without the C-GET service: stop, as for 0xA801
            raise refused
        flight.job_detail = status.state + (f": {status.error}" if status.error else "")
        self._tell("move.ended", series=short_uid(flight.uid), job_state=status.state, dimse=status.dimse_status)
        return True

    def _check_a801(self, status: int | None) -> None:
        """0xA801 before any move delivered: the PACS does not know our AE title (config).

        After moves have delivered, the same status means the PACS could not reach the
        destination just now (pynetdicom-based PACS answer A801 then): pause and retry.
        """
        if status == 0xA801 and not self._moved_ok:
            raise DestinationUnknown(
                f"the source does not know the move destination AE title {self.target_aet!r}"
                " (C-MOVE status 0xA801): add it to the PACS's configuration"
            )

    def _recount(self, flight: Flight, now: float) -> None:
        count = self.dest.count(flight.uid, lookup=flight.job_ended_at is not None)
        if self.pace.counted(flight, count, now):
            self._moved_ok = True

    def _arrived(self, flight: Flight, state: State, decision: Decision) -> None:
        now = self.clock()
        self.pace.proven(flight, now)
        del self.flights[flight.uid]
        self.claims.release(flight.uid)
        self.parties.destination_stores()
        if self.relay is not None:  # the first half is done: held whole at the local Orthanc
            self._held(flight.uid, state, flight.count, flight.expected or flight.count, flight.first_issued_at,
                       defer=True, verified=decision.verified, warning=decision.warning)  # fmt: skip
            self._tell("series.held", series=short_uid(flight.uid), received=flight.count, expected=flight.expected,
                       attempt=flight.attempt, seconds=round(now - flight.issued_at, 3))  # fmt: skip
        else:
            self._complete(flight, state, decision, now)
        if self.flights and not self.pace.pacs_done(flight):
            # The PACS may still be ending this move (its last response, the association's
            # release) while our next one waits in its queue: a move sent now could find
            # its queue full. Nothing is lost by waiting a little: the PACS has work. (Either
            # mode: relay mode's moves face the same queue.)
            self.throttle.space(self.pace.settle_s())
        change = self.throttle.completed()
        if change:
            self._throttle_changed(change)

    def _complete(self, flight: Flight, state: State, decision: Decision, now: float) -> None:
        """A direct move proven whole at the destination."""
        seconds = now - (flight.first_issued_at or flight.issued_at)
        # Proven now; written with the next series' `issued`, once its move is sent (or at
        # the end of this pass): one transaction between two moves instead of two.
        self.journal.transition(
            flight.uid, state, Event.ARRIVED, f"count={flight.count}", defer=True,
            received=flight.count, verified=decision.verified, warning=decision.warning,
            finished_at=now, seconds=seconds, reason=None, next_attempt_at=None,
        )  # fmt: skip
        self._tell(
            "series.complete", series=short_uid(flight.uid), received=flight.count,
            expected=flight.expected, attempt=flight.attempt, seconds=round(seconds, 3),
            verified=decision.verified,
        )  # fmt: skip
        if decision.warning:
            self._tell("series.more_than_expected", warn=True, series=short_uid(flight.uid), received=flight.count)
        if self.after is not None:
            self.after_queue.append(flight.uid)

    def _short(self, flight: Flight, state: State, decision: Decision) -> None:
        self.flights.pop(flight.uid, None)
        self.claims.release(flight.uid)
        if flight.job_id and flight.job_ended_at is None:
            self.local.cancel_job(flight.job_id)
        refused = self.parties.destination_refuses(flight)
        if refused is not None:  # not the series' fault either: the attempt is given back, moves wait
            self._paused(flight.uid, state, "destination full", self.policy.destination, f"destination full: {refused}",
                         received=flight.count, attempts=flight.attempt - 1)  # fmt: skip
            return
        unreachable = flight.job_error or decision.reason
        if flight.job_dimse == 0xA801:  # (only reached once moves have worked: see _check_a801)
            unreachable = f"DicomAssociation - connecting: the PACS could not reach {self.target_aet}"
        if flight.count <= flight.baseline and self.parties.source_failure(unreachable):
            # The PACS was unreachable: the attempt is given back and the run pauses.
            self._paused(flight.uid, state, "source unreachable", self.policy.source,
                         received=flight.count, attempts=flight.attempt - 1)  # fmt: skip
            return
        reason = decision.reason or "short"
        if sent_nothing(self.method, flight.job_succeeded, flight.count, flight.baseline):
            if flight.attempt >= self.t.max_attempts and not self._moved_ok:  # no C-GET of this run delivered
                raise every_get_silent(flight.attempt, short_uid(flight.uid), self.cfg.source.modality,
                                       self.local.system_known().get("DicomAet"))  # fmt: skip
            reason = silent_reason(flight.count, flight.expected)
        if flight.job_error and "refused" not in reason:
            reason += f"; {'get' if self.method == GET_JOB else 'move'} job: {flight.job_error}"
        if flight.subset and flight.count <= flight.baseline:
            self._series_only.add(flight.uid)  # the instance-level move did nothing: next time the series
        lost = self._lost(flight, decision)
        if lost is not None and self._requeue(flight, state, lost):
            return
        if flight.attempt >= self.t.max_attempts:
            final = f"{reason} after {flight.attempt} attempts"
            self.journal.transition(
                flight.uid, state, Event.GIVE_UP, final, reason=final, received=flight.count
            )
            log.warning("series.failed", series=short_uid(flight.uid), reason=final)
            return
        when = self.clock() + self.retry.backoff(flight.attempt)
        self.journal.transition(
            flight.uid, state, Event.SHORT, reason,
            reason=reason, received=flight.count, next_attempt_at=self.retry.note(when),
        )  # fmt: skip
        log.info(
            "series.short", series=short_uid(flight.uid), received=flight.count,
            expected=flight.expected, attempt=flight.attempt, retry_in=round(when - self.clock(), 1),
        )  # fmt: skip

    def _paused(self, uid: str, state: State, why: str, pause: Pause, detail: str | None = None, **fields: Any) -> None:
        """Short because a party is paused: retried once it is probed again, no attempt spent."""
        when = self.retry.note(pause.probe_at)
        self.journal.transition(uid, state, Event.SHORT, detail or why, reason=why, next_attempt_at=when, **fields)

    def _lost(self, flight: Flight, decision: Decision) -> str | None:
        """A move the PACS refused for resources or dropped: tell the throttle; None for a short of the series' own."""
        if flight.job_dimse is not None and (flight.job_dimse & 0xFF00) == 0xA700:
            why = f"refused for resources (0x{flight.job_dimse:04X})"
            self._throttle_changed(self.throttle.refused(flight.issued_at, why, flight.limit))
            return why
        if (decision.pacs_full and flight.job_dimse is None and flight.issued_here and flight.count <= flight.baseline
                and not sent_nothing(self.method, flight.job_succeeded, flight.count, flight.baseline)):  # fmt: skip
            # Acknowledged, then nothing arrived (or a later move overtook it): dropped from a full queue.
            why = "dropped: acknowledged, nothing delivered"
            self._throttle_changed(self.throttle.dropped(flight.issued_at, why, flight.limit))
            return why
        return None

    def _requeue(self, flight: Flight, state: State, why: str) -> bool:
        """Put a lost move's series back in line at once: no attempt spent, no back-off.

        It was the PACS's queue, not the series. After FREE_REQUEUES (retry.py) losses of
        one series in a run it is treated as the series' own problem (attempts and back-off).
        """
        n = self.retry.free_requeue(flight.uid)
        if n is None:
            return False
        self.journal.transition(
            flight.uid, state, Event.REQUEUED, why,
            attempts=flight.attempt - 1, received=flight.count, reason=None, next_attempt_at=None,
        )  # fmt: skip
        row = self.journal.get(flight.uid)
        heapq.heappush(self._ready, (row.seq, row))
        self._tell("series.requeued", series=short_uid(flight.uid), why=why, times=n)
        return True

    def _throttle_changed(self, change: dict[str, Any]) -> None:
        self.journal.record("throttle", change, meta={"throttle": self.throttle.snapshot()})
        log.info("throttle.changed", **change)
