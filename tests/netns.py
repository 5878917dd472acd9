"""A test host behind a "VPN": a network namespace joined to the host by one veth pair.

Only what this module creates is ever touched: one namespace (`dt-<tag>-<pid>[-n]`), one
veth pair (`dt<pid><n>h` in the host namespace, `dt<pid><n>n` inside), a private /30 out
of 10.250.0.0/16 that no existing address or route overlaps, and the root qdiscs of those
two veths. No other interface, route or firewall rule is changed. Names carry the pid, so
xdist workers (and concurrent sessions) never collide; `VethLink.close()` removes it all
and is called on every exit path of `veth_namespace()`, failures included.

Impairments are `tc` root qdiscs on both ends of the pair:
- `netem delay/loss` when the kernel has sch_netem (`netem_unavailable()` says precisely
  why not otherwise);
- `tbf` (a rate cap) where netem is missing;
- the cut is a black hole on both ends, `tbf rate 8bit burst 1b limit 1b`: every packet is
  larger than the 1-byte bucket and is dropped silently, in both directions, while every
  route stays in place. (Setting the host-side veth down would delete its connected route,
  and traffic for the /30 would follow the default route out of the machine.)
"""

from __future__ import annotations

import atexit
import gzip
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

POOL = ipaddress.ip_network("10.250.0.0/16")
BLACK_HOLE = ("tbf", "rate", "8bit", "burst", "1b", "limit", "1b")

_counter = itertools.count()
_open: set[VethLink] = set()
_open_lock = threading.Lock()


class NetnsUnavailable(Exception):
    """Namespaces, veth or tc cannot be used here; the message says precisely why."""


def _run(args: Sequence[str], *, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(args), proc.stdout, proc.stderr)
    return proc


def _said(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr or proc.stdout or "").strip().replace("\n", " ")
    return f"exit {proc.returncode}: {text!r}" if text else f"exit {proc.returncode}"


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix in use in the host namespace: interface addresses and routes."""
    taken: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for info in entry.get("addr_info", []):
            taken.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            taken.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return taken


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 of POOL, chosen from `seed`, that overlaps nothing configured on this host."""
    blocks = list(POOL.subnets(new_prefix=30))
    # A broader prefix (a 10.0.0.0/8 route) may cover POOL: our /30 on our veth is more
    # specific, so only prefixes at least as long as POOL's count as taken.
    taken = [net for net in _taken_networks() if net.prefixlen >= POOL.prefixlen]
    for i in range(len(blocks)):
        block = blocks[(seed + i * 97) % len(blocks)]  # 97 is prime to the block count: all visited
        if not any(block.overlaps(net) for net in taken):
            return block
    raise NetnsUnavailable(f"no free /30 left in {POOL}")


def _kernel_netem_facts() -> str:
    """Why the kernel cannot give us netem: its config and whether a module could be loaded."""
    release = os.uname().release
    facts = [f"kernel {release}"]
    config = Path("/proc/config.gz")
    if config.exists():
        try:
            text = gzip.decompress(config.read_bytes()).decode(errors="replace")
        except OSError:
            text = ""
        m = re.search(r"^(CONFIG_NET_SCH_NETEM=\w|# CONFIG_NET_SCH_NETEM is not set)", text, re.M)
        facts.append(f"/proc/config.gz: {m.group(1) if m else 'no CONFIG_NET_SCH_NETEM line'}")
    moddir = Path("/lib/modules") / release
    dep = moddir / "modules.dep"
    if not moddir.is_dir():
        facts.append(f"no {moddir} (no module to load)")
    elif dep.exists():
        has = "sch_netem.ko" in dep.read_text(errors="replace")
        facts.append(f"sch_netem {'listed' if has else 'not listed'} in {dep}")
    return ", ".join(facts)


