"""`find` and study-row expansion against real sources: an Orthanc with an answer limit, dcmqrscp.

The Orthanc source holds 560 synthetic studies over two years (tests/find_data.py) and
answers at most LIMIT per C-FIND (then 0xFE00, which the local Orthanc turns into an
HTTP 500 and no answers): every list `find` returns must be the generator's own truth.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import find_data as fd
import pytest
from conftest import run_cli

from dicom_transfer.batch import read_batch
from dicom_transfer.stack import HOST, OrthancProcess, OrthancSpec, free_port, start_orthanc

pytestmark = pytest.mark.integration

LIMIT = 50  # the source's LimitFindResults


@pytest.fixture(scope="session")
def find_specs() -> tuple[OrthancSpec, OrthancSpec]:
    """Ports of the source and the centre, planned before either starts (each names the other)."""
    return OrthancSpec.plan("findpacs", "HOSPITAL"), OrthancSpec.plan("findcentre", "CENTRE")


@pytest.fixture(scope="session")
def pacs_data() -> list[fd.FindSeries]:
    return fd.make_pacs()


@pytest.fixture(scope="session")
def find_pacs(
    tmp_path_factory: pytest.TempPathFactory, find_specs: tuple[OrthancSpec, OrthancSpec], pacs_data
) -> Iterator[OrthancProcess]:
    """The hospital PACS: an Orthanc with LimitFindResults, filled once per session."""
    pacs, centre = find_specs
    process = start_orthanc(
        pacs, tmp_path_factory.mktemp("find-pacs"), {"CENTRE": centre.modality},
        extra_config={"LimitFindResults": LIMIT},
    )  # fmt: skip
    try:
        fd.upload(process.rest, pacs_data)
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="session")
def find_centre(
    tmp_path_factory: pytest.TempPathFactory, find_specs: tuple[OrthancSpec, OrthancSpec]
) -> Iterator[OrthancProcess]:
    """The local Orthanc (CENTRE): knows the PACS; issues the C-FINDs and receives the moves."""
    pacs, centre = find_specs
    process = start_orthanc(centre, tmp_path_factory.mktemp("find-centre"), {"PACS": pacs.modality})
    try:
        yield process
    finally:
        process.kill()


def write_config(path: Path, centre: OrthancProcess, modality: str = "PACS", extra: str = "") -> Path:
    path.write_text(
        f"local: {{url: {centre.url}}}\n"
        f"source: {{modality: {modality}}}\n"
        "destination: {aet: CENTRE}\n"
        "transfer: {stall_s: 2, move_timeout_s: 60, backoff_s: 0.2}\n" + extra
    )
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def busiest_patient(data: list[fd.FindSeries]) -> str:
    studies: dict[str, set[str]] = {}
    for item in data:
        studies.setdefault(item.patient_id, set()).add(item.study_uid)
    return max(sorted(studies), key=lambda p: len(studies[p]))


def some_day(data: list[fd.FindSeries], min_studies: int, modality: str | None = None) -> str:
    """The first date (in order) with at least `min_studies` studies (of that modality)."""
    studies: dict[str, set[str]] = {}
    for item in data:
        if item.study_date != fd.BUSY_DAY and (modality is None or item.modality == modality):
            studies.setdefault(item.study_date, set()).add(item.study_uid)
    return next(d for d in sorted(studies) if len(studies[d]) >= min_studies)


def query_rows(data: list[fd.FindSeries]) -> tuple[list[list[str]], set[str]]:
    """Single dates, a range wider than LIMIT, modalities, a PatientID; and the series they mean."""
    patient = busiest_patient(data)
    day, mr_day = some_day(data, 2), some_day(data, 1, "MR")
    rows = [
        [day, "", ""],
        [mr_day, "", "MR"],
        ["20230101-20230630", "", "CT"],  # ~180 studies: split in halves, the busy day by StudyTime
        ["", patient, ""],
        [fd.BUSY_DAY, "", ""],  # 64 studies on one day; its CT series were found by the range already
    ]
    expected = (
        fd.matching(data, study_date=day)
        | fd.matching(data, study_date=mr_day, modality="MR")
        | fd.matching(data, study_date="20230101-20230630", modality="CT")
        | fd.matching(data, patient_id=patient)
        | fd.matching(data, study_date=fd.BUSY_DAY)
    )
    return rows, expected


def test_find_with_answer_limit_returns_exact_series(find_pacs, find_centre, pacs_data, tmp_path: Path) -> None:
    """Dates, a range over the answer limit, a modality and a PatientID give exactly the generator's series."""
    rows, expected = query_rows(pacs_data)
    query = write_csv(tmp_path / "query.csv", ["StudyDate", "PatientID", "Modality"], rows)
    manifest = tmp_path / "manifest.csv"
    started = time.monotonic()
    cfg = write_config(tmp_path / "t.yaml", find_centre)
    res = run_cli("find", "--query", query, "--out", manifest, "--config", cfg, "--json")
    seconds = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    found = read_manifest(manifest)
    assert {r["SeriesInstanceUID"] for r in found} == expected
    assert len(found) == len(expected) == summary["series"]  # deduplicated across rows
    assert summary["refused"] > 0 and summary["splits"] > 0 and summary["duplicates"] > 0
    assert any("StudyTime" in w for w in summary["warnings"])  # the busy day was split by time
    by_uid = {i.uid: i for i in pacs_data}
    for row in found:
        truth = by_uid[row["SeriesInstanceUID"]]
        assert (row["StudyInstanceUID"], row["Modality"], row["StudyDate"], row["SeriesDescription"]) == (
            truth.study_uid, truth.modality, truth.study_date, truth.description,
        )  # fmt: skip
        assert row["NumberOfSeriesRelatedInstances"] == "1"
    assert summary["instances"] == len(expected) and summary["studies"] == len({r["StudyInstanceUID"] for r in found})
    assert "PatientID" not in found[0]
    assert len(read_batch(manifest)) == len(expected)  # `--batch` accepts the manifest
    assert not list(tmp_path.glob(".manifest.csv*"))  # no temporary file left
    print(f"(a) {summary['studies']} studies, {len(expected)} series, {summary['queries']} C-FINDs,"
          f" {summary['refused']} refused, {summary['splits']} splits in {seconds:.1f} s")  # fmt: skip


