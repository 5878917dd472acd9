"""After-arrival steps on each verified series: anonymise, tags CSV, export, NIfTI (each optional).

`validate(cfg)` checks the `export`, `tags`, `anonymize` and `nifti` sections (every error
names its key path). `AfterArrivalSteps` is the scheduler's `AfterArrival`: `run(uid)` takes
one complete series through the enabled steps in the order anonymize → tags → export →
nifti (the others read the anonymised copy when anonymize is on), `pending()` lists complete series
with a step not done. Per-series step state lives in the journal's database (`steps`
table, one transaction per state change, plus an `events` row for done/failed), so every
step is resumable and idempotent. A step that cannot finish is recorded `failed` with its
reason; the series stays `complete`. Only `Unreachable` (a party gone) leaves `run`.

A step whose disk is full (ENOSPC, EDQUOT) is not the series' fault: the step goes back to
`pending` with no attempt spent, `steps.no_room` is logged once, and no step runs until a
probe (the next series' steps, on a 1 → 30 s back-off) finds room; moves go on meanwhile.
`run` then answers False and the scheduler keeps the series for later; with nothing else
left it waits for room up to `transfer.unreachable_s` and stops with exit 3 (resumable).

A step is done for the settings it ran with: its fingerprint is stored, and changed
settings (another export template, tags columns, anonymize turned on) make it due again.
`anonymize.keep`/`replace` are the exception: a copy once made is not made again.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .anonymize import (
    AnonymizeSettings,
    Lookup,
    LookupTableError,
    SeriesAnonymizer,
    held,
    parse_keep,
    parse_replace,
)
from .config import Config
from .disk import NO_ROOM, free_bytes
from .errors import ConfigError, OrthancError, Unreachable
from .export import DEFAULT_TEMPLATE, ExportSettings, SeriesExport, StepFailed, TemplateError, parse_template
from .journal import Journal
from .nifti import DEFAULT_NAME, INSTALL_HINT, TOOLS, NiftiSettings, SeriesNifti, find_tool, patient_keywords
from .orthanc import Destination
from .pause import Pause
from .scheduler import short_uid
from .states import State
from .tags import LEVELS, TagsFile, TagsSettings, encode_rows, parse_columns, rows_for

log = structlog.get_logger("dicom_transfer")

ANONYMIZE, TAGS, EXPORT, NIFTI = "anonymize", "tags", "export", "nifti"
STEP_ORDER = (ANONYMIZE, TAGS, EXPORT, NIFTI)
REPORT_KEYS = {ANONYMIZE: "anonymized", TAGS: "tags", EXPORT: "export", NIFTI: "nifti"}  # keys of a report row
STATES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    uid TEXT NOT NULL,                  -- the original SeriesInstanceUID
    step TEXT NOT NULL,                 -- anonymize | tags | export | nifti
    state TEXT NOT NULL,                -- pending | running | done | failed
    fingerprint TEXT,                   -- the settings it last ran with
    reason TEXT,                        -- why it failed (never patient data)
    detail TEXT,                        -- JSON: what it made (counts, copy UID, job id)
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (uid, step)
);
CREATE TABLE IF NOT EXISTS steps_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS export_files (
    path TEXT PRIMARY KEY,              -- absolute path of one exported file
    uid TEXT NOT NULL,                  -- its series
    instance TEXT NOT NULL,             -- Orthanc instance id it comes from
    size INTEGER                        -- bytes once written; NULL until then
);
CREATE INDEX IF NOT EXISTS export_files_uid ON export_files (uid);
"""


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the steps' tables in the journal's database (idempotent)."""
    db.executescript(SCHEMA)


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The checked `export`, `tags`, `anonymize` and `nifti` sections (None = off)."""

    export: ExportSettings | None = None
    tags: TagsSettings | None = None
    anonymize: AnonymizeSettings | None = None
    nifti: NiftiSettings | None = None

    @property
    def enabled(self) -> tuple[str, ...]:
        on = {ANONYMIZE: self.anonymize, TAGS: self.tags, EXPORT: self.export, NIFTI: self.nifti}
        return tuple(step for step in STEP_ORDER if on[step] is not None)

    def fingerprints(self) -> dict[str, str]:
        anonymized = self.anonymize is not None
        parts: dict[str, Any] = {}
        if self.anonymize is not None:
            parts[ANONYMIZE] = self.anonymize.fingerprint()
        if self.tags is not None:
            parts[TAGS] = {**self.tags.fingerprint(), "anonymized": anonymized}
        if self.export is not None:
            parts[EXPORT] = {**self.export.fingerprint(), "anonymized": anonymized}
        if self.nifti is not None:
            parts[NIFTI] = {**self.nifti.fingerprint(), "anonymized": anonymized}
        return {
            step: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for step, value in parts.items()
        }


