"""Look-ahead C-FINDs for many series at once (List of UID Matching) on real Orthanc sources.

The local Orthanc keeps every C-FIND it sent under `/queries` (up to QueryRetrieveSize), so
the tests count the C-FINDs a run made. Sources without list support are covered by
tests/test_other_sources.py (pynetdicom's qrscp refuses lists with 0xC320; dcmqrscp,
hierarchical, answers them).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from test_transfer import series_count, write_config

from dicom_transfer.stack import Stack, start_stack
from dicom_transfer.synthetic import make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration

MISSING = "1.2.826.0.1.3680043.8.498.999999999"


def queries(stack: Stack) -> set[str]:
    return set(stack.centre.rest.get("/queries"))


def run_with_a_missing_row(stack: Stack, tmp_path: Path, n: int, seed: int) -> tuple[int, dict, int]:
    """n series (one per study) and an unknown series in the middle; returns (exit, report, C-FINDs)."""
    series = make_series(n, 3, seed=seed, rows=8, columns=8)
    upload(stack.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    lines = batch.read_text().splitlines()
    lines.insert(1 + n // 2, f"{MISSING},{series[0].study_uid}")
    batch.write_text("\n".join(lines) + "\n")
    before = queries(stack)
    cfg = write_config(tmp_path / "t.yaml", stack)
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    for s in series:
        assert series_count(stack.destination, s.series_uid) == 3
    return res.returncode, report, len(queries(stack) - before)


def test_many_series_few_c_finds(same: Stack, tmp_path: Path) -> None:
    """12 series and a missing one: all 12 complete, the missing one fails, far fewer than 13 C-FINDs."""
    code, report, c_finds = run_with_a_missing_row(same, tmp_path, 12, seed=810)
    assert code == 1  # the missing series fails
    states = {r["SeriesInstanceUID"]: (r["state"], r["reason"]) for r in report["series"]}
    assert states.pop(MISSING) == ("failed", "not found at source")
    assert set(states.values()) == {("complete", None)}
    assert [r["expected"] for r in report["series"] if r["state"] == "complete"] == [3] * 12
    # one list for the first rows, then the missing series confirmed on its own
    assert c_finds <= 4, c_finds


def test_answer_limit_halves_the_list(tmp_path: Path) -> None:
    """A source with LimitFindResults 4 refuses long lists (0xFE00): lists shrink, the batch completes."""
    with start_stack(tmp_path / "stack", "same", extra_config={"LimitFindResults": 4}) as stack:
        code, report, c_finds = run_with_a_missing_row(stack, tmp_path, 12, seed=820)
        # Again on a fresh journal, the source now without a limit (one list of 13): the
        # destination's batch count is cut at 4 or 5 of the 12 present series, which must
        # not read as "absent" (no series moved twice).
        config = json.loads(stack.pacs.config_path.read_text())
        stack.pacs.config_path.write_text(json.dumps({**config, "LimitFindResults": 0}))
        stack.pacs.restart()
        (tmp_path / "series.journal.sqlite").unlink()
        jobs_before = len(stack.centre.rest.get("/jobs"))
        again = run_cli("--batch", tmp_path / "series.csv", "--config", tmp_path / "t.yaml", "--json")
        jobs_after = len(stack.centre.rest.get("/jobs"))
    assert code == 1
    assert report["summary"]["complete"] == 12
    assert report["summary"]["failed"] == 1
    # refused lists of 12 and 6, then lists of 3 or fewer, plus the missing one alone
    assert c_finds < 13, c_finds
    assert again.returncode == 1, again.stderr
    assert json.loads(again.stdout)["complete"] == 12
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='present'").fetchone() == (12,)
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='issued'").fetchone() == (0,)
    assert jobs_after == jobs_before


def test_series_already_present_are_skipped_by_one_batch_count(same: Stack, tmp_path: Path) -> None:
    """A re-run: every series is present; the list answers and one batch count skip them all."""
    code, _, _ = run_with_a_missing_row(same, tmp_path, 8, seed=830)
    assert code == 1
    journal = tmp_path / "series.journal.sqlite"
    journal.unlink()  # a fresh journal over a destination that already holds the series
    before = queries(same)
    res = run_cli("--batch", tmp_path / "series.csv", "--config", tmp_path / "t.yaml", "--report", tmp_path / "r2.json")
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["summary"]["complete"] == 8
    db = sqlite3.connect(journal)
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='present'").fetchone() == (8,)
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='issued'").fetchone() == (0,)
    assert len(queries(same) - before) <= 3
