"""The `nifti` after-arrival step end to end: real Orthancs, the real CLI, the real dcm2niix.

NIfTI files are checked by their NIfTI-1 header (read with struct: nibabel is not a
dependency): sizeof_hdr 348, dim = (3, columns, rows, slices).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import struct
from pathlib import Path

import pytest
from conftest import run_cli
from test_transfer import write_config

from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration

ROWS, COLUMNS, SLICES = 16, 12, 5


def nifti_header(path: Path) -> tuple[int, tuple[int, ...], bytes]:
    """(sizeof_hdr, dim[0..3], magic) of a NIfTI-1 file, .nii or .nii.gz, little or big endian."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    sizeof_hdr = struct.unpack(endian + "i", raw[:4])[0]
    dims = struct.unpack(endian + "8h", raw[40:56])
    return sizeof_hdr, dims[:4], raw[344:348]


def setup_run(stack: Stack, tmp_path: Path, nifti: str, n: int = 2, seed: int = 71) -> tuple[list, Path, Path]:
    series = make_series(n, SLICES, seed=seed, rows=ROWS, columns=COLUMNS, patients=1)
    upload(stack.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", stack)
    cfg.write_text(cfg.read_text() + nifti)
    return series, batch, cfg


def test_nifti_per_series_with_sidecar_reported_and_resumed(same: Stack, tmp_path: Path) -> None:
    """One NIfTI + JSON per series named by SeriesInstanceUID, dims match; reported; a re-run converts nothing."""
    series, batch, cfg = setup_run(same, tmp_path, "nifti: {dir: nii}\n")
    report = tmp_path / "report.json"
    res = run_cli("--batch", batch, "--config", cfg, "--report", report)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "nii"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{s.series_uid}.nii.gz" for s in series] + [f"{s.series_uid}.json" for s in series])
    for s in series:
        assert nifti_header(out / f"{s.series_uid}.nii.gz") == (348, (3, COLUMNS, ROWS, SLICES), b"n+1\0")
        sidecar = json.loads((out / f"{s.series_uid}.json").read_text())
        assert sidecar["SeriesDescription"] == s.description and "PatientName" not in sidecar
    data = json.loads(report.read_text())
    assert data["steps"] == {"nifti": {"done": 2, "failed": 0, "pending": 0}}
    for row in data["series"]:
        assert row["nifti"]["state"] == "done" and row["nifti"]["volumes"] == 1 and row["nifti"]["files"] == 2
        uid = row["SeriesInstanceUID"]
        assert sorted(row["nifti"]["names"]) == [f"{uid}.json", f"{uid}.nii.gz"]
    status = run_cli("status", "--journal", tmp_path / "series.journal.sqlite")
    assert "nifti     2 done, 0 failed, 0 pending" in status.stdout
    text = res.stdout + res.stderr + report.read_text()
    assert series[0].patient_id not in text and "Synthetic^Patient" not in text

    # A re-run converts nothing; changed settings (no compression) convert again, a crash's
    # work folder is cleared, and the old outputs are left as they were.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cli("--batch", batch, "--config", cfg, "--json")
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    crashed = out / f".nifti-work-{hashlib.sha1(series[0].series_uid.encode()).hexdigest()[:16]}"
    (crashed / "out").mkdir(parents=True)
    (crashed / "out" / "series.nii.gz").write_bytes(b"half")
    cfg.write_text(cfg.read_text().replace("nifti: {dir: nii}", "nifti: {dir: nii, compress: false}"))
    third = run_cli("--batch", batch, "--config", cfg, "--json")
    assert third.returncode == 0, third.stderr
    for s in series:
        assert nifti_header(out / f"{s.series_uid}.nii") == (348, (3, COLUMNS, ROWS, SLICES), b"n+1\0")
    assert not crashed.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*mtimes, *(f"{s.series_uid}.nii" for s in series)])
    with sqlite3.connect(tmp_path / "series.journal.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM events WHERE event='nifti_done'").fetchone()[0] == 4


def test_nifti_failure_is_reported_per_series(same: Stack, tmp_path: Path) -> None:
    """A converter that fails leaves the series complete, the step failed with its reason, exit 1."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dcm2niix").write_text("#!/bin/sh\necho 'Error: cannot read this' >&2\nexit 3\n")
    (fake / "dcm2niix").chmod(0o755)
    _, batch, cfg = setup_run(same, tmp_path, "nifti: {dir: nii}\n", n=1, seed=72)
    res = run_cli("--batch", batch, "--config", cfg, "--json", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["complete"] == 1
    status = run_cli("status", "--journal", tmp_path / "series.journal.sqlite", "--json")
    info = json.loads(status.stdout)
    assert info["steps"] == {"nifti": {"done": 0, "failed": 1, "pending": 0}}
    with sqlite3.connect(tmp_path / "series.journal.sqlite") as db:
        (reason,) = db.execute("SELECT reason FROM steps WHERE step='nifti'").fetchone()
    assert reason == "dcm2niix wrote no NIfTI (exit 3): Error: cannot read this"
    assert not [p for p in (tmp_path / "nii").iterdir()]  # nothing half-made


@pytest.mark.parametrize(
    ("section", "path_env", "message"),
    [
        ("nifti: {dir: nii}\n", "/nonexistent", "nifti.tool: dcm2niix is not installed (not found on PATH):"
         " install it: `sudo apt-get install dcm2niix` (Debian/Ubuntu)"),
        ("nifti: {dir: nii, tool: mricron}\n", None, "nifti.tool: must be dcm2niix, got 'mricron'"),
        ("nifti: {dir: nii, path: '{PatientID}/{SeriesNumber}'}\n", None,
         "nifti.path: PatientID is patient data: NIfTI file names must not carry it"),
        ("nifti: {dir: nii, compres: false}\n", None, "nifti.compres: unknown key (did you mean compress?)"),
    ],
)  # fmt: skip
def test_nifti_config_errors_exit_2_naming_the_key(
    same: Stack, tmp_path: Path, section: str, path_env: str | None, message: str
) -> None:
    """A missing dcm2niix, an unknown tool, patient data in names, a misspelt key: exit 2 before anything."""
    series = make_series(1, 1, seed=73)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same)
    cfg.write_text(cfg.read_text() + section)
    res = run_cli("--batch", batch, "--config", cfg, env={"PATH": path_env} if path_env else None)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr.replace("\n", " ")
    assert not (tmp_path / "series.journal.sqlite").exists() and not (tmp_path / "nii").exists()
