"""Bad input through the CLI, against an existing journal from a good run (issue 5, R6).

Every bad batch or config must give one clear error naming file:line:column or the key,
exit 2, no traceback, and leave the journal exactly as it was: same bytes, same mtime,
same table contents, no -wal/-shm left behind. A BOM or a `;` delimiter is not an error.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli

from bench.resilience import write_config
from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration

JOURNAL = "series.journal.sqlite"  # the default journal of series.csv


@dataclass(frozen=True)
class GoodRun:
    """A finished good run: its batch text, config and journal (copied into each test)."""

    directory: Path
    batch_text: str
    local_url: str
    uids: tuple[str, ...]


@pytest.fixture(scope="module")
def good_run(stack_same: Stack, tmp_path_factory: pytest.TempPathFactory) -> GoodRun:
    """Two series moved once, so that a journal exists."""
    stack_same.reset()
    directory = tmp_path_factory.mktemp("good-run")
    series = make_series(2, 3, seed=71, rows=16, columns=16)
    upload(stack_same.pacs.rest, series)
    batch = write_batch_csv(series, directory / "series.csv")
    cfg = write_config(directory / "t.yaml", stack_same.centre.url, source="PACS")
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 2
    assert not (directory / f"{JOURNAL}-wal").exists()  # closed cleanly: everything in the main file
    return GoodRun(directory, batch.read_text(), stack_same.centre.url, tuple(s.series_uid for s in series))


def journal_state(path: Path) -> dict[str, object]:
    """Bytes, mtime, side files and a digest of every table's rows (read from a copy)."""
    copy = path.with_name("inspect.sqlite")
    shutil.copyfile(path, copy)
    db = sqlite3.connect(copy)
    try:
        tables = hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
    finally:
        db.close()
        copy.unlink()
    return {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "mtime_ns": path.stat().st_mtime_ns,
        "side_files": sorted(p.name for p in path.parent.glob(f"{path.name}-*")),
        "tables": tables,
    }


@pytest.fixture
def workdir(good_run: GoodRun, tmp_path: Path) -> Path:
    """tmp_path holding a copy of the good run's journal (as series.csv's default journal) and batch."""
    shutil.copy2(good_run.directory / JOURNAL, tmp_path / JOURNAL)
    (tmp_path / "series.csv").write_text(good_run.batch_text)
    write_config(tmp_path / "t.yaml", good_run.local_url, source="PACS")
    return tmp_path


def run_bad(workdir: Path, batch: Path | None = None, cfg: Path | None = None, timeout: float = 60) -> list[str]:
    """Run the CLI on bad input; assert exit 2, no traceback, journal untouched; return stderr lines."""
    before = journal_state(workdir / JOURNAL)
    started = time.monotonic()
    res = run_cli("--batch", batch or workdir / "series.csv", "--config", cfg or workdir / "t.yaml", timeout=timeout)
    seconds = time.monotonic() - started
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert journal_state(workdir / JOURNAL) == before
    lines = res.stderr.strip().splitlines()
    print(f"{seconds:.1f} s: " + " | ".join(lines[:3]))
    return lines


def write_batch(workdir: Path, text: str | bytes) -> Path:
    batch = workdir / "series.csv"
    if isinstance(text, bytes):
        batch.write_bytes(text)
    else:
        batch.write_text(text)
    return batch


def batch_problems(lines: list[str], batch: Path, count: int) -> list[str]:
    """The problem lines of a BatchError, checked to be `count` of them plus the summary line."""
    assert lines[-1] == f"error: {count} problem(s) in the batch; nothing was written", lines
    problems = lines[:-1]
    assert len(problems) == count and all(p.startswith(f"{batch}:") for p in problems), lines
    return problems


# -- the batch ---------------------------------------------------------------------------


def test_bad_header(workdir: Path) -> None:
    """A misspelt column: one error at 1:1 with a suggestion."""
    batch = write_batch(workdir, "SeriesUID,StudyInstanceUID\n1.2.3,1.2.4\n")
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    assert problems == [f"{batch}:1:1: unknown column 'SeriesUID' (did you mean SeriesInstanceUID?)"]


