"""Our misbehaving pynetdicom PACS, driven through the real local Orthanc (and a pynetdicom SCU)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from peers.pacs import MisbehavingPacs, value_matches
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_transfer.errors import OrthancError
from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import SyntheticSeries, make_series, write_batch_csv

pytestmark = pytest.mark.integration

StartPacs = Callable[..., MisbehavingPacs]


@pytest.fixture
def badpacs(same: Stack) -> Iterator[StartPacs]:
    """Factory: start a MisbehavingPacs with fault modes, registered in the local Orthanc as BADPACS."""
    started: list[MisbehavingPacs] = []

    def start(series: list[SyntheticSeries], **faults: Any) -> MisbehavingPacs:
        pacs = MisbehavingPacs(series, **faults).start()
        started.append(pacs)
        pacs.register_in(same.centre)  # also makes CENTRE a known move destination
        return pacs

    yield start
    for pacs in started:
        pacs.stop()
        assert not pacs.errors, pacs.errors


def small(n: int = 3, per: int = 4, seed: int = 61, **kw: Any) -> list[SyntheticSeries]:
    return make_series(n, per, seed=seed, rows=16, columns=16, **kw)


def query(stack: Stack, level: str, keys: dict[str, str]) -> list[dict[str, Any]]:
    created = stack.centre.rest.post("/modalities/BADPACS/query", {"Level": level, "Query": keys})
    return stack.centre.rest.get(f"/queries/{created['ID']}/answers", params={"expand": "", "simplify": ""})


def move(stack: Stack, level: str, resources: list[dict[str, str]], target: str = "CENTRE") -> None:
    """Orthanc 1.10's blocking move; raises OrthancError (HTTP 500, DIMSE status in details) on failure."""
    body = {"Level": level, "Resources": resources, "TargetAet": target}
    stack.centre.rest.post("/modalities/BADPACS/move", body, idempotent=False, timeout_s=60)


def move_series(stack: Stack, s: SyntheticSeries, target: str = "CENTRE") -> None:
    move(stack, "Series", [{"StudyInstanceUID": s.study_uid, "SeriesInstanceUID": s.series_uid}], target)


def move_error(stack: Stack, s: SyntheticSeries, target: str = "CENTRE") -> str:
    with pytest.raises(OrthancError) as info:
        move_series(stack, s, target)
    return f"{info.value.message} {info.value.details}"


def count(stack: Stack, series_uid: str) -> int:
    found = stack.centre.rest.post("/tools/lookup", content=series_uid)
    ids = [f["ID"] for f in found if f["Type"] == "Series"]
    return len(stack.centre.rest.get(f"/series/{ids[0]}")["Instances"]) if ids else 0


