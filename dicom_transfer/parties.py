"""The two parties that may stop serving mid-run: the source unreachable, the destination full.

Neither is a series' fault: moves wait (`IssuePolicy`'s pauses, `pause.py`), no attempt is
spent, each party is probed on a capped back-off (the source with a C-ECHO, the
destination by its own storage figures), and every pause and resume is a journal event
and one log line. The scheduler asks `source_up`/`destination_up` before it issues.
"""

from __future__ import annotations

import structlog

from .config import Config
from .errors import OrthancError, Unreachable
from .flights import Flight
from .issuing import IssuePolicy
from .journal import Journal
from .orthanc import Destination, LocalOrthanc, is_association_failure

log = structlog.get_logger("dicom_transfer")

# Series in a row whose moves the PACS answered with a failure (0xCxxx) and of which nothing
# arrived, once series have arrived before: the destination (its disk, or the PACS's route
# to it) stopped storing, not the series. An Orthanc PACS answers 0xC000 when every C-STORE
# failed, whatever the cause; one such series is its own problem, three in a row are not.
EMPTY_STREAK = 3


class Parties:
    """Pause, probe and resume for the source and the destination."""

    def __init__(
        self, cfg: Config, journal: Journal, local: LocalOrthanc, dest: Destination, policy: IssuePolicy
    ) -> None:
        self.cfg, self.journal, self.local, self.dest, self.policy = cfg, journal, local, dest, policy
        self.stored = journal.counts()["complete"] > 0  # the destination has stored series of this batch
        self.empty: dict[str, None] = {}  # series in a row whose moves failed with nothing arriving

    # -- the source unreachable: pause, probe, resume (attempts are not spent) --------

    def source_failure(self, text: str | None) -> bool:
        """Whether `text` says the PACS could not be reached at all; if so, pause the run."""
        if not is_association_failure(text):
            return False
        if self.policy.source.begin((text or "")[:300]):
            self.journal.record("source.unreachable", {"error": (text or "")[:300]})
            log.warning("source.unreachable", error=(text or "")[:200])
        return True

    def source_up(self, now: float) -> bool:
        """False while the source is down; probes it with a C-ECHO on a capped back-off."""
        pause = self.policy.source
        if not pause:
            return True
        if not pause.due(now):
            return False
        try:
            self.local.echo(self.cfg.source.modality)
        except Unreachable:
            raise
        except OrthancError:
            pause.probe_failed(now)
            return False
        down_s = round(pause.end(), 1)
        self.journal.record("source.reachable", {"down_s": down_s})
        log.info("source.reachable", down_s=down_s)
        return True

    # -- the destination full: pause, probe, resume (attempts are not spent) ------------

    def destination_refuses(self, flight: Flight) -> str | None:
        """Why the destination stored nothing (or too little) of a short move; if it is the cause, pause the run.

        Its own figures (MaximumStorageSize with mode Reject), or the PACS's answer: C-MOVE
        Warning 0xB000 (sub-operations failed) with nothing arriving means every C-STORE
        to the destination was refused; so do EMPTY_STREAK failed moves in a row with
        nothing arriving, once series have arrived (a disk that filled up without a limit:
        the destination cannot say so). None when the destination is not the cause.
        """
        full = self._storage_full()
        empty = flight.count <= flight.baseline
        if full is None and flight.job_dimse == 0xB000 and empty:
            full = f"the PACS reported every C-STORE to {self.cfg.destination.aet} failed (C-MOVE status 0xB000)"
        if full is None:
            full = self._stores_nothing(flight, empty)
        if full is not None and self.policy.destination.begin(full):
            self.journal.record("destination.full", {"why": full})
            log.warning("destination.full", why=full, destination=self.cfg.destination.aet)
        return full

    def destination_up(self, now: float) -> bool:
        """False while the destination cannot store; probes its figures on a capped back-off.

        When its figures cannot tell (a refusal seen only in the PACS's answer), the next
        move is the probe: the pause ends once a series arrives, and a move refused again
        costs no attempt.
        """
        pause = self.policy.destination
        if not pause or pause.probe_at is None:
            return True
        if not pause.due(now):
            return False
        full = self._storage_full()
        if full is not None:
            pause.why = full
            pause.probe_failed(now)
            return False
        pause.probe_at = None  # moves go out again; the first series that arrives ends the pause
        self.journal.record("destination.retry", {"paused_s": round(now - (pause.since or now), 1)})
        log.info("destination.retry", paused_s=round(now - (pause.since or now), 1))
        return True

    def _stores_nothing(self, flight: Flight, empty: bool) -> str | None:
        """The streak rule (EMPTY_STREAK): why the destination looks unable to store, or None."""
        failed = flight.job_dimse is not None and 0xC000 <= flight.job_dimse <= 0xCFFF
        if not (empty and failed):
            self.empty.clear()  # something arrived, or the PACS said something else: no streak
            return None
        self.empty[flight.uid] = None
        if not self.policy.destination and not (self.stored and len(self.empty) >= EMPTY_STREAK):
            return None
        where = "the local Orthanc" if self.cfg.relay_mode else self.cfg.destination.aet  # where moves land
        return (
            f"the last {len(self.empty)} series moved delivered nothing, each answered"
            f" 0x{flight.job_dimse:04X} by the PACS, after earlier series arrived: {where}"
            " may be out of disk space or unreachable from the PACS"
        )

    def destination_stores(self) -> None:
        """A series arrived: the destination stores again (ends its pause)."""
        self.stored = True
        self.empty.clear()
        if self.policy.destination:
            paused_s = round(self.policy.destination.end(), 1)
            self.journal.record("destination.stores", {"paused_s": paused_s})
            log.info("destination.stores", paused_s=paused_s)

    def _storage_full(self) -> str | None:
        """The destination's own word on its storage (None: room, or it cannot tell, or it erred)."""
        try:
            return self.dest.storage_full()
        except Unreachable:
            raise
        except OrthancError:
            return None
