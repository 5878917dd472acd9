"""Real Orthanc processes on loopback: a source PACS, the local Orthanc, a destination.

Used by the demo, the tests and the benchmarks. Each Orthanc runs in the foreground with
its own JSON config, storage and log in a work directory, on free loopback ports planned
before any of them starts (so peers can name each other in `DicomModalities`).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import DicomTransferError, OrthancError, TransientOrthancError
from .orthanc import OrthancRest

HOST = "127.0.0.1"
DEFAULT_ORTHANC = "/usr/sbin/Orthanc"
INSTALL_HINT = "run `sudo apt-get install -y orthanc dcmtk` (Debian/Ubuntu)"
_RESERVED_PORTS = frozenset({4242, 8042})  # a system Orthanc may listen there
_POLL_S = 0.05

TOPOLOGIES = ("same", "separate")
PACS_AET, CENTRE_AET, DEST_AET = "HOSPITAL", "CENTRE", "DEST"

Modalities = dict[str, tuple[str, str, int]]


class StackError(DicomTransferError):
    """An Orthanc of the loopback stack could not be started (or is not installed)."""


# ---------------------------------------------------------------------------------------
# Ports and binaries

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never one this process handed out before."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if port not in _ports_given and port not in _RESERVED_PORTS:
                _ports_given.add(port)
                return port


def orthanc_command(*, default: str = DEFAULT_ORTHANC, search_path: str | None = None) -> list[str]:
    """How to run the installed Orthanc: Debian's binary, else `Orthanc` on the PATH.

    `search_path` replaces `$PATH` for the lookup (tests use it to simulate no Orthanc).
    """
    if os.path.isfile(default) and os.access(default, os.X_OK):
        return [default]
    found = shutil.which("Orthanc", path=search_path)
    if found:
        return [found]
    raise StackError(f"Orthanc is not installed: {INSTALL_HINT}")


def _check_runnable(command: list[str]) -> None:
    if not command:
        raise StackError("empty Orthanc command")
    if shutil.which(command[0]) is None:
        raise StackError(f"Orthanc is not installed ({command[0]} not found): {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------
# One Orthanc


@dataclass
class OrthancSpec:
    """Name, AE title and ports of an Orthanc, planned before it starts."""

    name: str
    aet: str
    http_port: int
    dicom_port: int

    @classmethod
    def plan(cls, name: str, aet: str) -> OrthancSpec:
        """A spec on two fresh free loopback ports."""
        return cls(name, aet, free_port(), free_port())

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def modality(self) -> tuple[str, str, int]:
        """This Orthanc as a `DicomModalities` entry of its peers: (AET, host, port)."""
        return (self.aet, HOST, self.dicom_port)


def orthanc_config(
    spec: OrthancSpec, workdir: Path, modalities: Modalities, extra_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON configuration of one test Orthanc (`extra_config` merged on top)."""
    storage = str((workdir / f"{spec.name}-db").resolve())
    config: dict[str, Any] = {
        "Name": spec.name,
        "HttpPort": spec.http_port,
        "DicomPort": spec.dicom_port,
        "DicomAet": spec.aet,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": False,
        "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
        "ConcurrentJobs": 4,
        "JobsHistorySize": 100,
        "DicomScuTimeout": 30,
        "StableAge": 60,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        # All five are known to 1.10.1 (checked in its binary and start-up log). C-GET
        # from any AE title: a PACS that does not know the caller still serves its C-GET.
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomCheckModalityHost": False,
        "Plugins": [],
        "StorageCompression": False,
        "OverwriteInstances": False,
        "SaveJobs": False,
    }
    config.update(extra_config or {})
    return config


_live: set[OrthancProcess] = set()
_live_lock = threading.Lock()


