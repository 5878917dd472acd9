"""C-GET instead of C-MOVE (`transfer.retrieve: get`), on real peers.

The local Orthanc is 1.12.7 (the `new` fixture; C-GET SCU exists from 1.12.6). Sources: an
Orthanc 1.12.7 PACS that does not know the local AE title at all, pynetdicom's `qrscp`
without a move destination, our MisbehavingPacs (no C-GET service) and a small pynetdicom
Q/R SCP that answers every C-GET with a refusal status.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from conftest import run_cli
from peers.pacs import MisbehavingPacs
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from test_transfer import assert_each_proven_before_the_next, series_count, setup_batch, write_config

from bench.resilience import qrscp_source
from bench.resilience import write_config as write_source_config
from dicom_transfer.config import load_config
from dicom_transfer.errors import ConfigError
from dicom_transfer.stack import HOST, Stack, free_port
from dicom_transfer.synthetic import SyntheticSeries, instance_bytes, instance_dataset, make_series, write_batch_csv

pytestmark = pytest.mark.integration

FAST = {"stall_s": 0.5, "backoff_s": 0.1, "move_timeout_s": 30}


def journal_rows(path: Path) -> list[tuple[str, str, str | None, str | None]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT uid, state, move_method, reason FROM series ORDER BY seq").fetchall()


def test_get_where_the_pacs_does_not_know_the_local_aet(new: Stack, tmp_path: Path) -> None:
    """The PACS has no entry for CENTRE: C-MOVE to it fails (0xC000 from Orthanc), C-GET brings every series in."""
    series, batch = setup_batch(new, tmp_path, n=3, per=6, seed=1901)
    new.pacs.rest.delete("/modalities/CENTRE")
    assert "CENTRE" not in new.pacs.rest.get("/modalities")

    move_cfg = write_config(tmp_path / "move.yaml", new, max_attempts=1, **FAST)
    res = run_cli("--batch", batch, "--config", move_cfg, "--journal", tmp_path / "move.sqlite")
    assert res.returncode == 1, res.stderr
    rows = journal_rows(tmp_path / "move.sqlite")
    assert {r[1] for r in rows} == {"failed"}
    assert all("0xC000" in (r[3] or "") for r in rows), rows

    get_cfg = write_config(tmp_path / "get.yaml", new, retrieve="get")
    res = run_cli("--batch", batch, "--config", get_cfg, "--journal", tmp_path / "get.sqlite", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 3
    assert {r[2] for r in journal_rows(tmp_path / "get.sqlite")} == {"get-job"}
    with closing(sqlite3.connect(tmp_path / "get.sqlite")) as db:
        jobs = [new.centre.rest.get(f"/jobs/{j}") for (j,) in db.execute("SELECT job_id FROM series")]
        assert {j["Type"] for j in jobs} == {"DicomGetScu"}
        assert_each_proven_before_the_next(db, 3)
    assert all(series_count(new.centre, s.series_uid) == 6 for s in series)


def test_get_repairs_a_partial_series_by_instance(new: Stack, tmp_path: Path) -> None:
    """A partial series is completed by one C-GET of only its missing instances (IMAGE level)."""
    series, batch = setup_batch(new, tmp_path, n=1, per=9, seed=1902)
    for i in (0, 4, 8):
        new.centre.rest.post("/instances", content=instance_bytes(series[0], i))
    res = run_cli("--batch", batch, "--config", write_config(tmp_path / "t.yaml", new, retrieve="get"))
    assert res.returncode == 0, res.stderr
    assert series_count(new.centre, series[0].series_uid) == 9
    with closing(sqlite3.connect(tmp_path / "series.journal.sqlite")) as db:
        (detail,) = db.execute("SELECT detail FROM events WHERE event='issued'").fetchone()
        (job_id,) = db.execute("SELECT job_id FROM series").fetchone()
    assert detail == "attempt=1 instances=6"
    query = new.centre.rest.get(f"/jobs/{job_id}")["Content"]["Query"]
    assert len(query) == 6 and {q["0008,0052"] for q in query} == {"IMAGE"}


def test_get_from_qrscp_that_knows_no_move_destination(new: Stack, tmp_path: Path) -> None:
    """pynetdicom's qrscp without CENTRE configured: C-MOVE stops at once on 0xA801, C-GET completes both series."""
    series = make_series(2, 5, seed=1903, rows=16, columns=16)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    with qrscp_source(tmp_path, series, new.centre, move_destination=False) as modality:
        move_cfg = write_source_config(tmp_path / "move.yaml", new.centre.url, source=modality)
        res = run_cli("--batch", batch, "--config", move_cfg, "--journal", tmp_path / "move.sqlite")
        assert res.returncode == 2, res.stderr
        assert "0xA801" in res.stderr and "'CENTRE'" in res.stderr
        get_cfg = write_source_config(tmp_path / "get.yaml", new.centre.url, source=modality, retrieve="get")
        res = run_cli("--batch", batch, "--config", get_cfg, "--journal", tmp_path / "get.sqlite", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 2
    assert all(series_count(new.centre, s.series_uid) == 5 for s in series)


def test_get_not_offered_by_the_source_stops_at_once(new: Stack, tmp_path: Path) -> None:
    """A PACS without the C-GET service (SOP class not accepted): exit 2 saying so; the same PACS serves C-MOVE."""
    series = make_series(2, 4, seed=1904, rows=16, columns=16)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    with MisbehavingPacs(series).start() as pacs:
        pacs.register_in(new.centre)
        get_cfg = write_source_config(tmp_path / "get.yaml", new.centre.url, retrieve="get", **FAST)
        res = run_cli("--batch", batch, "--config", get_cfg, "--journal", tmp_path / "get.sqlite")
        assert res.returncode == 2, res.stderr
        assert "C-GET not supported by the source (SOP class not accepted)" in res.stderr
        assert "transfer.retrieve: move" in res.stderr
        assert "failed" not in {r[1] for r in journal_rows(tmp_path / "get.sqlite")}  # resumable, nothing given up
        move_cfg = write_source_config(tmp_path / "move.yaml", new.centre.url, **FAST)
        res = run_cli("--batch", batch, "--config", move_cfg, "--journal", tmp_path / "move.sqlite")
        assert res.returncode == 0, res.stderr
        assert not pacs.errors, pacs.errors


@contextmanager
def refusing_get_pacs(series: list[SyntheticSeries], refuse: set[str], status: int) -> Iterator[int]:
    """A pynetdicom Q/R SCP (SERIES-level FIND, GET): a C-GET of a `refuse` series gets `status`, others send all."""
    by_uid = {s.series_uid: s for s in series}

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        wanted = str(event.identifier.get("SeriesInstanceUID", "") or "")
        for s in series:
            if wanted in ("", s.series_uid):
                answer = Dataset()
                answer.QueryRetrieveLevel = "SERIES"
                answer.PatientID, answer.StudyInstanceUID, answer.SeriesInstanceUID = (
                    s.patient_id, s.study_uid, s.series_uid,
                )  # fmt: skip
                answer.NumberOfSeriesRelatedInstances = len(s.sop_uids)
                yield 0xFF00, answer

    def on_get(event: evt.Event) -> Iterator[int | tuple[int, Dataset | None]]:
        found = by_uid[str(event.identifier.SeriesInstanceUID)]
        if found.series_uid in refuse:
            yield 1
            yield status, None
            return
        yield len(found.sop_uids)
        for i in range(len(found.sop_uids)):
            yield 0xFF00, instance_dataset(found, i)

    ae = AE("GETPACS")
    for model in (Verification, StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet):
        ae.add_supported_context(model)
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, scu_role=False, scp_role=True)
    port = free_port()
    handlers = [(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]
    server = ae.start_server((HOST, port), block=False, evt_handlers=handlers)
    try:
        yield port
    finally:
        server.shutdown()


def test_get_refused_by_status_for_every_series_stops_the_run(new: Stack, tmp_path: Path) -> None:
    """Every C-GET answered 0xA702 (Orthanc reports it as Success): exit 2 naming the local AE title, nothing failed."""
    series = make_series(2, 4, seed=1905, rows=16, columns=16)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    with refusing_get_pacs(series, {s.series_uid for s in series}, 0xA702) as port:
        new.centre.rest.put("/modalities/GETPACS", {"AET": "GETPACS", "Host": HOST, "Port": port})
        cfg = write_source_config(tmp_path / "t.yaml", new.centre.url, source="GETPACS", retrieve="get",
                                  max_attempts=2, **FAST)  # fmt: skip
        res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2, res.stderr
    assert "every C-GET of this run was answered without sending anything" in res.stderr
    assert "'CENTRE'" in res.stderr and "transfer.retrieve: move" in res.stderr
    assert "failed" not in {r[1] for r in journal_rows(tmp_path / "series.journal.sqlite")}


def test_get_refused_for_one_series_fails_it_with_the_reason(new: Stack, tmp_path: Path) -> None:
    """One series' C-GET refused (0xC000) while another's works: that series fails saying C-GET sent nothing; exit 1."""
    series = make_series(2, 4, seed=1906, rows=16, columns=16)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    with refusing_get_pacs(series, {series[1].series_uid}, 0xC000) as port:
        new.centre.rest.put("/modalities/GETPACS", {"AET": "GETPACS", "Host": HOST, "Port": port})
        cfg = write_source_config(tmp_path / "t.yaml", new.centre.url, source="GETPACS", retrieve="get",
                                  max_attempts=2, **FAST)  # fmt: skip
        res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stderr
    report = {r["SeriesInstanceUID"]: r for r in json.loads((tmp_path / "r.json").read_text())["series"]}
    assert report[series[0].series_uid]["state"] == "complete"
    failed = report[series[1].series_uid]
    assert failed["state"] == "failed"
    assert failed["reason"].startswith("short: 0/4; C-GET answered without sending anything"), failed
    assert failed["reason"].endswith("after 2 attempts"), failed


def test_get_refused_on_orthanc_before_1_12_6(same: Stack, tmp_path: Path) -> None:
    """retrieve: get with a local Orthanc 1.10.1: exit 2 naming transfer.retrieve and the version; no journal."""
    series, batch = setup_batch(same, tmp_path, n=1, per=2, seed=1907)
    res = run_cli("--batch", batch, "--config", write_config(tmp_path / "t.yaml", same, retrieve="get"))
    assert res.returncode == 2, res.stderr
    assert "transfer.retrieve" in res.stderr and "1.10.1" in res.stderr and "1.12.6" in res.stderr
    assert not (tmp_path / "series.journal.sqlite").exists()


def test_get_to_another_destination_is_a_config_error(tmp_path: Path) -> None:
    """retrieve: get with a destination other than the local Orthanc: exit 2 naming transfer.retrieve, no journal."""
    batch = write_batch_csv(make_series(1, 1, seed=1908), tmp_path / "series.csv")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "local: {url: http://127.0.0.1:9}\n"
        "destination: {aet: DEST, url: http://127.0.0.1:10}\n"
        "transfer: {retrieve: get}\n"
    )
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2, res.stderr
    assert "transfer.retrieve" in res.stderr and "lands in the local Orthanc" in res.stderr
    assert "transfer.mode: relay" in res.stderr  # the way to forward from the local Orthanc
    assert not (tmp_path / "series.journal.sqlite").exists()
    cfg.write_text(cfg.read_text().replace("{retrieve: get}", "{retrieve: get, mode: relay}"))
    assert load_config(cfg, env={}).relay_mode  # relay forwards what the C-GET brought in


