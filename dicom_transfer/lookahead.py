"""Look-ahead C-FINDs for many series at once, kept until the scheduler uses them.

One SERIES-level C-FIND carries the next pending series as lists of UIDs (List of UID
Matching, PS3.4 C.2.2.2.2), and one `POST /tools/find` counts them at the destination. A
hospital PACS then sees one C-FIND association per up to LIST_MAX series instead of one
per series. Not every PACS supports lists: a refusal (pynetdicom's qrscp answers 0xC320)
or a list answered with nothing turns them off for the run; an answer limit (0xFE00)
halves them. Whatever a list does not answer is asked one series at a time by the caller.

A list runs on a worker thread while the moves go on: a list C-FIND of 50 series costs
~15 ms on loopback and seconds from a busy hospital PACS over a VPN, and a loop blocked in
it would notice a finished move only when it returns. The worker only talks to the
network; what its answers change here is merged on the caller's thread by `collect`. (Its
one write elsewhere: `Destination.counts` remembers the Orthanc ids of the listed series,
which the caller does not count until the list is merged.)
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import structlog

from .errors import OrthancError, Unreachable
from .journal import SeriesRow
from .orthanc import Destination, LocalOrthanc, SeriesAnswer, dimse_from_error, is_association_failure

log = structlog.get_logger("dicom_transfer")

# As many series as the recent pace moves in LIST_AHEAD_S, at most LIST_MAX; an answer
# older than LIST_MAX_AGE_S is asked again (the count may have grown meanwhile).
LIST_AHEAD_S, LIST_MAX, LIST_MAX_AGE_S = 30.0, 50, 60.0


@dataclass(frozen=True)
class Known:
    """A list answer for one series, with the destination's count when the batch count settled it."""

    answer: SeriesAnswer
    have: int | None  # None: count it by its computed id
    checked: bool  # the batch count ran (so no lookup under another PatientID is needed)


# What a worker brings back for one group: its rows, then the matched answers or the
# C-FIND's error, then the destination's counts, its error, or None (nothing matched).
_Fetched = tuple[list[SeriesRow], "list[SeriesAnswer] | OrthancError", "dict[str, int] | OrthancError | None"]


def _inline(job: Callable[[], None]) -> None:
    job()


