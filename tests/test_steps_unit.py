"""After-arrival steps without servers: templates, safe names, config errors, lookup, tags file."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest

from dicom_transfer.anonymize import Lookup, LookupTableError, is_uid
from dicom_transfer.config import load_config
from dicom_transfer.errors import ConfigError
from dicom_transfer.export import (
    DEFAULT_TEMPLATE,
    TemplateError,
    parse_template,
    part_path,
    safe_component,
    tag_key,
    write_atomic,
)
from dicom_transfer.steps import ensure_schema, settings_of, validate
from dicom_transfer.tags import TagsFile, TagsSettings, parse_columns, rows_for

NO_ENV: dict[str, str] = {}


def tags_of(**values: str | None) -> dict[str, str | None]:
    """Orthanc `?short` tags from keywords: tags_of(PatientID="X") → {"0010,0020": "X"}."""
    return {tag_key(k): v for k, v in values.items()}


def config(tmp_path: Path, text: str):
    path = tmp_path / "transfer.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=NO_ENV)


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config(tmp_path, text))
    return str(info.value)


# -- template --------------------------------------------------------------------------------------


def test_default_template_renders_one_file_per_instance():
    """The default template gives patient/study/series folders and a zero-padded file name."""
    t = parse_template(DEFAULT_TEMPLATE)
    assert t.keywords == ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber")
    path = t.render(tags_of(PatientID="P1", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3", InstanceNumber="7"))
    assert path == "P1/1.2/1.2.3/0007.dcm"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{PatientNmae}/{InstanceNumber}.dcm", "unknown keyword 'PatientNmae' (did you mean PatientName?)"),
        ("{PatientID}/", "must end in a file name"),
        ("/{PatientID}/x.dcm", "must be relative to export.dir"),
        ("{PatientID}\\x.dcm", "use / to separate folders"),
        ("{PatientID}//x.dcm", "empty folder name"),
        ("../{PatientID}/x.dcm", "must not contain . or .. folders"),
        ("a/./{InstanceNumber}.dcm", "must not contain . or .. folders"),
        ("{}.dcm", "empty {} field"),
        ("{0}.dcm", "'0' is not a DICOM keyword"),
        ("{PatientID.real}.dcm", "only plain DICOM keywords"),
        ("{PatientID[0]}.dcm", "only plain DICOM keywords"),
        ("{PatientID!r}.dcm", "conversions"),
        ("{PatientID:04d}.dcm", "format spec '04d' does not apply to PatientID (a text value)"),
        ("{InstanceNumber:{x}}.dcm", "nested fields"),
        ("{PixelData}.dcm", "binary data"),
        ("{ReferencedImageSequence}.dcm", "is a sequence"),
        ("{PatientID.dcm", "is not a valid template"),
        ("", "must be a non-empty string"),
    ],
)
def test_bad_templates_say_why(template: str, reason: str):
    """Every malformed template is refused with a reason naming the problem."""
    with pytest.raises(TemplateError) as info:
        parse_template(template)
    assert reason in str(info.value)


def test_numeric_formats_and_missing_values():
    """Int specs apply to integer VRs (also '3.0'); a missing or non-numeric value becomes '_'."""
    t = parse_template("{SeriesNumber:03d}-{SliceThickness:.1f}/{InstanceNumber:04d}.dcm")
    assert t.render(tags_of(SeriesNumber="2", SliceThickness="2.50", InstanceNumber="3.0")) == "002-2.5/0003.dcm"
    assert t.render(tags_of(SeriesNumber=None, SliceThickness="x")) == "_-_/_.dcm"
    assert parse_template("{InstanceNumber:0>6}.dcm").render(tags_of(InstanceNumber="12")) == "000012.dcm"


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("..", "_"),
        (".", "_"),
        ("", "_"),
        ("   ", "_"),
        ("../../etc", ".._.._etc"),
        ("a/b\\c", "a_b_c"),
        ("x\x00y\x1fz\x7f", "x_y_z_"),
        ("C:con?*", "C_con__"),
        ("  Müller^Änne  ", "Müller^Änne"),
        ("1.2.840.113619", "1.2.840.113619"),
    ],
)
def test_safe_component(value: str, safe: str):
    """Tag values never escape their path component: separators, NUL, control chars, . and .. go."""
    assert safe_component(value) == safe


def test_hostile_tag_values_stay_inside_export_dir(tmp_path: Path):
    """Whatever the PACS put in the tags, the rendered path resolves inside export.dir."""
    t = parse_template("{PatientID}/{StudyDescription}/{SeriesDescription}_{InstanceNumber:04d}.dcm")
    hostile = tags_of(
        PatientID="..", StudyDescription="../../../../etc/passwd", SeriesDescription="/", InstanceNumber=""
    )
    rel = t.render(hostile)
    assert rel == "_/.._.._.._.._etc_passwd/___.dcm"
    assert tmp_path in (tmp_path / rel).resolve().parents


def test_overlong_names_are_shortened_keeping_the_end():
    """A name over 255 bytes is cut, made unique with a digest, and keeps its extension."""
    t = parse_template("{SeriesDescription}.dcm")
    a = t.render(tags_of(SeriesDescription="é" * 300 + "a"))
    b = t.render(tags_of(SeriesDescription="é" * 300 + "b"))
    assert len(a.encode()) <= 255 and a.endswith("a.dcm") and a != b


# -- config validation --------------------------------------------------------------------------------


def test_validate_accepts_the_design_example(tmp_path: Path):
    """The DESIGN.md example sections validate; relative paths resolve beside the config file."""
    cfg = config(
        tmp_path,
        "export: {dir: out/, path: '{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{InstanceNumber:04d}.dcm',"
        " decompress: false}\n"
        "tags: {file: tags.csv, level: instance, keywords: [StudyDate,"
        " {keyword: SliceThickness, alias: thickness, default: ''}]}\n"
        "anonymize: {lookup: lookup.csv, keep: [SeriesDescription], replace: {InstitutionName: X},"
        " delete_original: false}\n",
    )
    validate(cfg)
    s = settings_of(cfg)
    assert s.enabled == ("anonymize", "tags", "export")
    assert s.export is not None and s.export.root == tmp_path / "out"
    assert s.tags is not None and s.tags.file == tmp_path / "tags.csv" and s.tags.header == ["StudyDate", "thickness"]
    assert s.anonymize is not None and s.anonymize.lookup == tmp_path / "lookup.csv"


def test_export_path_error_names_key_and_suggests(tmp_path: Path):
    """A template typo is a ConfigError on export.path with file:line:col and a suggestion."""
    message = config_error(tmp_path, "export:\n  dir: out\n  path: '{PatientNmae}/{InstanceNumber}.dcm'\n")
    assert message.endswith("export.path: unknown keyword 'PatientNmae' (did you mean PatientName?)")
    assert "transfer.yaml:3:3:" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("export: {dirr: out}\n", "export.dirr: unknown key (did you mean dir?)"),
        ("export: {path: 'x/{InstanceNumber}.dcm'}\n", "export.dir: is required"),
        ("export: {dir: 3}\n", "export.dir: must be a path"),
        ("export: {dir: out, decompress: 'yes'}\n", "export.decompress: must be true or false"),
        ("tags: {keywords: [StudyDate]}\n", "tags.file: is required"),
        ("tags: {file: t.csv, level: study, keywords: [StudyDate]}\n", "tags.level: must be one of instance, series"),
        ("tags: {file: t.csv, keywords: []}\n", "tags.keywords: must be a non-empty list"),
        ("tags: {file: t.csv, keywords: [SliceThikness]}\n", "did you mean SliceThickness?"),
        ("tags: {file: t.csv, keywords: [StudyDate, {keyword: StudyDate}]}\n", "item 2: column 'StudyDate' appears"),
        ("tags: {file: t.csv, keywords: [{keyword: StudyDate, aliass: d}]}\n", "item 1: unknown key 'aliass'"),
        ("tags: {file: t.csv, keywords: [{alias: d}]}\n", "item 1: keyword is required"),
        ("tags: {file: t.csv, keywords: [ReferencedImageSequence]}\n", "is a sequence"),
        ("tags: {file: t.csv, keywords: [{keyword: StudyDate, default: [1]}]}\n", "default must be"),
        ("tags: {file: t.csv, keywords: [StudyDate], extra: 1}\n", "tags.extra: unknown key"),
        ("anonymize: {keep: []}\n", "anonymize.lookup: is required"),
        ("anonymize: {lookup: l.csv, keep: [PatientID]}\n", "anonymize.keep: item 1: PatientID is set by the"),
        ("anonymize: {lookup: l.csv, keep: SeriesDescription}\n", "anonymize.keep: must be a list"),
        ("anonymize: {lookup: l.csv, replace: {StudyInstanceUID: 1.2}}\n", "comes from the lookup table"),
        ("anonymize: {lookup: l.csv, replace: {InstitutionNam: x}}\n", "did you mean InstitutionName?"),
        ("anonymize: {lookup: l.csv, keep: [StudyDate], replace: {StudyDate: '2000'}}\n", "both kept and replaced"),
        ("anonymize: {lookup: l.csv, replace: {StudyDate: [1]}}\n", "the value must be a text or a number"),
        ("anonymize: {lookup: l.csv, delete_original: 1}\n", "anonymize.delete_original: must be true or false"),
        ("anonymize: {lookup: out/l.csv}\nexport: {dir: out}\n", "anonymize.lookup: must not be inside export.dir"),
        ("anonymize: {lookup: t.csv}\ntags: {file: t.csv, keywords: [StudyDate]}\n", "tags.file: must not be"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: str):
    """Unknown keys, wrong types, missing values and conflicts: a ConfigError naming the key path."""
    assert expected in config_error(tmp_path, text)


def test_bad_lookup_table_is_a_config_error_without_values(tmp_path: Path):
    """A malformed lookup table fails validation with file:line, never echoing its values."""
    lookup = tmp_path / "lookup.csv"
    lookup.write_text("Keyword,Original,Pseudonym\nPatientID,SECRET1,R1\nPatientID,SECRET1,R2\n")
    message = config_error(tmp_path, "anonymize: {lookup: lookup.csv}\n")
    assert "anonymize.lookup:" in message and "lookup.csv:3: a second, different pseudonym" in message
    assert "SECRET1" not in message and "R2" not in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("Original,Pseudonym\n", ":1: the header must be Keyword,Original,Pseudonym"),
        ("Keyword,Original,Pseudonym\nStudyInstanceUID,1.2,not-a-uid\n", ":2: the pseudonym of a StudyInstanceUID"),
        ("Keyword,Original,Pseudonym\nPatientName,a,b\n", ":2: Keyword must be one of"),
        ("Keyword,Original,Pseudonym\nPatientID,a,X\nPatientID,b,X\n", ":3: the same PatientID pseudonym for two"),
        ("Keyword,Original,Pseudonym\nPatientID,a\n", ":2: expected 3 columns"),
    ],
)
def test_lookup_table_problems(tmp_path: Path, content: str, reason: str):
    """Each kind of lookup-table problem is named with its line."""
    path = tmp_path / "lookup.csv"
    path.write_text(content)
    with pytest.raises(LookupTableError) as info:
        Lookup(path)
    assert reason in str(info.value)


def test_lookup_generates_stable_private_pseudonyms(tmp_path: Path):
    """New pseudonyms are written (0600) before use and read back the same by the next run."""
    path = tmp_path / "keys" / "lookup.csv"
    first = Lookup(path)
    study = first.pseudonym("StudyInstanceUID", "1.2.3")
    patient = first.pseudonym("PatientID", "SECRET^1")
    assert study.startswith("2.25.") and is_uid(study)
    assert patient.startswith("ANON") and len(patient) <= 64
    assert first.pseudonym("StudyInstanceUID", "1.2.3") == study
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Lookup(path)
    assert again.get("StudyInstanceUID", "1.2.3") == study and again.get("PatientID", "SECRET^1") == patient
    assert "SECRET" not in repr(again) and study not in repr(again)
    assert path.read_text().splitlines()[0] == "Keyword,Original,Pseudonym"


def test_lookup_given_by_the_user_is_extended_not_rewritten(tmp_path: Path):
    """A user's table keeps its rows (even without a final newline); new rows are appended."""
    path = tmp_path / "lookup.csv"
    path.write_text('Keyword,Original,Pseudonym\nPatientID,"Doe, J",RESEARCH-001')
    lookup = Lookup(path)
    assert lookup.get("PatientID", "Doe, J") == "RESEARCH-001"
    uid = lookup.pseudonym("SeriesInstanceUID", "1.2.3.4")
    lines = path.read_text().splitlines()
    assert lines[1] == 'PatientID,"Doe, J",RESEARCH-001' and lines[2] == f"SeriesInstanceUID,1.2.3.4,{uid}"
    assert len(Lookup(path)) == 2


