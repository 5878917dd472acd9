"""`find`: a query CSV → a series manifest CSV that `--batch` accepts.

Each query row becomes a STUDY-level C-FIND (by patient, date, accession, UID...; never by
ModalitiesInStudy, which some PACS answer short with a success status), then one
SERIES-level C-FIND per study with its StudyInstanceUID (hierarchical PACS need it),
filtering Modality, SeriesDescription and ProtocolName there. Answers are checked again
here, because PACS differ in what they match (dcmqrscp ignores SeriesDescription), and
the config's `filter` applies on top.

Answer limits: a PACS that refuses a query with too many answers (0xFE00 after its
`LimitFindResults`, or A7xx) makes the local Orthanc answer HTTP 500 and keep nothing;
a PACS may also truncate silently at a known count (`max_answers`). Either way the study
query is split and asked again: the date range in halves, a single day by StudyTime
ranges; what cannot be split fails naming the row. A list is never silently short.

The query file is validated like a batch: every problem at once as `file:line:col`.
PatientID and PatientBirthDate values never appear in a message or a log line.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.datadict import keyword_dict

from .batch import Lines, Problems, Unreadable, first_line, is_valid_uid, quoted, read_checked, suggest_keyword
from .config import Config, FilterConfig
from .errors import DicomTransferError, OrthancError, Unreachable
from .fields import Field, FieldsError, parse_fields
from .journal import Journal
from .orthanc import LocalOrthanc, dimse_from_error, positive_int
from .states import State

log = structlog.get_logger("dicom_transfer")

# -- the query file ------------------------------------------------------------------------

STUDY_KEYS = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyInstanceUID",
    "StudyDescription",
    "PatientBirthDate",
)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "ProtocolName")
QUERY_KEYS = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "PatientBirthDate",
    "ImageType",
)
# Keys that narrow a row to part of the PACS. StudyTime, Modality, SeriesDescription and
# ProtocolName alone would make the study query ask for every study there is.
_NOT_NARROWING = ("StudyTime", "Modality", "SeriesDescription", "ProtocolName", "ImageType")
NARROWING = tuple(k for k in QUERY_KEYS if k not in _NOT_NARROWING)
PHI_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate"})  # values never quoted
_MAX_LENGTH = {  # by VR: LO 64, SH 16, CS 16, PN 64 per component group
    "PatientID": 64,
    "PatientName": 64,
    "AccessionNumber": 16,
    "Modality": 16,
    "StudyDescription": 64,
    "SeriesDescription": 64,
    "ProtocolName": 64,
}
_WILDCARDS = ("*", "?")


@dataclass(frozen=True)
class QueryRow:
    """One valid query row: its physical line and its non-empty filters (keyword → value)."""

    line: int
    keys: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return dict(self.keys).get(key)

    def as_dict(self) -> dict[str, str]:
        return dict(self.keys)


_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")


def parse_date(text: str) -> dt.date | None:
    """YYYYMMDD → date, or None when it is not a calendar date."""
    if not _DATE.fullmatch(text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def time_seconds(text: str) -> int | None:
    """HH[MM[SS[.ffffff]]] → whole seconds since midnight, or None when it is not a time."""
    m = _TIME.fullmatch(text)
    if not m:
        return None
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if m.group(4) and not m.group(3):
        return None  # a fraction needs the seconds
    if hh > 23 or mm > 59 or ss > 59:
        return None
    return hh * 3600 + mm * 60 + ss


def _check_range(text: str, parse: Any, kind: str, form: str, phi: bool) -> str | None:
    """Why `text` is not a single value or a closed `A-B` range (None when it is)."""
    what = "the value" if phi else quoted(text)
    if any(w in text for w in _WILDCARDS):
        return f"wildcards do not apply to {kind}s: use a range {form}-{form}"
    parts = text.split("-")
    if len(parts) == 2 and (not parts[0]) != (not parts[1]):
        return f"open range {what}: give both ends ({form}-{form})"
    values: list[Any] = [parse(p) for p in parts] if len(parts) <= 2 else [None]
    if any(v is None for v in values):
        if kind == "date" and len(parts) <= 2 and all(_DATE.fullmatch(p) for p in parts):
            return f"{what} is not a calendar date"
        return f"{what} is not a {kind} {form} or a range {form}-{form}"
    if len(values) == 2 and values[0] > values[1]:
        return f"range {what} ends before it starts"
    return None


def _check_image_type(value: str, allow_wildcards: bool) -> tuple[str, str | None]:
    """ImageType: one or more CS values separated by a backslash, each required of an instance."""
    values = [v.strip() for v in value.split("\\")]
    for v in values:
        if not v:
            return value, f"{quoted(value)} has an empty value (values are separated by a single backslash)"
        if len(v) > 16:
            return value, f"{quoted(v)} is longer than 16 characters (a CS value)"
        if not re.fullmatch(r"[A-Za-z0-9 _*?]+", v):
            return value, f"{quoted(v)} is not an ImageType value (letters, digits, '_', space)"
        if not allow_wildcards and any(w in v for w in _WILDCARDS):
            return value, f"wildcards ('*', '?') need --allow-wildcards ({quoted(value)})"
    return "\\".join(v.upper() for v in values), None  # CS values are upper case


def _check_text(key: str, value: str, allow_wildcards: bool) -> str | None:
    shown = "" if key in PHI_KEYS else f" ({quoted(value)})"
    if "\\" in value:
        return "must not contain a backslash (one value per cell)"
    if any(ord(c) < 32 for c in value):
        return "must not contain control characters"
    if len(value) > _MAX_LENGTH[key]:
        return f"longer than {_MAX_LENGTH[key]} characters ({len(value)})"
    if not allow_wildcards and any(w in value for w in _WILDCARDS):
        return f"wildcards ('*', '?') need --allow-wildcards{shown}"
    if key == "Modality" and not re.fullmatch(r"[A-Za-z0-9 _*?]+", value):
        return f"{quoted(value)} is not a modality code (letters, digits, '_')"
    return None


def check_cell(key: str, value: str, allow_wildcards: bool) -> tuple[str, str | None]:
    """(normalised value, reason it is refused or None) for one non-empty cell."""
    if key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(w in value for w in _WILDCARDS):
            return value, f"UIDs cannot be matched with wildcards ({quoted(value)})"
        ok, why = is_valid_uid(value)
        return value, None if ok else f"{quoted(value)} is not a valid UID: {why}"
    if key in ("StudyDate", "PatientBirthDate"):
        return value, _check_range(value, parse_date, "date", "YYYYMMDD", key in PHI_KEYS)
    if key == "StudyTime":
        return value, _check_range(value, time_seconds, "time", "HHMMSS", False)
    if key == "ImageType":
        return _check_image_type(value, allow_wildcards)
    problem = _check_text(key, value, allow_wildcards)
    if key == "Modality":
        value = value.upper()  # CS values are upper case; "ct" means CT
    return value, problem


def _suggest(name: str) -> str | None:
    """The query column meant by `name`: a near query key first, else any DICOM keyword."""
    folded = re.sub(r"[^0-9a-z]", "", name.casefold())
    by_folded = {k.casefold(): k for k in QUERY_KEYS}
    close = difflib.get_close_matches(folded, by_folded, n=1, cutoff=0.75)
    return by_folded[close[0]] if close else suggest_keyword(name)


def _column_problem(name: str) -> str:
    if name == "ModalitiesInStudy":
        return "ModalitiesInStudy is not a query column (PACS answer it short): use Modality"
    if name in keyword_dict:
        return f"{name} is not a query column (query columns: {', '.join(QUERY_KEYS)})"
    if "\t" in name:
        return f"unknown column {quoted(name)} (the delimiter must be ',' or ';')"
    suggestion = _suggest(name)
    hint = f" (did you mean {suggestion}?)" if suggestion else f" (query columns: {', '.join(QUERY_KEYS)})"
    return f"unknown column {quoted(name)}{hint}"


def _check_header(cells: list[str], line: int, out: Problems) -> tuple[list[str | None], bool]:
    """Each column's query key (None for a bad column) and whether the header is clean."""
    names = [c.strip() for c in cells]
    seen: dict[str, int] = {}
    keys: list[str | None] = []
    clean = True
    for col, name in enumerate(names, start=1):
        key: str | None = None
        if not name:
            out.add(line, col, None, "empty column name")
        elif name in seen:
            out.add(line, col, None, f"duplicate column {name!r} (also column {seen[name]})")
        elif name not in QUERY_KEYS:
            out.add(line, col, None, _column_problem(name))
        else:
            key = name
        clean = clean and key is not None
        seen.setdefault(name, col)
        keys.append(key)
    return keys, clean


