"""Deterministic synthetic CT series made with pydicom (for the demo, tests, benchmarks).

The same seed always gives the same patients, UIDs and pixels, so a test or a benchmark
can be re-run against data it uploaded before. Names and IDs are obviously fake.
"""

from __future__ import annotations

import csv
import datetime as dt
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from .errors import OrthancError
from .orthanc import OrthancRest

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
_SLICE_MM = 2.5
_VERSION_NAME = "DICOM_TRANSFER"
_STORED = ("Success", "AlreadyStored")


@dataclass(frozen=True)
class SyntheticSeries:
    """One synthetic series: identifiers plus what is needed to rebuild its instances."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    modality: str
    description: str
    series_number: int = 1
    study_date: str = "20200101"
    rows: int = 64
    columns: int = 64


_UID_NAMESPACE = uuid.UUID("5d7f3a3e-6a8b-4c1e-9a57-2f3c1d0e8b41")  # fixed: UIDs never change


def _uid(seed: int, *parts: object) -> str:
    # A name-based (SHA-1) UUID as a 2.25 UID: same seed and parts, same UID. pydicom's
    # generate_uid ignores entropy_srcs when prefix is None, so it cannot do this.
    name = "/".join(map(str, ("synthetic", seed, *parts)))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def make_series(
    n_series: int,
    n_instances: int,
    *,
    seed: int = 0,
    rows: int = 64,
    columns: int = 64,
    patients: int | None = None,
    studies_per_patient: int = 1,
    modality: str = "CT",
) -> list[SyntheticSeries]:
    """`n_series` series of `n_instances` each, spread in blocks over studies and patients.

    `patients=None` gives every series its own study (one patient per
    `studies_per_patient` studies). `rows`/`columns` are the image size the series'
    instances get by default; they do not change the UIDs.
    """
    if n_series < 0 or n_instances < 0 or studies_per_patient < 1 or (patients is not None and patients < 1):
        raise ValueError("n_series/n_instances must be >= 0, patients/studies_per_patient >= 1")
    if patients is None:
        patients = max(1, -(-n_series // studies_per_patient))
    n_studies = max(1, min(patients * studies_per_patient, n_series))
    base_date = dt.date(2020, 1, 1)
    result = []
    for i in range(n_series):
        study = i * n_studies // n_series
        patient = study // studies_per_patient + 1
        study_uid = _uid(seed, "study", study)
        # The study and modality are part of the series' name, so a series UID never shows
        # up under two studies whatever the grouping. With `patients=None` the first k
        # series are the same for any n_series >= k; instance j for any n_instances > j.
        series_uid = _uid(seed, "series", i, study_uid, modality)
        date = base_date + dt.timedelta(days=(seed * 37 + study) % 1500)
        result.append(
            SyntheticSeries(
                patient_id=f"SYN{seed:03d}{patient:04d}",
                patient_name=f"Synthetic^Patient{patient}",
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uids=tuple(_uid(seed, "instance", series_uid, j) for j in range(n_instances)),
                modality=modality,
                description=f"Synthetic {modality} series {i + 1}",
                series_number=i + 1,
                study_date=date.strftime("%Y%m%d"),
                rows=rows,
                columns=columns,
            )
        )
    return result


@lru_cache(maxsize=8)
def _grid(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:rows, 0:columns]
    return y.astype(np.int32), x.astype(np.int32)


def _pixels(series: SyntheticSeries, index: int, rows: int, columns: int) -> np.ndarray:
    """A gradient background with a disk whose size changes along the series."""
    y, x = _grid(rows, columns)
    background = (x * 7 + y * 3 + series.series_number * 101 + index * 13) % 1024
    radius = (0.15 + 0.25 * ((index % 16) / 15)) * min(rows, columns)
    disk = (x - columns / 2) ** 2 + (y - rows / 2) ** 2 <= radius**2
    return np.where(disk, 2048 + index % 512, background).astype(np.uint16)


def instance_dataset(
    series: SyntheticSeries, index: int, *, rows: int | None = None, columns: int | None = None
) -> Dataset:
    """One slice as a pydicom dataset with its file meta (for pynetdicom peers)."""
    rows, columns = rows or series.rows, columns or series.columns
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(series.sop_uids[index])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _VERSION_NAME
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    _series_elements(ds, series, rows, columns)
    _instance_elements(ds, series, index, rows, columns)
    return ds


def instance_bytes(
    series: SyntheticSeries, index: int, *, rows: int | None = None, columns: int | None = None
) -> bytes:
    """A Part-10 CT Image (Explicit VR Little Endian, uint16 pixels) for one slice.

    `rows`/`columns` default to the size the series was made with. Byte for byte what
    pydicom writes for `instance_dataset`, but the series-level elements are encoded once
    per series: generating instances would otherwise cost more than Orthanc storing them.
    """
    rows, columns = rows or series.rows, columns or series.columns
    ds = Dataset()
    _instance_elements(ds, series, index, rows, columns)
    elements = sorted([*_series_encoded(series, rows, columns), *_encoded(ds)], key=lambda e: e[0])
    return b"\0" * 128 + b"DICM" + _meta_bytes(series.sop_uids[index]) + b"".join(e[1] for e in elements)


def _encode(elem: DataElement) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem)
    return fp.getvalue()


def _encoded(ds: Dataset) -> list[tuple[int, bytes]]:
    return [(int(elem.tag), _encode(elem)) for elem in ds]


@lru_cache(maxsize=64)
def _series_encoded(series: SyntheticSeries, rows: int, columns: int) -> tuple[tuple[int, bytes], ...]:
    ds = Dataset()
    _series_elements(ds, series, rows, columns)
    return tuple(_encoded(ds))


@lru_cache(maxsize=1)
def _meta_static() -> tuple[bytes, bytes]:
    """Encoded file meta elements before and after (0002,0003), which varies."""
    before = _encode(DataElement(0x00020001, "OB", b"\x00\x01")) + _encode(
        DataElement(0x00020002, "UI", CT_IMAGE_STORAGE)
    )
    after = (
        _encode(DataElement(0x00020010, "UI", ExplicitVRLittleEndian))
        + _encode(DataElement(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID))
        + _encode(DataElement(0x00020013, "SH", _VERSION_NAME))
    )
    return before, after


def _meta_bytes(sop_uid: str) -> bytes:
    before, after = _meta_static()
    group = before + _encode(DataElement(0x00020003, "UI", sop_uid)) + after
    return _encode(DataElement(0x00020000, "UL", len(group))) + group


def _series_elements(ds: Dataset, series: SyntheticSeries, rows: int, columns: int) -> None:
    """Patient, study, series and every image attribute that is the same for each slice."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.PatientName = series.patient_name
    ds.PatientID = series.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = series.study_uid
    ds.StudyDate = series.study_date
    ds.StudyTime = "080000"
    ds.StudyID = series.study_uid[-8:]
    ds.AccessionNumber = f"ACC{series.study_uid[-10:]}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic study"
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDate = series.study_date
    ds.SeriesTime = "080000"
    ds.SeriesDescription = series.description
    ds.Modality = series.modality
    ds.Manufacturer = "dicom-transfer synthetic"
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = series.study_uid + ".1"  # 2.25.<39 digits>: room to spare
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.ContentDate = series.study_date
    ds.ContentTime = "080000"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = _SLICE_MM
    ds.PixelSpacing = [160.0 / rows, 160.0 / columns]
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0


