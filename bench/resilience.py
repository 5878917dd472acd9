"""Resilience scenarios (issue 5) on real peers, and a runner that prints one table.

    .venv/bin/python bench/resilience.py [--only R1,R3,...] [--series 40 --instances 20] [--kills 10]

Each scenario is a plain function that takes the peers it needs (real Orthanc processes,
our misbehaving pynetdicom PACS, DCMTK dcmqrscp, pynetdicom's qrscp), runs the CLI as a
subprocess (`python main.py --batch ... --config ...`) and returns a `Result`: what the
journal says, what the destination holds, what the source sent. tests/test_resilience.py
and tests/test_other_sources.py call the same functions with small sizes and assert on
the results; this runner calls them once, bigger, and prints

    scenario | series complete/total | instances moved vs needed | duplicate sends | wall time | notes

- R1  async PACS, queue of 2 (acknowledge, then drop), 1 worker, slow stores; max_in_flight 4.
      Throughput as a ratio of the PACS's own drain rate: the same series fed one move at a
      time, back to back, with nothing dropped (PACS-side span: first C-MOVE to last C-STORE).
- R2  the PACS aborts each series' first move after K instances: only the missing re-moved.
- R3  kill -9 of the CLI at N seeded random points, re-run after each; every kill checked.
- R4  the local Orthanc restarted while a move is running (destination separate, stays up).
- R5  the destination stopped for ~3 s mid-batch, then started again.
- dcmqrscp / qrscp: other real sources (no NumberOfSeriesRelatedInstances: IMAGE-level count).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from peers.pacs import MisbehavingPacs  # noqa: E402

from dicom_transfer.errors import OrthancError  # noqa: E402
from dicom_transfer.orthanc import OrthancRest  # noqa: E402
from dicom_transfer.stack import (  # noqa: E402
    HOST,
    OrthancProcess,
    OrthancSpec,
    Stack,
    free_port,
    start_orthanc,
    start_stack,
)
from dicom_transfer.synthetic import SyntheticSeries, make_series, upload, write_batch_csv, write_files  # noqa: E402

NEW_ORTHANC = ["bash", str(REPO / ".ci" / "orthanc-new"), "exec", "/usr/sbin/Orthanc"]
ENV = {**os.environ, "TCP_NODELAY": "1"}


# ---------------------------------------------------------------------------------------
# Plumbing shared by every scenario


def cli(*args: object, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`python main.py ARGS...` as a subprocess (as a user runs it)."""
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *map(str, args)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def cli_popen(*args: object, log: Path) -> subprocess.Popen[bytes]:
    """The CLI in the background, its stderr appended to `log` (an unread pipe could fill and block it)."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, str(REPO / "main.py"), *map(str, args)],
            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=fh,
        )  # fmt: skip


def finish_background(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> int:
    """Wait for a background CLI run (killed after `timeout` s) and return its exit code."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the run did not end within {timeout} s; see {log}") from None


def write_config(
    path: Path, local_url: str, *, source: str = "BADPACS", dest_aet: str = "CENTRE",
    dest_url: str | None = None, **transfer: object,
) -> Path:  # fmt: skip
    """A transfer.yaml: local Orthanc, source modality, destination (url None: the local one)."""
    settings = {"stall_s": 1, "move_timeout_s": 60, "backoff_s": 0.2, **transfer}
    dest = f"{{aet: {dest_aet}" + (f", url: {dest_url}" if dest_url else "") + "}"
    path.write_text(
        f"local: {{url: {local_url}}}\n"
        f"source: {{modality: {source}}}\n"
        f"destination: {dest}\n"
        "transfer: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}\n"
    )
    return path


def count_at(rest: OrthancRest, series_uid: str) -> int:
    """Instances of a series an Orthanc holds (0 when none)."""
    found = rest.post("/tools/lookup", content=series_uid)
    ids = [f["ID"] for f in found if f["Type"] == "Series"]
    return len(rest.get(f"/series/{ids[0]}")["Instances"]) if ids else 0


def journal_rows(path: Path) -> list[dict[str, Any]]:
    """uid, state, expected, received, attempts of every series (empty if no journal yet)."""
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=10)
    try:
        cur = db.execute("SELECT uid, state, expected, received, attempts, job_id FROM series ORDER BY seq")
        keys = ("uid", "state", "expected", "received", "attempts", "job_id")
        return [dict(zip(keys, r, strict=True)) for r in cur]
    except sqlite3.OperationalError:  # created but not yet planned
        return []
    finally:
        db.close()


