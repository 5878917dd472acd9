"""Relay vs direct over a VPN-like link, with a PACS whose move queue holds 2.

    .venv/bin/python bench/relay.py [--rtts 20,60] [--mbit 100] [--series 8 --instances 100]

Topology per RTT (tests/wanstack.py): the source PACS is our pynetdicom PACS
(tests/peers/pacs.py, `async_mode=True, queue_size=2`: acknowledges every C-MOVE, queues
at most 2, drops the rest) and the local Orthanc CENTRE on loopback next to the
controller; the destination DEST behind one `WanLink` (RTT/2 each way, a bandwidth cap)
that carries the PACS's C-STOREs (direct) or the forwards' HTTP (relay) and the counts.

- loopback: the same batch moved to CENTRE itself (no link): the reference for how long
  a move holds a PACS queue slot at LAN speed.
- direct: `transfer.mode: direct`, the PACS sends to DEST across the link.
- relay: `transfer.mode: relay`, the PACS sends to CENTRE, the controller forwards.

Each run is the CLI as a user runs it, `max_in_flight: 2`, on an empty DEST and CENTRE.
Printed per run: wall time, throughput (instances/s), and per series the PACS's slot time
(its log: move queued → its last C-STORE done) and send time (served → done), median and
max. Goals: relay >= 3x direct throughput at 60 ms; relay slot <= 1.2x loopback slot.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from peers.pacs import MisbehavingPacs  # noqa: E402
from wanstack import WanStack, wan_stack  # noqa: E402

from dicom_transfer.stack import DEST_AET, HOST  # noqa: E402
from dicom_transfer.synthetic import SyntheticSeries, make_series, write_batch_csv  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def slots(pacs: MisbehavingPacs) -> tuple[list[float], list[float]]:
    """Per served series: (queued → done, served → done) from the PACS's own log."""
    log = pacs.snapshot()["log"]
    queued: dict[str, float] = {}
    served: dict[str, float] = {}
    slot, send = [], []
    for at, event, uid in log:
        if event == "queued":
            queued[uid] = at
        elif event == "served":
            served[uid] = at
        elif event == "done" and uid in served:
            slot.append(at - queued.get(uid, served[uid]))
            send.append(at - served[uid])
    return slot, send


def cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_now(wan: WanStack) -> dict[str, float]:
    """CPU seconds so far of each party: the PACS (this process), the controller (children
    waited for), the local Orthanc, the destination and the link."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"pacs": me.ru_utime + me.ru_stime, "controller": kids.ru_utime + kids.ru_stime,
           "local": cpu_s(wan.stack.centre.proc.pid), "dest": cpu_s(wan.dest.proc.pid)}  # fmt: skip
    pid = getattr(getattr(wan.link, "_proc", None), "pid", None)
    if pid is not None:
        out["link"] = cpu_s(pid)
    return out


def config(path: Path, wan: WanStack, mode: str, in_flight: int) -> Path:
    local = wan.stack.centre.url
    if mode == "loopback":
        dest = "{aet: CENTRE}"
        mode = "direct"
    else:
        dest = f"{{aet: {DEST_AET}, url: '{wan.dest_url}'}}"
    path.write_text(
        f"local: {{url: {local}}}\nsource: {{modality: BADPACS}}\ndestination: {dest}\n"
        f"transfer: {{mode: {mode}, max_in_flight: {in_flight}, stall_s: 30, move_timeout_s: 600, backoff_s: 1}}\n"
    )
    return path


def run(wan: WanStack, pacs: MisbehavingPacs, work: Path, mode: str, series: list[SyntheticSeries],
        in_flight: int) -> dict[str, Any]:  # fmt: skip
    wan.dest.wipe()
    wan.stack.centre.wipe()
    pacs.reset_counters()
    batch = write_batch_csv(series, work / f"{mode}.csv")
    cfg = config(work / f"{mode}.yaml", wan, mode, in_flight)
    cpu0 = cpu_now(wan)
    t0 = time.perf_counter()
    with open(work / f"{mode}.log", "w") as err:
        proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--batch", str(batch), "--config", str(cfg)],
                              cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err, check=False)  # fmt: skip
    elapsed = time.perf_counter() - t0
    cpu = {k: v - cpu0[k] for k, v in cpu_now(wan).items()}
    if proc.returncode != 0:  # what the PACS saw, for the post-mortem: its errors and its log of the batch
        snap = pacs.snapshot()
        seen = "; ".join(repr(e)[:200] for e in snap["errors"][:5]) or "none"
        (work / f"{mode}.pacs.log").write_text("".join(f"{at:.3f} {event} {uid}\n" for at, event, uid in snap["log"]))
        raise SystemExit(f"{mode}: exit {proc.returncode}; see {work / f'{mode}.log'} and {mode}.pacs.log beside it;"
                         f" the PACS's errors: {seen}")  # fmt: skip
    n = sum(len(s.sop_uids) for s in series)
    where = wan.stack.centre if mode == "loopback" else wan.dest
    held = int(where.rest.get("/statistics")["CountInstances"])
    if held != n:
        raise SystemExit(f"{mode}: {held} of {n} instances at the destination")
    slot, send = slots(pacs)
    snap = pacs.snapshot()
    return {
        "seconds": elapsed, "n": n, "slot": slot, "send": send,
        "dropped": sum(snap["dropped"].values()), "moves": sum(snap["moves"].values()), "cpu": cpu,
    }  # fmt: skip


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A mode's rounds as one: throughput over all of them, slot and send times pooled per series."""
    slot = [x for r in runs for x in r["slot"]]
    send = [x for r in runs for x in r["send"]]
    seconds = sum(r["seconds"] for r in runs)
    return {
        "rounds": len(runs), "seconds": seconds, "inst_s": sum(r["n"] for r in runs) / seconds,
        "slot_med": statistics.median(slot), "slot_max": max(slot),
        "send_med": statistics.median(send), "send_max": max(send),
        "dropped": sum(r["dropped"] for r in runs), "moves": sum(r["moves"] for r in runs),
        "round_slots": [statistics.median(r["slot"]) for r in runs],
        **{f"cpu_{k}": sum(r["cpu"][k] for r in runs) / len(runs) for k in runs[0]["cpu"]},
    }  # fmt: skip


