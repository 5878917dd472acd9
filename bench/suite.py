"""Benchmark suite P2-P5: our verified run against DCMTK and naive controllers, latency, scale.

    .venv/bin/python bench/suite.py [--only P2,P3,P4,P5] [--series 20 --instances 50] [--repeat 2]

One loopback stack (Debian's Orthanc, topology "same": PACS = HOSPITAL, centre = CENTRE =
destination), the synthetic series uploaded once to the PACS, the centre wiped before
every run. TCP_NODELAY=1 for Orthanc (the stack sets it) and for every DCMTK subprocess.

P2  ours (transfer.max_in_flight 4) vs 4 parallel `storescu` pushing the same files to the centre.
P3  ours vs a controller that starts an asynchronous retrieve and polls the count every 5 s
    (on --poll-series series), and vs a bash-style loop of `movescu` per series.
P4  completion latency: an observer thread counts each series at the destination every 10 ms;
    journal 'arrived' time minus the first moment the series was whole.
P5  100,000- and 1,000,000-row batches through the CLI: validate + plan outside the time
    window (exit 3), time and the CLI's own peak RSS (wait4); `status --json` time; kill -9
    mid-run, then the time to the re-run's first move; (10^6) kill -9 mid-plan, then the
    re-run plans the rest and moves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from run import centre_instances, run_ours, wipe_centre, write_config  # noqa: E402

from dicom_transfer import logs  # noqa: E402
from dicom_transfer.config import Config  # noqa: E402
from dicom_transfer.orthanc import Destination, OrthancRest  # noqa: E402
from dicom_transfer.stack import HOST, Stack, start_stack  # noqa: E402
from dicom_transfer.synthetic import SyntheticSeries, make_series, upload, write_batch_csv, write_files  # noqa: E402

OUT = BENCH / "out" / "suite"
ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Row:
    id: str
    what: str
    ours: str
    baseline: str
    ratio: str
    ok: str


ROWS: list[Row] = []
NOTES: list[str] = []


def note(name: str, ours: list[float], base: list[float]) -> None:
    def fmt(xs: list[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    ratios = [b / o for o, b in zip(ours, base, strict=True)]
    NOTES.append(f"{name} runs (s): ours {fmt(ours)} | baseline {fmt(base)} | ratios {fmt(ratios)}")


def add(id_: str, what: str, ours: str, baseline: str, ratio: str, ok: bool | None) -> None:
    ROWS.append(Row(id_, what, ours, baseline, ratio, "-" if ok is None else ("yes" if ok else "NO")))
    print(f"  {id_} {what}: ours {ours} | baseline {baseline} | {ratio} | {ROWS[-1].ok}", file=sys.stderr)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Ctx:
    stack: Stack
    series: list[SyntheticSeries]
    work: Path
    args: argparse.Namespace

    @property
    def total(self) -> int:
        return sum(len(s.sop_uids) for s in self.series)

    def cfg(self, in_flight: int, name: str) -> tuple[Path, Config]:
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        return write_config(d, self.stack, {"transfer.max_in_flight": in_flight})

    def ours(self, in_flight: int, series: list[SyntheticSeries] | None = None) -> float:
        series = series if series is not None else self.series
        _, cfg = self.cfg(in_flight, f"if{in_flight}")
        batch = write_batch_csv(series, self.work / f"batch-{len(series)}.csv")
        wipe_centre(self.stack)
        t, _ = run_ours(cfg, batch, self.work / f"journal-if{in_flight}.sqlite", len(series))
        self.check(sum(len(s.sop_uids) for s in series), f"ours in-flight {in_flight}")
        return t

    def check(self, expected: int, what: str) -> None:
        held = centre_instances(self.stack)
        if held != expected:
            raise SystemExit(f"{what}: centre holds {held} instances, expected {expected}")


def alternate(ctx: Ctx, a: Callable[[], float], b: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Run a and b --repeat times each, order flipped every round; returns their times."""
    ta: list[float] = []
    tb: list[float] = []
    for r in range(ctx.args.repeat):
        if r % 2 == 0:
            ta.append(a())
            tb.append(b())
        else:
            tb.append(b())
            ta.append(a())
    return ta, tb