def test_bad_uid(workdir: Path, good_run: GoodRun) -> None:
    """A UID with a letter: named by line and column; the good rows do not matter."""
    batch = write_batch(workdir, good_run.batch_text + "1.2.x,1.2.4\n")
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    assert problems == [f"{batch}:4:1: SeriesInstanceUID: '1.2.x' is not a valid UID"]


def test_wildcard(workdir: Path, good_run: GoodRun) -> None:
    """A wildcard in a UID column is refused (a batch names series, it does not query them)."""
    batch = write_batch(workdir, good_run.batch_text + "1.2.3,1.2.*\n")
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    assert problems == [f"{batch}:4:2: StudyInstanceUID: wildcards are not allowed in a batch ('1.2.*')"]


def test_duplicate_rows(workdir: Path, good_run: GoodRun) -> None:
    """A series listed twice: the second row is named with the line of the first."""
    first = good_run.batch_text.splitlines()[1]
    batch = write_batch(workdir, good_run.batch_text + first + "\n")
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    uid = good_run.uids[0]
    assert problems == [f"{batch}:4:1: SeriesInstanceUID: '{uid}' duplicates the row at line 2"]


def test_empty_file(workdir: Path) -> None:
    """An empty batch is an error, not an empty success."""
    batch = write_batch(workdir, "")
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    assert problems == [f"{batch}:1:1: empty file: expected a header of DICOM keywords such as SeriesInstanceUID"]


def test_binary_file(workdir: Path) -> None:
    """Bytes that are not text: one error naming where."""
    batch = write_batch(workdir, bytes(range(256)) * 64)
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    assert problems == [f"{batch}:1:1: the file contains a NUL byte: not a text file"]