def journal_events(path: Path, event: str) -> list[tuple[str | None, str | None]]:
    db = sqlite3.connect(path, timeout=10)
    try:
        return list(db.execute("SELECT uid, detail FROM events WHERE event=? ORDER BY id", (event,)))
    finally:
        db.close()


def complete_but_short(path: Path, dest: OrthancRest) -> list[str]:
    """Series the journal calls complete while the destination holds fewer than expected."""
    bad = []
    for row in journal_rows(path):
        if row["state"] == "complete":
            have = count_at(dest, row["uid"])
            if row["expected"] is None or have < row["expected"] or row["received"] < row["expected"]:
                bad.append(f"{row['uid']}: journal complete, expected {row['expected']}, destination {have}")
    return bad


def deleted_too_soon(path: Path, local: OrthancRest, dest: OrthancRest) -> list[str]:
    """Relay mode: series that left the local Orthanc (whole or in part) before the destination held them whole."""
    bad = []
    for row in journal_rows(path):
        if row["state"] not in ("held_local", "forwarding", "complete") or row["expected"] is None:
            continue
        here, there = count_at(local, row["uid"]), count_at(dest, row["uid"])
        if here < row["expected"] and there < row["expected"]:
            bad.append(f"{row['uid']}: {row['state']}, local {here}, destination {there} of {row['expected']}")
    return bad


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `condition` every 10 ms; fail if `proc` ends first or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before: {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on {port} after {timeout_s} s")


@dataclass
class Result:
    """One scenario's outcome, for a test's asserts and for the table."""

    scenario: str
    total: int
    complete: int
    needed: int  # instances the batch needs at the destination
    moved: int | None  # C-STOREs the source sent (None: the source cannot tell)
    duplicates: int | None  # instances sent more than once, summed over the extra sends
    seconds: float  # wall time of the CLI runs, summed
    exit_codes: list[int] = field(default_factory=list)
    at_destination: dict[str, int] = field(default_factory=dict)  # series → count there now
    expected: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""

    def row(self) -> list[str]:
        moved = "?" if self.moved is None else str(self.moved)
        dups = "n/a" if self.duplicates is None else str(self.duplicates)
        return [
            self.scenario, f"{self.complete}/{self.total}", f"{moved} / {self.needed}", dups,
            f"{self.seconds:.1f} s", "; ".join(self.notes),
        ]  # fmt: skip


def _finish(
    name: str, series: list[SyntheticSeries], journal: Path, dest: OrthancRest, seconds: float,
    codes: list[int], pacs: MisbehavingPacs | None, stderr: str = "",
) -> Result:  # fmt: skip
    rows = journal_rows(journal)
    snap = pacs.snapshot() if pacs is not None else None
    return Result(
        scenario=name,
        total=len(series),
        complete=sum(r["state"] == "complete" for r in rows),
        needed=sum(len(s.sop_uids) for s in series),
        moved=sum(snap["sent"].values()) if snap else None,
        duplicates=sum(n - 1 for n in snap["sent_sop"].values()) if snap else None,
        seconds=seconds,
        exit_codes=codes,
        at_destination={s.series_uid: count_at(dest, s.series_uid) for s in series},
        expected={s.series_uid: len(s.sop_uids) for s in series},
        extra={"pacs": snap, "rows": rows},
        stderr=stderr,
    )


def run_timed(*args: object, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    res = cli(*args, timeout=timeout)
    return res, time.monotonic() - started


def moves_issued(journal: Path) -> int:
    return len(journal_events(journal, "issued"))


# ---------------------------------------------------------------------------------------
# R1: async PACS with a queue of 2 that acknowledges, then drops


def drain_baseline(
    local: OrthancRest, pacs: MisbehavingPacs, series: list[SyntheticSeries], target: str, modality: str = "BADPACS"
) -> float:
    """The PACS's own drain time: one move at a time, the next as soon as it is idle (PACS-side span)."""
    pacs.reset_counters()
    for s in series:
        body = {
            "Level": "Series", "TargetAet": target,
            "Resources": [{"StudyInstanceUID": s.study_uid, "SeriesInstanceUID": s.series_uid}],
        }  # fmt: skip
        # Async PACS: answered at once; the blocking route is just the quickest way to ask.
        local.post(f"/modalities/{modality}/move", body, idempotent=False, timeout_s=120)
        if not pacs.wait_idle(120):
            raise RuntimeError("the PACS did not drain its queue in 120 s")
    snap = pacs.snapshot()
    if any(snap["dropped"].values()) or sum(snap["sent"].values()) != sum(len(s.sop_uids) for s in series):
        raise RuntimeError(f"baseline lost instances: {snap['dropped']}")
    return pacs_span(snap["log"])


def pacs_span(log: list[tuple[float, str, str]]) -> float:
    """From the first C-MOVE received to the last C-STORE sent, on the PACS's clock."""
    first = min(t for t, event, _ in log if event == "move")
    last = max(t for t, event, _ in log if event == "store")
    return last - first


R1_FAULTS = {"async_mode": True, "queue_size": 2, "workers": 1}
R1_TRANSFER = {
    "max_in_flight": 4, "stall_s": 1, "cooldown_s": 0.5, "recover_after": 3,
    "backoff_s": 0.2, "max_attempts": 20, "move_timeout_s": 60,
}  # fmt: skip


def r1_async_queue(
    local: OrthancProcess, dest: OrthancProcess, pacs: MisbehavingPacs, series: list[SyntheticSeries],
    workdir: Path, *, dest_aet: str = "CENTRE", **transfer: object,
) -> Result:  # fmt: skip
    """Baseline drain first (then the destination is wiped), then our run with max_in_flight 4."""
    baseline = drain_baseline(local.rest, pacs, series, dest_aet)
    dest.wipe()
    pacs.reset_counters()
    batch = write_batch_csv(series, workdir / "series.csv")
    dest_url = dest.url if dest is not local else None
    cfg = write_config(
        workdir / "t.yaml", local.url, dest_aet=dest_aet, dest_url=dest_url, **{**R1_TRANSFER, **transfer}
    )
    res, seconds = run_timed("--batch", batch, "--config", cfg, "--json")
    journal = workdir / "series.journal.sqlite"
    out = _finish("R1 async queue 2", series, journal, dest.rest, seconds, [res.returncode], pacs, res.stderr)
    span = pacs_span(out.extra["pacs"]["log"])
    throttle = [d for _, d in journal_events(journal, "throttle")]
    dropped = sum(out.extra["pacs"]["dropped"].values())
    ratio, wall_ratio = baseline / span, baseline / seconds
    out.extra.update(baseline_s=baseline, span_s=span, ratio=ratio, wall_ratio=wall_ratio, throttle=throttle)
    out.notes += [
        f"drain ratio {ratio:.2f} (PACS span {span:.1f} s vs one-at-a-time {baseline:.1f} s; wall {wall_ratio:.2f})",
        f"{dropped} moves dropped, {len(throttle)} throttle events, {moves_issued(journal)} moves issued",
    ]
    return out


# ---------------------------------------------------------------------------------------
# R2: the PACS stops mid-series


def r2_abort(
    local: OrthancProcess, pacs: MisbehavingPacs, series: list[SyntheticSeries], workdir: Path,
    *, method: str = "auto", dest: OrthancProcess | None = None,
) -> Result:  # fmt: skip
    """Every series' first move is cut after `pacs.abort_after` (or `partial_first`) instances."""
    dest = dest or local
    batch = write_batch_csv(series, workdir / "series.csv")
    cfg = write_config(workdir / "t.yaml", local.url, move_method=method, max_attempts=5)
    res, seconds = run_timed("--batch", batch, "--config", cfg, "--json")
    journal = workdir / "series.journal.sqlite"
    mode = "async" if pacs.async_mode else "sync"
    cut = f"abort_after {pacs.abort_after}" if pacs.abort_after is not None else f"partial_first {pacs.partial_first}"
    out = _finish(f"R2 {cut} ({mode}, {method})", series, journal, dest.rest, seconds, [res.returncode], pacs,
                  res.stderr)  # fmt: skip
    issued = journal_events(journal, "issued")  # (series, detail) in order
    repairs = [d for _, d in issued if d and "instances=" in d]
    out.extra.update(issued=issued, repairs=repairs)
    out.notes.append(f"{len(issued)} moves issued, {len(repairs)} of them instance-level repairs")
    return out


# ---------------------------------------------------------------------------------------
# R3: kill -9 at random points


def r3_kills(
    local: OrthancProcess, pacs: MisbehavingPacs, series: list[SyntheticSeries], workdir: Path,
    *, kills: int = 10, seed: int = 5, window: tuple[float, float] = (0.35, 1.2), dest: OrthancProcess | None = None,
    method: str = "auto", relay: bool = False,
) -> Result:  # fmt: skip
    """Kill the CLI with SIGKILL `kills` times at seeded random delays, re-running after each.

    After every kill the journal is checked against the destination: nothing complete
    while the destination holds fewer than expected. Then a last run finishes the batch.
    `relay=True` (transfer.mode relay, `dest` a separate Orthanc): also nothing deleted
    from the local Orthanc before the destination holds it whole.
    """
    dest = dest or local
    rng = random.Random(seed)
    batch = write_batch_csv(series, workdir / "series.csv")
    extra: dict[str, Any] = {}
    if relay:
        extra = {"dest_aet": dest.spec.aet, "dest_url": dest.url, "mode": "relay"}
    cfg = write_config(workdir / "t.yaml", local.url, max_attempts=10, move_method=method, **extra)
    journal = workdir / "series.journal.sqlite"
    violations: list[str] = []
    codes: list[int] = []
    killed_at: list[tuple[float, int]] = []  # (delay, series complete at the kill)
    seconds = 0.0
    for _ in range(kills):
        delay = rng.uniform(*window)
        started = time.monotonic()
        proc = cli_popen("--batch", batch, "--config", cfg, log=workdir / "runs.log")
        try:
            codes.append(proc.wait(timeout=delay))  # finished before its kill point
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            codes.append(-9)
            violations += complete_but_short(journal, dest.rest)
            if relay:
                violations += deleted_too_soon(journal, local.rest, dest.rest)
            killed_at.append((round(delay, 2), sum(r["state"] == "complete" for r in journal_rows(journal))))
        seconds += time.monotonic() - started
    res, last = run_timed("--batch", batch, "--config", cfg, "--json")
    codes.append(res.returncode)
    seconds += last
    if relay:
        violations += deleted_too_soon(journal, local.rest, dest.rest)
    name = f"R3 kill -9 x{kills} ({method}{', relay' if relay else ''})"
    out = _finish(name, series, journal, dest.rest, seconds, codes, pacs, res.stderr)
    out.extra.update(violations=violations, killed_at=killed_at)
    n_killed = sum(c == -9 for c in codes)
    progress = ",".join(str(done) for _, done in killed_at)
    out.notes += [
        f"{n_killed} kills (complete at each: {progress}); {len(violations)} complete-while-short",
        f"{sum(out.extra['pacs']['moves'].values())} C-MOVEs at the PACS, exits {codes}",
    ]
    return out


# ---------------------------------------------------------------------------------------
# R4: the local Orthanc restarted while a move runs


@dataclass
class RestartPeers:
    """Our PACS, a local Orthanc that knows it from its config file (so a restart keeps it), a destination."""

    pacs: MisbehavingPacs
    centre: OrthancProcess
    dest: OrthancProcess

    def stop(self) -> None:
        for process in (self.centre, self.dest):
            process.kill()
        self.pacs.stop()

    def reset(self) -> None:
        for process in (self.centre, self.dest):
            if not process.running:
                process.restart()
            process.wipe()
        self.pacs.reset_counters()
        self.pacs.configure(store_delay_s=0.0, abort_after=None, partial_first=None, async_mode=False)


def start_restart_peers(workdir: Path, centre_command: list[str] | None = None) -> RestartPeers:
    """PACS BADPACS, local CENTRE (BADPACS and DEST in its JSON config), destination DEST (1.10)."""
    pacs = MisbehavingPacs(port=free_port()).start()
    try:
        dest_spec = OrthancSpec.plan("r4dest", "DEST")
        dest = start_orthanc(dest_spec, workdir, {"BADPACS": (pacs.aet, HOST, pacs.port)})
        centre = start_orthanc(
            OrthancSpec.plan("r4centre", "CENTRE"), workdir,
            {"BADPACS": (pacs.aet, HOST, pacs.port), "DEST": dest_spec.modality}, command=centre_command,
        )  # fmt: skip
    except BaseException:
        pacs.stop()
        raise
    pacs.add_destination("DEST", HOST, dest_spec.dicom_port)
    return RestartPeers(pacs, centre, dest)


def _in_flight_mid_series(journal: Path, pacs: MisbehavingPacs, need_job: bool) -> dict[str, Any] | None:
    for row in journal_rows(journal):
        if row["state"] != "moving" or (need_job and not row["job_id"]) or not row["expected"]:
            continue
        if max(1, row["expected"] // 3) <= pacs.sent[row["uid"]] < row["expected"] - 2:
            return row
    return None


def r4_restart(
    peers: RestartPeers, series: list[SyntheticSeries], workdir: Path, method: str, *,
    crash: bool = True, store_delay_s: float = 0.05, down_s: float = 0.0, move_timeout_s: float = 30,
) -> Result:  # fmt: skip
    """Restart the local Orthanc while a series is half sent; the run (or its re-run) completes.

    `crash`: SIGKILL, then start (the move dies with it); otherwise an orderly restart
    (SIGTERM: Orthanc 1.10 and 1.12 finish the running C-MOVE before they exit). `down_s`:
    how long it stays down; beyond `move_timeout_s` (the run-time retry deadline of a
    party) the run stops with exit 3 and the same command, run again, completes.
    """
    peers.pacs.add_series(series)
    peers.pacs.configure(store_delay_s=store_delay_s)
    batch = write_batch_csv(series, workdir / "series.csv")
    cfg = write_config(
        workdir / "t.yaml", peers.centre.url, dest_aet="DEST", dest_url=peers.dest.url,
        move_method=method, max_attempts=6, move_timeout_s=move_timeout_s, cooldown_s=1,
    )  # fmt: skip
    journal = workdir / "series.journal.sqlite"
    need_job = method != "blocking"
    started = time.monotonic()
    proc = cli_popen("--batch", batch, "--config", cfg, "--json", log=workdir / "run.log")
    found: dict[str, Any] = {}

    def mid_series() -> bool:
        row = _in_flight_mid_series(journal, peers.pacs, need_job)
        if row:
            found.update(row)
        return row is not None

    wait_until(mid_series, 30, "a move half sent", proc)
    restart_started = time.monotonic()
    if crash:
        peers.centre.kill()
    else:
        peers.centre.stop()
    time.sleep(down_s)
    peers.centre.restart()
    restart_s = time.monotonic() - restart_started
    job_after = None
    if found.get("job_id"):
        try:
            peers.centre.rest.get(f"/jobs/{found['job_id']}")
            job_after = "still there"
        except OrthancError as exc:
            job_after = f"HTTP {exc.status}"
    codes = [finish_background(proc, workdir / "run.log")]
    stderr = (workdir / "run.log").read_text(errors="replace")
    if proc.returncode == 3:  # stopped with work left: the same command resumes
        res = cli("--batch", batch, "--config", cfg, "--json")
        codes.append(res.returncode)
        stderr += res.stderr
    seconds = time.monotonic() - started
    kind = ("crash+restart" if crash else "restart") + (f" after {down_s:g} s down" if down_s else "")
    out = _finish(f"R4 local {kind} ({method})", series, journal, peers.dest.rest, seconds, codes, peers.pacs,
                  stderr)  # fmt: skip
    row = next(r for r in out.extra["rows"] if r["uid"] == found["uid"])
    out.extra.update(job_after=job_after, restarted=found, restart_s=restart_s, attempts=row["attempts"])
    reclaimed = [d for u, d in journal_events(journal, "short") if u == found["uid"]]
    out.notes += [
        f"restart {restart_s:.1f} s, series {found['uid'][-6:]} half sent;"
        f" job after restart: {job_after or 'none (blocking)'}",
        f"exits {codes}; that series took {row['attempts']} attempts" + (f" ({reclaimed[0]})" if reclaimed else ""),
    ]
    phantom = _phantom_sends(journal, peers.pacs, found["uid"])
    out.extra["phantom"] = phantom
    if phantom and out.duplicates is not None:
        out.notes.append(
            f"the PACS counted {out.duplicates} duplicate(s), {phantom} of them a C-STORE it counted as its"
            " requestor vanished and never sent"
        )
        out.duplicates -= phantom
    return out


def _phantom_sends(journal: Path, pacs: MisbehavingPacs, uid: str) -> int:
    """C-STOREs the PACS counted for a cut series but never sent.

    MisbehavingPacs counts a C-STORE before pynetdicom sends it; when the C-MOVE requestor
    is gone by then, pynetdicom drops it. The journal tells what really arrived: the short
    verdict's count, then an instance-level repair of exactly the missing ones.
    """
    shorts = [d for u, d in journal_events(journal, "short") if u == uid and d and d.startswith("short: ")]
    repairs = [d for u, d in journal_events(journal, "issued") if u == uid and d and "instances=" in d]
    if len(shorts) != 1 or len(repairs) != 1:
        return 0
    arrived_before = int(shorts[0].removeprefix("short: ").split("/")[0])
    repaired = int(repairs[0].rsplit("instances=", 1)[1])
    return max(0, pacs.sent[uid] - arrived_before - repaired)


# ---------------------------------------------------------------------------------------
# R5: the destination briefly unreachable


def r5_dest_down(
    stack: Stack, series: list[SyntheticSeries], workdir: Path, *, pacs: MisbehavingPacs | None = None,
    source: str = "BADPACS", down_s: float = 3.0,
) -> Result:  # fmt: skip
    """separate topology: SIGKILL the destination after two series complete, start it again `down_s` later.

    The source is our PACS (`pacs`, counted) or, with `pacs` None, the stack's Orthanc PACS
    (`source="PACS"`; the series must be uploaded to it).
    """
    assert stack.dest is not None
    batch = write_batch_csv(series, workdir / "series.csv")
    cfg = write_config(
        workdir / "t.yaml", stack.centre.url, source=source, dest_aet="DEST", dest_url=stack.dest.url,
        max_attempts=8, move_timeout_s=30,
    )  # fmt: skip
    journal = workdir / "series.journal.sqlite"
    started = time.monotonic()
    proc = cli_popen("--batch", batch, "--config", cfg, "--json", log=workdir / "run.log")
    wait_until(lambda: sum(r["state"] == "complete" for r in journal_rows(journal)) >= 2, 30, "2 complete", proc)
    stack.dest.kill()
    time.sleep(down_s)
    stack.dest.restart()
    codes = [finish_background(proc, workdir / "run.log")]
    stderr = (workdir / "run.log").read_text(errors="replace")
    if proc.returncode == 3:
        res = cli("--batch", batch, "--config", cfg, "--json")
        codes.append(res.returncode)
        stderr += res.stderr
    seconds = time.monotonic() - started
    name = f"R5 destination down {down_s:g} s ({'pynetdicom' if pacs else 'Orthanc'} PACS)"
    out = _finish(name, series, journal, stack.dest.rest, seconds, codes, pacs,
                  stderr)  # fmt: skip
    shorts = [d for _, d in journal_events(journal, "short")]
    out.notes.append(f"exits {codes}; {len(shorts)} short attempts" + (f" (e.g. {shorts[0]})" if shorts else ""))
    return out


# ---------------------------------------------------------------------------------------
# Other real sources


@contextlib.contextmanager
def dcmqrscp_source(workdir: Path, series: list[SyntheticSeries], centre: OrthancProcess) -> Iterator[str]:
    """DCMTK dcmqrscp (fork mode) holding `series`, registered in the local Orthanc as DCMQR."""
    db = workdir / "dcmqr-db"
    db.mkdir(parents=True, exist_ok=True)
    files = write_files(series, workdir / "dcmqr-files")
    subprocess.run(["dcmqridx", str(db), *map(str, files)], check=True, capture_output=True)
    port = free_port()
    config = workdir / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\ncentre = ({centre.spec.aet}, {HOST}, {centre.spec.dicom_port})\nHostTable END\n\n"
        "VendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\nDCMQR {db} R (200, 1024mb) ANY\nAETable END\n"
    )
    with open(workdir / "dcmqrscp.log", "wb") as log:
        # Fork mode (no -s: single-process mode segfaults in 3.6.7); TCP_NODELAY or ~40 ms a round trip.
        proc = subprocess.Popen(
            ["dcmqrscp", "-c", str(config), str(port)], env=ENV, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_port(port, proc, "dcmqrscp")
        centre.rest.put("/modalities/DCMQR", {"AET": "DCMQR", "Host": HOST, "Port": port})
        yield "DCMQR"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a peer process, SIGKILL if it has not gone within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def qrscp_source(
    workdir: Path, series: list[SyntheticSeries], centre: OrthancProcess, *, move_destination: bool = True
) -> Iterator[str]:
    """`python -m pynetdicom qrscp` (its SQLite database via sqlalchemy), filled with storescu, as QRSCP.

    `move_destination=False`: the local Orthanc's AE title is not in its config (C-MOVE to
    it fails with 0xA801; C-GET needs no such entry).
    """
    port = free_port()
    known = f"[{centre.spec.aet}]\n    address: {HOST}\n    port: {centre.spec.dicom_port}\n"
    known = known if move_destination else ""
    config = workdir / "qrscp.ini"
    config.write_text(
        "[DEFAULT]\n"
        f"    ae_title: QRSCP\n    port: {port}\n    max_pdu: 16382\n"
        "    acse_timeout: 30\n    dimse_timeout: 30\n    network_timeout: 30\n"
        f"    bind_address: {HOST}\n"
        f"    instance_location: {workdir / 'qrscp-instances'}\n"
        f"    database_location: {workdir / 'qrscp.sqlite'}\n"
        "    log_identifier: False\n\n" + known
    )
    with open(workdir / "qrscp.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(config)],
            env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )  # fmt: skip
    try:
        _wait_port(port, proc, "qrscp")
        files = write_files(series, workdir / "qrscp-files")
        # Its own Storage SCP is how instances get into its database.
        subprocess.run(
            ["storescu", "-aet", "LOADER", "-aec", "QRSCP", HOST, str(port), *map(str, files)],
            env=ENV, check=True, capture_output=True,
        )  # fmt: skip
        centre.rest.put("/modalities/QRSCP", {"AET": "QRSCP", "Host": HOST, "Port": port})
        yield "QRSCP"
    finally:
        _stop(proc)


def other_source(
    name: str, modality: str, local: OrthancProcess, series: list[SyntheticSeries], workdir: Path
) -> Result:
    """A batch of `series` from a real source to the local Orthanc (also the destination)."""
    batch = write_batch_csv(series, workdir / "series.csv")
    cfg = write_config(workdir / "t.yaml", local.url, source=modality)
    res, seconds = run_timed("--batch", batch, "--config", cfg, "--report", workdir / "r.json", "--json")
    journal = workdir / "series.journal.sqlite"
    out = _finish(name, series, journal, local.rest, seconds, [res.returncode], None, res.stderr)
    out.moved = None
    queried = [d for _, d in journal_events(journal, "queried")]
    out.extra.update(queried=queried, report=workdir / "r.json")
    out.notes.append(f"{moves_issued(journal)} moves issued; count from the source: {queried[0] if queried else '?'}")
    return out


# ---------------------------------------------------------------------------------------
# The runner


def _table(results: list[Result]) -> str:
    head = ["scenario", "series complete/total", "instances moved / needed", "duplicate sends", "wall time", "notes"]
    rows = [head] + [r.row() for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append(" | ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]))
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 5)
    return "\n".join(lines)


def _small(n: int, per: int, seed: int) -> list[SyntheticSeries]:
    return make_series(n, per, seed=seed, rows=16, columns=16)


def _scenario_pacs(stack: Stack, **faults: Any) -> MisbehavingPacs:
    pacs = MisbehavingPacs(**faults).start()
    pacs.register_in(stack.centre)
    if stack.dest is not None:
        pacs.add_destination(stack.dest.spec.aet, HOST, stack.dest.spec.dicom_port)
    return pacs


def run_all(args: argparse.Namespace, work: Path) -> list[Result]:
    only = {s.strip().upper() for s in args.only.split(",")} if args.only else None
    want = lambda name: only is None or name.upper() in only  # noqa: E731
    results: list[Result] = []

    def scenario(name: str, fn: Callable[[], Result | list[Result]]) -> None:
        if not want(name):
            return
        print(f"... {name}", file=sys.stderr, flush=True)
        try:
            got = fn()
        except Exception as exc:  # one scenario failing must not hide the others' figures
            got = Result(name, 0, 0, 0, None, None, 0.0, notes=[f"ERROR {type(exc).__name__}: {exc}"])
        results.extend(got if isinstance(got, list) else [got])

    same = start_stack(work / "same", "same") if any(map(want, ("R1", "R2", "R3", "DCMQRSCP", "QRSCP"))) else None
    try:
        if same is not None:
            _run_same(same, args, work, scenario)
        if want("R4"):
            scenario("R4", lambda: _run_r4(work))
        if want("R5"):
            scenario("R5", lambda: _run_r5(work))
    finally:
        if same is not None:
            same.stop(kill=True)
    return results


def _run_same(same: Stack, args: argparse.Namespace, work: Path, scenario: Callable[..., None]) -> None:
    def with_pacs(series: list[SyntheticSeries], run: Callable[[MisbehavingPacs], Result], **faults: Any) -> Result:
        same.reset()
        pacs = _scenario_pacs(same, **faults)
        pacs.add_series(series)
        try:
            return run(pacs)
        finally:
            pacs.stop()

    def r1() -> Result:
        series = _small(args.series, args.instances, 501)
        d = work / "r1"
        d.mkdir()
        return with_pacs(
            series, lambda p: r1_async_queue(same.centre, same.centre, p, series, d),
            store_delay_s=args.store_delay, **R1_FAULTS,
        )  # fmt: skip

    def r2() -> list[Result]:
        out = []
        for i, (method, faults) in enumerate(
            [("blocking", {"abort_after": 5}), ("retrieve-job", {"abort_after": 5}),
             ("blocking", {"abort_after": 5, "async_mode": True}), ("blocking", {"partial_first": 4})]
        ):  # fmt: skip
            series = _small(4, 15, 520 + i)
            d = work / f"r2-{i}"
            d.mkdir()
            out.append(with_pacs(series, lambda p, d=d, s=series, m=method: r2_abort(same.centre, p, s, d, method=m),
                                 **faults))  # fmt: skip
        return out

    def r3() -> list[Result]:
        out = []
        for i, method in enumerate(("blocking", "retrieve-job")):
            series = _small(12, 12, 530 + i)
            d = work / f"r3-{method}"
            d.mkdir()
            out.append(with_pacs(
                series,
                lambda p, s=series, d=d, m=method: r3_kills(
                    same.centre, p, s, d, kills=args.kills, seed=args.seed, method=m
                ),
                store_delay_s=0.04,
            ))  # fmt: skip
        return out

    def other(kind: str) -> Result:
        same.reset()
        series = _small(3, 8, 540 if kind == "dcmqrscp" else 541)
        d = work / kind
        d.mkdir()
        source = dcmqrscp_source if kind == "dcmqrscp" else qrscp_source
        with source(d, series, same.centre) as modality:
            return other_source(kind, modality, same.centre, series, d)

    scenario("R1", r1)
    scenario("R2", r2)
    scenario("R3", r3)
    scenario("dcmqrscp", lambda: other("dcmqrscp"))
    scenario("qrscp", lambda: other("qrscp"))


def _run_r4(work: Path) -> list[Result]:
    out = []
    cases = [("1.10", None, "retrieve-job"), ("1.10", None, "blocking"), ("1.12", NEW_ORTHANC, "move-job")]
    for i, (label, command, method) in enumerate(cases):
        if command is not None and subprocess.run([*command[:2], "path"], capture_output=True).returncode != 0:
            out.append(Result(f"R4 ({method})", 0, 0, 0, None, None, 0.0, notes=["newer Orthanc not built: skipped"]))
            continue
        peers = start_restart_peers(work / f"r4-peers-{i}", command)
        try:
            # orderly restart; crash and restart; crash, down longer than move_timeout_s (3 s), restart
            for j, (crash, down_s, timeout) in enumerate([(False, 0, 30), (True, 0, 30), (True, 5, 3)]):
                d = work / f"r4-{i}-{j}"
                d.mkdir()
                peers.reset()
                series = _small(4, 16, 550 + 3 * i + j)
                result = r4_restart(peers, series, d, method, crash=crash, down_s=down_s, move_timeout_s=timeout)
                result.scenario += f" on {label}"
                out.append(result)
        finally:
            peers.stop()
    return out


def _run_r5(work: Path) -> list[Result]:
    stack = start_stack(work / "separate", "separate")
    out = []
    try:
        series = _small(10, 30, 560)
        upload(stack.pacs.rest, series)
        d = work / "r5-orthanc"
        d.mkdir()
        out.append(r5_dest_down(stack, series, d, source="PACS"))
        stack.reset()
        series = _small(10, 12, 561)
        pacs = _scenario_pacs(stack, store_delay_s=0.02)
        pacs.add_series(series)
        d = work / "r5-pynetdicom"
        d.mkdir()
        try:
            out.append(r5_dest_down(stack, series, d, pacs=pacs))
        finally:
            pacs.stop()
    finally:
        stack.stop(kill=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated: R1,R2,R3,R4,R5,dcmqrscp,qrscp")
    parser.add_argument("--series", type=int, default=40, help="R1 series")
    parser.add_argument("--instances", type=int, default=20, help="R1 instances per series")
    parser.add_argument("--store-delay", type=float, default=0.01, help="R1 PACS delay before each C-STORE (s)")
    parser.add_argument("--kills", type=int, default=10, help="R3 kills")
    parser.add_argument("--seed", type=int, default=5, help="R3 random kill points")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resilience-")))
        results = run_all(args, work)
    print(_table(results))
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    bad = [r for r in results if r.complete != r.total or not r.total]
    return 1 if bad else 0


if __name__ == "__main__":
    threading.current_thread().name = "resilience"
    sys.exit(main())