# ---------------------------------------------------------------------------------------
# P2: storescu x4


def storescu_push(ctx: Ctx, files: list[Path], parallel: int = 4) -> float:
    wipe_centre(ctx.stack)
    size = -(-len(files) // parallel)
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    port = ctx.stack.centre.spec.dicom_port
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(["storescu", "-aec", "CENTRE", HOST, str(port), *map(str, c)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in chunks
    ]  # fmt: skip
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"storescu exit {p.returncode}: {err[-1000:]!r}")
    ctx.check(len(files), "storescu")
    return elapsed


def p2(ctx: Ctx) -> None:
    files_dir = Path(tempfile.mkdtemp(prefix="suite-files-", dir=ctx.work))
    try:
        files = write_files(ctx.series, files_dir)
        ctx.ours(4)  # warm-up
        storescu_push(ctx, files)
        ours, base = alternate(ctx, lambda: ctx.ours(4), lambda: storescu_push(ctx, files))
    finally:
        shutil.rmtree(files_dir, ignore_errors=True)
    note("P2", ours, base)
    o, b = med(ours), med(base)
    n = f"{len(ctx.series)}x{len(ctx.series[0].sop_uids)}"
    add("P2", f"{n}, in-flight 4 vs 4x storescu", f"{o:.2f} s", f"{b:.2f} s", f"{b / o:.2f} (>= 0.85)", b / o >= 0.85)


# ---------------------------------------------------------------------------------------
# P3: 5 s poller and movescu loop


def poller(ctx: Ctx, series: list[SyntheticSeries], every_s: float = 5.0) -> float:
    wipe_centre(ctx.stack)
    rest = OrthancRest(ctx.stack.centre.url, name="poller")
    dest = Destination(ctx.stack.centre.url, name="poller-dest")
    t0 = time.perf_counter()
    try:
        for s in series:
            query = {"StudyInstanceUID": s.study_uid, "SeriesInstanceUID": s.series_uid}
            qid = rest.post("/modalities/PACS/query", {"Level": "Series", "Query": query})["ID"]
            rest.post(f"/queries/{qid}/answers/0/retrieve", {"TargetAet": "CENTRE", "Synchronous": False},
                      idempotent=False)  # fmt: skip
            while True:
                time.sleep(every_s)
                if dest.count(s.series_uid) >= len(s.sop_uids):
                    break
    finally:
        rest.close()
        dest.close()
    elapsed = time.perf_counter() - t0
    ctx.check(sum(len(s.sop_uids) for s in series), "poller")
    return elapsed


def movescu_loop(ctx: Ctx) -> float:
    wipe_centre(ctx.stack)
    port = str(ctx.stack.pacs.spec.dicom_port)
    t0 = time.perf_counter()
    for s in ctx.series:
        keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s.study_uid}", f"SeriesInstanceUID={s.series_uid}"]
        cmd = ["movescu", "-S", "-aec", "HOSPITAL", "-aem", "CENTRE"]
        for k in keys:
            cmd += ["-k", k]
        cmd += [HOST, port]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"movescu exit {proc.returncode}: {proc.stderr[-1000:]}")
    elapsed = time.perf_counter() - t0
    ctx.check(ctx.total, "movescu loop")
    return elapsed


def p3(ctx: Ctx) -> None:
    small = ctx.series[: ctx.args.poll_series]
    k = len(small)
    ours_small = min(ctx.ours(4, small) for _ in range(2))
    slow = poller(ctx, small)
    add("P3a", f"{k} series, vs async retrieve + 5 s count poll", f"{ours_small / k:.3f} s/series",
        f"{slow / k:.3f} s/series", f"{slow / ours_small:.1f}x (>= 20x)", slow / ours_small >= 20)  # fmt: skip
    movescu_loop(ctx)  # warm-up
    ours, base = alternate(ctx, lambda: ctx.ours(4), lambda: movescu_loop(ctx))
    note("P3b", ours, base)
    o, b = med(ours), med(base)
    n = len(ctx.series)
    add("P3b", f"{n} series, in-flight 4 vs movescu loop", f"{o:.2f} s", f"{b:.2f} s", f"{b / o:.2f} (>= 1.0)",
        b / o >= 1.0)  # fmt: skip
    o1 = ctx.ours(1)
    add("P3b'", f"{n} series, in-flight 1 vs movescu loop (info)", f"{o1:.2f} s", f"{b:.2f} s", f"{b / o1:.2f}",
        None)  # fmt: skip


