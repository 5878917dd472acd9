"""`find` without a PACS: the query CSV contract (every refused file with its message), range
splitting, answer matching, the manifest, the estimate, and the search logic on a scripted source."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from dicom_transfer.batch import read_batch
from dicom_transfer.errors import BatchError, OrthancError
from dicom_transfer.fields import FieldsError, parse_fields
from dicom_transfer.find import (
    Finder,
    FindError,
    FindResult,
    FindStats,
    FoundSeries,
    QueryRow,
    estimate_seconds,
    measured_rate,
    read_query,
    split_dates,
    split_times,
    text_matches,
    write_manifest,
)
from dicom_transfer.journal import Journal
from dicom_transfer.states import Event, State

ST = "1.2.826.0.1.3680043.8.498.100"
S1 = "1.2.826.0.1.3680043.8.498.1"


def write(tmp_path: Path, text: str, name: str = "query.csv", raw: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else text.encode("utf-8"))
    return path


def problems(path: Path, **kw: bool) -> list[str]:
    with pytest.raises(BatchError) as info:
        read_query(path, **kw)
    return [str(p).removeprefix(f"{path.parent}/") for p in info.value.problems]


# -- the table of refused query files ------------------------------------------------------------

REFUSED = [
    # (query file, expected problems); every problem of a file is reported at once
    ("", ["query.csv:1:1: empty file: expected a header of query keys such as StudyDate,PatientID"]),
    ("StudyDate,PatientID\n", ["query.csv:1:1: no rows after the header"]),
    ("StudyDate,PatientID\n\n\n", ["query.csv:1:1: no rows after the header"]),
    (
        "StudyDate,patientID\n20230101,P1\n",
        ["query.csv:1:2: unknown column 'patientID' (did you mean PatientID?)"],
    ),
    (
        "SeriesDecription,StudyDates,Protocol\nx,20230101,y\n",
        [
            "query.csv:1:1: unknown column 'SeriesDecription' (did you mean SeriesDescription?)",
            "query.csv:1:2: unknown column 'StudyDates' (did you mean StudyDate?)",
            "query.csv:1:3: unknown column 'Protocol' (did you mean ProtocolName?)",
        ],
    ),
    (
        "StudyDate,PatientName\n20230101,DOE^J*\n,SMITH^ANNA\n",
        ["query.csv:2:2: PatientName: wildcards ('*', '?') need --allow-wildcards"],
    ),
    (
        "StudyDate,ImageType\n20230101,LOCALIZER\\\\DERIVED\n20230101,local-izer\n",
        [
            "query.csv:2:2: ImageType: 'LOCALIZER\\\\\\\\DERIVED' has an empty value"
            " (values are separated by a single backslash)",
            "query.csv:3:2: ImageType: 'local-izer' is not an ImageType value (letters, digits, '_', space)",
        ],
    ),
    ("ImageType\nLOCALIZER\n", ["query.csv:2:1: row filters only by ImageType: the study query would ask"
                                " the whole PACS; add a PatientID, StudyDate, AccessionNumber or UID"]),
    (
        "StudyDate,ModalitiesInStudy\n20230101,CT\n",
        ["query.csv:1:2: ModalitiesInStudy is not a query column (PACS answer it short): use Modality"],
    ),
    (
        "StudyDate,SeriesNumber\n20230101,3\n",
        [
            "query.csv:1:2: SeriesNumber is not a query column (query columns: PatientID, PatientName, StudyDate,"
            " StudyTime, AccessionNumber, StudyInstanceUID, SeriesInstanceUID, Modality, StudyDescription,"
            " SeriesDescription, ProtocolName, PatientBirthDate, ImageType)"
        ],
    ),
    (
        "StudyDate,,StudyDate\n20230101,,20230102\n",
        ["query.csv:1:2: empty column name", "query.csv:1:3: duplicate column 'StudyDate' (also column 1)"],
    ),
    (
        "StudyDate\tPatientID\n20230101\tP\n",
        ["query.csv:1:1: unknown column 'StudyDate\\tPatientID' (the delimiter must be ',' or ';')"],
    ),
    (
        "StudyDate\n2023-01-01\n",
        ["query.csv:2:1: StudyDate: '2023-01-01' is not a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD"],
    ),
    ("StudyDate\n20230230\n", ["query.csv:2:1: StudyDate: '20230230' is not a calendar date"]),
    ("StudyDate\n20230301-20230101\n", ["query.csv:2:1: StudyDate: range '20230301-20230101' ends before it starts"]),
    (
        "StudyDate\n20230101-\n",
        ["query.csv:2:1: StudyDate: open range '20230101-': give both ends (YYYYMMDD-YYYYMMDD)"],
    ),
    (
        "StudyDate\n-20230101\n",
        ["query.csv:2:1: StudyDate: open range '-20230101': give both ends (YYYYMMDD-YYYYMMDD)"],
    ),
    (
        "StudyDate\n2023*\n",
        ["query.csv:2:1: StudyDate: wildcards do not apply to dates: use a range YYYYMMDD-YYYYMMDD"],
    ),
    (
        "StudyDate,StudyTime\n20230101,0800-2500\n",
        ["query.csv:2:2: StudyTime: '0800-2500' is not a time HHMMSS or a range HHMMSS-HHMMSS"],
    ),
    (
        "StudyDate,StudyTime\n20230101,1200-0800\n",
        ["query.csv:2:2: StudyTime: range '1200-0800' ends before it starts"],
    ),
    (
        "PatientBirthDate\n1970\n",
        ["query.csv:2:1: PatientBirthDate: the value is not a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD"],
    ),
    (
        "StudyInstanceUID\n1.2.x\n",
        ["query.csv:2:1: StudyInstanceUID: '1.2.x' is not a valid UID: must contain only digits and dots"],
    ),
    (
        "StudyInstanceUID\n1.02\n",
        ["query.csv:2:1: StudyInstanceUID: '1.02' is not a valid UID: component '02' must not have a leading zero"],
    ),
    (
        "SeriesInstanceUID\n1.2.*\n",
        ["query.csv:2:1: SeriesInstanceUID: UIDs cannot be matched with wildcards ('1.2.*')"],
    ),
    ("PatientID\nSMITH*\n", ["query.csv:2:1: PatientID: wildcards ('*', '?') need --allow-wildcards"]),
    (
        "StudyDate,SeriesDescription\n20230101,T?\n",
        ["query.csv:2:2: SeriesDescription: wildcards ('*', '?') need --allow-wildcards ('T?')"],
    ),
    (
        "StudyDate,Modality\n20230101,C-T\n",
        ["query.csv:2:2: Modality: 'C-T' is not a modality code (letters, digits, '_')"],
    ),
    ("AccessionNumber\nACC12345678901234567\n", ["query.csv:2:1: AccessionNumber: longer than 16 characters (20)"]),
    (
        "StudyDate,ProtocolName\n20230101,T1\\T2\n",
        ["query.csv:2:2: ProtocolName: must not contain a backslash (one value per cell)"],
    ),
    ("StudyDate,PatientID\n,\n", ["query.csv:2:1: row has no filter: it would ask the whole PACS"]),
    (
        "Modality,SeriesDescription,StudyTime\nCT,Thorax,0800-1000\n",
        [
            "query.csv:2:1: row filters only by Modality, SeriesDescription, StudyTime: the study query would ask"
            " the whole PACS; add a PatientID, StudyDate, AccessionNumber or UID"
        ],
    ),
    ("StudyDate,PatientID\n20230101,P\n20230101,P\n", ["query.csv:3:1: duplicates the row at line 2"]),
    ("StudyDate,PatientID\n20230101,P,x\n", ["query.csv:2:3: expected 2 cells like the header, got 3"]),
]


@pytest.mark.parametrize(("text", "expected"), REFUSED, ids=[f"refused-{i}" for i in range(len(REFUSED))])
def test_refused_query_files(tmp_path: Path, text: str, expected: list[str]) -> None:
    """Each refused query file gives exactly these `file:line:col` problems."""
    assert problems(write(tmp_path, text)) == expected


def test_all_problems_at_once(tmp_path: Path) -> None:
    """Problems of the header and of several rows come together, in file order."""
    path = write(tmp_path, "StudyDate,patientID,Modality\n2023,,\n20230101,,c t\n,,CT\n")
    assert problems(path) == [
        "query.csv:1:2: unknown column 'patientID' (did you mean PatientID?)",
        "query.csv:2:1: StudyDate: '2023' is not a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD",
    ]


def test_patient_values_never_shown(tmp_path: Path) -> None:
    """PatientID and PatientBirthDate values appear in no message."""
    path = write(tmp_path, "PatientID,PatientBirthDate\nSMITH*JOHN,19701301\n" + "X" * 70 + ",\n")
    found = problems(path)
    assert found == [
        "query.csv:2:1: PatientID: wildcards ('*', '?') need --allow-wildcards",
        "query.csv:2:2: PatientBirthDate: the value is not a calendar date",
        "query.csv:3:1: PatientID: longer than 64 characters (70)",
    ]
    assert not any("SMITH" in p or "19701301" in p or "XXX" in p for p in found)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff\xfeS\x00", "query.csv:1:1: the file is UTF-16 text: save it as UTF-8"),
        (b"StudyDate\n2023\x000101\n", "query.csv:2:5: the file contains a NUL byte: not a text file"),
        (b"StudyDate\n2023\xe90101\n", "query.csv:2:5: the file is not UTF-8 text (byte 0xe9)"),
    ],
)
def test_not_text(tmp_path: Path, raw: bytes, expected: str) -> None:
    """A file that is not UTF-8 text is refused at the first bad byte."""
    assert problems(write(tmp_path, "", raw=raw)) == [expected]


def test_wildcards_only_where_they_mean_something(tmp_path: Path) -> None:
    """--allow-wildcards opens text columns, never UIDs or dates."""
    path = write(tmp_path, "PatientID,StudyDate,StudyInstanceUID\nSMITH*,2023*,1.2.*\n")
    assert problems(path, allow_wildcards=True) == [
        "query.csv:2:2: StudyDate: wildcards do not apply to dates: use a range YYYYMMDD-YYYYMMDD",
        "query.csv:2:3: StudyInstanceUID: UIDs cannot be matched with wildcards ('1.2.*')",
    ]


def test_star_alone_is_no_filter(tmp_path: Path) -> None:
    """A cell of only `*` matches everything: a row with nothing else asks the whole PACS."""
    path = write(tmp_path, "PatientID,Modality\n*,CT\n")
    assert problems(path, allow_wildcards=True) == [
        "query.csv:2:1: row filters only by Modality: the study query would ask the whole PACS;"
        " add a PatientID, StudyDate, AccessionNumber or UID"
    ]


# -- valid query files ---------------------------------------------------------------------------------


def test_valid_rows(tmp_path: Path) -> None:
    """Empty cells are not filters; Modality is upper-cased; lines are physical; BOM and `;` are fine."""
    text = "\ufeffStudyDate;PatientID;Modality;StudyTime\n\n20230101;;ct;\n20230101-20230131;P 1;;0800-120000.5\n"
    rows = read_query(write(tmp_path, text))
    assert rows == [
        QueryRow(3, (("StudyDate", "20230101"), ("Modality", "CT"))),
        QueryRow(4, (("PatientID", "P 1"), ("StudyDate", "20230101-20230131"), ("StudyTime", "0800-120000.5"))),
    ]


def test_series_uid_alone_is_a_filter(tmp_path: Path) -> None:
    """A SeriesInstanceUID narrows a row by itself; wildcards pass in text columns with the flag."""
    rows = read_query(write(tmp_path, f"SeriesInstanceUID,SeriesDescription\n{S1},T1*\n"), allow_wildcards=True)
    assert rows == [QueryRow(2, (("SeriesInstanceUID", S1), ("SeriesDescription", "T1*")))]


# -- splitting and matching ----------------------------------------------------------------------------


def test_split_dates() -> None:
    """A date range splits in two halves that cover it exactly; a single day does not split."""
    assert split_dates("20230101-20230131") == ["20230101-20230116", "20230117-20230131"]
    assert split_dates("20230101-20230102") == ["20230101", "20230102"]
    assert split_dates("20221231-20230101") == ["20221231", "20230101"]
    assert split_dates("20230101") is None


def test_split_times() -> None:
    """A time range splits at a whole second, keeping its outer ends as written; below a second it stops."""
    assert split_times("000000-235959.999999") == ["000000-115959.999999", "120000-235959.999999"]
    assert split_times("08-10") == ["08-090000.999999", "090001-10"]
    assert split_times("080000-080001") == ["080000-080000.999999", "080001-080001"]
    assert split_times("080000-080000.5") is None
    assert split_times("080000") is None


@pytest.mark.parametrize(
    ("pattern", "value", "ok"),
    [("CT", "ct", True), ("T1*", "t1 axial", True), ("T?", "T2", True), ("T?", "T22", False),
     ("a.b", "aXb", False), ("[x]", "[x]", True), ("CBCT", "CBCT pelvis", False)],
)  # fmt: skip
def test_text_matches(pattern: str, value: str, ok: bool) -> None:
    """Answers are matched with DICOM wildcards, case-insensitively, nothing else special."""
    assert text_matches(pattern, value) is ok


# -- the search, on a scripted source --------------------------------------------------------------------


class ScriptedSource:
    """Answers C-FINDs from a list of studies like an Orthanc with LimitFindResults (0xFE00 past it)."""

    def __init__(self, studies: list[tuple[str, str, str]], limit: int, series_per_study: int = 1) -> None:
        self.studies = studies  # (uid, date, time)
        self.limit = limit
        self.series_per_study = series_per_study
        self.asked: list[tuple[str, dict[str, str]]] = []

    def query(self, modality: str, level: str, query: dict[str, str]) -> tuple[str, list[dict[str, str]]]:
        self.asked.append((level, dict(query)))
        if level == "Study":
            answers = [
                {"StudyInstanceUID": uid, "StudyDate": date, "StudyTime": time}
                for uid, date, time in self.studies
                if self._date_ok(query.get("StudyDate", ""), date) and self._time_ok(query.get("StudyTime", ""), time)
            ]
        else:
            answers = [
                {"StudyInstanceUID": query["StudyInstanceUID"], "SeriesInstanceUID": f"{query['StudyInstanceUID']}.{n}",
                 "Modality": "CT", "NumberOfSeriesRelatedInstances": "3", "SeriesNumber": str(n)}
                for n in range(1, self.series_per_study + 1)
            ]  # fmt: skip
        if len(answers) > self.limit:
            raise OrthancError(500, "/modalities/PACS/query", "Error in the network protocol",
                               'C-FIND SCU to AET "HOSPITAL" has failed with DIMSE status 0xFE00')  # fmt: skip
        return "q", answers

    @staticmethod
    def _date_ok(wanted: str, value: str) -> bool:
        lo, _, hi = wanted.partition("-")
        return not wanted or lo <= value <= (hi or lo)

    @staticmethod
    def _time_ok(wanted: str, value: str) -> bool:
        lo, _, hi = wanted.partition("-")
        return not wanted or float(lo) <= float(value) <= float(hi or lo)


def _studies(n: int, date: str, step_s: int = 60) -> list[tuple[str, str, str]]:
    return [(f"1.2.3.{date}.{i}", date, f"{(8 * 3600 + i * step_s) // 3600:02d}{(i * step_s) // 60 % 60:02d}00")
            for i in range(n)]  # fmt: skip


def test_search_splits_until_complete() -> None:
    """Refused answer sets are split (dates, then times of a day) until every study is found once."""
    studies = _studies(7, "20230310") + _studies(3, "20230101") + _studies(2, "20231231")
    source = ScriptedSource(studies, limit=4)
    result = Finder(source, "PACS").run([QueryRow(2, (("StudyDate", "20230101-20231231"),))])  # type: ignore[arg-type]
    assert sorted(s.study_uid for s in result.series) == sorted(uid for uid, _, _ in studies)
    assert result.instances == 3 * len(studies) and result.stats.refused > 0
    assert any("StudyTime" in w for w in result.stats.warnings)


def test_search_count_at_max_answers_counts_as_truncated() -> None:
    """With max_answers N, an answer set of N is split although the source did not refuse it."""
    source = ScriptedSource(_studies(3, "20230101") + _studies(3, "20230102"), limit=100)
    finder = Finder(source, "PACS", max_answers=6)  # type: ignore[arg-type]
    result = finder.run([QueryRow(2, (("StudyDate", "20230101-20230102"),))])
    assert len(result.series) == 6 and result.stats.full == 1 and result.stats.refused == 0


def test_search_fails_when_one_second_overflows() -> None:
    """Studies sharing one second beyond the limit cannot be split: the error names the row."""
    source = ScriptedSource(_studies(5, "20230101", step_s=0), limit=4)
    with pytest.raises(FindError, match=r"^query.csv:7: too many studies for one answer set on 20230101"):
        Finder(source, "PACS", label="query.csv").run([QueryRow(7, (("StudyDate", "20230101"),))])  # type: ignore[arg-type]


def test_search_fails_when_a_study_has_too_many_series() -> None:
    """A study's series cannot be split: its overflow fails naming the row and the study."""
    source = ScriptedSource(_studies(1, "20230101"), limit=4, series_per_study=5)
    with pytest.raises(FindError, match=r"query.csv:2: study 1\.2\.3\.20230101\.0 has too many series"):
        Finder(source, "PACS", label="query.csv").run([QueryRow(2, (("StudyDate", "20230101"),))])  # type: ignore[arg-type]