def scu_move(pacs: MisbehavingPacs, s: SyntheticSeries, dimse_timeout: float) -> list[int | None]:
    """A C-MOVE straight from pynetdicom; returns the statuses received (None: no answer)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.dimse_timeout = dimse_timeout
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet)
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = s.series_uid
    statuses = [
        getattr(status, "Status", None)
        for status, _ in assoc.send_c_move(ds, "CENTRE", StudyRootQueryRetrieveInformationModelMove)
    ]
    if assoc.is_established:
        assoc.release()
    return statuses


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_value_matching_rules() -> None:
    """UID lists, wildcards (PN case-insensitive), date ranges and numbers match as DICOM says."""
    assert value_matches("UI", ["1.2", "1.3"], "1.3") and not value_matches("UI", "1.2", "1.2.3")
    assert value_matches("LO", "SYN*", "SYN0610001") and not value_matches("LO", "syn*", "SYN0610001")
    assert value_matches("PN", "synthetic^patient?", "Synthetic^Patient1")
    assert value_matches("DA", "20200101-20200131", "20200115") and value_matches("DA", "-20200101", "20191231")
    assert not value_matches("DA", "20200201-", "20200131")
    assert value_matches("IS", "4", "4") and not value_matches("IS", "4", "5")


def test_echo_and_series_find(same: Stack, badpacs: StartPacs) -> None:
    """C-ECHO answers; SERIES C-FIND matches study UID, series UID lists, no study UID, and counts instances."""
    series = small()
    pacs = badpacs(series)
    same.centre.rest.post("/modalities/BADPACS/echo", {})
    keys = {"StudyInstanceUID": series[0].study_uid, "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""}
    (answer,) = query(same, "Series", {**keys, "Modality": "", "SeriesDescription": ""})
    assert answer["SeriesInstanceUID"] == series[0].series_uid
    assert (answer["NumberOfSeriesRelatedInstances"], answer["Modality"]) == ("4", "CT")
    assert answer["SeriesDescription"] == series[0].description
    # No StudyInstanceUID (relational): answered, and the answer carries the study UID.
    (answer,) = query(same, "Series", {"SeriesInstanceUID": series[2].series_uid, "StudyInstanceUID": ""})
    assert answer["StudyInstanceUID"] == series[2].study_uid
    both = query(same, "Series", {"SeriesInstanceUID": f"{series[0].series_uid}\\{series[1].series_uid}"})
    assert sorted(a["SeriesInstanceUID"] for a in both) == sorted(s.series_uid for s in series[:2])
    assert len(query(same, "Series", {"SeriesInstanceUID": "", "Modality": "CT"})) == 3
    assert query(same, "Series", {"SeriesInstanceUID": "1.2.3.4"}) == []
    studies = query(same, "Study", {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": "", "PatientID": "SYN*"})
    assert {(a["StudyInstanceUID"], a["NumberOfStudyRelatedInstances"]) for a in studies} == {
        (s.study_uid, "4") for s in series
    }
    assert pacs.find_requests == 6 and pacs.move_requests == 0


def test_patient_root_find(same: Stack, badpacs: StartPacs) -> None:
    """Patient Root C-FIND works at PATIENT level (via Orthanc) and SERIES level (pynetdicom SCU)."""
    series = small(4, 2, patients=2, studies_per_patient=2)
    pacs = badpacs(series)
    patients = query(same, "Patient", {"PatientID": "", "NumberOfPatientRelatedInstances": "", "PatientName": ""})
    assert {(a["PatientID"], a["NumberOfPatientRelatedInstances"]) for a in patients} == {
        (series[0].patient_id, "4"),
        (series[2].patient_id, "4"),
    }
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet)
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.PatientID = series[2].patient_id
    ds.SeriesInstanceUID = ""
    ds.NumberOfSeriesRelatedInstances = ""
    answers = [
        (status.Status, found) for status, found in assoc.send_c_find(ds, PatientRootQueryRetrieveInformationModelFind)
    ]
    assoc.release()
    pending = [found for status, found in answers if status == 0xFF00]
    assert sorted(a.SeriesInstanceUID for a in pending) == sorted(s.series_uid for s in series[2:])
    assert {a.PatientID for a in pending} == {series[2].patient_id}
    assert {a.StudyInstanceUID for a in pending} == {s.study_uid for s in series[2:]}
    assert answers[-1][0] == 0x0000


def test_image_find_and_refusal(same: Stack, badpacs: StartPacs) -> None:
    """IMAGE C-FIND lists the SOPInstanceUIDs; with refuse_image_find it fails with 0xC000."""
    series = small(1, 5)
    pacs = badpacs(series)
    keys = {"StudyInstanceUID": series[0].study_uid, "SeriesInstanceUID": series[0].series_uid, "SOPInstanceUID": ""}
    answers = query(same, "Instance", keys)
    assert sorted(a["SOPInstanceUID"] for a in answers) == sorted(series[0].sop_uids)
    pacs.refuse_image_find = True
    with pytest.raises(OrthancError) as info:
        query(same, "Instance", keys)
    assert "0xC000" in str(info.value.details)
    assert query(same, "Series", {"SeriesInstanceUID": series[0].series_uid})  # other levels still answer


def test_omit_counts(same: Stack, badpacs: StartPacs) -> None:
    """omit_counts answers NumberOfSeriesRelatedInstances empty, as some PACS do."""
    series = small(1, 3)
    badpacs(series, omit_counts=True)
    (answer,) = query(same, "Series", {"SeriesInstanceUID": series[0].series_uid, "NumberOfSeriesRelatedInstances": ""})
    assert answer.get("NumberOfSeriesRelatedInstances", "") == ""


def test_hierarchical_and_no_uid_lists(same: Stack, badpacs: StartPacs) -> None:
    """hierarchical refuses a SERIES query without its study UID (0xC000); uid_lists=False matches no list."""
    series = small(2, 2)
    pacs = badpacs(series, hierarchical=True)
    with pytest.raises(OrthancError) as info:
        query(same, "Series", {"SeriesInstanceUID": series[0].series_uid, "StudyInstanceUID": ""})
    assert "0xC000" in str(info.value.details)
    keys = {"StudyInstanceUID": series[0].study_uid, "SeriesInstanceUID": series[0].series_uid}
    assert len(query(same, "Series", keys)) == 1
    pacs.configure(hierarchical=False, uid_lists=False)
    assert query(same, "Series", {"SeriesInstanceUID": f"{series[0].series_uid}\\{series[1].series_uid}"}) == []
    assert len(query(same, "Series", {"SeriesInstanceUID": series[1].series_uid})) == 1


def test_normal_moves_deliver_all(same: Stack, badpacs: StartPacs) -> None:
    """SERIES, STUDY and IMAGE level C-MOVEs deliver exactly the matching instances, each once."""
    series = small(3, 4)
    pacs = badpacs(series)
    move_series(same, series[0])
    move(same, "Study", [{"StudyInstanceUID": series[1].study_uid}])
    base = {"StudyInstanceUID": series[2].study_uid, "SeriesInstanceUID": series[2].series_uid}
    move(same, "Instance", [{**base, "SOPInstanceUID": uid} for uid in series[2].sop_uids[:2]])
    assert [count(same, s.series_uid) for s in series] == [4, 4, 2]
    assert [pacs.sent[s.series_uid] for s in series] == [4, 4, 2]
    assert set(pacs.sent_sop.values()) == {1}
    assert pacs.moves[series[2].series_uid] == 2  # Orthanc issues one C-MOVE per instance resource
    assert pacs.events("done")[:2] == [series[0].series_uid, series[1].series_uid]


def test_async_queue_drops_excess(same: Stack, badpacs: StartPacs) -> None:
    """Async mode with queue_size 2: four quick moves are all acknowledged, two are silently dropped."""
    series = small(4, 3)
    pacs = badpacs(series, async_mode=True, queue_size=2, paused=True)
    for s in series:
        move_series(same, s)  # each answered Success at once, 0 sub-operations
    assert [pacs.dropped[s.series_uid] for s in series] == [0, 0, 1, 1]
    assert sum(pacs.sent.values()) == 0  # nothing sent before the answer
    pacs.paused = False
    assert pacs.wait_idle(10)
    assert [count(same, s.series_uid) for s in series] == [3, 3, 0, 0]
    assert pacs.events("done") == [series[0].series_uid, series[1].series_uid]


def test_async_queue_counts_move_in_progress(same: Stack, badpacs: StartPacs) -> None:
    """A move being sent occupies the queue too: queue_size 1 with a slow send drops the next move."""
    series = small(2, 3)
    pacs = badpacs(series, async_mode=True, queue_size=1, store_delay_s=0.1)
    move_series(same, series[0])
    move_series(same, series[1])
    assert pacs.wait_idle(10)
    assert (count(same, series[0].series_uid), count(same, series[1].series_uid)) == (3, 0)
    assert pacs.dropped == {series[1].series_uid: 1}
    move_series(same, series[1])  # the queue is free again: served
    assert pacs.wait_idle(10) and count(same, series[1].series_uid) == 3


def test_partial_first_then_complete(same: Stack, badpacs: StartPacs) -> None:
    """partial_first=2: the first move sends 2 and says Success; the second sends all (2 sent twice)."""
    series = small(2, 5)
    pacs = badpacs(series, partial_first=2)
    move_series(same, series[0])
    assert count(same, series[0].series_uid) == 2
    move_series(same, series[0])
    assert count(same, series[0].series_uid) == 5
    assert sorted(pacs.sent_sop[u] for u in series[0].sop_uids) == [1, 1, 1, 2, 2]
    pacs.partial_warning = True
    assert "0xB000" in move_error(same, series[1])  # Warning: Orthanc treats it as a failure
    assert count(same, series[1].series_uid) == 2


def test_refuse_every_second_move(same: Stack, badpacs: StartPacs) -> None:
    """refuse_every=2: the 2nd C-MOVE fails with 0xA702 and sends nothing; the 1st and 3rd deliver."""
    series = small(3, 3)
    pacs = badpacs(series, refuse_every=2)
    move_series(same, series[0])
    assert "0xA702" in move_error(same, series[1])
    move_series(same, series[2])
    assert [count(same, s.series_uid) for s in series] == [3, 0, 3]
    assert pacs.refused == {series[1].series_uid: 1}
    assert pacs.sent[series[1].series_uid] == 0


def test_unknown_destination_a801(same: Stack, badpacs: StartPacs) -> None:
    """A move to an AE title the PACS does not know fails with 0xA801."""
    series = small(1, 2)
    pacs = badpacs(series)
    assert "0xA801" in move_error(same, series[0], target="NOWHERE")
    assert pacs.events("unknown-destination") == [series[0].series_uid]
    assert count(same, series[0].series_uid) == 0


def test_abort_after_first_move(same: Stack, badpacs: StartPacs) -> None:
    """abort_after=2: the first move aborts after 2 C-STOREs; the next move of the series sends all."""
    series = small(2, 5)
    pacs = badpacs(series, abort_after=2)
    error = move_error(same, series[0])
    assert "abort" in error.lower()
    assert count(same, series[0].series_uid) == 2
    move_series(same, series[0])
    assert count(same, series[0].series_uid) == 5
    pacs.configure(async_mode=True)  # async: the store association is aborted instead
    move_series(same, series[1])
    assert pacs.wait_idle(10)
    assert count(same, series[1].series_uid) == 2
    assert pacs.events("aborted") == [series[0].series_uid, series[1].series_uid]


def test_refuse_image_move_series_still_works(same: Stack, badpacs: StartPacs) -> None:
    """refuse_image_move: IMAGE-level C-MOVE fails with 0xC000, the SERIES-level move delivers."""
    series = small(1, 3)
    badpacs(series, refuse_image_move=True)
    base = {"StudyInstanceUID": series[0].study_uid, "SeriesInstanceUID": series[0].series_uid}
    with pytest.raises(OrthancError) as info:
        move(same, "Instance", [{**base, "SOPInstanceUID": series[0].sop_uids[0]}])
    assert "0xC000" in str(info.value.details)
    move_series(same, series[0])
    assert count(same, series[0].series_uid) == 3


def test_hang_until_cleared_and_stop_does_not_hang(same: Stack, badpacs: StartPacs) -> None:
    """hang: no answer (the SCU times out, nothing sent); cleared, a held move proceeds; stop() frees one."""
    series = small(2, 3)
    pacs = badpacs(series, hang=True)
    assert scu_move(pacs, series[0], dimse_timeout=0.5) == [None]  # no answer at all
    wait_for(lambda: pacs.events("aborted") == [series[0].series_uid])  # held move given up with its SCU
    assert pacs.sent[series[0].series_uid] == 0
    held = threading.Thread(target=move_series, args=(same, series[0]))
    held.start()
    time.sleep(0.3)
    assert held.is_alive() and count(same, series[0].series_uid) == 0
    pacs.hang = False
    held.join(10)
    assert count(same, series[0].series_uid) == 3, pacs.log
    pacs.hang = True
    statuses: list[list[int | None]] = []
    waiting = threading.Thread(target=lambda: statuses.append(scu_move(pacs, series[1], dimse_timeout=30)))
    waiting.start()
    wait_for(lambda: series[1].series_uid in pacs.events("hang"))
    started = time.monotonic()
    pacs.stop()
    assert time.monotonic() - started < 3
    waiting.join(5)
    assert not waiting.is_alive() and statuses == [[None]]
    assert pacs.sent[series[1].series_uid] == 0


def test_store_delay_slows_moves(same: Stack, badpacs: StartPacs) -> None:
    """store_delay_s=0.1 makes a 3-instance move take at least 0.3 s; all still arrive."""
    series = small(1, 3)
    badpacs(series, store_delay_s=0.1)
    started = time.monotonic()
    move_series(same, series[0])
    assert time.monotonic() - started >= 0.3
    assert count(same, series[0].series_uid) == 3


def write_config(path: Path, stack: Stack, **transfer: object) -> Path:
    """A transfer.yaml whose source is BADPACS (local = destination = CENTRE)."""
    settings = {"stall_s": 2, "move_timeout_s": 60, "backoff_s": 0.2, **transfer}
    path.write_text(
        f"local: {{url: {stack.centre.url}}}\n"
        "source: {modality: BADPACS}\n"
        f"destination: {{aet: {stack.destination_aet}}}\n"
        "transfer: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}\n"
    )
    return path


def test_cli_batch_from_badpacs(same: Stack, badpacs: StartPacs, tmp_path: Path) -> None:
    """`main.py --batch` with source.modality BADPACS (normal mode) completes every series once, exit 0."""
    series = small(3, 4, seed=62)
    pacs = badpacs(series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    config = write_config(tmp_path / "t.yaml", same)
    res = run_cli("--batch", batch, "--config", config, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["summary"]["complete"], report["summary"]["instances"]) == (3, 12)
    assert [count(same, s.series_uid) for s in series] == [4, 4, 4]
    assert set(pacs.sent_sop.values()) == {1} and len(pacs.sent_sop) == 12
    assert [pacs.moves[s.series_uid] for s in series] == [1, 1, 1]


def test_cli_repairs_partial_first_moves(same: Stack, badpacs: StartPacs, tmp_path: Path) -> None:
    """With partial_first=2 the CLI sees each series short, re-moves only the missing instances, exit 0."""
    series = small(2, 4, seed=63)
    pacs = badpacs(series, partial_first=2)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    config = write_config(tmp_path / "t.yaml", same, stall_s=1)
    res = run_cli("--batch", batch, "--config", config, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["series"]
    assert [(r["state"], r["received"], r["attempts"]) for r in rows] == [("complete", 4, 2)] * 2
    assert set(pacs.sent_sop.values()) == {1}  # the repair moved only what was missing
    assert [pacs.sent[s.series_uid] for s in series] == [4, 4]


@pytest.mark.parametrize("method", ["blocking", "retrieve-job"])
def test_cli_falls_back_to_series_move_when_image_move_refused(
    same: Stack, badpacs: StartPacs, tmp_path: Path, method: str
) -> None:
    """A PACS refusing IMAGE-level moves: the repair falls back to a series move and completes."""
    series = small(2, 5, seed=64)
    badpacs(series, partial_first=2, refuse_image_move=True)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    config = write_config(tmp_path / "t.yaml", same, stall_s=1, max_attempts=4, move_method=method)
    res = run_cli("--batch", batch, "--config", config, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["series"]
    assert [(r["state"], r["received"]) for r in rows] == [("complete", 5)] * 2
    assert all(r["attempts"] == 3 for r in rows)  # partial, refused image move, series move


def test_cli_survives_pacs_without_uid_lists(same: Stack, badpacs: StartPacs, tmp_path: Path) -> None:
    """A repair query the PACS answers with nothing is a short attempt, not a crash: all complete."""
    series = small(2, 4, seed=65)
    badpacs(series, partial_first=2, uid_lists=False)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    config = write_config(tmp_path / "t.yaml", same, stall_s=1, max_attempts=4, move_method="retrieve-job")
    res = run_cli("--batch", batch, "--config", config, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 2


def run_with_slow_lists(
    same: Stack, badpacs: StartPacs, tmp_path: Path, series: list[SyntheticSeries], delay: float
) -> tuple[list[float], list[float]]:
    """The CLI against a PACS taking `delay` s per list C-FIND: when each list C-FIND came
    (wall clock) and when each series was recorded complete (the journal's events)."""
    pacs = badpacs(series, list_find_delay_s=delay)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    config = write_config(tmp_path / "t.yaml", same)
    wall_minus_monotonic = time.time() - time.monotonic()  # the PACS logs monotonic, the journal wall time
    res = run_cli("--batch", batch, "--config", config, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == len(series)
    lists = [at + wall_minus_monotonic for at, event, _ in pacs.log if event == "list-find"]
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    try:
        done = [at for (at,) in db.execute("SELECT at FROM events WHERE to_state='complete' ORDER BY at")]
    finally:
        db.close()
    return lists, done


def test_a_slow_list_c_find_does_not_hold_up_the_proof(same: Stack, badpacs: StartPacs, tmp_path: Path) -> None:
    """A list C-FIND runs on a worker thread: a move that ends while a slow PACS (2 s per
    list C-FIND) answers it is proven and recorded then, not after the list returns."""
    lists, done = run_with_slow_lists(same, badpacs, tmp_path, small(6, 4, seed=66), delay=2.0)
    assert len(lists) == 1  # the first series asked alone, the other five in one list
    during = [at for at in done if lists[0] < at < lists[0] + 2.0 - 0.2]
    assert len(during) == 1, (lists, done)  # the first series, complete while its successors were asked


def test_the_next_list_is_asked_while_the_answers_in_hand_are_moved(
    same: Stack, badpacs: StartPacs, tmp_path: Path
) -> None:
    """With more series than one list (50) and a PACS taking 1.5 s per list C-FIND, the second
    list is asked while half of the first list's series are still to move: moves go on during it."""
    lists, done = run_with_slow_lists(same, badpacs, tmp_path, small(70, 1, seed=67), delay=1.5)
    assert len(lists) == 2, lists  # the first series alone, then 50, then the last 19
    during_second = [at for at in done if lists[1] < at < lists[1] + 1.5 - 0.1]
    # Asked only when the answers ran out, at most the 2-3 series already queried would move meanwhile.
    assert len(during_second) >= 8, (lists, done)
