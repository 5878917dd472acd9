"""The journal lock, the per-series claims and the pause logic, without servers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dicom_transfer.errors import JournalInUse
from dicom_transfer.pause import LONGEST_PROBE_S, Pause
from dicom_transfer.runlock import JournalLock, SeriesClaims, holder, lock_path


def test_second_lock_on_one_journal_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """While one JournalLock is held, a second refuses with JournalInUse (exit 2) naming pid and host."""
    journal = tmp_path / "j.sqlite"
    with JournalLock(journal, clock=lambda: 0.0):
        with pytest.raises(JournalInUse) as info:
            JournalLock(journal).acquire()
        assert f"pid {os.getpid()}" in str(info.value) and info.value.exit_code == 2
        assert f"status: main.py status --journal {journal}" in str(info.value)
        assert holder(journal)["pid"] == os.getpid()
    assert not lock_path(journal).exists() and not journal.exists()  # nothing left, nothing created
    JournalLock(journal).acquire()  # free again


def test_a_lock_file_left_by_a_dead_process_takes_nobody(tmp_path: Path) -> None:
    """A lock file whose pid is gone (kill -9) names no holder and is taken at once."""
    journal = tmp_path / "j.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(journal).write_text(f'{{"pid": {int(dead.stdout)}, "started_at": 0, "host": "{os.uname()[1]}"}}')
    assert holder(journal) is None
    lock = JournalLock(journal)
    lock.acquire()
    assert holder(journal)["pid"] == os.getpid()
    lock.release()


def _claim_in_child(tmp_dir: Path, uid: str) -> subprocess.Popen[str]:
    """Another process that claims `uid` and then waits for a line on stdin."""
    code = textwrap.dedent(f"""
        import sys, tempfile
        tempfile.tempdir = {str(tmp_dir)!r}
        from dicom_transfer.runlock import SeriesClaims
        c = SeriesClaims("dest")
        print(c.take({uid!r}), flush=True)
        sys.stdin.readline()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip


def test_claims_keep_a_series_to_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series claimed by another live process cannot be claimed; others() sees it; its exit frees both."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = SeriesClaims("dest")
    assert not mine.others()
    child = _claim_in_child(tmp_path, "1.2.3")
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "True"
        assert mine.others()
        assert not mine.take("1.2.3")
        assert mine.take("1.2.4")  # another series: free
    finally:
        child.communicate("done\n", timeout=10)
    assert not mine.others()
    assert mine.take("1.2.3")
    mine.release("1.2.3")
    mine.close()


def test_pause_probes_on_a_doubling_capped_back_off_and_stops_after_the_limit() -> None:
    """begin() logs once per pause; failed probes double the wait up to the cap; too_long after the limit."""
    now = [100.0]
    pause = Pause("destination", lambda: now[0])
    assert not pause and pause.begin("full") and not pause.begin("full again")
    assert pause.probe_at == 101.0 and not pause.due(100.5) and pause.due(101.0)
    waits = []
    for _ in range(8):
        pause.probe_failed(now[0])
        waits.append(pause.wait)
    assert waits[:3] == [2.0, 4.0, 8.0] and waits[-1] == LONGEST_PROBE_S
    pause.probe_at = None  # a trial move goes out, and is refused again: wait longer, no new pause
    assert not pause.begin("refused") and pause.probe_at == now[0] + LONGEST_PROBE_S
    assert not pause.too_long(160.0, 60) and pause.too_long(160.5, 60)
    now[0] = 130.0
    assert pause.end() == 30.0 and not pause and not pause.too_long(1e9, 60)
