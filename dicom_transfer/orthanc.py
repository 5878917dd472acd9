"""The one HTTP boundary: every request to an Orthanc REST API goes through `OrthancRest`.

`OrthancRest` maps HTTP outcomes onto our error hierarchy and retries transient failures
(tenacity, in this layer only). `LocalOrthanc` adds the DICOM operations the local Orthanc
performs on our behalf (C-ECHO, C-FIND, C-MOVE); `Destination` counts what arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json as _json
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pyorthanc
import structlog
from tenacity import (
    Retrying,
    retry_if_exception,
    wait_random_exponential,
)

from .errors import MoveRefused, OrthancError, TransientOrthancError, Unreachable, Untrusted

log = structlog.get_logger(__name__)

_DIMSE_STATUS = re.compile(r"DIMSE status 0x([0-9A-Fa-f]{4})")


def parse_dimse_status(text: str | None) -> int | None:
    """The DIMSE status Orthanc quotes in an error text ("... DIMSE status 0xA702 ...")."""
    if not text:
        return None
    m = _DIMSE_STATUS.search(text)
    return int(m.group(1), 16) if m else None


def orthanc_series_id(patient_id: str, study_uid: str, series_uid: str) -> str:
    """Orthanc's public id of a series: SHA-1 of `PatientID|Study|Series`, 5 groups of 8."""
    h = hashlib.sha1(f"{patient_id}|{study_uid}|{series_uid}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


_R = TypeVar("_R", bound="OrthancRest")

IDLE_REUSE_S = 0.5  # Orthanc closes a keep-alive connection after 1 s idle ("Keep-Alive: timeout=1")
CONNECT_S = 5.0


@dataclass(frozen=True)
class _Answer:
    """One HTTP answer, whichever wire carried it."""

    status: int
    reason: str
    content_type: str
    content: bytes


class _Connection:
    """One keep-alive socket and its buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


class _BadAnswer(Exception):
    """What came back is not an HTTP/1.x answer we can read."""


MAX_LINE = 65536  # longest status or header line read
MAX_HEADERS = 200


def _line(rfile: Any) -> bytes:
    line: bytes = rfile.readline(MAX_LINE + 1)
    if not line:
        raise _BadAnswer("connection closed before the answer")
    if len(line) > MAX_LINE:
        raise _BadAnswer("header line too long")
    return line


def _read_answer(rfile: Any, method: str) -> tuple[_Answer, bool]:
    """Read one HTTP/1.x answer; returns it and whether the connection may be used again.

    Enough of RFC 9112 for a REST API or a plain-http proxy before it: 1xx interim
    answers skipped, Content-Length, chunked transfer coding, or a body up to close.
    """
    while True:
        version, _, rest = _line(rfile).rstrip(b"\r\n").partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise _BadAnswer(f"not an HTTP/1.x status line: {(version + b' ' + rest)[:80]!r}")
        status = int(code)
        headers: dict[bytes, bytes] = {}
        for _ in range(MAX_HEADERS):
            line = _line(rfile)
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise _BadAnswer(f"malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise _BadAnswer("too many header lines")
        if status >= 200 or status == 101:
            break
    connection = headers.get(b"connection", b"").lower()
    reusable = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        content = b""
    elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        content = _read_chunked(rfile)
    elif b"content-length" in headers:
        try:
            length = int(headers[b"content-length"])
        except ValueError:
            raise _BadAnswer(f"bad Content-Length {headers[b'content-length'][:40]!r}") from None
        content = rfile.read(length)
        if len(content) != length:
            raise _BadAnswer(f"answer cut short: {len(content)} of {length} bytes")
    else:
        content, reusable = rfile.read(), False  # the body runs to the end of the connection
    content_type = headers.get(b"content-type", b"").decode("latin-1")
    return _Answer(status, reason.decode("latin-1"), content_type, content), reusable


def _read_chunked(rfile: Any) -> bytes:
    parts: list[bytes] = []
    while True:
        size_text = _line(rfile).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadAnswer(f"bad chunk size {size_text[:40]!r}") from None
        if size == 0:
            while _line(rfile) not in (b"\r\n", b"\n"):  # trailer fields
                pass
            return b"".join(parts)
        chunk = rfile.read(size)
        if len(chunk) != size:
            raise _BadAnswer(f"chunk cut short: {len(chunk)} of {size} bytes")
        parts.append(chunk)
        _line(rfile)  # the CRLF after the chunk


class _PlainHttp:
    """Plain http/1.1 on a socket, keep-alive connections pooled.

    The proof of arrival is one GET after every move, on the critical path between two
    moves. Orthanc answers it in ~0.3 ms after a move; `http.client` spent another
    ~0.15-0.2 ms of Python around each request (header objects, `email` header parsing)
    and httpx ~0.3-0.5 ms. Here a request is one `sendall` of a prepared head and the
    answer is read by `_read_answer`. Any number of threads may share it. A connection
    idle longer than IDLE_REUSE_S, or one the server closed, is replaced before use, so
    a request is never written into a connection the server already dropped.
    """

    def __init__(self, host: str, port: int, auth: str | None) -> None:
        self.host, self.port = host, port
        self._headers = {"Host": f"{host}:{port}", "Accept-Encoding": "identity", "Accept": "*/*"}
        if auth is not None:
            self._headers["Authorization"] = auth
        self._head = "".join(f"{k}: {v}\r\n" for k, v in self._headers.items())
        self._idle: list[tuple[_Connection, float]] = []
        self._lock = threading.Lock()

    def _take(self) -> _Connection:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn, used_at = self._idle.pop()
                # Readable while idle means the server closed it (or broke protocol).
                if now - used_at < IDLE_REUSE_S and not select.select([conn.sock], [], [], 0)[0]:
                    return conn
                conn.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_S)
        except OSError as exc:
            raise _NotDelivered(None, f"http://{self.host}:{self.port}", f"cannot connect ({exc})") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(sock)

    def send(self, method: str, url: str, path: str, body: bytes | None, content_type: str | None,
             timeout_s: float) -> _Answer:  # fmt: skip
        head = f"{method} {path} HTTP/1.1\r\n{self._head}"
        if body is not None or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body or b'')}\r\n"
            if content_type:
                head += f"Content-Type: {content_type}\r\n"
        request = (head + "\r\n").encode("latin-1") + (body or b"")
        conn = self._take()
        try:
            conn.sock.settimeout(timeout_s)
            conn.sock.sendall(request)
            answer, reusable = _read_answer(conn.rfile, method)
        except TimeoutError as exc:
            conn.close()
            raise TransientOrthancError(None, url, f"timed out ({exc})") from exc
        except (OSError, _BadAnswer) as exc:
            conn.close()
            raise TransientOrthancError(None, url, f"connection failed ({type(exc).__name__}: {exc})") from exc
        if reusable:
            with self._lock:
                self._idle.append((conn, time.monotonic()))
        else:
            conn.close()
        return answer

    def close(self) -> None:
        with self._lock:
            for conn, _ in self._idle:
                conn.close()
            self._idle.clear()


class _Httpx:
    """https, or a proxy from the environment: pyorthanc's client (an httpx.Client)."""

    def __init__(self, url: str, username: str | None, password: str | None, timeout_s: float) -> None:
        self._client = pyorthanc.Orthanc(
            url,
            username=username,
            password=password,
            return_raw_response=True,
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_S),
            # http through a proxy needs no CA bundle; loading it costs ~20 ms per client.
            verify=not url.startswith("http://"),
        )

    def send(self, method: str, url: str, path: str, body: bytes | None, content_type: str | None,
             timeout_s: float) -> _Answer:  # fmt: skip
        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = self._client.request(
                method, url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s, connect=CONNECT_S)
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            untrusted = _cert_failure(exc)
            if untrusted is not None:
                raise Untrusted(url, untrusted.verify_message or str(untrusted)) from exc
            raise _NotDelivered(None, url, f"cannot connect ({exc})") from exc
        except httpx.TimeoutException as exc:
            raise TransientOrthancError(None, url, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise TransientOrthancError(None, url, f"connection failed ({exc})") from exc
        return _Answer(response.status_code, response.reason_phrase, response.headers.get("content-type", ""),
                       response.content)  # fmt: skip

    def close(self) -> None:
        self._client.close()


def _cert_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error under an httpx connect error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _wire(url: str, username: str | None, password: str | None, timeout_s: float) -> _PlainHttp | _Httpx:
    """Plain http without a proxy: our own small client; anything else: pyorthanc's httpx client."""
    parsed = urllib.parse.urlsplit(url)
    proxied = "http" in urllib.request.getproxies() and not urllib.request.proxy_bypass(parsed.hostname or "")
    if parsed.scheme != "http" or proxied or not parsed.hostname:
        return _Httpx(url, username, password, timeout_s)
    auth = None
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        auth = f"Basic {token}"
    return _PlainHttp(parsed.hostname, parsed.port or 80, auth)


class _NotDelivered(TransientOrthancError):
    """The request never reached Orthanc (connect failed): safe to repeat any call."""


class OrthancRest:
    """One Orthanc's REST API: JSON in, JSON out, errors mapped, transient ones retried.

    `idempotent=True` (GET, lookups, queries) lets a call be retried after any transient
    failure; otherwise (moves) only after a failure to connect, when the request is known
    not to have reached Orthanc, so a retry can never issue the same move twice.
    """

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry_deadline_s: float = 60.0,
        name: str = "orthanc",
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self._args = (url, username, password, timeout_s, retry_deadline_s, name)
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s
        self._wire = _wire(self.url, username, password, timeout_s)
        self._base_path = urllib.parse.urlsplit(self.url).path
        self.calls = 0
        self._version: tuple[int, ...] | None = None  # from the last `GET /system`
        self._system: dict[str, Any] | None = None  # the last `GET /system` answer

    def close(self) -> None:
        self._wire.close()

    def clone(self: _R) -> _R:
        """A second client to the same server (for a worker thread)."""
        url, username, password, timeout_s, retry_deadline_s, name = self._args
        twin = type(self)(url, username, password, timeout_s=timeout_s, retry_deadline_s=retry_deadline_s, name=name)
        twin.retry_deadline_s = self.retry_deadline_s
        return twin

    # -- raw requests -----------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        params: dict[str, Any] | None = None,
        idempotent: bool = True,
        timeout_s: float | None = None,
        raw: bool = False,
    ) -> Any:
        """Send one request (with retries as allowed) and return its decoded body."""

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, Untrusted):
                return False  # a setting to fix: asking again changes nothing
            if isinstance(exc, _NotDelivered):
                return True
            if isinstance(exc, TransientOrthancError) and exc.status == 507:
                return False  # its storage is full: asking again within seconds changes nothing
            return idempotent and isinstance(exc, TransientOrthancError)

        started = time.monotonic()
        try:  # the usual case, without the retry machinery (~0.05 ms a call)
            return self._once(method, path, json, content, params, timeout_s, raw)
        except Untrusted:
            raise
        except TransientOrthancError as exc:
            if not retryable(exc):
                raise self._unreachable(exc) from exc
            failed = exc
        retrying = Retrying(
            retry=retry_if_exception(retryable),
            stop=lambda _: time.monotonic() - started >= self.retry_deadline_s,
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise failed  # the attempt above: tenacity waits, then asks again
                    return self._once(method, path, json, content, params, timeout_s, raw)
        except Untrusted:
            raise
        except TransientOrthancError as exc:
            raise self._unreachable(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, exc: TransientOrthancError) -> Unreachable:
        if exc.status == 507:
            return Unreachable(exc.status, exc.url, f"{self.name} stores nothing more: {exc.message} (HTTP 507)")
        return Unreachable(exc.status, exc.url, f"{self.name} did not answer: {exc.message}")

    def _once(
        self,
        method: str,
        path: str,
        json: Any,
        content: bytes | str | None,
        params: dict[str, Any] | None,
        timeout_s: float | None,
        raw: bool,
    ) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}{path}{query}"
        self.calls += 1
        body, content_type = None, None
        if json is not None:
            body, content_type = _json.dumps(json).encode(), "application/json"
        elif content is not None:
            body = content.encode() if isinstance(content, str) else content
        answer = self._wire.send(method, url, f"{self._base_path}{path}{query}", body, content_type,
                                 timeout_s if timeout_s is not None else self.timeout_s)  # fmt: skip
        return self._decode(answer, url, raw)

    @staticmethod
    def _decode(answer: _Answer, url: str, raw: bool) -> Any:
        status = answer.status
        if 200 <= status < 300:
            if raw:
                return answer.content
            if not answer.content:
                return None
            if "json" in answer.content_type:
                return _json.loads(answer.content)
            return answer.content.decode("utf-8", "replace")
        message, details = answer.reason, None
        try:
            body = _json.loads(answer.content)
            message = body.get("Message") or message
            details = body.get("Details") or None
        except (ValueError, AttributeError):
            text = answer.content.decode("utf-8", "replace").strip()
            details = text[:300] or None
        if status in (401, 403):
            raise OrthancError(status, url, "authentication failed: check username/password")
        if status >= 500 and status not in (500,):
            raise TransientOrthancError(status, url, message, details)
        if status == 500 and details is None:
            raise TransientOrthancError(status, url, message, details)
        raise OrthancError(status, url, message, details)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    # -- what every Orthanc answers -----------------------------------------------------

    def system(self) -> dict[str, Any]:
        """`GET /system`: name, AET, version (also the readiness probe)."""
        result = self.get("/system")
        if not isinstance(result, dict) or "Version" not in result:
            raise OrthancError(None, f"{self.url}/system", "not an Orthanc server (no Version)")
        self._version = parse_version(str(result["Version"]))
        self._system = result
        return result

    def system_known(self) -> dict[str, Any]:
        """The last `GET /system` answer (asked now if there was none)."""
        return self._system or self.system()

    def version(self) -> tuple[int, ...]:
        """The version the last `GET /system` gave (the start-up check asks it): no second call."""
        return self._version if self._version is not None else parse_version(self.system()["Version"])


