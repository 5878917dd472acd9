"""Export of a verified series to a folder tree: path template, safe names, atomic files.

The template (`export.path`) is a Python format string whose fields are DICOM keywords,
filled from the tags Orthanc stores for each instance (`{InstanceNumber:04d}`). Tag values
never escape their path component: separators, NUL and control characters become `_`, an
empty value or a `.`/`..` component becomes `_`.

Files are fetched one by one from the destination's REST API and written atomically
(`<name>.part` in the same folder, fsync, rename). Which file belongs to which instance,
and its size once written, is kept in the journal's `export_files` table, so a resume
neither downloads a finished file again nor leaves a half one behind.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sqlite3
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict

from .orthanc import Destination

DEFAULT_TEMPLATE = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{InstanceNumber:04d}.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TRANSCODE_PARAM_SINCE = (1, 12, 2)  # older Orthanc ignores `/file?transcode=`
INSTANCE_NUMBER = "0020,0013"
SOP_INSTANCE_UID = "0008,0018"

_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV", "US or SS"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"})
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')
_MAX_NAME_BYTES = 255


class StepFailed(Exception):
    """An after-arrival step of one series cannot finish; the message is its reason.

    Raised inside the step modules and turned into data (state `failed`, `reason`) by
    `steps.AfterArrivalSteps.run`; it never leaves `run`. Reasons carry no patient data.
    """


class TemplateError(ValueError):
    """`export.path` is not a usable template; the message says why."""


# -- DICOM keywords --------------------------------------------------------------------------


def tag_key(keyword: str) -> str:
    """Orthanc's `?short` key of a keyword: `InstanceNumber` → `0020,0013`."""
    tag = keyword_dict[keyword]
    return f"{tag >> 16:04x},{tag & 0xFFFF:04x}"


def keyword_problem(keyword: Any) -> str | None:
    """Why `keyword` cannot name a value in a path or a CSV column (None when it can)."""
    if not isinstance(keyword, str) or not _KEYWORD.fullmatch(keyword):
        return f"{keyword!r} is not a DICOM keyword"
    if keyword not in keyword_dict:
        match = difflib.get_close_matches(keyword, list(keyword_dict), n=1, cutoff=0.75)
        hint = f" (did you mean {match[0]}?)" if match else ""
        return f"unknown keyword {keyword!r}{hint}"
    vr = dictionary_VR(keyword_dict[keyword])
    if vr == "SQ":
        return f"{keyword} is a sequence, not a value"
    if vr in _BINARY_VRS:
        return f"{keyword} holds binary data ({vr}), not a value"
    return None


def value_kind(keyword: str) -> str:
    """`int`, `float` or `text`: what a format spec may assume about a keyword's value."""
    vr = dictionary_VR(keyword_dict[keyword])
    if vr in _INT_VRS:
        return "int"
    if vr in _FLOAT_VRS:
        return "float"
    return "text"


# -- the template ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One `{Keyword:spec}` of the template."""

    keyword: str
    tag: str  # Orthanc's ?short key, e.g. "0020,0013"
    spec: str
    kind: str  # int | float | text

    def render(self, tags: Mapping[str, Any]) -> str:
        raw = tags.get(self.tag)
        text = raw.strip() if isinstance(raw, str) else ""
        if not self.spec:
            return text
        if self.kind == "text":
            return format(text, self.spec)
        try:
            number: int | float = int(text) if self.kind == "int" else float(text)
        except ValueError:
            if self.kind != "int":
                return ""
            try:  # an IS written as "3.0" by a sloppy modality
                number = int(float(text))
            except ValueError:
                return ""  # missing or not a number: the component becomes "_"
        return format(number, self.spec)


Part = str | Field


@dataclass(frozen=True)
class Template:
    """A parsed `export.path`: path segments made of literal text and fields."""

    text: str
    segments: tuple[tuple[Part, ...], ...]

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(p.keyword for seg in self.segments for p in seg if isinstance(p, Field))

    def render(self, tags: Mapping[str, Any]) -> str:
        """The relative POSIX path of one instance, every tag value made path-safe."""
        names = []
        for segment in self.segments:
            name = "".join(p if isinstance(p, str) else safe_component(p.render(tags)) for p in segment)
            names.append(_fit(safe_component(name) if name in ("", ".", "..") else name))
        return "/".join(names)


