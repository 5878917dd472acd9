"""Step state read back from the journal (report fields, summary, `pending()`): the per-row rule, bounded memory.

No servers: the series and steps rows are written with plain SQL, the truths are computed
here from plain SQL rows by the rule the report has always applied (see `reference_field`).
"""

from __future__ import annotations

import json
import sqlite3
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dicom_transfer.config import load_config
from dicom_transfer.journal import Journal
from dicom_transfer.orthanc import Destination
from dicom_transfer.report import SeriesRows, iter_series
from dicom_transfer.steps import AfterArrivalSteps, report_fields, steps_failed, steps_summary

ALL_STEPS = (
    "anonymize: {lookup: lookup.csv}\n"
    "tags: {file: tags.csv, keywords: [SOPInstanceUID]}\n"
    "export: {dir: out}\n"
    "nifti: {dir: nifti}\n"
)
REPORT_KEYS = {"anonymize": "anonymized", "tags": "tags", "export": "export", "nifti": "nifti"}
DETAIL_KEYS = {
    "anonymize": ("instances", "original_deleted"),
    "tags": ("rows",),
    "export": ("files", "bytes"),
    "nifti": ("files", "volumes", "bytes", "names"),
}
PHI_KEYS = {"anonymize": ("SeriesInstanceUID", "StudyInstanceUID"), "export": ("dir",)}
FAILURE_KEYS = tuple(REPORT_KEYS.values())  # every step's failure lists its row in the summary (nifti too)
NOT_COMPLETE = ("failed", "pending", "moving", "waiting_retry", "held_local")
# (state, fingerprint) of one steps row; None: no row. "now" stands for today's fingerprint.
CASES: tuple[tuple[str, str | None] | None, ...] = (
    None,
    ("done", "now"),
    ("done", "0ld0ld0ld0ld0ld0"),
    ("done", None),
    ("running", "now"),
    ("running", "0ld0ld0ld0ld0ld0"),
    ("failed", "now"),
    ("failed", "0ld0ld0ld0ld0ld0"),
    ("pending", "now"),  # what a rebuilt tags file leaves
    ("pending", "0ld0ld0ld0ld0ld0"),
)


def config(tmp_path: Path, text: str):
    path = tmp_path / "transfer.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={})


@contextmanager
def opened_steps(tmp_path: Path, text: str, journal: Journal) -> Iterator[AfterArrivalSteps]:
    """The run's AfterArrivalSteps (records today's enabled fingerprints); no Orthanc is contacted."""
    dest = Destination("http://127.0.0.1:9", name="destination")
    steps = AfterArrivalSteps(config(tmp_path, text), journal, dest)
    try:
        yield steps
    finally:
        steps.close()
        dest.close()