def parse_version(text: str) -> tuple[int, ...]:
    """'1.12.7' → (1, 12, 7); 'mainline' or odd strings count as very new."""
    parts = re.findall(r"\d+", text)
    if not parts or text.strip().lower().startswith("mainline"):
        return (99, 0, 0)
    return tuple(int(p) for p in parts[:3])


# ---------------------------------------------------------------------------------------
# Source side: C-FIND and C-MOVE issued by the local Orthanc


@dataclass(frozen=True)
class SeriesAnswer:
    """One SERIES-level C-FIND answer from the source."""

    study_uid: str
    series_uid: str
    patient_id: str | None
    expected: int | None  # NumberOfSeriesRelatedInstances; None when missing or empty
    modality: str | None
    description: str | None
    tags: dict[str, str]


@dataclass(frozen=True)
class JobStatus:
    """A move job's state as far as Orthanc knows it; `vanished` = 404 (history full)."""

    state: str  # Pending Running Success Failure Paused Retry, or "Vanished"
    error: str | None = None
    dimse_status: int | None = None

    @property
    def ended(self) -> bool:
        return self.state in ("Success", "Failure", "Vanished")

    @property
    def succeeded(self) -> bool:
        return self.state == "Success"


MOVE_JOB = "move-job"  # ≥ 1.11.1: asynchronous /modalities/{id}/move → job
RETRIEVE_JOB = "retrieve-job"  # 1.10: /modalities/{id}/query → /answers/0/retrieve → job
BLOCKING = "blocking"  # any version: synchronous /modalities/{id}/move, run from a worker thread
GET_JOB = "get-job"  # transfer.retrieve: get, >= 1.12.6: asynchronous /modalities/{id}/get → job (C-GET)

