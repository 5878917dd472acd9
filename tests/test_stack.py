"""The loopback Orthanc stack and the synthetic data against real Orthanc processes."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import pydicom
import pytest

from dicom_transfer.errors import TransientOrthancError
from dicom_transfer.orthanc import OrthancRest, orthanc_series_id
from dicom_transfer.stack import (
    INSTALL_HINT,
    OrthancProcess,
    OrthancSpec,
    Stack,
    StackError,
    free_port,
    orthanc_command,
    start_orthanc,
    start_stack,
)
from dicom_transfer.synthetic import (
    SyntheticSeries,
    instance_bytes,
    instance_dataset,
    make_series,
    upload,
    write_batch_csv,
    write_files,
)


def count(process: OrthancProcess, series: SyntheticSeries) -> int:
    """Instances of `series` held by `process` (0 when the series is absent)."""
    sid = orthanc_series_id(series.patient_id, series.study_uid, series.series_uid)
    for found in process.rest.post("/tools/lookup", content=series.series_uid) or []:
        if found["Type"] == "Series":
            assert found["ID"] == sid
            return len(process.rest.get(f"/series/{sid}")["Instances"])
    return 0


def move(stack: Stack, series: SyntheticSeries) -> None:
    """Blocking C-MOVE of one series from the PACS to the stack's destination, via centre."""
    body = {
        "Level": "Series",
        "Resources": [{"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.series_uid}],
        "TargetAet": stack.destination_aet,
    }
    stack.centre.rest.post("/modalities/PACS/move", body, idempotent=False, timeout_s=60)


def test_same_stack_answers_with_planned_aets(same: Stack) -> None:
    """Each Orthanc of the "same" stack answers /system with its planned name, AET and ports."""
    assert same.dest is None
    assert same.destination is same.centre and same.destination_aet == "CENTRE"
    for process, aet in ((same.pacs, "HOSPITAL"), (same.centre, "CENTRE")):
        system = process.rest.system()
        assert system["DicomAet"] == aet == process.spec.aet
        assert system["Name"] == process.spec.name
        assert system["HttpPort"] == process.spec.http_port
        assert system["DicomPort"] == process.spec.dicom_port
        assert process.url == f"http://127.0.0.1:{process.spec.http_port}"
        assert process.version() >= (1, 10)
    assert 4242 not in {same.pacs.spec.dicom_port, same.centre.spec.dicom_port}
    assert 8042 not in {same.pacs.spec.http_port, same.centre.spec.http_port}


def test_separate_stack_peers_know_each_other(separate: Stack) -> None:
    """In "separate" the PACS knows CENTRE and DEST, centre knows PACS and DEST, dest knows PACS."""
    assert separate.dest is not None and separate.destination is separate.dest
    assert separate.destination_aet == "DEST"
    assert separate.dest.rest.system()["DicomAet"] == "DEST"
    assert sorted(separate.pacs.rest.get("/modalities")) == ["CENTRE", "DEST"]
    assert sorted(separate.centre.rest.get("/modalities")) == ["DEST", "PACS"]
    assert sorted(separate.dest.rest.get("/modalities")) == ["PACS"]
    separate.centre.rest.post("/modalities/PACS/echo", {})
    separate.centre.rest.post("/modalities/DEST/echo", {})


def test_upload_lands(same: Stack) -> None:
    """Uploading 3 series x 5 instances stores exactly 15 instances in 3 series at the PACS."""
    series = make_series(3, 5, seed=1)
    assert upload(same.pacs.rest, series) == 15
    stats = same.pacs.rest.get("/statistics")
    assert (stats["CountSeries"], stats["CountInstances"]) == (3, 15)
    assert [count(same.pacs, s) for s in series] == [5, 5, 5]
    assert count(same.centre, series[0]) == 0


def test_upload_again_is_already_stored(same: Stack) -> None:
    """A second upload of the same series is accepted (AlreadyStored) and changes nothing."""
    series = make_series(1, 4, seed=2)
    assert upload(same.pacs.rest, series, threads=1) == 4
    assert upload(same.pacs.rest, series, threads=2) == 4
    assert same.pacs.rest.get("/statistics")["CountInstances"] == 4


def test_move_same_delivers_to_centre(same: Stack) -> None:
    """A C-MOVE issued by centre from PACS to CENTRE delivers the whole series to centre."""
    series = make_series(2, 5, seed=3)
    upload(same.pacs.rest, series)
    move(same, series[0])
    assert count(same.centre, series[0]) == 5
    assert count(same.centre, series[1]) == 0
    stored = same.centre.rest.get(
        f"/series/{orthanc_series_id(series[0].patient_id, series[0].study_uid, series[0].series_uid)}/instances"
    )
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == set(series[0].sop_uids)


def test_move_separate_delivers_to_dest(separate: Stack) -> None:
    """In "separate", a C-MOVE issued by centre to DEST lands in dest and not in centre."""
    assert separate.dest is not None
    series = make_series(1, 5, seed=4)
    upload(separate.pacs.rest, series)
    move(separate, series[0])
    assert count(separate.dest, series[0]) == 5
    assert count(separate.centre, series[0]) == 0


def test_wipe_empties(same: Stack) -> None:
    """wipe() leaves no patient, study, series or instance behind."""
    upload(same.pacs.rest, make_series(3, 2, seed=5, patients=2))
    assert same.pacs.rest.get("/statistics")["CountPatients"] == 2
    same.pacs.wipe()
    stats = same.pacs.rest.get("/statistics")
    assert (stats["CountPatients"], stats["CountSeries"], stats["CountInstances"]) == (0, 0, 0)


def test_reset_restores_modalities(same: Stack) -> None:
    """Stack.reset() removes modalities a test added and puts back the planned ones."""
    same.centre.rest.put("/modalities/EXTRA", {"AET": "EXTRA", "Host": "127.0.0.1", "Port": 1})
    same.centre.rest.put("/modalities/PACS", {"AET": "WRONG", "Host": "127.0.0.1", "Port": 1})
    same.reset()
    modalities = same.centre.rest.get("/modalities", params={"expand": ""})
    assert sorted(modalities) == ["PACS"]
    assert (modalities["PACS"]["AET"], modalities["PACS"]["Port"]) == ("HOSPITAL", same.pacs.spec.dicom_port)


def test_restart_keeps_data(tmp_path: Path) -> None:
    """restart() brings the same Orthanc back on the same ports with its stored instances."""
    spec = OrthancSpec.plan("solo", "SOLO")
    with start_orthanc(spec, tmp_path, {}) as solo:
        series = make_series(1, 3, seed=6)
        upload(solo.rest, series)
        old = solo.proc
        solo.restart()
        assert old.returncode == 0  # an orderly stop, not a kill halfway through it
        assert solo.running and solo.proc.pid != old.pid
        assert solo.rest.system()["DicomAet"] == "SOLO"
        assert count(solo, series[0]) == 3
        assert (tmp_path / "solo.json").is_file() and (tmp_path / "solo-db").is_dir()
        assert "Orthanc has started" in solo.log_path.read_text()
        solo.kill()
        assert not solo.running
        solo.stop()  # idempotent after a kill


def test_killed_orthanc_is_revived_by_reset(same: Stack) -> None:
    """A test that kills centre leaves the next test a running, empty centre."""
    same.centre.kill()
    probe = OrthancRest(same.centre.url, name="probe", retry_deadline_s=0)
    with pytest.raises(TransientOrthancError):
        probe.system()
    probe.close()
    same.reset()
    assert same.centre.running
    assert same.centre.rest.system()["DicomAet"] == "CENTRE"


def test_missing_binary_names_install_hint(tmp_path: Path) -> None:
    """Without an Orthanc binary the error is a one-line StackError with the apt hint."""
    with pytest.raises(StackError) as found:
        orthanc_command(default=str(tmp_path / "Orthanc"), search_path=str(tmp_path))
    assert str(found.value) == f"Orthanc is not installed: {INSTALL_HINT}"
    assert "sudo apt-get install -y orthanc dcmtk" in str(found.value)
    spec = OrthancSpec.plan("ghost", "GHOST")
    with pytest.raises(StackError) as started:
        start_orthanc(spec, tmp_path, {}, command=[str(tmp_path / "no-such-Orthanc")])
    assert INSTALL_HINT in str(started.value) and "\n" not in str(started.value)
    with pytest.raises(StackError):
        start_stack(tmp_path / "stack", pacs_command=[str(tmp_path / "no-such-Orthanc")])


def test_orthanc_exiting_early_reports_its_log(tmp_path: Path, same: Stack) -> None:
    """An Orthanc that cannot bind its port fails fast with the tail of its log."""
    taken = OrthancSpec("clash", "CLASH", same.pacs.spec.http_port, free_port())
    started = time.monotonic()
    with pytest.raises(StackError) as found:
        start_orthanc(taken, tmp_path, {}, ready_timeout_s=20)
    assert time.monotonic() - started < 10
    message = str(found.value)
    assert "exited with code" in message and "clash.log" in message
    assert same.pacs.rest.system()["Name"] == "pacs"  # the stranger kept its port


def test_unknown_topology_is_refused(tmp_path: Path) -> None:
    """start_stack names the allowed topologies when given another."""
    with pytest.raises(StackError, match="same, separate"):
        start_stack(tmp_path, "triangle")


def test_make_series_is_deterministic() -> None:
    """Same seed gives the same UIDs and IDs; another seed gives different UIDs."""
    a, b, c = make_series(4, 3, seed=7), make_series(4, 3, seed=7), make_series(4, 3, seed=8)
    assert a == b
    uids = lambda ss: {u for s in ss for u in (s.study_uid, s.series_uid, *s.sop_uids)}  # noqa: E731
    assert len(uids(a)) == 4 + 4 + 12
    assert not uids(a) & uids(c)
    assert [s.patient_id for s in a] == ["SYN0070001", "SYN0070002", "SYN0070003", "SYN0070004"]
    assert a[0].patient_name == "Synthetic^Patient1"
    assert all(pydicom.uid.UID(u).is_valid for u in uids(a))
    assert instance_bytes(a[1], 2) == instance_bytes(b[1], 2)


def test_make_series_is_stable_under_growth() -> None:
    """More series or more instances keep the UIDs of the ones a smaller call made."""
    small, big = make_series(2, 3, seed=12), make_series(5, 4, seed=12)
    assert [s.series_uid for s in small] == [s.series_uid for s in big[:2]]
    assert [s.sop_uids for s in small] == [s.sop_uids[:3] for s in big[:2]]
    regrouped = make_series(2, 3, seed=12, patients=1)  # series 2 moves into study 1
    assert regrouped[0].series_uid == small[0].series_uid
    assert regrouped[1].study_uid == small[0].study_uid != small[1].study_uid
    assert regrouped[1].series_uid != small[1].series_uid  # never one UID in two studies


def test_make_series_groups_patients_and_studies() -> None:
    """patients and studies_per_patient spread series in blocks over studies and patients."""
    series = make_series(8, 1, seed=9, patients=2, studies_per_patient=2)
    assert len({s.patient_id for s in series}) == 2
    assert len({s.study_uid for s in series}) == 4
    assert [s.study_uid for s in series][::2] == [s.study_uid for s in series][1::2]
    assert len({(s.patient_id, s.study_uid) for s in series}) == 4


def test_instance_bytes_is_a_valid_ct_image() -> None:
    """instance_bytes gives Part-10 Explicit VR LE CT with the series' identifiers and pixels."""
    series = make_series(1, 3, seed=10, rows=32, columns=48)[0]
    ds = pydicom.dcmread(io.BytesIO(instance_bytes(series, 2)))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == series.sop_uids[2] == ds.file_meta.MediaStorageSOPInstanceUID
    assert (ds.SeriesInstanceUID, ds.StudyInstanceUID) == (series.series_uid, series.study_uid)
    assert (ds.InstanceNumber, ds.Modality, ds.StudyDate) == (3, "CT", series.study_date)
    assert ds.SeriesDescription == series.description
    assert [float(v) for v in ds.ImagePositionPatient] == [-80.0, -80.0, -5.0]
    assert ds.pixel_array.shape == (32, 48) and ds.pixel_array.dtype.name == "uint16"
    assert ds.pixel_array.max() > ds.pixel_array.min()
    written = io.BytesIO()
    instance_dataset(series, 2).save_as(written, enforce_file_format=True)
    assert written.getvalue() == instance_bytes(series, 2)  # the fast encoder = pydicom's


def test_write_files_and_batch_csv(tmp_path: Path) -> None:
    """write_files writes one readable file per instance; the batch CSV lists every series."""
    series = make_series(2, 3, seed=11)
    paths = write_files(series, tmp_path / "dcm")
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in paths} == {u for s in series for u in s.sop_uids}
    with_study = write_batch_csv(series, tmp_path / "batch.csv")
    rows = list(csv.reader(with_study.open()))
    assert rows == [["SeriesInstanceUID", "StudyInstanceUID"], *([s.series_uid, s.study_uid] for s in series)]
    only = write_batch_csv(series, tmp_path / "series.csv", with_study=False)
    assert only.read_text().splitlines() == ["SeriesInstanceUID", *(s.series_uid for s in series)]
