"""`python main.py demo`: the main job on an embedded stack with synthetic data.

Two Orthanc processes on free loopback ports (TCP_NODELAY=1): a "hospital PACS" filled
with synthetic CT series, and a "centre" that is both the local Orthanc (it issues the
C-FIND/C-MOVE) and the destination. Then the real transfer, verified, and the summary.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from .config import load_config
from .errors import DicomTransferError
from .htmlreport import page_options, write_html
from .stack import start_stack
from .synthetic import make_series, upload, write_batch_csv
from .transfer import run_batch

MARKER = ".dicom-transfer-demo"


class DemoError(DicomTransferError):
    exit_code = 2


def _fresh_workdir(workdir: Path) -> None:
    """Start from an empty folder; only a folder the demo made itself is ever emptied."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise DemoError(f"{workdir}: exists and was not made by the demo; pick another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `python main.py demo`; emptied by the next demo run\n")


def run_demo(workdir: Path, *, n_series: int = 20, n_instances: int = 50, console: Console) -> int:
    """Run the demo end to end; returns the transfer's exit code."""
    workdir = workdir.resolve()
    _fresh_workdir(workdir)
    console.print(f"[bold]dicom-transfer demo[/] in {workdir}")
    t0 = time.monotonic()
    with start_stack(workdir / "servers", "same") as stack:
        console.print(
            f"  hospital PACS  {stack.pacs.url}  AET {stack.pacs.spec.aet} port {stack.pacs.spec.dicom_port}\n"
            f"  centre Orthanc {stack.centre.url}  AET {stack.centre.spec.aet} port {stack.centre.spec.dicom_port}"
            f"  (local and destination)\n"
            f"  started in {time.monotonic() - t0:.1f} s",
            highlight=False,
        )
        series = make_series(n_series, n_instances, seed=2026)
        t1 = time.monotonic()
        stored = upload(stack.pacs.rest, series)
        console.print(
            f"  PACS filled with {len(series)} synthetic CT series, {stored} instances"
            f" in {time.monotonic() - t1:.1f} s",
            highlight=False,
        )
        batch = write_batch_csv(series, workdir / "series.csv")
        config_path = workdir / "transfer.yaml"
        config_path.write_text(
            "# written by the demo: the embedded stack's addresses\n"
            f"local: {{url: {stack.centre.url}}}\n"
            "source: {modality: PACS}\n"
            f"destination: {{aet: {stack.destination_aet}}}\n"
            "transfer: {max_in_flight: 1, stall_s: 5, move_timeout_s: 120}\n"
        )
        console.print(f"  batch {batch}\n  transferring (one series at a time, each verified)...", highlight=False)
        from .cli import _print_summary, _progress

        cfg = load_config(config_path)
        report_path = workdir / "report.json"
        with _progress(False) as on_progress:
            outcome = run_batch(cfg, batch, report_path=report_path, on_progress=on_progress)
        _print_summary(outcome.report, outcome.journal_path, outcome.report_path)
        html = write_html(outcome.journal_path, workdir / "report.html", page_options(cfg))
        console.print(f"html:    {html}", highlight=False)
        held = stack.centre.rest.get("/statistics")["CountInstances"]
        python = os.path.relpath(sys.executable) if sys.prefix != sys.base_prefix else "python"
        console.print(
            f"  the centre now holds {held} instances; try:\n"
            f"    {python} main.py status --journal {outcome.journal_path}\n"
            f"    {python} main.py status --serve 127.0.0.1:8099 --journal {outcome.journal_path}",
            highlight=False,
        )
        console.print("  stopping the demo's Orthanc servers", highlight=False)
    return outcome.exit_code
