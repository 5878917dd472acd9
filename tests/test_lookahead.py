"""List C-FIND bookkeeping (no server: a scripted source and destination stand in).

What real PACS answer to lists is checked in tests/test_list_query.py and
tests/test_other_sources.py; here: what the look-ahead does with each kind of answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from dicom_transfer.errors import OrthancError, Unreachable
from dicom_transfer.journal import SeriesRow
from dicom_transfer.lookahead import LIST_MAX, LIST_MAX_AGE_S, Lookahead
from dicom_transfer.orthanc import SeriesAnswer
from dicom_transfer.states import State


def row(i: int, study: str | None = "1.2.9") -> SeriesRow:
    return SeriesRow(
        seq=i, uid=f"1.2.3.{i}", study_uid=study, patient_id=None, batch_line=i + 1, state=State.PENDING,
        expected=None, received=0, attempts=0, verified=None, reason=None, warning=None, next_attempt_at=None,
        job_id=None, move_method=None, issued_at=None, first_issued_at=None, finished_at=None, seconds=None,
        sop_uids=None, updated_at=0.0,
    )  # fmt: skip


def answer(uid: str, study: str = "1.2.9") -> SeriesAnswer:
    return SeriesAnswer(study, uid, "P1", 10, "CT", None, {})


class Source:
    """Answers list C-FINDs from a script: a list of answers, or an error to raise."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.asked: list[tuple[list[str], list[str]]] = []

    def find_series_list(self, modality: str, series: list[str], studies: list[str]) -> list[SeriesAnswer]:
        self.asked.append((series, studies))
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return [answer(u) for u in series if u in step] if isinstance(step, set) else step


class Dest:
    def __init__(self, present: dict[str, int] | None = None) -> None:
        self.present = present or {}

    def counts(self, uids: list[str]) -> dict[str, int]:
        return {u: self.present.get(u, 0) for u in uids}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(status: str) -> OrthancError:
    return OrthancError(500, "http://x/modalities/PACS/query", "Error in the network protocol",
                        f"C-FIND SCU to AET \"PACS\" has failed with DIMSE status {status}")  # fmt: skip


def make(source: Source, dest: Dest | None = None) -> tuple[Lookahead, Clock]:
    clock = Clock()
    return Lookahead(source, dest or Dest(), "PACS", clock), clock  # type: ignore[arg-type]


def test_one_c_find_answers_many_and_each_answer_is_taken_once() -> None:
    rows = [row(i) for i in range(5)]
    la, _ = make(Source({r.uid for r in rows}))
    assert la.wants(rows)
    la.ask(rows)
    assert not la.wants(rows)  # all asked: no second list
    known = la.take(rows[2].uid)
    assert known is not None and known.answer.series_uid == rows[2].uid
    assert (known.have, known.checked) == (0, True)  # the batch count found none: absence is certain
    assert la.take(rows[2].uid) is None


def test_study_key_sent_as_a_list_and_rows_without_it_asked_apart() -> None:
    rows = [row(0, "1.2.9"), row(1, "1.2.8"), row(2, None), row(3, None)]
    source = Source({rows[0].uid}, {rows[2].uid, rows[3].uid})
    la, _ = make(source)
    la.ask(rows)
    assert source.asked == [([rows[0].uid, rows[1].uid], ["1.2.8", "1.2.9"]), ([rows[2].uid, rows[3].uid], [])]
    assert la.take(rows[1].uid) is None  # not answered: the caller asks it alone


def test_an_answer_from_another_study_is_not_taken() -> None:
    rows = [row(0, "1.2.7"), row(1, "1.2.7")]
    la, _ = make(Source([answer(rows[0].uid, study="1.2.6"), answer(rows[1].uid, study="1.2.7")]))
    la.ask(rows)
    assert la.take(rows[0].uid) is None
    assert la.take(rows[1].uid) is not None


def test_old_answers_are_asked_again() -> None:
    rows = [row(i) for i in range(3)]
    la, clock = make(Source({r.uid for r in rows}))
    la.ask(rows)
    clock.now += LIST_MAX_AGE_S + 1
    assert la.take(rows[0].uid) is None


@pytest.mark.parametrize("error", [refused("0xC320"), refused("0xC000")])
def test_a_refusal_turns_lists_off(error: OrthancError) -> None:
    rows = [row(i) for i in range(4)]
    la, _ = make(Source(error))
    la.ask(rows)
    assert not la.enabled and not la.wants(rows)


def test_a_list_answered_with_nothing_turns_lists_off() -> None:
    rows = [row(i) for i in range(4)]
    la, _ = make(Source(set()))
    la.ask(rows)
    assert not la.enabled


