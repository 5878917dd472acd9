"""A pynetdicom Q/R SCP that misbehaves on purpose: the hospital PACS of our tests.

`MisbehavingPacs` serves in-memory synthetic series (`dicom_transfer.synthetic`) on
127.0.0.1 with C-ECHO, C-FIND (Study Root and Patient Root, PATIENT to IMAGE level,
relational: a SERIES query without its StudyInstanceUID is answered) and C-MOVE (STUDY,
SERIES, IMAGE and, in Patient Root, PATIENT level), sending the instances with C-STORE
sub-operations to an AE title it resolves from `destinations`. Every socket it opens
gets TCP_NODELAY (without it a 50-instance move takes ~2.5 s instead of ~0.35 s).

    with MisbehavingPacs(make_series(3, 4), async_mode=True, queue_size=2) as pacs:
        pacs.register_in(stack.centre)  # PUT /modalities/BADPACS; CENTRE becomes a destination
        ...                              # source.modality: BADPACS
        assert pacs.dropped[series_uid] == 1

Fault modes are plain attributes, read once per request, so a test may change them while
the server runs (`pacs.configure(refuse_every=2)` or `pacs.hang = False`):

- `async_mode`, `queue_size`, `workers`: answer every C-MOVE at once with Success and
  0 sub-operations and send later from a queue served by `workers` threads, one move at
  a time each. A move that finds `queue_size` moves waiting *or being sent* is still
  answered Success and silently dropped. `paused` keeps the workers from starting moves.
- `partial_first=K`: the first *served* move of each series (refused or dropped moves do
  not count) sends only that series' first K instances, then answers Success, or Warning
  0xB000 (remaining ones listed as failed) when `partial_warning`. Later moves send all.
- `refuse_every=M`: the Mth, 2Mth... C-MOVE request received is answered `refuse_status`
  (default 0xA702, out of resources); nothing is sent.
- `refuse_image_move`: an IMAGE-level C-MOVE is answered 0xC000.
- `abort_after=N`: after N C-STOREs of a series' first served move (every move when
  `abort_always`) the C-MOVE association is aborted (A-ABORT). In `async_mode` the move
  was answered already, so the C-STORE association is aborted instead.
- `hang`: a C-MOVE is neither answered nor served while `hang` is true; it proceeds when
  `hang` is cleared, and is aborted when the requestor gives up or the PACS stops.
- `store_delay_s`: sleep before each C-STORE.
- `list_find_delay_s`: sleep before answering a C-FIND whose identifier holds a list of
  SeriesInstanceUIDs (a slow PACS, or one far away over a VPN).
- `refuse_image_find` (status `refuse_image_find_status`, default 0xC000), `omit_counts`
  (NumberOf*Related* returned empty), `hierarchical` (a query without the unique keys of
  the levels above is refused 0xC000, as DCMTK's dcmqrscp does), `uid_lists=False` (a
  unique key holding several UIDs matches nothing, as PACS without list matching answer).
- An unknown move destination is answered 0xA801 (pynetdicom's own handling).

Known wart: pynetdicom's C-MOVE protocol opens the C-STORE association before the handler
can choose a final status, so a refused move (A702, C000) opens and releases an empty
association to the destination; nothing is stored.

Counters (collections.Counter, updated under a lock; `snapshot()` copies them):
`moves[series]` (C-MOVE requests naming the series, whatever became of them),
`served[series]`, `sent[series]` and `sent_sop[sop]` (C-STOREs issued), `dropped[series]`,
`refused[series]`; `log` holds `(time.monotonic(), event, series_uid)` tuples, events
find, move, unknown-destination, hang, refused, queued, dropped, served, store, aborted,
done; `errors` holds exceptions raised in handlers (pynetdicom answers them with a failure
status; the server keeps running).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_transfer.stack import HOST, free_port
from dicom_transfer.synthetic import SyntheticSeries, instance_dataset

# Statuses (PS3.4 C.4.1.1.4, C.4.2.1.5)
SUCCESS, PENDING, CANCELLED = 0x0000, 0xFF00, 0xFE00
WARNING_SUBOPS = 0xB000
OUT_OF_RESOURCES_SUBOPS = 0xA702
UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801  # answered by pynetdicom when the handler yields (None, None)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_RANK = {level: rank for rank, level in enumerate(LEVELS)}
_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_MODELS = {
    StudyRootQueryRetrieveInformationModelFind: "study",
    StudyRootQueryRetrieveInformationModelMove: "study",
    PatientRootQueryRetrieveInformationModelFind: "patient",
    PatientRootQueryRetrieveInformationModelMove: "patient",
}
_MODEL_TOP = {"study": "STUDY", "patient": "PATIENT"}

# The level each attribute belongs to; anything else in an instance's header is IMAGE.
_KEY_LEVEL = {
    **dict.fromkeys(
        "PatientID PatientName PatientBirthDate PatientSex NumberOfPatientRelatedStudies"
        " NumberOfPatientRelatedSeries NumberOfPatientRelatedInstances".split(),
        0,
    ),
    **dict.fromkeys(
        "StudyInstanceUID StudyDate StudyTime StudyID AccessionNumber StudyDescription ReferringPhysicianName"
        " ModalitiesInStudy SOPClassesInStudy NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances".split(),
        1,
    ),
    **dict.fromkeys(
        "SeriesInstanceUID Modality SeriesNumber SeriesDescription SeriesDate SeriesTime BodyPartExamined"
        " Manufacturer NumberOfSeriesRelatedInstances".split(),
        2,
    ),
}
_COUNT_KEYS = frozenset(k for k in _KEY_LEVEL if k.startswith("NumberOf"))
_NOT_MATCHED = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"})
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"})

_FAULTS = frozenset(
    {
        "async_mode", "queue_size", "partial_first", "partial_warning", "refuse_every", "refuse_status",
        "abort_after", "abort_always", "hang", "store_delay_s", "list_find_delay_s", "refuse_image_move",
        "refuse_image_find", "refuse_image_find_status", "omit_counts", "hierarchical", "uid_lists", "paused",
    }
)  # fmt: skip

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Quiet pynetdicom (its logger is process-wide: counted, restored when the last one stops)

_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_saved_level = logging.NOTSET


def _quiet(on: bool) -> None:
    global _quiet_users, _quiet_saved_level
    logger = logging.getLogger("pynetdicom")
    with _quiet_lock:
        if on:
            if _quiet_users == 0:
                _quiet_saved_level = logger.level
                logger.setLevel(logging.CRITICAL)
            _quiet_users += 1
        elif _quiet_users > 0:
            _quiet_users -= 1
            if _quiet_users == 0:
                logger.setLevel(_quiet_saved_level)


class _QuickServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, polling for shutdown every 50 ms instead of 500 ms."""

    def serve_forever(self, poll_interval: float = 0.05) -> None:
        super().serve_forever(poll_interval)

    def shutdown(self) -> None:
        # Started by us, not by AE.start_server: the AE's list of servers does not hold it.
        with contextlib.suppress(ValueError):
            super().shutdown()


