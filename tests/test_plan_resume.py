"""Planning is resumable: a process killed (-9) mid-plan leaves a journal whose re-run plans only the rest."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dicom_transfer import logs
from dicom_transfer.config import load_config
from dicom_transfer.journal import PLAN_CHUNK, Journal, file_digest
from dicom_transfer.report import status
from dicom_transfer.transfer import checked_batch, plan

REPO = Path(__file__).resolve().parent.parent
ROWS = 200_000

CHILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from dicom_transfer import logs
from dicom_transfer.batch import check_batch
from dicom_transfer.config import load_config
from dicom_transfer.journal import Journal
from dicom_transfer.transfer import plan
logs.configure(quiet=True)
batch, journal = Path(sys.argv[1]), Path(sys.argv[2])
plan(Journal(journal), batch, check_batch(batch), load_config(None), None)
"""


def write_batch(path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("SeriesInstanceUID,StudyInstanceUID\n")
        for i in range(ROWS):
            fh.write(f"1.2.826.0.1.3680043.2.1125.{(i * 7919) % ROWS}.2,1.2.826.0.1.3680043.2.1125.{i // 10}.1\n")


def meta(journal: Path) -> dict[str, str]:
    try:
        db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=0.2)
        try:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        return {}


def test_killed_mid_plan_the_rerun_plans_only_the_rest(tmp_path: Path) -> None:
    """kill -9 after two chunks: no planned_at, whole chunks kept; the re-run skips the file check,
    plans exactly the missing rows, in batch order, each once."""
    batch, journal = tmp_path / "big.csv", tmp_path / "big.journal.sqlite"
    write_batch(batch)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(batch), str(journal), str(REPO)])
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        mark = meta(journal).get("plan_at")
        if mark and int(mark.split()[0]) > 2 * PLAN_CHUNK:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(30) == -signal.SIGKILL, "the plan ended before it could be killed"

    killed = meta(journal)
    assert "planned_at" not in killed and killed["batch_sha256"] == file_digest(batch)
    with sqlite3.connect(journal) as db:
        done = db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
    assert done % PLAN_CHUNK == 0 and 0 < done < ROWS  # whole chunks only
    assert int(killed["plan_at"].split()[0]) == done + 1  # the mark: the last planned row's line
    reader = Journal(journal, readonly=True)  # `status` tells the plan is unfinished, and how far it got
    try:
        info = status(reader, time.time())
    finally:
        reader.close()
    assert info["plan"] == {"complete": False, "line": done + 1} and info["summary"]["total"] == done

    logs.configure(quiet=True)
    checked = checked_batch(batch, journal)  # the same file: hashed, not checked again
    assert (checked.rows, checked.sha256) == (ROWS, killed["batch_sha256"])
    j = Journal(journal)
    try:
        assert plan(j, batch, checked, load_config(None), None) == ROWS - done
        assert j.planned and j.meta("plan_at") is None
        lines = [line for (line,) in j.db.execute("SELECT batch_line FROM series ORDER BY seq")]
        assert lines == list(range(2, ROWS + 2))
        assert j.db.execute("SELECT COUNT(DISTINCT uid) FROM series").fetchone()[0] == ROWS
        assert j.counts()["pending"] == ROWS
        assert plan(j, batch, checked, load_config(None), None) == 0  # planned: nothing more
    finally:
        j.close()
