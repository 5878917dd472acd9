"""One journal, one run; overlapping batches; a full destination; a broken invariant.

Real Orthanc processes, a real misbehaving PACS, the CLI as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import _new_orthanc_command, run_cli, start_cli, wait_complete
from peers.pacs import MisbehavingPacs

from bench.resilience import count_at, write_config
from dicom_transfer.runlock import lock_path
from dicom_transfer.stack import OrthancProcess, OrthancSpec, Stack, launch_orthanc
from dicom_transfer.stack import _stop_all as stop_all
from dicom_transfer.stack import _wait_all as wait_all
from dicom_transfer.synthetic import SyntheticSeries, make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration


@pytest.fixture
def slow_pacs(same: Stack) -> Iterator[tuple[MisbehavingPacs, list[SyntheticSeries]]]:
    """A PACS taking ~40 ms a series (4 instances, 10 ms each), registered in the centre as BADPACS."""
    series = make_series(20, 4, seed=211, rows=16, columns=16)
    pacs = MisbehavingPacs(series, store_delay_s=0.01).start()
    pacs.register_in(same.centre)
    yield pacs, series
    pacs.stop()
    assert not pacs.errors, pacs.errors


def wait_for_holder(journal: Path, pid: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = json.loads(lock_path(journal).read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("pid") == pid:
            return info
        time.sleep(0.01)
    raise AssertionError(f"run {pid} never took the journal lock")


def events(journal: Path, name: str) -> list[tuple[Any, ...]]:
    """(uid, detail) of every `name` event; empty while the run has not made its tables yet."""
    try:
        with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute("SELECT uid, detail FROM events WHERE event=? ORDER BY id", (name,)).fetchall()
    except sqlite3.OperationalError:
        return []


def states(journal: Path) -> dict[str, int]:
    """Series per state; empty while the run has not made its tables yet."""
    try:
        with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10)) as db:
            return dict(db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall())
    except sqlite3.OperationalError:
        return {}


def test_second_run_on_the_same_journal_refuses_at_once(same: Stack, slow_pacs, tmp_path: Path) -> None:
    """Twin start: the second run exits 2 at once naming the holder and changes nothing; the first completes all."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE")
    journal = tmp_path / "j.sqlite"
    first = start_cli("--batch", batch, "--config", cfg, "--journal", journal)
    try:
        held = wait_for_holder(journal, first.pid)
        began = time.monotonic()
        second = run_cli("--batch", batch, "--config", cfg, "--journal", journal)
        took = time.monotonic() - began
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    finally:
        out, err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    started = time.strftime("%H:%M:%S", time.localtime(held["started_at"]))
    assert (
        f"journal {journal} is in use by another run (pid {first.pid}, started {started} on host {held['host']});"
        f" status: main.py status --journal {journal}"
    ) in second.stderr.replace("\n", "")
    assert took < 5, took  # the interpreter's start-up, nothing more
    assert first.returncode == 0, err
    assert states(journal) == {"complete": 20}
    assert len(events(journal, "run.start")) == 1  # the second never wrote
    assert all(pacs.moves[s.series_uid] == 1 for s in series), pacs.moves
    assert not lock_path(journal).exists()  # removed by the holder on its way out


def test_status_works_beside_the_run_and_names_it(same: Stack, slow_pacs, tmp_path: Path) -> None:
    """`status --json` answers while a run holds the journal and says which process runs it."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE")
    journal = tmp_path / "j.sqlite"
    run = start_cli("--batch", batch, "--config", cfg, "--journal", journal)
    try:
        wait_for_holder(journal, run.pid)
        wait_complete(journal, 1)
        status = run_cli("status", "--journal", journal, "--json")
    finally:
        run.communicate(timeout=120)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["run"]["pid"] == run.pid
    assert run.returncode == 0
    after = run_cli("status", "--journal", journal, "--json")
    assert json.loads(after.stdout)["run"] is None


def test_kill_9_frees_the_journal_for_the_next_run(same: Stack, slow_pacs, tmp_path: Path) -> None:
    """kill -9 of the holder frees the lock at once: the next start reclaims and completes every series."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE")
    journal = tmp_path / "j.sqlite"
    first = start_cli("--batch", batch, "--config", cfg, "--journal", journal)
    wait_for_holder(journal, first.pid)
    assert wait_complete(journal, 3) >= 3
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert lock_path(journal).exists()  # left behind by kill -9, and harmless
    again = run_cli("--batch", batch, "--config", cfg, "--journal", journal)
    assert again.returncode == 0, again.stderr
    assert states(journal) == {"complete": 20}
    assert all(count_at(same.centre.rest, s.series_uid) == 4 for s in series)