def _nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY, or every DIMSE round trip may wait for a delayed ACK."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


_NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, _nodelay)]


# ---------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class _Entity:
    """One C-FIND/C-MOVE match: a patient, study, series (all its series) or one image."""

    level: str
    series: tuple[SyntheticSeries, ...]
    index: int = 0  # IMAGE: the instance; otherwise the representative instance of series[0]

    @property
    def instances(self) -> list[tuple[SyntheticSeries, int]]:
        if self.level == "IMAGE":
            return [(self.series[0], self.index)]
        return [(s, i) for s in self.series for i in range(len(s.sop_uids))]


def _values(value: Any) -> list[str]:
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


_wildcards: dict[tuple[str, bool], re.Pattern[str]] = {}


def _wildcard(pattern: str, fold: bool) -> re.Pattern[str]:
    key = (pattern, fold)
    if key not in _wildcards:
        body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        _wildcards[key] = re.compile(body, re.IGNORECASE | re.DOTALL if fold else re.DOTALL)
    return _wildcards[key]


def _one_matches(vr: str, query: str, actual: str) -> bool:
    """DICOM single value, wildcard and range matching (PS3.4 C.2.2.2), simplified."""
    query, actual = query.strip(), actual.strip()
    if vr in ("DA", "TM", "DT") and "-" in query:
        low, _, high = query.partition("-")
        return (not low or actual >= low) and (not high or actual <= high)
    if vr in _NUMERIC_VRS:
        try:
            return float(query) == float(actual)
        except ValueError:
            return False
    if "*" in query or "?" in query:
        return _wildcard(query, vr == "PN").fullmatch(actual) is not None
    return query.casefold() == actual.casefold() if vr == "PN" else query == actual