class _RowChecker:
    def __init__(self, keys: list[str | None], clean: bool, allow_wildcards: bool, out: Problems) -> None:
        self.keys = keys
        self.clean = clean
        self.allow_wildcards = allow_wildcards
        self.out = out
        self.seen: dict[tuple[tuple[str, str], ...], int] = {}

    def check(self, cells: list[str], line: int) -> QueryRow | None:
        out = self.out
        if len(cells) != len(self.keys):
            column = min(len(cells), len(self.keys)) + 1
            out.add(line, column, None, f"expected {len(self.keys)} cells like the header, got {len(cells)}")
            return None
        before = out.total
        filters: dict[str, str] = {}
        for col, (key, cell) in enumerate(zip(self.keys, cells, strict=True), start=1):
            value = cell.strip()
            if key is None or not value:
                continue
            value, problem = check_cell(key, value, self.allow_wildcards)
            if problem:
                out.add(line, col, key, problem)
            elif value.strip("*"):  # "*" alone matches everything: no filter
                filters[key] = value
        if out.total != before or not self.clean:
            return None
        return self._row(filters, line)

    def _row(self, filters: dict[str, str], line: int) -> QueryRow | None:
        if not filters:
            self.out.add(line, 1, None, "row has no filter: it would ask the whole PACS")
            return None
        if not any(k in filters for k in NARROWING):
            given = ", ".join(filters)
            self.out.add(
                line, 1, None,
                f"row filters only by {given}: the study query would ask the whole PACS;"
                " add a PatientID, StudyDate, AccessionNumber or UID",
            )  # fmt: skip
            return None
        row = QueryRow(line, tuple((k, filters[k]) for k in QUERY_KEYS if k in filters))
        first = self.seen.setdefault(row.keys, line)
        if first != line:
            self.out.add(line, 1, None, f"duplicates the row at line {first}")
            return None
        return row


