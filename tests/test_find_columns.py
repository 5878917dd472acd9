"""`find`'s PatientName and ImageType columns and `--fields`, against a real Orthanc PACS.

The PACS holds three patients on one day: `ROE^RICHARD` and `Roe^Richard` (one name stored
two ways, two PatientIDs) and `SMITH^ANNA`. ROE^RICHARD's CT study has an axial series and a
series with one LOCALIZER instance; every instance carries a private block (0009,0010)
`DTTEST` with (0009,1001) `site-7`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from pydicom import dcmwrite

from dicom_transfer.batch import read_batch
from dicom_transfer.stack import OrthancProcess, OrthancSpec, start_orthanc
from dicom_transfer.synthetic import SyntheticSeries, instance_dataset, make_series

pytestmark = pytest.mark.integration

DAY = "20240105"
NAMES = {"P1": "ROE^RICHARD", "P2": "Roe^Richard", "P3": "SMITH^ANNA"}


def _instance(s: SyntheticSeries, i: int, patient: str, image_type: list[str]) -> bytes:
    ds = instance_dataset(s, i)
    ds.PatientID, ds.PatientName = patient, NAMES[patient]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = DAY
    ds.ImageType = image_type
    block = ds.private_block(0x0009, "DTTEST", create=True)
    block.add_new(0x01, "LO", "site-7")
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data() -> dict[str, list[SyntheticSeries]]:
    """Patient → series: P1 has an axial series and one with a localizer; P2 and P3 one each."""
    p1 = make_series(2, 3, seed=91, rows=8, columns=8, patients=1)
    p2 = make_series(1, 2, seed=92, rows=8, columns=8)
    p3 = make_series(1, 2, seed=93, rows=8, columns=8)
    return {"P1": p1, "P2": p2, "P3": p3}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, data) -> Iterator[tuple[OrthancProcess, OrthancProcess]]:
    """(PACS, centre): the PACS filled with `data`, the centre knowing it as PACS."""
    pacs_spec, centre_spec = OrthancSpec.plan("colpacs", "HOSPITAL"), OrthancSpec.plan("colcentre", "CENTRE")
    pacs = start_orthanc(pacs_spec, tmp_path_factory.mktemp("col-pacs"), {"CENTRE": centre_spec.modality})
    try:
        centre = start_orthanc(centre_spec, tmp_path_factory.mktemp("col-centre"), {"PACS": pacs_spec.modality})
    except BaseException:
        pacs.kill()
        raise
    try:
        for patient, series in data.items():
            for n, s in enumerate(series):
                for i in range(len(s.sop_uids)):
                    localizer = patient == "P1" and n == 1 and i == 1
                    kind = ["DERIVED", "SECONDARY", "LOCALIZER"] if localizer else ["ORIGINAL", "PRIMARY", "AXIAL"]
                    answer = pacs.rest.post("/instances", content=_instance(s, i, patient, kind))
                    assert answer["Status"] == "Success", answer
        yield pacs, centre
    finally:
        pacs.kill()
        centre.kill()


def config(tmp_path: Path, centre: OrthancProcess) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(
        f"local: {{url: {centre.url}}}\nsource: {{modality: PACS}}\ndestination: {{aet: CENTRE}}\n"
        "transfer: {stall_s: 2, move_timeout_s: 60, backoff_s: 0.2}\n"
    )
    return path


def query_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "q.csv"
    path.write_text(text)
    return path


def manifest_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def uids(*series: SyntheticSeries) -> set[str]:
    return {s.series_uid for s in series}


def test_patient_name_exact_and_wildcard_never_printed(servers, data, tmp_path: Path) -> None:
    """PatientName finds the name's studies (Orthanc matches names case-insensitively), warns, prints no name."""
    _, centre = servers
    cfg, out = config(tmp_path, centre), tmp_path / "m.csv"
    query = query_file(tmp_path, f"PatientName,StudyDate\nROE^RICHARD,{DAY}\n")
    res = run_cli("find", "--query", query, "--out", out, "--config", cfg)
    assert res.returncode == 0, res.stderr
    _, rows = manifest_rows(out)
    # Orthanc's default CaseSensitivePN=false: Roe^Richard is found too; a case-sensitive PACS would not.
    assert {r["SeriesInstanceUID"] for r in rows} == uids(*data["P1"], *data["P2"])
    assert "stored inconsistently" in res.stderr and "Prefer PatientID" in res.stderr
    printed = (res.stdout + res.stderr + out.read_text()).upper()
    assert "RICHARD" not in printed and "SMITH" not in printed and "PATIENTNAME," not in printed
    assert "P1" not in out.read_text()

    wild = query_file(tmp_path, f"PatientName,StudyDate\nSMI*,{DAY}\n")
    refused = run_cli("find", "--query", wild, "--out", out, "--config", cfg)
    assert refused.returncode == 2
    assert "q.csv:2:1: PatientName: wildcards ('*', '?') need --allow-wildcards" in refused.stderr
    assert "SMI*" not in refused.stderr  # a name pattern is patient data too
    res = run_cli("find", "--query", wild, "--out", out, "--config", cfg, "--allow-wildcards", "--json")
    assert res.returncode == 0, res.stderr
    assert {r["SeriesInstanceUID"] for r in manifest_rows(out)[1]} == uids(*data["P3"])
    assert "SMITH" not in res.stdout + res.stderr


