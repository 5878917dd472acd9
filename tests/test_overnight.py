"""Time windows and PHI-safe logs on a real run (real Orthanc processes, the CLI or the scheduler)."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import run_cli, start_cli, wait_complete
from test_transfer import series_count, setup_batch, write_config

from dicom_transfer.config import load_config
from dicom_transfer.journal import Journal
from dicom_transfer.orthanc import Destination, LocalOrthanc
from dicom_transfer.scheduler import Scheduler
from dicom_transfer.stack import Stack
from dicom_transfer.transfer import plan

pytestmark = pytest.mark.integration


def closed_window_yaml() -> str:
    """A one-minute window twelve hours from now (UTC): closed at the time of the test."""
    start = datetime.now(timezone.utc) + timedelta(hours=12)
    end = start + timedelta(minutes=1)
    return f"window: {{start: '{start:%H:%M}', end: '{end:%H:%M}', timezone: UTC}}\n"


def test_until_window_end_outside_window_exits_3_at_once(same: Stack, tmp_path: Path) -> None:
    """Started outside the window with --until-window-end: exit 3, nothing moved, journal planned."""
    series, batch = setup_batch(same, tmp_path, n=2, per=3)
    cfg = write_config(tmp_path / "t.yaml", same)
    with cfg.open("a") as f:
        f.write(closed_window_yaml())
    jobs = len(same.centre.rest.get("/jobs"))  # the session's Orthanc keeps earlier tests' jobs
    t0 = time.monotonic()
    res = run_cli("--batch", batch, "--config", cfg, "--until-window-end", "--json")
    assert res.returncode == 3, res.stderr
    assert time.monotonic() - t0 < 20
    assert json.loads(res.stdout)["pending"] == 2
    db = sqlite3.connect(tmp_path / "series.journal.sqlite")
    assert dict(db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall()) == {"pending": 2}
    assert len(same.centre.rest.get("/jobs")) == jobs
    assert all(series_count(same.centre, s.series_uid) == 0 for s in series)


class FakeClock:
    """Wall-clock time that the test can push forward."""

    def __init__(self, start: float) -> None:
        self.offset = start - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset


def test_window_closing_mid_series_drains_and_stops(same: Stack, tmp_path: Path) -> None:
    """When the window closes with a series in flight, it completes; nothing new is issued; stopped."""
    series, batch = setup_batch(same, tmp_path, n=3, per=20)
    cfg_path = write_config(tmp_path / "t.yaml", same, move_method="blocking")
    with cfg_path.open("a") as f:
        f.write("window: {start: '08:00', end: '17:00', timezone: Europe/Zurich}\n")
    cfg = load_config(cfg_path)
    zurich_noon = datetime(2026, 6, 10, 16, 59, 59, tzinfo=timezone(timedelta(hours=2))).timestamp()
    clock = FakeClock(zurich_noon)  # one second before the window closes
    journal = Journal(tmp_path / "j.sqlite", clock=clock)
    local = LocalOrthanc(same.centre.url)
    dest = Destination(same.centre.url)
    from dicom_transfer.batch import check_batch

    plan(journal, batch, check_batch(batch), cfg, local)

    def on_progress(counts: dict[str, int]) -> None:
        if counts["moving"] and clock() < zurich_noon + 2:
            clock.offset += 2  # the window closes while the first series moves

    scheduler = Scheduler(cfg, journal, local, dest, clock=clock, until_window_end=True, on_progress=on_progress)
    scheduler.run()
    result_counts = journal.counts()
    events = [e["event"] for e in reversed(journal.events(limit=100)) if e["uid"]]
    assert result_counts["complete"] == 1, result_counts  # the series in flight at the close
    assert result_counts["complete"] + result_counts["pending"] + result_counts["queried"] == 3
    assert events.count("issued") == result_counts["complete"]  # nothing issued after the close
    assert result_counts["moving"] == 0 and result_counts["verifying"] == 0  # in-flight drained


def test_logs_carry_no_patient_identifiers_or_password(same: Stack, tmp_path: Path) -> None:
    """A full run's console and JSON-lines logs never show PatientID, PatientName or the password."""
    series, batch = setup_batch(same, tmp_path, n=2, per=3)
    with batch.open("w") as f:  # the batch itself carries PatientIDs
        f.write("SeriesInstanceUID,StudyInstanceUID,PatientID\n")
        for s in series:
            f.write(f"{s.series_uid},{s.study_uid},{s.patient_id}\n")
    cfg = write_config(tmp_path / "t.yaml", same)
    secret = "s3cret-Passw0rd"
    log_file = tmp_path / "run.jsonl"
    res = run_cli(
        "--batch", batch, "--config", cfg, "--log-file", log_file, "--report", tmp_path / "r.json",
        env={"DICOM_TRANSFER_LOCAL_PASSWORD": secret},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = log_file.read_text().splitlines()
    assert any(json.loads(line)["event"] == "series.complete" for line in lines)
    everything = res.stdout + res.stderr + log_file.read_text() + (tmp_path / "r.json").read_text()
    for s in series:
        assert s.patient_id not in everything
        assert s.patient_name.split("^")[-1] not in everything
    assert secret not in everything
    shown = run_cli("--batch", batch, "--config", cfg, "--report", tmp_path / "phi.json", "--show-phi")
    assert shown.returncode == 0
    assert series[0].patient_id in (tmp_path / "phi.json").read_text()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_with_exit_3_and_resumes(same: Stack, tmp_path: Path, sig: str) -> None:
    """SIGINT/SIGTERM mid-batch: exit 3 with work left; the same command then completes (exit 0)."""
    import signal

    series, batch = setup_batch(same, tmp_path, n=8, per=30, seed=51)
    cfg = write_config(tmp_path / "t.yaml", same, pause_s=0.2)
    journal = tmp_path / "series.journal.sqlite"
    proc = start_cli("--batch", batch, "--config", cfg, "--json")
    wait_complete(journal, 2)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert 0 < json.loads(out)["pending"] < 8
    assert "Traceback" not in err
    again = run_cli("--batch", batch, "--config", cfg, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["complete"] == 8
    assert all(series_count(same.centre, s.series_uid) == 30 for s in series)


def test_unknown_timezone_is_exit_2_naming_the_key(same: Stack, tmp_path: Path) -> None:
    """A window in an unknown time zone: exit 2, the message names window.timezone, no journal."""
    _, batch = setup_batch(same, tmp_path, n=1, per=1)
    cfg = write_config(tmp_path / "t.yaml", same)
    with cfg.open("a") as f:
        f.write("window: {start: '20:00', end: '07:00', timezone: Mars/Olympus_Mons}\n")
    res = run_cli("--batch", batch, "--config", cfg)
    assert res.returncode == 2
    assert "window.timezone" in res.stderr and "Mars/Olympus_Mons" in res.stderr
    assert not (tmp_path / "series.journal.sqlite").exists()