def value_matches(vr: str, query: Any, actual: Any) -> bool:
    """A query value (UID lists with backslash, wildcards, ranges) against a stored value."""
    return any(_one_matches(vr, q, a) for q in _values(query) for a in _values(actual))


def _key_rank(keyword: str) -> int:
    return _KEY_LEVEL.get(keyword, _RANK["IMAGE"])


def _wanted(identifier: Dataset, keyword: str) -> Any:
    """The query value of a key, or None when absent or empty (universal matching)."""
    tag = tag_for_keyword(keyword)
    elem = identifier.get(tag) if tag is not None else None
    if elem is None or elem.is_empty:
        return None
    return elem.value


# ---------------------------------------------------------------------------------------
# Moves


@dataclass
class _Move:
    number: int
    level: str
    dest_aet: str
    address: tuple[str, int] | None
    instances: list[tuple[SyntheticSeries, int]]
    series_uids: list[str]
    plan_send: list[tuple[SyntheticSeries, int]] = field(default_factory=list)
    abort_at: int | None = None
    warning: bool = False


class MisbehavingPacs:
    """A Q/R SCP on 127.0.0.1 serving `series`, with fault modes for the tests (see module doc)."""

    def __init__(
        self,
        series: Iterable[SyntheticSeries] = (),
        *,
        aet: str = "BADPACS",
        host: str = HOST,
        port: int | None = None,
        destinations: Mapping[str, tuple[str, int]] | None = None,
        workers: int = 1,
        quiet: bool = True,
        async_mode: bool = False,
        queue_size: int | None = None,
        partial_first: int | None = None,
        partial_warning: bool = False,
        refuse_every: int | None = None,
        refuse_status: int = OUT_OF_RESOURCES_SUBOPS,
        abort_after: int | None = None,
        abort_always: bool = False,
        hang: bool = False,
        store_delay_s: float = 0.0,
        list_find_delay_s: float = 0.0,
        refuse_image_move: bool = False,
        refuse_image_find: bool = False,
        refuse_image_find_status: int = UNABLE_TO_PROCESS,
        omit_counts: bool = False,
        hierarchical: bool = False,
        uid_lists: bool = True,
        paused: bool = False,
    ) -> None:
        self.aet = aet
        self.host = host
        self.port = port or 0
        self.destinations: dict[str, tuple[str, int]] = dict(destinations or {})
        self.workers = max(1, workers)
        self.quiet = quiet
        # fault modes (see the module docstring)
        self.async_mode = async_mode
        self.queue_size = queue_size
        self.partial_first = partial_first
        self.partial_warning = partial_warning
        self.refuse_every = refuse_every
        self.refuse_status = refuse_status
        self.abort_after = abort_after
        self.abort_always = abort_always
        self.hang = hang
        self.store_delay_s = store_delay_s
        self.list_find_delay_s = list_find_delay_s
        self.refuse_image_move = refuse_image_move
        self.refuse_image_find = refuse_image_find
        self.refuse_image_find_status = refuse_image_find_status
        self.omit_counts = omit_counts
        self.hierarchical = hierarchical
        self.uid_lists = uid_lists

        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._paused = paused
        self._series: dict[str, SyntheticSeries] = {}
        self._headers: dict[tuple[str, int], Dataset] = {}
        self._queue: deque[_Move] = deque()
        self._in_progress = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ae: AE | None = None
        self._server: Any = None
        self.reset_counters()
        self.add_series(series)

    # -- data and configuration -----------------------------------------------------------

    def add_series(self, series: Iterable[SyntheticSeries]) -> None:
        """Serve more series (in this order in C-FIND answers); safe while running."""
        with self._lock:
            for s in series:
                self._series[s.series_uid] = s

    @property
    def series(self) -> list[SyntheticSeries]:
        with self._lock:
            return list(self._series.values())

    def add_destination(self, aet: str, host: str, port: int) -> None:
        with self._lock:
            self.destinations[aet] = (host, int(port))

    def configure(self, **faults: Any) -> None:
        """Change fault modes at once, under the lock (unknown names raise TypeError)."""
        unknown = set(faults) - _FAULTS
        if unknown:
            raise TypeError(f"unknown fault mode(s): {', '.join(sorted(unknown))}")
        with self._cv:
            for name, value in faults.items():
                setattr(self, name, value)
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        """While true, async workers start no queued move (the queue still fills and drops)."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        with self._cv:
            self._paused = bool(value)
            self._cv.notify_all()

    def reset_counters(self) -> None:
        """Zero every counter (and the request numbers `refuse_every` counts), clear log and errors."""
        with self._lock:
            self.move_requests = 0
            self.find_requests = 0
            self.moves: Counter[str] = Counter()
            self.served: Counter[str] = Counter()
            self.sent: Counter[str] = Counter()
            self.sent_sop: Counter[str] = Counter()
            self.dropped: Counter[str] = Counter()
            self.refused: Counter[str] = Counter()
            self.log: list[tuple[float, str, str]] = []
            self.errors: list[BaseException] = []

    def snapshot(self) -> dict[str, Any]:
        """Copies of every counter, taken under the lock."""
        with self._lock:
            return {
                "moves": dict(self.moves),
                "served": dict(self.served),
                "sent": dict(self.sent),
                "sent_sop": dict(self.sent_sop),
                "dropped": dict(self.dropped),
                "refused": dict(self.refused),
                "move_requests": self.move_requests,
                "find_requests": self.find_requests,
                "queued": len(self._queue),
                "in_progress": self._in_progress,
                "log": list(self.log),
                "errors": list(self.errors),
            }

    def events(self, name: str) -> list[str]:
        """Series UIDs of every `log` entry with this event name, in order."""
        with self._lock:
            return [uid for _, event, uid in self.log if event == name]

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the async queue is empty and no move is being sent."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and self._in_progress == 0, timeout)

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> MisbehavingPacs:
        if self._server is not None:
            return self
        if self.quiet:
            _quiet(True)
        self._stopping.clear()
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(Verification)
        for model in _MODELS:
            ae.add_supported_context(model)
        # The C-STORE sub-operations (synthetic instances are Explicit VR Little Endian).
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.acse_timeout = 10
        ae.dimse_timeout = 30
        ae.network_timeout = 60
        ae.connection_timeout = 5
        ae.maximum_associations = 32
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            *_NODELAY_HANDLERS,
        ]
        try:
            self._server = self._bind(ae, handlers)
        except BaseException:
            if self.quiet:
                _quiet(False)
            raise
        self._ae = ae
        self._threads = [
            threading.Thread(target=self._worker, name=f"{self.aet}-move-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _bind(self, ae: AE, handlers: list[Any]) -> Any:
        fixed = bool(self.port)
        for attempt in range(5):
            port = self.port if fixed else free_port()
            try:
                server = ae.make_server((self.host, port), evt_handlers=handlers, server_class=_QuickServer)
            except OSError:
                if fixed or attempt == 4:
                    raise
                continue
            self.port = port
            threading.Thread(target=server.serve_forever, name=f"{self.aet}-server", daemon=True).start()
            return server
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 5.0) -> None:
        """Release hung moves, drop the queue, abort associations, stop server and workers."""
        if self._server is None:
            return
        self._stopping.set()
        with self._cv:
            self._queue.clear()
            self._cv.notify_all()
        ae, server = self._ae, self._server
        try:
            if ae is not None:
                ae.shutdown()  # aborts every association
            server.shutdown()  # stops accepting and closes the listening socket
        finally:
            deadline = time.monotonic() + timeout
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            while ae is not None and ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.02)
            self._server = None
            self._ae = None
            self._threads = []
            if self.quiet:
                _quiet(False)

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> MisbehavingPacs:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def register_in(self, orthanc: Any, name: str = "BADPACS", *, destination: bool = True) -> None:
        """`PUT /modalities/{name}` on an Orthanc (an OrthancProcess or an OrthancRest).

        With `destination`, an OrthancProcess is also added to `destinations` under its
        own AE title, so C-MOVEs to it work.
        """
        rest = getattr(orthanc, "rest", orthanc)
        rest.put(f"/modalities/{name}", {"AET": self.aet, "Host": self.host, "Port": self.port})
        spec = getattr(orthanc, "spec", None)
        if destination and spec is not None:
            self.add_destination(spec.aet, HOST, spec.dicom_port)

    # -- bookkeeping ----------------------------------------------------------------------

    def _note(self, event: str, series_uids: Iterable[str] = ("",), counter: Counter[str] | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            for uid in series_uids:
                self.log.append((now, event, uid))
                if counter is not None and uid:
                    counter[uid] += 1

    def _error(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)
        _log.debug("%s: handler error: %r", self.aet, exc)

    def _header(self, series: SyntheticSeries, index: int) -> Dataset:
        key = (series.series_uid, index)
        header = self._headers.get(key)
        if header is None:
            header = instance_dataset(series, index)
            del header.PixelData
            self._headers[key] = header
        return header

    # -- matching -------------------------------------------------------------------------

    def _select(self, identifier: Dataset, level: str, *, unique_only: bool) -> list[_Entity]:
        rank = _RANK[level]
        if not self.uid_lists and any(len(_values(_wanted(identifier, k) or "")) > 1 for k in _UNIQUE.values()):
            return []
        chosen = [s for s in self.series if s.sop_uids and self._unique_ok(s, identifier, rank)]
        if level == "IMAGE":
            sops = _wanted(identifier, "SOPInstanceUID")
            entities = [
                _Entity(level, (s,), i)
                for s in chosen
                for i, sop in enumerate(s.sop_uids)
                if sops is None or value_matches("UI", sops, sop)
            ]
        else:
            key = {"PATIENT": "patient_id", "STUDY": "study_uid", "SERIES": "series_uid"}[level]
            groups: dict[str, list[SyntheticSeries]] = {}
            for s in chosen:
                groups.setdefault(getattr(s, key), []).append(s)
            entities = [_Entity(level, tuple(group)) for group in groups.values()]
        if unique_only:
            return entities
        return [e for e in entities if self._attributes_ok(e, identifier)]

    @staticmethod
    def _unique_ok(series: SyntheticSeries, identifier: Dataset, rank: int) -> bool:
        checks = (("PatientID", series.patient_id, "LO"), ("StudyInstanceUID", series.study_uid, "UI"),
                  ("SeriesInstanceUID", series.series_uid, "UI"))  # fmt: skip
        for key_rank, (keyword, actual, vr) in enumerate(checks):
            wanted = _wanted(identifier, keyword) if key_rank <= rank else None
            if wanted is not None and not value_matches(vr, wanted, actual):
                return False
        return True

    def _attributes_ok(self, entity: _Entity, identifier: Dataset) -> bool:
        rank = _RANK[entity.level]
        for elem in identifier:
            keyword = elem.keyword
            if (
                not keyword
                or elem.tag.group == 0x0002  # Orthanc 1.10 puts MediaStorageSOPInstanceUID in IMAGE queries
                or keyword in _NOT_MATCHED
                or keyword in _UNIQUE.values()
                or elem.VR == "SQ"
                or elem.is_empty
                or _key_rank(keyword) > rank
            ):
                continue
            actual = self._value(entity, keyword)
            if actual is None or actual == "" or not value_matches(elem.VR, elem.value, actual):
                return False
        return True

    def _value(self, entity: _Entity, keyword: str) -> Any:
        """The entity's value of an attribute (counts computed), or None if unknown."""
        if keyword in _COUNT_KEYS:
            return "" if self.omit_counts else self._count(entity, keyword)
        if keyword == "ModalitiesInStudy":
            return sorted({s.modality for s in entity.series})
        if keyword == "SOPClassesInStudy":
            return [str(CTImageStorage)]
        if keyword == "RetrieveAETitle":
            return self.aet
        if keyword == "InstanceAvailability":
            return "ONLINE"
        header = self._header(entity.series[0], entity.index)
        return header[keyword].value if keyword in header else None

    @staticmethod
    def _count(entity: _Entity, keyword: str) -> int:
        if keyword.endswith("Instances"):
            return sum(len(s.sop_uids) for s in entity.series)
        if keyword.endswith("Series"):
            return len(entity.series)
        return len({s.study_uid for s in entity.series})  # ...RelatedStudies

    def _answer(self, entity: _Entity, identifier: Dataset, model: str) -> Dataset:
        rank = _RANK[entity.level]
        answer = Dataset()
        for elem in identifier:
            keyword = elem.keyword
            if not keyword or keyword == "QueryRetrieveLevel" or elem.tag.group == 0x0002:
                continue
            if keyword == "SpecificCharacterSet":
                answer.SpecificCharacterSet = "ISO_IR 100"
                continue
            vr = elem.VR if elem.VR not in ("UN", None) else dictionary_VR(elem.tag)
            if vr == "SQ":
                answer.add_new(elem.tag, "SQ", [])
                continue
            value = self._value(entity, keyword) if _key_rank(keyword) <= rank else None
            answer.add_new(elem.tag, vr, "" if value is None else value)
        answer.QueryRetrieveLevel = entity.level
        # The unique keys of the query level and above, requested or not (relational answers).
        for level in LEVELS[_RANK[_MODEL_TOP[model]] : rank + 1]:
            keyword = _UNIQUE[level]
            if keyword not in answer:
                setattr(answer, keyword, self._value(entity, keyword))
        return answer

    def _hierarchy_ok(self, identifier: Dataset, level: str, model: str) -> bool:
        """Hierarchical SCPs want one UID (not a list) for each level above the query's."""
        if not self.hierarchical:
            return True
        for above in LEVELS[_RANK[_MODEL_TOP[model]] : _RANK[level]]:
            wanted = _wanted(identifier, _UNIQUE[above])
            if wanted is None or len(_values(wanted)) != 1 or "*" in str(wanted) or "?" in str(wanted):
                return False
        return True

    @staticmethod
    def _level(identifier: Dataset, model: str) -> str:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in LEVELS or _RANK[level] < _RANK[_MODEL_TOP[model]]:
            raise ValueError(f"QueryRetrieveLevel {level!r} is not valid in the {model} root model")
        return level

    # -- DIMSE handlers -------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            identifier = event.identifier
            model = _MODELS.get(event.context.abstract_syntax, "study")
            level = self._level(identifier, model)
            with self._lock:
                self.find_requests += 1
            self._note("find", [str(identifier.get("SeriesInstanceUID", "") or "")])
            if self.list_find_delay_s and len(_values(identifier.get("SeriesInstanceUID", ""))) > 1:
                self._note("list-find")
                self._stopping.wait(self.list_find_delay_s)
            if level == "IMAGE" and self.refuse_image_find:
                yield self.refuse_image_find_status, None
                return
            if not self._hierarchy_ok(identifier, level, model):
                yield UNABLE_TO_PROCESS, None
                return
            entities = self._select(identifier, level, unique_only=False)
            for entity in entities:
                if event.is_cancelled:
                    yield CANCELLED, None
                    return
                yield PENDING, self._answer(entity, identifier, model)
        except Exception as exc:  # pynetdicom would answer too; we also keep it for the tests
            self._error(exc)
            yield UNABLE_TO_PROCESS, None

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        try:
            yield from self._move_steps(event)
        except Exception as exc:
            self._error(exc)
            raise  # pynetdicom answers with a failure status (0xC5xx) and keeps serving

    def _move_steps(self, event: evt.Event) -> Iterator[Any]:
        # pynetdicom's protocol: yield the destination (addr, port[, kwargs]) or (None, None)
        # for A801, then the number of sub-operations, then (status, dataset) pairs: Pending
        # with a dataset is one C-STORE, any other status is the final answer.
        move = self._accept_move(event)
        if move.address is None:
            self._note("unknown-destination", move.series_uids or [""])
            yield None, None
            return
        if not self._hold(move, event.assoc):
            self._abort(event.assoc, move)
            yield None, None  # the association is gone: pynetdicom sends nothing
            return
        destination = (*move.address, {"evt_handlers": _NODELAY_HANDLERS})
        status = self._refusal(move)
        if status is not None:
            self._note("refused", move.series_uids or [""], self.refused)
            yield destination
            yield 1
            yield status, None
            return
        if self.async_mode:
            self._enqueue(move)
            yield destination
            yield 0  # Success, 0 sub-operations: "queued"
            return
        yield destination
        yield len(move.instances)
        yield from self._serve_in_handler(move, event.assoc)

    def _accept_move(self, event: evt.Event) -> _Move:
        identifier = event.identifier
        model = _MODELS.get(event.context.abstract_syntax, "study")
        level = self._level(identifier, model)
        dest_aet = str(event.move_destination or "").strip()
        instances = [i for e in self._select(identifier, level, unique_only=True) for i in e.instances]
        series_uids = list(dict.fromkeys(s.series_uid for s, _ in instances))
        with self._lock:
            self.move_requests += 1
            number = self.move_requests
            address = self.destinations.get(dest_aet)
        self._note("move", series_uids or [""], self.moves)
        return _Move(number, level, dest_aet, address, instances, series_uids)

    def _hold(self, move: _Move, assoc: Any) -> bool:
        """While `hang`: answer nothing. False when stopping or the requestor gave up."""
        if not self.hang:
            return True
        self._note("hang", move.series_uids or [""])
        while self.hang:
            if self._stopping.wait(0.05) or _peer_gone(assoc):
                return False
        # A requestor that gave up while the move was held gets nothing (no orphan sends).
        return not self._stopping.is_set() and not _peer_gone(assoc)

    def _refusal(self, move: _Move) -> int | None:
        every = self.refuse_every
        if every and move.number % every == 0:
            return self.refuse_status
        if move.level == "IMAGE" and self.refuse_image_move:
            return UNABLE_TO_PROCESS
        return None

    def _plan(self, move: _Move) -> None:
        """Decide what this move sends: partial first moves, abort point, warning."""
        partial, abort_always, abort_after = self.partial_first, self.abort_always, self.abort_after
        with self._lock:
            first = {uid for uid in move.series_uids if self.served[uid] == 0}
            for uid in move.series_uids:
                self.served[uid] += 1
        taken: Counter[str] = Counter()
        for s, i in move.instances:
            if partial is not None and s.series_uid in first and taken[s.series_uid] >= partial:
                continue
            taken[s.series_uid] += 1
            move.plan_send.append((s, i))
        if abort_after is not None and (abort_always or first):
            move.abort_at = abort_after
        move.warning = self.partial_warning and len(move.plan_send) < len(move.instances)
        self._note("served", move.series_uids)

    def _before_store(self, s: SyntheticSeries, index: int) -> Dataset | None:
        """Delay, count and build one C-STORE; None when the PACS is stopping."""
        delay = self.store_delay_s
        if self._stopping.wait(delay) if delay > 0 else self._stopping.is_set():
            return None
        with self._lock:
            self.sent[s.series_uid] += 1
            self.sent_sop[s.sop_uids[index]] += 1
            self.log.append((time.monotonic(), "store", s.series_uid))
        return instance_dataset(s, index)

    def _serve_in_handler(self, move: _Move, assoc: Any) -> Iterator[Any]:
        """Synchronous move: pynetdicom sends each yielded dataset over its store association."""
        self._plan(move)
        if not move.instances:
            return
        if move.abort_at == 0:
            self._abort(assoc, move)
            yield UNABLE_TO_PROCESS, None
            return
        for n, (s, index) in enumerate(move.plan_send, 1):
            ds = self._before_store(s, index)
            if ds is None:
                self._abort(assoc, move)
                yield UNABLE_TO_PROCESS, None
                return
            yield PENDING, ds
            if move.abort_at == n:
                self._abort(assoc, move)
                yield UNABLE_TO_PROCESS, None  # not sent: pynetdicom sees the abort
                return
        self._note("done", move.series_uids)
        if len(move.plan_send) < len(move.instances):
            if move.warning:
                sent = {s.sop_uids[i] for s, i in move.plan_send}
                failed = Dataset()
                failed.FailedSOPInstanceUIDList = [
                    s.sop_uids[i] for s, i in move.instances if s.sop_uids[i] not in sent
                ]
                yield WARNING_SUBOPS, failed
            else:
                yield SUCCESS, None

    def _abort(self, assoc: Any, move: _Move) -> None:
        self._note("aborted", move.series_uids or [""])
        try:
            assoc.abort()
        except Exception as exc:
            self._error(exc)

    # -- asynchronous moves ---------------------------------------------------------------

    def _enqueue(self, move: _Move) -> None:
        with self._cv:
            backlog = len(self._queue) + self._in_progress
            drop = self.queue_size is not None and backlog >= self.queue_size
            if not drop:
                self._queue.append(move)
                self._cv.notify_all()
        if drop:
            self._note("dropped", move.series_uids or [""], self.dropped)
        else:
            self._note("queued", move.series_uids or [""])

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._stopping.is_set() and (self._paused or not self._queue):
                    self._cv.wait(0.5)
                if self._stopping.is_set():
                    return
                move = self._queue.popleft()
                self._in_progress += 1
            try:
                self._serve_from_queue(move)
            except Exception as exc:
                self._error(exc)
            finally:
                with self._cv:
                    self._in_progress -= 1
                    self._cv.notify_all()

    def _serve_from_queue(self, move: _Move) -> None:
        self._plan(move)
        if not move.plan_send or move.address is None or self._ae is None:
            self._note("done", move.series_uids)
            return
        host, port = move.address
        store = self._ae.associate(host, port, ae_title=move.dest_aet, evt_handlers=_NODELAY_HANDLERS)
        if not store.is_established:
            self._error(ConnectionError(f"cannot associate with {move.dest_aet} at {host}:{port}"))
            return
        aborted = move.abort_at == 0
        try:
            for n, (s, index) in enumerate(move.plan_send, 1):
                if aborted:
                    break
                ds = self._before_store(s, index)
                if ds is None:
                    aborted = True
                    break
                store.send_c_store(ds)
                if not store.is_established:
                    self._error(ConnectionError(f"{move.dest_aet} dropped the store association"))
                    return
                aborted = move.abort_at == n
            if aborted:
                self._note("aborted", move.series_uids)
                store.abort()
            else:
                self._note("done", move.series_uids)
        finally:
            if store.is_established:
                store.release()


def _peer_gone(assoc: Any) -> bool:
    """The requestor aborted or closed the association (seen while our handler blocks)."""
    try:
        return bool(assoc.acse.is_aborted()) or not assoc.dul.is_alive()
    except Exception:
        return True