def test_overlapping_batches_on_two_journals_move_no_series_twice(
    same: Stack, slow_pacs, tmp_path: Path
) -> None:
    """Two journals listing the same series, started together: every C-MOVE at the source names a new series."""
    pacs, series = slow_pacs
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE", max_in_flight=2)
    batch_a = write_batch_csv(series, tmp_path / "a.csv")
    batch_b = write_batch_csv(series[4:] + series[:4], tmp_path / "b.csv")  # overlapping, another order
    a = start_cli("--batch", batch_a, "--config", cfg)
    b = start_cli("--batch", batch_b, "--config", cfg)
    out_a, err_a = a.communicate(timeout=120)
    out_b, err_b = b.communicate(timeout=120)
    assert (a.returncode, b.returncode) == (0, 0), (err_a, err_b)
    assert states(tmp_path / "a.journal.sqlite") == {"complete": 20}
    assert states(tmp_path / "b.journal.sqlite") == {"complete": 20}
    moved_twice = {uid: n for uid, n in pacs.moves.items() if n > 1}
    assert not moved_twice, moved_twice
    assert sum(pacs.moves.values()) == 20
    waited = events(tmp_path / "a.journal.sqlite", "short") + events(tmp_path / "b.journal.sqlite", "short")
    assert all("another run" in d or "arriving" in d for _, d in waited), waited


def test_a_journal_changed_behind_the_run_is_an_internal_error_not_bad_input(
    same: Stack, tmp_path: Path
) -> None:
    """A guarded transition that finds another state exits 1 naming the series and both states, never 2."""
    series = make_series(1, 4, seed=223, rows=16, columns=16)
    pacs = MisbehavingPacs(series, hang=True).start()
    try:
        pacs.register_in(same.centre)
        batch = write_batch_csv(series, tmp_path / "series.csv")
        cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE")
        journal = tmp_path / "j.sqlite"
        run = start_cli("--batch", batch, "--config", cfg, "--journal", journal)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (journal.exists() and states(journal).get("moving") == 1):
            time.sleep(0.02)
        with closing(sqlite3.connect(journal, timeout=10)) as db:  # someone edits the journal by hand
            db.execute("UPDATE series SET state='failed', reason='edited' WHERE state='moving'")
            db.commit()
        pacs.hang = False
        _, err = run.communicate(timeout=60)
    finally:
        pacs.stop()
    assert run.returncode == 1, err
    uid = series[0].series_uid
    assert f"internal error: series {uid}: event 'arrived' expected state 'moving'" in err.replace("\n", "")
    assert "holds 'failed'" in err
    assert "Traceback" not in err


# -- a destination that cannot store ------------------------------------------------------


@pytest.fixture
def full_stack(tmp_path: Path) -> Iterator[tuple[OrthancProcess, OrthancProcess, OrthancProcess]]:
    """PACS and local Orthanc 1.10.1, destination Orthanc ≥ 1.12 capped at 1 MB with MaximumStorageMode Reject."""
    new = _new_orthanc_command()
    pacs, centre, dest = (OrthancSpec.plan(n, a) for n, a in (("pacs", "HOSPITAL"), ("centre", "CENTRE"),
                                                             ("dest", "DEST")))  # fmt: skip
    launched = [
        launch_orthanc(pacs, tmp_path, {"DEST": dest.modality}),
        launch_orthanc(centre, tmp_path, {"PACS": pacs.modality}),
        launch_orthanc(dest, tmp_path, {"PACS": pacs.modality}, command=new,
                       extra_config={"MaximumStorageSize": 1, "MaximumStorageMode": "Reject"}),
    ]  # fmt: skip
    wait_all(launched, 30)
    yield launched[0], launched[1], launched[2]
    stop_all(launched, kill=True)


def free_space(dest: OrthancProcess, filler: SyntheticSeries) -> None:
    """Delete the filler patient from the destination."""
    for patient in dest.rest.get("/patients"):
        if dest.rest.get(f"/patients/{patient}")["MainDicomTags"]["PatientID"] == filler.patient_id:
            dest.rest.delete(f"/patients/{patient}")