def test_an_answer_limit_halves_the_list_and_keeps_lists_on() -> None:
    rows = [row(i) for i in range(12)]
    la, _ = make(Source(refused("0xFE00")))
    assert la.size(None, 1) == LIST_MAX
    la.ask(rows)
    assert la.enabled and la.max == 6 and la.size(None, 1) == 6
    assert la.wants(rows[:3])  # the refused rows were not asked: the next list carries them


def test_source_unreachable_leaves_lists_on() -> None:
    error = OrthancError(500, "http://x", "Error in the network protocol", "DicomAssociation - connecting to AET")
    la, _ = make(Source(error))
    la.ask([row(0), row(1)])
    assert la.enabled and la.max == LIST_MAX


def test_list_size_follows_the_pace() -> None:
    la, _ = make(Source())
    assert la.size(0.1, 1) == LIST_MAX  # fast series: the longest list
    assert la.size(10.0, 1) == 3  # 30 s of 10-s series
    assert la.size(10.0, 4) == 12  # four at a time
    assert la.size(600.0, 1) == 2  # slow series: the shortest list


def test_a_batch_count_cut_short_leaves_absent_ones_to_be_counted() -> None:
    """Some present, some not: a destination's answer limit may have cut the count, so absent is unsure."""
    rows = [row(i) for i in range(4)]
    la, _ = make(Source({r.uid for r in rows}), Dest({rows[0].uid: 7}))
    la.ask(rows)
    first, second = la.take(rows[0].uid), la.take(rows[1].uid)
    assert first is not None and (first.have, first.checked) == (7, True)
    assert second is not None and (second.have, second.checked) == (None, True)


class Later:
    """A worker that runs its job only when told to, and counts the wake-ups."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []
        self.woken = 0

    def spawn(self, job: Any) -> None:
        self.jobs.append(job)

    def wake(self) -> None:
        self.woken += 1

    def finish(self) -> None:
        self.jobs.pop(0)()


def test_a_list_runs_on_a_worker_and_is_merged_by_the_caller() -> None:
    rows = [row(i) for i in range(4)]
    later = Later()
    la = Lookahead(Source({r.uid for r in rows}), Dest({rows[1].uid: 4}), "PACS", Clock(), later.spawn, later.wake)  # type: ignore[arg-type]
    la.ask(rows)
    assert la.busy() and la.waits_for(rows[:1]) and not la.wants(rows)
    assert not la.waits_for([row(9)])  # a row outside the list is not held up
    la.collect()  # not done yet: nothing merged
    assert la.take(rows[0].uid) is None and la.busy()
    later.finish()
    assert later.woken == 1
    la.collect()
    assert not la.busy() and not la.waits_for(rows)
    known = la.take(rows[1].uid)
    assert known is not None and known.have == 4


def test_what_the_worker_raised_is_raised_by_collect() -> None:
    later = Later()
    error = Unreachable(None, "http://x", "local Orthanc did not answer")
    la = Lookahead(Source(error), Dest(), "PACS", Clock(), later.spawn, later.wake)  # type: ignore[arg-type]
    la.ask([row(0), row(1)])
    later.finish()
    with pytest.raises(Unreachable):
        la.collect()
    assert not la.busy() and later.woken == 1


def test_a_refusal_on_the_worker_turns_lists_off_once_merged() -> None:
    later = Later()
    rows = [row(0), row(1), row(2)]
    la = Lookahead(Source(refused("0xC320")), Dest(), "PACS", Clock(), later.spawn, later.wake)  # type: ignore[arg-type]
    la.ask(rows)
    assert la.enabled
    later.finish()
    la.collect()
    assert not la.enabled and not la.waits_for(rows) and la.take(rows[0].uid) is None


def test_the_next_list_is_due_when_half_the_answers_are_left() -> None:
    rows = [row(i) for i in range(8)]
    la, _ = make(Source({r.uid for r in rows}, {r.uid for r in rows}))
    assert la.low(8)  # nothing in hand
    la.ask(rows[:4])
    assert la.held() == 4 and not la.low(4)
    la.take(rows[0].uid)
    assert not la.low(4)  # 3 of 4 left
    la.take(rows[1].uid)
    assert la.low(4)  # 2 of 4 left: ask the next while these are moved
    la.ask(rows[2:])  # the pending ones: the two still held are not asked again
    assert la.held() == 6 and not la.low(4)


def test_no_asking_early_once_nothing_is_left_to_ask() -> None:
    rows = [row(i) for i in range(2)]
    la, _ = make(Source({r.uid for r in rows}))
    la.ask(rows)
    la.take(rows[0].uid)
    la.ask(rows[1:])  # all pending series asked already
    assert la.drained and not la.low(50)
