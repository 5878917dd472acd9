"""Benchmark over a VPN-like link: the destination behind a delaying, rate-capped relay.

    .venv/bin/python bench/wan.py [--links 20/100,60/20] [--series 20 --instances 50] [--repeat 2]

Topology per link setting (tests/wanstack.py): the source PACS (Orthanc HOSPITAL) and the
local Orthanc (CENTRE) on loopback next to the controller; the destination (DEST) behind
one `WanLink` (tests/wanlink.py) that carries both the PACS's C-STOREs and the
controller's REST calls to DEST (RTT/2 each way, a bandwidth cap shared by all
connections, TCP set-up costs one RTT). The synthetic series are uploaded to the PACS
once; DEST is wiped before every run and its instance count checked after it.

(a) baseline: 4 DCMTK `storescu -aec DEST` at once, each pushing a quarter of the same
    files (`synthetic.write_files`) through the link into DEST;
(b) ours: `run_batch` in-process (bench/run.py's `run_ours`), `transfer.max_in_flight: 4`,
    the PACS's C-STOREs and the proof of arrival crossing the link.
Ratio a/b (target >= 0.85); `--repeat` rounds each in alternating order after one warm-up.

(c) gap at `max_in_flight: 1` on the first `--gap-series` series: for each series after the
    first, the time from the previous series proven (journal `finished_at`) to the first
    P-DATA-TF PDU of its C-STORE association written to DEST by the relay (target
    <= 1.5 x RTT), split into controller (proven -> next `issued`), Orthancs (issued ->
    the PACS's association accepted by the relay) and network (accepted -> first P-DATA:
    TCP set-up, A-ASSOCIATE-RQ/AC, half an RTT for the P-DATA; 2.5 RTT at the least);
    and, before the gap, the proof: the last P-DATA of the previous series written to DEST
    -> that series proven (DEST stores it, the controller's count crosses the link).

TCP_NODELAY=1 is set for every Orthanc (by the stack helpers) and DCMTK process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from run import run_ours, write_config  # noqa: E402
from wanlink import P_DATA_TF, Conn  # noqa: E402
from wanstack import WanStack, wan_stack  # noqa: E402

from dicom_transfer import logs  # noqa: E402
from dicom_transfer.stack import DEST_AET, HOST  # noqa: E402
from dicom_transfer.synthetic import SyntheticSeries, make_series, upload, write_batch_csv, write_files  # noqa: E402

OUT = BENCH / "out" / "wan"
ENV = {**os.environ, "TCP_NODELAY": "1"}
RATIO_TARGET, GAP_TARGET_RTT = 0.85, 1.5


@dataclass
class LinkResult:
    rtt_ms: float
    mbit: float
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    b_in_flight: list[float] = field(default_factory=list)  # mean series in flight over each (b) run
    b_per_series: list[float] = field(default_factory=list)  # issued -> proven, every series of every run
    gaps: list[dict[str, float]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def rtt(self) -> float:
        return self.rtt_ms / 1000


def dest_instances(wan: WanStack) -> int:
    return int(wan.dest.rest.get("/statistics")["CountInstances"])


def wipe_dest(wan: WanStack) -> None:
    wan.dest.wipe()
    if dest_instances(wan):
        raise SystemExit("DEST not empty after wipe")


def check(wan: WanStack, expected: int, what: str) -> None:
    held = dest_instances(wan)
    if held != expected:
        raise SystemExit(f"{what}: DEST holds {held} instances, expected {expected}")


def storescu_push(wan: WanStack, files: list[Path], parallel: int = 4) -> float:
    """(a): `parallel` storescu processes, a share of the files each, through the link."""
    wipe_dest(wan)
    size = -(-len(files) // parallel)
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(["storescu", "-aec", DEST_AET, HOST, str(wan.dest_dicom_port), *map(str, c)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in chunks
    ]  # fmt: skip
    errors = [proc.communicate()[1] for proc in procs]
    elapsed = time.perf_counter() - t0
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"storescu exit {proc.returncode}: {err[-1000:]!r}")
    check(wan, len(files), "storescu")
    return elapsed


def journal_series(journal: Path) -> list[tuple[str, float, float]]:
    """(uid, issued_at, finished_at) in batch order."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute("SELECT uid, issued_at, finished_at FROM series ORDER BY seq").fetchall()
    finally:
        db.close()


