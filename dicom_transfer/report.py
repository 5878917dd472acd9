"""The run report (contract: JSON keys) and the `status` summary, both read from the journal.

The report's `series` list is not held in memory: `SeriesRows` reads it from the journal
each time it is iterated, and `write_report` streams it to the file row by row, so a
report of 10^6 series costs the memory of one row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, overload

from .journal import Journal, SeriesRow
from .runlock import holder
from .states import State
from .steps import CSV_KEYS, REPORT_KEYS, StepFields, csv_fields, steps_summary

SERIES_KEYS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "state",
    "expected",
    "received",
    "attempts",
    "verified",
    "seconds",
    "reason",
)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def summary(journal: Journal, seconds: float | None = None) -> dict[str, Any]:
    """Counts for the report's `summary`: pending is everything not yet complete or failed."""
    counts = journal.counts()
    totals = journal.totals()
    total = totals["total"]
    complete, failed = counts[State.COMPLETE.value], counts[State.FAILED.value]
    return {
        "total": total,
        "complete": complete,
        "failed": failed,
        "pending": total - complete - failed,
        "instances": totals["instances"],
        "seconds": round(seconds, 3) if seconds is not None else None,
        # relay mode: proven whole at the local Orthanc, not yet at the destination (0 in direct mode)
        "at_local": counts[State.HELD_LOCAL.value] + counts[State.FORWARDING.value],
        "instances_at_local": journal.received_in(State.HELD_LOCAL, State.FORWARDING),
    }


def _item(row: SeriesRow, show_phi: bool, steps: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "SeriesInstanceUID": row.uid,
        "StudyInstanceUID": row.study_uid,
        "state": row.state.value,
        "expected": row.expected,
        "received": row.received,
        "attempts": row.attempts,
        "verified": row.verified if row.state is State.COMPLETE else None,
        "seconds": round(row.seconds, 3) if row.seconds is not None else None,
        "reason": row.reason if row.state is not State.COMPLETE else None,
    }
    if show_phi:
        item["PatientID"] = row.patient_id
    item.update(steps)
    return item


def iter_series(journal: Journal, show_phi: bool = False, *, failed_only: bool = False) -> Iterator[dict[str, Any]]:
    """The report's series rows in batch order, one at a time.

    `failed_only`: the rows a summary lists (failed, or complete with a failed step).
    """
    steps = StepFields(journal, show_phi)  # looked up row by row: never a dict of every series
    states = (State.FAILED,) if failed_only and not steps.enabled else ()
    for row in journal.iter_rows(*states):
        item = _item(row, show_phi, steps.of(row.uid, row.state.value) if steps.enabled else {})
        if failed_only and not _has_failure(item):
            continue
        yield item


def _has_failure(item: dict[str, Any]) -> bool:
    return item["state"] == "failed" or any(
        (item.get(step) or {}).get("state") == "failed" for step in REPORT_KEYS.values()
    )


class SeriesRows(Sequence[dict[str, Any]]):
    """The report's `series`: read from the journal file on each pass, never all held in memory."""

    def __init__(self, journal_path: Path, show_phi: bool = False) -> None:
        self.journal_path = Path(journal_path)
        self.show_phi = show_phi

    def _iter(self, failed_only: bool = False) -> Iterator[dict[str, Any]]:
        journal = Journal(self.journal_path, readonly=True)
        try:
            yield from iter_series(journal, self.show_phi, failed_only=failed_only)
        finally:
            journal.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter()

    def failed(self) -> Iterator[dict[str, Any]]:
        """Only the rows with a failure (the series, or one of its steps)."""
        return self._iter(failed_only=True)

    def __len__(self) -> int:
        journal = Journal(self.journal_path, readonly=True)
        try:
            return int(journal.totals()["total"])
        finally:
            journal.close()

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return list(self)[index]  # small reports (tests); a large one is iterated
        if index < 0:
            index += len(self)
        for i, item in enumerate(self):
            if i == index:
                return item
        raise IndexError(index)