def test_fingerprints_follow_the_settings(tmp_path: Path):
    """Another template, or anonymize turned on, makes export due again; keep/replace do not."""
    base = "export: {dir: out}\n"
    a = settings_of(config(tmp_path, base)).fingerprints()
    b = settings_of(config(tmp_path, "export: {dir: out, path: '{SOPInstanceUID}.dcm'}\n")).fingerprints()
    c = settings_of(config(tmp_path, base + "anonymize: {lookup: l.csv}\n")).fingerprints()
    d = settings_of(config(tmp_path, base + "anonymize: {lookup: l.csv, keep: [StudyDate]}\n")).fingerprints()
    assert a["export"] != b["export"] and a["export"] != c["export"]
    assert c == d


# -- tags rows and file ----------------------------------------------------------------------------------


def test_tag_rows_in_instance_order_with_defaults():
    """Rows follow InstanceNumber; absent (or binary) values take the default, empty stays empty."""
    columns = parse_columns(["InstanceNumber", {"keyword": "StudyDate", "alias": "date"}, {"keyword": "Laterality",
                             "default": "U"}, {"keyword": "PatientAge", "default": 0}])  # fmt: skip
    settings = TagsSettings(Path("t.csv"), "instance", columns)
    instances = {
        "b": tags_of(InstanceNumber="10", StudyDate="20200101", Laterality=""),
        "a": tags_of(InstanceNumber="2", StudyDate="20200101"),
    }
    assert settings.header == ["InstanceNumber", "date", "Laterality", "PatientAge"]
    assert rows_for(settings, instances) == [["2", "20200101", "U", "0"], ["10", "20200101", "", "0"]]
    series = TagsSettings(Path("t.csv"), "series", columns)
    assert rows_for(series, instances) == [["2", "20200101", "U", "0"]]


