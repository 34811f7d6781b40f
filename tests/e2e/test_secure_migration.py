"""Secure migration end to end, with real VMMs and real sockets: mutual TLS, tokens, and a
receiver that no peer can hijack or stall.

Every refusal must leave the source running its guest and the destination running
nothing and still able to receive.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ANY_PORT,
    BUSY_GUEST,
    GUEST,
    Background,
    Spawn,
    assert_source_still_healthy,
    expect_api_error,
    migration_info_or_none,
    receive,
    wait_for,
)
from tlsfiles import TlsDirs

from vmig.api.process import VmmProcess
from vmig.errors import MigrationError
from vmig.proto import ConnectionRole, encode_hello, wire
from vmig.transport.address import parse_url
from vmig.transport.channel import Identity, SenderChannel
from vmig.transport.endpoint import dial
from vmig.transport.security import Security

TOKEN = "secure-e2e-token-0123456789"


def assert_still_receiving(destination: VmmProcess) -> None:
    """The destination runs nothing and still waits for a migration."""
    info = destination.client.info()
    assert info["state"] == "receiving", info
    assert destination.client.migration_info()["phase"] == "listening"


def test_tls_migration_over_4_connections_with_memory_verified(spawn_vmm: Spawn,
                                                               tls: TlsDirs) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    reply = destination.client.receive_migration(ANY_PORT, tls_dir=str(tls.dst))
    assert reply["security"] == "mutual TLS 1.3" and reply["token"] is None
    assert reply["warnings"] == []
    summary = source.client.send_migration(destination_url=reply["receiver_url"],
                                           connections=4, tls_dir=str(tls.src),
                                           verify_memory=True)
    assert summary["status"] == "completed" and summary["connections"] == 4
    assert summary["memory_verified"] is True and summary["warnings"] == []
    assert source.client.info()["state"] == "migrated"
    assert destination.client.info()["state"] == "running"
    assert destination.client.check_guest(60)["ok"]


def _mixed(tmp_path: Path, name: str, trust: Path, own: Path, side: str) -> str:
    """A TLS directory that trusts the CA of `trust` but holds `own`'s certificate and key."""
    mixed = tmp_path / name
    mixed.mkdir()
    shutil.copy(trust / "ca-cert.pem", mixed / "ca-cert.pem")
    for suffix in ("cert", "key"):
        shutil.copy(own / f"{side}-{suffix}.pem", mixed / f"{side}-{suffix}.pem")
    return str(mixed)


def test_every_mismatch_is_refused_and_both_sides_stay_usable(
        spawn_vmm: Spawn, tls: TlsDirs, other_tls: TlsDirs, tmp_path: Path) -> None:
    source = spawn_vmm(*GUEST)
    tls_destination = spawn_vmm()
    url, _ = receive(tls_destination, tls_dir=str(tls.dst))
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("plaintext sender to a TLS receiver", {"token": TOKEN}, 500,
         "does the destination expect TLS"),
        ("client certificate from another CA",
         {"tls_dir": _mixed(tmp_path, "client", tls.src, other_tls.src, "client")}, 500,
         "the destination does not accept this side's certificate"),
    ]
    for what, params, status, words in cases:
        message = expect_api_error(status, source.client.send_migration,
                                   destination_url=url, **params)
        assert words in message, (what, message)
        assert source.client.info()["state"] == "running", what
        assert_still_receiving(tls_destination)

    foreign = spawn_vmm()  # its server certificate comes from a CA the source does not trust
    foreign_url, _ = receive(foreign, tls_dir=_mixed(tmp_path, "server", tls.dst,
                                                     other_tls.dst, "server"))
    message = expect_api_error(500, source.client.send_migration, destination_url=foreign_url,
                               tls_dir=str(tls.src))
    assert "certificate verify failed" in message and "ca-cert.pem" in message
    assert_still_receiving(foreign)

    tokened = spawn_vmm()
    token_url, _ = receive(tokened)
    message = expect_api_error(400, source.client.send_migration, destination_url=token_url)
    assert message.startswith("token: a tcp: destination needs the token")
    message = expect_api_error(500, source.client.send_migration, destination_url=token_url,
                               token="not-the-right-token-at-all")
    assert "authentication failed: the sender does not know this receiver's token" in message
    assert_still_receiving(tokened)

    # The source kept its guest intact, and every destination can still receive.
    assert_source_still_healthy(source)
    summary = source.client.send_migration(destination_url=url, connections=2,
                                           tls_dir=str(tls.src), verify_memory=True)
    assert summary["status"] == "completed" and summary["memory_verified"]
    assert tls_destination.client.check_guest(60)["ok"]
    for destination in (foreign, tokened):
        assert_still_receiving(destination)


def _raw(url: str) -> socket.socket:
    address = parse_url(url)
    sock = socket.create_connection((address.host, address.port), timeout=10)
    return sock


def _response(sock: socket.socket) -> tuple[wire.Status, bytes]:
    header = wire.decode_response_header(sock.recv(16, socket.MSG_WAITALL))
    payload = sock.recv(header.length, socket.MSG_WAITALL) if header.length else b""
    return header.status, payload