def ours(wan: WanStack, work: Path, series: list[SyntheticSeries], in_flight: int, tag: str) -> tuple[float, Path]:
    """(b): our verified run; returns its time and its journal."""
    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    overrides = {"destination.aet": DEST_AET, "destination.url": wan.dest_url, "transfer.max_in_flight": in_flight}
    _, cfg = write_config(d, wan.stack, overrides)
    batch = write_batch_csv(series, d / "batch.csv")
    journal = d / "journal.sqlite"
    wipe_dest(wan)
    elapsed, _ = run_ours(cfg, batch, journal, len(series))
    check(wan, sum(len(s.sop_uids) for s in series), f"ours in-flight {in_flight}")
    return elapsed, journal


def store_associations(wan: WanStack, since: float) -> list[Conn]:
    """The PACS's associations to DEST accepted by the relay after `since`, oldest first."""
    target = (HOST, wan.dest.spec.dicom_port)
    return sorted((c for c in wan.link.connections if c.target == target and c.opened_at >= since),
                  key=lambda c: c.opened_at)  # fmt: skip


def last_pdata(conn: Conn) -> float | None:
    return next((at for t, at in reversed(conn.pdus) if t == P_DATA_TF), None)


def gaps(wan: WanStack, journal: Path, since: float) -> list[dict[str, float]]:
    """(c): per series after the first, proven(n-1) -> first P-DATA of n, and its parts.

    A series' association is the first one to DEST the relay accepted after its `issued_at`
    (in-flight 1: one move, hence one association, at a time). "proof" is what precedes the
    gap: the last P-DATA of n-1 written to DEST -> n-1 proven by the controller.
    """
    rows = journal_series(journal)
    assocs = [c for c in store_associations(wan, since) if c.first_pdu(P_DATA_TF) is not None]
    mine = []
    for uid, issued, _ in rows:
        found = next((c for c in assocs if c.opened_at >= issued), None)
        if found is None:
            raise SystemExit(f"no association to DEST seen after series {uid} was issued")
        mine.append(found)
    out = []
    for (_, _, proven), (_, issued, _), prev, this in zip(rows, rows[1:], mine, mine[1:], strict=False):
        pdata, prev_last = this.first_pdu(P_DATA_TF), last_pdata(prev)
        assert pdata is not None and prev_last is not None
        out.append({
            "gap": pdata - proven,
            "controller": issued - proven,
            "orthancs": this.opened_at - issued,
            "network": pdata - this.opened_at,
            "proof": proven - prev_last,
        })  # fmt: skip
    return out


def in_flight_figures(journal: Path, elapsed: float) -> tuple[float, list[float]]:
    rows = journal_series(journal)
    per = [f - i for _, i, f in rows]
    return sum(per) / elapsed, per


def bench_link(rtt_ms: float, mbit: float, series: list[SyntheticSeries], args: argparse.Namespace) -> LinkResult:
    res = LinkResult(rtt_ms, mbit)
    work = OUT / f"rtt{rtt_ms:g}-{mbit:g}mbit"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    storage = Path(args.storage) / f"wan-{rtt_ms:g}-{mbit:g}" if args.storage else work / "stack"
    shutil.rmtree(storage, ignore_errors=True)
    with wan_stack(storage, rtt_ms, mbit, extra_config={"DicomThreadsCount": 4}) as wan:
        upload(wan.stack.pacs.rest, series)
        files_dir = Path(tempfile.mkdtemp(prefix="wan-files-", dir=work))
        files = write_files(series, files_dir)
        log = res.lines.append
        log(f"Orthanc {wan.dest.rest.system()['Version']}; link RTT {rtt_ms:g} ms, {mbit:g} Mbit each way")
        ours(wan, work, series, 4, "warm-up")
        storescu_push(wan, files)
        for r in range(args.repeat):
            for kind in ("ab" if r % 2 == 0 else "ba"):
                if kind == "a":
                    res.a.append(storescu_push(wan, files))
                else:
                    t, journal = ours(wan, work, series, 4, f"if4-{r}")
                    res.b.append(t)
                    mean_in_flight, per = in_flight_figures(journal, t)
                    res.b_in_flight.append(mean_in_flight)
                    res.b_per_series += per
        gap_series = series[: args.gap_series]
        since = time.time()
        _, journal = ours(wan, work, gap_series, 1, "if1")
        res.gaps = gaps(wan, journal, since)
        shutil.rmtree(files_dir, ignore_errors=True)
    return res


