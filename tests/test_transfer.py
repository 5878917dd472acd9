"""The main job end to end on real Orthanc processes: CLI subprocess, journal, report."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import run_cli, start_cli, wait_complete

from bench.resilience import count_at
from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import SyntheticSeries, instance_bytes, make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration


def write_config(path: Path, stack: Stack, **transfer: object) -> Path:
    """A transfer.yaml pointing at the stack (local = centre; destination per topology)."""
    settings = {"stall_s": 2, "move_timeout_s": 60, "backoff_s": 0.2, **transfer}
    dest_url = f", url: {stack.destination.url}" if stack.dest is not None else ""
    path.write_text(
        f"local: {{url: {stack.centre.url}}}\n"
        "source: {modality: PACS}\n"
        f"destination: {{aet: {stack.destination_aet}{dest_url}}}\n"
        "transfer: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}\n"
    )
    return path


def series_count(stack_member, series_uid: str) -> int:
    return count_at(stack_member.rest, series_uid)


def assert_each_proven_before_the_next(db: sqlite3.Connection, n: int) -> None:
    """In-flight 1: each series' proof (finished_at) precedes the next move (issued_at), and its
    `arrived` event is written no later than the next `issued` (same transaction or before)."""
    rows = db.execute("SELECT uid, issued_at, finished_at FROM series ORDER BY issued_at").fetchall()
    assert len(rows) == n and all(r[1] is not None and r[2] is not None for r in rows), rows
    ids = {(u, e): i for i, u, e in db.execute("SELECT id, uid, event FROM events WHERE uid IS NOT NULL")}
    for (prev, _, proven_at), (nxt, issued_at, _) in zip(rows, rows[1:], strict=False):
        assert proven_at <= issued_at, (prev, nxt)
        assert ids[(prev, "arrived")] < ids[(nxt, "issued")], (prev, nxt)


def jobs_count(stack: Stack) -> int:
    return len(stack.centre.rest.get("/jobs"))


def setup_batch(
    stack: Stack, tmp_path: Path, n: int = 4, per: int = 10, seed: int = 7
) -> tuple[list[SyntheticSeries], Path]:
    series = make_series(n, per, seed=seed)
    upload(stack.pacs.rest, series)
    return series, write_batch_csv(series, tmp_path / "series.csv")


def test_happy_batch_same_topology(same: Stack, tmp_path: Path) -> None:
    """Every series arrives whole at the local Orthanc; exit 0; report says complete by count."""
    series, batch = setup_batch(same, tmp_path)
    cfg = write_config(tmp_path / "t.yaml", same)
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"] == {**report["summary"], "total": 4, "complete": 4, "failed": 0, "pending": 0}
    assert report["summary"]["instances"] == 40
    for row in report["series"]:
        assert (row["state"], row["expected"], row["received"], row["verified"]) == ("complete", 10, 10, "count")
    for s in series:
        assert series_count(same.centre, s.series_uid) == 10
    assert (tmp_path / "series.journal.sqlite").exists()
    assert "PatientID" not in (tmp_path / "r.json").read_text()


@pytest.mark.parametrize("method", ["retrieve-job", "blocking"])
def test_each_1_10_move_path(same: Stack, tmp_path: Path, method: str) -> None:
    """On Orthanc 1.10 both the query→retrieve job and the blocking move prove every series."""
    series, batch = setup_batch(same, tmp_path, n=3, per=7)
    for i in (1, 3):  # a partial series too: only the missing instances move
        same.centre.rest.post("/instances", content=instance_bytes(series[2], i))
    cfg = write_config(tmp_path / "t.yaml", same, move_method=method)
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 3
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    assert {m for (m,) in db.execute("SELECT move_method FROM series")} == {method}
    issued = [d for (d,) in db.execute("SELECT detail FROM events WHERE event='issued' ORDER BY id")]
    assert issued == ["attempt=1", "attempt=1", "attempt=1 instances=5"]
    assert_each_proven_before_the_next(db, 3)
    assert all(series_count(same.centre, s.series_uid) == 7 for s in series)


def test_separate_destination(separate: Stack, tmp_path: Path) -> None:
    """With local ≠ destination, the series land in the third Orthanc and are counted there."""
    series, batch = setup_batch(separate, tmp_path, n=3, per=6)
    cfg = write_config(tmp_path / "t.yaml", separate)
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["complete"], summary["instances"]) == (3, 18)
    for s in series:
        assert series_count(separate.dest, s.series_uid) == 6
        assert series_count(separate.centre, s.series_uid) == 0


def test_rerun_moves_nothing(same: Stack, tmp_path: Path) -> None:
    """A second run (same journal, then a fresh one) issues no C-MOVE and exits 0."""
    _, batch = setup_batch(same, tmp_path, n=3, per=5)
    cfg = write_config(tmp_path / "t.yaml", same)
    assert run_cli("--batch", batch, "--config", cfg).returncode == 0
    jobs = jobs_count(same)
    again = run_cli("--batch", batch, "--config", cfg, "--json")
    assert again.returncode == 0, again.stderr
    fresh = run_cli("--batch", batch, "--config", cfg, "--journal", tmp_path / "other.sqlite", "--json")
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["complete"] == 3
    assert jobs_count(same) == jobs  # no move job was created by either re-run
    events = sqlite3.connect(tmp_path / "other.sqlite").execute("SELECT event FROM events WHERE uid IS NOT NULL")
    assert {e for (e,) in events} == {"present"}


def test_partial_destination_moves_only_missing(same: Stack, tmp_path: Path) -> None:
    """A series half present at the destination is completed by moving only the missing instances."""
    series, batch = setup_batch(same, tmp_path, n=1, per=12)
    for i in range(0, 12, 2):  # half of it already there
        same.centre.rest.post("/instances", content=instance_bytes(series[0], i))
    assert series_count(same.centre, series[0].series_uid) == 6
    cfg = write_config(tmp_path / "t.yaml", same)
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    assert series_count(same.centre, series[0].series_uid) == 12
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    (detail,) = db.execute("SELECT detail FROM events WHERE event='issued'").fetchone()
    assert detail == "attempt=1 instances=6"


def test_missing_series_fails_others_complete(same: Stack, tmp_path: Path) -> None:
    """A series the PACS does not have fails with its reason; the rest complete; exit 1."""
    series, batch = setup_batch(same, tmp_path, n=2, per=4)
    with batch.open("a") as f:
        f.write(f"1.2.3.999.1,{series[0].study_uid}\n")
    cfg = write_config(tmp_path / "t.yaml", same)
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    by_uid = {r["SeriesInstanceUID"]: r for r in report["series"]}
    assert by_uid["1.2.3.999.1"]["state"] == "failed"
    assert by_uid["1.2.3.999.1"]["reason"] == "not found at source"
    assert report["summary"]["complete"] == 2 and report["summary"]["failed"] == 1
    assert "not found at source" in res.stderr


def test_series_without_study_uid_is_found(same: Stack, tmp_path: Path) -> None:
    """A batch row with only SeriesInstanceUID gets its study from a C-FIND and transfers."""
    series = make_series(2, 3, seed=11)
    upload(same.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv", with_study=False)
    res = run_cli(
        "--batch", batch, "--config", write_config(tmp_path / "t.yaml", same), "--report", tmp_path / "r.json"
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["StudyInstanceUID"] for r in report["series"]] == [s.study_uid for s in series]


def test_resume_after_kill_9(same: Stack, tmp_path: Path) -> None:
    """kill -9 mid-batch, same command again: resumes, all complete, none complete while short."""
    series, batch = setup_batch(same, tmp_path, n=12, per=40, seed=21)
    cfg = write_config(tmp_path / "t.yaml", same)
    journal = tmp_path / "series.journal.sqlite"
    proc = start_cli("--batch", batch, "--config", cfg)
    wait_complete(journal, 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    db = sqlite3.connect(journal)
    states = dict(db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
    assert 3 <= states.get("complete", 0) < 12, states
    # Nothing marked complete holds fewer instances than expected at the destination.
    for uid, expected in db.execute("SELECT uid, expected FROM series WHERE state='complete'"):
        assert series_count(same.centre, uid) >= expected
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 12
    for s in series:
        assert series_count(same.centre, s.series_uid) == 40


def test_crash_between_a_proof_and_its_record(same: Stack, tmp_path: Path) -> None:
    """The state a crash leaves after a series was proven and the next move sent, before both were
    written (one transaction): the proven series still `moving`, the next `queried` and partly
    delivered. The re-run counts the first (complete, no move); the second, left `queried`, is
    counted before it is moved: found growing since its query, it settles, is queried again and
    only its missing instances are moved."""
    series, batch = setup_batch(same, tmp_path, n=2, per=10, seed=31)
    cfg = write_config(tmp_path / "t.yaml", same)
    assert run_cli("--batch", batch, "--config", cfg).returncode == 0
    proven, sent = series[0].series_uid, series[1].series_uid
    journal = tmp_path / "series.journal.sqlite"
    with closing(sqlite3.connect(journal)) as db, db:
        db.execute("UPDATE series SET state='moving', verified=NULL, finished_at=NULL WHERE uid=?", (proven,))
        db.execute(
            "UPDATE series SET state='queried', attempts=0, received=0, verified=NULL, issued_at=NULL,"
            " finished_at=NULL WHERE uid=?",
            (sent,),
        )
        start = db.execute("SELECT MAX(id) FROM events").fetchone()[0]
    found = same.centre.rest.post("/tools/find", {"Level": "Instance", "Query": {"SeriesInstanceUID": sent}})
    for instance in sorted(found)[:4]:  # the move was under way: 6 of 10 arrived
        same.centre.rest.delete(f"/instances/{instance}")
    assert series_count(same.centre, sent) == 6
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 2
    with closing(sqlite3.connect(journal)) as db:
        sql = "SELECT uid, event, detail FROM events WHERE id > ? AND uid IS NOT NULL ORDER BY id"
        events = db.execute(sql, (start,))
        trail = [(uid == proven, event, detail) for uid, event, detail in events]
    assert [t for t in trail if t[0]] == [(True, "reclaim", "count=10"), (True, "arrived", "count=10")]
    assert [t[1:] for t in trail if not t[0]] == [
        ("short", "arriving at the destination (0 -> 6 instances)"), ("retry_due", None),
        ("queried", "expected=10 have=6"), ("issued", "attempt=1 instances=4"), ("arrived", "count=10"),
    ]  # fmt: skip
    assert series_count(same.centre, proven) == 10 and series_count(same.centre, sent) == 10


def test_status_reads_journal(same: Stack, tmp_path: Path) -> None:
    """`status --json` gives the report summary keys plus in_flight; exit 0."""
    _, batch = setup_batch(same, tmp_path, n=2, per=3)
    cfg = write_config(tmp_path / "t.yaml", same)
    assert run_cli("--batch", batch, "--config", cfg).returncode == 0
    res = run_cli("status", "--journal", tmp_path / "series.journal.sqlite", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["summary"]
    assert {"total", "complete", "failed", "pending", "instances", "seconds", "in_flight"} <= set(summary)
    assert (summary["total"], summary["complete"], summary["in_flight"]) == (2, 2, 0)
    text = run_cli("status", "--journal", tmp_path / "series.journal.sqlite")
    assert text.returncode == 0 and "2 complete" in text.stdout


def test_bad_csv_exit_2_nothing_written(same: Stack, tmp_path: Path) -> None:
    """A bad UID is reported as file:line:col, exit 2, and no journal is created."""
    batch = tmp_path / "series.csv"
    batch.write_text("SeriesInstanceUID,StudyInstanceUID\n1.2.3,1.2.4\n1.2.x,1.2.4\n")
    res = run_cli("--batch", batch, "--config", write_config(tmp_path / "t.yaml", same))
    assert res.returncode == 2
    assert f"{batch}:3:1: SeriesInstanceUID: '1.2.x' is not a valid UID" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "series.journal.sqlite").exists()


def test_bad_config_exit_2_names_key(same: Stack, tmp_path: Path) -> None:
    """A wrong config value is reported with its key path, exit 2, no journal."""
    _, batch = setup_batch(same, tmp_path, n=1, per=1)
    cfg = write_config(tmp_path / "t.yaml", same, max_in_flight=0)
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2
    assert "transfer.max_in_flight" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "series.journal.sqlite").exists()


def test_unknown_source_modality_exit_2(same: Stack, tmp_path: Path) -> None:
    """A source alias the local Orthanc does not know is a config error naming source.modality."""
    _, batch = setup_batch(same, tmp_path, n=1, per=1)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"local: {{url: {same.centre.url}}}\nsource: {{modality: NOPE}}\n")
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2
    assert "source.modality" in res.stderr and "NOPE" in res.stderr
    assert not (tmp_path / "series.journal.sqlite").exists()


def test_unreachable_local_exit_2(tmp_path: Path) -> None:
    """A local Orthanc that does not answer at start: exit 2 naming local.url, nothing written."""
    batch = tmp_path / "series.csv"
    batch.write_text("SeriesInstanceUID\n1.2.3\n")
    cfg = tmp_path / "t.yaml"
    cfg.write_text("local: {url: 'http://127.0.0.1:9'}\n")
    res = run_cli("--batch", batch, "--config", cfg, timeout=60)
    assert res.returncode == 2
    assert "local.url" in res.stderr and "does not answer" in res.stderr
    assert not (tmp_path / "series.journal.sqlite").exists()


def test_echo_reports_each_party(same: Stack, tmp_path: Path) -> None:
    """`echo` checks local and destination REST and C-ECHOes the source."""
    res = run_cli("echo", "--config", write_config(tmp_path / "t.yaml", same))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == 3 and "source PACS (C-ECHO)" in res.stdout


def test_study_rows_unknown_study_fails_loudly(same: Stack, tmp_path: Path) -> None:
    """A study row expands to its series; a study the PACS lacks is reported failed, exit 1."""
    series = make_series(2, 3, seed=31)
    upload(same.pacs.rest, series)
    batch = tmp_path / "studies.csv"
    batch.write_text(f"StudyInstanceUID\n{series[0].study_uid}\n1.2.3.4.5.6\n")
    cfg = write_config(tmp_path / "t.yaml", same)
    res = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["SeriesInstanceUID"] for r in report["series"]] == [series[0].series_uid]
    assert report["series"][0]["state"] == "complete"
    failed = [s for s in report["studies"] if s["state"] == "failed"]
    assert [(s["StudyInstanceUID"], s["reason"]) for s in failed] == [("1.2.3.4.5.6", "not found at source")]
    assert "1.2.3.4.5.6 (line 3): not found at source" in res.stderr


def test_changed_filter_on_rerun_is_refused(same: Stack, tmp_path: Path) -> None:
    """Study rows expanded under one filter are not silently kept under another: exit 2."""
    series = make_series(1, 2, seed=32)
    upload(same.pacs.rest, series)
    batch = tmp_path / "studies.csv"
    batch.write_text(f"StudyInstanceUID\n{series[0].study_uid}\n")
    cfg = write_config(tmp_path / "t.yaml", same)
    assert run_cli("--batch", batch, "--config", cfg).returncode == 0
    with cfg.open("a") as f:
        f.write("filter: {modalities: {include: [MR]}}\n")
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2
    assert "filter: changed since" in res.stderr


def test_source_down_mid_batch_spends_no_attempts(separate: Stack, tmp_path: Path) -> None:
    """The PACS gone for a while: the run pauses, probes, resumes; with max_attempts 1 nothing fails."""
    series, batch = setup_batch(separate, tmp_path, n=6, per=30, seed=41)
    cfg = write_config(tmp_path / "t.yaml", separate, max_attempts=1, pause_s=0.3)
    journal = tmp_path / "series.journal.sqlite"
    proc = start_cli("--batch", batch, "--config", cfg, "--json")
    wait_complete(journal, 1)
    separate.pacs.kill()  # the hospital side disappears mid-batch
    time.sleep(4)
    separate.pacs.restart()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["complete"] == 6
    events = [e for (e,) in sqlite3.connect(journal).execute("SELECT event FROM events WHERE uid IS NULL")]
    assert "source.unreachable" in events and "source.reachable" in events
    for s in series:
        assert series_count(separate.dest, s.series_uid) == 30
