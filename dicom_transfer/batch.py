"""Batch CSV → `BatchRow`s, every problem of the file reported at once.

The header names DICOM keywords. A row with a SeriesInstanceUID is one series; a row with
a StudyInstanceUID and no SeriesInstanceUID is a whole study. Other DICOM keyword columns
(a `find` manifest's Modality, StudyDate, ...) and `(gggg,eeee)` tag columns (`find --fields`)
are accepted and ignored. UTF-8 with or
without BOM; `,` or `;` (whichever the header line uses). The file is streamed line by
line, so neither a large batch nor a large file of garbage is held in memory.
PatientID values never appear in an error message.

A batch is read twice: `check_batch` validates every row (duplicates included) and hashes
the file, holding no list of rows; `iter_batch` then streams the rows it accepted, from
the start or from a byte offset where an interrupted plan stopped. Duplicate UIDs are found
by an external merge sort: `RUN_ROWS` keys at a time are sorted in memory and spilled to an
anonymous temporary file, and one merge of the sorted runs sees equal keys side by side.
That costs one sequential write and read of ~70 bytes a row, in memory bounded whatever the
batch size, where a B-tree on disk (a temporary SQLite table, the journal's UNIQUE index)
takes a random page write per row once it outgrows its cache: ~4x slower at 10^6 rows.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import functools
import hashlib
import heapq
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from .errors import BatchError, BatchProblem

_T = TypeVar("_T")

SERIES = "SeriesInstanceUID"
STUDY = "StudyInstanceUID"
PATIENT = "PatientID"
_USED = (SERIES, STUDY, PATIENT)

MAX_LINE_BYTES = 64 * 1024  # a batch row is a few hundred bytes; longer means "not a batch"
MAX_PROBLEMS = 10_000  # kept for the error; beyond this they are only counted
RUN_ROWS = 50_000  # UIDs sorted in memory at once for the duplicate check (~10 MB)
_SHOWN_VALUE = 80  # longest cell value quoted in a message


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One valid batch row; `line` is its physical line in the file (header = 1)."""

    line: int
    series_uid: str | None
    study_uid: str | None
    patient_id: str | None

    @property
    def is_study(self) -> bool:
        """A whole-study row (no SeriesInstanceUID): expanded to its series later."""
        return self.series_uid is None


# -- validators --------------------------------------------------------------------------

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> tuple[bool, str]:
    """(ok, reason) for a DICOM UID: 1-64 chars, digits and dots, no empty or 0-led component."""
    if 0 < len(value) <= 64 and _UID.fullmatch(value):
        return True, ""
    if not value:
        return False, "must not be empty"
    if len(value) > 64:
        return False, f"must be at most 64 characters, got {len(value)}"
    if any(c not in "0123456789." for c in value):
        return False, "must contain only digits and dots"
    for component in value.split("."):
        if not component:
            return False, "must not have an empty component"
        if len(component) > 1 and component[0] == "0":
            return False, f"component {component!r} must not have a leading zero"
    return False, "is not a valid UID"  # pragma: no cover - the checks above cover the regex


# The columns batches and manifests use: known without loading pydicom's dictionary
# (importing pydicom costs ~0.15 s of start-up, paid only for an unusual column).
_COMMON = frozenset(
    "SeriesInstanceUID StudyInstanceUID PatientID Modality StudyDate StudyTime SeriesDescription"
    " StudyDescription AccessionNumber NumberOfSeriesRelatedInstances SeriesNumber ProtocolName"
    " SOPInstanceUID PatientBirthDate".split()
)


TAG_COLUMN = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")  # `(gggg,eeee)`, as `find --fields` writes


def is_keyword(name: str) -> bool:
    """Whether `name` is a DICOM keyword (exact spelling) or a `(gggg,eeee)` tag column."""
    if name in _COMMON or TAG_COLUMN.fullmatch(name):
        return True
    from pydicom.datadict import keyword_dict

    return name in keyword_dict