def test_search_never_filters_studies_by_modality() -> None:
    """The study query never carries ModalitiesInStudy or Modality; series queries carry the study UID."""
    source = ScriptedSource(_studies(2, "20230101"), limit=10)
    Finder(source, "PACS").run([QueryRow(2, (("StudyDate", "20230101"), ("Modality", "MR")))])  # type: ignore[arg-type]
    for level, query in source.asked:
        if level == "Study":
            assert "ModalitiesInStudy" not in query and "Modality" not in query
        else:
            assert query["StudyInstanceUID"] and query["Modality"] == "MR"


# -- manifest and estimate ---------------------------------------------------------------------------------


def _found(i: int, instances: int | None = 5, description: str | None = "T1\naxial, thin") -> FoundSeries:
    return FoundSeries(f"{S1}{i}", ST, "MR", "20230101", description, instances, "PAT1", 2)


def test_manifest_is_a_batch(tmp_path: Path) -> None:
    """The manifest has the contract columns, no PatientID unless asked, and `--batch` reads it."""
    path = tmp_path / "out" / "manifest.csv"
    assert write_manifest([_found(1), _found(2, None)], path) == 2
    lines = path.read_text().splitlines()
    assert (
        lines[0]
        == "SeriesInstanceUID,StudyInstanceUID,Modality,StudyDate,SeriesDescription,NumberOfSeriesRelatedInstances"
    )
    assert lines[1] == f'{S1}1,{ST},MR,20230101,"T1 axial, thin",5'
    assert lines[2].endswith(",")
    assert [r.series_uid for r in read_batch(path)] == [f"{S1}1", f"{S1}2"]
    write_manifest([_found(1)], path, show_phi=True)
    assert path.read_text().splitlines()[0].endswith(",PatientID") and "PAT1" in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["manifest.csv"]