class Lookahead:
    """List C-FINDs ahead of the moves; `take` hands out each answer once.

    `spawn` runs a list on a worker (default: inline, as tests want) and `wake` is called
    when it is done, so that a caller waiting for something to happen looks again.
    """

    def __init__(
        self,
        local: LocalOrthanc,
        dest: Destination,
        modality: str,
        clock: Callable[[], float],
        spawn: Callable[[Callable[[], None]], None] = _inline,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.local, self.dest, self.modality, self.clock = local, dest, modality, clock
        self.spawn, self.wake = spawn, wake
        self.enabled = True  # off after a refusal, or a list answered with nothing
        self.max = LIST_MAX  # halved when a list hits the source's answer limit
        self._known: dict[str, tuple[float, Known]] = {}
        self._asked: set[str] = set()  # pending series already in a list C-FIND
        self._running: Future[list[_Fetched]] | None = None  # the list on a worker
        self._in_list: set[str] = set()  # the series it asks
        self.drained = False  # a list found no pending series left to ask: no more asking early

    def wants(self, rows: list[SeriesRow]) -> bool:
        """Whether a list C-FIND should run before these rows are queried."""
        return self.enabled and self._running is None and any(row.uid not in self._asked for row in rows)

    def busy(self) -> bool:
        """A list is on a worker (finished or not) and not merged yet."""
        return self._running is not None

    def low(self, size: int) -> bool:
        """Half a list's answers or fewer left in hand and none running: time to ask the next.

        Asked while the answers in hand are moved, a list from a PACS that takes seconds to
        answer it is back before they run out, and the moves never wait for it.
        """
        return self.enabled and not self.drained and self._running is None and len(self._known) <= size // 2

    def held(self) -> int:
        """Series asked and not taken yet (answered, or in the running list)."""
        return len(self._asked) + len(self._in_list)

    def waits_for(self, rows: list[SeriesRow]) -> bool:
        """Whether some of these rows are in the list still running (so wait, do not ask alone)."""
        return self._running is not None and any(row.uid in self._in_list for row in rows)

    def size(self, s_per_series: float | None, in_flight: int) -> int:
        """How many series the next list asks for: the recent pace × LIST_AHEAD_S."""
        if s_per_series is None:
            return self.max  # answers not used within LIST_MAX_AGE_S are asked again anyway
        pace = s_per_series / max(1, in_flight)
        return max(2, min(self.max, int(LIST_AHEAD_S / max(pace, 1e-3))))

    def take(self, uid: str) -> Known | None:
        """The list answer for a series (once), or None: ask it on its own."""
        self._asked.discard(uid)
        asked_at, known = self._known.pop(uid, (0.0, None))
        return known if known is not None and self.clock() - asked_at < LIST_MAX_AGE_S else None

    def ask(self, rows: list[SeriesRow]) -> None:
        """Start one SERIES-level C-FIND (and one destination count) for the rows not asked yet."""
        if self._running is not None:
            return
        rows = [r for r in rows if r.uid not in self._asked]
        # A hierarchical PACS needs the study key: rows with and without it are asked apart.
        groups = [g for g in ([r for r in rows if r.study_uid], [r for r in rows if not r.study_uid]) if len(g) >= 2]
        if not groups:
            self.drained = True
            return
        running: Future[list[_Fetched]] = Future()
        self._running, self._in_list = running, {r.uid for g in groups for r in g}

        def work() -> None:
            try:
                running.set_result(self._fetch(groups))
            except BaseException as exc:  # Unreachable (or a bug): raised again by `collect`
                running.set_exception(exc)
            finally:
                self.wake()

        self.spawn(work)
        self.collect()  # at once when it ran inline

    def _fetch(self, groups: list[list[SeriesRow]]) -> list[_Fetched]:
        """The network part (on the worker): the C-FINDs and the destination's counts."""
        fetched: list[_Fetched] = []
        for group in groups:
            studies = sorted({r.study_uid for r in group if r.study_uid})
            try:
                answers = self.local.find_series_list(self.modality, [r.uid for r in group], studies)
            except Unreachable:
                raise
            except OrthancError as exc:
                fetched.append((group, exc, None))
                break
            asked = {r.uid: r for r in group}
            matched = [
                a for a in answers if a.series_uid in asked and asked[a.series_uid].study_uid in (None, "", a.study_uid)
            ]
            if not matched:
                fetched.append((group, matched, None))
                break
            have: dict[str, int] | OrthancError
            try:
                have = self.dest.counts([a.series_uid for a in matched])  # one call, not one per series
            except Unreachable:
                raise
            except OrthancError as exc:
                have = exc
            fetched.append((group, matched, have))
        return fetched

    def collect(self) -> None:
        """Merge a finished list's answers (on the caller's thread); raises what the worker raised."""
        if self._running is None or not self._running.done():
            return
        running, self._running, self._in_list = self._running, None, set()
        for group, answers, have in running.result():
            if not self._merge(group, answers, have):
                return

    def _merge(
        self,
        group: list[SeriesRow],
        answers: list[SeriesAnswer] | OrthancError,
        counted: dict[str, int] | OrthancError | None,
    ) -> bool:
        if isinstance(answers, OrthancError):
            exc = answers
            if dimse_from_error(exc) == 0xFE00 and len(group) > 2:
                self.max = len(group) // 2  # more answers than the source's limit
            elif not is_association_failure(exc.details or exc.message):
                self.enabled = False  # the source refuses lists: one C-FIND per series
                log.info("query.list_refused", error=(exc.details or exc.message)[:200])
            return False
        matched = answers
        self._asked.update(r.uid for r in group)
        log.debug("query.list", asked=len(group), found=len(matched))
        if not matched:
            self.enabled = False  # a source that ignores lists answers nothing: ask one by one
            return False
        have: dict[str, int] | None = None
        if isinstance(counted, OrthancError):  # counted one by one instead
            log.info("destination.list_count_failed", error=counted.message[:200])
        else:
            have = counted
        # A destination's LimitFindResults may cut that answer short: "absent" is certain
        # only when it found none or all; otherwise absent ones are counted by their id.
        present = sum(1 for n in (have or {}).values() if n)
        certain = have is not None and present in (0, len(have))
        now = self.clock()
        for a in matched:
            n = (have or {}).get(a.series_uid, 0)
            self._known[a.series_uid] = (now, Known(a, n if n or certain else None, have is not None))
        return True
