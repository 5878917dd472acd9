"""The run report (contract: JSON keys) and the `status` summary, both read from the journal."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .journal import Journal
from .runlock import holder
from .states import State
from .steps import CSV_KEYS, csv_fields, report_fields, steps_summary

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
    }


def series_rows(journal: Journal, show_phi: bool = False) -> list[dict[str, Any]]:
    rows = []
    steps = report_fields(journal, show_phi)  # {} when no after-arrival step is on
    for row in journal.iter_rows():
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
        item.update(steps.get(row.uid, {}))
        rows.append(item)
    return rows


def build_report(
    journal: Journal,
    batch: str,
    started_at: float,
    finished_at: float,
    *,
    show_phi: bool = False,
) -> dict[str, Any]:
    rows = series_rows(journal, show_phi)
    warnings = [
        {"SeriesInstanceUID": r.uid, "warning": r.warning} for r in journal.iter_rows() if r.warning
    ]
    report: dict[str, Any] = {
        "batch": batch,
        "started_at": iso(started_at),
        "finished_at": iso(finished_at),
        "summary": summary(journal, finished_at - started_at),
        "series": rows,
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
    """JSON, or CSV of the series rows when the path ends in `.csv`; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            keys = list(SERIES_KEYS) + (["PatientID"] if any("PatientID" in r for r in report["series"]) else [])
            rows = report["series"]
            if "steps" in report:
                keys += CSV_KEYS
                rows = [{**r, **csv_fields(r)} for r in rows]
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        else:
            json.dump(report, f, indent=2)
            f.write("\n")
    tmp.replace(path)


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
        "run": running(journal.path),
        "at": iso(now),
    }


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
