"""Pseudonymisation of a verified series by Orthanc (`POST /series/{id}/anonymize`).

Orthanc applies its de-identification profile and `Keep`/`Replace` from the config. Orthanc
alone would give each series its own new study and patient, so PatientID,
StudyInstanceUID, the series' own SeriesInstanceUID and (when the series has exactly one)
FrameOfReferenceUID come from a lookup table and are forced in (`Replace` + `Force`): the
series of one study stay in one pseudonymous study, and a run finds the copy it made
before by its UID.

The lookup table is a CSV `Keyword,Original,Pseudonym`, given by the user or grown by this
tool (mode 0600; each new row fsynced before Orthanc sees the pseudonym, so a pseudonym in
use is always in the table). It is never logged. Generated UIDs are `2.25.<uuid4>`.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OrthancError
from .export import StepFailed, keyword_problem, tag_key
from .orthanc import Destination

LOOKUP_HEADER = ("Keyword", "Original", "Pseudonym")
PATIENT_ID, STUDY_UID, SERIES_UID, FRAME_UID = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
)
LOOKUP_KINDS = (PATIENT_ID, STUDY_UID, SERIES_UID, FRAME_UID)
MANAGED = frozenset({PATIENT_ID, STUDY_UID, SERIES_UID, "SOPInstanceUID"})  # never kept nor replaced by config
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_KINDS = frozenset({STUDY_UID, SERIES_UID, FRAME_UID})
JOB_POLL_S = 0.02
JOB_POLL_MAX_S = 0.25


def is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.fullmatch(text) is not None


class LookupTableError(ValueError):
    """The lookup CSV is malformed; the message names file and line, never a value."""


class Lookup:
    """Original → pseudonym per keyword; grows (append + fsync) when a new original shows up."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._forward: dict[tuple[str, str], str] = {}
        self._taken: dict[tuple[str, str], str] = {}
        self._load()

    def __repr__(self) -> str:  # never the content
        return f"Lookup({self.path.name}, {len(self._forward)} rows)"

    def __len__(self) -> int:
        return len(self._forward)

    def get(self, kind: str, original: str) -> str | None:
        return self._forward.get((kind, original))

    def pseudonym(self, kind: str, original: str) -> str:
        """The pseudonym of `original`, made up and written to the table if it has none."""
        known = self._forward.get((kind, original))
        if known is not None:
            return known
        while True:
            value = f"2.25.{uuid.uuid4().int}" if kind in _UID_KINDS else f"ANON{secrets.token_hex(5).upper()}"
            if (kind, value) not in self._taken:
                break
        self._append(kind, original, value)
        self._forward[(kind, original)] = value
        self._taken[(kind, value)] = original
        return value

    # -- file --------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return
        except UnicodeDecodeError:
            raise LookupTableError(f"{self.path}: is not UTF-8 text") from None
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        if header is None:
            return
        if tuple(h.strip() for h in header) != LOOKUP_HEADER:
            raise LookupTableError(f"{self.path}:1: the header must be {','.join(LOOKUP_HEADER)}")
        for line, row in enumerate(reader, 2):
            if not row or not any(cell.strip() for cell in row):
                continue
            problem = self._add(row)
            if problem:
                raise LookupTableError(f"{self.path}:{line}: {problem}")

    def _add(self, row: list[str]) -> str | None:
        if len(row) != 3:
            return f"expected 3 columns ({','.join(LOOKUP_HEADER)}), got {len(row)}"
        kind, original, value = (cell.strip() for cell in row)
        if kind not in LOOKUP_KINDS:
            return f"Keyword must be one of {', '.join(LOOKUP_KINDS)}"
        if not value:
            return "the pseudonym is empty"
        if kind in _UID_KINDS and not is_uid(value):
            return f"the pseudonym of a {kind} must be a valid UID (digits and dots, at most 64)"
        if kind == PATIENT_ID and (len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value)):
            return "a PatientID pseudonym must be at most 64 characters, without backslash or control characters"
        previous = self._forward.get((kind, original))
        if previous is not None and previous != value:
            return f"a second, different pseudonym for the same original {kind}"
        holder = self._taken.get((kind, value))
        if holder is not None and holder != original:
            return f"the same {kind} pseudonym for two different originals"
        self._forward[(kind, original)] = value
        self._taken[(kind, value)] = original
        return None

    def _append(self, kind: str, original: str, value: str) -> None:
        new = not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            prefix = ""
            if size == 0:
                prefix = ",".join(LOOKUP_HEADER) + "\n"
            elif not _ends_with_newline(self.path, size):
                prefix = "\n"
            row = [kind, original, value]
            text = prefix + ",".join(_csv_cell(c) for c in row) + "\n"
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _csv_cell(text: str) -> str:
    if any(c in text for c in ',"\n\r') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnonymizeSettings:
    """`anonymize` of the config, checked."""

    lookup: Path
    keep: tuple[str, ...]
    replace: Mapping[str, str]
    delete_original: bool

    def fingerprint(self) -> dict[str, Any]:
        # keep/replace are not part of it on purpose: a copy is never re-made because they
        # changed (the original may be gone); delete_original turned on must still act.
        return {"delete_original": self.delete_original}