def test_a_forged_sender_written_from_the_docs_gets_no_start_accepted(spawn_vmm: Spawn) -> None:
    """The attack that used to work: hello, START, CONFIG, MEMORY, ... from a script that
    knows only docs/protocol.md. Now every attempt ends at the handshake."""
    destination = spawn_vmm()
    url, auth = receive(destination)
    start = wire.encode_request_header(wire.Command.START, 32) + wire.encode_start_payload(
        wire.PROTOCOL_VERSION, 0, bytes(16), 1)

    with _raw(url) as sock:  # skip AUTH: straight to START
        sock.sendall(encode_hello(ConnectionRole.MAIN, bytes(16)))
        status, payload = _response(sock)
        method, _nonce = wire.decode_hello_reply(payload)
        assert status is wire.Status.OK and method is wire.AuthMethod.TOKEN
        sock.sendall(start)
        status, payload = _response(sock)
        assert status is wire.Status.ERROR
        assert b"START before authenticating; expected AUTH" in payload
    with _raw(url) as sock:  # a made-up proof
        sock.sendall(encode_hello(ConnectionRole.MAIN, bytes(16)))
        _response(sock)
        sock.sendall(wire.encode_auth(os.urandom(16), os.urandom(32)))
        status, payload = _response(sock)
        assert status is wire.Status.ERROR and b"authentication failed" in payload
        assert sock.recv(1) == b""  # closed: no request will ever be read
    with _raw(url) as sock:  # the old, unauthenticated protocol
        sock.sendall(encode_hello(ConnectionRole.MAIN, bytes(16), version=1))
        status, payload = _response(sock)
        assert status is wire.Status.ERROR and b"version 1" in payload
    assert_still_receiving(destination)
    info = destination.client.migration_info()
    assert info["connections"] == 0 and info["migration_id"] is None

    source = spawn_vmm(*GUEST)  # the real source is not locked out
    summary = source.client.send_migration(destination_url=url, **auth, verify_memory=True)
    assert summary["status"] == "completed"
    assert destination.client.check_guest(60)["ok"]


def test_silent_connections_do_not_delay_a_real_migration(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    url, auth = receive(destination)
    silent = [_raw(url) for _ in range(8)]  # connected, and saying nothing
    try:
        began = time.monotonic()
        summary = source.client.send_migration(destination_url=url, **auth, connections=4)
        took = time.monotonic() - began
        # Each silent peer may hold its own handshake for 10 s; none may hold anyone else's.
        assert summary["status"] == "completed" and took < 5, took
    finally:
        for sock in silent:
            sock.close()
    assert destination.client.check_guest(60)["ok"]


def test_a_memory_connection_after_start_is_refused(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    send = Background(lambda: source.client.send_migration(
        destination_url=url, **auth, connections=2, downtime_ms=0, timeout_s=3,
        timeout_strategy="ignore", verify_memory=True))
    send.start()
    info = wait_for(lambda: (i := migration_info_or_none(source.client)) and i["active"]
                    and i["phase"] == "precopy" and i, "the source to start pre-copy")
    migration_id = bytes.fromhex(info["migration_id"])  # the real id, and the real token
    key = auth["token"].encode()
    with pytest.raises(MigrationError, match="no more connections are admitted"):
        SenderChannel(dial(parse_url(url), Security(token=key)),
                      Identity(ConnectionRole.MEMORY, migration_id, index=1), token=key)
    summary = send.outcome()
    assert summary["status"] == "completed" and summary["memory_verified"]
    assert summary["connections"] == 2
    assert destination.client.check_guest(60)["ok"]


class Impostor(threading.Thread):
    """Listens where the source was told to go and answers OK to everything, recording
    every byte it is sent."""

    def __init__(self, method: wire.AuthMethod) -> None:
        super().__init__(daemon=True)
        self.method = method
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = bytearray()

    def run(self) -> None:
        self.listener.settimeout(20)
        sock, _ = self.listener.accept()
        with sock:
            sock.settimeout(5)
            self._read(sock, 32)
            sock.sendall(wire.encode_hello_reply(self.method, os.urandom(16)))
            if self.method is wire.AuthMethod.TOKEN:
                self._read(sock, 64)
                sock.sendall(wire.encode_response_header(wire.Status.OK, 32) + os.urandom(32))
            while self._read(sock, 1 << 16):  # "OK" to anything else that comes
                sock.sendall(wire.encode_response(wire.Status.OK))

    def _read(self, sock: socket.socket, size: int) -> bytes:
        try:
            data = sock.recv(size)
        except OSError:
            return b""
        self.received += data
        return data


@pytest.mark.parametrize("method", [wire.AuthMethod.TOKEN, wire.AuthMethod.NONE])
def test_an_impostor_destination_receives_no_guest_memory(spawn_vmm: Spawn,
                                                          method: wire.AuthMethod) -> None:
    source = spawn_vmm(*GUEST)
    impostor = Impostor(method)
    impostor.start()
    message = expect_api_error(500, source.client.send_migration, destination_url=impostor.url,
                               token=TOKEN)
    impostor.join(20)
    impostor.listener.close()
    if method is wire.AuthMethod.TOKEN:
        assert "could not prove it knows the token; no guest memory was sent" in message
    else:
        assert "did not ask for the token" in message
    # The hello and, at most, the AUTH: 32 + 64 bytes. No START, CONFIG or page.
    assert len(impostor.received) <= 96, bytes(impostor.received[:200])
    assert impostor.received[:8] == b"VMIGCONN"
    assert_source_still_healthy(source)
