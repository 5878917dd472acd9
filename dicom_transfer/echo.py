"""`echo`: can each party be reached? REST of the local and destination Orthanc, C-ECHO of the source."""

from __future__ import annotations

from .config import Config
from .errors import OrthancError
from .orthanc import Destination, LocalOrthanc


def check_parties(cfg: Config) -> list[tuple[str, bool, str]]:
    """(party, ok, detail) for each party; never raises for an unreachable party."""
    results: list[tuple[str, bool, str]] = []
    local = LocalOrthanc(cfg.local.url, cfg.local.username, cfg.local.password, retry_deadline_s=3, name="local")
    user, password = cfg.destination_auth() or (None, None)
    dest = Destination(
        cfg.destination_url(), user, password,
        retry_deadline_s=3, name="destination",
    )  # fmt: skip
    try:
        local_ok = _rest(results, "local Orthanc (REST)", local)
        _rest(results, "destination Orthanc (REST)", dest)
        if local_ok:
            src = cfg.source
            if src.aet and src.host and src.port:
                local.register_modality(src.modality, src.aet, src.host, src.port)
            _dicom_echo(results, f"source {src.modality} (C-ECHO)", local, src.modality)
            dest_modality = cfg.destination.modality
            if dest_modality:
                _dicom_echo(results, f"destination {dest_modality} (C-ECHO)", local, dest_modality)
    finally:
        local.close()
        dest.close()
    return results


def _rest(results: list[tuple[str, bool, str]], name: str, party: LocalOrthanc | Destination) -> bool:
    try:
        system = party.system()
    except OrthancError as exc:
        results.append((name, False, f"{party.url}: {exc.message}"))
        return False
    results.append((name, True, f"{party.url} Orthanc {system['Version']} AET {system.get('DicomAet')}"))
    return True


def _dicom_echo(results: list[tuple[str, bool, str]], name: str, local: LocalOrthanc, modality: str) -> None:
    try:
        local.echo(modality)
    except OrthancError as exc:
        results.append((name, False, exc.details or exc.message))
        return
    results.append((name, True, "answered"))