def test_image_type_keeps_series_with_a_matching_instance(servers, data, tmp_path: Path) -> None:
    """ImageType LOCALIZER keeps only the series holding a localizer; the progress line says what it costs."""
    _, centre = servers
    out = tmp_path / "m.csv"
    query = query_file(tmp_path, f"StudyDate,ImageType\n{DAY},localizer\n{DAY},ORIGINAL\\AXIAL\n")
    res = run_cli("find", "--query", query, "--out", out, "--config", config(tmp_path, centre), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    found = [r["SeriesInstanceUID"] for r in manifest_rows(out)[1]]
    localizer, axial = data["P1"][1], data["P1"][0]
    # Row 2 finds the localizer series; row 3 every series with an ORIGINAL and AXIAL instance
    # (the localizer series too: two of its three instances are axial).
    assert found[0] == localizer.series_uid
    assert set(found) == uids(localizer, axial, *data["P2"], *data["P3"])
    assert summary["duplicates"] == 1 and summary["image_type_left_out"] == 3  # row 2 left out the three others
    assert summary["dropped"] == 0

    only = query_file(tmp_path, f"StudyDate,ImageType\n{DAY},LOCALIZER\n")
    res = run_cli("find", "--query", only, "--out", out, "--config", config(tmp_path, centre))
    assert res.returncode == 0, res.stderr
    assert [r["SeriesInstanceUID"] for r in manifest_rows(out)[1]] == [localizer.series_uid]
    # Not a terminal: a line when the checks start (the count grows study by study) and at the end.
    assert "ImageType: 0/2 series checked (one IMAGE-level C-FIND each)" in res.stderr
    assert "ImageType: 4/4 series checked" in res.stderr
    assert "ImageType: 3 series without a matching instance left out" in res.stdout


def test_fields_add_columns_and_batch_accepts_them(servers, data, tmp_path: Path) -> None:
    """--fields adds keyword and (gggg,eeee) columns; the private one stays empty and warned; --batch moves it."""
    pacs, centre = servers
    cfg, out = config(tmp_path, centre), tmp_path / "m.csv"
    query = query_file(tmp_path, "PatientID\nP1\n")
    res = run_cli(
        "find", "--query", query, "--out", out, "--config", cfg,
        "--fields", "SliceThickness,(0008,1030),BodyPartExamined,(0009,0010),(0009,1001),SeriesDescription",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    header, rows = manifest_rows(out)
    assert header[-5:] == ["SliceThickness", "(0008,1030)", "BodyPartExamined", "(0009,0010)", "(0009,1001)"]
    assert header.count("SeriesDescription") == 1  # already a manifest column
    assert {(r["SliceThickness"], r["(0008,1030)"], r["BodyPartExamined"]) for r in rows} == {
        ("2.5", "Synthetic study", "CHEST")
    }
    # Private tags are sent (Normalize false) and the PACS answers them, but Orthanc's REST
    # answers carry no value for them (checked on 1.10.1 and 1.12.7): empty, with a warning.
    assert {r["(0009,1001)"] for r in rows} == {""}
    assert "--fields (0009,1001): the source answered no value for any series" in res.stderr
    assert len(read_batch(out)) == 2
    moved = run_cli("--batch", out, "--config", cfg, "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["complete"] == 2
    assert centre.rest.get("/series") and len(centre.rest.get("/instances")) == 6


def test_fields_patient_data_needs_show_phi(servers, data, tmp_path: Path) -> None:
    """--fields PatientName exits 2 naming it without --show-phi (nothing written); with it, the names are there."""
    _, centre = servers
    cfg, out = config(tmp_path, centre), tmp_path / "m.csv"
    query = query_file(tmp_path, "PatientID\nP3\n")
    for fields, named in (("StudyDate,PatientName", "PatientName"), ("(0010,0030)", "(0010,0030)")):
        res = run_cli("find", "--query", query, "--out", out, "--config", cfg, "--fields", fields)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"--fields: {named} is patient data: it needs --show-phi" in res.stderr
        assert not out.exists()
    bad = run_cli("find", "--query", query, "--out", out, "--config", cfg, "--fields", "SliceThicknes")
    assert bad.returncode == 2 and "did you mean SliceThickness?" in bad.stderr and not out.exists()
    res = run_cli("find", "--query", query, "--out", out, "--config", cfg, "--fields", "PatientName", "--show-phi")
    assert res.returncode == 0, res.stderr
    header, rows = manifest_rows(out)
    assert header[-2:] == ["PatientName", "PatientID"]
    assert [(r["PatientName"], r["PatientID"]) for r in rows] == [("SMITH^ANNA", "P3")]