def _instance_elements(ds: Dataset, series: SyntheticSeries, index: int, rows: int, columns: int) -> None:
    ds.SOPInstanceUID = series.sop_uids[index]
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-80.0, -80.0, -index * _SLICE_MM]
    ds.SliceLocation = -index * _SLICE_MM
    # OW stated here: a lone element cannot borrow BitsAllocated to resolve "OB or OW".
    ds.add_new(0x7FE00010, "OW", _pixels(series, index, rows, columns).tobytes())


def upload(
    rest: OrthancRest,
    series: Iterable[SyntheticSeries],
    *,
    rows: int | None = None,
    columns: int | None = None,
    threads: int = 4,
) -> int:
    """POST every instance to an Orthanc (`/instances`); returns how many were stored.

    Raises OrthancError when any answer is not `Success` or `AlreadyStored`.
    """
    work = [(s, i) for s in series for i in range(len(s.sop_uids))]

    def store(item: tuple[SyntheticSeries, int]) -> None:
        s, i = item
        # Storing the same instance twice answers AlreadyStored: safe to retry.
        answer = rest.post("/instances", content=instance_bytes(s, i, rows=rows, columns=columns))
        status = answer.get("Status") if isinstance(answer, dict) else None
        if status not in _STORED:
            raise OrthancError(None, f"{rest.url}/instances", f"instance {i + 1} not stored: Status {status!r}")

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in pool.map(store, work):
            pass
    return len(work)


def write_files(
    series: Iterable[SyntheticSeries], directory: Path, *, rows: int | None = None, columns: int | None = None
) -> list[Path]:
    """Write every instance as `directory/<SeriesInstanceUID>/<InstanceNumber:04d>.dcm`."""
    paths = []
    for s in series:
        folder = Path(directory) / s.series_uid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(len(s.sop_uids)):
            path = folder / f"{i + 1:04d}.dcm"
            path.write_bytes(instance_bytes(s, i, rows=rows, columns=columns))
            paths.append(path)
    return paths


def write_batch_csv(series: Iterable[SyntheticSeries], path: Path, *, with_study: bool = True) -> Path:
    """A batch CSV for `--batch`: `SeriesInstanceUID[,StudyInstanceUID]`, one series a row."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["SeriesInstanceUID", "StudyInstanceUID"] if with_study else ["SeriesInstanceUID"])
        for s in series:
            writer.writerow([s.series_uid, s.study_uid] if with_study else [s.series_uid])
    return path