def parse_keep(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of DICOM keywords")
    out = []
    for n, keyword in enumerate(value, 1):
        problem = keyword_problem(keyword)
        if problem:
            raise ValueError(f"item {n}: {problem}")
        if keyword in MANAGED:
            raise ValueError(f"item {n}: {keyword} is set by the anonymisation (lookup table), it cannot be kept")
        out.append(keyword)
    return tuple(out)


def parse_replace(value: Any, keep: tuple[str, ...]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of DICOM keyword → value")
    out = {}
    for keyword, replacement in value.items():
        problem = keyword_problem(keyword)
        if problem:
            raise ValueError(problem)
        if keyword in MANAGED:
            raise ValueError(f"{keyword} comes from the lookup table (anonymize.lookup), it cannot be replaced")
        if keyword in keep:
            raise ValueError(f"{keyword} is both kept and replaced")
        if isinstance(replacement, bool) or not isinstance(replacement, (str, int, float)):
            raise ValueError(f"{keyword}: the value must be a text or a number, got {replacement!r}")
        out[str(keyword)] = str(replacement)
    return out


# -- one series ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A series as the destination holds it."""

    id: str
    instances: int


def held(dest: Destination, series_uid: str) -> Held | None:
    """The destination's series with this UID, or None (also when it was just deleted)."""
    sid = dest.series_id(series_uid)
    if sid is None:
        return None
    try:
        series = dest.get(f"/series/{sid}")
    except OrthancError as exc:
        if exc.status == 404:
            return None
        raise
    return Held(str(series["ID"]), len(series.get("Instances", [])))


class SeriesAnonymizer:
    """Makes (or finds) the anonymised copy of one series and proves it whole."""

    def __init__(
        self,
        dest: Destination,
        settings: AnonymizeSettings,
        lookup: Lookup,
        *,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.dest = dest
        self.settings = settings
        self.lookup = lookup
        self.timeout_s = timeout_s
        self.clock = clock
        self.sleep = sleep

    def copy_uid(self, series_uid: str) -> str | None:
        return self.lookup.get(SERIES_UID, series_uid)

    def copy_count(self, series_uid: str) -> int:
        """Instances of the anonymised copy at the destination (0 when there is none)."""
        copy = self.copy_uid(series_uid)
        return self.dest.count(copy) if copy else 0

    def run(
        self,
        uid: str,
        study_uid: str | None,
        expected: int | None,
        previous: Mapping[str, Any],
        save: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """Anonymise `uid` (or accept the copy a previous run made); returns the detail.

        `save` stores the detail so far (the job id) before waiting on Orthanc, so a
        killed run never anonymises twice into the same copy. Raises StepFailed.
        """
        job = previous.get("job")
        study = self.lookup.get(STUDY_UID, study_uid) if study_uid else previous.get("StudyInstanceUID")
        if job:
            self._wait(str(job))  # a job a killed run left in Orthanc must end first
        original = held(self.dest, uid)
        copy_uid = self.copy_uid(uid)
        copy = held(self.dest, copy_uid) if copy_uid else None
        if original is None:
            if copy is not None and expected is not None and copy.instances >= expected:
                return self._detail(copy_uid, copy, study, deleted=True, job=job)
            raise StepFailed("the series is no longer at the destination and no complete anonymised copy was found")
        if copy is None or copy.instances != original.instances:
            if copy is not None:  # partial (or doubled): start again from nothing
                self.dest.delete(f"/series/{copy.id}")
            copy_uid, study, job = self._anonymize(uid, original, save)
            copy = held(self.dest, copy_uid)
            if copy is None or copy.instances != original.instances:
                got = copy.instances if copy else 0
                raise StepFailed(f"anonymised copy has {got}/{original.instances} instances")
        deleted = False
        if self.settings.delete_original:
            try:
                self.dest.delete(f"/series/{original.id}")
            except OrthancError as exc:
                if exc.status != 404:
                    raise
            deleted = True
        return self._detail(copy_uid, copy, study, deleted=deleted, job=job)

    @staticmethod
    def _detail(copy_uid: str | None, copy: Held, study: Any, *, deleted: bool, job: Any) -> dict[str, Any]:
        return {
            "SeriesInstanceUID": copy_uid,
            "StudyInstanceUID": study,
            "series_id": copy.id,
            "instances": copy.instances,
            "original_deleted": deleted,
            "job": job,
        }

    def _anonymize(self, uid: str, original: Held, save: Callable[[dict[str, Any]], None]) -> tuple[str, str, str]:
        tags = self.dest.get(f"/series/{original.id}/instances-tags", params={"short": ""})
        body, copy_uid, study = self.body(uid, list(tags.values()))
        created = self.dest.post(f"/series/{original.id}/anonymize", body, idempotent=False)
        job = str(created["ID"])
        save({"job": job, "SeriesInstanceUID": copy_uid, "StudyInstanceUID": study})
        content = self._wait(job)
        failed = int(content.get("FailedInstancesCount") or 0) if content else 0
        if failed:
            raise StepFailed(f"Orthanc could not anonymise {failed} instance(s)")
        return copy_uid, study, job

    def body(self, uid: str, instance_tags: list[Mapping[str, Any]]) -> tuple[dict[str, Any], str, str]:
        """The `/anonymize` body; pseudonyms from the lookup (new ones written there first)."""
        first = instance_tags[0] if instance_tags else {}
        patient = str(first.get(tag_key(PATIENT_ID)) or "")
        study = str(first.get(tag_key(STUDY_UID)) or "")
        pseudo_patient = self.lookup.pseudonym(PATIENT_ID, patient)
        pseudo_study = self.lookup.pseudonym(STUDY_UID, study)
        copy_uid = self.lookup.pseudonym(SERIES_UID, uid)
        replace: dict[str, str] = {
            **self.settings.replace,
            PATIENT_ID: pseudo_patient,
            STUDY_UID: pseudo_study,
            SERIES_UID: copy_uid,
        }
        if "PatientName" not in self.settings.keep and "PatientName" not in self.settings.replace:
            replace["PatientName"] = pseudo_patient
        frames = {str(t.get(tag_key(FRAME_UID)) or "") for t in instance_tags} - {""}
        if len(frames) == 1 and FRAME_UID not in self.settings.keep and FRAME_UID not in self.settings.replace:
            # Series of one study share their frame of reference; Orthanc alone would give each a new one.
            replace[FRAME_UID] = self.lookup.pseudonym(FRAME_UID, frames.pop())
        body = {
            "Replace": replace,
            "Keep": list(self.settings.keep),
            "Force": True,  # needed to set PatientID and the UIDs
            "KeepPrivateTags": False,
            "Asynchronous": True,
        }
        return body, copy_uid, pseudo_study

    def _wait(self, job: str) -> dict[str, Any] | None:
        """Wait (with a deadline) for an anonymisation job; its Content, or None if it vanished."""
        deadline = self.clock() + self.timeout_s
        pause = JOB_POLL_S
        while True:
            try:
                info = self.dest.get(f"/jobs/{job}")
            except OrthancError as exc:
                if exc.status == 404:
                    return None  # left Orthanc's job history: the count decides
                raise
            state = info.get("State")
            if state == "Success":
                return dict(info.get("Content") or {})
            if state == "Failure":
                details = info.get("ErrorDetails") or info.get("ErrorDescription") or "failed"
                raise StepFailed(f"Orthanc's anonymisation job failed: {details}")
            if self.clock() > deadline:
                raise StepFailed(f"Orthanc's anonymisation job did not finish within {self.timeout_s:g} s")
            self.sleep(pause)
            pause = min(JOB_POLL_MAX_S, pause * 1.5)