C_GET_SINCE = (1, 12, 6)  # the first Orthanc that is a C-GET SCU (`POST /modalities/{id}/get`)
# Orthanc's words (1.12.7) when the PACS accepts no presentation context for the C-GET.
_NO_CONTEXT = ("No acceptable presentation context", "Unable to negotiate a presentation context")
GET_UNSUPPORTED = "C-GET not supported by the source (SOP class not accepted)"
GET_SILENT = "C-GET answered without sending anything (Orthanc reports no DIMSE status for a C-GET)"


_ASSOCIATION_FAILURES = (
    "DicomAssociation - connecting",  # Orthanc could not open an association
    "TCP Initialization Error",
    "No route to host",
    "Connection refused",
    "Connection timed out",
)


def is_association_failure(text: str | None) -> bool:
    """Orthanc's words for "the peer could not be reached" (as opposed to a refusal)."""
    return text is not None and any(marker in text for marker in _ASSOCIATION_FAILURES)


def choose_move_method(version: tuple[int, ...], retrieve: str = "move") -> str:
    """The move path for this Orthanc.

    ≥ 1.11.1: asynchronous move jobs (synchronous retrieves serialise behind one mutex in
    1.12.6–1.12.10). Older: the blocking move from a worker thread, which the benchmark
    measured faster than the query → retrieve job (one C-FIND less per move, no job to
    poll); `retrieve-job` stays available as `transfer.move_method`. `retrieve="get"`:
    the asynchronous C-GET job (the version was checked at start, see `check_c_get`).
    """
    if retrieve == "get":
        return GET_JOB
    return MOVE_JOB if version >= (1, 11, 1) else BLOCKING