def _error(cfg: Config, key: str, reason: str) -> ConfigError:
    """A ConfigError naming the key, with file:line:col when the YAML file has the key."""
    if cfg.path is None:
        return ConfigError(key, reason)
    where = str(cfg.path)
    try:
        from .config import _locate  # the loader's own locator: same line numbers as its errors

        mark = _locate(cfg.path.read_text(encoding="utf-8-sig"), key.split("."))
    except (OSError, UnicodeDecodeError):
        mark = None
    if mark is not None:
        where = f"{where}:{mark.line + 1}:{mark.column + 1}"
    return ConfigError(key, reason, file=where)


def _check_keys(cfg: Config, section: str, raw: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            match = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {match[0]}?" if match else f"known: {', '.join(known)}"
            raise _error(cfg, f"{section}.{key}", f"unknown key ({hint})")


def _path(cfg: Config, key: str, value: Any, what: str) -> Path:
    if value is None:
        raise _error(cfg, key, f"is required ({what})")
    if not isinstance(value, str) or not value.strip():
        raise _error(cfg, key, f"must be a path ({what}), got {value!r}")
    if any(ord(c) < 32 for c in value):
        raise _error(cfg, key, "must not contain control characters")
    return Path(os.path.normpath(cfg.resolve_path(value.strip())))


def _bool(cfg: Config, key: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _error(cfg, key, f"must be true or false, got {value!r}")
    return value


def _export_settings(cfg: Config, raw: Mapping[str, Any]) -> ExportSettings:
    _check_keys(cfg, "export", raw, ("dir", "path", "decompress"))
    root = _path(cfg, "export.dir", raw.get("dir"), "the folder the files go to")
    if root.exists() and not root.is_dir():
        raise _error(cfg, "export.dir", "exists and is not a folder")
    try:
        template = parse_template(raw.get("path") if raw.get("path") is not None else DEFAULT_TEMPLATE)
    except TemplateError as exc:
        raise _error(cfg, "export.path", str(exc)) from None
    return ExportSettings(root, template, _bool(cfg, "export.decompress", raw.get("decompress"), False))


def _tags_settings(cfg: Config, raw: Mapping[str, Any]) -> TagsSettings:
    _check_keys(cfg, "tags", raw, ("file", "level", "keywords"))
    file = _path(cfg, "tags.file", raw.get("file"), "the CSV file to write")
    if file.is_dir():
        raise _error(cfg, "tags.file", "is a folder, not a file")
    level = raw.get("level", "instance")
    if level not in LEVELS:
        raise _error(cfg, "tags.level", f"must be one of {', '.join(LEVELS)}, got {level!r}")
    try:
        columns = parse_columns(raw.get("keywords"))
    except ValueError as exc:
        raise _error(cfg, "tags.keywords", str(exc)) from None
    return TagsSettings(file, level, columns)


def _anonymize_settings(cfg: Config, raw: Mapping[str, Any]) -> AnonymizeSettings:
    _check_keys(cfg, "anonymize", raw, ("lookup", "keep", "replace", "delete_original"))
    lookup = _path(cfg, "anonymize.lookup", raw.get("lookup"), "the CSV of pseudonyms; created when missing")
    if lookup.is_dir():
        raise _error(cfg, "anonymize.lookup", "is a folder, not a file")
    try:
        keep = parse_keep(raw.get("keep"))
    except ValueError as exc:
        raise _error(cfg, "anonymize.keep", str(exc)) from None
    try:
        replace = parse_replace(raw.get("replace"), keep)
    except ValueError as exc:
        raise _error(cfg, "anonymize.replace", str(exc)) from None
    delete = _bool(cfg, "anonymize.delete_original", raw.get("delete_original"), False)
    return AnonymizeSettings(lookup, keep, replace, delete)


def _nifti_settings(cfg: Config, raw: Mapping[str, Any]) -> NiftiSettings:
    _check_keys(cfg, "nifti", raw, ("dir", "tool", "path", "compress"))
    root = _path(cfg, "nifti.dir", raw.get("dir"), "the folder the NIfTI files go to")
    if root.exists() and not root.is_dir():
        raise _error(cfg, "nifti.dir", "exists and is not a folder")
    tool = raw.get("tool", "dcm2niix")
    if tool not in TOOLS:
        raise _error(cfg, "nifti.tool", f"must be {' or '.join(TOOLS)}, got {tool!r}")
    executable = find_tool(tool)
    if executable is None:
        raise _error(cfg, "nifti.tool", f"{tool} is not installed (not found on PATH): {INSTALL_HINT}")
    try:
        template = parse_template(raw.get("path") if raw.get("path") is not None else DEFAULT_NAME)
    except TemplateError as exc:
        raise _error(cfg, "nifti.path", str(exc)) from None
    phi = patient_keywords(template)
    if phi:
        raise _error(cfg, "nifti.path", f"{', '.join(phi)} is patient data: NIfTI file names must not carry it")
    compress = _bool(cfg, "nifti.compress", raw.get("compress"), True)
    return NiftiSettings(root, tool, executable, template, compress)


def settings_of(cfg: Config) -> Settings:
    """The checked step settings of `cfg`; raises ConfigError naming the key path."""
    sections: dict[str, Any] = {}
    builders = (
        ("export", _export_settings), ("tags", _tags_settings), ("anonymize", _anonymize_settings),
        ("nifti", _nifti_settings),
    )  # fmt: skip
    for name, build in builders:
        raw = getattr(cfg, name)
        if raw is None:
            continue
        if not isinstance(raw, Mapping):
            raise _error(cfg, name, "must be a mapping or null")
        sections[name] = build(cfg, raw)
    settings = Settings(**sections)
    _cross_check(cfg, settings)
    return settings


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _cross_check(cfg: Config, s: Settings) -> None:
    if s.anonymize is not None and s.export is not None and _inside(s.anonymize.lookup, s.export.root):
        raise _error(cfg, "anonymize.lookup", "must not be inside export.dir: the export would carry the key")
    if s.anonymize is not None and s.tags is not None and s.tags.file == s.anonymize.lookup:
        raise _error(cfg, "tags.file", "must not be the lookup table's file")
    if s.anonymize is not None and s.nifti is not None and _inside(s.anonymize.lookup, s.nifti.root):
        raise _error(cfg, "anonymize.lookup", "must not be inside nifti.dir: the NIfTI folder would carry the key")


def validate(cfg: Config) -> None:
    """Check every `export`, `tags` and `anonymize` key, and an existing lookup table.

    Raises ConfigError (exit 2) naming the key path, e.g.
    `export.path: unknown keyword 'PatientNmae' (did you mean PatientName?)`.
    """
    settings = settings_of(cfg)
    if settings.anonymize is not None:
        try:
            Lookup(settings.anonymize.lookup)
        except LookupTableError as exc:
            raise ConfigError("anonymize.lookup", str(exc)) from None


# -- the steps ---------------------------------------------------------------------------------------


@dataclass
class StepRow:
    state: str
    fingerprint: str | None
    reason: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0


def _rows(db: sqlite3.Connection, uid: str) -> dict[str, StepRow]:
    """One series' steps rows by step (a primary-key range: one index lookup)."""
    sql = "SELECT step, state, fingerprint, reason, detail, attempts FROM steps WHERE uid=?"
    return {
        step: StepRow(state, fp, reason, json.loads(detail) if detail else {}, attempts)
        for step, state, fp, reason, detail, attempts in db.execute(sql, (uid,))
    }


class AfterArrivalSteps:
    """The scheduler's after-arrival hook: anonymize → tags → export on each complete series.

    Build it once per run, even with every step off (it records which steps are on, for
    the report and `status`); hand it to the scheduler only when `enabled`. Call `close`.
    """

    def __init__(
        self,
        cfg: Config,
        journal: Journal,
        dest: Destination,
        *,
        show_phi: bool = False,
        stop: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings_of(cfg)
        self.journal = journal
        self.db = journal.db
        self.dest = dest
        self.show_phi = show_phi
        self.clock = clock
        self._stop = stop
        self.no_room = Pause("output", clock)  # a step's disk found full: steps wait for a probe
        ensure_schema(self.db)
        self.fingerprints = self.settings.fingerprints()
        self.db.execute(
            "INSERT OR REPLACE INTO steps_meta (key, value) VALUES ('enabled', ?)", (json.dumps(self.fingerprints),)
        )
        self.anonymizer: SeriesAnonymizer | None = None
        self.exporter: SeriesExport | None = None
        self.tags_file: TagsFile | None = None
        self.niftier: SeriesNifti | None = None
        s = self.settings
        if s.anonymize is not None:
            try:
                lookup = Lookup(s.anonymize.lookup)
            except LookupTableError as exc:
                raise ConfigError("anonymize.lookup", str(exc)) from None
            self.anonymizer = SeriesAnonymizer(dest, s.anonymize, lookup, timeout_s=cfg.transfer.move_timeout_s)
        if s.export is not None:
            self.exporter = SeriesExport(self.db, dest, s.export, stop=self.stopping)
        if s.nifti is not None:
            self.niftier = SeriesNifti(dest, s.nifti, timeout_s=cfg.transfer.move_timeout_s, stop=self.stopping)
        if s.tags is not None:
            self.tags_file = TagsFile(self.db, s.tags, self.fingerprints[TAGS])
            self.tags_file.open()  # before pending(): a rebuilt file makes every series due again

    @property
    def enabled(self) -> tuple[str, ...]:
        return self.settings.enabled

    def stopping(self) -> bool:
        return bool(self._stop)

    def close(self) -> None:
        if self.tags_file is not None:
            self.tags_file.close()

    def __enter__(self) -> AfterArrivalSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the AfterArrival protocol ----------------------------------------------------------

    def pending(self) -> list[str]:
        """Complete series (batch order) with an enabled step not done with today's settings."""
        if not self.enabled:
            return []
        # As `_done`, in SQL: only the answer is held, not the steps rows of every series.
        # A NULL fingerprint never equals today's, so such a row is not done.
        not_done = " OR ".join(
            "NOT EXISTS (SELECT 1 FROM steps st WHERE st.uid=s.uid AND st.step=? AND st.state='done'"
            " AND st.fingerprint=?)"
            for _ in self.enabled
        )
        args = [value for step in self.enabled for value in (step, self.fingerprints[step])]
        sql = f"SELECT s.uid FROM series s WHERE s.state='complete' AND ({not_done}) ORDER BY s.seq"
        return [uid for (uid,) in self.db.execute(sql, args)]

    def run(self, series_uid: str) -> bool:
        """Take one complete series through the steps not yet done; failures become data.

        False when the series' steps must wait: a step's disk has no room (until a probe
        finds some), or the run is stopping midway. The scheduler keeps it for later.
        """
        if not self.enabled:
            return True
        if self.no_room and not self.no_room.due(self.clock()):
            return False
        row = self.journal.get(series_uid)
        if row.state is not State.COMPLETE:
            return True
        current = _rows(self.db, series_uid)
        tags_cache: dict[str, dict[str, Any]] = {}
        for step in self.enabled:
            if self.stopping():
                return False
            previous = current.get(step)
            if self._done(previous, step):
                continue
            if step != ANONYMIZE and ANONYMIZE in self.enabled and not self._done(current.get(ANONYMIZE), ANONYMIZE):
                continue  # tags and export read the anonymised copy: not there yet
            self._mark_running(series_uid, step, previous)
            outcome = self._attempt(series_uid, step, row, previous, current, tags_cache)
            if outcome == "no_room":
                return False
            if outcome == "stopped":
                return False  # told to stop midway: stays `running`, resumed next time
            if self.no_room:  # the probe wrote what it had to: there is room again
                lasted = self.no_room.end()
                log.info("steps.room", step=step, waited_s=round(lasted, 1))
            current = _rows(self.db, series_uid)
        return True

    def waiting(self, now: float, limit_s: float) -> str | None:
        """Why the steps still wait for room after `limit_s`, as a stop reason; None otherwise."""
        if not self.no_room.too_long(now, limit_s):
            return None
        return f"{self.no_room.why} for {now - (self.no_room.since or now):.0f} s; the steps not done wait for it"

    def copy_count(self, series_uid: str) -> int:
        """Instances of the series' anonymised copy at the destination (0 without anonymize).

        The scheduler's pre-check adds this when the original is short: with
        `delete_original` the copy is what proves a series already transferred.
        """
        return self.anonymizer.copy_count(series_uid) if self.anonymizer is not None else 0

    def counts(self) -> dict[str, dict[str, int]]:
        """Per step: series done, failed, pending (for `status` and the report)."""
        return steps_summary(self.journal)

    # -- one step ------------------------------------------------------------------------------

    def _done(self, row: StepRow | None, step: str) -> bool:
        return row is not None and row.state == "done" and row.fingerprint == self.fingerprints[step]

    def _attempt(
        self,
        uid: str,
        step: str,
        row: Any,
        previous: StepRow | None,
        current: dict[str, StepRow],
        cache: dict[str, dict[str, Any]],
    ) -> str:
        """Run one step: "done" (or failed: recorded, not raised), "stopped" midway, or "no_room"."""
        started = time.monotonic()
        detail: dict[str, Any] | None
        try:
            if step == ANONYMIZE:
                detail = self._anonymize(uid, row, previous)
            elif step == TAGS:
                detail = self._tags(uid, current, cache)
            elif step == NIFTI:
                detail = self._nifti(uid, current, cache)
            else:
                detail = self._export(uid, previous, current, cache)
        except Unreachable:
            raise  # a party is gone: the run stops (exit 3) and this step resumes next time
        except StepFailed as exc:
            self._failed(uid, step, str(exc))
            return "done"
        except OrthancError as exc:
            extra = f" ({exc.details})" if exc.details else ""
            self._failed(uid, step, f"Orthanc: HTTP {exc.status}: {exc.message}{extra}")
            return "done"
        except OSError as exc:  # never the file name: it may be built from patient data
            if exc.errno in NO_ROOM:
                self._wait_for_room(uid, step)
                return "no_room"
            self._failed(uid, step, f"file system: {exc.strerror or type(exc).__name__}")
            return "done"
        if detail is None:
            return "stopped"
        self._log_done(uid, step, detail, time.monotonic() - started)
        return "done"

    def _wait_for_room(self, uid: str, step: str) -> None:
        """The step's disk is full: pending, its attempt given back; steps wait for a probe.

        Always pending, never the state it had: `running` already carries today's fingerprint,
        so an earlier `done` (with other settings) put back would pass for done with these.
        """
        key, folder = self._output(step)
        sql = "UPDATE steps SET state='pending', attempts=MAX(attempts-1, 0), updated_at=? WHERE uid=? AND step=?"
        self._transaction(lambda: self.db.execute(sql, (self.clock(), uid, step)))
        free = free_bytes(folder)
        free_text = f"{free / 2**20:.0f} MB free" if free is not None else "free space unknown"
        if self.no_room.begin(f"{key}: no room on its disk ({free_text})"):
            log.warning("steps.no_room", step=step, key=key, free_mb=None if free is None else round(free / 2**20, 1))
        else:
            self.no_room.probe_failed(self.clock())

    def _output(self, step: str) -> tuple[str, Path]:
        """The config key naming where `step` writes, and a folder on that disk."""
        s = self.settings
        if step == EXPORT and s.export is not None:
            return "export.dir", s.export.root
        if step == NIFTI and s.nifti is not None:
            return "nifti.dir", s.nifti.root
        if step == TAGS and s.tags is not None:
            return "tags.file", s.tags.file.parent
        return "journal", self.journal.path.parent

    def _anonymize(self, uid: str, row: Any, previous: StepRow | None) -> dict[str, Any]:
        assert self.anonymizer is not None
        expected = row.expected if row.expected is not None else row.received

        def save(partial: dict[str, Any]) -> None:
            self._save_detail(uid, ANONYMIZE, partial)

        detail = self.anonymizer.run(uid, row.study_uid, expected, previous.detail if previous else {}, save)
        self._finish(uid, ANONYMIZE, detail)
        return detail

    def _source(self, uid: str, current: dict[str, StepRow]) -> str:
        """The Orthanc id of the series the files and tags come from (the copy when anonymising)."""
        if ANONYMIZE in self.enabled:
            copy_uid = current[ANONYMIZE].detail.get("SeriesInstanceUID")
            found = held(self.dest, copy_uid) if copy_uid else None
            if found is None:
                raise StepFailed("the anonymised copy is not at the destination any more")
            return found.id
        found = held(self.dest, uid)
        if found is None:
            raise StepFailed("the series is not at the destination any more")
        return found.id

    def _instance_tags(self, sid: str, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Every instance's stored tags, without pixel data (one request per series)."""
        if sid not in cache:
            cache[sid] = dict(self.dest.get(f"/series/{sid}/instances-tags", params={"short": ""}))
        return cache[sid]

    def _tags(self, uid: str, current: dict[str, StepRow], cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
        assert self.tags_file is not None and self.settings.tags is not None
        tags = self._instance_tags(self._source(uid, current), cache)
        rows = rows_for(self.settings.tags, tags)
        detail = {"rows": len(rows), "bytes": len(encode_rows(rows))}
        self.tags_file.append(rows, commit=lambda: self._write_state(uid, TAGS, "done", None, detail))
        return detail

    def _export(
        self, uid: str, previous: StepRow | None, current: dict[str, StepRow], cache: dict[str, dict[str, Any]]
    ) -> dict[str, Any] | None:
        assert self.exporter is not None
        sid = self._source(uid, current)
        reuse = previous is not None and previous.fingerprint == self.fingerprints[EXPORT]
        detail = self.exporter.run(uid, sid, self._instance_tags(sid, cache), reuse)
        if detail is not None:
            self._finish(uid, EXPORT, detail)
        return detail

    def _nifti(self, uid: str, current: dict[str, StepRow], cache: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        assert self.niftier is not None
        sid = self._source(uid, current)
        detail = self.niftier.run(uid, sid, self._instance_tags(sid, cache))
        if detail is not None:
            self._finish(uid, NIFTI, detail)
        return detail

    # -- journal writes -----------------------------------------------------------------------------

    def _mark_running(self, uid: str, step: str, previous: StepRow | None) -> None:
        self._transaction(lambda: self._running(uid, step, previous))

    def _running(self, uid: str, step: str, previous: StepRow | None) -> None:
        self.db.execute(
            "INSERT INTO steps (uid, step, state, fingerprint, reason, detail, attempts, updated_at)"
            " VALUES (?, ?, 'running', ?, NULL, ?, 1, ?)"
            " ON CONFLICT (uid, step) DO UPDATE SET state='running', fingerprint=excluded.fingerprint,"
            " attempts=attempts+1, updated_at=excluded.updated_at",
            (uid, step, self.fingerprints[step], json.dumps(previous.detail if previous else {}), self.clock()),
        )

    def _save_detail(self, uid: str, step: str, detail: dict[str, Any]) -> None:
        sql = "UPDATE steps SET detail=?, updated_at=? WHERE uid=? AND step=?"
        self._transaction(lambda: self.db.execute(sql, (json.dumps(detail), self.clock(), uid, step)))

    def _write_state(self, uid: str, step: str, state: str, reason: str | None, detail: dict[str, Any] | None) -> None:
        """The SQL of one state change (inside the caller's transaction): row plus event."""
        now = self.clock()
        if detail is None:
            self.db.execute(
                "UPDATE steps SET state=?, reason=?, updated_at=? WHERE uid=? AND step=?",
                (state, reason, now, uid, step),
            )
        else:
            self.db.execute(
                "UPDATE steps SET state=?, reason=?, detail=?, updated_at=? WHERE uid=? AND step=?",
                (state, reason, json.dumps(detail), now, uid, step),
            )
        summary = reason if reason is not None else _summary(step, detail or {})
        self.db.execute(
            "INSERT INTO events (at, uid, event, detail) VALUES (?, ?, ?, ?)", (now, uid, f"{step}_{state}", summary)
        )

    def _transaction(self, write: Callable[[], Any]) -> None:
        with self.journal.writing():  # a full disk: JournalFull (exit 3), as for the run's own writes
            write()

    def _finish(self, uid: str, step: str, detail: dict[str, Any]) -> None:
        self._transaction(lambda: self._write_state(uid, step, "done", None, detail))

    def _failed(self, uid: str, step: str, reason: str) -> None:
        self._transaction(lambda: self._write_state(uid, step, "failed", reason, None))
        log.warning("step.failed", step=step, series=short_uid(uid), reason=reason)

    def _log_done(self, uid: str, step: str, detail: dict[str, Any], seconds: float) -> None:
        fields: dict[str, Any] = {"step": step, "series": short_uid(uid), "seconds": round(seconds, 3)}
        if step == EXPORT:
            fields.update(files=detail.get("files"), downloaded=detail.get("downloaded"))
            if self.show_phi:
                fields["dir"] = detail.get("dir")
        elif step == NIFTI:
            fields.update(files=detail.get("files"), volumes=detail.get("volumes"))
        elif step == TAGS:
            fields["rows"] = detail.get("rows")
        else:
            fields.update(instances=detail.get("instances"), original_deleted=detail.get("original_deleted"))
        log.info("step.done", **fields)


def _summary(step: str, detail: Mapping[str, Any]) -> str:
    """An event's detail for a done step: counts only (no paths, no pseudonyms)."""
    if step == EXPORT:
        return f"files={detail.get('files')} downloaded={detail.get('downloaded')}"
    if step == NIFTI:
        return f"files={detail.get('files')} volumes={detail.get('volumes')}"
    if step == TAGS:
        return f"rows={detail.get('rows')}"
    return f"instances={detail.get('instances')} original_deleted={detail.get('original_deleted')}"


# -- reading, for the report and `status` ---------------------------------------------------------------


def _enabled(db: sqlite3.Connection) -> dict[str, str]:
    try:
        row = db.execute("SELECT value FROM steps_meta WHERE key='enabled'").fetchone()
    except sqlite3.OperationalError:  # a journal from before the steps, or read-only and never written
        return {}
    return json.loads(row[0]) if row else {}


def _report_field(step: str, row: StepRow | None, fingerprint: str, show_phi: bool) -> dict[str, Any]:
    if row is None or (row.state == "done" and row.fingerprint != fingerprint):
        return {"state": "pending"}
    state = "pending" if row.state == "running" else row.state
    d = row.detail
    if step == EXPORT:
        out = {"state": state, "files": d.get("files"), "bytes": d.get("bytes"), "reason": row.reason}
        if show_phi:
            out["dir"] = d.get("dir")
    elif step == TAGS:
        out = {"state": state, "rows": d.get("rows"), "reason": row.reason}
    elif step == NIFTI:  # names are built without patient data (nifti.path refuses it)
        out = {
            "state": state, "files": d.get("files"), "volumes": d.get("volumes"), "bytes": d.get("bytes"),
            "names": d.get("names"), "reason": row.reason,
        }  # fmt: skip
    else:
        out = {
            "state": state,
            "instances": d.get("instances"),
            "original_deleted": d.get("original_deleted"),
            "reason": row.reason,
        }
        if show_phi:  # the copy's UIDs link it to the original: as sensitive as the lookup table
            out["SeriesInstanceUID"] = d.get("SeriesInstanceUID")
            out["StudyInstanceUID"] = d.get("StudyInstanceUID")
    return out


class StepFields:
    """The report's step fields of one series at a time, read from the journal when asked.

    A report of 10^6 series asks `of(uid, state)` once per row as it streams them: one
    primary-key lookup in `steps`, nothing held across series. `enabled` is empty when no
    step is on (report rows then stay as they were).
    """

    def __init__(self, journal: Journal, show_phi: bool = False) -> None:
        self.db = journal.db
        self.show_phi = show_phi
        self.enabled = _enabled(self.db)  # step -> the fingerprint of the settings last run with

    def of(self, uid: str, state: str) -> dict[str, Any]:
        """`{"anonymized": {...}|None, "tags": ..., "export": ..., "nifti": ...}` of a series in journal `state`.

        A step that is off, or a series that is not complete, gives None. Export folders and
        the copy's UIDs appear only with `show_phi`.
        """
        fields: dict[str, Any] = dict.fromkeys(REPORT_KEYS.values())
        if state == State.COMPLETE.value and self.enabled:
            rows = _rows(self.db, uid)
            for step, fingerprint in self.enabled.items():
                fields[REPORT_KEYS[step]] = _report_field(step, rows.get(step), fingerprint, self.show_phi)
        return fields


def report_fields(journal: Journal, show_phi: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(series UID, its step fields as `StepFields.of` gives them) in batch order, one at a time.

    Nothing when no step is on.
    """
    fields = StepFields(journal, show_phi)
    if fields.enabled:
        for uid, state in journal.db.execute("SELECT uid, state FROM series ORDER BY seq"):
            yield uid, fields.of(uid, state)


CSV_KEYS = tuple(f"{key}_{part}" for key in REPORT_KEYS.values() for part in ("state", "reason"))


def csv_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A report row's step fields flattened for the CSV report (`export_state`, `export_reason`...)."""
    out: dict[str, Any] = {}
    for key in REPORT_KEYS.values():
        value = fields.get(key)
        out[f"{key}_state"] = value["state"] if value else None
        out[f"{key}_reason"] = value.get("reason") if value else None
    return out


# Per step over complete series: all, done with today's settings, failed (with any settings:
# `_report_field` shows a failure as failed whatever it ran with). The rest are pending:
# no row, running, done with other settings (or a NULL fingerprint). One indexed pass, no rows held.
_SUMMARY_SQL = """
SELECT COUNT(*),
       COUNT(CASE WHEN st.state='done' AND st.fingerprint=:fingerprint THEN 1 END),
       COUNT(CASE WHEN st.state='failed' THEN 1 END)
FROM series s LEFT JOIN steps st ON st.uid=s.uid AND st.step=:step
WHERE s.state='complete'
"""


def steps_summary(journal: Journal) -> dict[str, dict[str, int]]:
    """Per enabled step, over complete series: `{"export": {"done": n, "failed": n, "pending": n}}`."""
    out = {}
    for step, fingerprint in _enabled(journal.db).items():
        args = {"step": step, "fingerprint": fingerprint}
        total, done, failed = journal.db.execute(_SUMMARY_SQL, args).fetchone()
        out[REPORT_KEYS[step]] = {"done": done, "failed": failed, "pending": total - done - failed}
    return out


def steps_failed(journal: Journal) -> int:
    """How many (series, step) pairs failed: any makes the run's exit code 1."""
    return sum(c["failed"] for c in steps_summary(journal).values())
