"""Command line (typer). The only module that prints and turns errors into exit codes.

Exit codes: 0 every series complete; 1 some failed; 2 bad input or config, or a party
unreachable at start (nothing changed); 3 stopped with work left (resumable). 3 wins over 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import logs
from .config import Config, load_config
from .errors import BatchError, DicomTransferError
from .journal import Journal
from .report import failed_rows
from .report import status as status_of

app = typer.Typer(add_completion=False, help="Verified, throttled, resumable C-MOVE of DICOM series through Orthanc.")
err = Console(stderr=True, soft_wrap=True)
PROGRESS_EVERY_S = 10.0


def _fail(exc: DicomTransferError) -> typer.Exit:
    if isinstance(exc, BatchError):
        err.print(exc.render(), markup=False, highlight=False)
        err.print(f"error: {exc.total} problem(s) in the batch; nothing was written", markup=False)
    else:
        err.print(f"error: {exc}", markup=False, highlight=False)
    return typer.Exit(code=exc.exit_code)


def _load(config: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(config, overrides=overrides or {})


@app.callback(invoke_without_command=True)
def main_command(
    ctx: typer.Context,
    batch: Path | None = typer.Option(None, "--batch", help="CSV of SeriesInstanceUID (or StudyInstanceUID) rows."),
    config: Path | None = typer.Option(None, "--config", help="transfer.yaml (see conf/transfer.example.yaml)."),
    journal: Path | None = typer.Option(None, "--journal", help="Journal path (default <batch>.journal.sqlite)."),
    report: Path | None = typer.Option(None, "--report", help="Write the report: JSON, or CSV for a .csv path."),
    html: Path | None = typer.Option(None, "--html", help="Also write the HTML report (plots) here at the end."),
    json_out: bool = typer.Option(False, "--json", help="Print the report's summary as JSON on stdout."),
    until_window_end: bool = typer.Option(False, "--until-window-end", help="Exit 3 at the window's end."),
    show_phi: bool = typer.Option(False, "--show-phi", help="Include PatientID in reports."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    log_file: Path | None = typer.Option(None, "--log-file", help="Also write JSON-lines logs here."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every series event, also on a terminal."),
) -> None:
    """Run a batch: `python main.py --batch series.csv`. Re-running the same command resumes."""
    if ctx.invoked_subcommand is not None:
        if batch is not None:
            err.print("error: --batch is the main job; it does not go with a subcommand")
            raise typer.Exit(2)
        return
    if batch is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    # On a terminal the progress bar tells the story; per-series lines only with --verbose.
    logs.configure(quiet=quiet or json_out or (sys.stderr.isatty() and not verbose), log_file=log_file)
    from .transfer import run_batch

    try:
        cfg = _load(config)
        with _progress(quiet or json_out) as on_progress:
            outcome = run_batch(
                cfg, batch, journal_path=journal, report_path=report,
                until_window_end=until_window_end, show_phi=show_phi, on_progress=on_progress,
            )  # fmt: skip
    except DicomTransferError as exc:
        raise _fail(exc) from None
    summary = outcome.report["summary"]
    if html is not None:
        _write_html(outcome.journal_path, html, cfg, show_phi=show_phi)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        _print_summary(outcome.report, outcome.journal_path, outcome.report_path)
        if html is not None and html.exists():
            err.print(f"html:    {html}", markup=False, highlight=False)
    raise typer.Exit(outcome.exit_code)


def _write_html(journal: Path, out: Path, cfg: Config | None, *, show_phi: bool) -> None:
    """The HTML report after a run: a failure to write it is a warning, never the run's exit code."""
    from .htmlreport import page_options, write_html

    try:
        write_html(journal, out, page_options(cfg, show_phi=show_phi))
    except (OSError, DicomTransferError) as exc:
        err.print(f"warning: the HTML report was not written: {exc}", markup=False, highlight=False)