@dataclass(eq=False)
class OrthancProcess:
    """A running Orthanc started by `start_orthanc`; also a context manager that stops it."""

    spec: OrthancSpec
    url: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    rest: OrthancRest
    log_path: Path
    config_path: Path
    command: list[str]
    modalities: Modalities = field(default_factory=dict)
    _signalled: bool = field(default=False, init=False, repr=False)

    # -- life cycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM once, without waiting (lets a stack stop its Orthancs in parallel).

        Once. Orthanc restores the default handlers when its shutdown begins, so a second
        SIGTERM would kill it halfway through the orderly stop.
        """
        if self.running and not self._signalled:
            self._signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; does nothing if already stopped."""
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _forget(self)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would (no orderly shutdown)."""
        if self.running:
            self.proc.kill()
        self.proc.wait()
        _forget(self)

    def restart(self, ready_timeout_s: float = 30) -> None:
        """Stop (if running) and start again with the same config, ports and storage."""
        self.stop()
        self.proc = _popen(self.command, self.config_path, self.log_path)
        self._signalled = False
        _remember(self)
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Poll `GET /system` every 50 ms until this Orthanc (not a stranger) answers."""
        probe = OrthancRest(self.url, name=self.spec.name, timeout_s=2.0, retry_deadline_s=0)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if not self.running:
                    raise StackError(
                        f"Orthanc {self.spec.name!r} exited with code {self.proc.returncode} before it was "
                        f"ready; last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                if self._answers(probe):
                    return
                if time.monotonic() > deadline:
                    raise StackError(
                        f"Orthanc {self.spec.name!r} not ready after {timeout_s:g} s; "
                        f"last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(_POLL_S)
        finally:
            probe.close()

    def _answers(self, probe: OrthancRest) -> bool:
        try:
            system = probe.system()
        except TransientOrthancError:
            return False
        except OrthancError as exc:
            raise StackError(f"Orthanc {self.spec.name!r}: unexpected answer to /system: {exc}") from exc
        # Someone else on our port would answer too; only our own name and AET count.
        return system.get("Name") == self.spec.name and system.get("DicomAet") == self.spec.aet

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def __enter__(self) -> OrthancProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST conveniences ----------------------------------------------------------------

    def version(self) -> tuple[int, ...]:
        return self.rest.version()

    def wipe(self) -> None:
        """Delete every patient (hence every study, series and instance) via REST."""
        for patient in self.rest.get("/patients"):
            try:
                self.rest.delete(f"/patients/{patient}")
            except OrthancError as exc:
                if exc.status != 404:  # gone already: that is what we want
                    raise

    def restore_modalities(self) -> None:
        """Put `DicomModalities` back to the planned ones (a test may have changed them)."""
        current = set(self.rest.get("/modalities"))
        for name in current - set(self.modalities):
            self.rest.delete(f"/modalities/{name}")
        for name, (aet, host, port) in self.modalities.items():
            self.rest.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})


def _remember(process: OrthancProcess) -> None:
    with _live_lock:
        _live.add(process)


def _forget(process: OrthancProcess) -> None:
    with _live_lock:
        _live.discard(process)


@atexit.register
def _stop_leftovers() -> None:
    """Never leave an Orthanc behind when the interpreter exits without stopping it."""
    with _live_lock:
        leftovers = list(_live)
    for process in leftovers:
        process.terminate()
    for process in leftovers:
        process.stop(timeout=5)