def _db(tmp_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(tmp_path / "j.sqlite", isolation_level=None)
    ensure_schema(db)
    return db


def _tags_file(db: sqlite3.Connection, path: Path, fingerprint: str = "fp1") -> TagsFile:
    settings = TagsSettings(path, "instance", parse_columns(["SOPInstanceUID", "InstanceNumber"]))
    tf = TagsFile(db, settings, fingerprint)
    tf.open()
    return tf


def test_tags_file_cuts_an_uncommitted_tail(tmp_path: Path):
    """A run killed between writing rows and committing them: the next open cuts them off."""
    db, path = _db(tmp_path), tmp_path / "tags.csv"
    tf = _tags_file(db, path)
    tf.append([["1.1", "1"]], commit=lambda: None)
    committed = path.read_bytes()
    # What a kill -9 mid-append leaves: the journal's marker and rows (half a row, even) on disk.
    db.execute("INSERT OR REPLACE INTO steps_meta VALUES ('tags.appending', ?)", (str(len(committed)),))
    with path.open("ab") as f:
        f.write(b"1.2,2\n1.3,")
    tf.close()
    again = _tags_file(db, path)
    assert again.blocked is None and path.read_bytes() == committed
    again.append([["1.2", "2"]], commit=lambda: None)
    assert path.read_text() == "SOPInstanceUID,InstanceNumber\n1.1,1\n1.2,2\n"
    again.close()


def test_tags_file_commit_failure_rolls_back(tmp_path: Path):
    """If the commit callback fails, the offset is not advanced: the rows are cut on the next open."""
    db, path = _db(tmp_path), tmp_path / "tags.csv"
    tf = _tags_file(db, path)

    def boom() -> None:
        raise RuntimeError("crash inside the commit")

    with pytest.raises(RuntimeError):
        tf.append([["1.1", "1"]], commit=boom)
    tf.close()
    _tags_file(db, path).close()
    assert path.read_text() == "SOPInstanceUID,InstanceNumber\n"


def test_tags_file_refuses_a_foreign_or_changed_file(tmp_path: Path):
    """A file this journal did not write, or one grown behind its back, is never truncated."""
    db, path = _db(tmp_path), tmp_path / "tags.csv"
    path.write_text("someone,else\n1,2\n")
    tf = _tags_file(db, path)
    assert tf.blocked and "not written by this journal" in tf.blocked
    assert path.read_text() == "someone,else\n1,2\n"
    path.unlink()
    tf = _tags_file(db, path)
    tf.append([["1.1", "1"]], commit=lambda: None)
    tf.close()
    with path.open("a") as f:
        f.write("added,by hand\n")
    tf = _tags_file(db, path)
    assert tf.blocked and "was changed" in tf.blocked
    assert path.read_text().endswith("added,by hand\n")
    tf.close()


def test_tags_file_restarts_when_lost_or_settings_change(tmp_path: Path):
    """A deleted file, or new columns, start a fresh file and make every series due again."""
    db, path = _db(tmp_path), tmp_path / "tags.csv"
    db.execute("INSERT INTO steps (uid, step, state, updated_at) VALUES ('1.2.3', 'tags', 'done', 0)")
    tf = _tags_file(db, path)
    assert tf.reset
    db.execute("UPDATE steps SET state='done'")
    tf.append([["1.1", "1"]], commit=lambda: None)
    tf.close()
    tf = _tags_file(db, path)
    assert not tf.reset and db.execute("SELECT state FROM steps").fetchone() == ("done",)
    tf.close()
    tf = _tags_file(db, path, fingerprint="fp2")
    assert tf.reset and db.execute("SELECT state FROM steps").fetchone() == ("pending",)
    assert path.read_text() == "SOPInstanceUID,InstanceNumber\n"
    tf.close()


def test_tags_file_is_locked_against_a_second_run(tmp_path: Path):
    """Two runs appending to one tags file at once: the second is refused."""
    db, path = _db(tmp_path), tmp_path / "tags.csv"
    first = _tags_file(db, path)
    second = _tags_file(_db(tmp_path), path)
    assert second.blocked and "another run" in second.blocked
    first.close()
    second.close()


# -- files --------------------------------------------------------------------------------------------------


def test_write_atomic_leaves_no_part(tmp_path: Path):
    """An atomic write replaces the file whole and leaves no .part behind."""
    target = tmp_path / "a.dcm"
    write_atomic(target, b"one")
    write_atomic(target, b"two!")
    assert target.read_bytes() == b"two!" and not part_path(target).exists()
    assert sorted(os.listdir(tmp_path)) == ["a.dcm"]


def test_example_file_sections_validate(tmp_path: Path):
    """The example config's commented export/tags/anonymize sections, uncommented, pass validate()."""
    example = Path(__file__).resolve().parent.parent / "conf" / "transfer.example.yaml"
    lines = []
    for line in example.read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r"(window|export|tags|anonymize|nifti): null", line):
            continue
        if re.match(r"# (window|export|tags|anonymize|nifti):|#   ", line):
            line = line[2:]
        lines.append(line)
    cfg = config(tmp_path, "\n".join(lines))
    validate(cfg)
    assert settings_of(cfg).enabled == ("anonymize", "tags", "export", "nifti")  # dcm2niix: .ci/setup --tests


def test_free_bytes_of_a_folder_not_made_yet_is_its_disks(tmp_path: Path):
    """An export folder not created yet: the space of the disk it will be on, not 'unknown'."""
    from dicom_transfer.disk import free_bytes

    here = free_bytes(tmp_path)
    later = free_bytes(tmp_path / "not" / "made" / "yet")
    assert here is not None and later is not None and abs(later - here) < 64 * 2**20
