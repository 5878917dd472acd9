"""Relay mode's second half: series held whole at the local Orthanc go to the destination in bulk.

`transfer.mode: relay` (seed 003's VPN picture: the local Orthanc next to the PACS, the
destination across the tunnel). The PACS's C-MOVE targets the local Orthanc, so its queue
slot is held for a LAN-speed transfer instead of one C-STORE round trip per instance over
the VPN. Once the local count proves the series whole (`held_local`), a worker thread with
its own REST clients forwards it (`forwarding`): ZIP archives of at most `relay.chunk_mb`
read from the local Orthanc (`POST /tools/create-archive`) and uploaded with one
`POST /instances` each (Orthanc stores every instance of a ZIP: one round trip per chunk,
not per instance). Then it counts at the destination; only a whole count there lets it
delete the local copy. Moves go on meanwhile (a pipeline), bounded by `relay.max_local_gb`.

The scheduler's loop stays the only journal writer: it hands a series to the worker after
writing `forward`, and writes what the worker reports (`arrived`, `short`, `lost_local`).
Every step is safe to repeat: a ZIP re-uploaded answers AlreadyStored, and a series found
`forwarding` after a crash is counted at the destination before anything is sent again.
"""

from __future__ import annotations

import heapq
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog

from .config import Config
from .errors import OrthancError, Unreachable
from .flights import Workers
from .orthanc import ForwardTarget, LocalStore
from .pause import Pause

log = structlog.get_logger("dicom_transfer")

DISK_EVERY_S = 1.0  # the local Orthanc's disk use is asked at most this often
DELETE_EVERY_S = 5.0  # a local copy whose delete failed is tried again this often
GB = 10**9


@dataclass(frozen=True)
class Forwarded:
    """What one forward found: `arrived` (destination whole, local copy deleted), `short`, `lost`."""

    uid: str
    outcome: str
    count: int  # at the destination, last counted
    sent: int = 0  # instances uploaded by this forward
    seconds: float = 0.0
    reason: str | None = None
    refused: bool = False  # the destination answered and refused: an attempt is spent
    out: bool = False  # the destination did not take it (down, an error, full): no attempt, the run may pause
    full: bool = False  # ... because its storage is full (HTTP 507)
    deleted: bool = True  # the local copy is gone (False: deleting it failed; it is left behind)


@dataclass
class Held:
    """A series proven whole at the local Orthanc, waiting for (or in) its forward."""

    uid: str
    expected: int
    first_issued_at: float | None
    failures: int = 0  # forwards the destination refused (count toward max_attempts)
    tries: int = 0  # forwards that did not prove it (grow the back-off)
    started_at: float = field(default=0.0)


def chunks(sizes: list[tuple[str, int]], limit: int) -> Iterator[list[str]]:
    """Instance ids in groups whose files add up to at most `limit` bytes (one instance at least)."""
    group: list[str] = []
    total = 0
    for iid, size in sizes:
        if group and total + size > limit:
            yield group
            group, total = [], 0
        group.append(iid)
        total += size
    if group:
        yield group


def forward(local: LocalStore, dest: ForwardTarget, uid: str, expected: int, chunk_bytes: int,
            timeout_s: float) -> Forwarded:  # fmt: skip
    """Send one series from the local Orthanc to the destination; delete it locally once proven there.

    The destination is counted first: a series it already holds whole (a forward that
    ended in a crash) is not sent again, and of one it holds in part (a forward cut short)
    only the instances it lacks are sent.
    """
    started = time.monotonic()
    have = dest.count(uid)
    sent = 0
    if have < expected:
        sizes = local.instance_sizes(uid)
        if len(sizes) < expected:
            reason = f"the local Orthanc holds {len(sizes)} of {expected} instances"
            return Forwarded(uid, "lost", have, reason=reason, seconds=time.monotonic() - started)
        if have:  # the rest only: the link is the slow part
            there = dest.instance_ids(uid)
            sizes = [(iid, size) for iid, size in sizes if iid not in there]
        for group in chunks(sizes, chunk_bytes):
            dest.store_archive(local.archive(group, timeout_s), timeout_s)
            sent += len(group)
        have = dest.count(uid)
    seconds = time.monotonic() - started
    if have < expected:
        reason = f"forward short: {have}/{expected} at the destination"  # it took them and kept too few
        return Forwarded(uid, "short", have, sent, seconds, reason=reason, refused=True)
    try:  # proven whole at the destination: only now may the local copy go
        local.delete_series(uid)
    except (OrthancError, Unreachable) as exc:
        log.warning("relay.delete_failed", series=uid[-10:], error=exc.message)
        return Forwarded(uid, "arrived", have, sent, seconds, deleted=False)
    return Forwarded(uid, "arrived", have, sent, seconds)


