"""Benchmark: a bare loop of blocking C-MOVEs (a) against our verified sequential run (b).

    .venv/bin/python bench/run.py [--series 20 --instances 50] [--orthanc host|new|both] [--repeat 3]

On one loopback stack per Orthanc version (PACS = HOSPITAL, centre = CENTRE = destination,
topology "same"), with the same synthetic series uploaded once to the PACS:

(a) baseline: `POST /modalities/PACS/move` (Series level, no `Asynchronous`: it blocks until
    the PACS's final C-MOVE response), one series after the other, through `OrthancRest`
    (the same HTTP client the tool uses), no verification at all;
(b) `run_batch(cfg, batch, journal_path=<fresh>)` in-process with transfer.max_in_flight 1;
    and the same as a subprocess `python main.py --batch ... --config ... --json`
    (start-up included, reported separately).

The centre is wiped (never the PACS) before every run and its instance count is checked
after every run. The order a/b/cli is reversed on every other repeat; medians are shown.
Then (b) runs once more with a few zero-cost counters and timers (per REST endpoint,
scheduler sleeps, journal methods, per-series timeline from the journal and Orthanc's own
job times), and once under cProfile: bench/out/profile.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import os
import pstats
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom_transfer import logs, transfer  # noqa: E402
from dicom_transfer.config import Config, load_config  # noqa: E402
from dicom_transfer.journal import Journal  # noqa: E402
from dicom_transfer.orthanc import Destination, LocalOrthanc, OrthancRest  # noqa: E402
from dicom_transfer.scheduler import Scheduler  # noqa: E402
from dicom_transfer.stack import Stack, start_stack  # noqa: E402
from dicom_transfer.synthetic import SyntheticSeries, make_series, upload, write_batch_csv  # noqa: E402

OUT = REPO / "bench" / "out"
NEW_ORTHANC = ["bash", str(REPO / ".ci" / "orthanc-new"), "exec", "/usr/sbin/Orthanc"]
TARGET_RATIO = 0.95


# ---------------------------------------------------------------------------------------
# (a) the baseline


def run_baseline(stack: Stack, series: list[SyntheticSeries]) -> tuple[float, list[float], int]:
    """Blocking moves, one after the other; returns (seconds, per-move seconds, REST calls)."""
    t0 = time.perf_counter()
    rest = OrthancRest(stack.centre.url, name="baseline", timeout_s=600.0)
    per_move = []
    try:
        for s in series:
            t = time.perf_counter()
            body = {
                "Level": "Series",
                "Resources": [{"StudyInstanceUID": s.study_uid, "SeriesInstanceUID": s.series_uid}],
                "TargetAet": "CENTRE",
            }
            rest.post("/modalities/PACS/move", body, idempotent=False)
            per_move.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
        return elapsed, per_move, rest.calls
    finally:
        rest.close()


# ---------------------------------------------------------------------------------------
# (b) our verified run: capture the clients and the journal run_batch makes (no per-call cost)


@dataclass
class Captured:
    rest: list[OrthancRest] = field(default_factory=list)
    journals: list[Journal] = field(default_factory=list)
    schedulers: list[Scheduler] = field(default_factory=list)
    started: float = 0.0  # wall clock (time.time, the journal's clock) around run_batch
    ended: float = 0.0

    @property
    def calls(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for client in self.rest:
            out[client.name] += client.calls
        return dict(out)

    @property
    def writes(self) -> int:
        return sum(j.writes for j in self.journals)


@contextlib.contextmanager
def capture(wrap_sleep: Callable[[float], None] | None = None) -> Iterator[Captured]:
    """Swap transfer's LocalOrthanc/Destination/Journal/Scheduler for recording subclasses."""
    got = Captured()

    class CLocal(LocalOrthanc):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            got.rest.append(self)

    class CDest(Destination):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            got.rest.append(self)

    class CJournal(Journal):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            got.journals.append(self)

    class CScheduler(Scheduler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            if wrap_sleep is not None:
                kw["sleep"] = wrap_sleep
            super().__init__(*a, **kw)
            got.schedulers.append(self)

    saved = {n: getattr(transfer, n) for n in ("LocalOrthanc", "Destination", "Journal", "Scheduler")}
    transfer.LocalOrthanc, transfer.Destination = CLocal, CDest  # type: ignore[misc]
    transfer.Journal, transfer.Scheduler = CJournal, CScheduler  # type: ignore[misc]
    try:
        yield got
    finally:
        for name, value in saved.items():
            setattr(transfer, name, value)


def run_ours(
    cfg: Config, batch: Path, journal: Path, n: int, wrap_sleep: Callable[[float], None] | None = None
) -> tuple[float, Captured]:
    _fresh(journal)
    with capture(wrap_sleep) as got:
        got.started, t0 = time.time(), time.perf_counter()
        outcome = transfer.run_batch(cfg, batch, journal_path=journal)
        elapsed, got.ended = time.perf_counter() - t0, time.time()
    s = outcome.report["summary"]
    if outcome.exit_code != 0 or s["complete"] != n:
        raise SystemExit(f"(b) did not complete: exit {outcome.exit_code}, summary {s}")
    return elapsed, got


def run_cli(config: Path, batch: Path, journal: Path, n: int) -> tuple[float, float]:
    """(b) as a user runs it: `main.py --batch ... --config ...`, no `--json`, stderr (the log lines) to a file.

    Returns the wall time and the move phase (first move issued → last series proven, journal clock).
    """
    _fresh(journal)
    cmd = [sys.executable, str(REPO / "main.py"), "--batch", str(batch), "--config", str(config),
           "--journal", str(journal)]  # fmt: skip
    env = {**os.environ, "TCP_NODELAY": "1"}
    log = journal.with_name("cli-stderr.log")
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, check=False)
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"(b, CLI) exit {proc.returncode}:\n{log.read_text()[-2000:]}")
    with closing(sqlite3.connect(journal)) as db:
        complete, first, last = db.execute(
            "SELECT COUNT(*), MIN(first_issued_at), MAX(finished_at) FROM series WHERE state='complete'"
        ).fetchone()
    if complete != n:
        raise SystemExit(f"(b, CLI) did not complete: {complete}/{n}")
    return elapsed, last - first


