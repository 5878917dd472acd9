"""A PACS with a small move queue: is it ever left idle, and does the limit follow its queue?

    .venv/bin/python bench/pacsqueue.py [--sizes 10x20,200x20] [--store-delay 0.02] [--only Q1,Q2]

Our misbehaving pynetdicom PACS (tests/peers/pacs.py) answers every C-MOVE at once and
sends from a queue, one move at a time (1 worker); a move that finds `queue_size` moves
waiting or being sent is acknowledged and silently dropped. Stores take `--store-delay`
seconds each. The CLI runs as a user runs it, with `max_in_flight: 4` and every other
setting at its default (stall_s 30, recover_after 5, cooldown_s 10, backoff_s 5).

- Q1 (queue 2), per size: the PACS's own drain time first (the same series fed one move
  at a time, back to back, nothing dropped: PACS-side span from the first C-MOVE to the
  last C-STORE), then our run. Printed: throughput as a ratio of that drain rate, from
  our first move to the last series proven (journal), the PACS-side span ratio (was it
  ever idle?), the CLI's wall-clock ratio (start-up included), drops per 100 series,
  duplicate instances sent, most attempts any series spent, moves issued.
- Q2: queue 3, then 1 after a third of the series, then 3 again after two thirds: the
  in-flight limit over the run (completes at each change), how many completes after the
  queue returned to 3 the limit took to reach 3 again, and that nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench.resilience import (  # noqa: E402
    _scenario_pacs,
    _small,
    drain_baseline,
    journal_events,
    journal_rows,
    pacs_span,
    run_timed,
    write_config,
)
from dicom_transfer.stack import Stack, start_stack  # noqa: E402
from dicom_transfer.synthetic import SyntheticSeries, write_batch_csv  # noqa: E402

QUEUE_FAULTS = {"async_mode": True, "workers": 1}
# As a user would set it: only the in-flight limit; stall_s, recover_after, cooldown_s and
# backoff_s keep their defaults (move_timeout_s is the default too).
USER_TRANSFER: dict[str, object] = {"max_in_flight": 4, "stall_s": 30, "backoff_s": 5}


def run_span(journal: Path) -> float:
    """From our first move issued to the last series proven, on the journal's clock."""
    with closing(sqlite3.connect(journal)) as db:
        first, last = db.execute("SELECT MIN(first_issued_at), MAX(finished_at) FROM series").fetchone()
    return float(last - first)


def queue_run(stack: Stack, series: list[SyntheticSeries], work: Path, store_delay: float,
              queue_size: int = 2, **transfer: object) -> dict[str, Any]:  # fmt: skip
    """Q1 for one size: the PACS's drain time, then our run; the figures as a dict."""
    stack.reset()
    pacs = _scenario_pacs(stack, store_delay_s=store_delay, queue_size=queue_size, **QUEUE_FAULTS)
    pacs.add_series(series)
    try:
        baseline = drain_baseline(stack.centre.rest, pacs, series, "CENTRE")
        stack.centre.wipe()
        pacs.reset_counters()
        batch = write_batch_csv(series, work / "series.csv")
        cfg = write_config(work / "t.yaml", stack.centre.url, **{**USER_TRANSFER, **transfer})
        res, wall = run_timed("--batch", batch, "--config", cfg, "--json", timeout=1800)
        snap = pacs.snapshot()
    finally:
        pacs.stop()
    journal = work / "series.journal.sqlite"
    rows = journal_rows(journal)
    ours = run_span(journal)
    dropped = sum(snap["dropped"].values())
    return {
        "size": f"{len(series)} x {len(series[0].sop_uids)}",
        "exit": res.returncode,
        "complete": sum(r["state"] == "complete" for r in rows),
        "total": len(series),
        "baseline_s": baseline,
        "run_s": ours,
        "ratio": baseline / ours,
        "span_ratio": baseline / pacs_span(snap["log"]),
        "wall_s": wall,
        "wall_ratio": baseline / wall,
        "drops_per_100": 100 * dropped / len(series),
        "duplicates": sum(n - 1 for n in snap["sent_sop"].values()),
        "max_attempts": max(r["attempts"] for r in rows),
        "moves": len(journal_events(journal, "issued")),
        "requeued": len(journal_events(journal, "requeued")),
        "stderr": res.stderr[-2000:],
    }


def limit_timeline(journal: Path) -> list[tuple[int, int, str]]:
    """(completes so far, new limit, why) for every throttle event of the run."""
    with closing(sqlite3.connect(journal)) as db:
        events = db.execute("SELECT at, detail FROM events WHERE event='throttle' ORDER BY id").fetchall()
        out = []
        for at, detail in events:
            done = db.execute("SELECT COUNT(*) FROM series WHERE finished_at <= ?", (at,)).fetchone()[0]
            d = json.loads(detail)
            out.append((done, d["to"], d["why"]))
    return out


