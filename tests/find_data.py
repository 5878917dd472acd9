"""A deterministic synthetic PACS for the `find` tests: studies over two years, mixed modalities.

Every study has a date, a time, an accession number and one to two series of one tiny
instance each (8×8 pixels), so hundreds of studies upload in seconds. Study kinds: CT
(one or two CT series), CBCT (a CT series described "CBCT ..." beside a planning CT),
MR (two series) and CR (one). One busy day holds more studies than the test PACS answers
at once, so that only a split by StudyTime can list it. The tests compare what `find`
returns with `matching()` over this list: the generator's own truth.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from io import BytesIO
from pathlib import Path

from pydicom import dcmwrite

from dicom_transfer.orthanc import OrthancRest
from dicom_transfer.synthetic import SyntheticSeries, instance_dataset

START = dt.date(2022, 1, 1)
DAYS = 730  # two years
BUSY_DAY = "20230315"
PIXELS = 8

_NAMESPACE = uuid.UUID("0b9b1f64-5d0e-4c53-8f0f-6b7f1c2e9a11")
# kind → (weight, study description, series as (modality, description, protocol))
_KINDS: dict[str, tuple[int, str, tuple[tuple[str, str, str], ...]]] = {
    "CT": (35, "CT thorax", (("CT", "Thorax 1.0 B70f", "THORAX_ROUTINE"), ("CT", "Thorax 3.0 Br40", "THORAX_ROUTINE"))),
    "CBCT": (15, "RT pelvis", (("CT", "CBCT pelvis", "CBCT_PELVIS"), ("CT", "Planning CT", "RT_PLANNING"))),
    "MR": (25, "MR brain", (("MR", "T1 axial", "T1_AX"), ("MR", "T2 sagittal", "T2_SAG"))),
    "CR": (25, "CR chest", (("CR", "Chest PA", "CHEST_PA"),)),
}


@dataclass(frozen=True)
class FindSeries:
    """One series of the synthetic PACS with the study attributes `find` queries by."""

    series: SyntheticSeries
    study_time: str
    accession: str
    protocol: str
    study_description: str

    @property
    def uid(self) -> str:
        return self.series.series_uid

    @property
    def study_uid(self) -> str:
        return self.series.study_uid

    @property
    def modality(self) -> str:
        return self.series.modality

    @property
    def description(self) -> str:
        return self.series.description

    @property
    def study_date(self) -> str:
        return self.series.study_date

    @property
    def patient_id(self) -> str:
        return self.series.patient_id


def _uid(seed: int, *parts: object) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(map(str, ('find', seed, *parts)))).int}"


def make_pacs(n_studies: int = 560, *, seed: int = 1, patients: int = 140, busy: int = 64) -> list[FindSeries]:
    """`n_studies` studies (of which `busy` on BUSY_DAY), same seed → same list, same UIDs."""
    rng = random.Random(seed)
    kinds = list(_KINDS)
    weights = [_KINDS[k][0] for k in kinds]
    busy_day = dt.datetime.strptime(BUSY_DAY, "%Y%m%d").date()
    result: list[FindSeries] = []
    for s in range(n_studies):
        kind = rng.choices(kinds, weights)[0]
        day = busy_day if s < busy else START + dt.timedelta(days=rng.randrange(DAYS))
        seconds = 7 * 3600 + rng.randrange(12 * 3600)  # 07:00:00 .. 18:59:59
        time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        patient = rng.randrange(patients) + 1
        study_uid = _uid(seed, "study", s)
        _, study_description, plan = _KINDS[kind]
        if kind == "CT" and rng.random() < 0.5:
            plan = plan[:1]
        for n, (modality, description, protocol) in enumerate(plan, start=1):
            series_uid = _uid(seed, "series", s, n)
            result.append(
                FindSeries(
                    series=SyntheticSeries(
                        patient_id=f"FND{seed:02d}{patient:04d}",
                        patient_name=f"Find^Patient{patient}",
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uids=(_uid(seed, "instance", series_uid, 0),),
                        modality=modality,
                        description=description,
                        series_number=n,
                        study_date=day.strftime("%Y%m%d"),
                        rows=PIXELS,
                        columns=PIXELS,
                    ),
                    study_time=time,
                    accession=f"A{seed:02d}{s:06d}",
                    protocol=protocol,
                    study_description=study_description,
                )
            )
    return result


def instance_file(item: FindSeries) -> bytes:
    """The series' one instance as a Part-10 file, with the study attributes set."""
    ds = instance_dataset(item.series, 0)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = item.study_time
    ds.AccessionNumber = item.accession
    ds.ProtocolName = item.protocol
    ds.StudyDescription = item.study_description
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def upload(rest: OrthancRest, items: Iterable[FindSeries], *, threads: int = 4) -> int:
    """POST every instance to an Orthanc; returns how many."""
    work = list(items)

    def store(item: FindSeries) -> None:
        answer = rest.post("/instances", content=instance_file(item))
        assert answer.get("Status") in ("Success", "AlreadyStored"), answer

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(store, work))
    return len(work)


def write_files(items: Iterable[FindSeries], directory: Path) -> list[Path]:
    """One file per series under `directory` (for `dcmqridx`)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, item in enumerate(items):
        path = directory / f"{n:05d}.dcm"
        path.write_bytes(instance_file(item))
        paths.append(path)
    return paths


def _in(value: str, wanted: str | None) -> bool:
    if not wanted:
        return True
    lo, _, hi = wanted.partition("-")
    return lo <= value <= (hi or lo)


def matching(
    items: Iterable[FindSeries],
    *,
    study_date: str | None = None,
    patient_id: str | None = None,
    modality: str | None = None,
    description: str | None = None,
    exclude_descriptions: tuple[str, ...] = (),
    include_modalities: tuple[str, ...] = (),
) -> set[str]:
    """SeriesInstanceUIDs a query row should find: the truth `find` is compared with."""
    return {
        i.uid
        for i in items
        if _in(i.study_date, study_date)
        and (patient_id is None or i.patient_id == patient_id)
        and (modality is None or i.modality == modality)
        and (description is None or fnmatchcase(i.description.casefold(), description.casefold()))
        and not any(fnmatchcase(i.description.casefold(), p.casefold()) for p in exclude_descriptions)
        and (not include_modalities or i.modality in include_modalities)
    }
