"""Transport on real sockets (socketpairs and loopback), without KVM: addresses, plain and
TLS streams, the handshake over sockets, both pools."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_for
from tlsfiles import TlsDirs

from vmig.errors import ConfigError, MigrationError, TransportError
from vmig.proto import (
    Config,
    ConnectionClosed,
    ConnectionRole,
    MemoryRequest,
    Start,
    encode_hello,
)
from vmig.ranges import RangeTable
from vmig.transport.address import bind_unix_socket, parse_url
from vmig.transport.channel import Identity, ReceiverChannel, SenderChannel
from vmig.transport.endpoint import dial
from vmig.transport.receiver_pool import ReceiverPool
from vmig.transport.security import Security, TlsSide, load_tls
from vmig.transport.sender_pool import SenderPool, plain_memory
from vmig.transport.stream import PlainStream

PAGE = 4096
TOKEN = b"0123456789abcdef0123456789abcdef"
MID = bytes(range(16))


def test_parse_url():
    assert str(parse_url("tcp:127.0.0.1:7000")) == "tcp:127.0.0.1:7000"
    assert str(parse_url("tcp:[::1]:7000")) == "tcp:[::1]:7000"
    assert parse_url("tcp:[::1]:7000").host == "::1"
    assert parse_url("unix:/tmp/x.sock").path == "/tmp/x.sock"
    for bad in ("127.0.0.1:7000", "tcp:host", "tcp:host:99999", "unix:", "udp:x:1",
                "tcp:::1:7000"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError, match=r"write tcp:host:7 \(no '//'"):
        parse_url("tcp://host:7")


def test_scatter_gather_round_trip_many_buffers():
    a, b = socket.socketpair()
    source = np.random.default_rng(1).integers(0, 255, 3000 * 64, dtype=np.uint8).tobytes()
    pieces = [memoryview(source)[i:i + 64] for i in range(0, len(source), 64)]  # > IOV_MAX
    target = bytearray(len(source))
    views = [memoryview(target)[i:i + 64] for i in range(0, len(target), 64)]
    sender, receiver = PlainStream(a, "a"), PlainStream(b, "b")
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
        PlainStream(a, "a").send_with_fds(b"x" * 16, [handle.fileno()])
    data, fds = PlainStream(b, "b").recv_some_with_fds(16)  # one small sendmsg: one read
    assert data == b"x" * 16 and len(fds) == 1
    assert os.read(fds[0], 5) == b"hello"
    os.close(fds[0])
    a.close()
    b.close()


# --- a minimal receiving side: the real pool, memory in a bytearray ----------------------------


class MemoryServer:
    """A ReceiverPool that writes MEMORY requests into a bytearray (MAIN serves them too)."""

    def __init__(self, size: int, security: Security, fail_after: int | None = None,
                 max_connections: int = 128, **pool_args: object) -> None:
        self.memory = bytearray(size)
        self.fail_after = fail_after
        self.served = 0
        self.requests_per_connection: dict[int, int] = {}
        self.pool = ReceiverPool(parse_url("tcp:127.0.0.1:0"), security,
                                 max_connections=max_connections, serve_memory=self._serve,
                                 **pool_args)
        self.address = self.pool.start()
        self.url = str(self.address)
        self.main_thread = threading.Thread(target=self._main)
        self.main_thread.start()

    def _main(self) -> None:
        channel = self.pool.main()
        if channel is not None:
            self._serve(channel)

    def _serve(self, channel: ReceiverChannel) -> None:
        key = id(channel)
        self.requests_per_connection[key] = 0
        while True:
            try:
                event = channel.next_request()
            except Exception:
                return
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, Start):
                self.pool.close_admission(event.connections - 1, 5.0)
            if isinstance(event, Start | Config):
                channel.accept()
                continue
            assert isinstance(event, MemoryRequest)
            views = [memoryview(self.memory)[gpa:gpa + n] for gpa, n in event.ranges]
            channel.receive_payload(views)
            self.requests_per_connection[key] += 1
            self.served += 1
            if self.fail_after is not None and self.served > self.fail_after:
                channel.reject("disk on fire")
                return
            channel.accept()

    def close(self) -> None:
        self.pool.close()
        self.main_thread.join(10)


def _channels(url: str, count: int, security: Security, start: bool = True
              ) -> list[SenderChannel]:
    """MAIN and count-1 MEMORY connections; START and CONFIG sent when `start`."""
    address = parse_url(url)
    channels = []
    for index in range(count):
        role = ConnectionRole.MAIN if index == 0 else ConnectionRole.MEMORY
        channels.append(SenderChannel(dial(address, security), Identity(role, MID, index=index),
                                      token=security.token))
    if start:
        channels[0].request(Start(migration_id=MID, connections=count))
        channels[0].request(Config(b"{}"))
    return channels


def _move_16m(server_security: Security, client_security: Security) -> None:
    size = 16 << 20
    source = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8).tobytes()
    server = MemoryServer(size, server_security)
    channels = _channels(server.url, 4, client_security)
    pool = SenderPool(channels)
    table = RangeTable([(gpa, 65536) for gpa in range(0, size, 131072)])  # every other 64 KiB
    acked: list[int] = []

    def views_for(ranges: RangeTable) -> list[memoryview]:
        return [memoryview(source)[gpa:gpa + n] for gpa, n in ranges]

    sent = pool.send_iteration(table.partition(64 * 1024), plain_memory(views_for),
                               lambda index, chunk: acked.append(chunk.ranges.total_bytes))
    for channel in channels:
        channel.close()
    server.close()
    assert sent == table.total_bytes == sum(acked)
    for gpa, n in table:
        assert server.memory[gpa:gpa + n] == source[gpa:gpa + n]
    assert server.memory[65536:131072] == bytes(65536)  # untouched gaps stay zero
    counts = list(server.requests_per_connection.values())
    assert len(counts) == 4 and all(count > 0 for count in counts)  # one shared queue
    assert sum(counts) == len(table.partition(64 * 1024))


def test_pool_moves_every_chunk_over_all_token_connections():
    _move_16m(Security(token=TOKEN), Security(token=TOKEN))


def test_pool_moves_every_chunk_over_all_tls_connections(tls: TlsDirs):
    server = Security(tls=load_tls(str(tls.dst), TlsSide.SERVER))
    client = Security(tls=load_tls(str(tls.src), TlsSide.CLIENT))
    _move_16m(server, client)


def test_pool_raises_the_receivers_error_and_joins_its_threads():
    size = 8 << 20
    security = Security(token=TOKEN)
    server = MemoryServer(size, security, fail_after=3)
    channels = _channels(server.url, 4, security)
    source = bytes(size)
    with pytest.raises((MigrationError, TransportError)):
        SenderPool(channels).send_iteration(
            RangeTable.full(size).partition(65536),
            plain_memory(lambda r: [memoryview(source)[g:g + n] for g, n in r]))
    assert not [t for t in threading.enumerate() if t.name.startswith("migrate-send")]
    for channel in channels:
        channel.close()
    server.close()


# --- the receiving pool: admission and deadlines -------------------------------------------------


def _silent(url: str) -> socket.socket:
    address = parse_url(url)
    return socket.create_connection((address.host, address.port))


def test_silent_connections_cost_only_their_own_deadline():
    security = Security(token=TOKEN)
    server = MemoryServer(1 << 20, security, handshake_timeout=5.0)
    silent = [_silent(server.url) for _ in range(8)]
    try:
        began = time.monotonic()
        channels = _channels(server.url, 4, security)  # authenticates while 8 peers wait
        elapsed = time.monotonic() - began
        assert elapsed < 1.0, f"the handshakes waited behind silent peers ({elapsed:.2f} s)"
        for channel in channels:
            channel.close()
    finally:
        for sock in silent:
            sock.close()
        server.close()


def test_a_silent_peer_is_dropped_at_its_deadline():
    server = MemoryServer(1 << 20, Security(token=TOKEN), handshake_timeout=0.5)
    sock = _silent(server.url)
    try:
        sock.settimeout(5)
        began = time.monotonic()
        assert sock.recv(1) in (b"", b"\x02")  # closed (or an ERROR answer) at the deadline
        assert 0.3 < time.monotonic() - began < 3
        wait_for(lambda: server.pool.refused == 1, "the refusal counted")  # after the answer
        assert "timed out" in (server.pool.last_refusal or "")
    finally:
        sock.close()
        server.close()


def test_connections_in_their_handshake_are_capped():
    server = MemoryServer(1 << 20, Security(token=TOKEN), max_pending=2, handshake_timeout=5)
    holders = [_silent(server.url) for _ in range(2)]
    try:
        time.sleep(0.3)  # both are in their handshake now
        extra = _silent(server.url)
        extra.settimeout(3)
        assert extra.recv(1) == b""  # closed at once
        extra.close()
        assert "already in their handshake" in (server.pool.last_refusal or "")
    finally:
        for sock in holders:
            sock.close()
        server.close()


def test_the_first_peer_to_authenticate_owns_the_migration():
    """A peer that says hello first but cannot prove the token does not block the source."""
    security = Security(token=TOKEN)
    server = MemoryServer(1 << 20, security)
    impostor = _silent(server.url)
    try:
        impostor.sendall(encode_hello(ConnectionRole.MAIN, bytes(16)))  # hello, then silence
        time.sleep(0.2)
        channels = _channels(server.url, 2, security)  # the real source gets in
        for channel in channels:
            channel.close()
    finally:
        impostor.close()
        server.close()


def test_wrong_token_is_refused_and_the_sender_says_why():
    server = MemoryServer(1 << 20, Security(token=TOKEN))
    try:
        with pytest.raises(MigrationError, match="refused the MAIN connection: authentication "
                                                 "failed: the sender does not know"):
            _channels(server.url, 1, Security(token=b"x" * 32))
        # The pool counts a refusal after the peer has its answer: wait, do not race it.
        wait_for(lambda: server.pool.refused == 1, "the refusal counted")
    finally:
        server.close()


def test_memory_connection_after_admission_closed_is_refused():
    security = Security(token=TOKEN)
    server = MemoryServer(1 << 20, security)
    try:
        main, = _channels(server.url, 1, security)  # START closes admission
        with pytest.raises(MigrationError, match="no more connections are admitted"):
            SenderChannel(dial(parse_url(server.url), security),
                          Identity(ConnectionRole.MEMORY, MID, index=1), token=TOKEN)
        main.close()
    finally:
        server.close()


def test_unix_migration_socket_is_0600_and_a_foreign_file_is_kept(tmp_path: Path):
    path = str(tmp_path / "mig.sock")
    pool = ReceiverPool(parse_url(f"unix:{path}"), Security(), max_connections=1,
                        serve_memory=lambda channel: None)
    pool.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        pool.close()
    assert not os.path.exists(path)
    precious = tmp_path / "file"
    precious.write_text("data")
    with pytest.raises(TransportError, match="exists and is not a socket"):
        bind_unix_socket(str(precious), what="migration socket")
    assert precious.read_text() == "data"