def _ms(x: float, rtt: float) -> str:
    return f"{x * 1000:.0f} ms ({x / rtt:.2f} RTT)"


def report(res: LinkResult, n: str) -> str:
    a, b = statistics.median(res.a), statistics.median(res.b)
    ratio, rtt = a / b, res.rtt
    lines = list(res.lines)
    ok = "yes" if ratio >= RATIO_TARGET else f"NO, short by {RATIO_TARGET - ratio:.2f}"
    lines.append(f"  {n}: 4x storescu (a) {a:.2f} s | ours in-flight 4 (b) {b:.2f} s | a/b {ratio:.2f} "
                 f"(target >= {RATIO_TARGET}: {ok})")  # fmt: skip
    rounds_a, rounds_b = " ".join(f"{x:.2f}" for x in res.a), " ".join(f"{x:.2f}" for x in res.b)
    ratios = " ".join(f"{x / y:.2f}" for x, y in zip(res.a, res.b, strict=True))
    lines.append(f"    rounds (s): a {rounds_a} | b {rounds_b} | a/b {ratios}")
    per, mean_in_flight = statistics.median(res.b_per_series), statistics.mean(res.b_in_flight)
    lines.append(f"    (b) series in flight on average {mean_in_flight:.2f} of 4; "
                 f"one series issued -> proven: median {per:.2f} s = {per / rtt:.1f} RTT")  # fmt: skip
    g = {k: statistics.median(x[k] for x in res.gaps) for k in ("gap", "controller", "orthancs", "network", "proof")}
    worst = max(x["gap"] for x in res.gaps) / rtt
    gap_ok = "yes" if g["gap"] <= GAP_TARGET_RTT * rtt else f"NO, {g['gap'] / rtt - GAP_TARGET_RTT:.2f} RTT over"
    lines.append(f"  in-flight 1, {len(res.gaps)} gaps proven(n-1) -> first C-STORE P-DATA of n at DEST: "
                 f"median {_ms(g['gap'], rtt)}, max {worst:.2f} RTT; "
                 f"target <= {GAP_TARGET_RTT} RTT: {gap_ok}")  # fmt: skip
    lines.append(f"    made of: controller (proven -> issued) {_ms(g['controller'], rtt)} + Orthancs (issued -> "
                 f"PACS association at the link) {_ms(g['orthancs'], rtt)} + network (association accepted -> "
                 f"first P-DATA; 2.5 RTT at the least) {_ms(g['network'], rtt)}")  # fmt: skip
    lines.append(f"    before it: last P-DATA of n-1 written to DEST -> n-1 proven (REST count through the link) "
                 f"{_ms(g['proof'], rtt)}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default="20/100,60/20", help="RTT ms/Mbit pairs, comma-separated")
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds of (a) and (b) per link")
    parser.add_argument("--gap-series", type=int, default=8, help="series of the in-flight 1 run (c)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--storage", metavar="DIR", help="Orthanc files (default bench/out/wan/...)")
    args = parser.parse_args()
    links = [tuple(float(x) for x in pair.split("/")) for pair in args.links.split(",") if pair.strip()]
    if shutil.which("storescu") is None:
        raise SystemExit("storescu not found: apt-get install dcmtk")
    os.environ["TCP_NODELAY"] = "1"
    logs.configure(quiet=True)
    OUT.mkdir(parents=True, exist_ok=True)
    series = make_series(args.series, args.instances, seed=args.seed)
    n = f"{args.series}x{args.instances}"
    load = os.getloadavg()[0]
    texts = []
    for rtt_ms, mbit in links:
        t = time.perf_counter()
        res = bench_link(rtt_ms, mbit, series, args)
        texts.append(report(res, n))
        print(texts[-1], f"\n[took {time.perf_counter() - t:.0f} s]", file=sys.stderr)
    text = (f"{n}, repeat {args.repeat}; load (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"{os.cpu_count()} CPUs\n" + "\n".join(texts) + "\n")  # fmt: skip
    print(text)
    (OUT / "results.txt").write_text(text)


if __name__ == "__main__":
    main()
