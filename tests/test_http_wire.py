"""The plain-http wire: answers read byte for byte, and retries as the boundary promises.

`_read_answer` is checked on byte strings (pure logic); the wire and `OrthancRest` against a
scripted HTTP server on a real socket, which answers each request with the next canned
answer and records what it was sent.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator

import pytest

from dicom_transfer import orthanc
from dicom_transfer.errors import OrthancError, Unreachable
from dicom_transfer.orthanc import OrthancRest, _BadAnswer, _read_answer


def read(raw: bytes, method: str = "GET") -> tuple[orthanc._Answer, bool, bytes]:
    """The answer, whether the connection may be reused, and what is left unread."""
    rfile = io.BufferedReader(io.BytesIO(raw))  # type: ignore[arg-type]
    answer, reusable = _read_answer(rfile, method)
    return answer, reusable, rfile.read()


def test_content_length_body_and_keep_alive() -> None:
    answer, reusable, left = read(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}NEXT"
    )
    assert (answer.status, answer.reason, answer.content_type) == (200, "OK", "application/json")
    assert answer.content == b'{"a":1}'
    assert reusable and left == b"NEXT"  # the next answer on the connection is not consumed


def test_chunked_body_with_extension_and_trailer() -> None:
    answer, reusable, left = read(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: yes\r\n\r\nNEXT"
    )
    assert answer.content == b"Wikipedia" and reusable and left == b"NEXT"


def test_interim_answers_are_skipped() -> None:
    answer, _, _ = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
    assert (answer.status, answer.content) == (404, b"{}")


def test_connection_close_and_http_1_0_rules() -> None:
    assert not read(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[1]
    assert not read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[1]
    assert read(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")[1]
    # no length: the body runs to the end of the connection, which cannot be reused
    answer, reusable, _ = read(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert answer.content == b"all of it" and not reusable


def test_no_body_for_head_204_and_304() -> None:
    for raw, method in (
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE"),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", "GET"),
    ):
        answer, reusable, _ = read(raw, method)
        assert answer.content == b"" and reusable


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "closed before the answer"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "cut short: 5 of 10"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc", "chunk cut short"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "too long"),
    ],
)
def test_what_is_not_an_answer_is_said(raw: bytes, words: str) -> None:
    with pytest.raises(_BadAnswer, match=words):
        read(raw)


# ---------------------------------------------------------------------------------------
# A scripted server on a real socket


class Scripted:
    """Answers each request with the next canned answer; `None` closes without answering."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connections = 0
        while self.answers:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            connections += 1
            with conn, conn.makefile("rb") as rfile:
                while self.answers:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = rfile.readline()
                        if not line:
                            break
                        head += line
                    if not head:
                        break
                    fields = [h.split(b":", 1) for h in head.split(b"\r\n")[1:] if b":" in h]
                    lengths = [int(v) for k, v in fields if k.lower() == b"content-length"]
                    rfile.read(lengths[0] if lengths else 0)
                    self.requests.append((connections, head))
                    answer = self.answers.pop(0)
                    if answer is None:
                        break  # close without answering
                    conn.sendall(answer)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    made: list[Scripted] = []

    def make(answers: list[bytes | None]) -> Scripted:
        server = Scripted(answers)
        made.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in made:
        server.close()


JSON = b"Content-Type: application/json\r\n"
OK = b"HTTP/1.1 200 OK\r\n" + JSON + b'Content-Length: 11\r\n\r\n{"Name":1}\n'
CHUNKED = b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: chunked\r\n\r\n6\r\n[1, 2]\r\n0\r\n\r\n"
BUSY = b"HTTP/1.1 503 Service Unavailable\r\n" + JSON + b"Content-Length: 2\r\n\r\n{}"
MISSING = b"HTTP/1.1 404 Not Found\r\n" + JSON + b'Content-Length: 27\r\n\r\n{"Message": "Unknown item"}'


def test_keep_alive_reuses_one_connection_and_reads_chunked(scripted: type[Scripted]) -> None:
    server = scripted([OK, CHUNKED, OK])
    rest = OrthancRest(f"http://127.0.0.1:{server.port}", name="scripted")
    assert rest.get("/system") == {"Name": 1}
    assert rest.post("/tools/find", {"Level": "Series", "Query": {}}) == [1, 2]
    assert rest.get("/system") == {"Name": 1}
    assert [n for n, _ in server.requests] == [1, 1, 1]
    post = server.requests[1][1]
    assert post.startswith(b"POST /tools/find HTTP/1.1\r\n") and b"Content-Type: application/json\r\n" in post


def test_a_transient_failure_is_retried_when_idempotent(scripted: type[Scripted]) -> None:
    server = scripted([BUSY, None, OK])
    rest = OrthancRest(f"http://127.0.0.1:{server.port}", name="scripted", retry_deadline_s=30)
    assert rest.get("/system") == {"Name": 1}
    assert len(server.requests) == 3  # 503, then a dropped connection, then the answer


def test_a_move_that_may_have_arrived_is_never_sent_twice(scripted: type[Scripted]) -> None:
    server = scripted([BUSY, OK])
    rest = OrthancRest(f"http://127.0.0.1:{server.port}", name="scripted", retry_deadline_s=30)
    with pytest.raises(Unreachable, match="scripted did not answer"):
        rest.post("/modalities/PACS/move", {"Level": "Series"}, idempotent=False)
    assert len(server.requests) == 1


def test_an_error_answer_is_not_retried(scripted: type[Scripted]) -> None:
    server = scripted([MISSING, OK])
    rest = OrthancRest(f"http://127.0.0.1:{server.port}", name="scripted", retry_deadline_s=30)
    with pytest.raises(OrthancError) as missing:
        rest.get("/series/x")
    assert missing.value.status == 404 and missing.value.message == "Unknown item"
    assert len(server.requests) == 1


def test_retries_stop_at_the_deadline(scripted: type[Scripted]) -> None:
    server = scripted([BUSY] * 50)
    rest = OrthancRest(f"http://127.0.0.1:{server.port}", name="scripted", retry_deadline_s=0.3)
    with pytest.raises(Unreachable):
        rest.get("/system")
    assert 2 <= len(server.requests) < 50