@functools.lru_cache(maxsize=1)
def _keywords_by_folded() -> dict[str, str]:
    from pydicom.datadict import keyword_dict

    return {_fold(k): k for k in keyword_dict}


def _fold(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.casefold())


# Columns a batch is about: a near miss of one of these is the likeliest meaning.
_PREFERRED = (SERIES, STUDY, PATIENT, "Modality", "StudyDate", "SeriesDescription", "AccessionNumber")
_ALIASES = {
    "seriesuid": SERIES,
    "seriesid": SERIES,
    "studyuid": STUDY,
    "patid": PATIENT,
    "sopuid": "SOPInstanceUID",
}


def suggest_keyword(name: str) -> str | None:
    """The DICOM keyword closest to `name` (`patientID` → PatientID), or None."""
    folded = _fold(name)
    if not folded:
        return None
    table = _keywords_by_folded()
    exact = table.get(folded) or _ALIASES.get(folded)
    if exact:
        return exact
    bonus = {k: 0.1 for k in _PREFERRED}
    for close in difflib.get_close_matches(folded, table, n=3, cutoff=0.6):
        bonus.setdefault(table[close], 0.0)
    score, best = max((difflib.SequenceMatcher(None, folded, _fold(k)).ratio() + b, k) for k, b in bonus.items())
    return best if score >= 0.7 else None


# -- reading -----------------------------------------------------------------------------


class Unreadable(Exception):
    """The rest of the file cannot be read as CSV text: stop at this problem."""

    def __init__(self, line: int, column: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.column = column
        self.reason = reason


class Lines:
    """Decoded lines of a binary file, counted, each checked for length, NULs and UTF-8."""

    def __init__(self, fh: BinaryIO, *, digest: Any = None, number: int = 0) -> None:
        self._fh = fh
        self.number = number  # physical lines handed out so far
        self.offset = fh.tell()  # bytes read so far: where the next line starts
        self._digest = digest  # a hashlib object fed every byte read, or None

    def __iter__(self) -> Iterator[str]:
        readline = self._fh.readline
        update = self._digest.update if self._digest is not None else None
        while raw := readline(MAX_LINE_BYTES + 1):
            self.number += 1
            self.offset += len(raw)
            if update is not None:
                update(raw)
            if self.number == 1:
                raw = self._first(raw)
            if len(raw) > MAX_LINE_BYTES:
                raise Unreadable(self.number, 1, f"line longer than {MAX_LINE_BYTES} bytes: not a batch CSV")
            if b"\0" in raw:
                raise Unreadable(self.number, raw.index(b"\0") + 1, "the file contains a NUL byte: not a text file")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[: exc.start].decode("utf-8")) + 1
                raise Unreadable(
                    self.number, column, f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x})"
                ) from None

    def _first(self, raw: bytes) -> bytes:
        if raw.startswith(codecs.BOM_UTF8):
            return raw[len(codecs.BOM_UTF8) :]
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise Unreadable(1, 1, "the file is UTF-16 text: save it as UTF-8")
        return raw


