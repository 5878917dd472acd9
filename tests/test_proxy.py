"""An http proxy from the environment, for real: requests reach Orthanc through it.

Sites reach a centre's Orthanc through an http proxy (`http_proxy`); that URL takes
pyorthanc's httpx client, not the plain socket wire. The proxy here is a small forwarding
proxy on a real socket: it takes absolute-form requests, forwards each to the origin and
relays the answer, and records what it was asked.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from dicom_transfer import orthanc
from dicom_transfer.errors import OrthancError
from dicom_transfer.orthanc import OrthancRest
from dicom_transfer.stack import Stack


class Proxy:
    def __init__(self) -> None:
        self.seen: list[str] = []  # request lines, as the client sent them
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, client.makefile("rb") as rfile:
            while True:
                head = rfile.readline()
                if not head:
                    return
                method, target, version = head.decode("latin-1").split()
                self.seen.append(f"{method} {target}")
                lines, length = [], 0
                while (line := rfile.readline()) not in (b"\r\n", b""):
                    name = line.split(b":", 1)[0].strip().lower()
                    if name == b"content-length":
                        length = int(line.split(b":", 1)[1])
                    if name not in (b"connection", b"proxy-connection", b"keep-alive"):
                        lines.append(line)
                body = rfile.read(length)
                assert target.startswith("http://"), target  # absolute form: it came through a proxy
                hostport, _, path = target[len("http://") :].partition("/")
                host, _, port = hostport.partition(":")
                with socket.create_connection((host, int(port or 80))) as origin:
                    head = f"{method} /{path} {version}\r\n".encode() + b"".join(lines)
                    origin.sendall(head + b"Connection: close\r\n\r\n" + body)
                    answer = b""
                    while chunk := origin.recv(65536):
                        answer += chunk
                client.sendall(answer)
                return  # the origin closed; so does the proxy (the client opens a new connection)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    p = Proxy()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{p.port}")
    yield p
    p.close()


def test_rest_calls_go_through_the_proxy(same: Stack, proxy: Proxy) -> None:
    rest = OrthancRest(same.centre.url, name="proxied")
    try:
        assert isinstance(rest._wire, orthanc._Httpx)
        assert rest.get("/system")["Name"]
        assert rest.post("/tools/lookup", content="1.2.3.4.5.404") == []
        with pytest.raises(OrthancError) as missing:
            rest.get("/series/0000-not-there")
        assert missing.value.status == 404
    finally:
        rest.close()
    base = same.centre.url.rstrip("/")
    assert proxy.seen == [
        f"GET {base}/system",
        f"POST {base}/tools/lookup",
        f"GET {base}/series/0000-not-there",
    ]


def test_no_proxy_for_the_host_takes_the_plain_wire(same: Stack, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    rest = OrthancRest(same.centre.url, name="direct")
    try:
        assert isinstance(rest._wire, orthanc._PlainHttp)
        assert rest.get("/system")["Name"]
    finally:
        rest.close()
    assert proxy.seen == []