@pytest.mark.parametrize(
    ("yaml", "key"),
    [
        ("transfer: {retrieve: fetch}", "transfer.retrieve"),
        ("transfer: {retrieve: get, move_method: blocking}", "transfer.move_method"),
        ("destination: {url: 'https://127.0.0.1:8042'}\ntransfer: {retrieve: get}", "transfer.retrieve"),
    ],
)
def test_retrieve_config_errors(tmp_path: Path, yaml: str, key: str) -> None:
    """Bad retrieve settings raise a ConfigError naming the key."""
    path = tmp_path / "t.yaml"
    path.write_text("local: {url: 'http://127.0.0.1:8042'}\n" + yaml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.key == key


def test_retrieve_get_accepts_the_local_orthanc_as_destination(tmp_path: Path) -> None:
    """destination.url null, or the local url written differently (trailing slash, default port), is accepted."""
    path = tmp_path / "t.yaml"
    for dest in ("null", "'http://127.0.0.1:80/'"):
        text = f"local: {{url: 'http://127.0.0.1'}}\ndestination: {{url: {dest}}}\ntransfer: {{retrieve: get}}\n"
        path.write_text(text)
        assert load_config(path, env={}).transfer.retrieve == "get"
    assert load_config(None, env={}).transfer.retrieve == "move"
