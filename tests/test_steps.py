"""After-arrival steps on real Orthanc processes: export tree, tags CSV, pseudonymisation, resume.

The series are moved by the real CLI (`run_cli`); the steps are then driven in-process
through `AfterArrivalSteps`, as the scheduler would. The CLI-level tests wait for the
wiring in transfer.py/report.py/cli.py: flip CLI_WIRED once it is in.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import structlog
from conftest import REPO_ROOT, run_cli
from test_transfer import jobs_count, series_count, write_config

from dicom_transfer.config import load_config
from dicom_transfer.journal import Journal
from dicom_transfer.orthanc import Destination
from dicom_transfer.stack import Stack
from dicom_transfer.steps import AfterArrivalSteps, report_fields, steps_failed, steps_summary, validate
from dicom_transfer.synthetic import SyntheticSeries, instance_bytes, make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration

CLI_WIRED = True  # flip once transfer.py / report.py / cli.py call the steps
cli_wired = pytest.mark.skipif(not CLI_WIRED, reason="waiting for wiring")

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


# -- helpers ------------------------------------------------------------------------------------------


def transferred(
    stack: Stack, tmp_path: Path, n: int, per: int, seed: int, **make: object
) -> tuple[list[SyntheticSeries], Path, Path]:
    """Upload synthetic series to the PACS and move them with the real CLI (no steps yet)."""
    series = make_series(n, per, seed=seed, **make)  # type: ignore[arg-type]
    upload(stack.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", stack)
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 0, res.stderr
    return series, batch, cfg


def add_steps(cfg: Path, text: str) -> Path:
    """The same config with step sections (replacing earlier ones)."""
    kept = [line for line in cfg.read_text().splitlines() if not line.startswith(("export:", "tags:", "anonymize:"))]
    cfg.write_text("\n".join(kept) + "\n" + text)
    return cfg


@contextmanager
def opened(cfg_path: Path, journal_path: Path, **kw: object) -> Iterator[AfterArrivalSteps]:
    cfg = load_config(cfg_path, env={})
    validate(cfg)
    journal = Journal(journal_path)
    dest = Destination(cfg.destination_url(), name="destination")
    steps = AfterArrivalSteps(cfg, journal, dest, **kw)  # type: ignore[arg-type]
    try:
        yield steps
    finally:
        steps.close()
        journal.close()
        dest.close()


def drain(steps: AfterArrivalSteps) -> int:
    """What the scheduler does at the end of a run: every pending series through its steps."""
    todo = steps.pending()
    for uid in todo:
        steps.run(uid)
    return len(todo)


def sources(series: list[SyntheticSeries]) -> dict[str, tuple[SyntheticSeries, int]]:
    return {sop: (s, i) for s in series for i, sop in enumerate(s.sop_uids)}


def source_pixels(s: SyntheticSeries, i: int) -> bytes:
    return pydicom.dcmread(io.BytesIO(instance_bytes(s, i))).PixelData


def dataset_bytes(blob: bytes) -> bytes:
    """A Part-10 file without preamble and file meta group: the dataset as encoded."""
    meta_length = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    return blob[128 + 4 + 12 + meta_length :]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- export + tags, 20 × 50 ----------------------------------------------------------------------------


def test_export_tree_pixels_and_tags_20x50(same: Stack, tmp_path: Path) -> None:
    """20 × 50: patient/study/series folders, pixel data byte for byte, one tags row per instance."""
    series, _, cfg = transferred(same, tmp_path, 20, 50, seed=41, patients=5, studies_per_patient=2)
    add_steps(
        cfg,
        "export: {dir: out}\n"
        "tags: {file: tags.csv, keywords: [SOPInstanceUID, SeriesInstanceUID, InstanceNumber, StudyDate,"
        " {keyword: SliceThickness, alias: thickness}, {keyword: Laterality, default: U}]}\n",
    )
    started = time.monotonic()
    with opened(cfg, tmp_path / "series.journal.sqlite") as steps:
        assert drain(steps) == 20
        seconds = time.monotonic() - started
        summary = steps_summary(steps.journal)
        fields = dict(report_fields(steps.journal))
    out = tmp_path / "out"
    levels = [sorted({p.relative_to(out).parts[: d + 1] for p in files_under(out)}) for d in range(4)]
    counts = [len(level) for level in levels]
    assert counts == [5, 10, 20, 1000]  # patients, studies, series, files
    assert not list(out.rglob("*.part"))
    by_sop = sources(series)
    identical = 0
    for path in files_under(out):
        ds = pydicom.dcmread(path)
        s, i = by_sop[ds.SOPInstanceUID]
        assert path.relative_to(out).parts == (s.patient_id, s.study_uid, s.series_uid, f"{i + 1:04d}.dcm")
        assert ds.PixelData == source_pixels(s, i)
        # Byte for byte: everything after Orthanc's own file meta header is what the PACS held.
        identical += dataset_bytes(path.read_bytes()) == dataset_bytes(instance_bytes(s, i))
    assert identical == 1000
    lines = (tmp_path / "tags.csv").read_text().splitlines()
    rows = list(csv.DictReader(lines))
    assert lines[0] == "SOPInstanceUID,SeriesInstanceUID,InstanceNumber,StudyDate,thickness,Laterality"
    assert len(rows) == 1000 and len({r["SOPInstanceUID"] for r in rows}) == 1000
    assert rows[0] == {
        "SOPInstanceUID": series[0].sop_uids[0], "SeriesInstanceUID": series[0].series_uid, "InstanceNumber": "1",
        "StudyDate": series[0].study_date, "thickness": "2.5", "Laterality": "U",
    }  # fmt: skip
    assert summary == {
        "tags": {"done": 20, "failed": 0, "pending": 0},
        "export": {"done": 20, "failed": 0, "pending": 0},
    }
    assert all(f["export"]["files"] == 50 and "dir" not in f["export"] for f in fields.values())
    print(
        f"\n[20x50] steps {seconds:.2f} s; tree patients/studies/series/files = {counts};"
        f" PixelData and whole dataset byte-identical {identical}/1000; tags.csv {len(lines)} lines, head:\n  "
        + "\n  ".join(lines[:3])
    )


# -- pseudonymisation -----------------------------------------------------------------------------------


def test_anonymize_profile_lookup_one_study_and_delete(same: Stack, tmp_path: Path) -> None:
    """Copies follow Orthanc's profile, take PatientID/Study from the lookup, share studies; originals go."""
    series, _, cfg = transferred(same, tmp_path, 4, 5, seed=42, patients=1, studies_per_patient=2)
    original_pid = series[0].patient_id
    lookup = tmp_path / "keys" / "lookup.csv"
    lookup.parent.mkdir()
    lookup.write_text(f"Keyword,Original,Pseudonym\nPatientID,{original_pid},RESEARCH-001\n")
    add_steps(
        cfg,
        "anonymize: {lookup: keys/lookup.csv, keep: [SeriesDescription], replace: {InstitutionName: Research Centre},"
        " delete_original: true}\n"
        "export: {dir: out, path: '{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{InstanceNumber:04d}.dcm'}\n"
        "tags: {file: tags.csv, level: series,"
        " keywords: [PatientID, StudyInstanceUID, StudyDate, SeriesDescription]}\n",
    )
    with structlog.testing.capture_logs() as logs, opened(cfg, tmp_path / "series.journal.sqlite") as steps:
        assert drain(steps) == 4
        assert [steps.copy_count(s.series_uid) for s in series] == [5, 5, 5, 5]
        fields = dict(report_fields(steps.journal))
    table = list(csv.DictReader(lookup.read_text().splitlines()))
    pseudo = {(r["Keyword"], r["Original"]): r["Pseudonym"] for r in table}
    assert [r["Keyword"] for r in table].count("PatientID") == 1  # the user's row, not a new one
    assert sorted({r["Keyword"] for r in table}) == [
        "FrameOfReferenceUID", "PatientID", "SeriesInstanceUID", "StudyInstanceUID",
    ]  # fmt: skip
    for s in series:
        assert series_count(same.centre, s.series_uid) == 0  # original deleted after the copy was proven
        assert series_count(same.centre, pseudo[("SeriesInstanceUID", s.series_uid)]) == 5
    exported = [pydicom.dcmread(p) for p in files_under(tmp_path / "out")]
    assert len(exported) == 20
    by_sop = {sop: (s, i) for s in series for i, sop in enumerate(s.sop_uids)}
    for ds in exported:
        s = next(x for x in series if pseudo[("SeriesInstanceUID", x.series_uid)] == ds.SeriesInstanceUID)
        assert ds.PatientID == "RESEARCH-001" and str(ds.PatientName) == "RESEARCH-001"
        assert ds.StudyInstanceUID == pseudo[("StudyInstanceUID", s.study_uid)]
        assert ds.FrameOfReferenceUID == pseudo[("FrameOfReferenceUID", s.study_uid + ".1")]
        assert ds.SOPInstanceUID not in by_sop
        assert all(not e.value for e in ds if e.VR in ("DA", "DT")), "dates are emptied by the profile"
        assert ds.PatientBirthDate == "" and ds.get("SeriesDate") is None and ds.PatientIdentityRemoved == "YES"
        assert ds.SeriesDescription == s.description and ds.InstitutionName == "Research Centre"
        assert ds.AccessionNumber == "" and ds.get("StudyID", "") == ""
        assert ds.PixelData == source_pixels(s, int(ds.InstanceNumber) - 1)
    studies = {ds.StudyInstanceUID for ds in exported}
    assert len(studies) == 2 and all(u.startswith("2.25.") for u in studies)  # one pseudonymous study per study
    tags = (tmp_path / "tags.csv").read_text().splitlines()
    assert len(tags) == 5 and all(line.startswith("RESEARCH-001,2.25.") for line in tags[1:])
    assert {f["anonymized"]["state"] for f in fields.values()} == {"done"}
    assert all(
        f["anonymized"]["original_deleted"] and "SeriesInstanceUID" not in f["anonymized"] for f in fields.values()
    )
    ds = exported[0]
    dates = {e.keyword: e.value for e in ds if e.VR == "DA"}
    print(
        f"\n[anonymize] PatientID {ds.PatientID!r} PatientName {str(ds.PatientName)!r} dates {dates}"
        f" PatientIdentityRemoved {ds.PatientIdentityRemoved!r}; 4 series → {len(studies)} pseudonymous studies;"
        f" originals left at the destination: {sum(series_count(same.centre, s.series_uid) for s in series)};"
        f" lookup rows {len(table)}"
    )
    text = json.dumps(logs) + json.dumps(fields)
    for secret in {original_pid, series[0].patient_name, *pseudo.values()}:
        assert secret not in text, "neither patient data nor the lookup table appear in logs or report rows"