def mixed_journal(path: Path, n: int) -> Journal:
    """n series, every 7th not complete; every series × every step takes a case of CASES in turn."""
    journal = Journal(path)
    uids = [f"1.2.826.0.1.3680043.2.1125.{i}" for i in range(n)]
    journal.plan([(uid, f"1.2.3.{i // 3}", f"P{i}", i + 2) for i, uid in enumerate(uids)], path.with_suffix(".csv"))
    states = [NOT_COMPLETE[(i // 7) % len(NOT_COMPLETE)] if i % 7 == 6 else "complete" for i in range(n)]
    journal.db.execute("BEGIN")
    journal.db.executemany("UPDATE series SET state=? WHERE uid=?", zip(states, uids, strict=True))
    journal.db.execute("COMMIT")
    return journal


def write_step_rows(journal: Journal, fingerprints: dict[str, str]) -> None:
    """Steps rows for every series and every step (enabled or not), plus one of a series not in the journal."""
    now = {step: fingerprints.get(step, "f" * 16) for step in REPORT_KEYS}
    rows = []
    series = journal.db.execute("SELECT seq, uid FROM series ORDER BY seq").fetchall()
    for seq, uid in [*series, (10**6, "9.9.9")]:
        for k, step in enumerate(REPORT_KEYS):
            case = CASES[(seq * 3 + k) % len(CASES)]
            if case is None:
                continue
            state, fp = case
            detail = {
                "files": seq, "bytes": 100 * seq, "dir": f"/out/P{seq}", "rows": seq + 1, "volumes": 1,
                "names": [f"{seq}.nii.gz"], "instances": seq + 2, "original_deleted": seq % 2 == 0,
                "SeriesInstanceUID": f"2.25.{seq}", "StudyInstanceUID": f"2.25.9{seq}",
            }  # fmt: skip
            rows.append((
                uid, step, state, now[step] if fp == "now" else fp, f"reason {seq}" if state == "failed" else None,
                None if seq % 5 == 0 else json.dumps(detail), 1 + seq % 3, 0.0,
            ))  # fmt: skip
    journal.db.execute("BEGIN")
    journal.db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    journal.db.execute("COMMIT")


# -- the reference: the rule, from plain SQL rows ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    state: str
    fingerprint: str | None
    reason: str | None
    detail: dict[str, Any]


def reference_field(step: str, row: Row | None, fingerprint: str, show_phi: bool) -> dict[str, Any]:
    """No row, or done with other settings: pending. Running shows as pending; others as they are."""
    if row is None or (row.state == "done" and row.fingerprint != fingerprint):
        return {"state": "pending"}
    out: dict[str, Any] = {"state": "pending" if row.state == "running" else row.state}
    out.update((key, row.detail.get(key)) for key in DETAIL_KEYS[step])
    out["reason"] = row.reason
    if show_phi:
        out.update((key, row.detail.get(key)) for key in PHI_KEYS.get(step, ()))
    return out


@dataclass
class Reference:
    fields: list[tuple[str, dict[str, Any]]]  # batch order
    summary: dict[str, dict[str, int]]
    pending: list[str]
    failed_rows: list[str]


def reference(path: Path, show_phi: bool) -> Reference:
    db = sqlite3.connect(path)
    try:
        (meta,) = db.execute("SELECT value FROM steps_meta WHERE key='enabled'").fetchone()
        enabled: dict[str, str] = json.loads(meta)
        rows = {
            (uid, step): Row(state, fp, reason, json.loads(detail) if detail else {})
            for uid, step, state, fp, reason, detail in db.execute(
                "SELECT uid, step, state, fingerprint, reason, detail FROM steps"
            )
        }
        series = db.execute("SELECT uid, state FROM series ORDER BY seq").fetchall()
    finally:
        db.close()
    fields, pending, failed = [], [], []
    summary = {REPORT_KEYS[step]: {"done": 0, "failed": 0, "pending": 0} for step in enabled}
    for uid, state in series:
        item: dict[str, Any] = dict.fromkeys(REPORT_KEYS.values())
        if state == "complete":
            for step, fp in enabled.items():
                field = reference_field(step, rows.get((uid, step)), fp, show_phi)
                item[REPORT_KEYS[step]] = field
                shown = field["state"]
                summary[REPORT_KEYS[step]][shown if shown in ("done", "failed") else "pending"] += 1
            if any(field["state"] != "done" for field in item.values() if field is not None):
                pending.append(uid)
        fields.append((uid, item))
        if state == "failed" or any((item[key] or {}).get("state") == "failed" for key in FAILURE_KEYS):
            failed.append(uid)
    return Reference(fields if enabled else [], summary, pending if enabled else [], failed)


def ordered(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    """A row's step fields with their key order (the JSON report's order)."""
    return [(k, list(v.items()) if isinstance(v, dict) else v) for k, v in fields.items()]


# -- equal to the reference -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [ALL_STEPS, "export: {dir: out}\n", "tags: {file: tags.csv, keywords: [StudyDate]}\nnifti: {dir: nifti}\n"],
    ids=["all", "export", "tags+nifti"],
)
@pytest.mark.parametrize("show_phi", [False, True], ids=["no-phi", "phi"])
def test_fields_summary_and_pending_follow_the_per_row_rule(tmp_path: Path, text: str, show_phi: bool) -> None:
    """Report fields, report rows, summary, failures and pending() equal the per-row rule, in batch order."""
    path = tmp_path / "series.journal.sqlite"
    journal = mixed_journal(path, 150)
    try:
        with opened_steps(tmp_path, text, journal) as steps:
            write_step_rows(journal, steps.fingerprints)
            ref = reference(path, show_phi)
            assert [uid for uid, _ in ref.fields][:3] == [f"1.2.826.0.1.3680043.2.1125.{i}" for i in range(3)]
            assert steps.pending() == ref.pending
            assert steps.counts() == ref.summary
        got = report_fields(journal, show_phi)
        assert [(uid, ordered(f)) for uid, f in got] == [(uid, ordered(f)) for uid, f in ref.fields]
        assert steps_summary(journal) == ref.summary
        assert list(steps_summary(journal)) == list(ref.summary)  # the enabled steps' order
        assert steps_failed(journal) == sum(c["failed"] for c in ref.summary.values())
        rows = list(iter_series(journal, show_phi))
        assert [(r["SeriesInstanceUID"], ordered({k: r[k] for k in REPORT_KEYS.values()})) for r in rows] == [
            (uid, ordered(f)) for uid, f in ref.fields
        ]
        assert [r["SeriesInstanceUID"] for r in iter_series(journal, show_phi, failed_only=True)] == ref.failed_rows
    finally:
        journal.close()
    on_file = SeriesRows(path, show_phi)  # the report's own read-only pass
    assert [ordered({k: r[k] for k in REPORT_KEYS.values()}) for r in on_file] == [ordered(f) for _, f in ref.fields]
    assert [r["SeriesInstanceUID"] for r in on_file.failed()] == ref.failed_rows
    # Every case met: per enabled step, each state shows up among complete series.
    assert all(all(n > 0 for n in counts.values()) for counts in ref.summary.values())


def test_no_step_on_leaves_the_report_as_it_was(tmp_path: Path) -> None:
    """With every step off, or a journal from before the steps: no step keys, no summary, nothing pending."""
    path = tmp_path / "series.journal.sqlite"
    journal = mixed_journal(path, 20)
    try:
        assert steps_summary(journal) == {} and list(report_fields(journal)) == []
        assert all(set(r).isdisjoint(REPORT_KEYS.values()) for r in iter_series(journal))
        assert [r["state"] for r in iter_series(journal, failed_only=True)] == ["failed"]
        with opened_steps(tmp_path, "", journal) as steps:
            assert steps.enabled == () and steps.pending() == []
            write_step_rows(journal, steps.fingerprints)
        assert steps_summary(journal) == {} and list(report_fields(journal)) == [] and steps_failed(journal) == 0
        assert all(set(r).isdisjoint(REPORT_KEYS.values()) for r in iter_series(journal))
    finally:
        journal.close()
    assert all(set(r).isdisjoint(REPORT_KEYS.values()) for r in SeriesRows(path))


# -- bounded memory -------------------------------------------------------------------------------------------

SMALL, LARGE = 20_000, 200_000


def test_reading_step_state_does_not_grow_with_the_batch(tmp_path: Path) -> None:
    """Summary, report rows, step fields and pending() of 200,000 series: < 1 MiB above 20,000's peak."""
    # A dict of every steps row (the code before) added ~180 MiB here; now only the answer is held.
    small, large = step_reading_peaks(tmp_path, SMALL), step_reading_peaks(tmp_path, LARGE)
    print(f"\n[steps memory] peak MiB {SMALL}: {small}; {LARGE}: {large}")
    for what in small:
        assert large[what] - small[what] < 1.0, (what, small, large)


def step_reading_peaks(tmp_path: Path, n: int) -> dict[str, float]:
    """Peak Python memory (MiB, tracemalloc) of each reader over n complete series, each with an export row.

    Every 1000th series' export failed: pending() answers n/1000 UIDs, the summary counts them.
    """
    path = tmp_path / f"{n}.sqlite"
    journal = Journal(path)
    try:
        with opened_steps(tmp_path, "export: {dir: out}\n", journal) as steps:
            journal.db.execute("BEGIN")
            journal.db.execute(
                "WITH RECURSIVE i(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM i WHERE k < ?)"
                " INSERT INTO series (seq, uid, study_uid, state, received, updated_at)"
                " SELECT k, '1.2.826.0.1.3680043.2.1125.' || k, '1.2.3.' || (k / 10), 'complete', 10, 0 FROM i",
                (n,),
            )
            journal.db.execute(
                "INSERT INTO steps (uid, step, state, fingerprint, reason, detail, attempts, updated_at)"
                " SELECT uid, 'export', CASE WHEN seq % 1000 THEN 'done' ELSE 'failed' END, ?,"
                " CASE WHEN seq % 1000 THEN NULL ELSE 'disk full' END,"
                ' \'{"files": 10, "bytes": 5242880, "dir": "/out/P1/1.2.3/\' || uid || \'"}\', 1, 0 FROM series',
                (steps.fingerprints["export"],),
            )
            journal.db.execute("COMMIT")
            journal.plan_end()  # the UNIQUE index on uid, as a planned journal has it
            peaks: dict[str, float] = {}
            started = time.perf_counter()
            with traced(peaks, "summary"):
                summary = steps_summary(journal)
            assert summary == {"export": {"done": n - n // 1000, "failed": n // 1000, "pending": 0}}
            with traced(peaks, "report"):
                rows = sum(1 for _ in iter_series(journal))
            assert rows == n
            with traced(peaks, "fields"):
                rows = sum(1 for _ in report_fields(journal))
            assert rows == n
            with traced(peaks, "pending"):
                todo = steps.pending()
            assert len(todo) == n // 1000
            print(f"\n[steps memory] {n} series: read in {time.perf_counter() - started:.2f} s")
            return peaks
    finally:
        journal.close()


@contextmanager
def traced(peaks: dict[str, float], what: str) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        peaks[what] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    finally:
        tracemalloc.stop()