def parse_template(text: Any) -> Template:
    """Check and parse `export.path`; raises TemplateError naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise TemplateError("must be a non-empty string such as " + repr(DEFAULT_TEMPLATE))
    if "\\" in text:
        raise TemplateError("use / to separate folders, not \\")
    if text.startswith("/"):
        raise TemplateError("must be relative to export.dir (no leading /)")
    if text.endswith("/"):
        raise TemplateError("must end in a file name, not /")
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"is not a valid template: {exc}") from None
    segments = _segments(pieces)
    for segment in segments:
        if not segment:
            raise TemplateError("has an empty folder name (//)")
        if all(isinstance(p, str) for p in segment) and "".join(map(str, segment)) in (".", ".."):
            raise TemplateError("must not contain . or .. folders")
    return Template(text, tuple(tuple(seg) for seg in segments))


def _segments(pieces: list[tuple[str, str | None, str | None, str | None]]) -> list[list[Part]]:
    """Formatter pieces → path segments: literal text split on `/`, fields kept whole."""
    segments: list[list[Part]] = [[]]
    for literal, name, spec, conversion in pieces:
        for i, chunk in enumerate(literal.split("/")):
            if i:
                segments.append([])
            if chunk:
                segments[-1].append(chunk)
        if name is not None:
            segments[-1].append(_field(name, spec or "", conversion))
    return segments


def _field(name: str, spec: str, conversion: str | None) -> Field:
    if not name:
        raise TemplateError("has an empty {} field: name a DICOM keyword, e.g. {InstanceNumber}")
    if conversion is not None:
        raise TemplateError(f"{{{name}!{conversion}}}: conversions (!r, !s, !a) are not allowed")
    if "{" in spec or "}" in spec:
        raise TemplateError(f"{{{name}:{spec}}}: nested fields are not allowed in a format spec")
    problem = keyword_problem(name)
    if problem is not None:
        if not _KEYWORD.fullmatch(name) and _KEYWORD.match(name):
            problem = f"{{{name}}}: only plain DICOM keywords are allowed (no attributes or indexes)"
        raise TemplateError(problem)
    kind = value_kind(name)
    sample: Any = {"int": 1, "float": 1.5, "text": "abc"}[kind]
    try:
        format(sample, spec)
    except (ValueError, TypeError):
        what = "a text value" if kind == "text" else f"an {kind} value" if kind == "int" else "a decimal value"
        raise TemplateError(f"{{{name}:{spec}}}: format spec {spec!r} does not apply to {name} ({what})") from None
    return Field(name, tag_key(name), spec, kind)


def safe_component(value: str) -> str:
    """A tag value made safe as (part of) one file or folder name.

    Separators (`/`, `\\`), NUL, control characters and characters other systems refuse
    in names (`<>:"|?*`) become `_`; surrounding spaces go; `""`, `.` and `..` become `_`.
    """
    cleaned = _UNSAFE.sub("_", value).strip()
    return "_" if cleaned in ("", ".", "..") else cleaned


def _fit(name: str) -> str:
    """A name longer than a file system allows, shortened but still unique and with its end."""
    raw = name.encode("utf-8")
    if len(raw) <= _MAX_NAME_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    tail = name[-24:]
    budget = _MAX_NAME_BYTES - len(tail.encode("utf-8")) - len(digest) - 2
    head = raw[:budget].decode("utf-8", errors="ignore")
    return f"{head}~{digest}~{tail}"


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSettings:
    """`export` of the config, checked: where files go, how they are named, decompressed or not."""

    root: Path
    template: Template
    decompress: bool

    def fingerprint(self) -> dict[str, Any]:
        return {"dir": str(self.root), "path": self.template.text, "decompress": self.decompress}


# -- files -----------------------------------------------------------------------------------


def part_path(path: Path) -> Path:
    """Where `path` is written before its rename (same folder, so the rename is atomic)."""
    return path.with_name(path.name + ".part")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: `<name>.part`, fsync, rename over `path`."""
    part = part_path(path)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(part, path)


def fsync_dirs(paths: Iterable[Path], root: Path) -> None:
    """fsync every folder holding `paths`, and their parents up to `root`: renames are durable."""
    seen: set[Path] = set()
    for path in paths:
        folder = path.parent
        while folder not in seen:
            seen.add(folder)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if folder == root or folder.parent == folder:
                break
            folder = folder.parent


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def instance_order(item: tuple[str, Mapping[str, Any]]) -> tuple[int, str]:
    """Sort key of (instance id, tags): InstanceNumber, then SOPInstanceUID."""
    tags = item[1]
    number = tags.get(INSTANCE_NUMBER)
    try:
        n = int(str(number).strip())
    except (TypeError, ValueError):
        n = 1 << 31
    return n, str(tags.get(SOP_INSTANCE_UID) or item[0])


# -- one series --------------------------------------------------------------------------------