def check_c_get(version: tuple[int, ...], url: str) -> str | None:
    """Why this Orthanc cannot issue a C-GET (None when it can, i.e. ≥ 1.12.6)."""
    if version >= C_GET_SINCE:
        return None
    found = ".".join(map(str, version))
    need = ".".join(map(str, C_GET_SINCE))
    return (
        f"get: the local Orthanc at {url} is {found}; Orthanc issues C-GET (as SCU) only from {need}:"
        " upgrade it, or use retrieve: move"
    )


def positive_int(value: Any) -> int | None:
    """A DICOM count such as NumberOfSeriesRelatedInstances as an int; None when absent, empty or not > 0."""
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def _by_keyword_and_tag(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer in Orthanc's full format → values by keyword and by `gggg,eeee` (strings only)."""
    out: dict[str, Any] = {}
    for tag, item in answer.items():
        if not isinstance(item, dict) or item.get("Type") not in ("String", "Null"):
            continue  # sequences and binary values are not manifest cells
        value = item.get("Value")
        out[tag.lower()] = value
        name = item.get("Name")
        if isinstance(name, str) and name.isidentifier():  # not "Unknown Tag & Data"
            out.setdefault(name, value)
    return out


class LocalOrthanc(OrthancRest):
    """The Orthanc that speaks DICOM for us (SCU of C-ECHO, C-FIND, C-MOVE)."""

    def echo(self, modality: str, timeout_s: float = 10.0) -> None:
        """C-ECHO a modality known to this Orthanc; raises OrthancError when it fails."""
        self.post(f"/modalities/{modality}/echo", {"Timeout": int(max(1, timeout_s))})

    def modalities(self) -> list[str]:
        return list(self.get("/modalities"))

    def register_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """`PUT /modalities/{name}`: idempotent, so safe to repeat."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def query(
        self, modality: str, level: str, query: dict[str, str], *, normalize: bool = True
    ) -> tuple[str, list[dict[str, Any]]]:
        """C-FIND; returns the query id and its answers (simplified tags).

        `normalize=False` sends every key as given: Orthanc otherwise drops keys that are
        not its main tags of the level (ImageType at IMAGE level, SliceThickness, private
        tags; checked on 1.10.1 and 1.12.7). Its answers are then keyed by keyword and by
        tag (`0018,0050`) alike. A repeated C-FIND is harmless: the POST is retried as idempotent.
        """
        body: dict[str, Any] = {"Level": level, "Query": query}
        if not normalize:
            body["Normalize"] = False
        created = self.post(f"/modalities/{modality}/query", body)
        qid = created["ID"]
        if normalize:
            answers = self.get(f"/queries/{qid}/answers", params={"expand": "", "simplify": ""})
            return qid, list(answers)
        full = self.get(f"/queries/{qid}/answers", params={"expand": ""})
        return qid, [_by_keyword_and_tag(a) for a in full]

    def find_series(
        self, modality: str, series_uid: str | None, study_uid: str | None = None
    ) -> list[SeriesAnswer]:
        """SERIES-level C-FIND for one series (or all series of one study)."""
        return self.find_series_list(modality, [series_uid] if series_uid else [], [study_uid] if study_uid else [])

    def find_series_list(self, modality: str, series_uids: list[str], study_uids: list[str]) -> list[SeriesAnswer]:
        """SERIES-level C-FIND for many series at once (List of UID Matching, PS3.4 C.2.2.2.2).

        An empty list is a universal match. Not every PACS supports lists: the caller checks
        each answer against what it asked for.
        """
        query = {
            "StudyInstanceUID": "\\".join(study_uids),
            "SeriesInstanceUID": "\\".join(series_uids),
            "NumberOfSeriesRelatedInstances": "",
            "Modality": "",
            "SeriesDescription": "",
        }
        _, answers = self.query(modality, "Series", query)
        # Some PACS answer a SERIES query once per instance: one answer per series counts.
        unique = {str(a["SeriesInstanceUID"]): a for a in reversed(answers) if a.get("SeriesInstanceUID")}
        return [self._series_answer(a) for a in reversed(unique.values())]

    @staticmethod
    def _series_answer(a: dict[str, Any]) -> SeriesAnswer:
        return SeriesAnswer(
            study_uid=str(a.get("StudyInstanceUID", "")),
            series_uid=str(a["SeriesInstanceUID"]),
            patient_id=a.get("PatientID") or None,
            expected=positive_int(a.get("NumberOfSeriesRelatedInstances")),
            modality=a.get("Modality") or None,
            description=a.get("SeriesDescription") or None,
            tags={k: str(v) for k, v in a.items() if isinstance(v, str)},
        )

    def find_instances(self, modality: str, study_uid: str, series_uid: str) -> list[str]:
        """IMAGE-level C-FIND: the SOPInstanceUIDs the source holds for one series."""
        query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""}
        _, answers = self.query(modality, "Instance", query)
        return sorted({str(a["SOPInstanceUID"]) for a in answers if a.get("SOPInstanceUID")})

    # -- moves ------------------------------------------------------------------------

    def start_move(
        self,
        method: str,
        modality: str,
        target_aet: str,
        study_uid: str,
        series_uid: str,
        timeout_s: float,
        sop_uids: list[str] | None = None,
    ) -> str:
        """Start one C-MOVE as an Orthanc job and return the job id.

        Not retried after the request may have reached Orthanc: a second POST would queue
        a second move at the PACS.
        """
        if method == MOVE_JOB:
            return self._start_move_job(modality, target_aet, study_uid, series_uid, timeout_s, sop_uids)
        if method == RETRIEVE_JOB:
            return self._start_retrieve_job(modality, target_aet, study_uid, series_uid, sop_uids)
        if method == GET_JOB:  # a C-GET has no target: the instances land in this Orthanc
            return self._start_get_job(modality, study_uid, series_uid, timeout_s, sop_uids)
        raise ValueError(f"unknown move method {method!r}")

    def move_blocking(
        self,
        modality: str,
        target_aet: str,
        study_uid: str,
        series_uid: str,
        timeout_s: float,
        sop_uids: list[str] | None = None,
    ) -> JobStatus:
        """Synchronous C-MOVE (`POST /modalities/{id}/move`); returns when the PACS answered.

        Meant for a worker thread. Not retried after the request may have reached Orthanc.
        A failed C-MOVE (HTTP 422) comes back as a Failure status, not as an exception.
        """
        body = self._move_body(target_aet, study_uid, series_uid, timeout_s, sop_uids)
        try:
            # The HTTP wait outlasts the DIMSE timeout so that Orthanc's own verdict arrives.
            self.post(f"/modalities/{modality}/move", body, idempotent=False, timeout_s=timeout_s + 30)
        except TransientOrthancError:
            raise
        except OrthancError as exc:
            text = exc.details or exc.message
            return JobStatus("Failure", text, parse_dimse_status(text))
        return JobStatus("Success")

    @staticmethod
    def _move_body(
        target_aet: str, study_uid: str, series_uid: str, timeout_s: float, sop_uids: list[str] | None
    ) -> dict[str, Any]:
        base = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
        if sop_uids:
            level, resources = "Instance", [{**base, "SOPInstanceUID": u} for u in sop_uids]
        else:
            level, resources = "Series", [base]
        return {"Level": level, "Resources": resources, "TargetAet": target_aet, "Timeout": int(max(1, timeout_s))}

    def _start_move_job(
        self,
        modality: str,
        target_aet: str,
        study_uid: str,
        series_uid: str,
        timeout_s: float,
        sop_uids: list[str] | None,
    ) -> str:
        body = {**self._move_body(target_aet, study_uid, series_uid, timeout_s, sop_uids), "Asynchronous": True}
        created = self.post(f"/modalities/{modality}/move", body, idempotent=False)
        if not isinstance(created, dict) or "ID" not in created:
            url = f"{self.url}/modalities/{modality}/move"
            raise OrthancError(None, url, "no job id in the answer (Orthanc < 1.11.1?)")
        return str(created["ID"])

    def _start_get_job(
        self, modality: str, study_uid: str, series_uid: str, timeout_s: float, sop_uids: list[str] | None
    ) -> str:
        """`POST /modalities/{id}/get` (≥ 1.12.6), asynchronous: a `DicomGetScu` job.

        Same body as a move without `TargetAet` (checked on 1.12.7). Not retried once it may
        have reached Orthanc, like a move. Its job ends Success whatever the PACS's final
        C-GET status (0xA702, 0xC000 and 0xB000 all checked on 1.12.7): only the count tells.
        """
        body = self._move_body("", study_uid, series_uid, timeout_s, sop_uids)
        del body["TargetAet"]
        created = self.post(f"/modalities/{modality}/get", {**body, "Asynchronous": True}, idempotent=False)
        if not isinstance(created, dict) or "ID" not in created:
            url = f"{self.url}/modalities/{modality}/get"
            raise OrthancError(None, url, "no job id in the answer (Orthanc < 1.12.6?)")
        return str(created["ID"])

    def _start_retrieve_job(
        self,
        modality: str,
        target_aet: str,
        study_uid: str,
        series_uid: str,
        sop_uids: list[str] | None,
    ) -> str:
        # Query ids live in an LRU of QueryRetrieveSize: retrieve at once after querying.
        base = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
        if sop_uids:
            # A UID list (backslash-separated) matches every listed instance in one query.
            query, level = {**base, "SOPInstanceUID": "\\".join(sop_uids)}, "Instance"
        else:
            query, level = base, "Series"
        created = self.post(f"/modalities/{modality}/query", {"Level": level, "Query": query})
        qid = created["ID"]
        body = {"TargetAet": target_aet, "Synchronous": False}
        answers = self.get(f"/queries/{qid}/answers")
        if not answers:
            raise MoveRefused("not found at source (no C-FIND answer to retrieve)", 0xC000)
        path = f"/queries/{qid}/retrieve" if len(answers) > 1 else f"/queries/{qid}/answers/0/retrieve"
        created = self.post(path, body, idempotent=False)
        return str(created["ID"])

    def job_status(self, job_id: str) -> JobStatus:
        """`GET /jobs/{id}`; a 404 means the job left Orthanc's history (or Orthanc restarted)."""
        try:
            job = self.get(f"/jobs/{job_id}")
        except OrthancError as exc:
            if exc.status == 404:
                return JobStatus("Vanished")
            raise
        state = str(job.get("State"))
        if state == "Failure":
            details = str(job.get("ErrorDetails") or job.get("ErrorDescription") or "move failed")
            said = f"{job.get('ErrorDescription')} {details}"
            if job.get("Type") == "DicomGetScu" and any(words in said for words in _NO_CONTEXT):
                details = f"{GET_UNSUPPORTED}: {details}"
            return JobStatus(state, details, parse_dimse_status(details))
        return JobStatus(state)

    def cancel_job(self, job_id: str) -> None:
        try:
            self.post(f"/jobs/{job_id}/cancel", {})
        except OrthancError as exc:
            if exc.status not in (400, 404):
                raise


# ---------------------------------------------------------------------------------------
# Destination side: proof of arrival


class Destination(OrthancRest):
    """The Orthanc where the C-STOREs land; counts what it holds."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._series_ids: dict[str, str] = {}
        self._guesses: dict[str, str] = {}

    def series_id(self, series_uid: str) -> str | None:
        """Orthanc id of a series by its UID (cached once found)."""
        known = self._series_ids.get(series_uid)
        if known:
            return known
        found = self.post("/tools/lookup", content=series_uid)
        for item in found or []:
            if item.get("Type") == "Series":
                self._series_ids[series_uid] = item["ID"]
                return str(item["ID"])
        return None

    def _series_get(self, series_uid: str, suffix: str = "") -> Any:
        """`GET /series/{id}{suffix}` of this series; None when it is not held here (a 404 forgets its id)."""
        sid = self.series_id(series_uid)
        if sid is None:
            return None
        try:
            return self.get(f"/series/{sid}{suffix}")
        except OrthancError as exc:
            if exc.status == 404:
                self._series_ids.pop(series_uid, None)
                return None
            raise

    def hint(self, series_uid: str, patient_id: str | None, study_uid: str | None) -> None:
        """Remember the series' computed Orthanc id, to count with one GET instead of a lookup."""
        if patient_id is not None and study_uid and series_uid not in self._series_ids:
            self._guesses[series_uid] = orthanc_series_id(patient_id, study_uid, series_uid)

    def count(self, series_uid: str, *, lookup: bool = True) -> int:
        """How many instances of this series the destination holds (0 when none).

        One GET on the series' Orthanc id: the one found before, else the id computed from
        its PatientID and UIDs (a SHA-1 of the three, so an id that exists is this series).
        The cheapest count differs by version (measured right after a move): Orthanc 1.12
        answers `/series/{id}/statistics` in ~0.6-0.9 ms and `/series/{id}` in 2-2.5 ms;
        1.10 answers `/series/{id}` (its `Instances` list) as fast for 10 instances and
        ~0.08 ms faster for 50 than `/statistics`, which reads every instance's attachments.
        `lookup=False` (a poll while the move runs): when the computed id is not there yet,
        answer 0 without the `/tools/lookup` that would catch a series stored under another
        PatientID; the count after the move looks it up.
        """
        gone = None
        sid = self._series_ids.get(series_uid)
        if sid is not None:
            held = self._held(sid)
            if held is not None:
                return held
            gone = self._series_ids.pop(series_uid)  # deleted since we found it
        guess = self._guesses.get(series_uid)
        if guess is not None:
            held = None if guess == gone else self._held(guess)  # not the same 404 twice
            if held is not None:
                self._series_ids[series_uid] = guess
                return held
            if not lookup:
                return 0
        sid = self.series_id(series_uid)
        return 0 if sid is None else self._held(sid) or 0

    def _held(self, sid: str) -> int | None:
        """Instances of the series with this Orthanc id; None when there is no such series."""
        try:
            if self.version() < (1, 11):  # see count()
                return len(self.get(f"/series/{sid}")["Instances"])
            return int(self.get(f"/series/{sid}/statistics")["CountInstances"])
        except OrthancError as exc:
            if exc.status == 404:
                return None
            raise

    def storage_full(self) -> str | None:
        """Why the destination refuses new instances, from its own figures; None when it has room
        or cannot tell (no `MaximumStorageMode: Reject`, which Orthanc ≥ 1.11.2 reports in `/system`).

        With `Reject`, a full Orthanc answers C-STOREs with a failure (and REST uploads with
        HTTP 507) instead of recycling its oldest patients. "Full" leaves room for less than
        two instances of the average size it holds (or any patient limit is reached).
        """
        system = self._system or self.system()
        if system.get("MaximumStorageMode") != "Reject":
            return None
        max_mb = positive_int(system.get("MaximumStorageSize"))
        max_patients = positive_int(system.get("MaximumPatientCount"))
        if not max_mb and not max_patients:
            return None
        stats = self.get("/statistics")
        used, held = int(stats.get("TotalDiskSize", 0)), int(stats.get("CountInstances", 0))
        if max_mb:
            cap = max_mb * 1024 * 1024
            average = used / held if held else 0
            if cap - used < 2 * average or used >= cap:
                return f"storage full: {used / 2**20:.1f} of {max_mb} MB used (MaximumStorageSize, mode Reject)"
        patients = int(stats.get("CountPatients", 0))
        if max_patients and patients >= max_patients:
            return f"storage full: {patients} of {max_patients} patients (MaximumPatientCount, mode Reject)"
        return None

    def counts(self, series_uids: list[str]) -> dict[str, int]:
        """Instances held for many series with one `POST /tools/find` (a list of UIDs); 0 when absent."""
        found = self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"SeriesInstanceUID": "\\".join(series_uids)}, "Expand": True},
        )
        have = dict.fromkeys(series_uids, 0)
        for series in found or []:
            uid = series.get("MainDicomTags", {}).get("SeriesInstanceUID")
            n = len(series.get("Instances", []))
            if uid in have and (uid not in self._series_ids or n > have[uid]):
                have[uid] = n
                self._series_ids[uid] = str(series["ID"])
        return have

    def sop_uids(self, series_uid: str) -> set[str]:
        """SOPInstanceUIDs the destination holds for a series (for image-level repair)."""
        sid = self.series_id(series_uid)
        if sid is None:
            return set()
        instances = self.get(f"/series/{sid}/instances")
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}

    def last_change(self) -> int:
        """The newest change sequence number (`GET /changes?last`)."""
        return int(self.get("/changes", params={"last": ""}).get("Last", 0))

    def changed_since(self, seq: int) -> tuple[bool, int]:
        """Whether anything changed after `seq`; returns the new sequence mark.

        Asks only for the newest change (`?last`): a few hundred bytes however much arrived.
        """
        last = self.last_change()
        return last > seq, max(last, seq)


