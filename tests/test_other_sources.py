"""Other real DICOM sources through the CLI: DCMTK dcmqrscp and pynetdicom's qrscp.

Neither returns NumberOfSeriesRelatedInstances, so the expected count comes from the
IMAGE-level C-FIND fallback (the journal keeps those SOPInstanceUIDs). dcmqrscp is also
hierarchical: the batch carries each series' StudyInstanceUID.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from bench.resilience import dcmqrscp_source, other_source, qrscp_source, write_config
from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import make_series

pytestmark = pytest.mark.integration

SOURCES = {"dcmqrscp": dcmqrscp_source, "qrscp": qrscp_source}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_batch_from_other_source(same: Stack, tmp_path: Path, kind: str) -> None:
    """Three series from a real non-Orthanc source to the destination: exit 0, all complete, counts verified."""
    series = make_series(3, 8, seed=540 + len(kind), rows=16, columns=16)
    with SOURCES[kind](tmp_path, series, same.centre) as modality:
        # The source gives no instance count at SERIES level (why the fallback is needed).
        query = {"StudyInstanceUID": series[0].study_uid, "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""}
        created = same.centre.rest.post(f"/modalities/{modality}/query", {"Level": "Series", "Query": query})
        answers = same.centre.rest.get(f"/queries/{created['ID']}/answers", params={"expand": "", "simplify": ""})
        # (qrscp answers a SERIES query once per instance: 8 identical answers.)
        assert {a["SeriesInstanceUID"] for a in answers} == {series[0].series_uid}
        assert {a.get("NumberOfSeriesRelatedInstances", "") for a in answers} == {""}
        result = other_source(kind, modality, same.centre, series, tmp_path)
    print(f"{kind}:", "; ".join(result.notes), f"{result.seconds:.1f} s")
    assert result.exit_codes == [0], result.stderr
    assert (result.complete, result.total) == (3, 3)
    assert result.at_destination == result.expected == {s.series_uid: 8 for s in series}
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(r["state"], r["expected"], r["received"], r["verified"]) for r in report["series"]] == [
        ("complete", 8, 8, "count")
    ] * 3
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    kept = [json.loads(text) for (text,) in db.execute("SELECT sop_uids FROM series ORDER BY seq")]
    assert kept == [sorted(s.sop_uids) for s in series]  # counted at IMAGE level
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='issued'").fetchone() == (3,)  # one move each


def run_study_row(kind: str, same: Stack, tmp_path: Path, seed: int, extra_yaml: str = "") -> tuple[Any, dict]:
    """One study of 2 series on a `kind` source, moved from a one-row study batch."""
    series = make_series(2, 5, seed=seed, rows=16, columns=16, patients=1)
    with SOURCES[kind](tmp_path, series, same.centre) as modality:
        batch = tmp_path / "studies.csv"
        batch.write_text(f"StudyInstanceUID\n{series[0].study_uid}\n")
        cfg = write_config(tmp_path / "t.yaml", same.centre.url, source=modality)
        cfg.write_text(cfg.read_text() + extra_yaml)
        res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json", "--json")
    assert res.returncode == 0, res.stderr
    return res, json.loads((tmp_path / "r.json").read_text())


def test_study_row_from_qrscp_counts_each_series_once(same: Stack, tmp_path: Path) -> None:
    """A study row against qrscp (one SERIES answer per instance): 2 series planned, moved, and reported as 2."""
    _, report = run_study_row("qrscp", same, tmp_path, seed=546)
    assert (report["summary"]["complete"], report["summary"]["instances"]) == (2, 10)
    (study,) = report["studies"]
    assert (study["series_found"], study["series_planned"]) == (2, 2)


def test_description_filter_blind_on_dcmqrscp_is_said(same: Stack, tmp_path: Path) -> None:
    """dcmqrscp answers no SeriesDescription: a description filter cannot apply, and the run says so."""
    res, report = run_study_row(
        "dcmqrscp", same, tmp_path, seed=548, extra_yaml="filter: {series_description: {exclude: ['*scout*']}}\n"
    )
    assert "filter.description_unknown" in res.stderr
    assert "series=2" in res.stderr
    assert report["summary"]["complete"] == 2