def test_anonymize_is_stable_when_journal_state_is_lost(same: Stack, tmp_path: Path) -> None:
    """A run that lost its step rows finds the copies by the lookup: no second copy, same pseudonyms."""
    series, _, cfg = transferred(same, tmp_path, 2, 4, seed=43, patients=1, studies_per_patient=1)
    add_steps(cfg, "anonymize: {lookup: lookup.csv, delete_original: true}\n")
    journal = tmp_path / "series.journal.sqlite"
    with opened(cfg, journal) as steps:
        drain(steps)
    before = (tmp_path / "lookup.csv").read_text()
    assert oct((tmp_path / "lookup.csv").stat().st_mode & 0o777) == "0o600"
    studies = same.centre.rest.get("/studies")
    db = sqlite3.connect(journal)
    db.execute("DELETE FROM steps")
    db.commit()
    db.close()
    with opened(cfg, journal) as steps:
        assert drain(steps) == 2
        assert steps_summary(steps.journal) == {"anonymized": {"done": 2, "failed": 0, "pending": 0}}
    assert (tmp_path / "lookup.csv").read_text() == before
    assert same.centre.rest.get("/studies") == studies and len(studies) == 1  # both series in one study
    assert sum(len(same.centre.rest.get(f"/studies/{u}")["Series"]) for u in studies) == 2


