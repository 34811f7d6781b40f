"""Transport on real sockets (socketpairs and loopback), without KVM: streams, channels, pool."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from vmig.errors import ConfigError, MigrationError, TransportError
from vmig.proto import (
    HELLO_SIZE,
    ConnectionClosed,
    ConnectionRole,
    MemoryRequest,
    parse_hello,
)
from vmig.ranges import RangeTable
from vmig.transport.address import listen, parse_url
from vmig.transport.channel import ReceiverChannel, SenderChannel, answer_hello
from vmig.transport.pool import SenderPool
from vmig.transport.stream import Stream

PAGE = 4096


def test_parse_url():
    assert str(parse_url("tcp:127.0.0.1:7000")) == "tcp:127.0.0.1:7000"
    assert parse_url("unix:/tmp/x.sock").path == "/tmp/x.sock"
    for bad in ("127.0.0.1:7000", "tcp:host", "tcp:host:99999", "unix:", "udp:x:1"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_scatter_gather_round_trip_many_buffers():
    a, b = socket.socketpair()
    source = np.random.default_rng(1).integers(0, 255, 3000 * 64, dtype=np.uint8).tobytes()
    pieces = [memoryview(source)[i:i + 64] for i in range(0, len(source), 64)]  # > IOV_MAX
    target = bytearray(len(source))
    views = [memoryview(target)[i:i + 64] for i in range(0, len(target), 64)]
    sender, receiver = Stream(a, "a"), Stream(b, "b")
    thread = threading.Thread(target=sender.send_all, args=(pieces,))
    thread.start()
    receiver.recv_into_all(views)
    thread.join()
    assert bytes(target) == source
    sender.close()
    with pytest.raises(TransportError, match="closed the connection"):
        receiver.recv_into_all([memoryview(bytearray(10))])
    receiver.close()


def test_fd_passing(tmp_path):
    a, b = socket.socketpair()
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    with open(path, "rb") as handle:
        Stream(a, "a").send_with_fds(b"x" * 16, [handle.fileno()])
    data, fds = Stream(b, "b").recv_some_with_fds(16)  # one small sendmsg: one read
    assert data == b"x" * 16 and len(fds) == 1
    assert os.read(fds[0], 5) == b"hello"
    os.close(fds[0])
    a.close()
    b.close()


class MemoryServer:
    """A minimal receiver over real loopback sockets writing into a bytearray."""

    def __init__(self, size: int, fail_after: int | None = None) -> None:
        self.memory = bytearray(size)
        self.listener = listen(parse_url("tcp:127.0.0.1:0"))
        self.url = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests_per_connection: list[int] = []
        self.fail_after = fail_after
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept)
        self.accepter.start()

    def _accept(self) -> None:
        self.listener.settimeout(5)
        for _ in range(self.expected):
            sock, _ = self.listener.accept()
            stream = Stream(sock, "sender")
            hello = parse_hello(stream.recv_exact(HELLO_SIZE))
            answer_hello(stream)
            role = ConnectionRole.MEMORY  # exercise the MEMORY path on every connection
            channel = ReceiverChannel(stream, role, hello.migration_id)
            index = len(self.requests_per_connection)
            self.requests_per_connection.append(0)
            thread = threading.Thread(target=self._serve, args=(channel, index))
            thread.start()
            self.threads.append(thread)

    def _serve(self, channel: ReceiverChannel, index: int) -> None:
        while True:
            event = channel.next_request()
            if isinstance(event, ConnectionClosed):
                channel.close()
                return
            assert isinstance(event, MemoryRequest)
            views = [memoryview(self.memory)[gpa:gpa + n] for gpa, n in event.ranges]
            channel.receive_payload(views)
            self.requests_per_connection[index] += 1
            if self.fail_after is not None and sum(self.requests_per_connection) > self.fail_after:
                channel.reject("disk on fire")
                channel.close()
                return
            channel.accept()

    expected = 4

    def close(self) -> None:
        self.accepter.join()
        for thread in self.threads:
            thread.join(10)
        self.listener.close()


def _pool(url: str, count: int) -> SenderPool:
    address = parse_url(url)
    channels = []
    for _ in range(count):
        sock = socket.create_connection((address.host, address.port))
        channels.append(SenderChannel(Stream(sock, url), ConnectionRole.MEMORY, bytes(16)))
    return SenderPool(channels)


def test_pool_moves_every_chunk_over_all_connections():
    size = 16 << 20
    source = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8).tobytes()
    server = MemoryServer(size)
    pool = _pool(server.url, 4)
    # scattered ranges: every other 64 KiB
    table = RangeTable([(gpa, 65536) for gpa in range(0, size, 131072)])
    acked: list[int] = []

    def views_for(ranges: RangeTable) -> list[memoryview]:
        return [memoryview(source)[gpa:gpa + n] for gpa, n in ranges]

    sent = pool.send_iteration(table.partition(256 * 1024), views_for, acked.append)
    for channel in pool.channels:
        channel.close()
    server.close()
    assert sent == table.total_bytes == sum(acked)
    for gpa, n in table:
        assert server.memory[gpa:gpa + n] == source[gpa:gpa + n]
    assert server.memory[65536:131072] == bytes(65536)  # untouched gaps stay zero
    assert all(count > 0 for count in server.requests_per_connection)  # shared queue
    assert sum(server.requests_per_connection) == len(table.partition(256 * 1024))


def test_pool_raises_the_receivers_error_and_joins_its_threads():
    size = 8 << 20
    server = MemoryServer(size, fail_after=3)
    pool = _pool(server.url, 4)
    source = bytes(size)
    with pytest.raises((MigrationError, TransportError)):
        pool.send_iteration(RangeTable.full(size).partition(65536),
                            lambda r: [memoryview(source)[g:g + n] for g, n in r])
    assert not [t for t in threading.enumerate() if t.name.startswith("migrate-send")]
    for channel in pool.channels:
        channel.close()
    server.close()

