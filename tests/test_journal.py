"""The SQLite journal: batch-ordered plan, guarded transitions with events, WAL readers (tmp_path)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_transfer.errors import IllegalTransition, JournalError, JournalFull, StateConflict
from dicom_transfer.journal import PLAN_CHUNK, Journal, SeriesRow
from dicom_transfer.report import paused
from dicom_transfer.states import Event, State

UIDS = [f"1.2.826.0.1.3680043.8.498.{n}" for n in (7, 3, 11, 5, 2)]  # deliberately not sorted


class FakeClock:
    """Strictly increasing fake epoch seconds: every call is one second later."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def batch_rows(uids: list[str] = UIDS) -> list[tuple[str, str | None, str | None, int | None]]:
    return [(uid, f"1.2.3.{i}", f"PAT{i}", i + 2) for i, uid in enumerate(uids)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "series.csv.journal.sqlite"


@pytest.fixture
def journal(path: Path, clock: FakeClock, tmp_path: Path) -> Iterator[Journal]:
    j = Journal(path, clock=clock)
    j.plan(batch_rows(), tmp_path / "series.csv")
    yield j
    j.close()


def event_rows(path: Path) -> list[tuple]:
    """All events, oldest first, read through a separate connection."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT uid, event, from_state, to_state, detail FROM events ORDER BY id").fetchall()


def to_moving(j: Journal, uid: str) -> None:
    j.transition(uid, State.PENDING, Event.QUERIED, expected=50)
    j.transition(uid, State.QUERIED, Event.ISSUED, job_id="job-1", issued_at=j.clock(), attempts=1)


# -- plan -----------------------------------------------------------------------------------


def test_plan_inserts_in_batch_order(journal: Journal, tmp_path: Path):
    """Planned rows come back in batch order (not UID order), all pending, with their batch data."""
    rows = journal.rows()
    assert [r.uid for r in rows] == UIDS
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert len({r.seq for r in rows}) == len(UIDS)
    assert all(r.state is State.PENDING for r in rows)
    assert [r.batch_line for r in rows] == [2, 3, 4, 5, 6]
    assert rows[1].study_uid == "1.2.3.1" and rows[1].patient_id == "PAT1"
    assert journal.planned
    assert journal.meta("batch") == str(tmp_path / "series.csv")


def test_plan_returns_number_planned(path: Path, clock: FakeClock, tmp_path: Path):
    """plan returns how many rows it inserted: all the first time, none for a repeat."""
    j = Journal(path, clock=clock)
    try:
        assert not j.planned
        assert j.plan(batch_rows(), tmp_path / "series.csv") == len(UIDS)
        assert j.plan(batch_rows(), tmp_path / "series.csv") == 0
    finally:
        j.close()


def test_replan_keeps_rows_and_states(journal: Journal, tmp_path: Path):
    """Re-planning the same batch keeps every row, its seq and its state (resume changes nothing)."""
    to_moving(journal, UIDS[1])
    before = journal.rows()
    journal.plan(batch_rows(), tmp_path / "series.csv")
    after = journal.rows()
    assert after == before
    assert journal.get(UIDS[1]).state is State.MOVING


def test_replan_with_new_rows_appends_them(journal: Journal, tmp_path: Path):
    """Re-planning with extra rows keeps the old order and adds the new ones at the end."""
    journal.plan(batch_rows([*UIDS, "1.2.999"]), tmp_path / "series.csv")
    assert [r.uid for r in journal.rows()] == [*UIDS, "1.2.999"]


def test_replan_survives_reopen(path: Path, tmp_path: Path):
    """A journal closed and reopened (a resumed run) keeps rows, states and order."""
    j = Journal(path, clock=FakeClock())
    j.plan(batch_rows(), tmp_path / "series.csv")
    to_moving(j, UIDS[0])
    before = j.rows()
    j.close()
    j2 = Journal(path, clock=FakeClock(2_000_000_000.0))
    try:
        j2.plan(batch_rows(), tmp_path / "series.csv")
        assert j2.rows() == before
    finally:
        j2.close()


def test_plan_is_one_transaction_per_chunk(path: Path, tmp_path: Path):
    """Planning 20,000 rows is one write per PLAN_CHUNK rows (plus start and end) and keeps their order."""
    uids = [f"1.2.40.{n}" for n in range(20_000, 0, -1)]
    j = Journal(path, clock=FakeClock())
    try:
        assert j.plan(((u, None, None, i) for i, u in enumerate(uids)), tmp_path / "big.csv") == len(uids)
        assert j.writes == 2 + -(-len(uids) // PLAN_CHUNK)
        assert [r.uid for r in j.rows(limit=3)] == uids[:3]
        assert j.counts()["pending"] == len(uids)
    finally:
        j.close()


# -- transitions ----------------------------------------------------------------------------


def test_transition_writes_one_event_with_from_and_to(journal: Journal, path: Path, clock: FakeClock):
    """A transition updates the row and writes exactly one event row with from/to/event/detail."""
    uid = UIDS[2]
    before_events = len(event_rows(path))
    new = journal.transition(uid, State.PENDING, Event.QUERIED, detail="C-FIND", expected=50)
    assert new is State.QUERIED
    row = journal.get(uid)
    assert row.state is State.QUERIED
    assert row.expected == 50
    assert row.updated_at == clock.now
    events = event_rows(path)
    assert len(events) == before_events + 1
    assert events[-1] == (uid, "queried", "pending", "queried", "C-FIND")
    latest = journal.events(uid)
    assert len(latest) == 1
    assert latest[0]["at"] == clock.now
    assert latest[0]["from_state"] == "pending" and latest[0]["to_state"] == "queried"


def test_transition_leaves_other_rows_alone(journal: Journal):
    """A transition changes only its own series."""
    before = {r.uid: r for r in journal.rows()}
    journal.transition(UIDS[0], State.PENDING, Event.QUERIED, expected=10)
    after = {r.uid: r for r in journal.rows()}
    assert {u for u in UIDS if after[u] != before[u]} == {UIDS[0]}


def test_transition_guarded_by_state(journal: Journal, path: Path):
    """A transition from the wrong `state` raises StateConflict (exit 1, both states named); nothing changes."""
    uid = UIDS[0]
    journal.transition(uid, State.PENDING, Event.QUERIED, expected=50)
    row = journal.get(uid)
    events = event_rows(path)
    writes = journal.writes
    # Legal pair, wrong current state: the row is `queried`, not `pending`.
    with pytest.raises(JournalError) as info:
        journal.transition(uid, State.PENDING, Event.SHORT, next_attempt_at=5.0, reason="boom")
    assert uid in str(info.value)
    assert isinstance(info.value, StateConflict) and info.value.exit_code == 1
    assert "expected state 'pending'" in str(info.value) and "holds 'queried'" in str(info.value)
    assert journal.get(uid) == row
    assert event_rows(path) == events
    assert journal.writes == writes


def test_transition_unknown_uid_is_journal_error(journal: Journal, path: Path):
    """A transition on a series that is not in the journal raises JournalError and writes nothing."""
    events = event_rows(path)
    with pytest.raises(JournalError):
        journal.transition("9.9.9", State.PENDING, Event.QUERIED)
    assert event_rows(path) == events


def test_illegal_pair_writes_nothing(journal: Journal, path: Path):
    """An illegal (state, event) raises IllegalTransition naming both, and nothing is written."""
    uid = UIDS[1]
    row = journal.get(uid)
    events = event_rows(path)
    writes = journal.writes
    with pytest.raises(IllegalTransition) as info:
        journal.transition(uid, State.PENDING, Event.ARRIVED, received=50, verified="count")
    assert "pending" in str(info.value) and "arrived" in str(info.value)
    assert journal.get(uid) == row
    assert event_rows(path) == events
    assert journal.writes == writes


def test_bad_column_rejected_before_writing(journal: Journal, path: Path):
    """Setting a column that is not settable raises ValueError and changes nothing."""
    uid = UIDS[0]
    row = journal.get(uid)
    events = event_rows(path)
    for bad in ({"nonsense": 1}, {"seq": 99}, {"updated_at": 1.0}, {"received; DROP TABLE series": 1}):
        with pytest.raises(ValueError):
            journal.transition(uid, State.PENDING, Event.QUERIED, **bad)
    assert journal.get(uid) == row
    assert event_rows(path) == events


def test_full_lifecycle_leaves_an_event_trail(journal: Journal):
    """pending → … → complete leaves one event per transition, in order, chaining from/to."""
    uid = UIDS[3]
    to_moving(journal, uid)
    journal.transition(uid, State.MOVING, Event.JOB_ENDED, detail="Success")
    journal.transition(uid, State.VERIFYING, Event.ARRIVED, received=50, verified="count", finished_at=journal.clock())
    trail = list(reversed(journal.events(uid)))
    assert [e["event"] for e in trail] == ["queried", "issued", "job_ended", "arrived"]
    assert [e["from_state"] for e in trail] == ["pending", "queried", "moving", "verifying"]
    assert [e["to_state"] for e in trail] == ["queried", "moving", "verifying", "complete"]
    for earlier, later in zip(trail, trail[1:], strict=False):
        assert earlier["to_state"] == later["from_state"]
        assert earlier["at"] < later["at"]
    row = journal.get(uid)
    assert row.state is State.COMPLETE and row.verified == "count" and row.received == 50


def test_record_run_level_event(journal: Journal):
    """record() adds one run-level event (no uid, no states) with its detail as JSON."""
    journal.record("throttle", {"from": 4, "to": 2, "why": "A702"})
    latest = journal.events(limit=1)[0]
    assert latest["uid"] is None and latest["event"] == "throttle"
    assert latest["from_state"] is None and latest["to_state"] is None
    assert json.loads(latest["detail"]) == {"from": 4, "to": 2, "why": "A702"}


def test_paused_parties_come_from_the_last_runs_events(journal: Journal):
    """`status`'s pauses: a party's begin event opens it, its resume (or run.stop) closes it; an earlier
    run's events do not count, nor do a series' own events."""
    journal.record("run.start")
    journal.record("destination.full", {"why": "storage full: 1.0 of 1 MB used"})
    journal.record("run.stop")
    assert paused(journal) == []
    journal.record("run.start")
    journal.record("source.unreachable", {"error": "association rejected"})
    journal.record("destination.unreachable", {"why": "forward failed: destination Orthanc did not answer"})
    journal.record("destination.full", {"why": "later: not a new pause"})
    journal.record("source.unreachable", {"error": "a series' event"}, uid="1.2.3")
    assert [(p["party"], p["event"], p["why"]) for p in paused(journal)] == [
        ("source", "source.unreachable", "association rejected"),
        ("destination", "destination.unreachable", "forward failed: destination Orthanc did not answer"),
    ]
    journal.record("source.reachable", {"down_s": 3})
    assert [p["party"] for p in paused(journal)] == ["destination"]
    journal.record("destination.stores", {"paused_s": 9})
    assert paused(journal) == []


def test_deferred_transition_rides_with_the_next_write(journal: Journal, path: Path, clock: FakeClock):
    """A deferred transition is invisible until the next write, then committed with it, first, stamped when deferred."""
    done, nxt = UIDS[0], UIDS[1]
    to_moving(journal, done)
    journal.transition(nxt, State.PENDING, Event.QUERIED, expected=50)
    events, writes = event_rows(path), journal.writes
    new = journal.transition(done, State.MOVING, Event.ARRIVED, defer=True, received=50, verified="count")
    proven_at = clock.now
    assert new is State.COMPLETE
    assert event_rows(path) == events and journal.writes == writes  # nothing written yet
    with sqlite3.connect(path) as db:  # another reader: still moving
        assert db.execute("SELECT state FROM series WHERE uid=?", (done,)).fetchone() == ("moving",)
    journal.transition(nxt, State.QUERIED, Event.ISSUED, attempts=1)
    assert journal.writes == writes + 1  # one transaction for both
    assert event_rows(path)[len(events) :] == [
        (done, "arrived", "moving", "complete", None),
        (nxt, "issued", "queried", "moving", None),
    ]
    assert journal.get(done).updated_at == proven_at
    assert journal.events(done, limit=1)[0]["at"] == proven_at < journal.events(nxt, limit=1)[0]["at"]
    journal.flush()
    assert journal.writes == writes + 1  # nothing left to write


def test_deferred_transition_survives_a_failed_write(journal: Journal, path: Path):
    """When the write that carries it fails, the deferred transition is rolled back with it, kept, and flushed later."""
    done = UIDS[0]
    to_moving(journal, done)
    journal.transition(done, State.MOVING, Event.ARRIVED, defer=True, received=50, verified="count")
    events = event_rows(path)
    with pytest.raises(JournalError):  # UIDS[1] is pending, not queried
        journal.transition(UIDS[1], State.QUERIED, Event.ISSUED, attempts=1)
    assert event_rows(path) == events and journal.get(done).state is State.MOVING
    journal.flush()
    assert journal.get(done).state is State.COMPLETE
    assert event_rows(path)[len(events) :] == [(done, "arrived", "moving", "complete", None)]


@pytest.mark.parametrize("how", ["record", "close"])
def test_deferred_transition_written_by_record_and_close(path: Path, clock: FakeClock, tmp_path: Path, how: str):
    """A run-level event is written after a deferred transition; closing the journal writes what is left."""
    j = Journal(path, clock=clock)
    j.plan(batch_rows(), tmp_path / "series.csv")
    to_moving(j, UIDS[0])
    j.transition(UIDS[0], State.MOVING, Event.ARRIVED, defer=True, received=50, verified="count")
    if how == "record":
        j.record("run.stop", {"stopped": False})
    j.close()
    assert [e[:2] for e in event_rows(path)[-2:]] == (
        [(UIDS[0], "arrived"), (None, "run.stop")] if how == "record" else [(UIDS[0], "issued"), (UIDS[0], "arrived")]
    )
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT state FROM series WHERE uid=?", (UIDS[0],)).fetchone() == ("complete",)


def test_deferred_transition_checked_when_deferred(journal: Journal, path: Path):
    """An illegal pair or a bad column is refused at once, not at the next write."""
    with pytest.raises(IllegalTransition):
        journal.transition(UIDS[0], State.PENDING, Event.ARRIVED, defer=True)
    with pytest.raises(ValueError):
        journal.transition(UIDS[0], State.PENDING, Event.QUERIED, defer=True, nonsense=1)
    events = event_rows(path)
    journal.flush()
    assert event_rows(path) == events


# -- reading --------------------------------------------------------------------------------


def test_counts_cover_every_state(journal: Journal):
    """counts() has a key for every state (zeros included) and sums to the number of rows."""
    to_moving(journal, UIDS[0])
    journal.transition(UIDS[1], State.PENDING, Event.NOT_FOUND, reason="not found at source")
    journal.transition(UIDS[2], State.PENDING, Event.PRESENT, received=7, expected=7, verified="count")
    counts = journal.counts()
    assert set(counts) == {s.value for s in State}
    assert counts == {
        "pending": 2,
        "queried": 0,
        "moving": 1,
        "verifying": 0,
        "waiting_retry": 0,
        "complete": 1,
        "failed": 1,
        "held_local": 0,  # relay mode
        "forwarding": 0,
    }
    assert sum(counts.values()) == len(UIDS)


def test_totals(journal: Journal):
    """totals(): row count, instances received by complete series only, first issue and last finish."""
    a, b = UIDS[0], UIDS[1]
    to_moving(journal, a)
    first_issue = journal.get(a).issued_at
    journal.transition(a, State.MOVING, Event.JOB_ENDED, first_issued_at=first_issue)
    journal.transition(a, State.VERIFYING, Event.ARRIVED, received=50, finished_at=5e9)
    to_moving(journal, b)
    journal.transition(b, State.MOVING, Event.JOB_ENDED, first_issued_at=first_issue + 100, received=20)
    journal.transition(b, State.VERIFYING, Event.SHORT, received=20, finished_at=6e9)  # short: not counted
    totals = journal.totals()
    assert totals == {"total": len(UIDS), "instances": 50, "first_issued_at": first_issue, "last_finished_at": 6e9}


def test_totals_of_empty_journal(path: Path):
    """An empty journal totals to zero rows and zero instances."""
    j = Journal(path, clock=FakeClock())
    try:
        assert j.totals() == {"total": 0, "instances": 0, "first_issued_at": None, "last_finished_at": None}
        assert j.next_retry_at() is None
    finally:
        j.close()


def test_due_retries_honours_next_attempt_at(journal: Journal):
    """due_retries(now) lists waiting rows whose next_attempt_at is due (or unset), in batch order."""
    late, soon, unset = UIDS[0], UIDS[2], UIDS[4]
    journal.transition(late, State.PENDING, Event.SHORT, next_attempt_at=200.0)
    journal.transition(soon, State.PENDING, Event.SHORT, next_attempt_at=100.0)
    journal.transition(unset, State.PENDING, Event.SHORT)
    assert [r.uid for r in journal.due_retries(99.0)] == [unset]
    assert [r.uid for r in journal.due_retries(100.0)] == [soon, unset]
    assert [r.uid for r in journal.due_retries(150.0)] == [soon, unset]
    assert [r.uid for r in journal.due_retries(200.0)] == [late, soon, unset]
    assert journal.next_retry_at() == 0  # the unset row is due now
    journal.transition(unset, State.WAITING_RETRY, Event.RETRY_DUE)
    assert journal.next_retry_at() == 100.0


def test_due_retries_ignores_other_states(journal: Journal):
    """Rows that are not waiting_retry are never due, whatever their next_attempt_at."""
    journal.transition(UIDS[0], State.PENDING, Event.QUERIED, next_attempt_at=1.0)
    assert journal.due_retries(1e12) == []


def test_rows_filtered_by_state_and_limited(journal: Journal):
    """rows(*states, limit) keeps batch order, filters by state and stops at limit."""
    to_moving(journal, UIDS[3])
    to_moving(journal, UIDS[1])
    assert [r.uid for r in journal.rows(State.MOVING)] == [UIDS[1], UIDS[3]]
    assert [r.uid for r in journal.rows(State.PENDING, limit=2)] == [UIDS[0], UIDS[2]]
    assert [r.uid for r in journal.iter_rows()] == UIDS


def test_get_unknown_uid_is_journal_error(journal: Journal):
    """get() of a series that is not planned raises JournalError."""
    with pytest.raises(JournalError):
        journal.get("1.2.404")


def test_sop_uids_round_trip_as_tuple(journal: Journal):
    """sop_uids given as a list come back as the same tuple, in order; absent stays None."""
    sops = ["1.2.3.4.10", "1.2.3.4.2", "1.2.3.4.1"]
    assert journal.get(UIDS[0]).sop_uids is None
    journal.transition(UIDS[0], State.PENDING, Event.QUERIED, expected=3, sop_uids=sops)
    row = journal.get(UIDS[0])
    assert row.sop_uids == tuple(sops)
    assert isinstance(row.sop_uids, tuple)
    assert isinstance(row, SeriesRow)


def test_sop_uids_empty_tuple(journal: Journal):
    """An explicitly empty sop_uids list reads back as None or an empty tuple, never a string."""
    journal.transition(UIDS[0], State.PENDING, Event.QUERIED, sop_uids=())
    assert journal.get(UIDS[0]).sop_uids in (None, ())


# -- opening --------------------------------------------------------------------------------


def test_readonly_missing_path_is_journal_error(tmp_path: Path):
    """A readonly Journal on a path that does not exist raises JournalError and creates nothing."""
    missing = tmp_path / "nope" / "missing.sqlite"
    with pytest.raises(JournalError) as info:
        Journal(missing, readonly=True)
    assert str(missing) in str(info.value)
    assert not missing.exists()
    assert not missing.parent.exists()


@pytest.mark.parametrize("readonly", [False, True])
def test_csv_as_journal_is_journal_error_and_untouched(tmp_path: Path, readonly: bool):
    """A CSV given as the journal path raises JournalError and its bytes stay exactly the same."""
    csv = tmp_path / "series.csv"
    content = "SeriesInstanceUID,StudyInstanceUID\r\n1.2.3,1.2\r\n" * 50
    csv.write_bytes(content.encode())
    with pytest.raises(JournalError) as info:
        Journal(csv, readonly=readonly)
    assert str(csv) in str(info.value)
    assert csv.read_bytes() == content.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series.csv"]  # no -wal/-shm left behind


def test_readonly_foreign_sqlite_is_journal_error(tmp_path: Path):
    """A readonly Journal on an SQLite file without our tables raises JournalError."""
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(JournalError):
        Journal(other, readonly=True)


def test_journal_uses_wal(journal: Journal):
    """The writer puts the database in WAL mode (readers never block the run)."""
    assert journal.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_wal_reader_sees_committed_writes_while_writer_open(journal: Journal, path: Path):
    """A readonly Journal sees each committed transition while the writer stays open, never uncommitted ones."""
    reader = Journal(path, readonly=True)
    try:
        assert [r.uid for r in reader.rows()] == UIDS
        journal.transition(UIDS[0], State.PENDING, Event.QUERIED, expected=50)
        assert reader.get(UIDS[0]).state is State.QUERIED
        assert reader.get(UIDS[0]).expected == 50
        assert reader.counts()["queried"] == 1
        # A write transaction in progress is invisible to the reader and does not block it.
        journal.db.execute("BEGIN IMMEDIATE")
        journal.db.execute("UPDATE series SET state='failed' WHERE uid=?", (UIDS[1],))
        assert reader.get(UIDS[1]).state is State.PENDING
        journal.db.execute("ROLLBACK")
        journal.transition(UIDS[1], State.PENDING, Event.NOT_FOUND, reason="not found at source")
        assert reader.get(UIDS[1]).state is State.FAILED
        assert reader.get(UIDS[1]).reason == "not found at source"
        assert reader.events(UIDS[1])[0]["to_state"] == "failed"
    finally:
        reader.close()


def test_readonly_journal_cannot_write(journal: Journal, path: Path):
    """A readonly Journal refuses writes; the row stays as the writer left it."""
    reader = Journal(path, readonly=True)
    try:
        with pytest.raises(sqlite3.OperationalError):
            reader.transition(UIDS[0], State.PENDING, Event.QUERIED)
    finally:
        reader.close()
    assert journal.get(UIDS[0]).state is State.PENDING


def test_readonly_after_writer_closed(path: Path, tmp_path: Path):
    """After the run ended (writer closed), a readonly Journal still reads every row (`status` after a crash)."""
    writer = Journal(path, clock=FakeClock())
    writer.plan(batch_rows(), tmp_path / "series.csv")
    to_moving(writer, UIDS[0])
    writer.close()
    reader = Journal(path, readonly=True)
    try:
        assert [r.uid for r in reader.rows()] == UIDS
        assert reader.get(UIDS[0]).state is State.MOVING
    finally:
        reader.close()


def _wal_bytes_after(tmp_path: Path, name: str, transitions: int, run_checkpoints: bool) -> int:
    j = Journal(tmp_path / name)
    j.plan([(f"1.2.3.{i}", "1.2", "P", i + 1) for i in range(transitions)], tmp_path / "b.csv")
    j.defer_checkpoints()
    for i in range(transitions):
        j.transition(f"1.2.3.{i}", State.PENDING, Event.QUERIED, "x" * 200, expected=10)
        if run_checkpoints:
            j.checkpoint()
    size = (tmp_path / f"{name}-wal").stat().st_size
    j.close()
    return size


def test_deferred_checkpoints_leave_the_wal_to_the_owner(tmp_path: Path) -> None:
    """Deferred, commits never checkpoint: the WAL grows far past the ~1000 pages where
    SQLite's own checkpoints hold it (1500 such transitions: ~8000 pages here). The owner's
    `checkpoint()` every CHECKPOINT_EVERY writes keeps it under that (~600; pages reused)."""
    page = 4096
    assert _wal_bytes_after(tmp_path, "left.sqlite", 1500, run_checkpoints=False) > 2000 * page
    assert _wal_bytes_after(tmp_path, "owned.sqlite", 1500, run_checkpoints=True) < 1000 * page


# -- streamed planning and tallies ------------------------------------------------------------


def test_plan_start_resumes_at_the_mark(path: Path, tmp_path: Path):
    """Same file, plan interrupted: plan_start gives the mark of the last chunk written; planned: None."""
    j = Journal(path, clock=FakeClock())
    try:
        assert j.plan_start(tmp_path / "b.csv", "d1") == (0, 0)
        j.plan_rows(batch_rows()[:2], (3, 120))
        assert not j.planned and j.plan_start(tmp_path / "b.csv", "d1") == (3, 120)
        j.plan_rows(batch_rows()[2:], (6, 300))
        j.plan_end()
        assert j.planned and j.meta("plan_at") is None
        assert j.plan_start(tmp_path / "b.csv", "d1") is None
        assert [r.uid for r in j.rows()] == UIDS
    finally:
        j.close()


def test_changed_file_mid_plan_starts_over_without_doubles(path: Path, tmp_path: Path):
    """Another digest: planning starts again from line 1, rows already there keep their place, no row twice."""
    j = Journal(path, clock=FakeClock())
    try:
        j.plan_start(tmp_path / "b.csv", "d1")
        j.plan_rows(batch_rows()[:3], (4, 100))
        assert j.plan_start(tmp_path / "b.csv", "d2") == (0, 0)
        assert j.plan_rows(batch_rows([UIDS[1], "1.2.999", *UIDS]), (7, 200)) == 3
        j.plan_end()
        assert [r.uid for r in j.rows()] == [*UIDS[:3], "1.2.999", *UIDS[3:]]
        assert j.counts()["pending"] == len(UIDS) + 1
    finally:
        j.close()


def test_series_planned_twice_in_a_fresh_plan_keeps_the_first(path: Path, tmp_path: Path):
    """A study row's series also listed as a series row: the UID index built at the end keeps the first one."""
    j = Journal(path, clock=FakeClock())
    try:
        j.plan_start(tmp_path / "b.csv", "d1")
        j.plan_rows([(UIDS[0], "1.2.3", None, 2), (UIDS[1], "1.2.3", None, 2)], (2, 50))
        j.plan_rows([(UIDS[2], None, None, 3), (UIDS[0], None, None, 4)], (4, 90))
        j.plan_end()
        assert [(r.uid, r.batch_line) for r in j.rows()] == [(UIDS[0], 2), (UIDS[1], 2), (UIDS[2], 3)]
        assert j.counts()["pending"] == 3 and j.totals()["total"] == 3
        with pytest.raises(sqlite3.IntegrityError):
            j.db.execute("INSERT INTO series (uid, state, updated_at) VALUES (?, 'pending', 0)", (UIDS[1],))
    finally:
        j.close()


def test_tallies_match_a_full_count(journal: Journal):
    """state_counts and run_times, kept by triggers, equal what a scan of the series table says."""
    to_moving(journal, UIDS[0])
    journal.transition(UIDS[0], State.MOVING, Event.JOB_ENDED, first_issued_at=5.0, received=3)
    journal.transition(UIDS[0], State.VERIFYING, Event.ARRIVED, received=50, finished_at=9.0)
    journal.transition(UIDS[1], State.PENDING, Event.NOT_FOUND, reason="not found at source")
    journal.transition(UIDS[2], State.PENDING, Event.QUERIED, expected=4, defer=True)
    journal.flush()
    scanned = dict(journal.db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
    assert {k: v for k, v in journal.counts().items() if v} == scanned
    assert journal.totals() == {"total": 5, "instances": 50, "first_issued_at": 5.0, "last_finished_at": 9.0}


def test_counts_do_not_scan_the_series_table(journal: Journal):
    """counts() and totals() read the tallies: their query plans never visit `series`."""
    for sql in ("SELECT state, n FROM state_counts", "SELECT first_issued_at, last_finished_at FROM run_times"):
        plan = " ".join(str(r[-1]) for r in journal.db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "series" not in plan
    journal.db.execute("DROP TABLE series")  # nothing left to scan: the answers still come
    assert journal.counts()["pending"] == len(UIDS)
    assert journal.totals()["total"] == len(UIDS)


def test_journal_of_schema_1_gets_tallies_on_open(tmp_path: Path):
    """A journal written before the tallies (inline UNIQUE uid, no state_counts) is counted once on open."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    schema = Path(__file__).parent / "data" / "journal_schema_1.sql"
    db.executescript(schema.read_text())
    db.executemany(
        "INSERT INTO series (uid, state, received, first_issued_at, finished_at, updated_at) VALUES (?, ?, ?, ?, ?, 0)",
        [("1.2.1", "complete", 7, 10.0, 20.0), ("1.2.2", "pending", 0, None, None), ("1.2.3", "failed", 2, 12.0, 30.0)],
    )
    db.execute("INSERT INTO meta VALUES ('planned_at', '1.0')")
    db.commit()
    db.close()
    reader = Journal(path, readonly=True)  # never opened for writing since: counts by scanning
    try:
        assert reader.counts()["complete"] == 1 and reader.totals()["instances"] == 7
    finally:
        reader.close()
    j = Journal(path, clock=FakeClock())
    try:
        assert j.counts() == {**{s.value: 0 for s in State}, "complete": 1, "pending": 1, "failed": 1}
        assert j.totals() == {"total": 3, "instances": 7, "first_issued_at": 10.0, "last_finished_at": 30.0}
        j.transition("1.2.2", State.PENDING, Event.QUERIED, expected=3)
        assert j.counts()["queried"] == 1 and j.counts()["pending"] == 0
        assert j.plan(batch_rows(["1.2.2", "1.2.4"]), tmp_path / "b.csv") == 1  # the inline UNIQUE still guards
    finally:
        j.close()


def test_a_full_disk_is_journal_full_and_loses_nothing_written(journal: Journal, path: Path):
    """SQLite's "database or disk is full" (here: its page limit reached) rolls back and raises JournalFull
    (exit 3) naming the journal; what was written stays, a deferred proof stays queued for the next write."""
    done = UIDS[0]
    to_moving(journal, done)
    pages = journal.db.execute("PRAGMA page_count").fetchone()[0]
    journal.db.execute(f"PRAGMA max_page_count={pages}")  # not one page more: as a disk with no room
    with pytest.raises(JournalFull) as caught:
        for i in range(100):  # rows until a page more is needed
            journal.record("filler", {"n": i, "pad": "x" * 400})
    assert caught.value.exit_code == 3 and str(path) in str(caught.value) and "disk is full" in str(caught.value)
    assert not journal.db.in_transaction
    before = event_rows(path)
    journal.transition(done, State.MOVING, Event.ARRIVED, defer=True, received=50, verified="count")
    with pytest.raises(JournalFull):
        journal.record("filler", {"pad": "x" * 5000})  # needs pages: fails, and the proof it carried with it
    assert journal.get(done).state is State.MOVING and event_rows(path) == before
    journal.db.execute("PRAGMA max_page_count=1073741823")  # room again
    journal.flush()  # the proof was kept queued: written now
    assert journal.get(done).state is State.COMPLETE
    assert event_rows(path)[: len(before)] == before