# ---------------------------------------------------------------------------------------
# P4: completion latency


class Observer(threading.Thread):
    """Counts series at the destination every `every_s`; remembers when each was first whole.

    Only the first `window` series not yet whole are polled (the run issues in batch order),
    so one sweep stays short enough for the 10 ms period.
    """

    def __init__(self, url: str, series: list[SyntheticSeries], every_s: float = 0.01, window: int = 5) -> None:
        super().__init__(daemon=True)
        self.url, self.series, self.every_s, self.window = url, series, every_s, window
        self.whole: dict[str, float] = {}
        self.sweeps: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        dest = Destination(self.url, name="observer", timeout_s=10)
        for s in self.series:
            dest.hint(s.series_uid, s.patient_id, s.study_uid)
        try:
            while not self.done.is_set() and len(self.whole) < len(self.series):
                t = time.perf_counter()
                todo = [s for s in self.series if s.series_uid not in self.whole][: self.window]
                for s in todo:
                    if dest.count(s.series_uid) >= len(s.sop_uids):
                        self.whole[s.series_uid] = time.time()
                spent = time.perf_counter() - t
                self.sweeps.append(spent)
                time.sleep(max(0.0, self.every_s - spent))
        finally:
            dest.close()


def completion_times(journal: Path) -> dict[str, float]:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT uid, MIN(at) FROM events WHERE event IN ('arrived', 'present') AND uid IS NOT NULL GROUP BY uid"
        ).fetchall()
    finally:
        db.close()
    return {uid: at for uid, at in rows}


def p4(ctx: Ctx) -> None:
    _, cfg = ctx.cfg(4, "if4")
    batch = write_batch_csv(ctx.series, ctx.work / "batch-p4.csv")
    journal = ctx.work / "journal-p4.sqlite"
    wipe_centre(ctx.stack)
    obs = Observer(ctx.stack.centre.url, ctx.series)
    obs.start()
    try:
        t, _ = run_ours(cfg, batch, journal, len(ctx.series))
    finally:
        time.sleep(0.2)
        obs.done.set()
        obs.join(10)
    done = completion_times(journal)
    lat = [done[u] - w for u, w in obs.whole.items() if u in done]
    if len(lat) != len(ctx.series):
        raise SystemExit(f"P4: latency for {len(lat)} of {len(ctx.series)} series")
    m = med(lat)
    add("P4", f"complete event - whole at dest (median, max; run {t:.2f} s)", f"{m:.3f} s, {max(lat):.3f} s",
        f"sweep {med(obs.sweeps) * 1000:.1f} ms", "median <= 0.3 s", m <= 0.3)  # fmt: skip


# ---------------------------------------------------------------------------------------
# P5: scale

# Runs a command as its child and reports the child's own peak RSS (wait4's ru_maxrss).
# A tiny launcher, because a child's ru_maxrss starts from the RSS of the process that
# forked it (the benchmark itself is large): this one is ~10 MB, below any CLI peak.
LAUNCH = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
           "seconds": time.perf_counter() - t0}, open(sys.argv[1], "w"))
"""


def big_batch(ctx: Ctx, path: Path, rows: int) -> None:
    """`rows` valid rows: the suite's series (held by the PACS) first, then made-up ones (random UIDs)."""
    with path.open("w", encoding="utf-8") as fh:
        fh.write("SeriesInstanceUID,StudyInstanceUID\n")
        for s in ctx.series:
            fh.write(f"{s.series_uid},{s.study_uid}\n")
        for i in range(rows - len(ctx.series)):
            h = hashlib.sha256(f"p5-{i}".encode()).digest()
            fh.write(f"2.25.{int.from_bytes(h[:16], 'big') | 1},2.25.{int.from_bytes(h[16:], 'big') | 1}\n")


