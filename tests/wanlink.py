"""A VPN-like link for tests and benchmarks: a TCP relay that delays and rate-caps traffic.

    with WanLink("127.0.0.1", dest_port, rtt_ms=20, mbit=100) as link:
        connect to ("127.0.0.1", link.port) instead of dest_port

Where the kernel has no sch_netem, this stands in for `tc netem delay` + a rate cap. It
runs its own asyncio loop in a daemon thread. Every accepted connection gets its own
connection to the target; both directions are relayed with:

- a propagation delay of rtt/2 per direction, per chunk: bytes read at time t leave at
  t + serialization and are written out at that + rtt/2. Chunks are pipelined: many can
  be on the way at once, the delay is not paid once per chunk in turn.
- a bandwidth cap per direction, shared by every connection of the link: a "link busy
  until" clock; each chunk departs when the link is free and occupies it len*8/rate s.
- connection set-up costs one RTT, as a TCP handshake does: the target is connected
  rtt/2 after the accept, and the client's first bytes cannot depart before accept + rtt
  (its SYN, SYN-ACK and first data would have crossed the link by then).
- half-close: an EOF is forwarded after the data read before it (`write_eof`), the other
  direction goes on; a connection reset (read error) is forwarded as an RST (SO_LINGER 0)
  after the delay; a refused target resets the client.
- back-pressure: a direction stops reading once `buffer_bytes` are queued and not yet
  written out (at least twice the bandwidth-delay product), so a sender cannot pour
  megabytes into the relay faster than the cap.
- `cut()` / `restore()`: a black hole both ways. Nothing is delivered while cut, reading
  stops when the buffers fill, new connections are accepted but their target is not
  connected; on restore everything queued is delivered (no earlier than rtt/2 after the
  restore), in order, as TCP retransmission would. Bytes are never dropped: a TCP stream
  over a black hole loses no data, it stalls (and the applications' own timeouts fire).

Records, for benchmarks: `connections` (one `Conn` per accepted connection, wall-clock
times `time.time()`), and with `dicom=True` the DICOM PDUs (type, wall time) written to
the target on each connection (`Conn.pdus`), e.g. the first P-DATA-TF of an association.
TCP_NODELAY is set on both sockets of every relayed connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 32 * 1024
EOF, RESET = object(), object()
P_DATA_TF = 0x04


@dataclass
class Conn:
    """One relayed connection, as the relay saw it (wall-clock times, `time.time()`)."""

    id: int
    opened_at: float
    target: tuple[str, int]
    peer: tuple[str, int] | None = None
    target_connected_at: float | None = None
    first_up_at: float | None = None  # the client's first bytes written to the target
    closed_at: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    reset: bool = False
    pdus: list[tuple[int, float]] = field(default_factory=list)  # (PDU type, written to target at), dicom=True

    def first_pdu(self, pdu_type: int) -> float | None:
        """When the first PDU of `pdu_type` (e.g. 0x04 P-DATA-TF) was written to the target."""
        return next((at for t, at in self.pdus if t == pdu_type), None)


class _PduWalker:
    """Finds DICOM PDU boundaries in a byte stream (6-byte header: type, reserved, length)."""

    def __init__(self, conn: Conn) -> None:
        self.conn, self.skip, self.header = conn, 0, b""

    def feed(self, data: bytes, at: float) -> None:
        view, i = memoryview(data), 0
        while i < len(view):
            if self.skip:
                step = min(self.skip, len(view) - i)
                self.skip, i = self.skip - step, i + step
                continue
            need = 6 - len(self.header)
            self.header += bytes(view[i : i + need])
            i += need
            if len(self.header) == 6:
                pdu_type, length = self.header[0], struct.unpack(">I", self.header[2:6])[0]
                self.conn.pdus.append((pdu_type, at))
                self.skip, self.header = length, b""


class _Direction:
    """One direction of the link: the serialization clock every connection shares."""

    def __init__(self, mbit: float | None) -> None:
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None
        self.busy_until = 0.0

    def depart(self, now: float, n: int, not_before: float = 0.0) -> float:
        """When a chunk of `n` bytes read at `now` has fully left the sender's end."""
        start = max(now, not_before, self.busy_until)
        if self.bytes_per_s is None:
            return start
        self.busy_until = start + n / self.bytes_per_s
        return self.busy_until


