"""The HTTP boundary against a real Orthanc: both wires, keep-alive, failures mapped.

Plain http goes over our pooled `http.client` wire; https and proxied URLs over pyorthanc's
httpx client. Each behaviour is checked on both, on the same Orthanc.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dicom_transfer import orthanc
from dicom_transfer.errors import OrthancError, Unreachable
from dicom_transfer.orthanc import OrthancRest
from dicom_transfer.stack import Stack

WIRES: dict[str, Callable[[str], orthanc._PlainHttp | orthanc._Httpx]] = {
    "plain": lambda url: orthanc._wire(url, None, None, 30.0),
    "httpx": lambda url: orthanc._Httpx(url, None, None, 30.0),
}


def rest_on(url: str, wire: str, **kw: float) -> OrthancRest:
    rest = OrthancRest(url, name="test", **kw)  # type: ignore[arg-type]
    rest._wire = WIRES[wire](rest.url)
    return rest


@pytest.fixture(params=sorted(WIRES))
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_plain_http_takes_the_stdlib_wire_and_https_or_a_proxy_takes_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(orthanc._wire("http://127.0.0.1:8042", None, None, 5), orthanc._PlainHttp)
    assert isinstance(orthanc._wire("https://pacs.example:8042", None, None, 5), orthanc._Httpx)
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert isinstance(orthanc._wire("http://orthanc.example:8042", None, None, 5), orthanc._Httpx)
    monkeypatch.setenv("no_proxy", "orthanc.example")
    assert isinstance(orthanc._wire("http://orthanc.example:8042", None, None, 5), orthanc._PlainHttp)


def test_basic_auth_header_is_sent_on_the_plain_wire() -> None:
    plain = orthanc._wire("http://127.0.0.1:8042", "alice", "s3cret", 5)
    assert isinstance(plain, orthanc._PlainHttp)
    assert plain._headers["Authorization"] == "Basic YWxpY2U6czNjcmV0"  # base64("alice:s3cret")


def test_json_text_raw_params_and_errors(same: Stack, wire: str) -> None:
    rest = rest_on(same.centre.url, wire)
    assert rest.get("/system")["Name"]
    assert rest.get("/changes", params={"last": ""})["Done"] is True
    assert rest.get("/system", raw=True).startswith(b"{")
    assert rest.post("/tools/lookup", content="1.2.3.4.5.404") == []
    with pytest.raises(OrthancError) as missing:
        rest.get("/series/0000-not-there")
    assert missing.value.status == 404
    with pytest.raises(OrthancError) as no_route:
        rest.get("/no-such-route")
    assert no_route.value.status == 404 and "Unknown resource" in no_route.value.message
    with pytest.raises(OrthancError) as bad:
        rest.post("/tools/find", {"Level": "Nonsense", "Query": {}})
    assert bad.value.status == 400


def test_idle_connection_closed_by_orthanc_is_replaced_before_a_move_is_written(
    same: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orthanc drops keep-alive connections after 1 s idle; a non-idempotent call must still go through.

    The age limit is lifted so that only the readability check can save the call: without it
    the request is written into the dead socket and, not being idempotent, is not retried.
    """
    monkeypatch.setattr(orthanc, "IDLE_REUSE_S", 3600.0)
    rest = rest_on(same.centre.url, "plain")
    rest.get("/system")
    pooled = list(rest._wire._idle)  # type: ignore[union-attr]
    assert len(pooled) == 1
    time.sleep(1.6)
    assert rest.post("/tools/lookup", content="1.2.3.4.5.404", idempotent=False) == []
    assert [c for c, _ in rest._wire._idle] != [pooled[0][0]]  # type: ignore[union-attr]


def test_a_busy_connection_is_reused(same: Stack) -> None:
    rest = rest_on(same.centre.url, "plain")
    rest.get("/system")
    first = rest._wire._idle[0][0]  # type: ignore[union-attr]
    for _ in range(5):
        rest.get("/system")
    assert [c for c, _ in rest._wire._idle] == [first]  # type: ignore[union-attr]


def test_threads_share_one_client(same: Stack) -> None:
    rest = rest_on(same.centre.url, "plain")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                assert rest.get("/system")["Name"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 1 <= len(rest._wire._idle) <= 4  # type: ignore[union-attr]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for s in held:
        s.close()
    server.close()


def test_no_answer_in_time_is_unreachable(silent_port: int, wire: str) -> None:
    rest = rest_on(f"http://127.0.0.1:{silent_port}", wire, timeout_s=0.3, retry_deadline_s=0.0)
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as exc:
        rest.get("/system")
    assert "timed out" in exc.value.message
    assert time.monotonic() - t0 < 5


def test_nobody_listening_is_unreachable_even_for_a_move(wire: str) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    rest = rest_on(f"http://127.0.0.1:{port}", wire, retry_deadline_s=0.3)
    with pytest.raises(Unreachable) as exc:
        rest.post("/modalities/PACS/move", {"Level": "Series"}, idempotent=False)
    assert "cannot connect" in exc.value.message