def test_find_show_phi_adds_patient_id(find_pacs, find_centre, pacs_data, tmp_path: Path) -> None:
    """--show-phi adds the PatientID column; the text output never shows it."""
    patient = busiest_patient(pacs_data)
    query = write_csv(tmp_path / "q.csv", ["PatientID"], [[patient]])
    manifest = tmp_path / "m.csv"
    res = run_cli("find", "--query", query, "--out", manifest, "--show-phi",
                  "--config", write_config(tmp_path / "t.yaml", find_centre))  # fmt: skip
    assert res.returncode == 0, res.stderr
    found = read_manifest(manifest)
    assert {r["PatientID"] for r in found} == {patient}
    assert {r["SeriesInstanceUID"] for r in found} == fd.matching(pacs_data, patient_id=patient)
    assert patient not in res.stdout + res.stderr
    assert "no estimate" in res.stdout


def test_find_overflow_without_date_fails_naming_row(find_pacs, find_centre, tmp_path: Path) -> None:
    """A row over the answer limit with no StudyDate to split by fails naming its line; nothing is written."""
    query = write_csv(
        tmp_path / "q.csv", ["StudyDescription", "StudyDate"], [["MR brain", "20220301"], ["CR chest", ""]]
    )
    manifest = tmp_path / "m.csv"
    res = run_cli(
        "find", "--query", query, "--out", manifest, "--config", write_config(tmp_path / "t.yaml", find_centre)
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{query}:3: too many studies for one answer set" in res.stderr
    assert "add a StudyDate range" in res.stderr and "Traceback" not in res.stderr
    assert not manifest.exists() and not list(tmp_path.glob(".m.csv*"))


def test_study_rows_expand_with_filters_and_transfer(find_pacs, find_centre, pacs_data, tmp_path: Path) -> None:
    """Study rows expand to CT series minus CBCT, transfer, and a re-run queries nothing."""
    studies: dict[str, list[fd.FindSeries]] = {}
    for item in pacs_data:
        studies.setdefault(item.study_uid, []).append(item)
    kinds = {"CBCT pelvis": 2, "Thorax 3.0 Br40": 1, "T1 axial": 1, "Chest PA": 1}
    chosen: list[str] = []
    for uid, items in studies.items():
        kind = next((d for d in kinds if any(i.description == d for i in items)), None)
        if kind and kinds[kind] > 0:
            kinds[kind] -= 1
            chosen.append(uid)
    picked = [i for uid in chosen for i in studies[uid]]
    expected = fd.matching(picked, include_modalities=("CT",), exclude_descriptions=("*cbct*",))
    assert 3 <= len(expected) < len(picked)
    batch = write_csv(tmp_path / "studies.csv", ["StudyInstanceUID"], [[uid] for uid in chosen])
    cfg = write_config(
        tmp_path / "t.yaml", find_centre,
        extra="filter: {modalities: {include: [CT]}, series_description: {exclude: ['*cbct*']}}\n",
    )  # fmt: skip
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == len(expected)
    journal = tmp_path / "studies.journal.sqlite"
    planned = {uid for (uid,) in sqlite3.connect(journal).execute("SELECT uid FROM series")}
    assert planned == expected
    print(f"(b) {len(chosen)} study rows, {len(picked)} series at the source, {len(planned)} planned and moved")
    for uid in expected:
        assert [f["Type"] for f in find_centre.rest.post("/tools/lookup", content=uid)] == ["Series"]

    queries = set(find_centre.rest.get("/queries"))
    again = run_cli("--batch", batch, "--config", cfg, "--json")
    assert again.returncode == 0, again.stderr
    assert set(find_centre.rest.get("/queries")) == queries  # neither re-planned nor re-queried

    # The same studies through `find`, with the rate measured by that run: an estimate.
    query = write_csv(tmp_path / "q.csv", ["StudyInstanceUID"], [[uid] for uid in chosen])
    res = run_cli(
        "find", "--query", query, "--out", tmp_path / "m.csv", "--config", cfg, "--journal", journal, "--json"
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["series"] == len(expected) and summary["estimate_s"] > 0
    assert {r["SeriesInstanceUID"] for r in read_manifest(tmp_path / "m.csv")} == expected


# -- a hierarchical source: DCMTK dcmqrscp --------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dcmqrscp exited with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"dcmqrscp not listening on {port} after {timeout_s} s")


@pytest.fixture(scope="session")
def dcmqr_data() -> list[fd.FindSeries]:
    return fd.make_pacs(150, seed=2, patients=60, busy=24)


@pytest.fixture(scope="session")
def dcmqrscp(
    tmp_path_factory: pytest.TempPathFactory, find_specs: tuple[OrthancSpec, OrthancSpec], find_centre, dcmqr_data
) -> Iterator[str]:
    """dcmqrscp (fork mode) holding `dcmqr_data`, known to the centre as modality DCMQR."""
    work = tmp_path_factory.mktemp("dcmqrscp")
    db = work / "db"
    db.mkdir()
    files = fd.write_files(dcmqr_data, work / "files")
    subprocess.run(["dcmqridx", str(db), *map(str, files)], check=True, capture_output=True)
    port = free_port()
    centre = find_specs[1]
    config = work / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\ncentre = ({centre.aet}, {HOST}, {centre.dicom_port})\nHostTable END\n\n"
        "VendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\nDCMQR {db} R (200, 1024mb) ANY\nAETable END\n"
    )
    with open(work / "dcmqrscp.log", "wb") as log:
        # Fork mode (the default): -s segfaults in 3.6.7. TCP_NODELAY: ~40 ms per round trip otherwise.
        proc = subprocess.Popen(
            ["dcmqrscp", "-c", str(config), str(port)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_port(port, proc)
        find_centre.rest.put("/modalities/DCMQR", {"AET": "DCMQR", "Host": HOST, "Port": port})
        yield "DCMQR"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_find_against_dcmqrscp(find_centre, dcmqrscp, dcmqr_data, tmp_path: Path) -> None:
    """The same kind of query against dcmqrscp (no counts, no limit: --max-answers forces splits); a move works."""
    rows, expected = query_rows(dcmqr_data)
    rows[2][0] = "20220101-20231231"  # the whole two years, CT only
    expected = expected | fd.matching(dcmqr_data, study_date="20220101-20231231", modality="CT")
    query = write_csv(tmp_path / "query.csv", ["StudyDate", "PatientID", "Modality"], rows)
    manifest = tmp_path / "manifest.csv"
    cfg = write_config(tmp_path / "t.yaml", find_centre, modality=dcmqrscp)
    started = time.monotonic()
    res = run_cli("find", "--query", query, "--out", manifest, "--config", cfg, "--max-answers", "20", "--json")
    seconds = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    found = read_manifest(manifest)
    assert {r["SeriesInstanceUID"] for r in found} == expected and len(found) == len(expected)
    assert summary["full"] > 0 and summary["splits"] > 0 and summary["refused"] == 0
    assert summary["series_without_count"] == len(expected)  # dcmqrscp has no NumberOfSeriesRelatedInstances
    assert {r["NumberOfSeriesRelatedInstances"] for r in found} == {""}
    print(f"(c) {summary['studies']} studies, {len(expected)} series, {summary['queries']} C-FINDs,"
          f" {summary['full']} full sets, {summary['splits']} splits in {seconds:.1f} s")  # fmt: skip

    # Three of them moved from dcmqrscp with the manifest as the batch (count by IMAGE-level C-FIND).
    batch = tmp_path / "three.csv"
    batch.write_text("".join(manifest.read_text().splitlines(keepends=True)[:4]))
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 3