def read_query(path: str | Path, *, allow_wildcards: bool = False) -> list[QueryRow]:
    """Read and validate a query CSV; raise `BatchError` listing every problem in it."""
    return read_checked(path, lambda it, lines, out: _read(it, lines, out, allow_wildcards))


def _read(it: Iterator[str], lines: Lines, out: Problems, allow_wildcards: bool) -> list[QueryRow]:
    header_text = first_line(it)
    if header_text is None:
        out.add(1, 1, None, "empty file: expected a header of query keys such as StudyDate,PatientID")
        return []
    header_line = lines.number
    delimiter = ";" if header_text.count(";") > header_text.count(",") else ","
    keys, clean = _check_header(next(csv.reader([header_text], delimiter=delimiter), []), header_line, out)
    if not any(keys):
        return []
    checker = _RowChecker(keys, clean, allow_wildcards, out)
    rows: list[QueryRow] = []
    last = header_line
    try:
        for cells in csv.reader(it, delimiter=delimiter):
            start, last = last + 1, lines.number
            if cells:  # an empty line is skipped; ",," is a row, one without filters
                row = checker.check(cells, start)
                if row is not None:
                    rows.append(row)
    except csv.Error as exc:
        raise Unreadable(last + 1, 1, f"not valid CSV ({exc})") from None
    if not rows and not out.total:
        out.add(header_line, 1, None, "no rows after the header")
    return rows


# -- matching answers here (PACS differ) --------------------------------------------------------


