"""Relay mode (`transfer.mode: relay`): PACS → local Orthanc (LAN) → destination in ZIP bulk.

Real Orthanc processes: the `separate` stack (1.10.1) and a separate stack of 1.12.7.
Crash safety: kill -9 at seeded random points (bench/resilience.py's R3 with `relay=True`),
the local Orthanc restarted and the destination down for 3 s while a forward runs.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import _new_orthanc_command, run_cli
from peers.pacs import MisbehavingPacs
from test_overnight import FakeClock
from wanlink import WanLink

from bench.resilience import cli_popen, count_at, deleted_too_soon, finish_background, journal_rows, r3_kills
from dicom_transfer.batch import check_batch
from dicom_transfer.config import load_config
from dicom_transfer.errors import ConfigError, OrthancError, Unreachable
from dicom_transfer.journal import Journal
from dicom_transfer.orthanc import ForwardTarget, LocalOrthanc
from dicom_transfer.relay import DELETE_EVERY_S, Forwarded, Relay, chunks, forward
from dicom_transfer.retry import FREE_REQUEUES
from dicom_transfer.scheduler import Scheduler
from dicom_transfer.stack import HOST, OrthancSpec, Stack, launch_orthanc, start_stack
from dicom_transfer.stack import _stop_all as stop_all
from dicom_transfer.stack import _wait_all as wait_all
from dicom_transfer.states import Event, State
from dicom_transfer.synthetic import SyntheticSeries, instance_bytes, make_series, upload, write_batch_csv
from dicom_transfer.transfer import _relay_parts, plan

pytestmark = pytest.mark.integration


def relay_config(
    path: Path, stack: Stack, dest_url: str | None = None, max_local_gb: float | None = None, **transfer: object
) -> Path:
    """A transfer.yaml in relay mode: local = CENTRE, destination DEST (its REST url or `dest_url`)."""
    assert stack.dest is not None
    settings = {"mode": "relay", "stall_s": 2, "move_timeout_s": 60, "backoff_s": 0.2, **transfer}
    path.write_text(
        f"local: {{url: {stack.centre.url}}}\n"
        "source: {modality: PACS}\n"
        f"destination: {{aet: DEST, url: '{dest_url or stack.dest.url}'}}\n"
        "transfer: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}\n"
        "relay: {chunk_mb: 0.5" + (f", max_local_gb: {max_local_gb}" if max_local_gb else "") + "}\n"
    )
    return path


def events_of(journal: Path, uid: str) -> list[str]:
    with closing(sqlite3.connect(journal)) as db:
        return [e for (e,) in db.execute("SELECT event FROM events WHERE uid=? ORDER BY id", (uid,))]


def check_relayed(stack: Stack, series: list[SyntheticSeries], journal: Path, retried: bool = False) -> None:
    """Every series whole at the destination, gone from the local Orthanc, via held → forward → arrived
    (`retried`: held, then forwards that may have failed, the last one arrived)."""
    assert stack.dest is not None
    for s in series:
        assert count_at(stack.dest.rest, s.series_uid) == len(s.sop_uids)
        assert count_at(stack.centre.rest, s.series_uid) == 0
        events = [e for e in events_of(journal, s.series_uid) if e in ("held", "forward", "arrived")]
        if retried:
            assert "held" in events and events[-2:] == ["forward", "arrived"], events
        else:
            assert events[-3:] == ["held", "forward", "arrived"], events
    assert stack.centre.rest.get("/statistics")["CountInstances"] == 0


def test_relay_moves_to_local_then_forwards(separate: Stack, tmp_path: Path) -> None:
    """Relay on 1.10.1: moved to local, forwarded in ZIP chunks, counted at the destination, then deleted locally."""
    series = make_series(3, 20, seed=181, rows=32, columns=32)
    upload(separate.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = relay_config(tmp_path / "t.yaml", separate)
    res = run_cli("--batch", batch, "--config", cfg, "--json", "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["complete"] == 3 and summary["instances"] == 60 and summary["at_local"] == 0
    journal = tmp_path / "series.journal.sqlite"
    check_relayed(separate, series, journal)
    # A re-run moves nothing and forwards nothing: the destination pre-check holds.
    again = run_cli("--batch", batch, "--config", cfg, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["complete"] == 3
    assert sum(e == "forward" for s in series for e in events_of(journal, s.series_uid)) == 3


def test_relay_runs_the_after_arrival_steps_on_the_destination(separate: Stack, tmp_path: Path) -> None:
    """Relay with anonymize (delete_original), tags and export: the steps run once a series is proven at the
    destination, read the destination's copy, and the local Orthanc ends empty."""
    series = make_series(3, 5, seed=186, rows=16, columns=16)
    upload(separate.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = relay_config(tmp_path / "t.yaml", separate)
    anonymize = "anonymize: {lookup: lookup.csv, delete_original: true}\n"
    cfg.write_text(
        cfg.read_text() + anonymize + "export: {dir: out}\ntags: {file: tags.csv, keywords: [SOPInstanceUID]}\n"
    )
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["series"]
    assert [(r["anonymized"]["state"], r["tags"]["state"], r["export"]["state"]) for r in rows] == [
        ("done", "done", "done")
    ] * 3
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == 15
    assert len((tmp_path / "tags.csv").read_text().splitlines()) == 1 + 15
    assert separate.dest is not None
    for s in series:  # the originals deleted at the destination after their copies were counted
        assert count_at(separate.dest.rest, s.series_uid) == 0
    assert separate.dest.rest.get("/statistics")["CountInstances"] == 15  # the anonymised copies
    assert separate.centre.rest.get("/statistics")["CountInstances"] == 0
    text = (tmp_path / "tags.csv").read_text()
    assert not any(sop in text for s in series for sop in s.sop_uids)  # tags read from the copies
    # A fresh journal: the destination holds only the copies, and they prove the series there (no move, no
    # forward: before, the copy's count passed for the local Orthanc's and the forward found nothing, forever).
    again_cfg = relay_config(tmp_path / "again.yaml", separate)
    again_cfg.write_text(again_cfg.read_text() + anonymize)
    other = tmp_path / "other.sqlite"
    again = run_cli("--batch", batch, "--config", again_cfg, "--journal", other, "--json", timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout)["complete"] == 3, again.stderr[-3000:]
    assert {e for s in series for e in events_of(other, s.series_uid)} <= {"present", "anonymize_done"}


@pytest.fixture(scope="module")
def stack_new_separate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PACS, local Orthanc and destination all Orthanc 1.12.x."""
    command = _new_orthanc_command()
    stack = start_stack(
        tmp_path_factory.mktemp("stack-new-relay"), "separate",
        pacs_command=command, centre_command=command, dest_command=command,
    )  # fmt: skip
    try:
        yield stack
    finally:
        stack.stop(kill=True)


def test_relay_on_orthanc_1_12(stack_new_separate: Stack, tmp_path: Path) -> None:
    """Relay on Orthanc 1.12 (asynchronous move jobs, its ZIP upload): every series whole at the destination."""
    stack = stack_new_separate
    stack.reset()
    assert stack.centre.version() >= (1, 12)
    series = make_series(2, 15, seed=182, rows=32, columns=32)
    upload(stack.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    res = run_cli("--batch", batch, "--config", relay_config(tmp_path / "t.yaml", stack), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    check_relayed(stack, series, tmp_path / "series.journal.sqlite")


def test_relay_with_c_get_where_the_pacs_does_not_know_the_local_aet(stack_new_separate: Stack, tmp_path: Path) -> None:
    """retrieve: get in relay mode: the local Orthanc C-GETs each series (no move destination at the PACS), holds it,
    forwards it; whole at the destination, gone locally, one get-job per series."""
    stack = stack_new_separate
    stack.reset()
    series = make_series(3, 8, seed=188, rows=32, columns=32)
    upload(stack.pacs.rest, series)
    stack.pacs.rest.delete("/modalities/CENTRE")  # a C-MOVE to the local Orthanc could not be sent
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = relay_config(tmp_path / "t.yaml", stack, retrieve="get")
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    journal = tmp_path / "series.journal.sqlite"
    check_relayed(stack, series, journal)
    with closing(sqlite3.connect(journal)) as db:
        assert {m for (m,) in db.execute("SELECT move_method FROM series")} == {"get-job"}
        jobs = [stack.centre.rest.get(f"/jobs/{j}") for (j,) in db.execute("SELECT job_id FROM series")]
    assert {j["Type"] for j in jobs} == {"DicomGetScu"} and len(jobs) == 3


def test_relay_kill9_at_random_points(separate: Stack, tmp_path: Path) -> None:
    """kill -9 at 10 seeded random points in relay mode: all complete, none complete while short, none deleted early."""
    series = make_series(8, 20, seed=183, rows=16, columns=16)
    pacs = MisbehavingPacs(series, store_delay_s=0.01).start()  # ~0.2 s a series: kills land mid-move too
    try:
        pacs.register_in(separate.centre)  # BADPACS, whose move destinations include CENTRE
        assert separate.dest is not None
        pacs.add_destination(separate.dest.spec.aet, HOST, separate.dest.spec.dicom_port)
        result = r3_kills(separate.centre, pacs, series, tmp_path, kills=10, seed=18, window=(0.45, 1.3),
                          dest=separate.dest, relay=True)  # fmt: skip
    finally:
        pacs.stop()
    print(result.notes)
    assert result.extra["violations"] == []
    assert result.complete == result.total == 8
    assert result.exit_codes[-1] == 0
    assert all(result.at_destination[s.series_uid] == len(s.sop_uids) for s in series)
    assert separate.centre.rest.get("/statistics")["CountInstances"] == 0


def _wait_forwarding(journal: Path, proc: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["state"] == "forwarding" for r in journal_rows(journal)):
            return
        assert proc.poll() is None, "the run ended before any forward began"
        time.sleep(0.01)
    raise AssertionError("no forward began")


@pytest.mark.parametrize("fault", ["destination_down", "local_restart"])
def test_relay_survives_a_fault_mid_forward(separate: Stack, tmp_path: Path, fault: str) -> None:
    """The destination down 3 s (30 s in the issue) or the local Orthanc restarted mid-forward: completes, no loss."""
    assert separate.dest is not None
    series = make_series(4, 30, seed=184, rows=128, columns=128)
    upload(separate.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    # The destination's REST behind a slow link, so that a forward lasts long enough to be hit.
    with WanLink(HOST, separate.dest.spec.http_port, rtt_ms=20, mbit=8) as link:
        cfg = relay_config(tmp_path / "t.yaml", separate, dest_url=f"http://{HOST}:{link.port}")
        journal, log = tmp_path / "series.journal.sqlite", tmp_path / "run.log"
        proc = cli_popen("--batch", batch, "--config", cfg, log=log)
        _wait_forwarding(journal, proc)
        hit = separate.dest if fault == "destination_down" else separate.centre
        hit.kill()
        # 3 s keeps the suite short; DT_RELAY_OUTAGE_S=30 runs the 30 s outage.
        time.sleep(float(os.environ.get("DT_RELAY_OUTAGE_S", "3")) if fault == "destination_down" else 0.5)
        hit.restart()
        code = finish_background(proc, log, timeout=120)
    assert code == 0, log.read_text()[-3000:]
    assert deleted_too_soon(journal, separate.centre.rest, separate.dest.rest) == []
    check_relayed(separate, series, journal)


def test_relay_stops_when_the_destination_stays_down_then_resumes(separate: Stack, tmp_path: Path) -> None:
    """The destination down for longer than unreachable_s mid-forward: exit 3 once no move is left, nothing
    failed, nothing deleted before it was whole there; restarted, the same command forwards the rest (exit 0)."""
    assert separate.dest is not None
    series = make_series(4, 30, seed=190, rows=128, columns=128)
    upload(separate.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    journal, log = tmp_path / "series.journal.sqlite", tmp_path / "run.log"
    with WanLink(HOST, separate.dest.spec.http_port, rtt_ms=20, mbit=8) as link:
        # move_timeout_s is also how long one request retries a party that does not answer.
        cfg = relay_config(tmp_path / "t.yaml", separate, dest_url=f"http://{HOST}:{link.port}", unreachable_s=2,
                           move_timeout_s=5)  # fmt: skip
        proc = cli_popen("--batch", batch, "--config", cfg, log=log)
        _wait_forwarding(journal, proc)
        separate.dest.kill()
        try:
            code = finish_background(proc, log, timeout=120)
            text = log.read_text()
            assert code == 3, text[-3000:]
            assert "destination.unreachable" in text and "the destination took no forward" in text, text[-3000:]
            rows = journal_rows(journal)
            assert "failed" not in {r["state"] for r in rows} and any(r["state"] == "held_local" for r in rows), rows
        finally:
            separate.dest.restart()
        assert deleted_too_soon(journal, separate.centre.rest, separate.dest.rest) == []
        again = run_cli("--batch", batch, "--config", cfg, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    check_relayed(separate, series, journal, retried=True)


def test_relay_moves_wait_while_the_local_orthanc_is_full(separate: Stack, tmp_path: Path) -> None:
    """relay.max_local_gb reached: moves wait (relay.local_full), resume once forwards free it; no deadlock, no loss."""
    assert separate.dest is not None
    series = make_series(5, 30, seed=185, rows=128, columns=128)
    upload(separate.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    log = tmp_path / "run.jsonl"
    # The destination behind a slow link (a forward lasts > 1 s, the disk check's period) and a
    # bound that one series held locally already exceeds.
    with WanLink(HOST, separate.dest.spec.http_port, rtt_ms=20, mbit=0.5) as link:
        cfg = relay_config(tmp_path / "t.yaml", separate, dest_url=f"http://{HOST}:{link.port}", max_local_gb=0.0001,
                           max_in_flight=2)  # fmt: skip
        res = run_cli("--batch", batch, "--config", cfg, "--log-file", log, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "relay.local_full" in events and "relay.local_room" in events, sorted(set(events))
    assert events.index("relay.local_full") < len(events) - 1 - events[::-1].index("relay.local_room")
    check_relayed(separate, series, tmp_path / "series.journal.sqlite")


def test_relay_stops_when_the_local_orthanc_is_full_of_data_not_its_own(separate: Stack, tmp_path: Path) -> None:
    """The bound taken by other data: no forward can free it, so after unreachable_s the run stops (exit 3),
    resumable, nothing failed; with room the same batch completes."""
    assert separate.dest is not None
    series = make_series(3, 10, seed=186)
    other = make_series(1, 20, seed=187, rows=128, columns=128)  # someone else's series on the local Orthanc
    upload(separate.pacs.rest, series)
    upload(separate.centre.rest, other)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    journal = tmp_path / "series.journal.sqlite"
    cfg = relay_config(tmp_path / "t.yaml", separate, max_local_gb=0.0001, unreachable_s=2)
    res = run_cli("--batch", batch, "--config", cfg, timeout=120)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "none of it is this run's to forward" in res.stderr and "relay.max_local_gb" in res.stderr, res.stderr
    with closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT COUNT(*) FROM series WHERE state IN ('failed', 'complete')").fetchone()[0] == 0
    assert count_at(separate.centre.rest, other[0].series_uid) == 20  # not ours: never touched
    cfg = relay_config(tmp_path / "t.yaml", separate, max_local_gb=1, unreachable_s=2)
    res = run_cli("--batch", batch, "--config", cfg, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for s in series:
        assert count_at(separate.dest.rest, s.series_uid) == len(s.sop_uids)
    assert count_at(separate.centre.rest, other[0].series_uid) == 20


@pytest.fixture
def full_dest(tmp_path: Path) -> Iterator[Stack]:
    """PACS and local Orthanc 1.10.1, the destination Orthanc >= 1.12 capped at 1 MB (MaximumStorageMode Reject)."""
    pacs, centre, dest = (OrthancSpec.plan(n, a) for n, a in (("pacs", "HOSPITAL"), ("centre", "CENTRE"),
                                                             ("dest", "DEST")))  # fmt: skip
    launched = [
        launch_orthanc(pacs, tmp_path, {"CENTRE": centre.modality}),
        launch_orthanc(centre, tmp_path, {"PACS": pacs.modality}),
        launch_orthanc(dest, tmp_path, {}, command=_new_orthanc_command(),
                       extra_config={"MaximumStorageSize": 1, "MaximumStorageMode": "Reject"}),
    ]  # fmt: skip
    wait_all(launched, 30)
    yield Stack(launched[0], launched[1], launched[2], "separate")
    stop_all(launched, kill=True)


def test_relay_stops_on_a_full_destination_then_resumes(full_dest: Stack, tmp_path: Path) -> None:
    """The destination fills up mid-batch: forwards are not the series' fault (no attempt spent, none failed);
    moves go on into the local Orthanc, then the run stops after unreachable_s (exit 3) with the rest held
    whole locally and nothing deleted; once space is freed the same command forwards them (exit 0)."""
    assert full_dest.dest is not None
    filler = make_series(1, 70, seed=188)  # ~0.6 of the 1 MB the destination may hold
    upload(full_dest.dest.rest, filler)
    series = make_series(8, 10, seed=189)  # ~0.7 MB more: the destination fills up mid-batch
    upload(full_dest.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    journal = tmp_path / "series.journal.sqlite"
    cfg = relay_config(tmp_path / "t.yaml", full_dest, unreachable_s=3, max_attempts=2, backoff_max_s=1)
    first = run_cli("--batch", batch, "--config", cfg, timeout=180)
    assert first.returncode == 3, first.stderr[-3000:]
    assert "the destination took no forward" in first.stderr and "HTTP 507" in first.stderr, first.stderr[-2000:]
    assert "held whole at the local Orthanc" in first.stderr, first.stderr[-2000:]
    rows = journal_rows(journal)
    states = {r["state"] for r in rows}
    assert "failed" not in states and "held_local" in states, rows
    assert 0 < sum(r["state"] == "complete" for r in rows) < 8, rows
    assert deleted_too_soon(journal, full_dest.centre.rest, full_dest.dest.rest) == []
    for r in rows:
        if r["state"] == "held_local":
            assert count_at(full_dest.centre.rest, r["uid"]) == 10
    with closing(sqlite3.connect(journal)) as db:
        full = [w for (w,) in db.execute("SELECT detail FROM events WHERE event='destination.full'")]
    assert len(full) == 1, full
    # Space is freed: the same command forwards what waits at the local Orthanc.
    for patient in full_dest.dest.rest.get("/patients"):
        if full_dest.dest.rest.get(f"/patients/{patient}")["MainDicomTags"]["PatientID"] == filler[0].patient_id:
            full_dest.dest.rest.delete(f"/patients/{patient}")
    again = run_cli("--batch", batch, "--config", cfg, "--json", timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    check_relayed(full_dest, series, journal, retried=True)
    with closing(sqlite3.connect(journal)) as db:
        assert [e for (e,) in db.execute("SELECT event FROM events WHERE event LIKE 'destination.%'")] == [
            "destination.full"], "the second run found room: no pause"


def test_relay_at_the_window_end_drains_the_forwards_and_moves_nothing_more(separate: Stack, tmp_path: Path) -> None:
    """--until-window-end in relay mode: the window closes while the first series moves; it completes its move
    and then its forward (forwards touch no PACS), nothing new is issued, and the local Orthanc is left empty."""
    assert separate.dest is not None
    series = make_series(3, 30, seed=191, rows=128, columns=128)
    upload(separate.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    # The destination behind a slow link: the forward outlasts the move, so the run reaches the close with it.
    with WanLink(HOST, separate.dest.spec.http_port, rtt_ms=20, mbit=2) as link:
        path = relay_config(tmp_path / "t.yaml", separate, dest_url=f"http://{HOST}:{link.port}", max_in_flight=1,
                            move_method="blocking")  # fmt: skip
        with path.open("a") as f:
            f.write("window: {start: '08:00', end: '17:00', timezone: Europe/Zurich}\n")
        cfg = load_config(path)
        close = datetime(2026, 6, 10, 16, 59, 59, tzinfo=timezone(timedelta(hours=2))).timestamp()
        clock = FakeClock(close)  # one second before the window closes

        def on_progress(counts: dict[str, int]) -> None:
            if counts["moving"] and clock() < close + 2:
                clock.offset += 2  # the window closes while the first series moves

        journal = Journal(tmp_path / "j.sqlite", clock=clock)
        local, dest = LocalOrthanc(separate.centre.url), ForwardTarget(f"http://{HOST}:{link.port}")
        plan(journal, batch, check_batch(batch), cfg, local)
        landing, relay = _relay_parts(cfg, local, dest, clock)
        scheduler = Scheduler(cfg, journal, local, landing, clock=clock, until_window_end=True,
                              on_progress=on_progress, relay=relay)  # fmt: skip
        result = scheduler.run()
    counts = journal.counts()
    assert result.stopped and result.stop_reason == "outside the time window"
    assert counts["complete"] == 1 and counts["held_local"] == counts["forwarding"] == 0, counts
    assert counts["pending"] + counts["queried"] == 2, counts
    events = [e["event"] for e in journal.events(limit=200) if e["uid"]]
    assert events.count("issued") == 1  # nothing issued after the close
    assert separate.centre.rest.get("/statistics")["CountInstances"] == 0  # nothing left at the local Orthanc
    done = next(s for s in series if count_at(separate.dest.rest, s.series_uid))
    assert count_at(separate.dest.rest, done.series_uid) == 30


def test_relay_sends_only_what_the_destination_lacks(separate: Stack, tmp_path: Path) -> None:
    """A series the destination already holds 10 of 30 of (a forward cut short, a partial earlier transfer):
    moved whole to the local Orthanc, then only the 20 missing instances cross the link."""
    assert separate.dest is not None
    [s] = make_series(1, 30, seed=192, rows=32, columns=32)
    upload(separate.pacs.rest, [s])
    for i in range(10):
        separate.dest.rest.post("/instances", content=instance_bytes(s, i))
    batch = write_batch_csv([s], tmp_path / "series.csv")
    log = tmp_path / "run.jsonl"
    res = run_cli("--batch", batch, "--config", relay_config(tmp_path / "t.yaml", separate), "--log-file", log)
    assert res.returncode == 0, res.stderr[-3000:]
    [complete] = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "series.complete"]
    assert complete["forwarded"] == 20 and complete["received"] == 30, complete
    check_relayed(separate, [s], tmp_path / "series.journal.sqlite")


def test_relay_needs_two_servers(tmp_path: Path) -> None:
    """transfer.mode relay without a destination.url of its own is a config error naming the key."""
    path = tmp_path / "t.yaml"
    path.write_text("local: {url: 'http://127.0.0.1:8042'}\ntransfer: {mode: relay}\n")
    with pytest.raises(ConfigError, match="transfer.mode"):
        load_config(path)
    path.write_text("destination: {url: 'http://10.0.0.9:8042'}\ntransfer: {mode: relay}\nrelay: {max_local_gb: 2}\n")
    cfg = load_config(path)
    assert cfg.relay_mode and cfg.relay.max_local_gb == 2


def test_chunks_bound_each_request() -> None:
    """Instances are grouped up to the byte limit, one instance at least per group, order kept."""
    sizes = [("a", 40), ("b", 40), ("c", 40), ("d", 200), ("e", 10)]
    assert list(chunks(sizes, 100)) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert list(chunks([], 100)) == []


class FakeLocal:
    """A local Orthanc whose deletes fail while `down`, and whose disk holds `disk` bytes."""

    def __init__(self, disk: int = 0) -> None:
        self.down, self.disk, self.deleted = False, disk, []  # type: list[str]

    def delete_series(self, uid: str) -> None:
        if self.down:
            raise Unreachable(None, "http://127.0.0.1:1/series/x", "connection refused")
        self.deleted.append(uid)

    def disk_bytes(self) -> int:
        return self.disk

    def aet(self) -> str:
        return "CENTRE"


def fake_relay(local: FakeLocal, tmp_path: Path, max_local_gb: float = 1, clock: Any = time.time) -> Relay:
    path = tmp_path / "t.yaml"
    path.write_text(f"destination: {{url: 'http://10.0.0.9:8042'}}\ntransfer: {{mode: relay}}\n"
                    f"relay: {{max_local_gb: {max_local_gb}}}\n")  # fmt: skip
    return Relay(load_config(path), local, None, wake=lambda: None, clock=clock)  # type: ignore[arg-type]


def test_a_failed_local_delete_is_tried_again_until_it_goes(tmp_path: Path) -> None:
    """A copy left behind after its series completed is deleted on a later pass, not at every pass."""
    local = FakeLocal()
    relay = fake_relay(local, tmp_path)
    local.down = True
    relay.left_behind("1.2.3", now=100.0)
    assert relay.delete_left(101.0) == 0 and local.deleted == []  # not due yet: no request at all
    assert relay.delete_left(100.0 + DELETE_EVERY_S) == 0 and "1.2.3" in relay.left  # due, still failing
    local.down = False
    assert relay.delete_left(101.0 + DELETE_EVERY_S) == 0  # the failure put it off again
    assert relay.delete_left(100.0 + 2 * DELETE_EVERY_S) == 1 and local.deleted == ["1.2.3"] and not relay.left
    relay.left_behind("4.5.6", now=200.0)
    assert relay.delete_left(200.0, all_now=True) == 1 and local.deleted[-1] == "4.5.6"  # the run's last try


def test_the_bound_held_by_data_not_ours_stops_after_the_limit(tmp_path: Path) -> None:
    """Full with nothing of this run's held: a stop reason once the wait passes the limit; not while ours wait."""
    local = FakeLocal(disk=2 * 10**9)
    relay = fake_relay(local, tmp_path, max_local_gb=1)
    assert relay.full(10.0) and relay.stuck(10.0 + 29, 30) is None
    reason = relay.stuck(10.0 + 30, 30)
    assert reason is not None and "2.00 GB" in reason and "relay.max_local_gb (1)" in reason
    relay.hold("1.2.3", expected=10, first_issued_at=None)  # one of ours: a forward will free room
    assert relay.stuck(10.0 + 60, 30) is None


def test_a_destination_that_takes_no_forward_is_probed_by_one_series_and_stops_the_run_when_nothing_else_can(
    tmp_path: Path,
) -> None:
    """While the destination is out (down or full), one forward at a time probes it on the pause's back-off;
    after the limit the run stops only once no move is left (or the local bound is reached), never mid-forward."""
    now = [100.0]
    relay = fake_relay(FakeLocal(), tmp_path, clock=lambda: now[0])
    relay.hold("a", 10, None)
    relay.hold("b", 10, None)
    taken = relay.take(100.0)
    assert taken is not None and taken.uid == "a"
    assert relay.out.begin("forward failed: destination Orthanc stores nothing more (HTTP 507)")  # a new pause
    relay.hold("a", 10, None, at=100.5)
    assert relay.take(100.6) is None  # "b" waits: the probe is due 1 s after the failure
    assert relay.next_due() == 100.5
    taken = relay.take(101.0)
    assert taken is not None and taken.uid == "b" and relay.out.probe_at is None  # b is the probe
    now[0] = 101.5
    assert not relay.out.begin("again")  # the same pause, its wait doubled
    assert relay.take(103.0) is None and relay.take(103.5) is not None
    assert relay.gone(130.0, 30, moves_left=False) is None  # not out long enough
    reason = relay.gone(131.0, 30, moves_left=False)
    assert reason is not None and "took no forward for 31 s" in reason and "held whole at the local Orthanc" in reason
    assert relay.gone(131.0, 30, moves_left=True) is None  # the PACS's series still fill the local Orthanc
    relay.full_since = 120.0
    assert relay.gone(131.0, 30, moves_left=True) is not None  # ... unless it is full
    relay.busy = "a"
    assert relay.gone(131.0, 30, moves_left=False) is None  # never mid-forward
    relay.busy = None
    relay.out.end()
    assert relay.gone(500.0, 30, moves_left=False) is None


class BrokenStore:
    """A local Orthanc that holds the series but answers an archive with an error of its own (HTTP 500)."""

    url = "http://127.0.0.1:1"

    def clone(self) -> BrokenStore:
        return self

    def instance_sizes(self, uid: str) -> list[tuple[str, int]]:
        return [(f"i{n}", 1000) for n in range(3)]

    def archive(self, ids: list[str], timeout_s: float) -> bytes:
        raise OrthancError(500, f"{self.url}/tools/create-archive", "Inexistent file", details="storage area")


class EmptyDest:
    url = "http://127.0.0.1:2"

    def clone(self) -> EmptyDest:
        return self

    def count(self, uid: str) -> int:
        return 0

    def store_archive(self, archive: bytes, timeout_s: float) -> int:
        raise AssertionError("nothing to upload: the archive failed")


def test_an_error_of_the_local_orthanc_spends_an_attempt_and_is_no_destination_pause(tmp_path: Path) -> None:
    """A forward the local Orthanc fails with an error of its own counts against max_attempts (it would go
    round forever otherwise) and does not pause the destination."""
    path = tmp_path / "t.yaml"
    path.write_text("destination: {url: 'http://127.0.0.1:2'}\ntransfer: {mode: relay}\n")
    done: queue.SimpleQueue[None] = queue.SimpleQueue()
    relay = Relay(load_config(path), BrokenStore(), EmptyDest(), wake=lambda: done.put(None))  # type: ignore[arg-type]
    relay.hold("1.2.3", 3, None)
    held = relay.take(time.time())
    assert held is not None
    relay.start(held)
    done.get(timeout=10)
    [result] = relay.results()
    assert result.outcome == "short" and result.refused and not result.out, result
    assert "Inexistent file" in (result.reason or "")


def test_a_series_lost_at_the_local_orthanc_again_and_again_fails_instead_of_going_round(tmp_path: Path) -> None:
    """Held whole, then gone at its forward: moved again without spending an attempt, FREE_REQUEUES times in a
    run; the next loss fails it with that reason (a local Orthanc that keeps losing it would loop all night)."""
    relay = fake_relay(FakeLocal(), tmp_path)
    journal = Journal(tmp_path / "j.sqlite")
    uid = "1.2.826.0.1.3"
    journal.plan([(uid, "1.2.826.0.1", None, 2)], tmp_path / "series.csv")
    scheduler = Scheduler(relay.cfg, journal, None, None, relay=relay)  # type: ignore[arg-type]
    lost = "the local Orthanc holds 0 of 3 instances"
    for n in range(FREE_REQUEUES + 1):
        journal.transition(uid, State.PENDING, Event.HELD, "count=3 at local", received=3, expected=3)
        relay.hold(uid, 3, None)
        journal.transition(uid, State.HELD_LOCAL, Event.FORWARD, f"attempt={n + 1}")
        scheduler._forwarded(Forwarded(uid, "lost", 0, reason=lost))
        row = journal.get(uid)
        if n < FREE_REQUEUES:
            assert row.state is State.PENDING and row.attempts == 0, (n, row)
    assert row.state is State.FAILED, row
    assert row.reason == f"{lost} (lost at the local Orthanc {FREE_REQUEUES + 1} times in this run)"
    assert uid not in relay.held


class KeepsTwo(EmptyDest):
    """A destination that takes every upload and then holds only two instances of the series."""

    def __init__(self) -> None:
        self.uploads = 0

    def count(self, uid: str) -> int:
        return 2 if self.uploads else 0

    def store_archive(self, archive: bytes, timeout_s: float) -> int:
        self.uploads += 1
        return 3


class ReadableStore(BrokenStore):
    def archive(self, ids: list[str], timeout_s: float) -> bytes:
        return b"PK zip of " + ",".join(ids).encode()

    def delete_series(self, uid: str) -> None:
        self.deleted = uid


def test_a_destination_that_keeps_fewer_than_it_took_spends_an_attempt(tmp_path: Path) -> None:
    """Uploaded whole, counted short there: the series' attempt is spent (asked again it would go round forever),
    and the local copy stays."""
    dest = KeepsTwo()
    done = forward(ReadableStore(), dest, "1.2.3", 3, 10**6, 5.0)  # type: ignore[arg-type]
    assert dest.uploads == 1
    assert done.outcome == "short" and done.refused and not done.out and done.count == 2, done
    assert done.reason == "forward short: 2/3 at the destination"


class HasOne(EmptyDest):
    """A destination that holds the first instance of the series (a forward cut short) and takes the rest."""

    def __init__(self) -> None:
        self.archives: list[bytes] = []

    def count(self, uid: str) -> int:
        return 3 if self.archives else 1

    def instance_ids(self, uid: str) -> set[str]:
        return {"i0"}

    def store_archive(self, archive: bytes, timeout_s: float) -> int:
        self.archives.append(archive)
        return 2


def test_a_series_the_destination_holds_in_part_is_completed_with_the_rest_only(tmp_path: Path) -> None:
    dest = HasOne()
    done = forward(ReadableStore(), dest, "1.2.3", 3, 10**6, 5.0)  # type: ignore[arg-type]
    assert dest.archives == [b"PK zip of i1,i2"]
    assert done.outcome == "arrived" and done.sent == 2 and done.count == 3, done
