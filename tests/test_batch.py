"""read_batch: the Batch CSV contract, every problem reported at once, fast on big files."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from dicom_transfer import batch
from dicom_transfer.batch import BatchRow, check_batch, is_valid_uid, iter_batch, read_batch, suggest_keyword
from dicom_transfer.errors import BatchError
from dicom_transfer.journal import file_digest

S1 = "1.2.826.0.1.3680043.8.498.1"
S2 = "1.2.826.0.1.3680043.8.498.2"
ST = "1.2.826.0.1.3680043.8.498.100"


def write(tmp_path: Path, text: str, name: str = "series.csv", bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def problems(path: Path) -> list[str]:
    """The rendered problems of a batch that must fail, relative to its directory."""
    with pytest.raises(BatchError) as info:
        read_batch(path)
    return [str(p).removeprefix(f"{path.parent}/") for p in info.value.problems]


# -- valid batches -------------------------------------------------------------------------


def test_series_rows_with_optional_columns(tmp_path):
    """Series rows keep their UIDs and PatientID, with physical line numbers."""
    path = write(
        tmp_path,
        f"SeriesInstanceUID,StudyInstanceUID,PatientID\n{S1},{ST},P1\n{S2},,\n",
    )
    assert read_batch(path) == [
        BatchRow(2, S1, ST, "P1"),
        BatchRow(3, S2, None, None),
    ]


def test_series_only_header(tmp_path):
    """A single SeriesInstanceUID column is enough."""
    rows = read_batch(write(tmp_path, f"SeriesInstanceUID\n{S1}\n{S2}\n"))
    assert [r.series_uid for r in rows] == [S1, S2]
    assert not any(r.is_study for r in rows)


def test_study_rows(tmp_path):
    """A row with a StudyInstanceUID and no SeriesInstanceUID is a whole study."""
    path = write(tmp_path, f"StudyInstanceUID,SeriesInstanceUID,PatientID\n{ST},,P9\n{ST},{S1},P9\n")
    study, series = read_batch(path)
    assert study.is_study and study.study_uid == ST and study.series_uid is None and study.patient_id == "P9"
    assert not series.is_study and series.series_uid == S1


def test_bom_and_crlf(tmp_path):
    """A UTF-8 BOM and CRLF line ends are accepted; the first header name is not spoiled by the BOM."""
    rows = read_batch(write(tmp_path, f"SeriesInstanceUID,Modality\r\n{S1},CT\r\n", bom=True))
    assert rows == [BatchRow(2, S1, None, None)]


def test_semicolon_delimiter(tmp_path):
    """A header using `;` makes `;` the delimiter."""
    rows = read_batch(write(tmp_path, f"PatientID;SeriesInstanceUID;StudyInstanceUID\nP,1;{S1};{ST}\n"))
    assert rows == [BatchRow(2, S1, ST, "P,1")]


def test_other_dicom_columns_are_ignored(tmp_path):
    """Columns that are DICOM keywords (a find manifest's) are accepted and ignored."""
    header = "StudyInstanceUID,SeriesInstanceUID,Modality,StudyDate,NumberOfSeriesRelatedInstances,SeriesDescription"
    rows = read_batch(write(tmp_path, f"{header}\n{ST},{S1},CT,20240101,50,T2* GRE\n"))
    assert rows == [BatchRow(2, S1, ST, None)]


def test_blank_lines_and_whitespace(tmp_path):
    """Blank lines are skipped, line numbers stay physical, cells are stripped."""
    path = write(tmp_path, f"\nSeriesInstanceUID , PatientID\n\n  {S1} ,  P1 \n , \n\n{S2},\n")
    assert read_batch(path) == [BatchRow(4, S1, None, "P1"), BatchRow(7, S2, None, None)]


def test_quoted_cells(tmp_path):
    """Cells may be quoted as usual in CSV."""
    rows = read_batch(write(tmp_path, f'"SeriesInstanceUID","PatientID"\n"{S1}","Doe, J"\n'))
    assert rows == [BatchRow(2, S1, None, "Doe, J")]


# -- problems, with their exact format -------------------------------------------------------


def test_bad_uid_message_exact_format(tmp_path):
    """A bad UID is reported as `file:line:column: Keyword: 'value' is not a valid UID`."""
    lines = ["PatientID,SeriesInstanceUID"] + [f"P,{S1[:-1]}{i}" for i in range(12)] + ["P,1.2.x"]
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert problems(path) == ["series.csv:14:2: SeriesInstanceUID: '1.2.x' is not a valid UID"]


def test_problem_names_the_given_path(tmp_path):
    """The file in a problem is the path as the caller gave it."""
    path = write(tmp_path, "SeriesInstanceUID\n1.2.x\n")
    with pytest.raises(BatchError) as info:
        read_batch(str(path))
    assert str(info.value) == f"{path}:2:1: SeriesInstanceUID: '1.2.x' is not a valid UID"


@pytest.mark.parametrize(
    "uid",
    ["1.2.03", "1..2", ".1.2", "1.2.", "1.2 3", "1." + "2" * 63, "1.2.3a"],
)
def test_invalid_uids_are_reported(tmp_path, uid):
    """UIDs break the rules with a leading zero, an empty component, a letter or > 64 chars."""
    assert problems(write(tmp_path, f"SeriesInstanceUID\n{uid}\n")) == [
        f"series.csv:2:1: SeriesInstanceUID: {uid!r} is not a valid UID"
    ]


@pytest.mark.parametrize(
    ("value", "ok", "reason"),
    [
        ("1.2.840.10008.1.2.1", True, ""),
        ("0.0", True, ""),
        ("1." + "2" * 62, True, ""),
        ("", False, "must not be empty"),
        ("1." + "2" * 63, False, "must be at most 64 characters, got 65"),
        ("1.2.x", False, "must contain only digits and dots"),
        ("1..2", False, "must not have an empty component"),
        ("1.02", False, "component '02' must not have a leading zero"),
    ],
)
def test_is_valid_uid(value, ok, reason):
    """is_valid_uid returns (ok, reason) following the DICOM UID rules."""
    assert is_valid_uid(value) == (ok, reason)


def test_wildcards_are_refused(tmp_path):
    """`*` or `?` in a UID or PatientID has its own message; the PatientID is not shown."""
    path = write(tmp_path, f"SeriesInstanceUID,StudyInstanceUID,PatientID\n1.2.*,,\n{S1},1.?,\n{S2},,SMITH*\n")
    found = problems(path)
    assert found == [
        "series.csv:2:1: SeriesInstanceUID: wildcards are not allowed in a batch ('1.2.*')",
        "series.csv:3:2: StudyInstanceUID: wildcards are not allowed in a batch ('1.?')",
        "series.csv:4:3: PatientID: wildcards are not allowed in a batch",
    ]
    assert not any("SMITH" in p for p in found)


def test_duplicate_rows_name_the_earlier_line(tmp_path):
    """The same series twice, or the same study row twice, is reported with the first line."""
    path = write(
        tmp_path,
        f"SeriesInstanceUID,StudyInstanceUID\n{S1},{ST}\n,{ST}\n{S2},\n{S1},\n,{ST}\n",
    )
    assert problems(path) == [
        f"series.csv:5:1: SeriesInstanceUID: '{S1}' duplicates the row at line 2",
        f"series.csv:6:2: StudyInstanceUID: '{ST}' duplicates the study row at line 3",
    ]


def test_unknown_column_suggests_keyword(tmp_path):
    """A column that is not a DICOM keyword is reported at line 1 with a suggestion."""
    path = write(tmp_path, f"StudyInstanceUID,patientID,seriesUID\n{ST},P,{S1}\n")
    assert problems(path) == [
        "series.csv:1:2: unknown column 'patientID' (did you mean PatientID?)",
        "series.csv:1:3: unknown column 'seriesUID' (did you mean SeriesInstanceUID?)",
    ]


def test_unknown_unrelated_column_still_checks_rows(tmp_path):
    """An unknown column unlike any used one does not stop the rows from being checked."""
    path = write(tmp_path, f"SeriesInstanceUID,Comment_\n{S1},x\n1.2.x,y\n")
    found = problems(path)
    assert found[0].startswith("series.csv:1:2: unknown column 'Comment_'")
    assert found[1:] == ["series.csv:3:1: SeriesInstanceUID: '1.2.x' is not a valid UID"]


@pytest.mark.parametrize(
    ("name", "keyword"),
    [
        ("patientID", "PatientID"),
        ("seriesUID", "SeriesInstanceUID"),
        ("study_instance_uid", "StudyInstanceUID"),
        ("Modalty", "Modality"),
        ("SeriesDescripton", "SeriesDescription"),
        ("zzzzzz", None),
        ("", None),
    ],
)
def test_suggest_keyword(name, keyword):
    """suggest_keyword finds the DICOM keyword meant, case-insensitively first."""
    assert suggest_keyword(name) == keyword


def test_header_needs_a_uid_column(tmp_path):
    """A header with neither SeriesInstanceUID nor StudyInstanceUID is refused at line 1."""
    path = write(tmp_path, "PatientID,Modality\nP,CT\n")
    assert problems(path) == ["series.csv:1:1: the header needs a SeriesInstanceUID or a StudyInstanceUID column"]


def test_duplicate_header_column(tmp_path):
    """A column named twice in the header is an error naming both columns."""
    path = write(tmp_path, f"SeriesInstanceUID,Modality,SeriesInstanceUID\n{S1},CT,{S1}\n")
    assert problems(path) == ["series.csv:1:3: duplicate column 'SeriesInstanceUID' (also column 1)"]


def test_row_with_neither_uid(tmp_path):
    """A row with neither a series nor a study UID is an error."""
    path = write(tmp_path, f"SeriesInstanceUID,StudyInstanceUID,PatientID\n{S1},,\n,,P1\n")
    assert problems(path) == ["series.csv:3:1: row has neither a SeriesInstanceUID nor a StudyInstanceUID"]


def test_wrong_cell_count(tmp_path):
    """Rows with more or fewer cells than the header are errors at the first odd cell."""
    path = write(tmp_path, f"SeriesInstanceUID,Modality\n{S1},CT,extra\n{S2}\n")
    assert problems(path) == [
        "series.csv:2:3: expected 2 cells like the header, got 3",
        "series.csv:3:2: expected 2 cells like the header, got 1",
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff", "  \r\n"])
def test_empty_file(tmp_path, text):
    """An empty (or blank) file is an error at line 1."""
    found = problems(write(tmp_path, text))
    assert len(found) == 1 and found[0].startswith("series.csv:1:1: empty file")


def test_header_only(tmp_path):
    """A header with no rows is an error at line 1."""
    assert problems(write(tmp_path, "SeriesInstanceUID,PatientID\n\n")) == ["series.csv:1:1: no rows after the header"]


def test_binary_file(tmp_path):
    """A binary file gives one clear error naming the line where decoding failed."""
    path = tmp_path / "series.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100)
    assert problems(path) == ["series.csv:1:1: the file is not UTF-8 text (byte 0x89)"]


def test_bad_bytes_later_name_their_line(tmp_path):
    """Invalid UTF-8 after good rows is reported at its own line and column."""
    path = tmp_path / "series.csv"
    path.write_bytes(f"SeriesInstanceUID,Modality\n{S1},CT\n{S2},C\xe9\n".encode("latin-1"))
    column = len(f"{S2},C") + 1
    assert problems(path) == [f"series.csv:3:{column}: the file is not UTF-8 text (byte 0xe9)"]


def test_nul_bytes(tmp_path):
    """A NUL byte means the file is not text."""
    path = tmp_path / "series.csv"
    path.write_bytes(f"SeriesInstanceUID\n{S1}\n\0\0\0\n".encode())
    assert problems(path) == ["series.csv:3:1: the file contains a NUL byte: not a text file"]


def test_utf16_file(tmp_path):
    """A UTF-16 file (as some spreadsheet tools save) says so."""
    path = tmp_path / "series.csv"
    path.write_bytes(f"SeriesInstanceUID\n{S1}\n".encode("utf-16"))
    assert problems(path) == ["series.csv:1:1: the file is UTF-16 text: save it as UTF-8"]


def test_missing_file(tmp_path):
    """A batch path that does not exist is a BatchError naming it."""
    found = problems(tmp_path / "nope.csv")
    assert len(found) == 1 and found[0].startswith("nope.csv:1:1: cannot read the file")


def test_unbalanced_quote_is_bounded(tmp_path):
    """An unclosed quote does not swallow the file silently: it is an error at its row."""
    path = write(tmp_path, f'SeriesInstanceUID,Modality\n{S1},"CT\n' + f"{S2},MR\n" * 20_000)
    found = problems(path)
    assert len(found) == 1 and found[0].startswith("series.csv:2:1: not valid CSV")


def test_patient_id_never_in_messages(tmp_path):
    """No problem message repeats a PatientID value."""
    path = write(
        tmp_path,
        f"SeriesInstanceUID,PatientID\n{S1},MUSTERMANN*\n{S2},{'MUSTERMANN' * 7}\n{S2},MUSTERMANN\n1.2.x,MUSTERMANN\n",
    )
    found = problems(path)
    assert len(found) == 3
    assert not any("MUSTERMANN" in p for p in found)


def test_all_problems_reported_at_once(tmp_path):
    """Every problem of the file is reported, not just the first."""
    path = write(tmp_path, "SeriesInstanceUID\n1.2.x\n1.2.*\n1.02\n")
    assert [p.split(": ", 1)[0] for p in problems(path)] == [
        "series.csv:2:1",
        "series.csv:3:1",
        "series.csv:4:1",
    ]


def test_more_than_100_problems_render_100_and_a_count(tmp_path):
    """Over 100 problems: the message shows the first 100, then how many more."""
    path = write(tmp_path, "SeriesInstanceUID\n" + "1.2.x\n" * 250)
    with pytest.raises(BatchError) as info:
        read_batch(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 101
    assert lines[99] == f"{path}:101:1: SeriesInstanceUID: '1.2.x' is not a valid UID"
    assert lines[100] == "... and 150 more problems (250 in all)"
    assert info.value.total == 250


# -- size and speed ------------------------------------------------------------------------


def test_100k_rows_parse_fast(tmp_path):
    """100,000 valid rows are read and validated in well under 2 seconds."""
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as fh:
        fh.write("StudyInstanceUID,SeriesInstanceUID,PatientID,Modality\n")
        for i in range(100_000):
            fh.write(f"1.2.826.0.1.3680043.2.1125.{i // 10}.1,1.2.826.0.1.3680043.2.1125.{i}.2,P{i // 10},CT\n")
    start = time.perf_counter()
    rows = read_batch(path)
    elapsed = time.perf_counter() - start
    assert len(rows) == 100_000 and rows[-1].line == 100_001
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_many_problems_are_counted_but_not_all_kept(tmp_path):
    """A big file with good rows among 12,000 bad ones keeps 10,000 problems and counts all."""
    path = write(tmp_path, "SeriesInstanceUID\n" + "".join(f"1.2.x\n1.2.{i}\n" for i in range(1, 12_001)))
    start = time.perf_counter()
    with pytest.raises(BatchError) as info:
        read_batch(path)
    assert time.perf_counter() - start < 2.0
    assert len(info.value.problems) == 10_000 and info.value.total == 12_000


def test_mostly_garbage_stops_early_in_few_lines(tmp_path):
    """50,000 bad rows and no good one: stopped after 10,000 problems, reported in three lines."""
    path = write(tmp_path, "SeriesInstanceUID\n" + "1.2.x\n" * 50_000)
    with pytest.raises(BatchError) as info:
        read_batch(path)
    lines = info.value.render().splitlines()
    assert len(lines) == 3
    assert lines[-1].endswith(":10001:1: stopped after 10000 problems and 0 good rows: not a batch CSV")


def test_very_long_line_stops_at_once(tmp_path):
    """A line without newlines megabytes long (garbage) is one error, not a memory hog."""
    path = tmp_path / "series.csv"
    path.write_bytes(b"SeriesInstanceUID\n" + b"x" * (20 * 1024 * 1024))
    start = time.perf_counter()
    assert problems(path) == ["series.csv:2:1: line longer than 65536 bytes: not a batch CSV"]
    assert time.perf_counter() - start < 1.0


def test_garbage_text_header_stops_early(tmp_path):
    """Text garbage with no usable header is reported from the header alone, without reading on."""
    path = tmp_path / "series.csv"
    path.write_text("lorem,ipsum,dolor\n" + "sit,amet,consectetur\n" * 500_000, encoding="utf-8")
    start = time.perf_counter()
    found = problems(path)
    assert time.perf_counter() - start < 1.0
    assert all(p.startswith("series.csv:1:") for p in found)
    assert found[-1] == "series.csv:1:1: the header needs a SeriesInstanceUID or a StudyInstanceUID column"


# -- streaming: two passes, bounded memory ---------------------------------------------------


def test_duplicates_found_across_spilled_runs(tmp_path, monkeypatch):
    """With the sort buffer at 3 keys, duplicates far apart (in different runs) are still found,
    with the first line, among the other problems and in line order."""
    monkeypatch.setattr(batch, "RUN_ROWS", 3)
    uids = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(1, 21)]
    body = uids[:10] + [uids[2], "1.2.x"] + uids[10:] + [uids[15], uids[2], ",1.2.3"]
    path = write(
        tmp_path,
        "SeriesInstanceUID,StudyInstanceUID\n" + "\n".join(f"{u}," if "," not in u else u for u in body) + "\n,1.2.3\n",
    )
    assert problems(path) == [
        f"series.csv:12:1: SeriesInstanceUID: '{uids[2]}' duplicates the row at line 4",
        "series.csv:13:1: SeriesInstanceUID: '1.2.x' is not a valid UID",
        f"series.csv:24:1: SeriesInstanceUID: '{uids[15]}' duplicates the row at line 19",
        f"series.csv:25:1: SeriesInstanceUID: '{uids[2]}' duplicates the row at line 4",
        "series.csv:27:2: StudyInstanceUID: '1.2.3' duplicates the study row at line 26",
    ]


def test_many_duplicates_render_100_and_the_count(tmp_path, monkeypatch):
    """1,000 rows each listed twice, spilled in runs: 1,000 problems, the first 100 shown in line order."""
    monkeypatch.setattr(batch, "RUN_ROWS", 64)
    uids = [f"1.2.40.{n}" for n in range(1, 1001)]
    path = write(tmp_path, "SeriesInstanceUID\n" + "".join(u + "\n" for u in uids + uids))
    with pytest.raises(BatchError) as info:
        read_batch(path)
    assert info.value.total == 1000
    lines = info.value.render().splitlines()
    assert len(lines) == 101 and lines[-1] == "... and 900 more problems (1000 in all)"
    assert lines[0] == f"{path}:1002:1: SeriesInstanceUID: '1.2.40.1' duplicates the row at line 2"
    assert lines[99] == f"{path}:1101:1: SeriesInstanceUID: '1.2.40.100' duplicates the row at line 101"


def test_check_batch_counts_and_hashes(tmp_path):
    """check_batch keeps no rows: it counts them (study rows apart) and hashes the file as the journal does."""
    path = write(tmp_path, f"StudyInstanceUID,SeriesInstanceUID\n{ST},\n{ST},{S1}\n\n{ST},{S2}\n")
    checked = check_batch(path)
    assert (checked.rows, checked.studies) == (3, 1)
    assert checked.sha256 == file_digest(path)


def test_iter_batch_resumes_at_a_mark(tmp_path):
    """Rows read again from a (line, offset) mark an earlier pass reported are exactly the rest."""
    text = "SeriesInstanceUID,PatientID\n" + "".join(f'1.2.40.{n},"P\n{n}"\n' for n in range(1, 8))
    path = write(tmp_path, text, bom=True)
    rows = iter_batch(path)
    it = iter(rows)
    first = [next(it) for _ in range(3)]
    mark = (rows.line, rows.offset)
    rest = list(iter_batch(path, mark))
    assert [r.series_uid for r in first + rest] == [f"1.2.40.{n}" for n in range(1, 8)]
    assert [r.line for r in rest] == [8, 10, 12, 14]  # quoted newlines: two physical lines a row
    assert rest[0].patient_id == "P\n4"


def test_check_memory_does_not_grow_with_the_batch(tmp_path, monkeypatch):
    """Check, plan and report of 40,000 rows take no more Python memory than of 4,000: the bound
    is the sort buffer and one plan chunk (a list of the 36,000 extra rows alone would add ~10 MB)."""
    from dicom_transfer import transfer

    monkeypatch.setattr(batch, "RUN_ROWS", 1_000)
    monkeypatch.setattr(transfer, "PLAN_CHUNK", 1_000)
    small, large = peak_mib(tmp_path, 4_000), peak_mib(tmp_path, 40_000)
    assert large - small < 3, (small, large)


def peak_mib(tmp_path: Path, rows: int) -> float:
    from dicom_transfer.config import load_config
    from dicom_transfer.journal import Journal
    from dicom_transfer.report import build_report, write_report
    from dicom_transfer.transfer import plan

    path = tmp_path / f"{rows}.csv"
    with path.open("w", encoding="utf-8") as fh:
        fh.write("SeriesInstanceUID,StudyInstanceUID\n")
        for i in range(rows):
            fh.write(f"1.2.826.0.1.3680043.2.1125.{(i * 7919) % rows}.2,1.2.826.0.1.3680043.2.1125.{i // 10}.1\n")
    cfg = load_config(None)
    tracemalloc.start()
    try:
        checked = check_batch(path)
        journal = Journal(tmp_path / f"{rows}.sqlite")
        try:
            assert plan(journal, path, checked, cfg, None) == rows
            report = build_report(journal, str(path), 0.0, 1.0)
            write_report(report, tmp_path / f"{rows}.json")
        finally:
            journal.close()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