def changing_queue(stack: Stack, series: list[SyntheticSeries], work: Path, store_delay: float,
                   **transfer: object) -> dict[str, Any]:  # fmt: skip
    """Q2: queue 3 → 1 (after a third complete) → 3 (after two thirds); the limit over the run."""
    stack.reset()
    pacs = _scenario_pacs(stack, store_delay_s=store_delay, queue_size=3, **QUEUE_FAULTS)
    pacs.add_series(series)
    journal = work / "series.journal.sqlite"
    n = len(series)
    marks: dict[str, int] = {}
    stop = threading.Event()

    def reconfigure() -> None:
        for at, size in ((n // 3, 1), (2 * n // 3, 3)):
            while not stop.is_set():
                done = complete_count(journal)
                if done >= at:
                    pacs.configure(queue_size=size)
                    marks[f"queue {size}"] = done
                    break
                time.sleep(0.01)

    watcher = threading.Thread(target=reconfigure, daemon=True)
    try:
        batch = write_batch_csv(series, work / "series.csv")
        cfg = write_config(work / "t.yaml", stack.centre.url, **{**USER_TRANSFER, "max_in_flight": 3, **transfer})
        watcher.start()
        res, wall = run_timed("--batch", batch, "--config", cfg, "--json", timeout=1800)
        snap = pacs.snapshot()
    finally:
        stop.set()
        pacs.stop()
    timeline = limit_timeline(journal)
    back = marks.get("queue 3")
    regained = None  # completes after the queue grew back until the limit reached 3 for good
    for done, limit, _ in timeline:
        if back is not None and done >= back:
            if limit >= 3 and regained is None:
                regained = done - back
            elif limit < 3:
                regained = None
    rows = journal_rows(journal)
    return {
        "exit": res.returncode,
        "complete": sum(r["state"] == "complete" for r in rows),
        "total": n,
        "marks": marks,
        "timeline": timeline,
        "regained_after": regained,
        "duplicates": sum(k - 1 for k in snap["sent_sop"].values()),
        "missing": sum(len(s.sop_uids) for s in series) - len(snap["sent_sop"]),
        "wall_s": wall,
        "stderr": res.stderr[-2000:],
    }


def complete_count(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)) as db:
            return int(db.execute("SELECT COUNT(*) FROM series WHERE state='complete'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10x20,200x20", help="series x instances, comma-separated (Q1)")
    parser.add_argument("--store-delay", type=float, default=0.02, help="seconds per C-STORE at the PACS")
    parser.add_argument("--q2-series", type=int, default=60, help="series in Q2 (instances: 20)")
    parser.add_argument("--only", default="", help="Q1,Q2")
    args = parser.parse_args()
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    with tempfile.TemporaryDirectory(prefix="dt-queue-") as tmp:
        work = Path(tmp)
        stack = start_stack(work / "stack", "same")
        try:
            if not only or "Q1" in only:
                print("Q1  queue of 2, max_in_flight 4, defaults otherwise; ratio = PACS drain time / ours")
                print("size      exit complete  drain s   ours s  ratio  span  wall(ratio)   drops/100 dup att moves")
                for i, size in enumerate(args.sizes.split(",")):
                    n, per = (int(x) for x in size.lower().split("x"))
                    d = work / f"q1-{i}"
                    d.mkdir()
                    r = queue_run(stack, _small(n, per, 700 + i), d, args.store_delay)
                    print(f"{r['size']:<9} {r['exit']:>4} {r['complete']:>4}/{r['total']:<4} {r['baseline_s']:8.2f}"
                          f" {r['run_s']:8.2f} {r['ratio']:6.3f} {r['span_ratio']:5.3f} {r['wall_s']:6.2f}"
                          f" ({r['wall_ratio']:.3f}) {r['drops_per_100']:8.1f} {r['duplicates']:3d}"
                          f" {r['max_attempts']:3d} {r['moves']:5d}", flush=True)  # fmt: skip
                    if r["exit"] != 0:
                        print(r["stderr"], file=sys.stderr)
            if not only or "Q2" in only:
                d = work / "q2"
                d.mkdir()
                r = changing_queue(stack, _small(args.q2_series, 20, 790), d, args.store_delay)
                print(f"Q2  queue 3 -> 1 -> 3, max_in_flight 3: exit {r['exit']}, {r['complete']}/{r['total']}"
                      f" complete, {r['duplicates']} duplicate and {r['missing']} missing instances,"
                      f" wall {r['wall_s']:.1f} s; queue changed at completes {r['marks']}")  # fmt: skip
                print("    limit over the run (completes: limit, why):")
                for done, limit, why in r["timeline"]:
                    print(f"      {done:4d}: {limit}  {why}")
                print(f"    back to limit 3 after {r['regained_after']} completes at queue 3"
                      f" (recover_after 5: 2 x = 10)")
                if r["exit"] != 0:
                    print(r["stderr"], file=sys.stderr)
        finally:
            stack.stop(kill=True)


if __name__ == "__main__":
    main()
