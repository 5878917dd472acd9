"""The SQLite journal: one row per series, every transition guarded and atomic.

Every state change is `UPDATE series SET state=? ... WHERE uid=? AND state=?` plus one row
in `events`, in one transaction; a rowcount of 0 means someone else moved the row and is
an error. A transition may be deferred to ride in the next write's transaction, before it
(the scheduler does so for a proven series until the next move is sent): never split,
never reordered. WAL mode lets `status` read while a run writes.

Planning streams: one transaction per PLAN_CHUNK rows, each with a progress mark (meta
`plan_at`: batch line and byte offset after its last row), and `planned_at` only once the
last row is in. A run killed mid-plan leaves the mark; the re-run of the same file plans
only what follows it. A fresh plan inserts into `series` without the UNIQUE index on `uid`
(the batch check already refused duplicate rows) and builds that index at the end: one
sort instead of a random B-tree write per row, which at 10^6 UIDs rewrites most of the
index in every chunk's commit.

`state_counts` (rows and received instances per state) and `run_times` are kept by
triggers inside each transition's transaction, so `counts()`/`totals()` read a few rows
instead of scanning 10^6 (the scheduler asks every 0.5 s, `status` on every call). Rows
are inserted only by planning, which adds its own count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .disk import free_bytes
from .errors import JournalError, JournalFull, StateConflict
from .states import Event, State, next_state

SCHEMA_VERSION = 2  # 2: uid's UNIQUE index built at the end of a plan; state_counts, run_times
CHECKPOINT_EVERY = 100  # writes between two checkpoints once the owner runs them (`defer_checkpoints`)
PLAN_CHUNK = 10_000  # rows per planning transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    seq INTEGER PRIMARY KEY,            -- batch order; issue order
    uid TEXT NOT NULL,                  -- SeriesInstanceUID (UNIQUE index series_uid, see plan_end)
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

# Created (and filled from `series`) once per journal, also in one written by an older version.
_TALLIES = (
    "CREATE TABLE IF NOT EXISTS state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL, received INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS run_times (id INTEGER PRIMARY KEY CHECK (id = 1), first_issued_at REAL,"
    " last_finished_at REAL)",
    """CREATE TRIGGER IF NOT EXISTS series_state_counts AFTER UPDATE OF state, received ON series BEGIN
        UPDATE state_counts SET n = n - 1, received = received - old.received WHERE state = old.state;
        INSERT INTO state_counts (state, n, received) VALUES (new.state, 1, new.received)
            ON CONFLICT (state) DO UPDATE SET n = n + 1, received = received + excluded.received;
    END""",
    # The earliest first issue and the latest finish ever written (neither is ever cleared).
    """CREATE TRIGGER IF NOT EXISTS series_run_times AFTER UPDATE OF first_issued_at, finished_at ON series BEGIN
        UPDATE run_times SET
            first_issued_at = COALESCE(MIN(first_issued_at, new.first_issued_at), first_issued_at,
                                       new.first_issued_at),
            last_finished_at = COALESCE(MAX(last_finished_at, new.finished_at), last_finished_at, new.finished_at);
    END""",
    "INSERT INTO state_counts (state, n, received)"
    " SELECT state, COUNT(*), COALESCE(SUM(received), 0) FROM series GROUP BY state",
    "INSERT INTO run_times (id, first_issued_at, last_finished_at)"
    " SELECT 1, MIN(first_issued_at), MAX(finished_at) FROM series",
)

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


def peek_meta(path: Path, keys: Iterable[str]) -> dict[str, str]:
    """Some meta values of an existing journal, read without writing anything ({} when unreadable).

    An ordinary connection, not `mode=ro`: a read-only one leaves `-wal`/`-shm` files
    behind, and bad input must leave the journal's directory as it was.
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=10)
    except sqlite3.Error:
        return {}
    try:
        keys = list(keys)
        sql = f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' * len(keys))})"
        return dict(db.execute(sql, keys).fetchall())
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def disk_full(exc: sqlite3.Error) -> bool:
    """SQLite could not write: the disk (or the file system's quota) is full."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


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
                self._add_tallies()
            self.db.execute("SELECT 1 FROM series LIMIT 1")
            # An older journal only a read-only reader opened since: counts by scanning.
            self._tallied = self._has("table", "state_counts")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise JournalError(f"{self.path}: not a dicom-transfer journal ({exc})") from exc

    def _has(self, kind: str, name: str) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type=? AND name=?"
        return self.db.execute(sql, (kind, name)).fetchone() is not None

    def _add_tallies(self) -> None:
        if self._has("table", "state_counts"):
            return
        with self._tx():
            if not self._has("table", "state_counts"):  # another process may have been first
                for sql in _TALLIES:
                    self.db.execute(sql)

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
            try:
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.OperationalError as exc:
                if disk_full(exc):
                    raise JournalFull(self.path, free_bytes(self.path.parent)) from exc
                raise
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
        """Insert every (series_uid, study_uid, patient_id, line) as pending, PLAN_CHUNK rows a transaction.

        `studies` are the study rows' expansions (study_uid, line, found, planned, reason).
        Idempotent: a series already planned keeps its row. Returns the number planned.
        (The main job streams a batch through plan_start/plan_rows/plan_end itself.)
        """
        self.plan_start(batch)
        n = 0
        chunk: list[tuple[str, str | None, str | None, int | None]] = []
        pending_studies = list(studies)
        for row in rows:
            chunk.append(row)
            if len(chunk) >= PLAN_CHUNK:
                n += self.plan_rows(chunk, (row[3] or 0, 0), pending_studies)
                chunk, pending_studies = [], []
        if chunk or pending_studies:
            n += self.plan_rows(chunk, ((chunk[-1][3] or 0) if chunk else 0, 0), pending_studies)
        self.plan_end()
        return n

    def plan_start(
        self, batch: Path, digest: str | None = None, extra: dict[str, str] | None = None
    ) -> tuple[int, int] | None:
        """Begin or resume planning `batch` (file SHA-256 `digest`): where to read it from.

        Same digest as planned: None (nothing to do). Same digest, plan interrupted: the
        (line, byte offset) after the last planned row. Otherwise (a new journal, a changed
        or unknown file) (0, 0), and `planned_at` is cleared until `plan_end`; rows already
        there stay (a changed batch's new rows are appended). `extra` meta is written too.
        """
        with self._tx():
            if digest is not None and self.meta("batch_sha256") == digest:
                if self.meta("planned_at") is not None:
                    return None
                mark = self.meta("plan_at")
                if mark is not None:
                    line, offset = mark.split()
                    return int(line), int(offset)
            if self.db.execute("SELECT 1 FROM series LIMIT 1").fetchone() is not None:
                self._index_uids()  # INSERT OR IGNORE must see the rows already there
            self.db.execute("DELETE FROM meta WHERE key IN ('planned_at', 'plan_at')")
            values = {"batch": str(batch), "schema": str(SCHEMA_VERSION), **(extra or {})}
            if digest is not None:
                values["batch_sha256"] = digest
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())
        self.writes += 1
        return 0, 0

    def plan_rows(
        self,
        rows: Iterable[tuple[str, str | None, str | None, int | None]],
        mark: tuple[int, int],
        studies: Iterable[tuple[str, int | None, int, int, str | None]] = (),
    ) -> int:
        """One chunk of the plan, with its progress `mark` (line, offset), in one transaction."""
        now = self.clock()
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?)", studies)
            cur = self.db.executemany(
                "INSERT OR IGNORE INTO series (uid, study_uid, patient_id, batch_line, state, updated_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?)",
                ((uid, study, pid, line, now) for uid, study, pid, line in rows),
            )
            n = max(cur.rowcount, 0)
            self._count(State.PENDING, n)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('plan_at', ?)", (f"{mark[0]} {mark[1]}",))
        self.writes += 1
        return n

    def plan_end(self) -> None:
        """Every row is in: index the UIDs and mark the journal planned."""
        with self._tx():
            self._index_uids()
            self.db.execute("DELETE FROM meta WHERE key='plan_at'")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('planned_at', ?)", (repr(self.clock()),))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self.writes += 1

    def _index_uids(self) -> None:
        """The UNIQUE index on uid (a journal of schema 1 has it inline), built if missing."""
        if self._has("index", "series_uid") or self._has("index", "sqlite_autoindex_series_1"):
            return
        try:
            self.db.execute("CREATE UNIQUE INDEX series_uid ON series (uid)")
        except sqlite3.IntegrityError:
            # A study row's series also listed as a series row (or under two study rows):
            # the first in batch order stays, as INSERT OR IGNORE keeps it. All are pending.
            cur = self.db.execute("DELETE FROM series WHERE seq NOT IN (SELECT MIN(seq) FROM series GROUP BY uid)")
            self._count(State.PENDING, -cur.rowcount)
            self.db.execute("CREATE UNIQUE INDEX series_uid ON series (uid)")

    def _count(self, state: State, n: int) -> None:
        if n:
            self.db.execute(
                "INSERT INTO state_counts (state, n, received) VALUES (?, ?, 0)"
                " ON CONFLICT (state) DO UPDATE SET n = n + excluded.n",
                (state.value, n),
            )

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

    def iter_rows(self, *states: State) -> Iterator[SeriesRow]:
        """Rows in batch order (optionally only those in `states`), one at a time."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM series"
        args = [State(s).value for s in states]
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
        for r in self.db.execute(sql + " ORDER BY seq", args):
            yield SeriesRow.from_sql(r)

    def warnings(self) -> list[tuple[str, str]]:
        """(uid, warning) of the series with a warning, in batch order."""
        return self.db.execute("SELECT uid, warning FROM series WHERE warning IS NOT NULL ORDER BY seq").fetchall()

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
        """Series per state (every state a key), from `state_counts`: a few rows, not a scan."""
        counts = {s.value: 0 for s in State}
        sql = (
            "SELECT state, n FROM state_counts"
            if self._tallied
            else "SELECT state, COUNT(*) FROM series GROUP BY state"
        )
        for state, n in self.db.execute(sql):
            counts[state] = n
        return counts

    def totals(self) -> dict[str, Any]:
        """Row count, instances received by complete series, first issue, last finish (no scan)."""
        if not self._tallied:
            row = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state='complete' THEN received END), 0),"
                " MIN(first_issued_at), MAX(finished_at) FROM series"
            ).fetchone()
            return {"total": row[0], "instances": row[1], "first_issued_at": row[2], "last_finished_at": row[3]}
        total, instances = self.db.execute(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(CASE WHEN state='complete' THEN received END), 0)"
            " FROM state_counts"
        ).fetchone()
        times = self.db.execute("SELECT first_issued_at, last_finished_at FROM run_times").fetchone()
        first, last = times if times else (None, None)
        return {"total": total, "instances": instances, "first_issued_at": first, "last_finished_at": last}

    def received_in(self, *states: State) -> int:
        """Instances recorded as received by the series in `states` (from the tallies: no scan)."""
        marks = ", ".join("?" * len(states))
        table = "state_counts" if self._tallied else "series"
        sql = f"SELECT COALESCE(SUM(received), 0) FROM {table} WHERE state IN ({marks})"
        return int(self.db.execute(sql, [State(s).value for s in states]).fetchone()[0])

    def studies(self) -> list[dict[str, Any]]:
        keys = ("study_uid", "batch_line", "found", "planned", "reason")
        rows = self.db.execute(f"SELECT {', '.join(keys)} FROM studies ORDER BY batch_line")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def run_events(self, names: Sequence[str]) -> list[tuple[float, str, dict[str, Any] | None]]:
        """The run-level events named (at, event, detail) since the last `run.start`, oldest first."""
        marks = ", ".join("?" * len(names))
        sql = (
            "SELECT at, event, detail FROM events WHERE uid IS NULL AND id >= COALESCE("
            "(SELECT MAX(id) FROM events WHERE uid IS NULL AND event='run.start'), 0)"
            f" AND event IN ({marks}) ORDER BY id"
        )
        rows = self.db.execute(sql, names)
        return [(at, event, json.loads(detail) if detail else None) for at, event, detail in rows]

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
    def writing(self) -> Iterator[None]:
        """One transaction for a caller's own writes on `db` (the after-arrival steps' table):
        rolled back on any error, a full disk raised as JournalFull like every journal write."""
        with self._tx():
            yield
        self.writes += 1

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
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:  # SQLite may have rolled back by itself (a full disk)
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and disk_full(exc):
                raise JournalFull(self.path, free_bytes(self.path.parent)) from exc
            raise
        self._deferred.clear()