def _popen(command: list[str], config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    _check_runnable(command)
    # Without TCP_NODELAY, Debian's DCMTK 3.6.7 waits ~40 ms per DIMSE round trip.
    env = {**os.environ, "TCP_NODELAY": "1"}
    try:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [*command, str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
    except OSError as exc:
        raise StackError(f"cannot run {command[0]}: {exc}; {INSTALL_HINT}") from exc


def launch_orthanc(
    spec: OrthancSpec,
    workdir: Path,
    modalities: Modalities,
    *,
    extra_config: dict[str, Any] | None = None,
    command: list[str] | None = None,
) -> OrthancProcess:
    """Write the config and start the process without waiting for it to be ready."""
    command = list(command) if command else orthanc_command()
    _check_runnable(command)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{spec.name}.json"
    config_path.write_text(json.dumps(orthanc_config(spec, workdir, modalities, extra_config), indent=2))
    log_path = workdir / f"{spec.name}.log"
    proc = _popen(command, config_path, log_path)
    process = OrthancProcess(
        spec=spec,
        url=spec.url,
        workdir=workdir,
        proc=proc,
        rest=OrthancRest(spec.url, name=spec.name),
        log_path=log_path,
        config_path=config_path,
        command=command,
        modalities=dict(modalities),
    )
    _remember(process)
    return process


def start_orthanc(
    spec: OrthancSpec,
    workdir: Path,
    modalities: Modalities,
    *,
    extra_config: dict[str, Any] | None = None,
    command: list[str] | None = None,
    ready_timeout_s: float = 30,
) -> OrthancProcess:
    """Start one Orthanc and return once `GET /system` answers.

    `command` is everything before the config path: `["/usr/sbin/Orthanc"]` by default,
    or a wrapper such as `["bash", ".ci/orthanc-new", "exec", "/usr/sbin/Orthanc"]`.
    """
    process = launch_orthanc(spec, workdir, modalities, extra_config=extra_config, command=command)
    _wait_all([process], ready_timeout_s)
    return process


def _wait_all(processes: list[OrthancProcess], timeout_s: float) -> None:
    """Wait until all are ready; on any failure stop every one of them and re-raise."""
    try:
        for process in processes:
            process.wait_ready(timeout_s)
    except BaseException:
        _stop_all(processes, kill=True)
        raise


def _stop_all(processes: Iterable[OrthancProcess], *, kill: bool = False, timeout: float = 10) -> None:
    processes = list(processes)
    for process in processes:
        if kill:
            process.kill()
        else:
            process.terminate()  # all at once: each takes ~2.5 s to shut down
    for process in processes:
        process.stop(timeout)


# ---------------------------------------------------------------------------------------
# The three parties


@dataclass(eq=False)
class Stack:
    """Hospital PACS (HOSPITAL), local Orthanc (CENTRE) and, if separate, a destination (DEST).

    A context manager: leaving the `with` block stops every Orthanc, also on Ctrl-C.
    """

    pacs: OrthancProcess
    centre: OrthancProcess
    dest: OrthancProcess | None = None
    topology: str = "same"

    @property
    def processes(self) -> list[OrthancProcess]:
        return [p for p in (self.pacs, self.centre, self.dest) if p is not None]

    @property
    def destination(self) -> OrthancProcess:
        """Where the C-STOREs land: `dest` in topology "separate", else `centre`."""
        return self.dest if self.dest is not None else self.centre

    @property
    def destination_aet(self) -> str:
        return self.destination.spec.aet

    def stop(self, *, kill: bool = False) -> None:
        """Stop every Orthanc of the stack in parallel (~3 s); safe to call twice.

        `kill=True` sends SIGKILL instead of an orderly shutdown: instant, for throw-away
        stacks such as the tests' session fixtures.
        """
        _stop_all(self.processes, kill=kill)

    def wipe(self) -> None:
        """Delete every patient on every Orthanc of the stack."""
        for process in self.processes:
            process.wipe()

    def reset(self, ready_timeout_s: float = 30) -> None:
        """Restart any Orthanc a test killed, restore planned modalities, wipe all data."""
        for process in self.processes:
            if not process.running:
                process.restart(ready_timeout_s)
        for process in self.processes:
            process.restore_modalities()
            process.wipe()

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_stack(
    workdir: Path,
    topology: str = "same",
    *,
    pacs_command: list[str] | None = None,
    centre_command: list[str] | None = None,
    dest_command: list[str] | None = None,
    extra_config: dict[str, Any] | None = None,
    ready_timeout_s: float = 30,
) -> Stack:
    """Start PACS, local Orthanc (and destination) on loopback; ready when this returns.

    All processes are launched first and then awaited, so start-up costs the slowest
    Orthanc's start, not the sum. `extra_config` is merged into every Orthanc's config.
    """
    if topology not in TOPOLOGIES:
        raise StackError(f"unknown topology {topology!r}: expected one of {', '.join(TOPOLOGIES)}")
    pacs = OrthancSpec.plan("pacs", PACS_AET)
    centre = OrthancSpec.plan("centre", CENTRE_AET)
    dest = OrthancSpec.plan("dest", DEST_AET) if topology == "separate" else None

    plans: list[tuple[OrthancSpec, Modalities, list[str] | None]] = []
    if dest is None:
        plans.append((pacs, {"CENTRE": centre.modality}, pacs_command))
        plans.append((centre, {"PACS": pacs.modality}, centre_command))
    else:
        plans.append((pacs, {"CENTRE": centre.modality, "DEST": dest.modality}, pacs_command))
        plans.append((centre, {"PACS": pacs.modality, "DEST": dest.modality}, centre_command))
        plans.append((dest, {"PACS": pacs.modality}, dest_command))

    launched: list[OrthancProcess] = []
    try:
        for spec, modalities, command in plans:
            launched.append(launch_orthanc(spec, workdir, modalities, extra_config=extra_config, command=command))
    except BaseException:
        _stop_all(launched, kill=True)
        raise
    _wait_all(launched, ready_timeout_s)
    return Stack(
        pacs=launched[0],
        centre=launched[1],
        dest=launched[2] if dest is not None else None,
        topology=topology,
    )