def _print_summary(report: dict[str, Any], journal: Path, report_path: Path | None) -> None:
    s = report["summary"]
    err.print(
        f"{s['complete']}/{s['total']} series complete, {s['failed']} failed, {s['pending']} pending;"
        f" {s['instances']} instances in {s['seconds']:.1f} s",
        highlight=False,
    )
    for row in failed_rows(report):  # not the whole list: a batch may have 10^6 series
        if row["state"] == "failed":
            err.print(f"  failed {row['SeriesInstanceUID']}: {row['reason']}", markup=False, highlight=False)
        for step in ("anonymized", "tags", "export", "nifti"):
            if (row.get(step) or {}).get("state") == "failed":
                err.print(f"  {step} failed {row['SeriesInstanceUID']}: {row[step]['reason']}", markup=False)
    for step, c in report.get("steps", {}).items():
        err.print(f"{step}: {c['done']} done, {c['failed']} failed, {c['pending']} pending", markup=False)
    for study in report.get("studies", []):
        if study["reason"]:
            err.print(f"  study {study['StudyInstanceUID']} (line {study['line']}): {study['reason']}", markup=False)
    if report.get("stopped"):
        err.print(f"stopped: {report['stopped']} (run the same command to resume)", markup=False)
    err.print(f"journal: {journal}", markup=False, highlight=False)
    if report_path:
        err.print(f"report:  {report_path}", markup=False, highlight=False)


