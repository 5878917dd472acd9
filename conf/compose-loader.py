"""The `pacs-loader` of docker-compose.yml: fill the stand-in PACS, write the batch, exit.

Waits until the PACS (and the centre, so that the controller starting after this one-shot
finds both up) answer `GET /system`, uploads synthetic CT series to the PACS over REST and
writes the batch CSV the controller reads. Safe to run again: the same seed gives the same
UIDs, instances already stored answer `AlreadyStored` and the batch is rewritten unchanged.

Environment (defaults are the compose stack's):
  PACS_URL          http://pacs:8042
  CENTRE_URL        http://centre:8042   (empty: do not wait for the centre)
  ORTHANC_USERNAME  transfer
  ORTHANC_PASSWORD  (no default; unset means no authentication)
  LOADER_SERIES     20        LOADER_INSTANCES  50        LOADER_SEED  2026
  BATCH_CSV         /data/series.csv
  LOADER_WAIT_S     120       how long to wait for the Orthancs
Exit codes: 0 done, 1 an Orthanc refused or never answered, 2 bad environment.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # /app in the image, or a checkout

from dicom_transfer.errors import OrthancError, TransientOrthancError  # noqa: E402
from dicom_transfer.orthanc import OrthancRest  # noqa: E402
from dicom_transfer.synthetic import make_series, upload, write_batch_csv  # noqa: E402


class LoaderError(Exception):
    """Something this script reports in one line and exits 1 for."""


class BadEnvironment(Exception):
    """A LOADER_* variable is not usable: exit 2."""


def _int_env(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(text)
    except ValueError:
        raise BadEnvironment(f"{name}={text!r} is not an integer") from None
    if value < minimum:
        raise BadEnvironment(f"{name} must be >= {minimum}, got {value}")
    return value


def wait_for(rest: OrthancRest, label: str, deadline: float) -> str:
    """Poll `GET /system` until it answers; returns the Orthanc version."""
    while True:
        try:
            return str(rest.system()["Version"])
        except TransientOrthancError as exc:
            if time.monotonic() > deadline:
                raise LoaderError(f"{label} at {rest.url} did not answer: {exc}") from exc
        except OrthancError as exc:  # 401 and the like: waiting will not help
            raise LoaderError(f"{label} at {rest.url}: {exc}") from exc
        time.sleep(0.5)


def main() -> int:
    username = os.environ.get("ORTHANC_USERNAME", "").strip() or "transfer"
    password = os.environ.get("ORTHANC_PASSWORD") or None
    auth = (username, password) if password is not None else (None, None)
    pacs_url = os.environ.get("PACS_URL", "").strip() or "http://pacs:8042"
    centre_url = os.environ.get("CENTRE_URL", "http://centre:8042").strip()
    try:
        n_series = _int_env("LOADER_SERIES", 20, 1)
        n_instances = _int_env("LOADER_INSTANCES", 50, 1)
        seed = _int_env("LOADER_SEED", 2026, 0)
        wait_s = _int_env("LOADER_WAIT_S", 120, 0)
    except BadEnvironment as exc:
        print(f"pacs-loader: {exc}", file=sys.stderr, flush=True)
        return 2
    batch = Path(os.environ.get("BATCH_CSV", "").strip() or "/data/series.csv")

    deadline = time.monotonic() + wait_s
    try:
        for label, url in (("PACS", pacs_url), ("centre", centre_url)):
            if not url:
                continue
            probe = OrthancRest(url, *auth, name=label, retry_deadline_s=0)
            try:
                version = wait_for(probe, label, deadline)
            finally:
                probe.close()
            print(f"pacs-loader: {label} Orthanc {version} at {url} is up", flush=True)
        series = make_series(n_series, n_instances, seed=seed)
        started = time.monotonic()
        pacs = OrthancRest(pacs_url, *auth, name="PACS")
        try:
            stored = upload(pacs, series)
        finally:
            pacs.close()
    except (LoaderError, OrthancError) as exc:
        print(f"pacs-loader: {exc}", file=sys.stderr, flush=True)
        return 1
    batch.parent.mkdir(parents=True, exist_ok=True)
    write_batch_csv(series, batch)
    print(
        f"pacs-loader: {stored} instances of {len(series)} synthetic CT series on the PACS"
        f" in {time.monotonic() - started:.1f} s; batch {batch}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
