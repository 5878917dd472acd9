"""Both move paths on a real Orthanc ≥ 1.11.1 (Debian 13's 1.12.x, run by .ci/orthanc-new)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from test_transfer import assert_each_proven_before_the_next, series_count, setup_batch, write_config

from dicom_transfer.synthetic import instance_bytes

pytestmark = pytest.mark.integration


def test_new_orthanc_version(new) -> None:
    """The fixture really runs Orthanc ≥ 1.11.1, so the asynchronous move path is chosen."""
    assert new.centre.version() >= (1, 11, 1)


def test_move_job_path(new, tmp_path: Path) -> None:
    """auto picks the asynchronous /modalities/{id}/move job; every series is proven complete."""
    series, batch = setup_batch(new, tmp_path, n=4, per=8)
    res = run_cli("--batch", batch, "--config", write_config(tmp_path / "t.yaml", new), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 4
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    assert {m for (m,) in db.execute("SELECT move_method FROM series")} == {"move-job"}
    jobs = [new.centre.rest.get(f"/jobs/{j}") for (j,) in db.execute("SELECT job_id FROM series")]
    assert {j["Type"] for j in jobs} == {"DicomMoveScu"}
    assert_each_proven_before_the_next(db, 4)
    for s in series:
        assert series_count(new.centre, s.series_uid) == 8


@pytest.mark.parametrize("method", ["retrieve-job", "blocking"])
def test_other_paths_on_new_orthanc(new, tmp_path: Path, method: str) -> None:
    """The query→retrieve job and the blocking move also work on a newer Orthanc when chosen."""
    series, batch = setup_batch(new, tmp_path, n=2, per=5)
    cfg = write_config(tmp_path / "t.yaml", new, move_method=method)
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    assert {m for (m,) in db.execute("SELECT move_method FROM series")} == {method}
    assert all(series_count(new.centre, s.series_uid) == 5 for s in series)


def test_instance_level_repair_on_move_job(new, tmp_path: Path) -> None:
    """A partial series is completed by an Instance-level move of only the missing instances."""
    series, batch = setup_batch(new, tmp_path, n=1, per=9)
    for i in (0, 4, 8):
        new.centre.rest.post("/instances", content=instance_bytes(series[0], i))
    res = run_cli("--batch", batch, "--config", write_config(tmp_path / "t.yaml", new))
    assert res.returncode == 0, res.stderr
    assert series_count(new.centre, series[0].series_uid) == 9
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    (detail,) = db.execute("SELECT detail FROM events WHERE event='issued'").fetchone()
    assert detail == "attempt=1 instances=6"