class SeriesExport:
    """Exports the instances of series, one series per `run`, resumable through `export_files`."""

    def __init__(
        self,
        db: sqlite3.Connection,
        dest: Destination,
        settings: ExportSettings,
        *,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db
        self.dest = dest
        self.settings = settings
        self.stop = stop
        self.downloads = 0  # files fetched from Orthanc by this object (tests measure resumes)

    def run(
        self, uid: str, series_id: str, instance_tags: Mapping[str, Mapping[str, Any]], reuse: bool
    ) -> dict[str, Any] | None:
        """Export one series; returns the result detail, or None when told to stop midway.

        `reuse` False (the export settings changed since this series was last exported)
        downloads every file again. Raises StepFailed with a reason.
        """
        plan = self._plan(instance_tags)
        self._save_plan(uid, plan, reuse)
        root = self.settings.root
        rows = self.db.execute("SELECT path, instance, size FROM export_files WHERE uid=? ORDER BY path", (uid,))
        downloaded = 0
        for path_text, instance, size in rows.fetchall():
            if self.stop():
                return None
            path = Path(path_text)
            if size is not None and _size(path) == size and not part_path(path).exists():
                continue  # finished by an earlier run
            part_path(path).unlink(missing_ok=True)  # a half file left by a crash
            data = self._download(instance)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
            self.db.execute("UPDATE export_files SET size=? WHERE path=?", (len(data), path_text))
            downloaded += 1
            self.downloads += 1
        return self._verify(uid, root, downloaded)

    def _plan(self, instance_tags: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        """instance id → absolute path; two instances on one path fail the series."""
        root, template = self.settings.root, self.settings.template
        plan: dict[str, str] = {}
        owners: dict[str, list[Mapping[str, Any]]] = {}
        for instance, tags in sorted(instance_tags.items(), key=instance_order):
            path = str(root / template.render(tags))
            plan[instance] = path
            owners.setdefault(path, []).append(tags)
        clashes = [tags for tags in owners.values() if len(tags) > 1]
        if clashes:
            numbers = ", ".join("/".join(str(t.get(INSTANCE_NUMBER) or "?") for t in group) for group in clashes[:5])
            raise StepFailed(
                f"{sum(len(g) for g in clashes)} instances would share {len(clashes)} file name(s)"
                f" (InstanceNumber {numbers}): export.path {template.text!r} does not tell them apart"
            )
        return plan

    def _save_plan(self, uid: str, plan: dict[str, str], reuse: bool) -> None:
        """Store the plan in one transaction; a path already used by another series fails."""
        wanted = {(path, instance) for instance, path in plan.items()}
        self.db.execute("BEGIN IMMEDIATE")
        try:
            old = self.db.execute("SELECT path, instance FROM export_files WHERE uid=?", (uid,)).fetchall()
            for path, instance in old:
                if (path, instance) not in wanted:
                    self.db.execute("DELETE FROM export_files WHERE path=?", (path,))
                    part_path(Path(path)).unlink(missing_ok=True)
            if not reuse:
                self.db.execute("UPDATE export_files SET size=NULL WHERE uid=?", (uid,))
            for path, instance in sorted(wanted - set(old)):
                other = self.db.execute("SELECT uid FROM export_files WHERE path=?", (path,)).fetchone()
                if other is not None:
                    raise StepFailed(f"a file name is already taken by series {other[0]} (export.path clash)")
                self.db.execute(
                    "INSERT INTO export_files (path, uid, instance) VALUES (?, ?, ?)", (path, uid, instance)
                )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _download(self, instance: str) -> bytes:
        if not self.settings.decompress:
            return bytes(self.dest.get(f"/instances/{instance}/file", raw=True))
        if self.dest.version() >= TRANSCODE_PARAM_SINCE:  # known from the start-up check
            return bytes(self.dest.get(f"/instances/{instance}/file", params={"transcode": EXPLICIT_LE}, raw=True))
        # 1.10/1.11 ignore `?transcode`: instance-level /modify answers the transcoded file
        # without storing it. Keep SOPInstanceUID, else Orthanc gives the copy a new one.
        # Nothing is stored, so a retry is harmless.
        body = {"Transcode": EXPLICIT_LE, "Keep": ["SOPInstanceUID"], "Force": True}
        return bytes(self.dest.post(f"/instances/{instance}/modify", body, raw=True))

    def _verify(self, uid: str, root: Path, downloaded: int) -> dict[str, Any]:
        """Exported only when every planned file is on disk with the size written."""
        rows = self.db.execute("SELECT path, size FROM export_files WHERE uid=?", (uid,)).fetchall()
        paths = [Path(p) for p, _ in rows]
        fsync_dirs(paths, root)
        bad = [p for (p, size), path in zip(rows, paths, strict=True) if size is None or _size(path) != size]
        if bad or any(part_path(p).exists() for p in paths):
            raise StepFailed(f"{len(bad)} of {len(rows)} files missing or of the wrong size after the export")
        folders = {os.path.dirname(p) for p, _ in rows}
        return {
            "files": len(rows),
            "bytes": sum(size for _, size in rows),
            "downloaded": downloaded,
            "dir": os.path.commonpath(list(folders)) if folders else None,
        }