# -- resume after kill -9 --------------------------------------------------------------------------------

CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from dicom_transfer.config import load_config
from dicom_transfer.journal import Journal
from dicom_transfer.orthanc import Destination
from dicom_transfer.steps import AfterArrivalSteps

class Slow(Destination):  # slow enough that the parent can kill it mid-series
    def get(self, path, **kw):
        if path.endswith("/file"):
            time.sleep(0.01)
        return super().get(path, **kw)

cfg = load_config(sys.argv[1], env={{}})
steps = AfterArrivalSteps(cfg, Journal(sys.argv[2]), Slow(cfg.destination_url()))
for uid in steps.pending():
    steps.run(uid)
print("finished")
"""


def test_export_resume_after_kill_9(same: Stack, tmp_path: Path) -> None:
    """kill -9 mid-export, run again: every file once, none partial, finished files not fetched again."""
    series, _, cfg = transferred(same, tmp_path, 6, 30, seed=44)
    add_steps(cfg, "export: {dir: out, path: '{SeriesInstanceUID}/{InstanceNumber:04d}.dcm'}\n"
                   "tags: {file: tags.csv, keywords: [SOPInstanceUID, InstanceNumber]}\n")  # fmt: skip
    journal = tmp_path / "series.journal.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO_ROOT)))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cfg), str(journal)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    done = nulls = 0
    deadline = time.monotonic() + 60
    db = sqlite3.connect(journal, timeout=10)
    while time.monotonic() < deadline and not (done >= 50 and nulls > 0):
        time.sleep(0.005)
        try:
            done, nulls = db.execute("SELECT COUNT(size), COUNT(*) - COUNT(size) FROM export_files").fetchone()
        except sqlite3.OperationalError:  # the child has not created the table yet
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None and b"finished" not in proc.stdout.read()
    done, nulls = db.execute("SELECT COUNT(size), COUNT(*) - COUNT(size) FROM export_files").fetchone()
    assert 50 <= done < 180
    planted = None
    row = db.execute("SELECT path FROM export_files WHERE size IS NULL ORDER BY path").fetchone()
    if row is not None:  # what a crash inside a write leaves: a half file beside its final name
        planted = Path(row[0] + ".part")
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(b"half a file")
    db.close()
    on_disk_before = len([p for p in files_under(tmp_path / "out") if p.suffix == ".dcm"])
    with opened(cfg, journal) as steps:
        drain(steps)
        assert steps.exporter is not None
        downloads = steps.exporter.downloads
        assert steps_summary(steps.journal)["export"] == {"done": 6, "failed": 0, "pending": 0}
    files = files_under(tmp_path / "out")
    assert len(files) == 180 and all(p.suffix == ".dcm" for p in files)  # no .part, no duplicate
    assert downloads == 180 - done  # files recorded as finished were not fetched again
    db = sqlite3.connect(journal)
    sizes = dict(db.execute("SELECT path, size FROM export_files"))
    assert {str(p): p.stat().st_size for p in files} == sizes
    by_sop = sources(series)
    for path in files[::17]:
        ds = pydicom.dcmread(path)
        assert ds.PixelData == source_pixels(*by_sop[ds.SOPInstanceUID])
    rows = list(csv.DictReader((tmp_path / "tags.csv").read_text().splitlines()))
    assert len(rows) == 180 and len({r["SOPInstanceUID"] for r in rows}) == 180  # no duplicate rows
    print(
        f"\n[kill -9] files finished before the kill {done}/180 ({on_disk_before} on disk),"
        f" half file planted: {planted is not None}; resume fetched {downloads}; 180 files, 0 .part, 180 tag rows"
    )


# -- failures are data -------------------------------------------------------------------------------------


def test_export_clashes_fail_the_step_not_the_series(same: Stack, tmp_path: Path) -> None:
    """Two instances on one path fail that series' export (with its reason); the series stays complete."""
    series, _, cfg = transferred(same, tmp_path, 2, 3, seed=45, patients=1)
    journal = tmp_path / "series.journal.sqlite"
    add_steps(cfg, "export: {dir: out, path: '{PatientID}/{SeriesNumber}.dcm'}\n"
                   "tags: {file: tags.csv, keywords: [SOPInstanceUID]}\n")  # fmt: skip
    with opened(cfg, journal) as steps:
        drain(steps)
        fields = dict(report_fields(steps.journal))
        assert steps_failed(steps.journal) == 2
    reasons = {f["export"]["reason"] for f in fields.values()}
    assert reasons == {
        "3 instances would share 1 file name(s) (InstanceNumber 1/2/3):"
        " export.path '{PatientID}/{SeriesNumber}.dcm' does not tell them apart"
    }
    assert {f["export"]["state"] for f in fields.values()} == {"failed"}
    assert {f["tags"]["state"] for f in fields.values()} == {"done"}  # the other step is not held up
    assert not (tmp_path / "out").exists()
    db = sqlite3.connect(journal)
    assert {s for (s,) in db.execute("SELECT state FROM series")} == {"complete"}
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='export_failed'").fetchone() == (2,)
    db.close()
    # Across series: the second series would overwrite the first one's files.
    add_steps(cfg, "export: {dir: out, path: '{PatientID}/{InstanceNumber:04d}.dcm'}\n"
                   "tags: {file: tags.csv, keywords: [SOPInstanceUID]}\n")  # fmt: skip
    with opened(cfg, journal) as steps:
        assert drain(steps) == 2  # the changed template makes both due again
        fields = dict(report_fields(steps.journal))
    first, second = (fields[s.series_uid]["export"] for s in series)
    assert first["state"] == "done" and first["files"] == 3
    assert second["state"] == "failed" and second["reason"] == (
        f"a file name is already taken by series {series[0].series_uid} (export.path clash)"
    )
    assert len(files_under(tmp_path / "out")) == 3