class Problems:
    """Problems of one file: the first MAX_PROBLEMS kept, all counted."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.kept: list[BatchProblem] = []
        self.total = 0

    def add(self, line: int, column: int, field: str | None, reason: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_PROBLEMS:
            self.kept.append(BatchProblem(self.label, line, column, field, reason))

    def error(self) -> BatchError:
        # Stable: problems of one line keep their order; duplicates (found after the pass) fall into place.
        return BatchError(sorted(self.kept, key=lambda p: p.line), self.total)


def quoted(value: str) -> str:
    if len(value) > _SHOWN_VALUE:
        value = value[: _SHOWN_VALUE - 3] + "..."
    return repr(value)


def _is_blank(cells: list[str]) -> bool:
    return not "".join(cells).strip()


@dataclass
class _Header:
    """Where the columns we use are (0-based index, or None)."""

    width: int
    series: int | None
    study: int | None
    patient: int | None


def _check_header(cells: list[str], line: int, out: Problems) -> _Header | None:
    """The header's column positions, or None when the rows cannot be read with it.

    That is when no UID column is there, or when a column we use is doubled or looks
    misspelt: checking rows against a header the user did not mean would only add noise.
    """
    names = [c.strip() for c in cells]
    seen: dict[str, int] = {}
    usable = True
    for col, name in enumerate(names, start=1):
        if not name:
            out.add(line, col, None, "empty column name")
        elif name in seen:
            out.add(line, col, None, f"duplicate column {name!r} (also column {seen[name]})")
            usable = usable and name not in _USED
        elif not is_keyword(name):
            suggestion = suggest_keyword(name)
            out.add(line, col, None, _unknown_column(name, suggestion))
            usable = usable and suggestion not in _USED
        seen.setdefault(name, col)
    if SERIES not in seen and STUDY not in seen:
        if usable:
            out.add(line, 1, None, f"the header needs a {SERIES} or a {STUDY} column")
        return None
    if not usable:
        return None

    def index(name: str) -> int | None:
        return seen[name] - 1 if name in seen else None

    return _Header(len(names), index(SERIES), index(STUDY), index(PATIENT))


def _unknown_column(name: str, suggestion: str | None) -> str:
    if "\t" in name:
        return f"unknown column {quoted(name)} (the delimiter must be ',' or ';')"
    hint = f" (did you mean {suggestion}?)" if suggestion else " (not a DICOM keyword)"
    return f"unknown column {quoted(name)}{hint}"


class _Duplicates:
    """Rows whose UID an earlier row has, found in bounded memory (external merge sort).

    A key is one string, `<kind><uid>\t<line, zero-padded>` (kind "S" a series row, "T" a
    study row), so that sorting is a C string sort and equal UIDs sort together, earliest
    line first. Up to RUN_ROWS keys are held and sorted in memory; more are spilled as
    sorted runs to anonymous temporary files (gone on close, never beside the batch).
    `report` merges the runs and compares neighbours.
    """

    def __init__(self, header: _Header, run_rows: int | None = None) -> None:
        self.h = header
        self.run_rows = run_rows or RUN_ROWS
        self.keys: list[str] = []
        self.runs: list[IO[str]] = []

    def add(self, kind: str, uid: str, line: int) -> None:
        self.keys.append(f"{kind}{uid}\t{line:012d}\n")
        if len(self.keys) >= self.run_rows:
            self._spill()

    def _spill(self) -> None:
        self.keys.sort()
        run = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n")
        run.writelines(self.keys)
        run.seek(0)
        self.runs.append(run)
        self.keys = []

    def report(self, out: Problems) -> None:
        """Add one problem per duplicate row, naming the first row with its UID."""
        try:
            self.keys.sort()
            last, first = "", ""
            for key in heapq.merge(self.keys, *self.runs):
                uid, _, line = key.partition("\t")
                if uid == last:
                    self._problem(out, uid, int(line), int(first))
                else:
                    last, first = uid, line
        finally:
            self.close()

    def _problem(self, out: Problems, key: str, line: int, first: int) -> None:
        kind, uid = key[0], key[1:]
        index, name, what = (self.h.series, SERIES, "row") if kind == "S" else (self.h.study, STUDY, "study row")
        assert index is not None
        out.add(line, index + 1, name, f"{quoted(uid)} duplicates the {what} at line {first}")

    def close(self) -> None:
        for run in self.runs:
            run.close()
        self.runs, self.keys = [], []


class _RowChecker:
    """Validates data rows against the header; hands valid rows' UIDs to the duplicate check."""

    def __init__(self, header: _Header, out: Problems, duplicates: _Duplicates | None) -> None:
        self.h = header
        self.out = out
        self.duplicates = duplicates

    def check(self, cells: list[str], line: int) -> BatchRow | None:
        h, out = self.h, self.out
        if len(cells) != h.width:
            column = min(len(cells), h.width) + 1
            out.add(line, column, None, f"expected {h.width} cells like the header, got {len(cells)}")
            return None
        before = out.total
        series = self._uid(cells, h.series, SERIES, line)
        study = self._uid(cells, h.study, STUDY, line)
        patient = self._patient(cells, line)
        if out.total != before:
            return None
        if series is None and study is None:
            column = (h.series if h.series is not None else h.study or 0) + 1
            out.add(line, column, None, f"row has neither a {SERIES} nor a {STUDY}")
            return None
        if self.duplicates is not None:
            if series is not None:
                self.duplicates.add("S", series, line)
            else:
                assert study is not None
                self.duplicates.add("T", study, line)
        return BatchRow(line, series, study, patient)

    def _uid(self, cells: list[str], index: int | None, name: str, line: int) -> str | None:
        if index is None:
            return None
        value = cells[index].strip()
        if not value:
            return None
        if "*" in value or "?" in value:
            self.out.add(line, index + 1, name, f"wildcards are not allowed in a batch ({quoted(value)})")
        elif not _UID.fullmatch(value) or len(value) > 64:
            self.out.add(line, index + 1, name, f"{quoted(value)} is not a valid UID")
        return value

    def _patient(self, cells: list[str], line: int) -> str | None:
        index = self.h.patient
        if index is None:
            return None
        value = cells[index].strip()
        if not value:
            return None
        # Never quote the value: it identifies a patient.
        if "*" in value or "?" in value:
            self.out.add(line, index + 1, PATIENT, "wildcards are not allowed in a batch")
        elif len(value) > 64:
            self.out.add(line, index + 1, PATIENT, f"longer than 64 characters ({len(value)})")
        elif "\\" in value:
            self.out.add(line, index + 1, PATIENT, "must not contain a backslash")
        return value


