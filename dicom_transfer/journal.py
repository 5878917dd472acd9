"""The SQLite journal: one row per series, every transition guarded and atomic.

Every state change is `UPDATE series SET state=? ... WHERE uid=? AND state=?` plus one row
in `events`, in one transaction; a rowcount of 0 means someone else moved the row and is
an error. A transition may be deferred to ride in the next write's transaction, before it
(the scheduler does so for a proven series until the next move is sent): never split,
never reordered. WAL mode lets `status` read while a run writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JournalError, StateConflict
from .states import Event, State, next_state

SCHEMA_VERSION = 1
CHECKPOINT_EVERY = 100  # writes between two checkpoints once the owner runs them (`defer_checkpoints`)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    seq INTEGER PRIMARY KEY,            -- batch order; issue order
    uid TEXT NOT NULL UNIQUE,           -- SeriesInstanceUID
    study_uid TEXT,
    patient_id TEXT,
    batch_line INTEGER,
    state TEXT NOT NULL,
    expected INTEGER,                   -- NumberOfSeriesRelatedInstances (or IMAGE count)
    received INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    verified TEXT,                      -- "count" | "stable-count"
    reason TEXT,
    warning TEXT,
    next_attempt_at REAL,
    job_id TEXT,
    move_method TEXT,
    issued_at REAL,                     -- current attempt
    first_issued_at REAL,
    finished_at REAL,
    seconds REAL,                       -- first issue to complete
    sop_uids TEXT,                      -- JSON list, when known from an IMAGE-level C-FIND
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state_seq ON series (state, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    uid TEXT,                           -- NULL for run-level events (throttle, run start)
    event TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_uid ON events (uid);
CREATE TABLE IF NOT EXISTS studies (   -- study rows of the batch and what they expanded to
    study_uid TEXT PRIMARY KEY,
    batch_line INTEGER,
    found INTEGER NOT NULL,             -- series the source has
    planned INTEGER NOT NULL,           -- series left after the filters
    reason TEXT                         -- why nothing was planned
);
"""

_COLUMNS = (
    "seq uid study_uid patient_id batch_line state expected received attempts verified reason warning "
    "next_attempt_at job_id move_method issued_at first_issued_at finished_at seconds sop_uids updated_at"
).split()


@dataclass(frozen=True)
class SeriesRow:
    """A snapshot of one journal row."""

    seq: int
    uid: str
    study_uid: str | None
    patient_id: str | None
    batch_line: int | None
    state: State
    expected: int | None
    received: int
    attempts: int
    verified: str | None
    reason: str | None
    warning: str | None
    next_attempt_at: float | None
    job_id: str | None
    move_method: str | None
    issued_at: float | None
    first_issued_at: float | None
    finished_at: float | None
    seconds: float | None
    sop_uids: tuple[str, ...] | None
    updated_at: float

    @classmethod
    def from_sql(cls, row: sqlite3.Row | tuple[Any, ...]) -> SeriesRow:
        values = dict(zip(_COLUMNS, tuple(row), strict=True))
        values["state"] = State(values["state"])
        sop = values["sop_uids"]
        values["sop_uids"] = tuple(json.loads(sop)) if sop else None
        return cls(**values)


@dataclass(frozen=True)
class _Step:
    """One transition, checked against the table, waiting to be written."""

    uid: str
    state: State
    event: Event
    new: State
    detail: str | None
    fields: dict[str, Any]
    at: float