# -- decompression ------------------------------------------------------------------------------------------


def _compressed_at_pacs(stack: Stack, series: list[SyntheticSeries]) -> None:
    """Replace the PACS's copies by JPEG-lossless ones with the same UIDs."""
    upload(stack.pacs.rest, series)
    for s in series:
        sid = stack.pacs.rest.post("/tools/lookup", content=s.series_uid)[0]["ID"]
        blobs = [
            stack.pacs.rest.post(
                f"/instances/{i}/modify", {"Transcode": JPEG_LOSSLESS, "Keep": ["SOPInstanceUID"], "Force": True},
                raw=True,
            )
            for i in stack.pacs.rest.get(f"/series/{sid}")["Instances"]
        ]  # fmt: skip
        stack.pacs.rest.delete(f"/series/{sid}")
        for blob in blobs:
            stack.pacs.rest.post("/instances", content=blob)


def _decompress_round(stack: Stack, tmp_path: Path, seed: int) -> set[str]:
    series = make_series(2, 4, seed=seed)
    _compressed_at_pacs(stack, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", stack)
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 0, res.stderr
    stored = {
        stack.centre.rest.get(f"/instances/{i}/metadata/TransferSyntax")
        for s in series
        for i in stack.centre.rest.get(
            f"/series/{stack.centre.rest.post('/tools/lookup', content=s.series_uid)[0]['ID']}"
        )["Instances"]
    }
    assert stored == {JPEG_LOSSLESS}, "the destination must hold compressed files for this test to mean anything"
    add_steps(cfg, "export: {dir: out, path: '{SeriesInstanceUID}/{InstanceNumber:04d}.dcm', decompress: true}\n")
    instances = len(stack.centre.rest.get("/instances"))
    with opened(cfg, tmp_path / "series.journal.sqlite") as steps:
        drain(steps)
        assert steps_summary(steps.journal)["export"]["done"] == 2
    assert len(stack.centre.rest.get("/instances")) == instances  # decompressing stored nothing
    by_sop = sources(series)
    syntaxes = set()
    for path in files_under(tmp_path / "out"):
        ds = pydicom.dcmread(path)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        assert ds.PixelData == source_pixels(*by_sop[ds.SOPInstanceUID])
    return syntaxes


def test_decompress_on_orthanc_1_10(same: Stack, tmp_path: Path) -> None:
    """1.10 ignores ?transcode: /modify gives uncompressed files, same SOP UIDs, same pixels."""
    assert same.centre.version() < (1, 12, 2)
    assert _decompress_round(same, tmp_path, seed=46) == {EXPLICIT_LE}


def test_decompress_on_newer_orthanc(new: Stack, tmp_path: Path) -> None:
    """≥ 1.12.2: /file?transcode gives uncompressed files with the same pixels."""
    assert new.centre.version() >= (1, 12, 2)
    assert _decompress_round(new, tmp_path, seed=47) == {EXPLICIT_LE}


# -- the CLI (once wired) --------------------------------------------------------------------------------------


def _cli_setup(
    stack: Stack, tmp_path: Path, steps_text: str, **make: object
) -> tuple[list[SyntheticSeries], Path, Path]:
    series = make_series(3, 4, seed=48, **make)  # type: ignore[arg-type]
    upload(stack.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = add_steps(write_config(tmp_path / "t.yaml", stack), steps_text)
    return series, batch, cfg


@cli_wired
def test_cli_runs_the_steps_and_reports_them(same: Stack, tmp_path: Path) -> None:
    """The main job runs every step; the report rows carry them without paths or patient data; exit 0."""
    series, batch, cfg = _cli_setup(
        same, tmp_path,
        "anonymize: {lookup: lookup.csv, delete_original: true}\nexport: {dir: out}\n"
        "tags: {file: tags.csv, keywords: [StudyDate]}\n",
    )  # fmt: skip
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    for row in report["series"]:
        assert row["anonymized"]["state"] == row["export"]["state"] == row["tags"]["state"] == "done"
        assert row["export"]["files"] == 4 and "dir" not in row["export"]
    text = (tmp_path / "r.json").read_text() + res.stderr + res.stdout
    assert series[0].patient_id not in text and "ANON" not in text and str(tmp_path / "out") not in text
    assert len(files_under(tmp_path / "out")) == 12
    status = run_cli("status", "--journal", tmp_path / "series.journal.sqlite", "--json")
    assert json.loads(status.stdout)["steps"]["export"] == {"done": 3, "failed": 0, "pending": 0}


@cli_wired
def test_cli_rerun_counts_the_anonymised_copy(same: Stack, tmp_path: Path) -> None:
    """With delete_original, a fresh journal's pre-check counts the copy: nothing is moved again."""
    _, batch, cfg = _cli_setup(same, tmp_path, "anonymize: {lookup: lookup.csv, delete_original: true}\n")
    assert run_cli("--batch", batch, "--config", cfg).returncode == 0
    jobs = jobs_count(same)
    res = run_cli("--batch", batch, "--config", cfg, "--journal", tmp_path / "other.sqlite", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 3 and jobs_count(same) == jobs
    events = sqlite3.connect(tmp_path / "other.sqlite").execute("SELECT DISTINCT event FROM events WHERE uid NOT NULL")
    assert {e for (e,) in events} <= {"present", "anonymize_done"}


@cli_wired
def test_cli_failed_export_exits_1_series_complete(same: Stack, tmp_path: Path) -> None:
    """A failed export: exit 1, the series complete, export failed with its reason in the report."""
    _, batch, cfg = _cli_setup(same, tmp_path, "export: {dir: out, path: 'all.dcm'}\n")
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["complete"] == 3
    assert {r["export"]["state"] for r in report["series"]} == {"failed"}
    assert all("does not tell them apart" in r["export"]["reason"] for r in report["series"])


@cli_wired
def test_cli_bad_step_config_exit_2(same: Stack, tmp_path: Path) -> None:
    """A template typo is exit 2 naming export.path with a suggestion; no journal is written."""
    _, batch, cfg = _cli_setup(same, tmp_path, "export: {dir: out, path: '{PatientNmae}/{InstanceNumber}.dcm'}\n")
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2
    assert "export.path: unknown keyword 'PatientNmae' (did you mean PatientName?)" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "series.journal.sqlite").exists()


@cli_wired
def test_cli_show_phi_reveals_export_folders(same: Stack, tmp_path: Path) -> None:
    """--show-phi adds each series' export folder to the report; without it there is none."""
    series, batch, cfg = _cli_setup(same, tmp_path, "export: {dir: out}\n")
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json", "--show-phi")
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["series"]
    assert [r["export"]["dir"] for r in rows] == [
        str(tmp_path / "out" / s.patient_id / s.study_uid / s.series_uid) for s in series
    ]
    assert os.path.isdir(rows[0]["export"]["dir"])