def test_estimate_from_journal(tmp_path: Path) -> None:
    """The rate of a journal's completed moves gives the estimate; series without a count use seconds per series."""
    now = [1000.0]
    journal = Journal(tmp_path / "j.sqlite", clock=lambda: now[0])
    journal.plan([("1.2.1", ST, None, 2), ("1.2.2", ST, None, 3)], tmp_path / "b.csv")
    for uid, start, end in (("1.2.1", 1000.0, 1010.0), ("1.2.2", 1010.0, 1020.0)):
        journal.transition(uid, State.PENDING, Event.QUERIED, expected=50)
        journal.transition(uid, State.QUERIED, Event.ISSUED, first_issued_at=start, issued_at=start)
        journal.transition(uid, State.MOVING, Event.ARRIVED, received=50, finished_at=end)
    journal.close()
    rate = measured_rate(tmp_path / "j.sqlite")
    assert rate is not None and rate.instances_per_s == 5.0 and rate.seconds_per_series == 10.0
    result = FindResult(1, [_found(1, 100), _found(2, None)], FindStats())
    assert estimate_seconds(result, rate) == 100 / 5 + 10


def test_estimate_needs_completed_moves(tmp_path: Path) -> None:
    """A journal without completed moves measures no rate."""
    journal = Journal(tmp_path / "j.sqlite")
    journal.plan([("1.2.1", ST, None, 2)], tmp_path / "b.csv")
    journal.close()
    assert measured_rate(tmp_path / "j.sqlite") is None