def dimse_from_error(exc: OrthancError) -> int | None:
    return parse_dimse_status(exc.details) or parse_dimse_status(exc.message)



# ---------------------------------------------------------------------------------------
# Relay mode (`transfer.mode: relay`): the local Orthanc holds, the destination receives in bulk

_STORED_STATUSES = ("Success", "AlreadyStored")


class LocalStore(Destination):
    """The local Orthanc as where moves land: counted like a destination, read back as ZIP
    chunks, emptied once the destination's count proves a series."""

    def aet(self) -> str:
        """Its own AE title (`GET /system` `DicomAet`): the move target the PACS must know."""
        system = self._system or self.system()
        return str(system["DicomAet"])

    def disk_bytes(self) -> int:
        """`GET /statistics` TotalDiskSize: what it stores now, ours or not."""
        return int(self.get("/statistics").get("TotalDiskSize", 0))

    def instance_sizes(self, series_uid: str) -> list[tuple[str, int]]:
        """(Orthanc instance id, file size) of each instance of the series held (empty when none)."""
        instances = self._series_get(series_uid, "/instances") or []
        return [(str(i["ID"]), int(i.get("FileSize") or 0)) for i in instances]

    def archive(self, instance_ids: list[str], timeout_s: float) -> bytes:
        """A ZIP of these instances (`POST /tools/create-archive`; a read: safe to repeat)."""
        return bytes(
            self.request(
                "POST", "/tools/create-archive", json={"Resources": instance_ids, "Synchronous": True},
                timeout_s=timeout_s, raw=True,
            )  # fmt: skip
        )

    def delete_series(self, series_uid: str) -> None:
        """Delete the local copy of a series (a 404: already gone)."""
        sid = self.series_id(series_uid)
        if sid is None:
            return
        try:
            self.delete(f"/series/{sid}")
        except OrthancError as exc:
            if exc.status != 404:
                raise
        self._series_ids.pop(series_uid, None)


class ForwardTarget(Destination):
    """The destination in relay mode: takes ZIP archives on `POST /instances` (checked on 1.10.1 and 1.12.7)."""

    def instance_ids(self, series_uid: str) -> set[str]:
        """Orthanc ids of the instances of this series held here (empty when none).

        An Orthanc id is a SHA-1 of PatientID and the study, series and SOP instance UIDs,
        so the local Orthanc's id of an instance names the same instance here.
        """
        series = self._series_get(series_uid)
        return {str(iid) for iid in series["Instances"]} if series is not None else set()

    def store_archive(self, archive: bytes, timeout_s: float) -> int:
        """Upload a ZIP of instances; returns how many it stored (or already held).

        Safe to repeat: an instance stored twice answers AlreadyStored. Raises OrthancError
        naming the first instance the destination refused.
        """
        answer = self.request("POST", "/instances", content=archive, timeout_s=timeout_s)
        items = answer if isinstance(answer, list) else [answer]
        for item in items:
            status = item.get("Status") if isinstance(item, dict) else None
            if status not in _STORED_STATUSES:
                raise OrthancError(None, f"{self.url}/instances", f"the destination refused an instance: {status!r}")
        return len(items)