def _glob(pattern: str) -> re.Pattern[str]:
    """DICOM wildcard matching (`*`, `?`), case-insensitive: lenient, never stricter than a PACS."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.IGNORECASE | re.DOTALL)


def text_matches(pattern: str, value: str) -> bool:
    return _glob(pattern.strip()).fullmatch(value.strip()) is not None


def in_date_range(text: str, value: str) -> bool:
    """Whether an answer's date (YYYYMMDD) lies in a query's date or range."""
    lo, _, hi = text.partition("-")
    return lo <= value <= (hi or lo)


# -- splitting a study query -----------------------------------------------------------------------

FULL_DAY = "000000-235959.999999"


def _date_text(lo: dt.date, hi: dt.date) -> str:
    return lo.strftime("%Y%m%d") if lo == hi else f"{lo:%Y%m%d}-{hi:%Y%m%d}"


def split_dates(text: str) -> list[str] | None:
    """A date range in two halves (None for a single day)."""
    lo_text, _, hi_text = text.partition("-")
    lo, hi = parse_date(lo_text), parse_date(hi_text or lo_text)
    assert lo is not None and hi is not None, text
    if lo >= hi:
        return None
    mid = lo + (hi - lo) // 2
    return [_date_text(lo, mid), _date_text(mid + dt.timedelta(days=1), hi)]


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def split_times(text: str) -> list[str] | None:
    """A time range in two halves at a whole second (None when under a second or single).

    The outer ends are kept as written, so the halves cover what the PACS read in the
    whole; the inner ends are `HHMMSS.999999` and the next second.
    """
    lo_text, dash, hi_text = text.partition("-")
    if not dash:
        return None
    lo, hi = time_seconds(lo_text), time_seconds(hi_text)
    assert lo is not None and hi is not None, text
    if hi - lo < 1:
        return None
    mid = (lo + hi) // 2
    return [f"{lo_text}-{_hms(mid)}.999999", f"{_hms(mid + 1)}-{hi_text}"]


# -- the search --------------------------------------------------------------------------------------


class FindError(DicomTransferError):
    """A query row cannot be answered completely; nothing was written."""

    exit_code = 1


class FindInputError(DicomTransferError):
    """A `find` option is wrong (exit 2)."""


@dataclass(frozen=True)
class FoundSeries:
    """One manifest row."""

    series_uid: str
    study_uid: str
    modality: str | None
    study_date: str | None
    description: str | None
    instances: int | None  # NumberOfSeriesRelatedInstances; None when the PACS gives none
    patient_id: str | None
    line: int  # the query row that found it first
    extra: tuple[str, ...] = ()  # the `--fields` values, in their order


@dataclass
class FindStats:
    """What the search cost and what it could not check."""

    queries: int = 0
    refused: int = 0  # answer sets refused by the PACS (too many answers)
    full: int = 0  # answer sets at --max-answers, taken as possibly truncated
    splits: int = 0
    dropped: int = 0  # answers that did not match on a second look here
    invalid: int = 0  # answers without a valid UID
    duplicates: int = 0  # series found again by a later row
    image_type_left_out: int = 0  # series without an instance of the row's ImageType
    unverified: dict[str, int] = field(default_factory=dict)  # key → series the PACS did not echo it for
    warnings: list[str] = field(default_factory=list)


@dataclass
class FindResult:
    rows: int
    series: list[FoundSeries]
    stats: FindStats

    @property
    def studies(self) -> int:
        return len({s.study_uid for s in self.series})

    @property
    def instances(self) -> int:
        return sum(s.instances or 0 for s in self.series)

    @property
    def without_count(self) -> int:
        return sum(1 for s in self.series if s.instances is None)


class _Truncated(Exception):
    """An answer set the PACS refused or that may be truncated; `why` says which."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _refusal(exc: OrthancError) -> int | None:
    """The DIMSE status of a refused C-FIND: FE00 (answer limit reached) or A7xx (resources)."""
    status = dimse_from_error(exc)
    if status is not None and (status == 0xFE00 or status & 0xFF00 == 0xA700):
        return status
    return None


def _text(answer: Mapping[str, Any], key: str) -> str:
    value = answer.get(key)
    return value.strip() if isinstance(value, str) else ""


def _field_value(series: Mapping[str, Any], study: Mapping[str, Any], field: Field) -> str:
    """A `--fields` value as the source answered it: the series answer's, else the study answer's."""
    return _text(series, field.tag) or _text(study, field.tag)


