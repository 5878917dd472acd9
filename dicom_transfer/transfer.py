"""The main job, as plain Python: connect, plan, run, report. `cli.py` only wraps it."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from .batch import BatchCheck, BatchRow, check_batch, iter_batch
from .config import Config
from .disk import free_bytes
from .errors import ConfigError, DicomTransferError, JournalFull, OrthancError, Unreachable, Untrusted
from .journal import PLAN_CHUNK, Journal, disk_full, file_digest, peek_meta
from .orthanc import Destination, ForwardTarget, LocalOrthanc, LocalStore, OrthancRest, check_c_get
from .relay import Relay
from .report import build_report, write_report
from .runlock import JournalLock
from .scheduler import RunResult, Scheduler, StopFlag
from .states import State
from .steps import AfterArrivalSteps
from .steps import validate as validate_steps

log = structlog.get_logger("dicom_transfer")

START_DEADLINE_S = 10.0  # how long a party may take to answer at start before exit 2


class PartyUnreachable(DicomTransferError):
    """A party did not answer at start: nothing was changed (exit 2)."""

    exit_code = 2


@dataclass
class Outcome:
    report: dict[str, Any]
    result: RunResult
    journal_path: Path
    report_path: Path | None

    @property
    def exit_code(self) -> int:
        if self.result.stopped:
            return 3
        studies_failed = any(s["state"] == "failed" for s in self.report.get("studies", []))
        steps_failed = any(c["failed"] for c in self.report.get("steps", {}).values())
        return 1 if self.report["summary"]["failed"] or studies_failed or steps_failed else 0


def default_journal(batch: Path) -> Path:
    """`<batch>.journal.sqlite` beside the batch (series.csv → series.journal.sqlite)."""
    return batch.with_name(f"{batch.stem}.journal.sqlite")


def check_answers(party: OrthancRest, key: str) -> None:
    """`GET /system` at start: a party that does not answer is exit 2, naming its config key."""
    try:
        party.system()
    except Untrusted as exc:
        raise PartyUnreachable(f"{key}: {party.name} at {exc}") from exc
    except Unreachable as exc:
        raise PartyUnreachable(f"{key}: {party.name} at {party.url} does not answer ({exc.message})") from exc
    except OrthancError as exc:
        raise PartyUnreachable(f"{key}: {party.name} at {party.url}: {exc}") from exc


def open_local(cfg: Config, *, timeout_s: float = 30.0, deadline_s: float = START_DEADLINE_S) -> LocalOrthanc:
    """The local Orthanc, checked to answer and to know the source (else exit 2)."""
    local = LocalOrthanc(
        cfg.local.url, cfg.local.username, cfg.local.password,
        timeout_s=timeout_s, retry_deadline_s=deadline_s, name="local Orthanc",
    )  # fmt: skip
    try:
        check_answers(local, "local.url")
        _ensure_source(cfg, local)
    except BaseException:
        local.close()
        raise
    return local


def connect(cfg: Config, *, deadline_s: float = START_DEADLINE_S) -> tuple[LocalOrthanc, Destination]:
    """Open both REST ends and check at once that they answer and know the source."""
    local = open_local(cfg, deadline_s=deadline_s)
    if cfg.transfer.retrieve == "get":
        why = check_c_get(local.version(), local.url)
        if why is not None:
            local.close()
            raise ConfigError("transfer.retrieve", why)
    user, password = cfg.destination_auth() or (None, None)
    kind = ForwardTarget if cfg.relay_mode else Destination  # relay: it takes ZIP uploads too
    dest = kind(
        cfg.destination_url(), user, password,
        retry_deadline_s=deadline_s, name="destination Orthanc",
    )  # fmt: skip
    try:
        check_answers(dest, "destination.url")
    except BaseException:
        local.close()
        dest.close()
        raise
    # From here on a party may be slow or restart: give it the run-time retry deadline.
    local.retry_deadline_s = dest.retry_deadline_s = cfg.transfer.move_timeout_s
    return local, dest


def _ensure_source(cfg: Config, local: LocalOrthanc) -> None:
    src = cfg.source
    if src.aet and src.host and src.port:
        local.register_modality(src.modality, src.aet, src.host, src.port)
        return
    known = local.modalities()
    if src.modality not in known:
        raise ConfigError(
            "source.modality",
            f"{src.modality!r} is not a DICOM modality of the local Orthanc at {local.url}"
            f" (it knows: {', '.join(known) or 'none'}); add it there or give source.aet/host/port",
        )


def checked_batch(batch: Path, journal_path: Path) -> BatchCheck:
    """`check_batch`, unless the journal was planned (or began planning) from this very file.

    Same SHA-256 as the journal's `batch_sha256`: the bytes were checked before that plan
    began, so a resumed run only hashes the file (~0.3 s per 100 MB) instead of reading
    it twice more before its first move.
    """
    if journal_path.exists():
        known = peek_meta(journal_path, ("batch_sha256", "planned_at", "plan_at", "batch_rows", "batch_studies"))
        begun = known.get("planned_at") or known.get("plan_at")
        if begun and known.get("batch_rows") and known.get("batch_studies"):
            try:
                digest = file_digest(batch)
            except OSError:
                return check_batch(batch)  # says which file cannot be read
            if digest == known["batch_sha256"]:
                return BatchCheck(batch, digest, int(known["batch_rows"]), int(known["batch_studies"]))
    return check_batch(batch)


JOURNAL_BYTES_PER_SERIES = 2048  # a finished run's journal holds ~600 B a series; retries add events
JOURNAL_SPARE_BYTES = 64 * 2**20  # the write-ahead log between checkpoints, and what else shares the disk


def _warn_if_little_room(journal: Journal) -> None:
    """Say so at the start when the journal's disk may fill before the batch is done (it stops then, exit 3)."""
    counts = journal.counts()
    left = sum(n for state, n in counts.items() if state not in (State.COMPLETE.value, State.FAILED.value))
    need = JOURNAL_SPARE_BYTES + JOURNAL_BYTES_PER_SERIES * left
    free = free_bytes(journal.path.parent)
    if free is not None and free < need:
        log.warning("journal.disk_low", journal=str(journal.path), free_mb=round(free / 2**20, 1),
                    about_needed_mb=round(need / 2**20, 1), series_left=left)  # fmt: skip