def _fill(path: Path, head: bytes, line: bytes, size: int = 100 * 1024 * 1024) -> Path:
    block = line * (1024 * 1024 // len(line))
    with path.open("wb") as fh:
        fh.write(head)
        while fh.tell() < size:
            fh.write(block)
    return path


def test_100mb_garbage_fails_fast(workdir: Path) -> None:
    """100 MB of one garbage line repeated: refused in < 10 s at its first line."""
    batch = _fill(workdir / "series.csv", b"", b"this is not a batch, just garbage 0123456789 !@#$%^&*()\n")
    started = time.monotonic()
    problems = batch_problems(run_bad(workdir, batch), batch, 3)
    assert time.monotonic() - started < 10
    assert all(p.startswith(f"{batch}:1:") for p in problems)
    assert problems[-1] == f"{batch}:1:1: the header needs a SeriesInstanceUID or a StudyInstanceUID column"


def test_100mb_one_line_fails_fast(workdir: Path) -> None:
    """100 MB without a newline: refused in < 10 s without reading it all into memory."""
    batch = _fill(workdir / "series.csv", b"", b"x" * 4096)
    started = time.monotonic()
    problems = batch_problems(run_bad(workdir, batch), batch, 1)
    assert time.monotonic() - started < 10
    assert problems == [f"{batch}:1:1: line longer than 65536 bytes: not a batch CSV"]


def test_100mb_garbage_rows_after_good_header_fail_fast(workdir: Path) -> None:
    """A good header then 100 MB of garbage rows: refused in < 10 s with one short message."""
    batch = _fill(workdir / "series.csv", b"SeriesInstanceUID,StudyInstanceUID\n", b"garbage,1.2.x\n")
    before = journal_state(workdir / JOURNAL)
    res = run_cli("--batch", batch, "--config", workdir / "t.yaml", timeout=10)  # TimeoutExpired: not fast
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert journal_state(workdir / JOURNAL) == before
    assert len(res.stderr.strip().splitlines()) <= 4, res.stderr[:500]  # two problems, the stop, the total
    assert "not a batch CSV" in res.stderr


# -- accepted variants: a BOM and `;` -----------------------------------------------------


@pytest.mark.parametrize("variant", ["bom", "semicolon"])
def test_bom_and_semicolon_are_accepted(same: Stack, tmp_path: Path, variant: str) -> None:
    """The same batch saved with a UTF-8 BOM or with `;`: exit 0, the same series, nothing moved twice."""
    series = make_series(2, 3, seed=72, rows=16, columns=16)
    upload(same.pacs.rest, series)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    cfg = write_config(tmp_path / "t.yaml", same.centre.url, source="PACS")
    assert run_cli("--batch", batch, "--config", cfg).returncode == 0
    text = batch.read_text()
    if variant == "bom":
        batch.write_bytes(codecs.BOM_UTF8 + text.encode())
    else:
        batch.write_text(text.replace(",", ";"))
    res = run_cli("--batch", batch, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 2
    db = sqlite3.connect(tmp_path / JOURNAL)
    assert sorted(uid for (uid,) in db.execute("SELECT uid FROM series")) == sorted(s.series_uid for s in series)
    assert db.execute("SELECT COUNT(*) FROM events WHERE event='issued'").fetchone() == (2,)  # the first run's
    fresh = run_cli("--batch", batch, "--config", cfg, "--journal", tmp_path / "fresh.sqlite", "--json")
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["complete"] == 2  # read on its own too


# -- the config and the parties ------------------------------------------------------------


def test_config_unknown_key(workdir: Path, good_run: GoodRun) -> None:
    """An unknown transfer key: file:line:column and the key path, with the known keys listed."""
    cfg = workdir / "bad.yaml"
    cfg.write_text(f"local: {{url: {good_run.local_url}}}\nsource: {{modality: PACS}}\ntransfer: {{max_inflight: 2}}\n")
    (line,) = run_bad(workdir, cfg=cfg)
    assert line.startswith(f"error: {cfg}:3:12: transfer.max_inflight: unknown key (did you mean max_in_flight?)")


def test_config_unknown_section(workdir: Path, good_run: GoodRun) -> None:
    """An unknown top-level section is named too."""
    cfg = workdir / "bad.yaml"
    cfg.write_text(f"local: {{url: {good_run.local_url}}}\nsorce: {{modality: PACS}}\n")
    (line,) = run_bad(workdir, cfg=cfg)
    assert line.startswith(f"error: {cfg}:2:1: sorce: unknown key (did you mean source?)")


def test_config_wrong_types(workdir: Path, good_run: GoodRun) -> None:
    """A string where an integer belongs: the key path and the value."""
    cfg = workdir / "bad.yaml"
    cfg.write_text(f"local: {{url: {good_run.local_url}}}\ntransfer: {{max_in_flight: four, stall_s: [1]}}\n")
    (line,) = run_bad(workdir, cfg=cfg)
    assert line == f"error: {cfg}:2:12: transfer.max_in_flight: must be an integer, got 'four'"


def test_config_not_yaml(workdir: Path) -> None:
    """A config that is not YAML at all: one error naming the file and where."""
    cfg = workdir / "bad.yaml"
    cfg.write_text("local: {url: [unclosed\n")
    (line,) = run_bad(workdir, cfg=cfg)
    assert line.startswith(f"error: {cfg}:")


def test_unreachable_local_orthanc(workdir: Path) -> None:
    """Nothing listens at local.url: exit 2 naming local.url after the start-up deadline, journal untouched."""
    cfg = write_config(workdir / "bad.yaml", "http://127.0.0.1:9", source="PACS")
    (line,) = run_bad(workdir, cfg=cfg)
    assert line.startswith("error: local.url: local Orthanc at http://127.0.0.1:9 does not answer")


def test_unknown_modality_alias(workdir: Path, good_run: GoodRun) -> None:
    """source.modality the local Orthanc does not know: named, with the ones it knows."""
    cfg = write_config(workdir / "bad.yaml", good_run.local_url, source="NOPE")
    (line,) = run_bad(workdir, cfg=cfg)
    assert line.startswith("error: source.modality: 'NOPE' is not a DICOM modality of the local Orthanc")
    assert "it knows: PACS" in line