def run_measured(cmd: list[str], out: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(out), *cmd], cwd=REPO, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"P5: launcher failed: {proc.stderr[-2000:]}")
    r: dict[str, float] = json.loads(out.read_text())
    r["stderr"] = proc.stderr[-2000:]  # type: ignore[assignment]
    return r


def journal_facts(journal: Path) -> dict[str, object]:
    db = sqlite3.connect(journal, isolation_level=None)  # read-write: a read-only one leaves -shm behind
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
        events = db.execute("SELECT COUNT(*) FROM events WHERE event='issued'").fetchone()[0]
    finally:
        db.close()
    return {"planned": "planned_at" in meta, "plan_at": meta.get("plan_at"), "rows": rows, "issued": events}


def first_issued(cmd: list[str], journal: Path, timeout_s: float = 120.0) -> tuple[float, subprocess.Popen[str]]:
    """Start `cmd`; seconds until the journal holds an 'issued' event of this run. Returns the running process."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, isolation_level=None, timeout=30)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.time() - start < timeout_s:
            try:
                at = db.execute("SELECT MIN(at) FROM events WHERE event='issued' AND at>=?", (start,)).fetchone()[0]
            except sqlite3.OperationalError:  # busy while a chunk commits
                at = None
            if at is not None:
                return float(at) - start, proc
            if proc.poll() is not None:
                err = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise SystemExit(f"P5: the CLI ended (exit {proc.returncode}) before issuing: {err}")
            time.sleep(0.01)
        stop(proc)
        raise SystemExit(f"P5: no 'issued' event within {timeout_s:.0f} s")
    finally:
        db.close()


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def plan_mark(journal: Path) -> int:
    """The batch line planning reached (0 before the first chunk), read without blocking the writer."""
    try:
        db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, isolation_level=None, timeout=0.2)
        try:
            row = db.execute("SELECT value FROM meta WHERE key='plan_at'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return 0
    return int(row[0].split()[0]) if row else 0


def outside_window() -> dict[str, object]:
    """A one-hour window starting two hours from now (UTC): now is outside it."""
    now = time.gmtime()
    start = (now.tm_hour + 2) % 24
    return {"start": f"{start:02d}:{now.tm_min:02d}", "end": f"{(start + 1) % 24:02d}:{now.tm_min:02d}",
            "timezone": "UTC"}  # fmt: skip


def p5_size(ctx: Ctx, rows: int, limits: tuple[float, float], kill_mid_plan: bool) -> None:
    """One batch size: plan outside the window (time, peak RSS, exit 3), status, kill -9 and resume."""
    d = ctx.work / f"p5-{rows}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    batch, journal = d / "big.csv", d / "big.journal.sqlite"
    big_batch(ctx, batch, rows)
    for sub in ("closed", "open"):
        (d / sub).mkdir()
    closed, _ = write_config(d / "closed", ctx.stack, {"transfer.max_in_flight": 4, "window": outside_window()})
    open_, _ = write_config(d / "open", ctx.stack, {"transfer.max_in_flight": 4})
    main = [sys.executable, str(REPO / "main.py"), "--batch", str(batch), "--journal", str(journal), "--json"]
    label = f"{rows:,} rows"
    max_s, max_mb = limits

    r = run_measured([*main, "--config", str(closed), "--until-window-end"], d / "launch.json")
    facts = journal_facts(journal)
    mb, t = r["maxrss_kb"] / 1024, r["seconds"]
    ok = r["rc"] == 3 and facts["planned"] and facts["rows"] == rows and facts["issued"] == 0
    if not ok:
        raise SystemExit(f"P5 {label}: exit {r['rc']}, journal {facts}: {r['stderr']}")
    add("P5a", f"{label}, CLI outside the window: validate + plan, exit 3; peak RSS (wait4)",
        f"{t:.2f} s; {mb:.0f} MB", "-", f"< {max_s:.0f} s; < {max_mb:.0f} MB", t < max_s and mb < max_mb)  # fmt: skip

    st = [sys.executable, str(REPO / "main.py"), "status", "--journal", str(journal), "--json"]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(st, cwd=REPO, env=ENV, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0 or json.loads(proc.stdout)["summary"]["total"] != rows:
            raise SystemExit(f"status exit {proc.returncode}: {proc.stderr[-2000:]}")
    ts = med(times)
    add("P5b", f"{label}: `status --json` (median of 3)", f"{ts:.2f} s", "-", "< 1 s", ts < 1)

    # A real run, killed with SIGKILL while it moves; the same command again.
    wipe_centre(ctx.stack)
    run = [*main, "--config", str(open_)]
    _, proc = first_issued(run, journal)
    time.sleep(0.3)  # a few series further: some complete, some in flight
    stop(proc, signal.SIGKILL)
    before = journal_facts(journal)
    t_issue, proc = first_issued(run, journal)
    stop(proc)
    add("P5c", f"{label}: killed (-9) mid-run after {before['issued']} moves; re-run: start -> first move",
        f"{t_issue:.2f} s", "-", "< 2 s", t_issue < 2)  # fmt: skip

    if not kill_mid_plan:
        return
    journal2 = d / "killed.journal.sqlite"
    run2 = [sys.executable, str(REPO / "main.py"), "--batch", str(batch), "--journal", str(journal2), "--json",
            "--config", str(open_)]  # fmt: skip
    proc = subprocess.Popen(run2, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while plan_mark(journal2) < rows // 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    stop(proc, signal.SIGKILL)
    killed = journal_facts(journal2)
    if killed["planned"] or not killed["rows"]:
        raise SystemExit(f"P5: the kill did not land mid-plan: {killed}")
    wipe_centre(ctx.stack)
    t_issue, proc = first_issued(run2, journal2)
    stop(proc)
    done = journal_facts(journal2)
    ok = bool(done["planned"]) and done["rows"] == rows
    add("P5d", f"{label}: killed (-9) mid-plan at {killed['rows']:,} rows; re-run: plan the rest -> first move",
        f"{t_issue:.2f} s", "-", f"planned {done['rows']:,}/{rows:,}", ok)  # fmt: skip


def p5(ctx: Ctx) -> None:
    p5_size(ctx, 100_000, (3, 100), kill_mid_plan=False)
    p5_size(ctx, 1_000_000, (20, 120), kill_mid_plan=True)


# ---------------------------------------------------------------------------------------


def table() -> str:
    cols = ("id", "what", "ours", "baseline", "ratio/target", "ok?")
    data = [cols] + [(r.id, r.what, r.ours, r.baseline, r.ratio, r.ok) for r in ROWS]
    widths = [max(len(row[i]) for row in data) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in data]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


PARTS: dict[str, Callable[[Ctx], None]] = {"P2": p2, "P3": p3, "P4": p4, "P5": p5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated: P2,P3,P4,P5")
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds for P2 and P3b")
    parser.add_argument("--poll-series", type=int, default=5, help="series for the 5 s poller (P3a)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--storage", metavar="DIR", help="Orthanc files (default bench/out/suite/stack)")
    args = parser.parse_args()
    only = [p.strip().upper() for p in args.only.split(",") if p.strip()]
    if unknown := [p for p in only if p not in PARTS]:
        parser.error(f"--only: unknown {unknown}")
    for tool in ("storescu", "movescu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install dcmtk")
    os.environ["TCP_NODELAY"] = "1"
    logs.configure(quiet=True)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    storage = Path(args.storage) / "dicom-transfer-suite" if args.storage else OUT / "stack"
    shutil.rmtree(storage, ignore_errors=True)
    series = make_series(args.series, args.instances, seed=args.seed)
    load = os.getloadavg()[0]
    with start_stack(storage, "same") as stack:
        version = stack.centre.rest.system()["Version"]
        upload(stack.pacs.rest, series)
        ctx = Ctx(stack, series, OUT, args)
        for name in only:
            t = time.perf_counter()
            PARTS[name](ctx)
            print(f"[{name} took {time.perf_counter() - t:.1f} s]", file=sys.stderr)
    text = (f"Orthanc {version}, {args.series}x{args.instances}, repeat {args.repeat}; load (1 min) "
            f"{load:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs\n{table()}\n"
            + "".join(n + "\n" for n in NOTES))  # fmt: skip
    print(text)
    (OUT / "results.txt").write_text(text)


if __name__ == "__main__":
    main()
