"""NIfTI of a verified series (`nifti` step): the destination's DICOM files → dcm2niix → files.

The series comes from the destination's REST API as one ZIP (`/series/{id}/archive`),
is unpacked under numbered names (the archive's own folder names carry patient data)
into a work folder inside `nifti.dir`, and converted by dcm2niix with an anonymised BIDS
JSON sidecar. Only then are the outputs moved into place, each by an atomic rename within
the same file system; a crash leaves at most the work folder, removed by the next attempt.

File names come from `nifti.path` (default `{SeriesInstanceUID}`), a template like
`export.path` without the extension; patient data (PatientID, PatientName...) is refused
there, so a file name never carries it. dcm2niix may write more than one volume for a
series (echoes, differing orientations): those keep dcm2niix's suffix (`_e2`, `_i00002`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

from .disk import free_bytes
from .export import StepFailed, Template, fsync_dirs, instance_order
from .fields import is_patient_data
from .orthanc import Destination

TOOLS = ("dcm2niix",)
DEFAULT_NAME = "{SeriesInstanceUID}"
INSTALL_HINT = (
    "install it: `sudo apt-get install dcm2niix` (Debian/Ubuntu), `brew install dcm2niix` (macOS),"
    " or a release from https://github.com/rordenlab/dcm2niix/releases"
)
_WORK_PREFIX = ".nifti-work-"
_STEM = "series"  # what dcm2niix names its outputs in the work folder (renamed afterwards)
_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".json", ".bval", ".bvec")
NEARLY_FULL = 1 << 20  # a converter that failed with less than this free: the disk was full


@dataclass(frozen=True)
class NiftiSettings:
    """`nifti` of the config, checked: where the files go, how they are named, the converter."""

    root: Path
    tool: str
    executable: str  # the converter found on PATH at start
    template: Template
    compress: bool

    def fingerprint(self) -> dict[str, Any]:
        return {"dir": str(self.root), "tool": self.tool, "path": self.template.text, "compress": self.compress}


def patient_keywords(template: Template) -> list[str]:
    """The template's fields that are patient data (refused: file names never carry it)."""
    return [k for k in template.keywords if is_patient_data(keyword_dict[k])]


def find_tool(tool: str) -> str | None:
    """The converter's path on PATH, or None."""
    return shutil.which(tool)


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_OUTPUT_SUFFIXES))


def _nearly_full(folder: Path) -> bool:
    """Less than NEARLY_FULL bytes free on the disk holding `folder`."""
    free = free_bytes(folder)
    return free is not None and free < NEARLY_FULL


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SeriesNifti:
    """Converts series to NIfTI, one series per `run`."""

    def __init__(
        self,
        dest: Destination,
        settings: NiftiSettings,
        *,
        timeout_s: float = 600.0,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.dest = dest
        self.settings = settings
        self.timeout_s = timeout_s
        self.stop = stop

    def run(self, uid: str, series_id: str, instance_tags: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
        """Convert one series; returns the result detail, or None when told to stop midway.

        Raises StepFailed with a reason (never patient data).
        """
        if not instance_tags:
            raise StepFailed("the series has no instances at the destination")
        first = min(instance_tags.items(), key=instance_order)[1]
        relative = self.settings.template.render(first)
        target = self.settings.root / relative
        work = self.settings.root / f"{_WORK_PREFIX}{hashlib.sha1(uid.encode()).hexdigest()[:16]}"
        shutil.rmtree(work, ignore_errors=True)  # a half attempt left by a crash
        try:
            (work / "dicom").mkdir(parents=True)
            (work / "out").mkdir()
            self._unpack(series_id, work / "dicom")
            if self.stop():
                return None
            self._convert(work / "dicom", work / "out")
            return self._move_into_place(_outputs(work / "out"), target)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _unpack(self, series_id: str, folder: Path) -> int:
        """The series' ZIP from the destination, unpacked under numbered names."""
        data = bytes(self.dest.get(f"/series/{series_id}/archive", raw=True))
        n = 0
        with zipfile.ZipFile(BytesIO(data)) as archive:
            for member in archive.infolist():
                if member.is_dir():
                    continue
                n += 1
                (folder / f"{n:06d}.dcm").write_bytes(archive.read(member))
        if n == 0:
            raise StepFailed("the destination's archive of the series holds no file")
        return n

    def _convert(self, source: Path, out: Path) -> None:
        s = self.settings
        command = [
            s.executable, "-b", "y", "-ba", "y", "-z", "y" if s.compress else "n",
            "-f", _STEM, "-o", str(out), str(source),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{s.tool} did not finish within {self.timeout_s:.0f} s") from None
        except OSError as exc:
            raise StepFailed(f"{s.tool} cannot run: {exc.strerror or type(exc).__name__}") from None
        written = [p for p in _outputs(out) if p.name.endswith((".nii", ".nii.gz"))]
        if done.returncode != 0 or not written:
            if _nearly_full(out):  # the converter's own words on a full disk vary: the disk says it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            said = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "no output")
            raise StepFailed(f"{s.tool} wrote no NIfTI (exit {done.returncode}): {said[:200]}")

    def _move_into_place(self, outputs: list[Path], target: Path) -> dict[str, Any]:
        """Rename every output next to `target` (same file system: atomic), then fsync the folders."""
        target.parent.mkdir(parents=True, exist_ok=True)
        placed = []
        for path in outputs:
            name = target.name + path.name[len(_STEM) :]  # keeps dcm2niix's suffix and extension
            final = target.parent / name
            _fsync_file(path)
            os.replace(path, final)
            placed.append(final)
        fsync_dirs(placed, self.settings.root)
        volumes = [p for p in placed if p.name.endswith((".nii", ".nii.gz"))]
        return {
            "files": len(placed),
            "volumes": len(volumes),
            "bytes": sum(p.stat().st_size for p in placed),
            "names": [str(p.relative_to(self.settings.root)) for p in placed],
            "dir": str(target.parent),
        }
