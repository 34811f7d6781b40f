"""Page bytes with sendfile on the plain path: `PlainStream.send_parts` on real sockets
(a memfd with known bytes as the file), and `ChunkSender` choosing that path."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from vmig.errors import TransportError
from vmig.memory import GuestMemory
from vmig.migration.memory_reader import ChunkSender
from vmig.migration.metrics import MigrationMetrics
from vmig.ranges import RangeTable
from vmig.transport.channel import SENDFILE_MIN_BYTES, file_spans
from vmig.transport.stream import FileSpan, Part, PlainStream

PAGE = 4096
FILE_SIZE = 16 << 20


@pytest.fixture
def memfd() -> Iterator[tuple[int, memoryview]]:
    """A memfd of FILE_SIZE random bytes, and a view of the same bytes (a copy)."""
    data = np.random.default_rng(17).integers(0, 256, FILE_SIZE, dtype=np.uint8).tobytes()
    fd = os.memfd_create("test-sendfile", os.MFD_CLOEXEC)
    os.write(fd, data)
    with memoryview(data) as view:
        yield fd, view
    os.close(fd)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        dialled = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return dialled, accepted


def read_exactly(sock: socket.socket, size: int, piece: int = 1 << 20,
                 pause: float = 0.0) -> bytes:
    out = bytearray()
    while len(out) < size:
        data = sock.recv(min(piece, size - len(out)))
        assert data, f"end of stream after {len(out)} of {size} bytes"
        out += data
        if pause:
            time.sleep(pause)
    return bytes(out)


def send_and_read(sender: PlainStream, reader_sock: socket.socket, parts: list[Part],
                  size: int, piece: int = 1 << 20, pause: float = 0.0) -> bytes:
    """Send `parts` while a thread reads `size` bytes from the other end; those bytes."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_exactly(reader_sock, size,
                                                                     piece, pause)))
    reader.start()
    sender.send_parts(parts)
    reader.join(60)
    assert got, "the reader did not finish"
    return got[0]


def parts_for(fd: int, view: memoryview, ranges: list[tuple[int, int]]) -> list[Part]:
    """A header, then each range: a FileSpan when long, else the view's bytes."""
    parts: list[Part] = [b"HEADER--"]
    for offset, length in ranges:
        piece = view[offset:offset + length]
        parts.append(FileSpan(fd, offset, piece) if length >= SENDFILE_MIN_BYTES else piece)
    return parts


def expected(view: memoryview, ranges: list[tuple[int, int]]) -> bytes:
    return b"HEADER--" + b"".join(bytes(view[o:o + n]) for o, n in ranges)


RANGES = [(0, 1 << 20), (5 * PAGE, PAGE), (3 << 20, 256 << 10), (7 * PAGE, 2 * PAGE),
          (9 << 20, 3 << 20), (FILE_SIZE - (64 << 10), 64 << 10)]


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_send_parts_sends_file_spans_with_sendfile_and_the_rest_with_sendmsg(
        memfd: tuple[int, memoryview], kind: str) -> None:
    fd, view = memfd
    a, b = socket.socketpair() if kind == "unix" else tcp_pair()
    with PlainStream(a, "peer") as sender, b:
        want = expected(view, RANGES)
        assert send_and_read(sender, b, parts_for(fd, view, RANGES), len(want)) == want
        assert sender.sendfile_bytes == sum(n for _, n in RANGES if n >= SENDFILE_MIN_BYTES)


def test_partial_writes_to_a_slow_reader_resume_where_they_stopped(
        memfd: tuple[int, memoryview], monkeypatch: pytest.MonkeyPatch) -> None:
    """A small send buffer and a reader that sips: sendfile writes a little at a time and
    hits EAGAIN (the socket has a timeout, so it is non-blocking underneath)."""
    fd, view = memfd
    waits: list[float | None] = []
    wait_writable = PlainStream._wait_writable

    def counted(sock_fd: int, timeout: float | None) -> None:
        waits.append(timeout)
        wait_writable(sock_fd, timeout)

    monkeypatch.setattr(PlainStream, "_wait_writable", staticmethod(counted))
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ranges = [(PAGE, 2 << 20), (0, PAGE), (6 << 20, 1 << 20)]
    with PlainStream(a, "peer", timeout=10) as sender, b:
        want = expected(view, ranges)
        assert send_and_read(sender, b, parts_for(fd, view, ranges), len(want),
                             piece=64 << 10, pause=0.002) == want
        assert sender.sendfile_bytes == 3 << 20
        assert waits and set(waits) == {10}  # EAGAIN came, and waited the socket's timeout


