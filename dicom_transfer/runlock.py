"""Exclusive use across processes: one run per journal, one move per series per machine.

Both are OS locks that die with the process (kill -9 included), never PID files:

- `JournalLock`: `flock` on `<journal>.lock` beside the journal, held for the run's
  lifetime. A second run on the same journal refuses at once, naming the holder (pid,
  start time, host, written into the lock file once it is held).
- `SeriesClaims`: a POSIX byte-range lock per series in flight, in one file per
  destination (`<tmp>/dicom-transfer/claims-<digest>`), so that two runs on *different*
  journals that list the same series do not move it at the same time. Byte 0 is held
  shared by every run, so a run can tell cheaply whether any other run to the same
  destination is alive (then it counts at the destination before each move).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from .errors import JournalInUse

log = structlog.get_logger("dicom_transfer")


def lock_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".lock")


def holder(journal: Path) -> dict[str, Any] | None:
    """Who holds the journal's lock, as written by the holder (None: nobody, or unknown).

    Read-only and lock-free (status uses it beside a run): the pid is checked to be alive
    on this host, so a lock file left by a killed run reads as nobody.
    """
    try:
        info = json.loads(lock_path(journal).read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    if info.get("host") == socket.gethostname():
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return info


class JournalLock:
    """`flock` on `<journal>.lock` for the lifetime of a run (a context manager)."""

    def __init__(self, journal: Path, *, clock: Any = time.time) -> None:
        self.journal = Path(journal)
        self.path = lock_path(self.journal)
        self.clock = clock
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise JournalInUse naming the holder; writes nothing else."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JournalInUse(self._in_use_message()) from None
            # The holder before us may have unlinked the file between our open and our
            # flock: a lock on a removed inode protects nothing. Open the path again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "started_at": self.clock(), "host": socket.gethostname()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only the holder's name is missing
            pass
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go (kill -9 skips this: harmless)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def _in_use_message(self) -> str:
        info = holder(self.journal) or {}
        when = info.get("started_at")
        started = time.strftime("%H:%M:%S", time.localtime(when)) if isinstance(when, int | float) else "?"
        who = f"pid {info.get('pid', '?')}, started {started} on host {info.get('host', '?')}"
        return (
            f"journal {self.journal} is in use by another run ({who});"
            f" status: main.py status --journal {self.journal}"
        )

    def __enter__(self) -> JournalLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claims_path(destination: str) -> Path:
    digest = hashlib.sha256(destination.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "dicom-transfer" / f"claims-{digest}"


class SeriesClaims:
    """Series in flight on this machine, per destination: a byte-range lock per series.

    POSIX record locks belong to the process (threads share them) and vanish with it.
    A hash collision between two series only makes one wait for the other's move.
    """

    SPAN = 2**31 - 2

    def __init__(self, destination: str) -> None:
        self.path = claims_path(destination)
        self.fd: int | None = None
        self.held: set[str] = set()
        try:
            self.path.parent.mkdir(mode=0o1777, parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.lockf(self.fd, fcntl.LOCK_SH, 1, 0)  # "a run to this destination is alive"
        except OSError as exc:  # no shared temp dir: runs are then not coordinated
            log.warning("claims.unavailable", path=str(self.path), error=str(exc))
            self.close()

    def _offset(self, uid: str) -> int:
        return 1 + int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big") % self.SPAN

    def others(self) -> bool:
        """Whether another live process uses the same destination (a non-blocking test of byte 0)."""
        if self.fd is None:
            return False
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            return True
        fcntl.lockf(self.fd, fcntl.LOCK_SH, 1, 0)  # back to shared: others may join
        return False

    def take(self, uid: str) -> bool:
        """Claim `uid` for a move; False when another process has it in flight."""
        if self.fd is None or uid in self.held:
            return True
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(uid))
        except OSError:
            return False
        self.held.add(uid)
        return True

    def release(self, uid: str) -> None:
        if self.fd is None or uid not in self.held:
            return
        self.held.discard(uid)
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._offset(uid))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.held.clear()