class Finder:
    """Runs query rows against the source through the local Orthanc."""

    def __init__(
        self,
        local: LocalOrthanc,
        modality: str,
        series_filter: FilterConfig | None = None,
        *,
        max_answers: int | None = None,
        label: str = "query",
        fields: tuple[Field, ...] = (),
        on_image_check: Callable[[int, int], None] | None = None,
    ) -> None:
        self.local = local
        self.modality = modality
        self.series_filter = series_filter or FilterConfig()
        self.max_answers = max_answers
        self.label = label
        self.fields = fields
        self.on_image_check = on_image_check  # (series checked, series to check so far)
        self.image_checked = 0
        self.image_due = 0
        self.stats = FindStats()

    def run(self, rows: Iterable[QueryRow]) -> FindResult:
        """Every row, in order; series found by several rows are listed once (first row)."""
        found: dict[str, FoundSeries] = {}
        n = 0
        for row in rows:
            n += 1
            series = self.row(row)
            for s in series:
                if s.series_uid in found:
                    self.stats.duplicates += 1
                else:
                    found[s.series_uid] = s
            log.info("find.row", line=row.line, studies=len({s.study_uid for s in series}), series=len(series))
        return FindResult(n, list(found.values()), self.stats)

    def row(self, row: QueryRow) -> list[FoundSeries]:
        """The series one row finds: studies first, then each study's series."""
        filters = row.as_dict()
        study_uids: list[str | None] = [None]
        if "SeriesInstanceUID" in filters and "StudyInstanceUID" not in filters:
            study_uids = list(self._studies_of_series(row, filters["SeriesInstanceUID"]))
        result: list[FoundSeries] = []
        for study_uid in study_uids:
            if study_uid is not None:
                filters = {**row.as_dict(), "StudyInstanceUID": study_uid}
            for study in self._studies(row, filters):
                result.extend(self._series(row, study))
        return result

    # -- C-FIND ------------------------------------------------------------------------

    def _ask(self, row: QueryRow, level: str, query: dict[str, str], *, exact: bool = False) -> list[dict[str, Any]]:
        """One C-FIND; raises _Truncated when the answer set is refused or may be short.

        `exact` sends every key as given (Orthanc would drop non-main tags) and keys the
        answers by tag too.
        """
        self.stats.queries += 1
        try:
            if exact:
                _, answers = self.local.query(self.modality, level, query, normalize=False)
            else:
                _, answers = self.local.query(self.modality, level, query)
        except Unreachable:
            raise
        except OrthancError as exc:
            status = _refusal(exc)
            if status is None:
                raise FindError(f"{self._where(row)}: C-FIND at {level} level failed: {exc}") from exc
            self.stats.refused += 1
            raise _Truncated(f"the source refused the answer set (DIMSE status 0x{status:04X})") from exc
        if self.max_answers is not None and len(answers) >= self.max_answers:
            self.stats.full += 1
            raise _Truncated(f"{len(answers)} answers, the limit given by --max-answers")
        return answers

    def _where(self, row: QueryRow) -> str:
        return f"{self.label}:{row.line}"

    def _studies_of_series(self, row: QueryRow, series_uid: str) -> list[str]:
        """A series given without its study: ask for it at SERIES level (Study Root)."""
        query = {"StudyInstanceUID": "", "SeriesInstanceUID": series_uid}
        try:
            answers = self._ask(row, "Series", query)
        except FindError as exc:
            raise FindError(f"{exc} (a hierarchical PACS needs the StudyInstanceUID in the row too)") from exc
        except _Truncated as exc:
            raise FindError(f"{self._where(row)}: {exc.why} for one SeriesInstanceUID") from exc
        uids = {_text(a, "StudyInstanceUID") for a in answers if _text(a, "SeriesInstanceUID") == series_uid}
        return sorted(u for u in uids if is_valid_uid(u)[0])

    def _studies(self, row: QueryRow, filters: dict[str, str]) -> list[dict[str, Any]]:
        """STUDY-level answers for the row, splitting the query until no set is short."""
        base = {"StudyInstanceUID": "", "StudyDate": "", "StudyTime": "", "PatientID": ""}
        base.update({f.query_key: "" for f in self.fields})
        base.update({k: v for k, v in filters.items() if k in STUDY_KEYS})
        pending = [base]
        studies: dict[str, dict[str, Any]] = {}
        while pending:
            query = pending.pop()
            try:
                answers = self._ask(row, "Study", query, exact=bool(self.fields))
            except _Truncated as exc:
                halves = self._split(row, query, exc.why)
                pending.extend(reversed(halves))
                continue
            for answer in answers:
                uid = _text(answer, "StudyInstanceUID")
                if not is_valid_uid(uid)[0]:
                    self.stats.invalid += 1
                elif self._study_matches(filters, answer):
                    studies.setdefault(uid, answer)
                else:
                    self.stats.dropped += 1
        return sorted(
            studies.values(),
            key=lambda a: (_text(a, "StudyDate"), _text(a, "StudyTime"), _text(a, "StudyInstanceUID")),
        )

    def _split(self, row: QueryRow, query: dict[str, str], why: str) -> list[dict[str, str]]:
        where = self._where(row)
        dates = query.get("StudyDate")
        if not dates:
            raise FindError(
                f"{where}: too many studies for one answer set ({why}) and no StudyDate to split by:"
                " add a StudyDate range to the row"
            )
        halves = split_dates(dates)
        if halves is not None:
            self.stats.splits += 1
            log.info("find.split", line=row.line, by="StudyDate", range=dates, why=why)
            return [{**query, "StudyDate": h} for h in halves]
        times = query.get("StudyTime") or FULL_DAY
        halves = split_times(times)
        if halves is None:
            raise FindError(
                f"{where}: too many studies for one answer set on {dates} at StudyTime {times} ({why})"
                " and the query cannot be split further; narrow the row (PatientID, AccessionNumber...)"
            )
        self.stats.splits += 1
        if not query.get("StudyTime"):
            self.stats.warnings.append(
                f"{where}: {dates} has too many studies for one answer set: listed by StudyTime ranges;"
                " a study without a StudyTime on that day cannot be found that way"
            )
        log.info("find.split", line=row.line, by="StudyTime", date=dates, range=times, why=why)
        return [{**query, "StudyTime": h} for h in halves]

    @staticmethod
    def _study_matches(filters: dict[str, str], answer: Mapping[str, Any]) -> bool:
        """A second look at what the PACS echoed; what it did not echo is not held against it."""
        for key, wanted in filters.items():
            value = _text(answer, key)
            if key not in STUDY_KEYS or key == "StudyTime" or not value:
                continue
            if key in ("StudyDate", "PatientBirthDate"):
                if _DATE.fullmatch(value) and not in_date_range(wanted, value):
                    return False
            elif key == "StudyInstanceUID":
                if value != wanted:
                    return False
            elif not text_matches(wanted, value):
                return False
        return True

    def _series(self, row: QueryRow, study: Mapping[str, Any]) -> list[FoundSeries]:
        study_uid = _text(study, "StudyInstanceUID")
        filters = row.as_dict()
        query = {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": filters.get("SeriesInstanceUID", ""),
            "Modality": filters.get("Modality", ""),
            "SeriesDescription": filters.get("SeriesDescription", ""),
            "ProtocolName": filters.get("ProtocolName", ""),
            "SeriesNumber": "",
            "NumberOfSeriesRelatedInstances": "",
            **{f.query_key: "" for f in self.fields},
        }
        try:
            answers = self._ask(row, "Series", query, exact=bool(self.fields))
        except _Truncated as exc:
            raise FindError(
                f"{self._where(row)}: study {study_uid} has too many series for one answer set ({exc.why});"
                " a study cannot be split: raise the PACS's answer limit"
            ) from exc
        found = []
        for answer in answers:
            uid = _text(answer, "SeriesInstanceUID")
            if not is_valid_uid(uid)[0]:
                self.stats.invalid += 1
            elif self._series_matches(filters, study_uid, answer):
                found.append((positive_int(answer.get("SeriesNumber")) or 0, uid, answer))
            else:
                self.stats.dropped += 1
        if "ImageType" in filters:
            found = self._with_image_type(row, study_uid, filters["ImageType"], found)
        patient = _text(study, "PatientID") or None
        return [
            FoundSeries(
                series_uid=uid,
                study_uid=study_uid,
                modality=_text(a, "Modality") or None,
                study_date=_text(study, "StudyDate") or None,
                description=_text(a, "SeriesDescription") or None,
                instances=positive_int(a.get("NumberOfSeriesRelatedInstances")),
                patient_id=patient,
                line=row.line,
                extra=tuple(_field_value(a, study, f) for f in self.fields),
            )
            for _, uid, a in sorted(found, key=lambda f: (f[0], f[1]))
        ]

    # -- ImageType: an IMAGE-level C-FIND per series ------------------------------------------------

    def _with_image_type(
        self, row: QueryRow, study_uid: str, wanted: str, found: list[tuple[int, str, dict[str, Any]]]
    ) -> list[tuple[int, str, dict[str, Any]]]:
        """The series with at least one instance whose ImageType has every wanted value."""
        self.image_due += len(found)
        self._image_progress()
        kept = []
        for item in found:
            verdict = self._image_type_matches(row, study_uid, item[1], wanted)
            self.image_checked += 1
            self._image_progress()
            if verdict is None:
                self.stats.unverified["ImageType"] = self.stats.unverified.get("ImageType", 0) + 1
                kept.append(item)
            elif verdict:
                kept.append(item)
            else:
                self.stats.image_type_left_out += 1
        return kept

    def _image_progress(self) -> None:
        if self.on_image_check is not None:
            self.on_image_check(self.image_checked, self.image_due)

    def _image_type_matches(self, row: QueryRow, study_uid: str, series_uid: str, wanted: str) -> bool | None:
        """True/False by the instances' ImageType; None when the source answered none of them.

        The source is asked for every instance's ImageType and the match is made here: PACS
        differ in matching multi-valued CS (Orthanc 1.10.1 finds no instance for an exact
        `ORIGINAL\\PRIMARY\\AXIAL`, 1.12.7 does).
        """
        query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": "", "ImageType": ""}
        try:
            answers = self._ask(row, "Instance", query, exact=True)
        except _Truncated as exc:
            raise FindError(
                f"{self._where(row)}: series {series_uid} has too many instances for one IMAGE-level answer set"
                f" ({exc.why}); ImageType cannot be checked: raise the PACS's answer limit"
            ) from exc
        patterns = [_glob(w) for w in wanted.split("\\")]
        seen_any = False
        for answer in answers:
            if _text(answer, "SeriesInstanceUID") not in ("", series_uid):
                continue
            values = [v.strip() for v in _text(answer, "ImageType").split("\\") if v.strip()]
            seen_any = seen_any or bool(values)
            if all(any(p.fullmatch(v) for v in values) for p in patterns):
                return True
        return False if seen_any else None

    def _series_matches(self, filters: dict[str, str], study_uid: str, answer: Mapping[str, Any]) -> bool:
        echoed_study = _text(answer, "StudyInstanceUID")
        if echoed_study and echoed_study != study_uid:
            return False  # a PACS that ignored the study key
        wanted_uid = filters.get("SeriesInstanceUID")
        if wanted_uid and _text(answer, "SeriesInstanceUID") != wanted_uid:
            return False
        for key in ("Modality", "SeriesDescription", "ProtocolName"):
            wanted = filters.get(key)
            if not wanted:
                continue
            value = _text(answer, key)
            if not value:
                self.stats.unverified[key] = self.stats.unverified.get(key, 0) + 1
            elif not text_matches(wanted, value):
                return False
        return self.series_filter.accepts(_text(answer, "Modality") or None, _text(answer, "SeriesDescription") or None)