def test_destination_full_pauses_without_failing_then_the_same_command_resumes(
    full_stack, tmp_path: Path
) -> None:
    """Destination full mid-batch: exit 3, no failed series, no attempt spent, one destination.full; freed: exit 0."""
    pacs, centre, dest = full_stack
    filler = make_series(1, 70, seed=227)  # ~0.6 of the 1 MB the destination may hold
    upload(dest.rest, filler)
    series = make_series(8, 10, seed=229)  # ~0.7 MB more: the destination fills up mid-batch
    upload(pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    journal = tmp_path / "j.sqlite"
    cfg = write_config(tmp_path / "t.yaml", centre.url, dest_aet="DEST", source="PACS", dest_url=dest.url,
                       unreachable_s=3, max_attempts=2)  # fmt: skip
    first = run_cli("--batch", batch, "--config", cfg, "--journal", journal, "--report", tmp_path / "r.json")
    assert first.returncode == 3, first.stderr
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["failed"] == 0 and 0 < summary["complete"] < 8, summary
    assert "the destination stored nothing for" in first.stderr and "storage full" in first.stderr
    full = events(journal, "destination.full")
    assert len(full) == 1 and "of 1 MB used" in full[0][1], full
    with closing(sqlite3.connect(journal)) as db:
        spent = db.execute("SELECT MAX(attempts) FROM series WHERE state != 'complete'").fetchone()[0]
    assert spent == 0  # given back: the destination's fault, not the series'
    # Space is freed: the same command completes the batch.
    free_space(dest, filler[0])
    again = run_cli("--batch", batch, "--config", cfg, "--journal", journal, "--report", tmp_path / "r2.json")
    assert again.returncode == 0, again.stderr
    assert states(journal) == {"complete": 8}
    assert all(count_at(dest.rest, s.series_uid) == 10 for s in series)


def test_destination_full_frees_up_during_the_run(full_stack, tmp_path: Path) -> None:
    """Space freed while the run is paused on a full destination: the run resumes by itself and exits 0."""
    pacs, centre, dest = full_stack
    filler = make_series(1, 70, seed=231)
    upload(dest.rest, filler)
    series = make_series(8, 10, seed=233)
    upload(pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    journal = tmp_path / "j.sqlite"
    cfg = write_config(tmp_path / "t.yaml", centre.url, dest_aet="DEST", source="PACS", dest_url=dest.url,
                       unreachable_s=60)
    run = start_cli("--batch", batch, "--config", cfg, "--journal", journal)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (journal.exists() and events(journal, "destination.full")):
            time.sleep(0.1)
        assert events(journal, "destination.full")
        # `status` beside the paused run says what it waits for, and since when.
        shown = json.loads(run_cli("status", "--journal", journal, "--json").stdout)["paused"]
        assert [(p["party"], p["event"]) for p in shown] == [("destination", "destination.full")], shown
        assert "of 1 MB used" in shown[0]["why"] and shown[0]["since"]
        text = run_cli("status", "--journal", journal).stdout
        assert "paused    destination.full since " in text and "MaximumStorageSize" in text, text
        free_space(dest, filler[0])
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
    assert run.returncode == 0, err
    assert states(journal) == {"complete": 8}
    assert len(events(journal, "destination.full")) == 1
    assert events(journal, "destination.stores")
    assert json.loads(run_cli("status", "--journal", journal, "--json").stdout)["paused"] == []


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`: a real file system that fills up (mounting needs root, as CI has)."""
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its file system refuses (ENOSPC); the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_journal_disk_stops_cleanly_and_resumes(same: Stack, tmp_path: Path) -> None:
    """The journal's disk fills mid-run (another program): exit 3 naming the journal and the full disk, no
    traceback, nothing failed; once space is freed the same command completes, every series moved once
    (the series whose move was sent but not recorded is counted before it is moved again)."""
    series = make_series(40, 2, seed=213, rows=16, columns=16)
    pacs = MisbehavingPacs(series, store_delay_s=0.02).start()  # ~40 ms a series: the fill lands mid-run
    try:
        pacs.register_in(same.centre)
        batch = write_batch_csv(series, tmp_path / "series.csv")
        cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE")
        with small_disk(tmp_path / "disk", "8M") as disk:
            journal = disk / "j.sqlite"
            args = ("--batch", batch, "--config", cfg, "--journal", journal)
            run = start_cli(*args)
            try:
                assert wait_complete(journal, 5) >= 5
                filler = fill(disk)
            finally:
                out, err = run.communicate(timeout=120)
            assert run.returncode == 3, err[-3000:]
            assert f"journal {journal}: the disk is full" in err.replace("\n", "") and "Traceback" not in err, err
            assert "journal.disk_low" in err  # said at the start: 8 MB is less than the journal may need
            done = states(journal)
            assert "failed" not in done and 5 <= done.get("complete", 0) < 40, done
            filler.unlink()
            again = run_cli(*args, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert all(count_at(same.centre.rest, s.series_uid) == 2 for s in series)
        assert all(pacs.moves[s.series_uid] == 1 for s in series), pacs.moves  # the stop moved nothing twice
    finally:
        pacs.stop()


def test_a_destination_whose_disk_fills_pauses_then_resumes_by_itself(tmp_path: Path) -> None:
    """The destination's disk fills mid-run (no MaximumStorageSize: it cannot say so; the Orthanc PACS answers
    0xC000): after three empty moves in a row the run pauses on the destination instead of failing the rest of
    the batch; once space is freed the next move is the probe, the run resumes by itself, nothing failed."""
    with small_disk(tmp_path / "dest-db", "24M") as disk:  # the destination's storage and index
        specs = [OrthancSpec.plan(n, a) for n, a in (("pacs", "HOSPITAL"), ("centre", "CENTRE"), ("dest", "DEST"))]
        pacs_spec, centre_spec, dest_spec = specs
        launched = [
            launch_orthanc(pacs_spec, tmp_path, {"DEST": dest_spec.modality}),
            launch_orthanc(centre_spec, tmp_path, {"PACS": pacs_spec.modality}),
            launch_orthanc(dest_spec, tmp_path, {"PACS": pacs_spec.modality}),
        ]
        try:
            wait_all(launched, 30)
            pacs, centre, dest = launched
            series = make_series(16, 10, seed=235, rows=128, columns=128)  # ~0.33 MB a series
            upload(pacs.rest, series)
            batch = write_batch_csv(series, tmp_path / "series.csv")
            journal = tmp_path / "j.sqlite"
            cfg = write_config(tmp_path / "t.yaml", centre.url, dest_aet="DEST", source="PACS", dest_url=dest.url,
                               unreachable_s=120, max_attempts=2)  # fmt: skip
            run = start_cli("--batch", batch, "--config", cfg, "--journal", journal)
            try:
                assert wait_complete(journal, 3) >= 3
                filler = fill(disk)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not events(journal, "destination.full"):
                    time.sleep(0.1)
                full = events(journal, "destination.full")
                assert full and "delivered nothing" in full[0][1] and "0xC000" in full[0][1], full
                assert "failed" not in states(journal)
                filler.unlink()
                _, err = run.communicate(timeout=180)
            finally:
                if run.poll() is None:
                    os.kill(run.pid, signal.SIGKILL)
            assert run.returncode == 0, err[-3000:]
            assert states(journal) == {"complete": 16}
            assert all(count_at(dest.rest, s.series_uid) == 10 for s in series)
            assert events(journal, "destination.stores")
        finally:
            stop_all(launched, kill=True)


def test_a_report_that_finds_no_room_is_a_warning_and_the_same_command_writes_it(
    same: Stack, slow_pacs, tmp_path: Path
) -> None:
    """--report on a full disk: the batch completes (exit 0), report.unwritten says what to do, no traceback;
    with room again the same command moves nothing and writes the report."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE")
    with small_disk(tmp_path / "out", "1M") as disk:
        filler = fill(disk)
        args = ("--batch", batch, "--config", cfg, "--journal", tmp_path / "j.sqlite", "--report", disk / "r.json")
        first = run_cli(*args)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "report.unwritten" in first.stderr and "Traceback" not in first.stderr, first.stderr[-3000:]
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no report, no half-written one
        filler.unlink()
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((disk / "r.json").read_text())["summary"]["complete"] == 20
    assert all(pacs.moves[s.series_uid] == 1 for s in series)


STEP_ON_DISK = {  # a step whose output lies on `disk`: its config section and the key the stop names
    "export": ("export: {{dir: {disk}/out}}\n", "export.dir"),
    "tags": ("tags: {{file: {disk}/tags.csv, keywords: [SOPInstanceUID]}}\n", "tags.file"),
    "nifti": ("nifti: {{dir: {disk}/nifti}}\n", "nifti.dir"),
}


def log_events(path: Path) -> list[str]:
    """The events of a --log-file (JSON lines); empty before the run writes one."""
    try:
        return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def steps_of(journal: Path, step: str) -> dict[str, int]:
    out = run_cli("status", "--journal", journal, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["steps"][step]


@pytest.mark.parametrize("step", list(STEP_ON_DISK))
def test_a_step_whose_disk_is_full_waits_while_the_moves_go_on(
    same: Stack, slow_pacs, tmp_path: Path, step: str
) -> None:
    """The step's disk is full from the start: every series is still moved and proven (the night's moves are
    not lost), no step fails or spends an attempt, steps.no_room is said once, and the run stops with exit 3
    naming the config key after transfer.unreachable_s; with room again the same command does the steps
    and moves nothing."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE", unreachable_s=2)
    journal = tmp_path / "j.sqlite"
    section, key = STEP_ON_DISK[step]
    with small_disk(tmp_path / "disk", "1M") as disk:
        (disk / "out").mkdir()
        (disk / "nifti").mkdir()
        cfg.write_text(cfg.read_text() + section.format(disk=disk))
        filler = fill(disk)
        args = ("--batch", batch, "--config", cfg, "--journal", journal)
        first = run_cli(*args, "--log-file", tmp_path / "first.jsonl")
        assert first.returncode == 3, first.stderr[-3000:]
        assert f"stopped: {key}: no room on its disk" in first.stderr.replace("\n", ""), first.stderr[-3000:]
        assert "Traceback" not in first.stderr
        assert states(journal) == {"complete": 20}  # the moves went on
        said = log_events(tmp_path / "first.jsonl")
        assert said.count("steps.no_room") == 1 and "step.failed" not in said, said
        assert steps_of(journal, step) == {"done": 0, "failed": 0, "pending": 20}
        with closing(sqlite3.connect(journal)) as db:
            assert db.execute("SELECT MAX(attempts) FROM steps").fetchone()[0] == 0  # no attempt spent
        filler.unlink()
        again = run_cli(*args, "--log-file", tmp_path / "again.jsonl")
        assert again.returncode == 0, again.stderr[-3000:]
        assert steps_of(journal, step) == {"done": 20, "failed": 0, "pending": 0}
        if step == "export":
            files = [p for p in (disk / "out").rglob("*") if p.is_file()]
            assert len(files) == 80 and all(p.stat().st_size > 0 and not p.name.endswith(".part") for p in files)
        elif step == "tags":
            assert len((disk / "tags.csv").read_text().splitlines()) == 1 + 80  # header + a row per instance
        else:
            assert len(list((disk / "nifti").glob("*.nii*"))) == 20
    assert all(pacs.moves[s.series_uid] == 1 for s in series), pacs.moves


def test_a_step_disk_freed_during_the_run_resumes_by_itself(same: Stack, slow_pacs, tmp_path: Path) -> None:
    """Space freed while the steps wait: a probe finds it (steps.room) and the same run finishes them, exit 0."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE", unreachable_s=120)
    journal, log = tmp_path / "j.sqlite", tmp_path / "run.jsonl"
    with small_disk(tmp_path / "disk", "1M") as disk:
        (disk / "out").mkdir()
        cfg.write_text(cfg.read_text() + f"export: {{dir: {disk}/out}}\n")
        filler = fill(disk)
        run = start_cli("--batch", batch, "--config", cfg, "--journal", journal, "--log-file", log)
        try:
            deadline = time.monotonic() + 60
            while "steps.no_room" not in log_events(log) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "steps.no_room" in log_events(log)
            filler.unlink()
            _, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                os.kill(run.pid, signal.SIGKILL)
        assert run.returncode == 0, err[-3000:]
        said = log_events(log)
        assert said.count("steps.no_room") == 1 and "steps.room" in said and "step.failed" not in said, said
        assert steps_of(journal, "export") == {"done": 20, "failed": 0, "pending": 0}
        assert len([p for p in (disk / "out").rglob("*") if p.is_file()]) == 80
    assert all(pacs.moves[s.series_uid] == 1 for s in series), pacs.moves


def test_a_changed_export_that_finds_no_room_is_not_counted_done(same: Stack, slow_pacs, tmp_path: Path) -> None:
    """Exported once, then export.path changed (every series due again) on a disk now full: the steps stay
    pending (exit 3), not done with the new settings on the strength of the old export."""
    pacs, series = slow_pacs
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, dest_aet="CENTRE", unreachable_s=2)
    base = cfg.read_text()
    journal = tmp_path / "j.sqlite"
    args = ("--batch", batch, "--config", cfg, "--journal", journal)
    with small_disk(tmp_path / "disk", "1M") as disk:
        cfg.write_text(base + f"export: {{dir: {disk}/out}}\n")
        first = run_cli(*args)
        assert first.returncode == 0, first.stderr[-3000:]
        assert steps_of(journal, "export") == {"done": 20, "failed": 0, "pending": 0}
        cfg.write_text(base + f"export: {{dir: {disk}/out, path: 'again/{{SOPInstanceUID}}.dcm'}}\n")
        fill(disk)
        second = run_cli(*args)
        assert second.returncode == 3, second.stderr[-3000:]
        assert "stopped: export.dir: no room on its disk" in second.stderr.replace("\n", "")
        assert steps_of(journal, "export") == {"done": 0, "failed": 0, "pending": 20}
    assert all(pacs.moves[s.series_uid] == 1 for s in series), pacs.moves
