"""The VPN-like relay (tests/wanlink.py): delay, rate cap, pipelining, EOF/RST, cuts, DICOM.

The first tests use plain sockets on loopback (a threaded echo server and a sink that
timestamps what it receives); the last two send real C-STOREs and REST calls to a real
Orthanc through the relay and compare with the same calls made directly.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_transfer import series_count
from wanlink import P_DATA_TF, WanLink, WanLinkProcess

from dicom_transfer.orthanc import OrthancRest
from dicom_transfer.stack import Stack
from dicom_transfer.synthetic import instance_dataset, make_series

HOST = "127.0.0.1"


class Server(threading.Thread):
    """A threaded TCP server on a free port; `mode` 'echo' or 'sink' (timestamps every recv)."""

    def __init__(self, mode: str = "echo") -> None:
        super().__init__(daemon=True)
        self.mode = mode
        self.sock = socket.create_server((HOST, 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[float, bytes]] = []  # sink: (perf_counter, data) of every recv
        self.eof_at: float | None = None
        self.errors: list[BaseException] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with conn:
                while data := conn.recv(65536):
                    if self.mode == "echo":
                        conn.sendall(data)
                    else:
                        self.received.append((time.perf_counter(), data))
                self.eof_at = time.perf_counter()
                if self.mode == "sink":
                    conn.sendall(b"bye")  # after the client's EOF: the other direction still works
        except OSError as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Server]:
    server = Server("echo")
    server.start()
    yield server
    server.close()


@pytest.fixture
def sink() -> Iterator[Server]:
    server = Server("sink")
    server.start()
    yield server
    server.close()


def _client(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _wait(cond, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_ping_pong_costs_one_rtt(echo: Server) -> None:
    """A 1-byte ping-pong over a 20 ms link takes 20 ms (within 3 ms); set-up costs one RTT more."""
    with WanLink(HOST, echo.port, rtt_ms=20, mbit=100) as link:
        t0 = time.perf_counter()
        sock = _client(link.port)
        sock.sendall(b"x")
        _recv_exactly(sock, 1)
        first = time.perf_counter() - t0
        times = []
        for _ in range(15):
            t = time.perf_counter()
            sock.sendall(b"y")
            _recv_exactly(sock, 1)
            times.append(time.perf_counter() - t)
        sock.close()
    rtt = statistics.median(times)
    assert 0.020 <= rtt <= 0.023, f"median ping-pong {rtt * 1000:.1f} ms, all {[round(x * 1000, 1) for x in times]}"
    assert 0.040 <= first <= 0.046, f"connect + first ping-pong {first * 1000:.1f} ms (handshake + one RTT)"


def test_bulk_transfer_is_capped(sink: Server) -> None:
    """20 Mbit: 2.5 MB take ~1 s plus half an RTT (0.95-1.15 s), not the loopback's milliseconds."""
    payload = bytes(range(256)) * (2_500_000 // 256)
    with WanLink(HOST, sink.port, rtt_ms=20, mbit=20) as link:
        sock = _client(link.port)
        t0 = time.perf_counter()
        sock.sendall(payload)
        assert _wait(lambda: sum(len(d) for _, d in sink.received) >= len(payload), 10)
        elapsed = sink.received[-1][0] - t0
        sock.close()
    expected = len(payload) * 8 / 20e6 + 0.010
    assert b"".join(d for _, d in sink.received) == payload
    assert 0.95 * expected <= elapsed <= 1.15 * expected, f"{elapsed:.3f} s for {len(payload)} B, not {expected:.3f}"


def test_chunks_are_pipelined(sink: Server) -> None:
    """Two 1-byte writes 5 ms apart on a 100 ms link arrive ~5 ms apart, each ~50 ms after sending."""
    with WanLink(HOST, sink.port, rtt_ms=100, mbit=100, handshake=False) as link:
        sock = _client(link.port)
        time.sleep(0.05)  # the relay has connected to the sink
        t1 = time.perf_counter()
        sock.sendall(b"a")
        time.sleep(0.005)
        t2 = time.perf_counter()
        sock.sendall(b"b")
        assert _wait(lambda: len(sink.received) >= 2 or b"ab" in b"".join(d for _, d in sink.received))
        sock.close()
    assert [d for _, d in sink.received[:2]] == [b"a", b"b"], sink.received
    (a_at, _), (b_at, _) = sink.received[:2]
    assert 0.049 <= a_at - t1 <= 0.054 and 0.049 <= b_at - t2 <= 0.054, (a_at - t1, b_at - t2)
    assert abs((b_at - a_at) - (t2 - t1)) <= 0.002, f"gap {1000 * (b_at - a_at):.1f} ms, sent {1000 * (t2 - t1):.1f}"


def test_eof_follows_the_data_and_the_other_way_goes_on(sink: Server) -> None:
    """A half-close reaches the server after the data, rtt/2 late; the server's reply still comes back."""
    with WanLink(HOST, sink.port, rtt_ms=40, mbit=100) as link:
        sock = _client(link.port)
        time.sleep(0.1)  # past the handshake's RTT
        sock.sendall(b"hello")
        t0 = time.perf_counter()
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
        back = time.perf_counter() - t0
        sock.close()
    assert b"".join(d for _, d in sink.received) == b"hello"
    assert sink.eof_at is not None and 0.019 <= sink.eof_at - t0 <= 0.045, sink.eof_at and sink.eof_at - t0
    assert reply == b"bye" and 0.039 <= back <= 0.080, (reply, back)


def test_reset_is_forwarded(echo: Server) -> None:
    """A client's RST (SO_LINGER 0) reaches the server as a connection reset, not as a clean EOF."""
    with WanLink(HOST, echo.port, rtt_ms=10, mbit=100) as link:
        sock = _client(link.port)
        sock.sendall(b"ping")
        assert _recv_exactly(sock, 4) == b"ping"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert _wait(lambda: bool(echo.errors) or echo.eof_at is not None)
        assert _wait(lambda: link.open_connections == 0)
        assert link.connections[0].reset
    assert echo.errors and isinstance(echo.errors[0], ConnectionResetError), (echo.errors, echo.eof_at)


def test_many_connections_at_once(echo: Server) -> None:
    """64 concurrent connections each get their own bytes back, in ~3 RTT in all, not 64 in turn."""

    def one(i: int) -> bytes:
        with _client(link.port) as sock:
            msg = f"conn-{i:03d}-".encode() * 100
            sock.sendall(msg)
            return _recv_exactly(sock, len(msg)) == msg and b"ok"

    with WanLink(HOST, echo.port, rtt_ms=20, mbit=100) as link:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        elapsed = time.perf_counter() - t0
        assert len(link.connections) == 64
    assert results == [b"ok"] * 64
    assert elapsed < 0.25, f"{elapsed:.3f} s for 64 connections"


def test_cut_holds_traffic_until_restore(echo: Server) -> None:
    """While cut nothing gets through either way; after restore every byte arrives, in order."""
    with WanLink(HOST, echo.port, rtt_ms=10, mbit=100) as link:
        sock = _client(link.port)
        sock.sendall(b"before")
        assert _recv_exactly(sock, 6) == b"before"
        link.cut()
        sock.sendall(b"during-1")
        sock.sendall(b"during-2")
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(100)
        fresh = _client(link.port)  # accepted, but its target is not reached while cut
        fresh.sendall(b"new")
        time.sleep(0.1)
        assert len(link.connections) == 2 and link.connections[1].target_connected_at is None
        t = time.perf_counter()
        link.restore()
        sock.settimeout(5)
        fresh.settimeout(5)
        assert _recv_exactly(sock, 16) == b"during-1during-2"
        assert time.perf_counter() - t >= 0.009
        assert _recv_exactly(fresh, 3) == b"new"
        sock.close()
        fresh.close()


def test_the_link_in_a_process_of_its_own(echo: Server) -> None:
    """WanLinkProcess (the benchmarks' link): the same delay, a second target, cut and restore, a clean stop."""
    other = Server("echo")
    other.start()
    link = WanLinkProcess(HOST, echo.port, rtt_ms=20, mbit=100).start()
    try:
        second = link.add_target(HOST, other.port)
        times = []
        for port in (link.port, second):
            sock = _client(port)
            sock.sendall(b"x")
            _recv_exactly(sock, 1)
            for _ in range(5):
                t = time.perf_counter()
                sock.sendall(b"y")
                _recv_exactly(sock, 1)
                times.append(time.perf_counter() - t)
            if port == second:
                link.cut()
                assert link.is_cut
                sock.sendall(b"held")
                sock.settimeout(0.2)
                with pytest.raises(socket.timeout):
                    sock.recv(10)
                link.restore()
                sock.settimeout(5)
                assert _recv_exactly(sock, 4) == b"held"
            sock.close()
        assert 0.020 <= statistics.median(times) <= 0.024, [round(x * 1000, 1) for x in times]
    finally:
        link.stop()
        other.close()
    with pytest.raises(OSError):
        _client(second)  # stopped: nothing listens any more


# ---------------------------------------------------------------------------------------
# Real DICOM and HTTP through the relay


@pytest.mark.integration
def test_c_store_costs_one_rtt_more_per_instance(same: Stack) -> None:
    """C-STOREs over a 20 ms link take one RTT more each (16-26 ms) than straight to Orthanc."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    series = make_series(2, 12, seed=71)
    centre = same.centre.spec

    def per_instance(port: int, s) -> list[float]:  # noqa: ANN001
        ae = AE(ae_title="WANTEST")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(HOST, port, ae_title=centre.aet)
        assert assoc.is_established
        times = []
        try:
            for i in range(len(s.sop_uids)):
                ds = instance_dataset(s, i)
                t = time.perf_counter()
                status = assoc.send_c_store(ds)
                times.append(time.perf_counter() - t)
                assert status.Status == 0x0000, status
        finally:
            assoc.release()
        return times

    direct = per_instance(centre.dicom_port, series[0])
    with WanLink(HOST, centre.dicom_port, rtt_ms=20, mbit=100, dicom=True) as link:
        relayed = per_instance(link.port, series[1])
        pdata = link.connections[0].first_pdu(P_DATA_TF)
    extra = statistics.median(relayed) - statistics.median(direct)
    ms = [round(1000 * x, 1) for x in (statistics.median(direct), statistics.median(relayed))]
    assert 0.016 <= extra <= 0.026, f"median ms direct/relayed {ms}; relayed {[round(1000 * x) for x in relayed]}"
    assert pdata is not None  # the PDU walker saw the association's P-DATA
    for s in series:
        assert series_count(same.centre, s.series_uid) == 12


@pytest.mark.integration
def test_rest_get_costs_one_rtt(same: Stack) -> None:
    """A keep-alive REST GET to Orthanc over a 20 ms link takes one RTT more (17-26 ms) than directly."""

    def median_get(url: str) -> float:
        rest = OrthancRest(url, name="wan")
        try:
            rest.get("/system")  # connect
            times = []
            for _ in range(10):
                t = time.perf_counter()
                rest.get("/system")
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        finally:
            rest.close()

    direct = median_get(same.centre.url)
    with WanLink(HOST, same.centre.spec.http_port, rtt_ms=20, mbit=100) as link:
        relayed = median_get(f"http://{HOST}:{link.port}")
    assert 0.017 <= relayed - direct <= 0.026, f"direct {direct * 1000:.1f} ms, relayed {relayed * 1000:.1f} ms"