class _progress:
    """A rich bar on a terminal; otherwise a log line every PROGRESS_EVERY_S seconds."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task: Any = None
        self.last = 0.0
        self.started = 0.0
        self.first = 0

    def __enter__(self) -> Callable[[dict[str, int]], None]:
        if not self.quiet and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("[bold]series"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=err,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("series", total=None, detail="")
        return self.update

    def update(self, counts: dict[str, int]) -> None:
        instances = counts.get("instances", 0)
        states = {k: v for k, v in counts.items() if k not in ("instances", "limit")}
        total = sum(states.values())
        done = counts["complete"] + counts["failed"]
        flying = counts["moving"] + counts["verifying"]
        if not self.started:
            self.started, self.first = time.monotonic(), instances
        elapsed = time.monotonic() - self.started
        rate = (instances - self.first) / elapsed if elapsed > 1 else 0.0
        detail = (
            f"{instances} inst, {rate:.0f} inst/s, in flight {flying}/{counts.get('limit', '?')},"
            f" failed {counts['failed']}, retry {counts['waiting_retry']}"
        )
        held, forwarding = counts.get("held_local", 0), counts.get("forwarding", 0)
        if held or forwarding:  # relay mode: the second half, local Orthanc → destination
            detail += f", at local {held + forwarding} (forwarding {forwarding})"
        if self.bar is not None:
            self.bar.update(self.task, total=total, completed=done, detail=detail)
        elif not self.quiet and time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            err.print(f"progress: {done}/{total} done; {detail}", markup=False, highlight=False)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def status(
    journal: Path = typer.Option(..., "--journal", help="The run's journal (works while it runs)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    serve: str | None = typer.Option(
        None, "--serve", metavar="HOST:PORT", help="Serve the HTML report live (read-only), e.g. 127.0.0.1:8099."
    ),
    config: Path | None = typer.Option(None, "--config", help="With --serve: the run's transfer.yaml."),
    refresh: float = typer.Option(5.0, "--refresh", min=1, help="With --serve: seconds between page reloads."),
    show_phi: bool = typer.Option(False, "--show-phi", help="With --serve: show PatientID of failed series."),
    all_series: bool = typer.Option(False, "--all-series", help="With --serve: list every series, not only failures."),
) -> None:
    """Where a batch stands, from its journal (also while a run is going on, or after a crash)."""
    if serve is not None:
        _serve(journal, serve, config, refresh=refresh, show_phi=show_phi, all_series=all_series)
        return
    try:
        j = Journal(journal, readonly=True)
    except DicomTransferError as exc:
        raise _fail(exc) from None
    try:
        info = status_of(j, time.time())
    finally:
        j.close()
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    _print_status(info)


def _print_status(info: dict[str, Any]) -> None:
    """`status` as text: one line per fact, the in-flight series and the last errors."""
    s = info["summary"]
    typer.echo(f"journal   {info['journal']}")
    if info.get("run"):
        run = info["run"]
        typer.echo(f"run       pid {run['pid']} on {run['host']}, started {run['started_at']}")
    for p in info["paused"]:
        typer.echo(f"paused    {p['event']} since {p['since']}: {p['why']}")
    typer.echo(f"series    {s['total']}: {s['complete']} complete, {s['failed']} failed, {s['pending']} pending")
    if not info["plan"]["complete"]:
        typer.echo(f"planning  not finished (batch line {info['plan']['line'] or 0} reached)")
    typer.echo("states    " + ", ".join(f"{k} {v}" for k, v in info["states"].items() if v))
    typer.echo(f"instances {s['instances']}")
    if s.get("at_local"):
        typer.echo(f"relay     {s['at_local']} series ({s['instances_at_local']} instances) at the local Orthanc,"
                   f" not yet at the destination")  # fmt: skip
    if info["series_per_minute"]:
        eta = f", eta {info['eta_seconds']} s" if info["eta_seconds"] is not None else ""
        typer.echo(f"rate      {info['series_per_minute']} series/min{eta}")
    for step, c in info.get("steps", {}).items():
        typer.echo(f"{step:<9} {c['done']} done, {c['failed']} failed, {c['pending']} pending")
    if info.get("throttle"):
        t = info["throttle"]
        typer.echo(
            f"throttle  limit {t['limit']}, ceiling {t['ceiling'] or '-'}, drops {t['drops']}, refusals {t['refusals']}"
        )
    for f in info["in_flight"]:
        typer.echo(f"in flight {f['SeriesInstanceUID']} {f['state']} {f['received']}/{f['expected']}")
    for e in info["last_errors"]:
        typer.echo(f"error     {e['at']} {e['SeriesInstanceUID']} {e['event']}: {e['detail']}")


def _serve(
    journal: Path, address: str, config: Path | None, *, refresh: float, show_phi: bool, all_series: bool
) -> None:
    """The live page until Ctrl-C (exit 0)."""
    from .htmlreport import page_options
    from .serve import LivePage, is_loopback, make_server, parse_address

    try:
        host, port = parse_address(address)
        cfg = _load(config) if config is not None else None
        opts = page_options(cfg, show_phi=show_phi, all_series=all_series, live=True, refresh_s=refresh)
        server = make_server(host, port, LivePage(journal, opts))
    except DicomTransferError as exc:
        raise _fail(exc) from None
    if not is_loopback(host):
        err.print(
            f"warning: serving on {host}, reachable from other machines; the page shows series UIDs"
            + (" and PatientIDs" if show_phi else "") + " (no login, read-only)",
            markup=False, highlight=False,
        )  # fmt: skip
    if not journal.exists():
        err.print(f"warning: {journal}: no journal yet; the page waits for it", markup=False, highlight=False)
    try:  # from the line that says it serves on: a Ctrl-C right after it is a clean stop too
        bound = server.server_address
        shown = f"[{host}]" if ":" in host else host
        err.print(f"serving http://{shown}:{bound[1]!s}/ (Ctrl-C stops)", markup=False, highlight=False)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    raise typer.Exit(0)


@app.command()
def report(
    journal: Path = typer.Option(..., "--journal", help="The run's journal."),
    html: Path = typer.Option(..., "--html", help="The HTML report to write (one self-contained file)."),
    config: Path | None = typer.Option(None, "--config", help="The run's transfer.yaml (settings, window shading)."),
    show_phi: bool = typer.Option(False, "--show-phi", help="Show PatientID of the series listed."),
    all_series: bool = typer.Option(False, "--all-series", help="List every series, not only failures."),
) -> None:
    """Write the HTML report of a journal: plots over time, reasons, durations, settings."""
    from .htmlreport import page_options, write_html

    try:
        cfg = _load(config) if config is not None else None
        write_html(journal, html, page_options(cfg, show_phi=show_phi, all_series=all_series))
    except DicomTransferError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        err.print(f"error: {html}: {exc.strerror or exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    err.print(f"html: {html}", markup=False, highlight=False)


@app.command()
def echo(config: Path | None = typer.Option(None, "--config", help="transfer.yaml")) -> None:
    """C-ECHO the source (and destination modality) from the local Orthanc; REST of local and destination."""
    from .echo import check_parties

    try:
        cfg = _load(config)
        results = check_parties(cfg)
    except DicomTransferError as exc:
        raise _fail(exc) from None
    ok = True
    for name, good, detail in results:
        ok &= good
        typer.echo(f"{'ok  ' if good else 'FAIL'} {name:<28} {detail}")
    raise typer.Exit(0 if ok else 2)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-run"), "--workdir", help="Where the demo keeps servers and files."),
    series: int = typer.Option(20, "--series", min=1, help="Synthetic series to transfer."),
    instances: int = typer.Option(50, "--instances", min=1, help="Instances per series."),
) -> None:
    """Start a hospital PACS and a centre Orthanc on loopback, fill the PACS, transfer, verify."""
    from .demo import run_demo

    logs.configure(quiet=True)
    try:
        code = run_demo(workdir, n_series=series, n_instances=instances, console=err)
    except DicomTransferError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


class _ImageProgress:
    """The ImageType checks of `find`: a rich bar on a terminal, else a line every PROGRESS_EVERY_S."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task: Any = None
        self.last = 0.0
        self.seen = (0, 0)

    def __enter__(self) -> Callable[[int, int], None]:
        return self.update

    def update(self, done: int, due: int) -> None:
        self.seen = (done, due)
        if self.quiet:
            return
        if self.bar is None and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("[bold]ImageType (IMAGE-level C-FIND)"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=err,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("image", total=due)
        if self.bar is not None:
            self.bar.update(self.task, total=due, completed=done)
        elif done == 0 and due and not self.last or time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            err.print(f"ImageType: {done}/{due} series checked (one IMAGE-level C-FIND each)", markup=False)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif not self.quiet and self.seen[1]:
            err.print(f"ImageType: {self.seen[0]}/{self.seen[1]} series checked", markup=False)


@app.command()
def find(
    query: Path = typer.Option(..., "--query", help="CSV of query rows (header: DICOM keywords such as StudyDate)."),
    out: Path = typer.Option(..., "--out", help="The series manifest CSV to write (accepted by --batch)."),
    config: Path | None = typer.Option(None, "--config", help="transfer.yaml (source, local Orthanc, filter)."),
    allow_wildcards: bool = typer.Option(False, "--allow-wildcards", help="Accept '*' and '?' in text columns."),
    show_phi: bool = typer.Option(
        False, "--show-phi", help="Add a PatientID column to the manifest; allow patient data in --fields."
    ),
    fields: str | None = typer.Option(
        None, "--fields",
        help="Extra manifest columns, values as the source answers: Keyword,(gggg,eeee),..."
        " (patient data only with --show-phi).",
    ),  # fmt: skip
    max_answers: int | None = typer.Option(
        None, "--max-answers", min=1, help="The source truncates silently at N answers: treat N answers as cut."
    ),
    journal: Path | None = typer.Option(None, "--journal", help="An earlier run's journal, to estimate the time."),
    json_out: bool = typer.Option(False, "--json", help="Print the totals as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Query the source (STUDY, then SERIES level) and write a series manifest for --batch.

    Query columns: PatientID, PatientName (exact; names are stored inconsistently: prefer
    PatientID), StudyDate, StudyTime, AccessionNumber, StudyInstanceUID, SeriesInstanceUID,
    Modality, StudyDescription, SeriesDescription, ProtocolName, PatientBirthDate, ImageType.
    ImageType is slow: one IMAGE-level C-FIND per series found, asking every instance.
    """
    from .find import run_find

    logs.configure(quiet=quiet or json_out or sys.stderr.isatty())
    try:
        cfg = _load(config)
        with _ImageProgress(quiet or json_out) as on_image_check:
            outcome = run_find(
                cfg, query, out, allow_wildcards=allow_wildcards, show_phi=show_phi,
                max_answers=max_answers, journal=journal, fields=fields, on_image_check=on_image_check,
            )  # fmt: skip
    except BatchError as exc:
        err.print(exc.render(), markup=False, highlight=False)
        err.print(f"error: {exc.total} problem(s) in the query file; nothing was written", markup=False)
        raise typer.Exit(code=exc.exit_code) from None
    except DicomTransferError as exc:
        raise _fail(exc) from None
    summary = outcome.summary()
    if json_out:
        typer.echo(json.dumps(summary))
        raise typer.Exit(0)
    typer.echo(
        f"{summary['rows']} query rows: {summary['studies']} studies, {summary['series']} series,"
        f" {summary['instances']} instances"
        + (f" ({summary['series_without_count']} series without a count)" if summary["series_without_count"] else "")
    )
    typer.echo(f"estimated transfer: {summary['estimate']}")
    typer.echo(
        f"C-FIND: {summary['queries']} queries, {summary['refused'] + summary['full']} answer sets too large"
        f" (split {summary['splits']} times)"
    )
    if summary["image_type_left_out"]:
        typer.echo(f"ImageType: {summary['image_type_left_out']} series without a matching instance left out")
    for key, n in summary["unverified"].items():
        err.print(f"warning: the source did not return {key} for {n} series: kept without checking it", markup=False)
    for warning in summary["warnings"]:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if summary["dropped"] or summary["invalid"]:
        err.print(
            f"warning: {summary['dropped']} answers did not match their row on a second look and"
            f" {summary['invalid']} had no valid UID: left out",
            markup=False,
        )
    typer.echo(f"manifest: {summary['manifest']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