class Relay:
    """Held series, the forward worker and the local disk bound; used from the scheduler's thread."""

    def __init__(
        self, cfg: Config, store: LocalStore, dest: ForwardTarget, *, wake: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.store = store  # the scheduler's client to the local Orthanc (counts, disk, reclaim)
        self.dest = dest  # the scheduler's client to the destination (pre-check, reclaim)
        self.clock = clock
        self.wake = wake
        self.chunk_bytes = max(1, int(cfg.relay.chunk_mb * 2**20))
        self.max_bytes = int(cfg.relay.max_local_gb * GB)
        self.held: dict[str, Held] = {}
        self._ready: deque[str] = deque()
        self._later: list[tuple[float, str]] = []  # (due, uid): forwards waiting out a back-off
        self._results: queue.SimpleQueue[Forwarded] = queue.SimpleQueue()
        self._workers = Workers("forward")
        self._clients: tuple[LocalStore, ForwardTarget] | None = None
        self.busy: str | None = None  # the series being forwarded
        self._disk_at = -DISK_EVERY_S
        self.disk_bytes = 0
        self.full_since: float | None = None
        self.out = Pause("destination", clock)  # forwards the destination did not take (down, full)
        self.sent = 0  # instances forwarded by this run
        self.left: dict[str, float] = {}  # complete series whose local delete failed → when to try again

    # -- held series ------------------------------------------------------------------

    def hold(self, uid: str, expected: int, first_issued_at: float | None, at: float | None = None) -> None:
        """Queue a held series for forwarding, now or at `at` (after a back-off)."""
        held = self.held.get(uid)
        if held is None:
            held = self.held[uid] = Held(uid, expected, first_issued_at)
            self._disk_at = float("-inf")  # the local Orthanc grew: the next move looks at its disk first
        held.expected = expected
        if at is None:
            self._ready.append(uid)
        else:
            heapq.heappush(self._later, (at, uid))

    def next_due(self) -> float | None:
        """When the earliest backed-off forward (or the paused destination's probe) is due (None: none waits)."""
        due = [at for at in (self._later[0][0] if self._later else None, self.out.probe_at) if at is not None]
        return min(due) if due else None

    def take(self, now: float) -> Held | None:
        """The next series to forward, when the worker is free and one is due.

        While the destination takes no forward (`out`), the next one waits for the pause's
        probe time (1 s, doubling to 30 s): one series tries, the others wait.
        """
        if self.busy is not None or (self.out and not self.out.due(now)):
            return None
        while self._later and self._later[0][0] <= now:
            self._ready.append(heapq.heappop(self._later)[1])
        while self._ready:
            held = self.held.get(self._ready.popleft())
            if held is not None:
                if self.out:
                    self.out.probe_at = None  # this forward is the probe: a failure sets the next one
                return held
        return None

    @property
    def waiting(self) -> bool:
        return bool(self._ready or self._later or self.busy)

    # -- the worker -------------------------------------------------------------------

    def start(self, held: Held) -> None:
        """Forward `held` on the worker thread; its outcome comes back through `results`."""
        if self._clients is None:
            self._clients = (self.store.clone(), self.dest.clone())
        local, dest = self._clients
        self.busy, held.started_at = held.uid, self.clock()
        args = (local, dest, held.uid, held.expected, self.chunk_bytes, self.cfg.relay.forward_timeout_s)

        def work() -> None:
            try:
                done = forward(*args)
            except (OrthancError, Unreachable) as exc:
                at_dest = exc.url.startswith(dest.url)
                unreachable = isinstance(exc, Unreachable) or exc.status is None or exc.status >= 500
                # Spent: the destination refused, or the local Orthanc answered with an error of its own
                # (a file it cannot read): asking again would go round forever.
                refused = (not unreachable or "refused an instance" in exc.message
                           or (not at_dest and not isinstance(exc, Unreachable)))  # fmt: skip
                out = not refused and at_dest
                done = Forwarded(held.uid, "short", 0, reason=f"forward failed: {exc.message}", refused=refused,
                                 out=out, full=out and exc.status == 507)  # fmt: skip
            except BaseException as exc:  # pragma: no cover - reported, never lost silently
                done = Forwarded(held.uid, "short", 0, reason=f"forward failed: {exc!r}", refused=True)
            self._results.put(done)
            self.wake()

        self._workers.run(work)

    def results(self) -> list[Forwarded]:
        """Forwards finished since the last call (the worker is free again after them)."""
        out: list[Forwarded] = []
        while True:
            try:
                done = self._results.get_nowait()
            except queue.Empty:
                return out
            if done.uid == self.busy:
                self.busy = None
            self.sent += done.sent
            out.append(done)

    def finished(self, uid: str) -> Held | None:
        return self.held.pop(uid, None)

    # -- local copies left behind -----------------------------------------------------

    def left_behind(self, uid: str, now: float) -> None:
        """A series complete at the destination whose local copy could not be deleted: try again later."""
        self.left[uid] = now + DELETE_EVERY_S
        self._disk_at = float("-inf")

    def delete_left(self, now: float, *, all_now: bool = False) -> int:
        """Delete the local copies left behind that are due (all of them with `all_now`); how many went."""
        gone = 0
        for uid, due in list(self.left.items()):
            if not all_now and due > now:
                continue
            try:
                self.store.delete_series(uid)
            except (OrthancError, Unreachable) as exc:
                self.left[uid] = now + DELETE_EVERY_S
                log.info("relay.delete_retry", series=uid[-10:], error=exc.message)
                continue
            del self.left[uid]
            gone += 1
            self._disk_at = float("-inf")  # room again: the bound is looked at before the next move
        return gone

    def close(self) -> None:
        if self._clients is not None:
            for client in self._clients:
                client.close()

    # -- the local disk bound -------------------------------------------------------------

    def full(self, now: float) -> bool:
        """True while the local Orthanc stores at least `relay.max_local_gb`.

        Asked once a second, and before the first move after a series became held there
        (moves are faster than a second: the bound would be passed in between).
        """
        if now - self._disk_at >= DISK_EVERY_S:
            self._disk_at = now
            self.disk_bytes = self.store.disk_bytes()
            full = self.disk_bytes >= self.max_bytes
            if full and self.full_since is None:
                self.full_since = now
                log.info("relay.local_full", used_gb=round(self.disk_bytes / GB, 2), max_gb=self.cfg.relay.max_local_gb,
                         held=len(self.held))  # fmt: skip
            elif not full and self.full_since is not None:
                log.info("relay.local_room", waited_s=round(now - self.full_since, 1))
                self.full_since = None
        return self.full_since is not None

    def gone(self, now: float, limit_s: float, moves_left: bool) -> str | None:
        """The stop reason when the destination has taken no forward for longer than `limit_s`.

        Moves go on meanwhile (the local Orthanc stores what the PACS sends, up to
        `relay.max_local_gb`); the run stops once nothing else can be done: no move left,
        or the local bound reached. What is held stays whole at the local Orthanc.
        """
        if not self.out.too_long(now, limit_s) or self.busy is not None:
            return None
        if moves_left and self.full_since is None:
            return None
        return (
            f"the destination took no forward for {now - (self.out.since or now):.0f} s ({self.out.why});"
            f" {len(self.held)} series wait, held whole at the local Orthanc: the same command forwards them"
            " once the destination stores again"
        )

    def stuck(self, now: float, limit_s: float) -> str | None:
        """The stop reason when the bound is held by data not ours for longer than `limit_s`.

        Moves wait for forwards to free the local Orthanc; with nothing of this run's held
        there and none being forwarded, no forward ever will: waiting all night would move
        nothing (the same rule as a party out longer than `transfer.unreachable_s`).
        """
        if self.full_since is None or self.held or self.busy is not None or now - self.full_since < limit_s:
            return None
        return (
            f"the local Orthanc stores {self.disk_bytes / GB:.2f} GB, at least relay.max_local_gb"
            f" ({self.cfg.relay.max_local_gb:g}), and none of it is this run's to forward"
            f" (waited {now - self.full_since:.0f} s): free space there or raise relay.max_local_gb"
        )