@dataclass(eq=False)
class VethLink:
    """One namespace, one veth pair, one /30: `.1` on the host side, `.2` in the namespace."""

    ns: str
    host_if: str
    ns_if: str
    subnet: ipaddress.IPv4Network
    shaping: tuple[str, ...] | None = None  # the root qdisc both ends carry when not cut
    is_cut: bool = False
    log: list[str] = field(default_factory=list)  # every command run, for the report
    _closed: bool = False

    @property
    def host_addr(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ns_addr(self) -> str:
        return str(self.subnet.network_address + 2)

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace (`ip` execs: the PID is the command's)."""
        return ["ip", "netns", "exec", self.ns]

    # -- commands -------------------------------------------------------------------------

    def _cmd(
        self, args: Sequence[str], *, inside: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        full = [*self.exec_prefix(), *args] if inside else list(args)
        self.log.append(" ".join(full))
        return _run(full, check=check)

    def _root_qdisc(self, spec: Sequence[str] | None) -> None:
        """Give both ends the same root qdisc (`None`: the kernel's default)."""
        for dev, inside in ((self.ns_if, True), (self.host_if, False)):
            if spec is None:
                self._cmd(["tc", "qdisc", "del", "dev", dev, "root"], inside=inside, check=False)
            else:
                self._cmd(["tc", "qdisc", "replace", "dev", dev, "root", *spec], inside=inside)

    def _setup(self) -> None:
        self._cmd(["ip", "netns", "add", self.ns])
        self._cmd(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.ns])
        self._cmd(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
        self._cmd(["ip", "link", "set", self.host_if, "up"])
        self._cmd(["ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if], inside=True)
        self._cmd(["ip", "link", "set", "lo", "up"], inside=True)
        self._cmd(["ip", "link", "set", self.ns_if, "up"], inside=True)
        route = self._cmd(["ip", "route", "get", self.ns_addr]).stdout
        if f"dev {self.host_if}" not in route:
            raise NetnsUnavailable(f"{self.ns_addr} is not routed over {self.host_if}: {route.strip()!r}")

    # -- impairments ------------------------------------------------------------------

    def netem_unavailable(self) -> str | None:
        """None when `tc ... netem` works here; else the precise reason it does not."""
        if shutil.which("tc") is None:
            return "tc not found (apt-get install iproute2)"
        probe = self._cmd(["tc", "qdisc", "add", "dev", self.host_if, "root", "netem", "delay", "1ms"], check=False)
        if probe.returncode == 0:
            self._cmd(["tc", "qdisc", "del", "dev", self.host_if, "root"], check=False)
            return None
        return f"sch_netem unavailable: `tc qdisc add dev {self.host_if} root netem delay 1ms` {_said(probe)}; " + (
            _kernel_netem_facts()
        )

    def tbf_unavailable(self) -> str | None:
        """None when the `tbf` qdisc (rate cap, and the black-hole cut) works here."""
        probe = self._cmd(["tc", "qdisc", "add", "dev", self.host_if, "root", *BLACK_HOLE], check=False)
        if probe.returncode == 0:
            self._cmd(["tc", "qdisc", "del", "dev", self.host_if, "root"], check=False)
            return None
        return f"tbf qdisc unavailable: `tc qdisc add dev {self.host_if} root {' '.join(BLACK_HOLE)}` {_said(probe)}"

    def shape(self, spec: Sequence[str] | None) -> None:
        """Impair both directions alike, e.g. `("netem", "delay", "50ms", "loss", "1%")`."""
        self.shaping = tuple(spec) if spec else None
        if not self.is_cut:
            self._root_qdisc(self.shaping)

    def cut(self) -> None:
        """Drop every packet both ways (silently, like a VPN tunnel that went away)."""
        self._root_qdisc(BLACK_HOLE)
        self.is_cut = True

    def restore(self) -> None:
        """End the cut: back to the shaping in force before it."""
        self._root_qdisc(self.shaping)
        self.is_cut = False

    # -- teardown ---------------------------------------------------------------------

    def pids(self) -> list[int]:
        proc = _run(["ip", "netns", "pids", self.ns], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def close(self) -> None:
        """Kill what still runs in the namespace, then delete the veth pair and the namespace."""
        if self._closed:
            return
        self._closed = True
        try:
            for pid in self.pids():  # only processes this test started live in its namespace
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            _run(["ip", "link", "del", self.host_if], check=False)  # deletes both ends
            _run(["ip", "netns", "del", self.ns], check=False)
        finally:
            with _open_lock:
                _open.discard(self)

    def leftovers(self) -> list[str]:
        """What of this link still exists (empty after a clean `close()`)."""
        left = []
        if _run(["ip", "link", "show", self.host_if], check=False).returncode == 0:
            left.append(f"veth {self.host_if}")
        if self.ns in _run(["ip", "netns", "list"], check=False).stdout.split():
            left.append(f"namespace {self.ns}")
        return left


def create_link(tag: str = "pacs") -> VethLink:
    """Create a namespace joined to the host by a fresh veth pair; NetnsUnavailable if not allowed."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` not found (apt-get install iproute2)")
    pid, n = os.getpid(), next(_counter)
    suffix = f"{pid}" if n == 0 else f"{pid}-{n}"
    link = VethLink(
        ns=f"dt-{tag}-{suffix}",
        host_if=f"dt{pid}{n}h",
        ns_if=f"dt{pid}{n}n",
        subnet=_free_subnet(pid * 8 + n),
    )
    if len(link.host_if) > 15:
        raise NetnsUnavailable(f"interface name {link.host_if!r} longer than 15 characters")
    probe = _run(["ip", "netns", "add", link.ns], check=False)
    if probe.returncode != 0:
        who = f"euid {os.geteuid()}" + ("" if os.geteuid() == 0 else " (not root)")
        raise NetnsUnavailable(f"`ip netns add {link.ns}` failed ({who}, needs CAP_NET_ADMIN): {_said(probe)}")
    _run(["ip", "netns", "del", link.ns], check=False)
    with _open_lock:
        _open.add(link)
    try:
        link._setup()
    except subprocess.CalledProcessError as exc:
        link.close()
        said = (exc.stderr or "").strip().replace("\n", " ")
        raise NetnsUnavailable(f"`{' '.join(exc.cmd)}` failed (exit {exc.returncode}): {said!r}") from exc
    except BaseException:
        link.close()
        raise
    return link


@contextmanager
def veth_namespace(tag: str = "pacs") -> Iterator[VethLink]:
    """`create_link()` as a context manager: everything is deleted on the way out."""
    link = create_link(tag)
    try:
        yield link
    finally:
        link.close()


@atexit.register
def _close_leftovers() -> None:
    """An interpreter that exits without closing a link (an interrupted session) still cleans up."""
    with _open_lock:
        leftovers = list(_open)
    for link in leftovers:
        link.close()