# -- the command line, before any network ---------------------------------------------------------------------


def test_cli_bad_query_exit_2_nothing_written(tmp_path: Path) -> None:
    """A bad query file: every problem on stderr, exit 2, no manifest, no traceback (no Orthanc needed)."""
    query = write(tmp_path, "StudyDate,patientID\n2023,\n,\n")
    out = tmp_path / "manifest.csv"
    res = run_cli("find", "--query", query, "--out", out)
    assert res.returncode == 2
    assert f"{query}:1:2: unknown column 'patientID' (did you mean PatientID?)" in res.stderr
    assert f"{query}:2:1: StudyDate: '2023' is not a date" in res.stderr
    assert "2 problem(s) in the query file; nothing was written" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_cli_out_must_not_be_the_query(tmp_path: Path) -> None:
    """--out naming the query file is refused before anything happens."""
    query = write(tmp_path, "StudyDate\n20230101\n")
    res = run_cli("find", "--query", query, "--out", query)
    assert res.returncode == 2 and "overwrite the query file" in res.stderr
    assert query.read_text() == "StudyDate\n20230101\n"


# -- --fields and the manifest's tag columns ---------------------------------------------------------------


def test_parse_fields_keywords_tags_and_private_headers() -> None:
    """Keywords and (gggg,eeee) parse in order, once each; a private tag keeps its (GGGG,EEEE) header."""
    fields = parse_fields(
        " SliceThickness,(0008,1030) ,(0009,1001),(0018,0050),SeriesDescription", show_phi=False,
        skip=("SeriesDescription",),
    )  # fmt: skip
    assert [(f.header, f.query_key, f.tag, f.private) for f in fields] == [
        ("SliceThickness", "SliceThickness", "0018,0050", False),
        ("(0008,1030)", "0008,1030", "0008,1030", False),
        ("(0009,1001)", "0009,1001", "0009,1001", True),
    ]
    assert parse_fields(None, show_phi=False) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PatientName", "--fields: PatientName is patient data: it needs --show-phi"),
        ("StudyDate,(0010,0020)", "--fields: (0010,0020) is patient data: it needs --show-phi"),
        ("ReferringPhysicianName", "--fields: ReferringPhysicianName is patient data: it needs --show-phi"),
        ("SliceThicknes", "--fields: unknown keyword 'SliceThicknes' (did you mean SliceThickness?)"),
        ("(0008,1111)", "--fields: (0008,1111) holds a sequence or binary data (SQ), not a value"),
        ("(0008,zz30)", "--fields: '(0008,zz30)' is not a tag: write (gggg,eeee) with hexadecimal digits"),
        ("(0002,0010)", "--fields: (0002,0010) is not a data element a C-FIND can ask for"),
        (" , ", "--fields: no field given (write e.g. --fields SliceThickness,(0020,1208))"),
    ],
)
def test_parse_fields_refuses_naming_the_field(text: str, message: str) -> None:
    """Patient data without --show-phi, unknown names, sequences and meta tags are refused naming the field."""
    with pytest.raises(FieldsError) as info:
        parse_fields(text, show_phi=False)
    assert str(info.value) == message


