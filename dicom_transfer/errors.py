"""The one exception hierarchy. Only cli.py turns these into output and exit codes."""

from __future__ import annotations

from pathlib import Path


class DicomTransferError(Exception):
    """Base of every error this tool raises on purpose."""

    exit_code = 2


class ConfigError(DicomTransferError):
    """A config file or option is wrong; the message names the key path."""

    def __init__(self, key: str, reason: str, file: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.file = file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {reason}")


class BatchError(DicomTransferError):
    """One or more problems in a CSV input file, each with file, line and column."""

    def __init__(self, problems: list[BatchProblem], total: int | None = None) -> None:
        self.problems = problems
        self.total = total if total is not None else len(problems)
        super().__init__(self.render())

    def render(self, limit: int = 100) -> str:
        lines = [str(p) for p in self.problems[:limit]]
        if self.total > limit:
            lines.append(f"... and {self.total - limit} more problems ({self.total} in all)")
        return "\n".join(lines)


class BatchProblem:
    """One bad cell or row: `series.csv:14:2: SeriesInstanceUID: '1.2.x' is not a valid UID`."""

    __slots__ = ("file", "line", "column", "field", "reason")

    def __init__(self, file: str, line: int, column: int, field: str | None, reason: str) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        return f"{self.file}:{self.line}:{self.column}:{field} {self.reason}"

    def __repr__(self) -> str:
        return f"BatchProblem({str(self)!r})"


class JournalError(DicomTransferError):
    """The journal cannot be opened, or does not belong to this batch."""


class JournalInUse(JournalError):
    """Another run holds the journal: this one refuses before touching anything (exit 2)."""


class JournalFull(JournalError):
    """The journal's disk is full: the write was rolled back and the run stops (exit 3, resumable).

    What the journal held stays as it was; a proof that could not be written is found again
    by the next run, which counts every series left in flight at the destination first.
    """

    exit_code = 3

    def __init__(self, path: Path, free_bytes: int | None) -> None:
        self.path, self.free_bytes = path, free_bytes
        free = f"{free_bytes / 2**20:.1f} MB free" if free_bytes is not None else "free space unknown"
        super().__init__(
            f"journal {path}: the disk is full ({free} in {path.parent}); the journal is intact and series"
            " in flight are counted at the destination on resume: free space there, then run the same command"
        )


class StateConflict(JournalError):
    """A guarded transition found the row in another state: an internal invariant broke.

    Not bad input (exit 1, never 2): it names the series, the state this run expected
    and the state the journal holds.
    """

    exit_code = 1

    def __init__(self, uid: str, expected: str, found: str | None, event: str) -> None:
        self.uid, self.expected, self.found, self.event = uid, expected, found, event
        found_text = repr(found) if found is not None else "no such row"
        super().__init__(
            f"internal error: series {uid}: event {event!r} expected state {expected!r}, the journal holds"
            f" {found_text}; the journal was changed outside this run's control (nothing was overwritten)"
        )


class IllegalTransition(DicomTransferError):
    """A (state, event) pair that the transition table does not allow."""

    exit_code = 1

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"illegal transition: event {event!r} in state {state!r}")


class OrthancError(DicomTransferError):
    """Orthanc answered with an error; carries status, url and Orthanc's own message."""

    exit_code = 1

    def __init__(
        self,
        status: int | None,
        url: str,
        message: str,
        details: str | None = None,
    ) -> None:
        self.status = status
        self.url = url
        self.message = message
        self.details = details
        code = f"HTTP {status}" if status is not None else "no answer"
        extra = f" ({details})" if details else ""
        super().__init__(f"{url}: {code}: {message}{extra}")


class TransientOrthancError(OrthancError):
    """Connection refused, 5xx, timeout: safe to retry where the call is idempotent."""


class Unreachable(TransientOrthancError):
    """A party did not answer within its retry deadline."""

    exit_code = 3


class Untrusted(Unreachable):
    """An https party whose TLS certificate this machine does not trust: a setting to fix,
    not a network hiccup (no retries, exit 2)."""

    exit_code = 2

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(None, url, f"its TLS certificate is not trusted here ({reason})")
        self.args = (
            f"{url}: TLS certificate not trusted ({reason}): set SSL_CERT_FILE to the CA bundle"
            " (PEM) that signed it, or fix the URL's host name",
        )


class MoveRefused(DicomTransferError):
    """The source refused or failed a C-MOVE; `status` is the DIMSE status when known."""

    exit_code = 1

    def __init__(self, message: str, dimse_status: int | None = None) -> None:
        self.dimse_status = dimse_status
        super().__init__(message)


class DestinationUnknown(DicomTransferError):
    """The source does not know the destination AE title: stop issuing moves."""

    exit_code = 2


class RetrieveRefused(DicomTransferError):
    """The source refuses C-GET as such (transfer.retrieve: get): stop issuing."""

    exit_code = 2
