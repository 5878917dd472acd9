"""The hospital PACS behind a "VPN" that is slow and goes away for 30 s mid-batch.

Topology (issue 6 item 7; seed 003's VPN between hospital and centre):

    host namespace (the centre)                  namespace dt-pacs-<pid> (the hospital)
    local Orthanc CENTRE, also the destination   source PACS HOSPITAL (/usr/sbin/Orthanc,
    (127.0.0.1 for REST, all interfaces for      `ip netns exec`), knows CENTRE at .1
    DICOM), knows PACS at .2
    dt<pid>0h  10.250.x.1/30  <==== veth ====>  10.250.x.2/30  dt<pid>0n

The CLI runs as a subprocess against the local Orthanc (loopback: it stays reachable
during the cut). Once one series is complete in the journal the link is black-holed both
ways for CUT_S seconds, then restored. Every series must end complete with the centre
holding all its instances, exit 0. Both ends of the veth carry the same shaping: a 4 mbit
rate cap (tbf, any kernel) or netem 50 ms + 1 % loss (where the kernel has sch_netem).
The figures are printed (run with `-s`) and written to `vpn-figures-<variant>.json` in
the test's tmp dir. `DT_VPN_CUT_S=150` lengthens the cut of the first two tests.

`test_vpn_long_cut_fails_no_series`: a cut longer than the attempt budget fails no series
(the run pauses while the PACS cannot be reached, and spends no attempts).

`test_vpn_relay_delay_cut_mid_batch` runs the same scenario where netem is missing, on
the VPN topology of tests/wanstack.py instead: PACS, controller and local Orthanc on the
hospital side, the destination DEST behind a `WanLink` relay (RTT 60 ms, 20 Mbit) that
both the PACS's C-STOREs and the controller's REST calls to DEST cross; the relay is
black-holed for RELAY_CUT_S (10 s, `DT_VPN_RELAY_CUT_S`) once a series is complete.

Where network namespaces (or tc) are not allowed the tests skip, saying precisely why;
the netem variant also skips, with the kernel's facts, where sch_netem is missing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT
from netns import BLACK_HOLE, NetnsUnavailable, VethLink, create_link
from test_transfer import series_count, write_config
from wanstack import WanStack, wan_stack

from dicom_transfer.stack import (
    CENTRE_AET,
    PACS_AET,
    OrthancProcess,
    OrthancSpec,
    Stack,
    free_port,
    launch_orthanc,
    orthanc_command,
)
from dicom_transfer.synthetic import make_series, upload, write_batch_csv

pytestmark = pytest.mark.integration

N_SERIES, PER_SERIES = 6, 10
CUT_S = float(os.environ.get("DT_VPN_CUT_S", "30"))  # longer cuts: DT_VPN_CUT_S=75 pytest ...
TRANSFER = {"stall_s": 5, "move_timeout_s": 60, "backoff_s": 1, "max_attempts": 5}
NETEM = ("netem", "delay", "50ms", "loss", "1%")  # on both ends: RTT +100 ms, ~2 % per round trip
RATE_CAP = ("tbf", "rate", "4mbit", "burst", "32kbit", "latency", "400ms")  # a small VPN's bandwidth
FIRST_COMPLETE_WITHIN_S = 40.0
RUN_AFTER_CUT_S = 120.0  # cut + this after the start, the CLI counts as hung: killed, and the test fails
LONG_CUT_S = 45.0  # about twice what the default 3 attempts last while the source cannot be reached
RELAY = {"rtt_ms": 60, "mbit": 20}  # a slow VPN between hospital and centre
RELAY_CUT_S = float(os.environ.get("DT_VPN_RELAY_CUT_S", "10"))


@dataclass
class NsSpec(OrthancSpec):
    """An Orthanc reached at `host` (its namespace's veth address) instead of 127.0.0.1."""

    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def modality(self) -> tuple[str, str, int]:
        return (self.aet, self.host, self.dicom_port)


class RelayVpn:
    """The VPN as a `WanLink` relay (tests/wanstack.py), with the few methods the scenario uses."""

    def __init__(self, wan: WanStack) -> None:
        self.wan = wan
        self.log: list[str] = [f"WanLink rtt {wan.link.rtt_ms:g} ms, {wan.link.mbit:g} Mbit each way"]

    @property
    def is_cut(self) -> bool:
        return self.wan.link.is_cut

    def shape(self, shaping: tuple[str, ...]) -> None:
        """The relay's delay and rate are set when it starts: nothing to add."""

    def cut(self) -> None:
        self.wan.link.cut()
        self.log.append("cut")

    def restore(self) -> None:
        self.wan.link.restore()
        self.log.append("restore")


Vpn = VethLink | RelayVpn


@pytest.fixture
def link() -> Iterator[VethLink]:
    try:
        made = create_link("pacs")
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        reason = made.tbf_unavailable()
        if reason:
            pytest.skip(reason)  # the cut is a tbf black hole
        yield made
    finally:
        made.close()
    left = made.leftovers()
    assert not left, f"teardown left {left} behind"


@contextmanager
def pacs_behind_vpn(link: VethLink, tmp_path: Path) -> Iterator[Stack]:
    """PACS inside the namespace, CENTRE (local Orthanc and destination) in the host namespace."""
    pacs_spec = NsSpec("pacs", PACS_AET, free_port(), free_port(), host=link.ns_addr)
    centre_spec = OrthancSpec.plan("centre", CENTRE_AET)
    workdir = tmp_path / "orthanc"
    pacs = launch_orthanc(
        pacs_spec,
        workdir,
        {"CENTRE": (CENTRE_AET, link.host_addr, centre_spec.dicom_port)},
        command=[*link.exec_prefix(), *orthanc_command()],
    )
    centre: OrthancProcess | None = None
    try:
        centre = launch_orthanc(centre_spec, workdir, {"PACS": pacs_spec.modality})
        stack = Stack(pacs=pacs, centre=centre)
        for process in stack.processes:
            process.wait_ready(30)
        yield stack
    finally:
        for process in (pacs, centre):
            if process is not None:
                process.kill()  # throw-away data: no orderly shutdown needed


def _journal_rows(journal: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if not journal.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # not created yet, or busy: ask again later
        return []


def _complete(journal: Path) -> int:
    rows = _journal_rows(journal, "SELECT COUNT(*) FROM series WHERE state='complete'")
    return rows[0][0] if rows else 0


def _states(journal: Path) -> dict[str, int]:
    return dict(_journal_rows(journal, "SELECT state, COUNT(*) FROM series GROUP BY state"))


def _interesting_log(path: Path, limit: int = 40) -> str:
    keep = ("short", "retry", "failed", "party", "throttle", "error", "warning", "Traceback", "stopped")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if any(k in ln for k in keep)]
    return "\n".join(lines[-limit:]) or "(no such log line)"


@dataclass
class Outcome:
    """How one CLI run through a cut ended, with what is needed to assert and to re-run."""

    code: int | None
    figures: dict[str, Any]
    series: list[Any]
    journal: Path
    report_path: Path
    argv: list[str]
    context: str


def _transfer_through_cut(
    stack: Stack,
    link: Vpn,
    tmp_path: Path,
    shaping: tuple[str, ...],
    variant: str,
    *,
    transfer: dict[str, Any] | None = None,
    cut_s: float = CUT_S,
    n_series: int = N_SERIES,
) -> Outcome:
    """Upload, impair the link, run the CLI, cut the link once a series is complete; report."""
    transfer = transfer or TRANSFER
    series = make_series(n_series, PER_SERIES, seed=63)
    upload(stack.pacs.rest, series)  # over the veth, before it is impaired
    link.shape(shaping)
    batch = write_batch_csv(series, tmp_path / "series.csv")
    if isinstance(link, RelayVpn):  # the destination's REST through the relay
        cfg = link.wan.config_yaml(tmp_path / "t.yaml", **{"stall_s": 2, "backoff_s": 0.2, **transfer})
    else:
        cfg = write_config(tmp_path / "t.yaml", stack, **transfer)
    journal, report_path = tmp_path / "series.journal.sqlite", tmp_path / "report.json"
    stderr_path = tmp_path / "cli.stderr"
    argv = [sys.executable, str(REPO_ROOT / "main.py"), "--batch", str(batch), "--config", str(cfg)]
    argv += ["--report", str(report_path)]

    t0 = time.monotonic()
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(argv, env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            timeline = _cut_once_one_is_complete(proc, link, journal, t0, cut_s)
            try:
                code = proc.wait(timeout=max(1.0, cut_s + RUN_AFTER_CUT_S - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                code = None
        finally:
            if link.is_cut:
                link.restore()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - t0

    figures, events = _figures(journal, stack, series, variant, shaping, link, timeline, wall, code)
    if isinstance(link, RelayVpn):
        figures["cut"] = f"{cut_s:g} s black hole of the relay, both ways (traffic held, not dropped)"
    else:
        figures["cut"] = f"{cut_s:g} s black hole on both veth ends (tc qdisc replace ... root {' '.join(BLACK_HOLE)})"
    figures["transfer"] = transfer
    out = tmp_path / f"vpn-figures-{variant}.json"
    out.write_text(json.dumps({"figures": figures, "events": events}, indent=2))
    print(f"\nVPN figures ({variant}), also in {out}:\n{json.dumps(figures, indent=2)}")
    print("journal events of series that needed more than one attempt (t from run start):")
    for e in events:
        print(f"  t={e['t']:>6.1f}s {e['series']} {e['event']:<10} {e['from']}->{e['to']} {e['detail'] or ''}")
    context = (
        f"exit {code}; journal states {_states(journal)}; figures {figures}\n"
        f"log lines ({stderr_path}):\n{_interesting_log(stderr_path)}"
    )
    if code is None:
        pytest.fail(f"the CLI hung: still running {cut_s + RUN_AFTER_CUT_S:g} s after start; {context}")
    return Outcome(code, figures, series, journal, report_path, argv, context)


def _assert_all_complete(stack: Stack, out: Outcome) -> None:
    """Exit 0, every series complete with received == expected, nothing lost anywhere."""
    assert out.code == 0, out.context
    n = len(out.series)
    summary = json.loads(out.report_path.read_text())["summary"]
    assert (summary["total"], summary["complete"], summary["failed"], summary["pending"]) == (n, n, 0, 0), out.context
    assert summary["instances"] == n * PER_SERIES, out.context
    for row in json.loads(out.report_path.read_text())["series"]:
        assert (row["state"], row["expected"], row["received"]) == ("complete", PER_SERIES, PER_SERIES), row
    for s in out.series:  # nothing lost: the destination holds every instance, the PACS still has all
        assert series_count(stack.destination, s.series_uid) == PER_SERIES, s.series_uid
    assert len(stack.pacs.rest.get("/instances")) == n * PER_SERIES


def _cut_once_one_is_complete(
    proc: subprocess.Popen[bytes], link: Vpn, journal: Path, t0: float, cut_s: float
) -> dict[str, Any]:
    """Wait for the first complete series, black-hole the link for `cut_s`, restore it."""
    while _complete(journal) < 1:
        if proc.poll() is not None:
            pytest.fail(f"the CLI exited ({proc.returncode}) before the cut; states {_states(journal)}")
        if time.monotonic() - t0 > FIRST_COMPLETE_WITHIN_S:
            pytest.fail(f"no series complete within {FIRST_COMPLETE_WITHIN_S:g} s; states {_states(journal)}")
        time.sleep(0.02)
    cut_at = time.monotonic()
    link.cut()
    at_cut = _states(journal)
    while time.monotonic() - cut_at < cut_s and proc.poll() is None:
        time.sleep(0.1)
    exited_during_cut = proc.poll()
    link.restore()
    return {
        "cut_at_s": round(cut_at - t0, 1),
        "restored_at_s": round(time.monotonic() - t0, 1),
        "states_at_cut": at_cut,
        "states_at_restore": _states(journal),
        "exited_during_cut": exited_during_cut,
    }


def _topology(link: Vpn, stack: Stack) -> dict[str, str]:
    pacs_port, centre_port = stack.pacs.spec.dicom_port, stack.centre.spec.dicom_port
    if isinstance(link, RelayVpn):
        wan = link.wan
        return {
            "pacs": f"{stack.pacs.spec.aet} REST {stack.pacs.url}, DICOM 127.0.0.1:{pacs_port}",
            "centre": f"{stack.centre.spec.aet} (local Orthanc) REST {stack.centre.url}",
            "dest": f"{wan.dest.spec.aet} REST {wan.dest_url}, DICOM 127.0.0.1:{wan.dest_dicom_port} (via the relay)",
            "relayed_connections": str(len(wan.link.connections)),
        }
    return {
        "namespace": link.ns,
        "veth_host": f"{link.host_if} {link.host_addr}/30",
        "veth_ns": f"{link.ns_if} {link.ns_addr}/30",
        "pacs": f"{stack.pacs.spec.aet} REST {stack.pacs.url}, DICOM {link.ns_addr}:{pacs_port}",
        "centre": f"{stack.centre.spec.aet} REST {stack.centre.url}, DICOM {link.host_addr}:{centre_port}",
    }


def _figures(
    journal: Path,
    stack: Stack,
    series: list[Any],
    variant: str,
    shaping: tuple[str, ...],
    link: Vpn,
    timeline: dict[str, Any],
    wall: float,
    code: int | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    shorts = _journal_rows(journal, "SELECT COUNT(*) FROM events WHERE event='short'")
    retried = _journal_rows(journal, "SELECT uid, attempts, state, reason FROM series WHERE attempts > 1")
    attempts = _journal_rows(journal, "SELECT SUM(attempts), MAX(attempts) FROM series")
    received = sum(series_count(stack.destination, s.series_uid) for s in series)
    start = _journal_rows(journal, "SELECT detail FROM events WHERE event='run.start' ORDER BY id LIMIT 1")
    figures = {
        "variant": variant,
        "move_method": json.loads(start[0][0]).get("method") if start and start[0][0] else None,
        "shaping_each_end": " ".join(shaping),
        "series": len(series),
        "instances_expected": len(series) * PER_SERIES,
        "instances_at_destination": received,
        "exit_code": code,
        "wall_s": round(wall, 1),
        "short_events": shorts[0][0] if shorts else None,
        "series_retried": len(retried),
        "attempts_total": attempts[0][0] if attempts else None,
        "attempts_max": attempts[0][1] if attempts else None,
        "final_states": _states(journal),
        **timeline,
        "topology": _topology(link, stack),
        "commands": link.log,
    }
    t_start = _journal_rows(journal, "SELECT MIN(at) FROM events")
    base = t_start[0][0] if t_start and t_start[0][0] else 0.0
    uids = {uid for uid, *_ in retried}
    events = [
        {
            "t": at - base,
            "series": "…" + uid[-10:] if uid else "(run)",
            "event": ev,
            "from": fr,
            "to": to,
            "detail": detail,
        }
        for at, uid, ev, fr, to, detail in _journal_rows(
            journal, "SELECT at, uid, event, from_state, to_state, detail FROM events ORDER BY id"
        )
        if uid in uids or uid is None
    ]
    return figures, events


def test_vpn_cut_mid_batch(link: VethLink, tmp_path: Path) -> None:
    """A rate-capped link (tbf 4 mbit each way) cut for 30 s mid-batch: all complete, exit 0."""
    with pacs_behind_vpn(link, tmp_path) as stack:
        _assert_all_complete(stack, _transfer_through_cut(stack, link, tmp_path, RATE_CAP, "rate-cap"))


def test_vpn_netem_delay_loss_cut_mid_batch(link: VethLink, tmp_path: Path) -> None:
    """netem 50 ms + 1 % loss each way, cut for 30 s mid-batch: all complete, exit 0."""
    reason = link.netem_unavailable()
    if reason:
        pytest.skip(reason)
    with pacs_behind_vpn(link, tmp_path) as stack:
        _assert_all_complete(stack, _transfer_through_cut(stack, link, tmp_path, NETEM, "netem"))


def test_vpn_long_cut_fails_no_series(link: VethLink, tmp_path: Path) -> None:
    """A 45 s cut with the default max_attempts (3): no series may be failed for it.

    DESIGN: a party gone longer than its retry deadline mid-run stops the run with exit 3,
    resumable; an unreachable source is the network's fault, not the series'. Made
    deterministic: two series, `pause_s: 2` so that nothing is in flight when the cut
    starts (right after the first series completes); the second series' move and queries
    then fail in 3-6 s each (`TCP Initialization Error`), so 3 attempts last ~25 s at most.
    """
    transfer = {**TRANSFER, "max_attempts": 3, "pause_s": 2}
    with pacs_behind_vpn(link, tmp_path) as stack:
        out = _transfer_through_cut(
            stack, link, tmp_path, RATE_CAP, "long-cut", transfer=transfer, cut_s=LONG_CUT_S, n_series=2
        )
        failed = _journal_rows(out.journal, "SELECT uid, attempts, reason FROM series WHERE state='failed'")
        assert not failed, f"series failed because the source was unreachable for {LONG_CUT_S:g} s: {failed}"
        assert out.code in (0, 3), out.context
        if out.code == 3:  # stopped resumable: the same command finishes the batch
            rerun = subprocess.run(out.argv, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, timeout=120)
            out.code = rerun.returncode
        _assert_all_complete(stack, out)


def test_vpn_relay_delay_cut_mid_batch(tmp_path: Path) -> None:
    """Destination behind a relay (RTT 60 ms, 20 Mbit), cut for 10 s mid-batch: all complete, exit 0."""
    with wan_stack(tmp_path / "orthanc", **RELAY) as wan:
        vpn = RelayVpn(wan)
        shaping = ("relay", f"rtt {RELAY['rtt_ms']}ms", f"{RELAY['mbit']}mbit")
        out = _transfer_through_cut(wan.stack, vpn, tmp_path, shaping, "relay", cut_s=RELAY_CUT_S)
        _assert_all_complete(wan.stack, out)
        stores = [c for c in wan.link.connections if c.target == ("127.0.0.1", wan.dest.spec.dicom_port)]
        assert len(stores) >= N_SERIES, "the C-STOREs did not all cross the relay"
        assert out.figures["restored_at_s"] - out.figures["cut_at_s"] >= RELAY_CUT_S - 0.5