def plan(journal: Journal, batch: Path, checked: BatchCheck, cfg: Config, local: LocalOrthanc | None) -> int:
    """Every batch row into the journal before the first move, in batch order, streamed.

    One transaction per PLAN_CHUNK series with a progress mark: a run killed mid-plan
    resumes after the last chunk written. Study rows become their series (SERIES-level
    C-FIND, filters applied) here; the expansion is stored, so a re-run neither re-queries
    nor re-orders. A study the source does not have is recorded as failed, never dropped
    in silence. Returns the number of series planned now.
    """
    filters = hashlib.sha256(json.dumps(asdict(cfg.filter), sort_keys=True).encode()).hexdigest()
    if journal.meta("batch_sha256") == checked.sha256 and (journal.planned or journal.meta("plan_at")):
        if checked.studies and journal.meta("filter_sha256") not in (None, filters):
            raise ConfigError(
                "filter",
                f"changed since {journal.path} was planned: the study rows were expanded with the old"
                " filter; restore it, or start a new journal with --journal",
            )
    extra = {"filter_sha256": filters, "batch_rows": str(checked.rows), "batch_studies": str(checked.studies)}
    start = journal.plan_start(batch, checked.sha256, extra)
    if start is None:
        return 0
    if start != (0, 0):
        log.info("plan.resumed", after_line=start[0])
    rows = iter_batch(batch, start if start != (0, 0) else None)
    n = series = 0
    chunk: list[tuple[str, str | None, str | None, int | None]] = []
    studies: list[tuple[str, int | None, int, int, str | None]] = []
    for row in rows:
        if row.series_uid:
            chunk.append((row.series_uid, row.study_uid, row.patient_id, row.line))
        else:
            assert local is not None, "a study row needs the local Orthanc to expand it"
            chunk += _expand(row, cfg, local, studies)
        if len(chunk) >= PLAN_CHUNK:
            series += len(chunk)
            n += journal.plan_rows(chunk, (rows.line, rows.offset), studies)
            chunk, studies = [], []
    series += len(chunk)
    n += journal.plan_rows(chunk, (rows.line, rows.offset), studies)
    journal.plan_end()
    log.info("batch.planned", rows=checked.rows, series=series, new=n)
    return n


