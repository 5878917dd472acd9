"""`status --serve`: the HTML report, live, over HTTP (standard library only).

Read-only by construction: every request opens the journal read-only, GET is the only
method (any other is answered 405), and there is no endpoint that writes. The page
reloads itself (meta refresh); it is rebuilt at most once per `min_age_s` (longer on a big
journal), whatever the number of viewers, so watching does not slow the run down.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .errors import DicomTransferError, JournalError
from .htmlreport import PageOptions, build_page
from .journal import Journal

DEFAULT_ADDRESS = "127.0.0.1:8099"
BUSY_FACTOR = 4.0  # a page is kept at least this many times as long as it took to build


class ServeError(DicomTransferError):
    exit_code = 2


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (loopback) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ServeError(f"--serve: {text!r} is not HOST:PORT (e.g. {DEFAULT_ADDRESS})")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class LivePage:
    """Builds the page from the journal on demand, cached for `min_age_s`, or longer on a big journal.

    A build takes ~1 s per 10^5 series: the page is kept at least BUSY_FACTOR times as long
    as it took to build, so that watching costs the machine at most ~20% of one core.
    """

    journal_path: Path
    opts: PageOptions
    min_age_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    now: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._page: bytes = b""
        self._built_at = -1e18
        self._took = 0.0

    def render(self) -> bytes:
        with self._lock:
            if self.clock() - self._built_at >= max(self.min_age_s, BUSY_FACTOR * self._took):
                started = self.clock()
                self._page = self._build().encode("utf-8")
                self._built_at = self.clock()
                self._took = self._built_at - started
            return self._page

    def _build(self) -> str:
        try:
            journal = Journal(self.journal_path, readonly=True)
        except JournalError as exc:
            return _waiting_page(str(exc), self.opts.refresh_s)
        try:
            return build_page(journal, self.now(), self.opts)
        finally:
            journal.close()


def _waiting_page(why: str, refresh_s: float) -> str:
    from html import escape

    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh"'
        f' content="{refresh_s:g}"><title>dicom-transfer: waiting</title></head>'
        f'<body data-live="1"><h1>dicom-transfer</h1><p id="waiting">{escape(why)}; this page reloads every'
        f" {refresh_s:g} s.</p></body></html>"
    )


class _Handler(BaseHTTPRequestHandler):
    server_version = "dicom-transfer"
    page: LivePage  # set on the subclass made by `make_server`

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path not in ("/", "/index.html", "/report.html"):
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            body = self.page.render()
        except Exception as exc:  # a half-written or foreign file: say so, keep serving
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(HTTPStatus.OK, body, "text/html; charset=utf-8")

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET only\n", "text/plain; charset=utf-8")

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>; every method but GET is refused, not "501 unsupported".
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status is HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # the live page is polled every few seconds: no line per request


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, page: LivePage) -> ThreadingHTTPServer:
    """A threading HTTP server serving `page`; raises ServeError when the address cannot be bound."""
    handler = type("Handler", (_Handler,), {"page": page})
    server_class = _Server6 if ":" in host else ThreadingHTTPServer
    try:
        server = server_class((host, port), handler)
    except OSError as exc:
        raise ServeError(f"--serve {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True
    return server