def _fresh(journal: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# The instrumented run: where does (b) spend its wall-clock time?

_ID = re.compile(r"^(?:[0-9a-f]{8}(?:-[0-9a-f]{4,8}){3,4}|[0-9a-f-]{20,}|\d+)$")


def endpoint(method: str, path: str) -> str:
    return method + " " + "/".join("{id}" if _ID.match(p) else p for p in path.split("/"))


@dataclass
class Timers:
    rest: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    sleeps: list[float] = field(default_factory=list)
    journal: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    sleep: Callable[[float], None] | None = None  # the timed sleep to hand to the Scheduler


@contextlib.contextmanager
def instrument() -> Iterator[Timers]:
    timers = Timers()
    orig_once = OrthancRest._once

    def once(self: OrthancRest, method: str, path: str, *a: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_once(self, method, path, *a)
        finally:
            timers.rest[(self.name, endpoint(method, path))].append(time.perf_counter() - t)

    def sleep(s: float) -> None:
        t = time.perf_counter()
        time.sleep(s)
        timers.sleeps.append(time.perf_counter() - t)

    names = ("plan", "transition", "record", "get", "rows", "due_retries", "next_retry_at",
             "counts", "totals", "iter_rows", "meta", "set_meta", "__init__", "close")  # fmt: skip
    saved = {n: getattr(Journal, n) for n in names}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers.journal[name].append(time.perf_counter() - t)

        return wrapper

    timers.sleep = sleep
    setattr(OrthancRest, "_once", once)  # noqa: B010 - a timing wrapper, restored below
    for n, fn in saved.items():
        setattr(Journal, n, timed(n, fn))
    try:
        yield timers
    finally:
        setattr(OrthancRest, "_once", orig_once)  # noqa: B010
        for n, fn in saved.items():
            setattr(Journal, n, fn)


def _orthanc_time(text: str | None) -> float | None:
    """Orthanc's job times ('20250101T120000.123456', UTC) as a Unix timestamp."""
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


def timeline(journal: Path, centre: OrthancRest, got: Captured) -> dict[str, list[float]]:
    """Per-series phases from the journal's events and Orthanc's job records (seconds)."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        events = db.execute("SELECT at, uid, event FROM events WHERE uid IS NOT NULL ORDER BY id").fetchall()
        jobs = dict(db.execute("SELECT uid, job_id FROM series"))
        order = [r[0] for r in db.execute("SELECT uid FROM series ORDER BY seq")]
    finally:
        db.close()
    at: dict[str, dict[str, float]] = defaultdict(dict)
    for when, uid, event in events:
        at[uid].setdefault(event, when)
    out: dict[str, list[float]] = defaultdict(list)
    issued_all = [e["issued"] for e in at.values() if "issued" in e]
    arrived_all = [e["arrived"] for e in at.values() if "arrived" in e]
    if issued_all and arrived_all:  # once per run, not per series
        out["once: run_batch called -> first issued"].append(min(issued_all) - got.started)
        out["once: last complete -> run_batch returned"].append(got.ended - max(arrived_all))
    prev_arrived = None
    for uid in order:
        e = at[uid]
        issued, arrived = e.get("issued"), e.get("arrived")
        if issued is None or arrived is None:
            continue
        out["issued -> complete (journal)"].append(arrived - issued)
        if prev_arrived is not None:
            out["complete(n-1) -> issued(n)"].append(issued - prev_arrived)
        prev_arrived = arrived
        if "job_ended" in e:
            out["issued -> job_ended seen"].append(e["job_ended"] - issued)
            out["job_ended seen -> complete"].append(arrived - e["job_ended"])
        job_id = jobs.get(uid)
        if not job_id:
            continue
        try:
            job = centre.get(f"/jobs/{job_id}")
        except Exception:  # noqa: BLE001 - history may have dropped it
            continue
        created, completed = _orthanc_time(job.get("CreationTime")), _orthanc_time(job.get("CompletionTime"))
        if created and completed:
            out["job created -> completed (Orthanc)"].append(completed - created)
            out["issued -> job created"].append(created - issued)
            out["job completed -> complete (journal)"].append(arrived - completed)
            if "job_ended" in e:
                out["job completed -> job_ended seen"].append(e["job_ended"] - completed)
    return out


# ---------------------------------------------------------------------------------------
# One Orthanc version


@dataclass
class Result:
    label: str
    version: str
    n: int
    k: int
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    cli: list[float] = field(default_factory=list)
    cli_phase: list[float] = field(default_factory=list)  # the CLI's move phase (see run_cli)
    a_moves: list[float] = field(default_factory=list)
    calls: list[dict[str, int]] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    method: str = ""
    breakdown: str = ""


def centre_instances(stack: Stack) -> int:
    return int(stack.centre.rest.get("/statistics")["CountInstances"])


def wipe_centre(stack: Stack) -> None:
    stack.centre.wipe()
    if centre_instances(stack):
        raise SystemExit("centre not empty after wipe")


def write_config(work: Path, stack: Stack, overrides: dict[str, Any]) -> tuple[Path, Config]:
    """The YAML the CLI reads and the same Config for the in-process runs."""
    raw: dict[str, Any] = {
        "local": {"url": stack.centre.url},
        "source": {"modality": "PACS"},
        "destination": {"aet": "CENTRE"},
    }
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    config = work / "transfer.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config, load_config(config, overrides=overrides)


@dataclass
class Bench:
    """One stack, its data and its config; `once` runs a, b or cli on an empty centre."""

    label: str
    stack: Stack
    series: list[SyntheticSeries]
    batch: Path
    journal: Path
    config: Path
    cfg: Config
    res: Result

    def once(self, kind: str, timed: bool) -> None:
        res, n = self.res, len(self.series)
        wipe_centre(self.stack)
        if kind == "a":
            t, moves, _ = run_baseline(self.stack, self.series)
            if timed:
                res.a.append(t)
                res.a_moves.extend(moves)
        elif kind == "b":
            t, got = run_ours(self.cfg, self.batch, self.journal, n)
            if timed:
                res.b.append(t)
                res.calls.append(got.calls)
                res.writes.append(got.writes)
                res.method = got.schedulers[0].method
        else:
            t, phase = run_cli(self.config, self.batch, self.journal, n)
            if timed:
                res.cli.append(t)
                res.cli_phase.append(phase)
        held, total = centre_instances(self.stack), res.n * res.k
        if held != total:
            raise SystemExit(f"({kind}) centre holds {held} instances, expected {total}")
        print(f"  [{self.label}] {'run ' if timed else 'warm-up '}{kind:<3} {t:7.3f} s", file=sys.stderr)

    def instrumented(self) -> None:
        """(b) with timers: wall time by REST endpoint, sleeps, journal; per-series timeline."""
        wipe_centre(self.stack)
        with instrument() as timers:
            t, got = run_ours(self.cfg, self.batch, self.journal, len(self.series), timers.sleep)
        phases = timeline(self.journal, self.stack.centre.rest, got)
        self.res.breakdown = breakdown_text(self.res, timers, phases, t)

    def profiled(self) -> str:
        wipe_centre(self.stack)
        prof = cProfile.Profile()
        prof.enable()
        t, _ = run_ours(self.cfg, self.batch, self.journal, len(self.series))
        prof.disable()
        return profile_text(self.res, prof, t)


def bench_version(label: str, args: argparse.Namespace, profile_out: list[str]) -> Result:
    command = NEW_ORTHANC if label == "new" else None
    if command is not None:  # builds the 1.12 tree if needed; instant when cached
        subprocess.run(["bash", str(REPO / ".ci" / "orthanc-new"), "build"], check=True, capture_output=True)
    work = OUT / label
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    series = make_series(args.series, args.instances, seed=args.seed)
    batch = write_batch_csv(series, work / "batch.csv")
    storage = (Path(args.storage) / f"dicom-transfer-bench-{label}") if args.storage else work / "stack"
    shutil.rmtree(storage, ignore_errors=True)
    with start_stack(storage, "same", pacs_command=command, centre_command=command) as stack:
        version = stack.centre.rest.system()["Version"]
        pacs_version = stack.pacs.rest.system()["Version"]
        if pacs_version != version:
            version = f"{version} (pacs {pacs_version})"
        upload(stack.pacs.rest, series)
        config, cfg = write_config(work, stack, {"transfer.max_in_flight": 1, **args.overrides})
        res = Result(label, version, args.series, args.instances)
        bench = Bench(label, stack, series, batch, work / "journal.sqlite", config, cfg, res)
        kinds = ("a", "b", "cli") if args.cli else ("a", "b")
        for _ in range(args.warmup):
            for kind in kinds:
                bench.once(kind, timed=False)
        for r in range(args.repeat):  # a, b, cli; then cli, b, a; ...
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                bench.once(kind, timed=True)
        bench.instrumented()
        if args.profile:
            profile_out.append(bench.profiled())
    return res


# ---------------------------------------------------------------------------------------
# Output


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(results: list[Result]) -> str:
    head = (f"{'orthanc':<22} {'series×inst':>11} {'a (s)':>7} {'b in-proc (s)':>13} {'b CLI (s)':>9} "
            f"{'a/b':>6} {'a/b CLI':>7} {'inst/s a':>9} {'inst/s b':>9} {'inst/s CLI':>10} {'b path':>12}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        a, b, c = med(r.a), med(r.b), med(r.cli)
        total = r.n * r.k
        flag = "" if a / b >= TARGET_RATIO else " <"
        lines.append(
            f"{r.version:<22} {f'{r.n}×{r.k}':>11} {a:7.3f} {b:13.3f} {c:9.3f} "
            f"{a / b:6.3f} {a / c:7.3f} {total / a:9.0f} {total / b:9.0f} {total / c:10.0f} {r.method:>12}{flag}"
        )
    lines.append(f"(medians; target a/b >= {TARGET_RATIO}; '<' marks a miss)")
    for r in results:
        paired = [x / y for x, y in zip(r.a, r.b, strict=True)]
        lines.append(f"a/b per repeat {r.label}: {fmt(paired)} (median {med(paired):.3f})")
    for r in results:
        if r.cli_phase:
            paired = [x / y for x, y in zip(r.a, r.cli_phase, strict=True)]
            lines.append(
                f"CLI as a user (stderr to a file), move phase (first move issued -> last proven) {r.label}:"
                f" median {med(r.cli_phase):.3f} s, a/phase {med(r.a) / med(r.cli_phase):.3f};"
                f" per repeat {fmt(paired)} (median {med(paired):.3f}); best of each: a {min(r.a):.3f},"
                f" phase {min(r.cli_phase):.3f}, ratio {min(r.a) / min(r.cli_phase):.3f}"
            )
    for r in results:
        lines.append(
            f"runs {r.label} (s): a {fmt(r.a)} | b {fmt(r.b)} | cli {fmt(r.cli)} | cli phase {fmt(r.cli_phase)}"
        )
    return "\n".join(lines)


def fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


def breakdown_text(r: Result, timers: Timers, phases: dict[str, list[float]], t_inst: float) -> str:
    n = r.n
    lines = [f"== (b) per-series overhead, Orthanc {r.version}, {n}×{r.k}, move path {r.method} =="]
    calls = defaultdict(list)
    for c in r.calls:
        for name, v in c.items():
            calls[name].append(v)
    total_calls = [sum(c.values()) for c in r.calls]
    lines.append(
        "timed runs (median): REST calls/series "
        + ", ".join(f"{name} {med(v) / n:.1f}" for name, v in sorted(calls.items()))
        + f", total {med(total_calls) / n:.1f}; journal writes/series {med(r.writes) / n:.1f}"
    )
    a_per = med(r.a) / n
    b_per = med(r.b) / n
    lines.append(
        f"per series: a {a_per * 1000:.1f} ms (median single blocking move {med(r.a_moves) * 1000:.1f} ms), "
        f"b {b_per * 1000:.1f} ms, extra {(b_per - a_per) * 1000:+.1f} ms"
    )
    lines.append(f"instrumented run: {t_inst:.3f} s ({t_inst / n * 1000:.1f} ms/series; counters add a little)")
    lines.append(f"  {'REST endpoint (client)':<58} {'calls/series':>12} {'ms/call':>8} {'ms/series':>10}")
    rest_total = 0.0
    for (client, ep), ts in sorted(timers.rest.items(), key=lambda kv: -sum(kv[1])):
        rest_total += sum(ts)
        lines.append(
            f"  {ep + ' (' + client + ')':<58} {len(ts) / n:12.2f} {sum(ts) / len(ts) * 1000:8.2f} "
            f"{sum(ts) / n * 1000:10.2f}"
        )
    sleeps = timers.sleeps
    journal_total = sum(sum(v) for v in timers.journal.values())
    lines.append(
        f"  {'all REST (blocking, the move itself included)':<58} {'':>12} {'':>8} {rest_total / n * 1000:10.2f}"
    )
    lines.append(
        f"  {'scheduler sleeps (poll_s)':<58} {len(sleeps) / n:12.2f} "
        f"{(sum(sleeps) / len(sleeps) * 1000 if sleeps else 0):8.2f} {sum(sleeps) / n * 1000:10.2f}"
    )
    lines.append(f"  {'journal (SQLite) methods':<58} {'':>12} {'':>8} {journal_total / n * 1000:10.2f}")
    for name, ts in sorted(timers.journal.items(), key=lambda kv: -sum(kv[1]))[:6]:
        per_call, per_series = sum(ts) / len(ts) * 1000, sum(ts) / n * 1000
        lines.append(f"    {'Journal.' + name:<56} {len(ts) / n:12.2f} {per_call:8.3f} {per_series:10.2f}")
    other = t_inst - rest_total - sum(sleeps) - journal_total
    label = "everything else (Python, logging, start-up)"
    if r.method == "blocking":
        label = "rest (<0: the move's REST call runs in a worker thread)"
    lines.append(f"  {label:<58} {'':>12} {'':>8} {other / n * 1000:10.2f}")
    if phases:
        lines.append(f"  {'timeline from journal events and Orthanc job times (median ms)':<58}")
        for name, xs in phases.items():
            lines.append(
                f"    {name:<56} {med(xs) * 1000:10.1f}   (min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f})"
            )
    return "\n".join(lines)


def profile_text(r: Result, prof: cProfile.Profile, t: float) -> str:
    buf = io.StringIO()
    buf.write(f"==== cProfile of (b) in-process, Orthanc {r.version}, {r.n}×{r.k}, {t:.3f} s under the profiler ====\n")
    buf.write("\n-- top 15 by cumulative time, dicom_transfer/* only --\n")
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(r"dicom_transfer/", 15)
    buf.write("\n-- top 25 by tottime, overall --\n")
    stats.sort_stats("tottime").print_stats(25)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--orthanc", choices=("host", "new", "both"), default="host")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of a, b and cli first")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--storage", metavar="DIR",
        help="where the Orthancs keep their files (default bench/out/<orthanc>/stack); /dev/shm cuts disk noise",
    )  # fmt: skip
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI runs")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile run")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="config override for (b), e.g. transfer.poll_s=0.01 (YAML value; repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    args.overrides = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        args.overrides[key.strip()] = yaml.safe_load(value)
    os.environ["TCP_NODELAY"] = "1"  # the stack sets it for Orthanc; harmless here
    logs.configure(quiet=True)  # as `main.py --json`: warnings only
    OUT.mkdir(parents=True, exist_ok=True)
    labels = ["host", "new"] if args.orthanc == "both" else [args.orthanc]
    results: list[Result] = []
    profiles: list[str] = []
    load_before = os.getloadavg()[0]
    for label in labels:
        results.append(bench_version(label, args, profiles))
    load = f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs"
    text = table(results) + "\n" + load + "\n\n" + "\n\n".join(r.breakdown for r in results) + "\n"
    if args.overrides:
        text = f"(b) config overrides: {args.overrides}\n" + text
    print(text)
    (OUT / "results.txt").write_text(text)
    if profiles:
        (OUT / "profile.txt").write_text("\n\n".join(profiles))
        print(f"profile: {OUT / 'profile.txt'}")


if __name__ == "__main__":
    main()