def line(rtt: float, mode: str, r: dict[str, Any]) -> str:
    """A mode's figures; with more than one round, each round's own slot median too (the spread a
    shared machine puts on them)."""
    rounds = " ".join(f"{x:.2f}" for x in r["round_slots"])
    return (
        f"{rtt:>4.0f} ms  {mode:<8} {r['rounds']:.0f} x {r['seconds'] / r['rounds']:5.1f} s {r['inst_s']:5.0f} inst/s"
        f"   slot med {r['slot_med']:6.2f} s"
        f" max {r['slot_max']:6.2f} s   send med {r['send_med']:6.2f} s   moves {r['moves']:.0f}"
        f" (dropped {r['dropped']:.0f})\n{'':10}"
        + (f"slot med per round {rounds} s; " if len(r["round_slots"]) > 1 else "")
        + "CPU s a round: "
        + ", ".join(f"{k[4:]} {v:.1f}" for k, v in r.items() if k.startswith("cpu_"))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtts", default="20,60")
    ap.add_argument("--mbit", type=float, default=100)
    ap.add_argument("--series", type=int, default=8)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--in-flight", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of loopback and relay (direct: one)")
    args = ap.parse_args()
    series = make_series(args.series, args.instances, seed=18, rows=128, columns=128)
    work = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    print(f"{args.series} series x {args.instances} instances (128x128, ~33 kB each), PACS queue 2,"
          f" max_in_flight {args.in_flight}, link {args.mbit:g} Mbit/s; work {work}")  # fmt: skip
    for rtt in [float(x) for x in args.rtts.split(",")]:
        with wan_stack(work / f"rtt{rtt:.0f}", rtt, args.mbit, link_process=True) as wan:
            pacs = MisbehavingPacs(series, async_mode=True, queue_size=2).start()
            try:
                pacs.register_in(wan.stack.centre)  # BADPACS; CENTRE its move destination
                pacs.add_destination(DEST_AET, HOST, wan.dest_dicom_port)  # DEST across the link
                here = work / f"rtt{rtt:.0f}"  # its own batches and journals: a journal left would resume
                runs: dict[str, list[dict[str, Any]]] = {"loopback": [], "direct": [], "relay": []}
                for k in range(args.repeat):  # alternating, so that a slow minute of the machine hits both
                    for mode in ("loopback", "direct", "relay") if k == 0 else ("loopback", "relay"):
                        (here / f"round{k}").mkdir(parents=True, exist_ok=True)
                        runs[mode].append(run(wan, pacs, here / f"round{k}", mode, series, args.in_flight))
                results = {mode: pooled(r) for mode, r in runs.items()}
            finally:
                pacs.stop()
        for mode, r in results.items():
            print(line(rtt, mode, r))
        d, r, lo = results["direct"], results["relay"], results["loopback"]
        print(f"{rtt:>4.0f} ms  relay/direct throughput {r['inst_s'] / d['inst_s']:.2f}x (goal >= 3 at 60 ms);"
              f" relay slot / loopback slot {r['slot_med'] / lo['slot_med']:.2f} (median),"
              f" send {r['send_med'] / lo['send_med']:.2f} (goal <= 1.2)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
