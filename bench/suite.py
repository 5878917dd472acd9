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
P5  100,000-row batch: read_batch + plan time and peak RSS (subprocess); time to the first
    'issued' of a resumed run on a half-done journal; `main.py status` time.
"""

from __future__ import annotations

import argparse
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
BIG_ROWS = 100_000


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

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from dicom_transfer.batch import read_batch
from dicom_transfer.config import load_config
from dicom_transfer.journal import Journal
from dicom_transfer.transfer import plan

def status_kb(key):  # VmHWM is this process's own peak; ru_maxrss can carry the parent's over fork+exec
    return int(next(x for x in open("/proc/self/status") if x.startswith(key)).split()[1])

cur = status_kb("VmRSS")
batch, journal = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(None, overrides={"local.url": "http://127.0.0.1:1"})
t0 = time.perf_counter()
rows = read_batch(batch)
t1 = time.perf_counter()
j = Journal(journal)
n = plan(j, batch, rows, cfg, None)
j.close()
t2 = time.perf_counter()
peak = status_kb("VmHWM")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"read": t1 - t0, "plan": t2 - t1, "n": n, "cur_kb": cur, "peak_kb": peak, "maxrss_kb": maxrss}))
"""


def big_batch(ctx: Ctx, path: Path) -> SyntheticSeries:
    """100,000 valid synthetic rows; row 50,002 (the first pending after the fake kill) is real."""
    rows = make_series(BIG_ROWS, 0, seed=901)
    real = ctx.series[0]
    rows[BIG_ROWS // 2 + 1] = real
    write_batch_csv(rows, path)
    return real


def fake_kill(journal: Path) -> None:
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        now = time.time()
        half = BIG_ROWS // 2
        db.execute("UPDATE series SET state='complete', expected=1, received=1, attempts=1, verified='count',"
                   " first_issued_at=?, issued_at=?, finished_at=?, seconds=0.1 WHERE seq<=?",
                   (now - 60, now - 60, now - 30, half))  # fmt: skip
        db.execute("UPDATE series SET state='moving', expected=1, attempts=1, issued_at=?, first_issued_at=?,"
                   " move_method='blocking' WHERE seq=?", (now - 5, now - 5, half + 1))  # fmt: skip
    finally:
        db.close()


def first_issued(cmd: list[str], journal: Path, timeout_s: float = 60.0) -> float:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, isolation_level=None)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.time() - start < timeout_s:
            at = db.execute("SELECT MIN(at) FROM events WHERE event='issued' AND at>=?", (start,)).fetchone()[0]
            if at is not None:
                return float(at) - start
            if proc.poll() is not None:
                err = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise SystemExit(f"P5: the CLI ended (exit {proc.returncode}) before issuing: {err}")
            time.sleep(0.01)
        raise SystemExit("P5: no 'issued' event within 60 s")
    finally:
        db.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def p5(ctx: Ctx) -> None:
    d = ctx.work / "p5"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    batch, journal = d / "big.csv", d / "big.sqlite"
    big_batch(ctx, batch)
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(journal), str(REPO)], env=ENV,
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"P5 child failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    t = r["read"] + r["plan"]
    mb = r["peak_kb"] / 1024
    add("P5a", f"read_batch + plan, {BIG_ROWS:,} rows", f"{t:.2f} s (read {r['read']:.2f})", "-", "< 5 s", t < 5)
    after = f"after imports {r['cur_kb'] / 1024:.0f} MB"
    add("P5b", f"peak RSS (VmHWM; ru_maxrss {r['maxrss_kb'] / 1024:.0f} MB)", f"{mb:.0f} MB", after, "< 150 MB",
        mb < 150)  # fmt: skip
    fake_kill(journal)
    config, _ = write_config(d, ctx.stack, {"transfer.max_in_flight": 4})
    wipe_centre(ctx.stack)
    cmd = [sys.executable, str(REPO / "main.py"), "--batch", str(batch), "--config", str(config),
           "--journal", str(journal), "--json"]  # fmt: skip
    t_issue = first_issued(cmd, journal)
    add("P5c", "resume half-done journal: start -> first 'issued'", f"{t_issue:.2f} s", "-", "< 2 s", t_issue < 2)
    st = [sys.executable, str(REPO / "main.py"), "status", "--journal", str(journal)]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(st, cwd=REPO, env=ENV, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"status exit {proc.returncode}: {proc.stderr[-2000:]}")
    ts = med(times)
    add("P5d", "`main.py status` on it (median of 3)", f"{ts:.2f} s", "-", "< 1 s", ts < 1)


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