def failed_rows(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The report's series rows with a failure, without reading the others into memory."""
    series = report["series"]
    if isinstance(series, SeriesRows):
        return series.failed()
    return (r for r in series if _has_failure(r))


def build_report(
    journal: Journal,
    batch: str,
    started_at: float,
    finished_at: float,
    *,
    show_phi: bool = False,
) -> dict[str, Any]:
    """The report; its `series` is a `SeriesRows` over the journal's file (see the module docstring)."""
    warnings = [{"SeriesInstanceUID": uid, "warning": warning} for uid, warning in journal.warnings()]
    report: dict[str, Any] = {
        "batch": batch,
        "started_at": iso(started_at),
        "finished_at": iso(finished_at),
        "summary": summary(journal, finished_at - started_at),
        "series": SeriesRows(journal.path, show_phi),
    }
    if warnings:
        report["warnings"] = warnings
    throttle = learned_throttle(journal)
    if throttle:
        report["throttle"] = throttle
    steps = steps_summary(journal)
    if steps:
        report["steps"] = steps
    studies = [
        {"StudyInstanceUID": st["study_uid"], "line": st["batch_line"], "state": "failed" if st["found"] == 0 else
         "expanded", "series_found": st["found"], "series_planned": st["planned"], "reason": st["reason"]}
        for st in journal.studies()
    ]  # fmt: skip
    if studies:
        report["studies"] = studies
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    """JSON, or CSV of the series rows when the path ends in `.csv`; streamed, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                _write_csv(report, f)
            else:
                _write_json(report, f)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left beside the report
        raise


def _write_csv(report: dict[str, Any], f: IO[str]) -> None:
    series = report["series"]
    if isinstance(series, SeriesRows):
        phi = series.show_phi
    else:
        phi = any("PatientID" in r for r in series)
    keys = list(SERIES_KEYS) + (["PatientID"] if phi else [])
    rows: Any = series
    if "steps" in report:
        keys += CSV_KEYS
        rows = ({**r, **csv_fields(r)} for r in series)
    writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)


def _write_json(report: dict[str, Any], f: IO[str]) -> None:
    """As `json.dump(report, f, indent=2)`, but the series list streamed, one line a series."""
    f.write("{")
    for i, (key, value) in enumerate(report.items()):
        f.write(("," if i else "") + f"\n  {json.dumps(key)}: ")
        if key == "series":
            f.write("[")
            n = 0
            for n, row in enumerate(value, start=1):  # one line a series: the C encoder, ~5x faster
                f.write(("," if n > 1 else "") + "\n    " + json.dumps(row))
            f.write("\n  ]" if n else "]")
        else:
            f.write(json.dumps(value, indent=2).replace("\n", "\n  "))
    f.write("\n}\n")


def status(journal: Journal, now: float) -> dict[str, Any]:
    """What `status --json` prints: the report summary plus in-flight series and recent errors."""
    counts = journal.counts()
    totals = journal.totals()
    first, last = totals["first_issued_at"], totals["last_finished_at"]
    elapsed = (last - first) if first and last else None
    done = counts[State.COMPLETE.value] + counts[State.FAILED.value]
    s = summary(journal, elapsed)
    s["in_flight"] = counts[State.MOVING.value] + counts[State.VERIFYING.value]
    rate = (counts[State.COMPLETE.value] / elapsed) if elapsed else None
    remaining = s["total"] - done
    flying = [
        {"SeriesInstanceUID": r.uid, "state": r.state.value, "expected": r.expected,
         "received": r.received, "attempts": r.attempts, "since": iso(r.issued_at)}
        for r in journal.rows(State.MOVING, State.VERIFYING)
    ]  # fmt: skip
    run = running(journal.path)
    errors = [
        {"at": iso(e["at"]), "SeriesInstanceUID": e["uid"], "event": e["event"], "detail": e["detail"]}
        for e in journal.events(limit=200)
        if e["event"] in ("short", "give_up", "not_found") or e["event"].endswith("_failed")
    ][:10]
    return {
        "summary": s,
        "states": counts,
        "series_per_minute": round(rate * 60, 2) if rate else None,
        "eta_seconds": round(remaining / rate) if rate and remaining else None,
        "in_flight": flying,
        "throttle": learned_throttle(journal),
        "last_errors": errors,
        "steps": steps_summary(journal),
        "journal": str(journal.path),
        "run": run,
        "paused": paused(journal) if run else [],  # a run that is gone waits for nobody
        "plan": _plan_state(journal),
        "at": iso(now),
    }


# A party's pause as the run's events tell it: one event begins it, another ends it (so does run.stop).
PAUSE_EVENTS = {"source.unreachable": "source", "destination.full": "destination",
                "destination.unreachable": "destination"}  # fmt: skip
RESUME_EVENTS = {"source.reachable": "source", "destination.stores": "destination"}


def paused(journal: Journal) -> list[dict[str, Any]]:
    """The parties the last run waits for (party, event, since, why), from its run-level events."""
    waiting: dict[str, dict[str, Any]] = {}
    for at, event, detail in journal.run_events((*PAUSE_EVENTS, *RESUME_EVENTS, "run.stop")):
        if event == "run.stop":
            waiting.clear()
        elif event in RESUME_EVENTS:
            waiting.pop(RESUME_EVENTS[event], None)
        elif (party := PAUSE_EVENTS[event]) not in waiting:  # the first cause of a pause names it
            why = (detail or {}).get("why") or (detail or {}).get("error") or ""
            waiting[party] = {"party": party, "event": event, "since": iso(at), "why": why}
    return list(waiting.values())


def learned_throttle(journal: Journal) -> dict[str, Any] | None:
    """The in-flight limit as the run left it: limit, ceiling, repeats, drops, refusals (None: never changed)."""
    value = journal.meta("throttle")
    return json.loads(value) if value else None


def running(path: Path) -> dict[str, Any] | None:
    """The live run holding this journal (pid, host, started), or None."""
    info = holder(path)
    if info is None:
        return None
    return {"pid": info["pid"], "host": info.get("host"), "started_at": iso(info.get("started_at"))}


def _plan_state(journal: Journal) -> dict[str, Any]:
    """Whether every batch row is in the journal; while not, the batch line planning has reached."""
    mark = journal.meta("plan_at")
    return {"complete": journal.planned, "line": int(mark.split()[0]) if mark else None}