def test_patient_data_fields_allowed_with_show_phi() -> None:
    """With --show-phi the Patient group and person names are columns like any other."""
    fields = parse_fields("PatientName,(0010,0030)", show_phi=True)
    assert [f.header for f in fields] == ["PatientName", "(0010,0030)"]


def test_manifest_with_tag_columns_is_a_valid_batch(tmp_path: Path) -> None:
    """A manifest with (gggg,eeee) columns is accepted by --batch; a malformed tag header is still refused."""
    fields = parse_fields("SliceThickness,(0009,1001)", show_phi=False)
    series = [FoundSeries(S1, ST, "CT", "20230101", "axial", 3, None, 2, extra=("2.5", ""))]
    out = tmp_path / "m.csv"
    write_manifest(series, out, fields=fields)
    assert out.read_text().splitlines() == [
        "SeriesInstanceUID,StudyInstanceUID,Modality,StudyDate,SeriesDescription,NumberOfSeriesRelatedInstances,"
        'SliceThickness,"(0009,1001)"',  # quoted: the header holds the delimiter
        f"{S1},{ST},CT,20230101,axial,3,2.5,",
    ]
    assert [r.series_uid for r in read_batch(out)] == [S1]
    bad = write(tmp_path, f'SeriesInstanceUID,"(0009,10)"\n{S1},x\n', name="bad.csv")
    with pytest.raises(BatchError) as info:
        read_batch(bad)
    assert [str(p).removeprefix(f"{tmp_path}/") for p in info.value.problems] == [
        "bad.csv:1:2: unknown column '(0009,10)' (not a DICOM keyword)"
    ]