def first_line(lines: Iterator[str]) -> str | None:
    for text in lines:
        if text.strip():
            return text
    return None


@dataclass(frozen=True)
class BatchCheck:
    """What `check_batch` learnt of a valid batch (no rows: `iter_batch` streams them)."""

    path: Path
    sha256: str  # of the file's bytes, as `journal.file_digest` computes it
    rows: int  # valid rows (series and study rows)
    studies: int  # of which study rows


def check_batch(path: str | Path) -> BatchCheck:
    """Validate a batch CSV in one streaming pass; raise `BatchError` listing every problem.

    Memory does not grow with the file: no row is kept, and duplicates are found by an
    external merge sort (see the module docstring).
    """
    digest = hashlib.sha256()
    counts = {"rows": 0, "studies": 0}

    def read(it: Iterator[str], lines: Lines, out: Problems) -> list[None]:
        for row in _rows(it, lines, out, check=True):
            counts["rows"] += 1
            counts["studies"] += row.is_study
        return []

    read_checked(path, read, digest=digest)
    return BatchCheck(Path(path), digest.hexdigest(), counts["rows"], counts["studies"])


class BatchRows:
    """The rows of a batch `check_batch` accepted, streamed; `line`/`offset` say where the last one ended.

    `start` is a (line, byte offset) at a row boundary that an earlier `BatchRows` reported:
    reading resumes there (the header is read again first). A row that fails its check now
    (the file changed since it was checked) raises `BatchError`.
    """

    def __init__(self, path: str | Path, start: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        self.start = start
        self.line, self.offset = start or (0, 0)

    def __iter__(self) -> Iterator[BatchRow]:
        out = Problems(str(self.path))
        with _reading(out), open(self.path, "rb") as fh:
            lines = Lines(fh)
            it = iter(lines)
            header = _header(it, lines, out)
            if header is None:
                raise out.error()
            if self.start is not None and self.start[1] > lines.offset:
                fh.seek(self.start[1])
                lines = Lines(fh, number=self.start[0])
                it = iter(lines)
            for row in _data_rows(it, lines, out, header, None):
                if out.total:
                    raise out.error()
                self.line, self.offset = lines.number, lines.offset
                yield row
            self.line, self.offset = lines.number, lines.offset
        if out.total:
            raise out.error()


def iter_batch(path: str | Path, start: tuple[int, int] | None = None) -> BatchRows:
    """Stream a checked batch's rows (see `BatchRows`)."""
    return BatchRows(path, start)


def read_batch(path: str | Path) -> list[BatchRow]:
    """Check a batch and return its rows as a list: for small batches (a large one streams)."""
    check_batch(path)
    return list(iter_batch(path))


@contextmanager
def _reading(out: Problems) -> Iterator[None]:
    """Bad bytes or an unreadable file become a problem of `out`, raised at once as its BatchError."""
    try:
        yield
    except Unreadable as exc:
        out.add(exc.line, exc.column, None, exc.reason)
        raise out.error() from None
    except OSError as exc:
        out.add(1, 1, None, f"cannot read the file ({exc.strerror or exc})")
        raise out.error() from None


def read_checked(
    path: str | Path, read: Callable[[Iterator[str], Lines, Problems], list[_T]], *, digest: Any = None
) -> list[_T]:
    """Run `read` over a CSV file's lines; every problem it (or the file) has → one BatchError."""
    out = Problems(str(path))
    # Binary, decoded line by line, so that bad bytes get a line number.
    with _reading(out), open(path, "rb") as fh:
        lines = Lines(fh, digest=digest)
        rows = read(iter(lines), lines, out)
    if out.total:
        raise out.error()
    return rows


def _header(it: Iterator[str], lines: Lines, out: Problems) -> tuple[_Header, str] | None:
    """The header (column positions and delimiter), or None after adding why the rows cannot be read."""
    header_text = first_line(it)
    if header_text is None:
        out.add(1, 1, None, f"empty file: expected a header of DICOM keywords such as {SERIES}")
        return None
    delimiter = ";" if header_text.count(";") > header_text.count(",") else ","
    header = _check_header(next(csv.reader([header_text], delimiter=delimiter), []), lines.number, out)
    return (header, delimiter) if header is not None else None


def _rows(it: Iterator[str], lines: Lines, out: Problems, *, check: bool) -> Iterator[BatchRow]:
    """The valid rows after the header; with `check`, duplicates too are found (after the last row)."""
    found = _header(it, lines, out)
    if found is None:
        return  # without a UID column the rows cannot mean anything
    header_line = lines.number
    duplicates = _Duplicates(found[0]) if check else None
    good = 0
    try:
        for row in _data_rows(it, lines, out, found, duplicates):
            good += 1
            yield row
        if duplicates is not None:
            duplicates.report(out)
    finally:
        if duplicates is not None:
            duplicates.close()
    if not good and not out.total:
        out.add(header_line, 1, None, "no rows after the header")


def _data_rows(
    it: Iterator[str], lines: Lines, out: Problems, found: tuple[_Header, str], duplicates: _Duplicates | None
) -> Iterator[BatchRow]:
    header, delimiter = found
    checker = _RowChecker(header, out, duplicates)
    last = lines.number
    good = 0
    try:
        for cells in csv.reader(it, delimiter=delimiter):
            start, last = last + 1, lines.number
            if _is_blank(cells):
                continue
            row = checker.check(cells, start)
            if row is not None:
                good += 1
                yield row
            elif out.total >= MAX_PROBLEMS and good < out.total // 100:
                # Mostly garbage: say so now, in a few lines, rather than read gigabytes to count it.
                found_n = out.total
                out.kept, out.total = out.kept[:2], min(2, out.total)
                raise Unreadable(start, 1, f"stopped after {found_n} problems and {good} good rows: not a batch CSV")
    except csv.Error as exc:
        raise Unreadable(last + 1, 1, f"not valid CSV ({exc})") from None
