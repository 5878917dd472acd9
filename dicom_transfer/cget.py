"""C-GET instead of C-MOVE (`transfer.retrieve: get`): what a get job's outcome means.

Pure logic and words; the scheduler asks. Orthanc (checked on 1.12.7) ends a C-GET job
Failure only when the association or its negotiation failed: a PACS without the C-GET
service shows as "no acceptable presentation context". Any final C-GET status (0xA702,
0xC000, 0xB000 were tried) ends the job Success, so a refusal is seen only as a C-GET that
sent nothing; and since a C-GET job ends after its C-STOREs, nothing sent was not queued.
"""

from __future__ import annotations

from .errors import RetrieveRefused
from .orthanc import GET_JOB, GET_SILENT, GET_UNSUPPORTED, JobStatus


def refused_as_such(method: str, status: JobStatus, source: str) -> RetrieveRefused | None:
    """The error that stops the run when the source does not offer C-GET at all (else None)."""
    if method != GET_JOB or GET_UNSUPPORTED not in (status.error or ""):
        return None
    return RetrieveRefused(f"the source ({source}) does not accept C-GET: {status.error}; use transfer.retrieve: move")


def sent_nothing(method: str, succeeded: bool, count: int, baseline: int) -> bool:
    """A C-GET job that ended Success while the series did not grow: the PACS refused, or had nothing."""
    return method == GET_JOB and succeeded and count <= baseline


def silent_reason(count: int, expected: int | None) -> str:
    """The short reason of a C-GET that sent nothing (not "dropped": a C-GET is not queued)."""
    return f"short: {count}/{expected if expected is not None else '?'}; {GET_SILENT}"


def every_get_silent(attempts: int, series: str, source: str, local_aet: str | None) -> RetrieveRefused:
    """The error that stops a run in which no C-GET delivered and a series spent its attempts on nothing."""
    aet = repr(local_aet) if local_aet else "(its DicomAet)"
    return RetrieveRefused(
        f"every C-GET of this run was answered without sending anything ({attempts} attempts at series {series});"
        f" Orthanc reports no DIMSE status for a C-GET. The source ({source}) most likely refuses C-GET from the"
        f" local Orthanc's AE title {aet}: allow it there (an Orthanc PACS: that AE title in DicomModalities with"
        " AllowGet, or DicomAlwaysAllowGet), or use transfer.retrieve: move"
    )