class _Pipe:
    """One direction of one connection: read, stamp with a delivery time, write when due."""

    def __init__(self, link: WanLink, conn: Conn, up: bool, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, not_before: float = 0.0) -> None:  # fmt: skip
        self.link, self.conn, self.up = link, conn, up
        self.reader, self.writer = reader, writer
        self.direction = link._up if up else link._down
        self.not_before = not_before
        self.queue: collections.deque[tuple[float, object]] = collections.deque()
        self.queued = 0
        self.room = asyncio.Event()
        self.finished = False
        self.walker = _PduWalker(conn) if (up and link.dicom) else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queued >= self.link.buffer_bytes:
                self.room.clear()
                await self.room.wait()
            try:
                data = await self.reader.read(CHUNK)
            except OSError:
                self._enqueue(loop.time(), RESET, 0)
                return
            if not data:
                self._enqueue(loop.time(), EOF, 0)
                return
            self._enqueue(loop.time(), data, len(data))
            with contextlib.suppress(OSError):  # the far side's own pipe reports its failure
                await self.writer.drain()

    def _enqueue(self, now: float, item: object, n: int) -> None:
        at = self.direction.depart(now, n, self.not_before) + self.link.delay_s
        self.queue.append((at, item))
        self.queued += n
        self.link._loop.call_at(at, self.deliver)

    def deliver(self) -> None:
        """Write out every chunk that is due (in order); called by the loop's timers."""
        if self.link._cut:
            return
        now = self.link._loop.time()
        while self.queue and self.queue[0][0] <= now + 0.0005:
            _, item = self.queue.popleft()
            self._write(item)
        self.room.set()

    def _write(self, item: object) -> None:
        transport = self.writer.transport
        if item is EOF:
            if not transport.is_closing() and self.writer.can_write_eof():
                self.writer.write_eof()
            self._finish()
        elif item is RESET:
            self.conn.reset = True
            self.link._abort(self.conn)
        elif isinstance(item, bytes):
            self.queued -= len(item)
            if transport.is_closing():
                return
            self.writer.write(item)
            if self.up:
                self.conn.bytes_up += len(item)
                if self.conn.first_up_at is None:
                    self.conn.first_up_at = time.time()
                if self.walker is not None:
                    self.walker.feed(item, time.time())
            else:
                self.conn.bytes_down += len(item)

    def _finish(self) -> None:
        self.finished = True
        self.link._maybe_close(self.conn)

    def requeue_after_cut(self, earliest: float) -> None:
        """After a restore: nothing that was held arrives sooner than `earliest`."""
        self.queue = collections.deque((max(at, earliest), item) for at, item in self.queue)
        if self.queue:
            self.link._loop.call_at(self.queue[0][0], self.deliver)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class WanLink:
    """A delaying, rate-capping TCP relay to `target_host:target_port`; see the module doc."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rtt_ms: float,
        mbit: float | None = None,
        listen_host: str = "127.0.0.1",
        *,
        dicom: bool = False,
        buffer_bytes: int | None = None,
        handshake: bool = True,
    ) -> None:
        self.target = (target_host, target_port)
        self.rtt_ms, self.mbit, self.listen_host = rtt_ms, mbit, listen_host
        self.delay_s = rtt_ms / 2000.0
        self.dicom, self.handshake = dicom, handshake
        bdp = int((mbit or 1000) * 1e6 / 8 * rtt_ms / 1000)
        self.buffer_bytes = buffer_bytes or max(256 * 1024, 2 * bdp)
        self.port = 0
        self.ports: dict[tuple[str, int], int] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self.connections: list[Conn] = []
        self._up, self._down = _Direction(mbit), _Direction(mbit)
        self._cut = False
        self._restored: asyncio.Event | None = None
        self._pipes: dict[int, tuple[_Pipe | None, _Pipe | None]] = {}
        self._writers: dict[int, list[asyncio.StreamWriter]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> WanLink:
        """Listen on a free port of `listen_host` (`.port`); returns once it accepts."""
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"wanlink-{self.target[1]}", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._restored = asyncio.Event()
        self._restored.set()
        self.port = await self._serve(self.target)

    async def _serve(self, target: tuple[str, int]) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._accept(reader, writer, target)

        server = await asyncio.start_server(accept, self.listen_host, 0, backlog=128)
        self._servers.append(server)
        port = int(server.sockets[0].getsockname()[1])
        self.ports[target] = port
        return port

    def add_target(self, target_host: str, target_port: int) -> int:
        """Another listening port, relaying to another target over the same link; its port.

        The same link: every target shares the bandwidth clocks, the delay and the cuts
        (a VPN carries DICOM and HTTP alike).
        """
        return asyncio.run_coroutine_threadsafe(self._serve((target_host, target_port)), self._loop).result(10)

    def stop(self) -> None:
        """Stop listening, reset every open connection, end the thread; safe to call twice."""
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop.close()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for writers in list(self._writers.values()):
            for w in writers:
                w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> WanLink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()

    # -- outage ----------------------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Black-hole both directions until `restore()` (held, not dropped: see module doc)."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """End a cut: held data is delivered, rtt/2 after now at the earliest."""
        self._call(self._do_restore)

    def _call(self, fn: object) -> None:
        async def run() -> None:
            fn()  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _do_cut(self) -> None:
        self._cut = True
        assert self._restored is not None
        self._restored.clear()

    def _do_restore(self) -> None:
        self._cut = False
        assert self._restored is not None
        self._restored.set()
        earliest = self._loop.time() + self.delay_s
        for direction in (self._up, self._down):
            direction.busy_until = max(direction.busy_until, self._loop.time())
        for pipes in list(self._pipes.values()):
            for pipe in pipes:
                if pipe is not None:
                    pipe.requeue_after_cut(earliest)

    # -- one connection --------------------------------------------------------------------

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                      target: tuple[str, int]) -> None:  # fmt: skip
        conn = Conn(id=len(self.connections), opened_at=time.time(), target=target,
                    peer=c_writer.get_extra_info("peername"))  # fmt: skip
        self.connections.append(conn)
        self._writers[conn.id] = [c_writer]
        self._pipes[conn.id] = (None, None)
        _nodelay(c_writer)
        accepted = self._loop.time()
        rtt = 2 * self.delay_s if self.handshake else 0.0
        try:
            await asyncio.sleep(rtt / 2)  # the SYN crosses the link
            assert self._restored is not None
            await self._restored.wait()
            t_reader, t_writer = await asyncio.open_connection(*target)
        except OSError:
            await asyncio.sleep(rtt / 2)  # the RST crosses back
            self._close(conn, reset=True)
            return
        conn.target_connected_at = time.time()
        self._writers[conn.id].append(t_writer)
        _nodelay(t_writer)
        up = _Pipe(self, conn, True, c_reader, t_writer, not_before=accepted + rtt)
        down = _Pipe(self, conn, False, t_reader, c_writer)
        self._pipes[conn.id] = (up, down)
        await asyncio.gather(up.run(), down.run(), return_exceptions=True)

    def _maybe_close(self, conn: Conn) -> None:
        up, down = self._pipes.get(conn.id, (None, None))
        if up is not None and down is not None and up.finished and down.finished:
            self._close(conn)

    def _abort(self, conn: Conn) -> None:
        self._close(conn, reset=True)

    def _close(self, conn: Conn, reset: bool = False) -> None:
        for w in self._writers.pop(conn.id, []):
            if reset:
                _rst(w)
            else:
                w.close()
        self._pipes.pop(conn.id, None)
        if conn.closed_at is None:
            conn.closed_at = time.time()

    # -- figures ---------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._writers)


class WanLinkProcess:
    """A `WanLink` in a process of its own: `start`, `port`, `add_target`, `cut`, `restore`, `stop`.

    For benchmarks whose PACS runs in the benchmark's own process: a link in a thread
    there would take the PACS's interpreter lock for every chunk it relays, and a VPN does
    not slow a PACS down. Commands go over the child's stdin, one line each, answered on
    its stdout.
    """

    def __init__(self, target_host: str, target_port: int, rtt_ms: float, mbit: float | None = None, *,
                 dicom: bool = False) -> None:  # fmt: skip
        self.target = (target_host, target_port)
        self.rtt_ms, self.mbit, self.dicom = rtt_ms, mbit, dicom
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._cut = False

    def start(self) -> WanLinkProcess:
        args = [sys.executable, __file__, self.target[0], str(self.target[1]), str(self.rtt_ms),
                str(self.mbit or 0), "dicom" if self.dicom else "-"]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.port = int(self._ask(None))
        return self

    def _ask(self, command: str | None) -> str:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        if command is not None:
            self._proc.stdin.write(command + "\n")
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the link process ended (exit {self._proc.poll()})")
        return answer.strip()

    def add_target(self, target_host: str, target_port: int) -> int:
        return int(self._ask(f"add {target_host} {target_port}"))

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        self._ask("cut")
        self._cut = True

    def restore(self) -> None:
        self._ask("restore")
        self._cut = False

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # its loop ends on EOF
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _serve_commands(argv: list[str]) -> None:
    """The child of `WanLinkProcess`: a link on argv's target; commands from stdin."""
    host, port, rtt, mbit, dicom = argv
    link = WanLink(host, int(port), rtt_ms=float(rtt), mbit=float(mbit) or None, dicom=dicom == "dicom").start()
    print(link.port, flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["add"]:
                print(link.add_target(words[1], int(words[2])), flush=True)
            elif words == ["cut"]:
                link.cut()
                print("ok", flush=True)
            elif words == ["restore"]:
                link.restore()
                print("ok", flush=True)
    finally:
        link.stop()


if __name__ == "__main__":
    _serve_commands(sys.argv[1:])