def _expand(
    row: BatchRow, cfg: Config, local: LocalOrthanc, studies: list[tuple[str, int | None, int, int, str | None]]
) -> list[tuple[str, str | None, str | None, int | None]]:
    """A study row's series (SERIES-level C-FIND, filters applied); its record goes to `studies`."""
    answers = local.find_series(cfg.source.modality, None, row.study_uid)
    kept = [a for a in answers if cfg.filter.accepts(a.modality, a.description)]
    blind = sum(1 for a in kept if not a.description) if cfg.filter.series_description_exclude else 0
    if blind:  # e.g. DCMTK dcmqrscp answers no SeriesDescription: the filter cannot see them
        log.warning(
            "filter.description_unknown", study=row.study_uid, line=row.line, series=blind,
            note="the source gave no SeriesDescription: filter.series_description.exclude could not apply",
        )  # fmt: skip
    reason = None
    if not answers:
        reason = "not found at source"
    elif not kept:
        reason = f"all {len(answers)} series excluded by the filter"
    studies.append((str(row.study_uid), row.line, len(answers), len(kept), reason))
    if reason:
        log.warning("study.nothing_planned", study=row.study_uid, line=row.line, reason=reason)
    return [(a.series_uid, a.study_uid, row.patient_id or a.patient_id, row.line) for a in kept]


def _relay_parts(cfg: Config, local: LocalOrthanc, dest: Destination, clock: Callable[[], float]
                 ) -> tuple[LocalStore, Relay]:  # fmt: skip
    """Relay mode: the local Orthanc as where moves land (a counted store), and the forwarder."""
    assert isinstance(dest, ForwardTarget)
    landing = LocalStore(
        cfg.local.url, cfg.local.username, cfg.local.password,
        retry_deadline_s=local.retry_deadline_s, name="local Orthanc",
    )  # fmt: skip
    landing.system()  # its AE title is the move target
    return landing, Relay(cfg, landing, dest, wake=lambda: None, clock=clock)


@contextmanager
def _signals(stop: StopFlag) -> Iterator[None]:
    """SIGINT/SIGTERM: stop issuing and return (exit 3); the same command resumes."""

    def handler(signum: int, _frame: Any) -> None:
        stop.set(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_batch(
    cfg: Config,
    batch: Path,
    *,
    journal_path: Path | None = None,
    report_path: Path | None = None,
    until_window_end: bool = False,
    show_phi: bool = False,
    on_progress: Callable[[dict[str, int]], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """The main job. Bad input raises before anything is written."""
    journal_path = journal_path or default_journal(batch)
    with JournalLock(journal_path, clock=clock):  # a second run on this journal refuses here (exit 2)
        return _run_locked(cfg, batch, journal_path, report_path, until_window_end, show_phi, on_progress, clock)


def _run_locked(
    cfg: Config,
    batch: Path,
    journal_path: Path,
    report_path: Path | None,
    until_window_end: bool,
    show_phi: bool,
    on_progress: Callable[[dict[str, int]], None] | None,
    clock: Callable[[], float],
) -> Outcome:
    validate_steps(cfg)  # export/tags/anonymize keys and the lookup table: exit 2 before anything
    checked = checked_batch(batch, journal_path)
    local, dest = connect(cfg)
    started = clock()
    journal = Journal(journal_path, clock=clock)
    after: AfterArrivalSteps | None = None
    landing: LocalStore | None = None
    relay: Relay | None = None
    try:
        plan(journal, batch, checked, cfg, local)
        _warn_if_little_room(journal)
        stop = StopFlag()
        after = AfterArrivalSteps(cfg, journal, dest, show_phi=show_phi, stop=stop)
        if cfg.relay_mode:
            landing, relay = _relay_parts(cfg, local, dest, clock)
        scheduler = Scheduler(
            cfg, journal, local, landing or dest,
            clock=clock, until_window_end=until_window_end, stop=stop, on_progress=on_progress,
            after=after if after.enabled else None, relay=relay,
        )  # fmt: skip
        with _signals(stop):
            try:
                result = scheduler.run()
            except Unreachable as exc:
                log.error("run.party_gone", error=str(exc))
                result = RunResult(True, f"a party stopped answering: {exc}")
        report = build_report(journal, str(batch), started, clock(), show_phi=show_phi)
        if result.stopped:
            report["stopped"] = result.stop_reason
        if report_path is not None:
            try:
                write_report(report, report_path)
            except OSError as exc:  # a full disk: the run's outcome stands, the journal holds it all
                log.warning("report.unwritten", report=str(report_path), error=exc.strerror or str(exc),
                            then="run the same command once there is room: it moves nothing and writes it")  # fmt: skip
                report_path = None
        return Outcome(report, result, journal_path, report_path)
    except sqlite3.OperationalError as exc:  # a write outside the journal's own (an export's index)
        if disk_full(exc):
            raise JournalFull(journal_path, free_bytes(journal_path.parent)) from exc
        raise
    finally:
        if after is not None:
            after.close()
        if relay is not None:
            relay.close()
        if landing is not None:
            landing.close()
        journal.close()
        local.close()
        dest.close()