def file_digest(path: Path) -> str:
    """SHA-256 of a file, streamed (to tell whether a journal belongs to this batch)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Journal:
    """The run's durable memory. One connection, used from one thread."""

    def __init__(self, path: Path, *, clock: Any = time.time, readonly: bool = False) -> None:
        self.path = Path(path)
        self.clock = clock
        self.writes = 0  # transactions written
        self._deferred: list[_Step] = []
        self._checkpointed_at: int | None = None  # writes at the last checkpoint; None: SQLite's own
        if readonly:
            if not self.path.exists():
                raise JournalError(f"{self.path}: no such journal")
            uri = f"file:{self.path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, timeout=10, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
            self.db.execute("SELECT 1 FROM series LIMIT 1")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise JournalError(f"{self.path}: not a dicom-transfer journal ({exc})") from exc

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()

    def defer_checkpoints(self) -> None:
        """Checkpoint only when `checkpoint()` is called, not inside a commit.

        SQLite otherwise copies the WAL into the database inside whichever commit brings it
        to 1000 pages (~every 200 transitions), with two fsyncs: 1-6 ms on this machine's
        disk, more on network storage, between one series' proof and the next move. The
        scheduler calls `checkpoint()` once the next move is on its way.
        """
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointed_at = self.writes

    def checkpoint(self) -> None:
        """A passive checkpoint when CHECKPOINT_EVERY writes came since the last (see `defer_checkpoints`)."""
        if self._checkpointed_at is not None and self.writes - self._checkpointed_at >= CHECKPOINT_EVERY:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._checkpointed_at = self.writes

    # -- meta -------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def planned(self) -> bool:
        return self.meta("planned_at") is not None

    # -- planning ---------------------------------------------------------------------

    def plan(
        self,
        rows: Iterable[tuple[str, str | None, str | None, int | None]],
        batch: Path,
        studies: Iterable[tuple[str, int | None, int, int, str | None]] = (),
    ) -> int:
        """Insert every (series_uid, study_uid, patient_id, line) as pending, in one transaction.

        `studies` are the study rows' expansions (study_uid, line, found, planned, reason).
        Idempotent: a series already planned keeps its row. Returns the number planned.
        """
        now = self.clock()
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?)", studies)
            cur = self.db.executemany(
                "INSERT OR IGNORE INTO series (uid, study_uid, patient_id, batch_line, state, updated_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?)",
                ((uid, study, pid, line, now) for uid, study, pid, line in rows),
            )
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('batch', ?)", (str(batch),))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('planned_at', ?)", (repr(now),))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self.writes += 1
        return cur.rowcount

    # -- transitions ------------------------------------------------------------------

    def transition(
        self, uid: str, state: State, event: Event, detail: str | None = None, *, defer: bool = False, **fields: Any
    ) -> State:
        """Move one series from `state` by `event`, setting `fields`, in one transaction.

        Raises IllegalTransition for a pair outside the table and StateConflict (exit 1)
        when the row is not in `state` any more. `defer=True` queues the transition, stamped now:
        it is written in the transaction of the journal's next write, before that write,
        or by `flush()`. The scheduler defers a series' `complete` so that the record of
        a proof already made goes out with the next series' `issued`, after its move is
        sent (one transaction instead of two between moves). Until then a crash leaves
        the series `moving` or `verifying`, which the next run counts and closes.
        """
        new = next_state(state, event)
        step = _Step(uid, State(state), Event(event), new, detail, self._columns(fields), self.clock())
        if defer:
            self._deferred.append(step)
            return new
        with self._tx():
            self._apply(step)
        self.writes += 1
        return new

    def flush(self) -> None:
        """Write the deferred transitions now (see `transition`)."""
        if self._deferred:
            with self._tx():
                pass
            self.writes += 1

    def _apply(self, step: _Step) -> None:
        sets = "".join(f", {k}=?" for k in step.fields)
        cur = self.db.execute(
            f"UPDATE series SET state=?, updated_at=?{sets} WHERE uid=? AND state=?",
            (step.new.value, step.at, *step.fields.values(), step.uid, step.state.value),
        )
        if cur.rowcount != 1:
            row = self.db.execute("SELECT state FROM series WHERE uid=?", (step.uid,)).fetchone()
            raise StateConflict(step.uid, step.state.value, row[0] if row else None, step.event.value)
        self.db.execute(
            "INSERT INTO events (at, uid, event, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (step.at, step.uid, step.event.value, step.state.value, step.new.value, step.detail),
        )

    @staticmethod
    def _columns(fields: dict[str, Any]) -> dict[str, Any]:
        """Only real, settable columns reach the SQL; sop_uids are stored as JSON."""
        for key in fields:
            if key not in _COLUMNS or key in ("seq", "uid", "state", "updated_at"):
                raise ValueError(f"not a settable journal column: {key}")
        if fields.get("sop_uids") is not None:
            fields = {**fields, "sop_uids": json.dumps(list(fields["sop_uids"]))}
        return fields

    def record(
        self, event: str, detail: dict[str, Any] | None = None, uid: str | None = None,
        *, meta: dict[str, Any] | None = None,
    ) -> None:
        """A run-level event (throttle change, run start/stop): one row, no state change.

        `meta`: keys to set in the same transaction (JSON values), e.g. the throttle's
        state, which a resumed run reads back without scanning the events.
        """
        with self._tx():  # after any deferred transition
            self.db.execute(
                "INSERT INTO events (at, uid, event, detail) VALUES (?, ?, ?, ?)",
                (self.clock(), uid, event, json.dumps(detail) if detail else None),
            )
            for key, value in (meta or {}).items():
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))
        self.writes += 1

    # -- reading ----------------------------------------------------------------------

    def get(self, uid: str) -> SeriesRow:
        row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM series WHERE uid=?", (uid,)).fetchone()
        if row is None:
            raise JournalError(f"series {uid} is not in the journal")
        return SeriesRow.from_sql(row)

    def rows(self, *states: State, limit: int | None = None) -> list[SeriesRow]:
        """Rows in batch order, optionally only those in `states`."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM series"
        args: list[Any] = []
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = [State(s).value for s in states]
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [SeriesRow.from_sql(r) for r in self.db.execute(sql, args)]

    def iter_rows(self) -> Iterator[SeriesRow]:
        cur = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM series ORDER BY seq")
        for r in cur:
            yield SeriesRow.from_sql(r)

    def due_retries(self, now: float) -> list[SeriesRow]:
        sql = (
            f"SELECT {', '.join(_COLUMNS)} FROM series WHERE state='waiting_retry'"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY seq"
        )
        return [SeriesRow.from_sql(r) for r in self.db.execute(sql, (now,))]

    def next_retry_at(self) -> float | None:
        sql = "SELECT MIN(COALESCE(next_attempt_at, 0)) FROM series WHERE state='waiting_retry'"
        row = self.db.execute(sql).fetchone()
        return row[0] if row else None

    def has_work(self) -> bool:
        """Any series not yet complete or failed (an index lookup, not a count)."""
        live = [s.value for s in State if not s.terminal]
        sql = f"SELECT 1 FROM series WHERE state IN ({', '.join('?' * len(live))}) LIMIT 1"
        return self.db.execute(sql, live).fetchone() is not None

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in State}
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM series GROUP BY state"):
            counts[state] = n
        return counts

    def totals(self) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state='complete' THEN received END), 0),"
            " MIN(first_issued_at), MAX(finished_at) FROM series"
        ).fetchone()
        return {"total": row[0], "instances": row[1], "first_issued_at": row[2], "last_finished_at": row[3]}

    def studies(self) -> list[dict[str, Any]]:
        keys = ("study_uid", "batch_line", "found", "planned", "reason")
        rows = self.db.execute(f"SELECT {', '.join(keys)} FROM studies ORDER BY batch_line")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def events(self, uid: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT at, uid, event, from_state, to_state, detail FROM events"
        args: tuple[Any, ...] = ()
        if uid is not None:
            sql, args = sql + " WHERE uid=?", (uid,)
        sql += " ORDER BY id DESC LIMIT ?"
        keys = ("at", "uid", "event", "from_state", "to_state", "detail")
        return [dict(zip(keys, r, strict=True)) for r in self.db.execute(sql, (*args, limit))]

    # -- plumbing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """BEGIN IMMEDIATE, the deferred transitions, the caller's writes, COMMIT; ROLLBACK on any error.

        The deferred transitions stay queued until a COMMIT has written them.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for step in self._deferred:
                self._apply(step)
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._deferred.clear()