def test_a_peer_that_closes_is_a_transport_error(memfd: tuple[int, memoryview]) -> None:
    fd, view = memfd
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def read_a_little_then_close() -> None:
        read_exactly(b, 100_000)
        b.close()

    reader = threading.Thread(target=read_a_little_then_close)
    reader.start()
    with PlainStream(a, "peer", timeout=10) as sender, \
            pytest.raises(TransportError, match="sending to peer: the peer closed the connection"):
        sender.send_parts(parts_for(fd, view, [(0, FILE_SIZE)]))
    reader.join(10)


def test_a_reader_that_stops_reading_times_the_write_out(
        memfd: tuple[int, memoryview]) -> None:
    fd, view = memfd
    a, b = socket.socketpair()
    with PlainStream(a, "peer", timeout=0.3) as sender, b, \
            pytest.raises(TransportError, match="sending to peer: timed out"):
        sender.send_parts(parts_for(fd, view, [(0, FILE_SIZE)]))


def test_a_file_sendfile_refuses_is_sent_from_the_views(memfd: tuple[int, memoryview]) -> None:
    _fd, view = memfd
    pipe_read, pipe_write = os.pipe()  # sendfile cannot read a pipe at an offset: ESPIPE
    a, b = socket.socketpair()
    ranges = [(0, 1 << 20), (2 << 20, 128 << 10)]
    try:
        with PlainStream(a, "peer") as sender, b:
            want = expected(view, ranges)
            assert send_and_read(sender, b, parts_for(pipe_read, view, ranges),
                                 len(want)) == want
            assert sender.sendfile_refused and sender.sendfile_bytes == 0
    finally:
        os.close(pipe_read)
        os.close(pipe_write)


def test_file_spans_take_only_long_ranges() -> None:
    ranges = RangeTable([(0, PAGE), (8 * PAGE, SENDFILE_MIN_BYTES),
                                    (1 << 20, SENDFILE_MIN_BYTES - PAGE)])
    data = bytearray(2 << 20)
    views = [memoryview(data)[gpa:gpa + length] for gpa, length in ranges]
    parts = file_spans(ranges, views, 99)
    assert parts[0] is views[0] and parts[2] is views[2]
    assert parts[1] == FileSpan(99, 8 * PAGE, views[1])
    assert file_spans(ranges[:1], views[:1], 99) is None  # nothing long: sendmsg as before


class RecordingChannel:
    """What ChunkSender asks of a channel, recorded."""

    def __init__(self) -> None:
        self.memory_calls: list[int | None] = []
        self.submits = 0

    def submit_memory(self, ranges: RangeTable, views_for: object,
                      file_fd: int | None = None) -> None:
        self.memory_calls.append(file_fd)

    def submit(self, event: object, payload: object = ()) -> None:
        self.submits += 1


@pytest.mark.parametrize("level", [None, 1])
def test_chunk_sender_gives_the_memfd_only_to_uncompressed_chunks(level: int | None) -> None:
    with GuestMemory.create(4 << 20) as memory:
        memory.write(0, os.urandom(1 << 20))
        sender = ChunkSender(memory, MigrationMetrics("send"), level)
        channel = RecordingChannel()
        sender._submit_data(channel, RangeTable([(0, 1 << 20)]))  # type: ignore[arg-type]
        if level is None:
            assert channel.memory_calls == [memory.fd] and channel.submits == 0
        else:  # random bytes do not shrink: sent as they are, from the views
            assert channel.memory_calls == [] and channel.submits == 1


def test_guest_memory_sendfile_fd_is_the_memfd_while_open() -> None:
    memory = GuestMemory.create(1 << 20)
    assert memory.sendfile_fd() == memory.fd
    memory.close()
    assert memory.sendfile_fd() is None