# -- the manifest -------------------------------------------------------------------------------------

MANIFEST_COLUMNS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "StudyDate",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
)


def _cell(value: str | None) -> str:
    return " ".join((value or "").split())  # no line breaks inside a manifest cell


def write_manifest(
    series: Iterable[FoundSeries], path: Path, *, show_phi: bool = False, fields: tuple[Field, ...] = ()
) -> int:
    """Write the manifest CSV atomically (temporary file, then rename); returns its rows.

    `fields` add their columns after the standard ones (a private tag's header is `(gggg,eeee)`).
    """
    patient_column = show_phi and not any(f.header == "PatientID" for f in fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            header = [*MANIFEST_COLUMNS, *(f.header for f in fields)]
            writer.writerow([*header, "PatientID"] if patient_column else header)
            for s in series:
                cells = [s.series_uid, s.study_uid, _cell(s.modality), _cell(s.study_date), _cell(s.description)]
                cells.append("" if s.instances is None else str(s.instances))
                cells.extend(_cell(v) for v in s.extra)
                if patient_column:
                    cells.append(_cell(s.patient_id))
                writer.writerow(cells)
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


# -- the estimate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """Throughput measured in an earlier run's journal (first issue to last finish)."""

    instances_per_s: float
    seconds_per_series: float
    journal: Path


def measured_rate(journal_path: Path) -> Rate | None:
    """The rate a journal's completed moves achieved; None when it measured none."""
    journal = Journal(journal_path, readonly=True)
    try:
        totals = journal.totals()
        complete = journal.counts()[State.COMPLETE.value]
    finally:
        journal.close()
    first, last = totals["first_issued_at"], totals["last_finished_at"]
    if not first or not last or last <= first or not complete or not totals["instances"]:
        return None
    elapsed = last - first
    return Rate(totals["instances"] / elapsed, elapsed / complete, Path(journal_path))


def estimate_seconds(result: FindResult, rate: Rate) -> float:
    """Known instances at the measured instance rate, series without a count at the series rate."""
    return result.instances / rate.instances_per_s + result.without_count * rate.seconds_per_series


# -- the command, as plain Python ------------------------------------------------------------------------

QUERY_TIMEOUT_S = 120.0  # one C-FIND through the local Orthanc (a large study query takes a while)


@dataclass
class FindOutcome:
    result: FindResult
    manifest: Path
    rate: Rate | None
    estimate_s: float | None
    estimate_note: str

    def summary(self) -> dict[str, Any]:
        """Totals for `--json` (no patient data)."""
        r, s = self.result, self.result.stats
        return {
            "rows": r.rows,
            "studies": r.studies,
            "series": len(r.series),
            "instances": r.instances,
            "series_without_count": r.without_count,
            "estimate_s": round(self.estimate_s, 3) if self.estimate_s is not None else None,
            "estimate": self.estimate_note,
            "queries": s.queries,
            "refused": s.refused,
            "full": s.full,
            "splits": s.splits,
            "dropped": s.dropped,
            "invalid": s.invalid,
            "duplicates": s.duplicates,
            "image_type_left_out": s.image_type_left_out,
            "unverified": dict(s.unverified),
            "warnings": list(s.warnings),
            "manifest": str(self.manifest),
        }


def open_local(cfg: Config) -> LocalOrthanc:
    """The local Orthanc, checked to answer and to know the source (else exit 2)."""
    from .transfer import open_local as open_checked

    return open_checked(cfg, timeout_s=QUERY_TIMEOUT_S)


def _estimate(result: FindResult, journal: Path | None, rate: Rate | None) -> tuple[float | None, str]:
    if journal is None:
        return None, "no estimate (give --journal of an earlier run to use its measured rate)"
    if rate is None:
        return None, f"no estimate ({journal} has no completed moves to measure a rate from)"
    seconds = estimate_seconds(result, rate)
    note = f"{_duration(seconds)} at {rate.instances_per_s:.1f} instances/s measured in {journal}"
    if result.without_count:
        note += f" ({result.without_count} series without a count at {rate.seconds_per_series:.1f} s each)"
    return seconds, note


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"~{s} s"
    if s < 3600:
        return f"~{s // 60} min {s % 60:02d} s"
    return f"~{s // 3600} h {s // 60 % 60:02d} min"


NAME_WARNING = (
    "PatientName matches only names written the way the row writes them: names are stored"
    " inconsistently (DOE^JOHN, Doe^John, DOE^JOHN^^DR, with or without a middle name) and some"
    " PACS match case-sensitively; a series under another spelling is not found. Prefer PatientID"
)


def _warn_names_and_fields(rows: list[QueryRow], fields: tuple[Field, ...], result: FindResult) -> None:
    warnings = result.stats.warnings
    if any(row.get("PatientName") for row in rows):
        warnings.append(NAME_WARNING)
    for i, f in enumerate(fields):
        if result.series and not any(s.extra[i] for s in result.series):
            why = " (Orthanc's REST API answers private tags without their value)" if f.private else ""
            warnings.append(f"--fields {f.header}: the source answered no value for any series{why}")


def run_find(
    cfg: Config,
    query: Path,
    out: Path,
    *,
    allow_wildcards: bool = False,
    show_phi: bool = False,
    max_answers: int | None = None,
    journal: Path | None = None,
    fields: str | None = None,
    on_image_check: Callable[[int, int], None] | None = None,
) -> FindOutcome:
    """The `find` command: validate, query, write the manifest, estimate. Bad input writes nothing.

    `fields` is `--fields` (`Keyword,(gggg,eeee),...`); `on_image_check(done, due)` follows
    the IMAGE-level C-FINDs an ImageType column costs.
    """
    if Path(out).resolve() == Path(query).resolve():
        raise FindInputError("--out: the manifest would overwrite the query file")
    try:
        chosen = parse_fields(fields, show_phi=show_phi, skip=MANIFEST_COLUMNS)
    except FieldsError as exc:
        raise FindInputError(str(exc)) from None
    rows = read_query(query, allow_wildcards=allow_wildcards)
    rate = measured_rate(journal) if journal is not None else None
    local = open_local(cfg)
    try:
        finder = Finder(
            local, cfg.source.modality, cfg.filter, max_answers=max_answers, label=str(query),
            fields=chosen, on_image_check=on_image_check,
        )  # fmt: skip
        result = finder.run(rows)
    finally:
        local.close()
    _warn_names_and_fields(rows, chosen, result)
    write_manifest(result.series, out, show_phi=show_phi, fields=chosen)
    seconds, note = _estimate(result, journal, rate)
    log.info("find.done", rows=result.rows, studies=result.studies, series=len(result.series),
             queries=result.stats.queries, splits=result.stats.splits)  # fmt: skip
    return FindOutcome(result, Path(out), rate, seconds, note)
