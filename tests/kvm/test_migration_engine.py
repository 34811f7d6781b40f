"""The migration engine on real KVM and real sockets, sender and receiver in this process.

The end-to-end tests through VMM processes and the API are in tests/e2e; these
exercise the engine's paths (connection counts, local mode, verification,
refusals, protocol violations) quickly and check that nothing leaks.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from vmig.config import VmConfig
from vmig.errors import ConfigError, GuestMemoryError, MigrationError, StateError
from vmig.memory import GuestMemory, MemoryBacking
from vmig.migration import receiver as receiver_module
from vmig.migration.connections import SendConnections
from vmig.migration.digest import BackgroundDigest
from vmig.migration.metrics import MigrationMetrics
from vmig.migration.params import ReceiveParams, SendParams
from vmig.migration.receiver import MigrationReceiver
from vmig.migration.sender import MigrationSender
from vmig.proto import (
    NEED_DATA,
    Complete,
    Config,
    ConnectionRole,
    Memory,
    MemoryRequest,
    Response,
    SenderConnection,
    Start,
    State,
    wire,
)
from vmig.ranges import RangeTable
from vmig.transport.address import parse_url
from vmig.transport.channel import Identity, SenderChannel, receive_handshake
from vmig.transport.endpoint import dial
from vmig.transport.security import Security
from vmig.transport.stream import PlainStream
from vmig.vmm.host import HostCpu, host_cpu
from vmig.vmm.machine import Machine, VmState, install_kick_handler

pytestmark = pytest.mark.kvm

TOKEN = "engine-test-token-0123456789"
KEY = TOKEN.encode()


@pytest.fixture(scope="module", autouse=True)
def _kick_handler():
    install_kick_handler()


class Outcome:
    """Collects what the receiver reports when it finishes."""

    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, machine: Machine | None, error: str | None) -> None:
        self.machine, self.error = machine, error
        self.done.set()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> set[threading.Thread]:
    """Live threads, compared as sets so that a thread of an earlier test ending now
    cannot shift a count."""
    return set(threading.enumerate())


@pytest.fixture
def source():
    config = VmConfig.build(memory="128M", cpus=2, workload="dirty", working_set="32M",
                            dirty_rate=20_000)
    machine = Machine.boot(config)
    yield machine
    machine.close()


def _receiver(url: str = "tcp:127.0.0.1:0", **kwargs) -> tuple[MigrationReceiver, Outcome, str]:
    """A started receiver; over tcp: it takes TOKEN."""
    outcome = Outcome()
    if url.startswith("tcp:") and "tls_dir" not in kwargs:
        kwargs.setdefault("token", TOKEN)
    receiver = MigrationReceiver(ReceiveParams(url, **kwargs).resolve(), outcome)
    address = receiver.start()
    _started.append(receiver)
    return receiver, outcome, str(address)


_started: list[MigrationReceiver] = []


@pytest.fixture(autouse=True)
def _close_receivers():
    """Close every receiver a test started, passed or not: their threads would keep
    pytest from exiting."""
    yield
    while _started:
        _started.pop().close()


def _send(url: str, **kwargs) -> SendParams:
    """SendParams to a `_receiver()`, with its token over tcp:."""
    if url.startswith("tcp:") and "tls_dir" not in kwargs:
        kwargs.setdefault("token", TOKEN)
    return SendParams(url, **kwargs)


@pytest.mark.parametrize("connections", [1, 2, 4, 8])
def test_migrates_dirtying_guest_over_tcp(source, connections):
    threads_before = _threads()
    receiver, outcome, url = _receiver()
    time.sleep(0.2)
    before = source.guest_counters()
    summary = MigrationSender(source, _send(url, connections=connections,
                                                 verify_memory=True)).run()
    assert outcome.done.wait(10)
    receiver.close()
    assert outcome.error is None
    assert summary["status"] == "completed" and summary["connections"] == connections
    assert summary["memory_verified"] and summary["iterations"] >= 1
    assert summary["bytes_transferred"] >= source.config.working_set_bytes  # holes are skipped
    assert source.state is VmState.MIGRATED
    with outcome.machine as destination:
        assert destination.state is VmState.RUNNING
        after = destination.guest_counters()
        assert after["heartbeat"] >= before["heartbeat"]
        assert after["pages_written"] >= before["pages_written"]
        time.sleep(0.2)
        assert destination.guest_counters()["heartbeat"] > after["heartbeat"]
        assert destination.check_guest()["ok"]
    assert not _threads() - threads_before  # receiver and destination threads are joined
    gone = threads_before - _threads()
    assert sorted(t.name for t in gone if t.name.startswith("vcpu")) == ["vcpu0", "vcpu1"]



def test_local_migration_passes_memory_fd(source, tmp_path):
    receiver, outcome, url = _receiver(f"unix:{tmp_path}/mig.sock")
    summary = MigrationSender(source, _send(url, local=True, verify_memory=True)).run()
    assert outcome.done.wait(10)
    receiver.close()
    assert summary["local"] and summary["bytes_transferred"] == 0
    with outcome.machine as destination:
        assert destination.check_guest()["ok"]
    assert not (tmp_path / "mig.sock").exists()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"connections": 0}, "connections: must be between 1 and 128"),
    ({"connections": 129}, "connections: must be between 1 and 128"),
    ({"token": None}, "token: a tcp: destination needs the token"),
    ({"connections": 2, "local": True, "destination_url": "unix:/tmp/x"},
     "connections: must be 1"),
    ({"local": True}, "local: needs a unix"),
    ({"destination_url": "http://x"}, "destination_url"),
    ({"downtime_ms": -1}, "downtime_ms"),
])
def test_parameter_validation(kwargs, field):
    params = {"destination_url": "tcp:127.0.0.1:1", "token": TOKEN, **kwargs}
    with pytest.raises(ConfigError, match=field):
        SendParams(**params).validate()


def test_unreachable_destination_leaves_source_running(source):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(MigrationError, match="cannot connect"):
        MigrationSender(source, _send(f"tcp:127.0.0.1:{port}", connections=4)).run()
    assert source.state is VmState.RUNNING and source.busy is None
    assert source.check_guest()["ok"]


def test_destination_accepting_only_some_connections_fails_cleanly(source):
    receiver, outcome, url = _receiver(max_connections=2)
    with pytest.raises(MigrationError, match="accepted only 1 of 3 extra connections"):
        MigrationSender(source, _send(url, connections=4)).run()
    assert outcome.done.wait(10)
    receiver.close()
    assert outcome.machine is None and outcome.error
    assert source.state is VmState.RUNNING
    # a second attempt to a fresh receiver succeeds
    receiver, outcome, url = _receiver()
    MigrationSender(source, _send(url, connections=2)).run()
    assert outcome.done.wait(10)
    receiver.close()
    outcome.machine.close()


def test_timeout_with_cancel_keeps_source_running():
    config = VmConfig.build(memory="64M", cpus=1, workload="dirty", working_set="32M",
                            dirty_rate=0)  # flat out: cannot converge at 0 ms downtime
    with Machine.boot(config) as machine:
        receiver, outcome, url = _receiver()
        params = _send(url, downtime_ms=0, timeout_s=0.05)
        summary = MigrationSender(machine, params).run()
        assert summary["status"] == "cancelled" and "timeout strategy cancel" in summary["error"]
        assert outcome.done.wait(10)
        receiver.close()
        assert outcome.error.startswith("the source cancelled the migration: ")
        assert machine.state is VmState.RUNNING
        assert machine.check_guest()["ok"]


def test_timeout_with_ignore_converges_anyway():
    config = VmConfig.build(memory="64M", cpus=1, workload="dirty", working_set="32M",
                            dirty_rate=0)
    with Machine.boot(config) as machine:
        receiver, outcome, url = _receiver()
        params = _send(url, downtime_ms=0, timeout_s=0.05, timeout_strategy="ignore")
        summary = MigrationSender(machine, params).run()
        assert outcome.done.wait(10)
        receiver.close()
        assert summary["status"] == "completed"
        with outcome.machine as destination:
            assert destination.check_guest()["ok"]


def _raw_main(url: str) -> socket.socket:
    """A MAIN connection that passed the handshake with TOKEN, as a bare socket."""
    channel = SenderChannel(dial(parse_url(url), Security(token=KEY)),
                            Identity(ConnectionRole.MAIN, bytes(16)), token=KEY)
    sock = channel.stream.sock
    sock.settimeout(5)
    return sock


def _read_response(sock: socket.socket) -> tuple[wire.Status, str]:
    header = wire.decode_response_header(sock.recv(16, socket.MSG_WAITALL))
    message = sock.recv(header.length, socket.MSG_WAITALL) if header.length else b""
    return header.status, message.decode()


@pytest.mark.parametrize(("payload", "words"), [
    (wire.encode_request_header(wire.Command.CONFIG, length=2) + b"{}", "CONFIG"),
    (wire.encode_request_header(99, length=0), "99"),
    (wire.encode_request_header(wire.Command.INVALID, length=0), "INVALID"),
])
def test_receiver_rejects_protocol_violations_and_cleans_up(payload, words):
    threads_before = _threads()
    fds_before = _fds()
    receiver, outcome, url = _receiver()
    sock = _raw_main(url)
    sock.sendall(payload)
    status, message = _read_response(sock)
    assert status is wire.Status.ERROR and words in message
    assert outcome.done.wait(10)
    assert outcome.machine is None and "protocol" in outcome.error
    receiver.close()
    sock.close()
    assert not _threads() - threads_before
    assert _fds() == fds_before


def _requester(sock: socket.socket) -> tuple[SenderConnection, Callable[[bytes], Response]]:
    """A protocol core for a raw MAIN connection, and a call that sends a request's bytes
    and reads its response."""
    conn = SenderConnection()

    def request(data: bytes) -> Response:
        sock.sendall(data)
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(sock.recv(max(conn.bytes_wanted(), 1)))
        return event

    return conn, request


def test_receiver_refuses_memory_outside_guest(source):
    """A MEMORY range past the end of guest memory is refused, never written."""
    receiver, outcome, url = _receiver()
    sock = _raw_main(url)
    conn, request = _requester(sock)

    assert request(conn.send(Start(migration_id=bytes(16)))).ok
    assert request(conn.send(Config(json.dumps({"vm": source.config.to_dict()}).encode()))).ok
    beyond = RangeTable([(source.config.memory_bytes, 4096)])
    response = request(conn.send(Memory(beyond)) + bytes(4096))
    assert not response.ok and "past guest memory" in response.message
    assert outcome.done.wait(10)
    receiver.close()
    sock.close()
    assert outcome.machine is None


def test_no_extra_connection_accepted_continues_on_one_and_says_so(source):
    receiver, outcome, url = _receiver(max_connections=1)
    summary = MigrationSender(source, _send(url, connections=4)).run()
    assert outcome.done.wait(10)
    receiver.close()
    assert summary["status"] == "completed" and summary["connections"] == 1
    assert len(summary["warnings"]) == 1
    assert "could not open any of 3 extra connections" in summary["warnings"][0]
    assert "continuing on one connection" in summary["warnings"][0]
    with outcome.machine as destination:
        assert destination.check_guest()["ok"]


def _destination_until_complete(listener: socket.socket, at_complete: Callable[[], None]) -> None:
    """A minimal destination from the real protocol core and channel: it accepts every
    request, then, at COMPLETE, calls `at_complete()` and leaves without an answer."""
    sock, _ = listener.accept()
    channel = receive_handshake(PlainStream(sock, "source"), token=KEY,
                                admit=lambda hello: None)
    memory = bytearray()
    while True:
        event = channel.next_request()
        if isinstance(event, Complete):
            at_complete()
            channel.close()  # gone without an answer
            return
        if isinstance(event, Config):
            memory = bytearray(json.loads(event.data)["vm"]["memory_bytes"])
        if isinstance(event, MemoryRequest):
            channel.receive_payload([memoryview(memory)[g:g + n] for g, n in event.ranges])
        channel.accept()


def test_unanswered_complete_leaves_the_source_paused(source):
    """If COMPLETE's answer never comes, the destination may run the guest: do not resume.

    The peer is a minimal destination built from the real protocol core and channel
    that accepts everything, then vanishes when COMPLETE arrives.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"tcp:127.0.0.1:{listener.getsockname()[1]}"

    peer = threading.Thread(target=_destination_until_complete, args=(listener, lambda: None))
    peer.start()
    with pytest.raises(MigrationError, match="source stays paused"):
        MigrationSender(source, _send(url, reconnect_timeout_s=2)).run()  # COMPLETE re-sent
    peer.join(10)
    listener.close()
    assert source.state is VmState.PAUSED and source.busy is None
    source.resume()  # the user decides; here nothing runs the guest, so resume it
    assert source.check_guest()["ok"]


# --- the switch-over's failures: exactly one running VM -------------------------------------


def test_a_digest_mismatch_is_never_resumed_and_the_source_runs_on(source, monkeypatch):
    """The destination must refuse to resume memory that differs from the source's."""
    _, outcome, url = _receiver()

    class LyingDigest(BackgroundDigest):
        def result(self) -> str:
            super().result()
            return "00" * 32

    monkeypatch.setattr("vmig.migration.sender.BackgroundDigest", LyingDigest)  # the source's
    with pytest.raises(MigrationError, match="memory verification failed"):
        MigrationSender(source, _send(url, connections=2, verify_memory=True)).run()
    assert outcome.done.wait(10)
    assert outcome.machine is None and "memory verification failed" in outcome.error
    assert source.state is VmState.RUNNING and source.busy is None  # resumed after the pause
    assert source.check_guest()["ok"]


def test_a_lost_connection_makes_the_switch_over_verify_memory(source, monkeypatch):
    """Not asked for in START, but a MEMORY connection was lost: COMPLETE carries a digest,
    and the destination checks it (a stale page would be refused, not resumed)."""
    _, outcome, url = _receiver()

    class LyingDigest(BackgroundDigest):  # stands for a page the lost chunk made stale
        def result(self) -> str:
            super().result()
            return "00" * 32

    monkeypatch.setattr("vmig.migration.sender.BackgroundDigest", LyingDigest)
    monkeypatch.setattr(MigrationMetrics, "connections_lost", property(lambda self: 1))
    with pytest.raises(MigrationError, match="memory verification failed"):
        MigrationSender(source, _send(url, connections=2, reconnect_timeout_s=2)).run()
    assert outcome.done.wait(10)
    assert outcome.machine is None and "memory verification failed" in outcome.error
    assert source.state is VmState.RUNNING


def test_a_failed_switch_over_resumes_the_paused_source(source, monkeypatch):
    _, outcome, url = _receiver()

    def refuse(*args, **kwargs):
        raise MigrationError("the destination cannot build the VM")

    monkeypatch.setattr(Machine, "restore", refuse)  # the destination's STATE step fails
    with pytest.raises(MigrationError, match="rejected STATE: the destination cannot build"):
        MigrationSender(source, _send(url, connections=2, reconnect_timeout_s=2)).run()
    assert outcome.done.wait(10)
    assert outcome.machine is None
    assert source.state is VmState.RUNNING and source.busy is None
    before = source.guest_counters()["heartbeat"]
    time.sleep(0.2)
    assert source.guest_counters()["heartbeat"] > before  # really running again
    assert source.check_guest()["ok"]


def test_cancel_is_refused_once_complete_is_sent(source):
    """A destination that takes COMPLETE and holds its answer: cancel says why it cannot."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    got_complete = threading.Event()
    release = threading.Event()

    def at_complete() -> None:
        got_complete.set()
        release.wait(20)

    peer = threading.Thread(target=_destination_until_complete, args=(listener, at_complete))
    peer.start()
    sender = MigrationSender(source, _send(url, reconnect_timeout_s=1))  # then: really gone
    result: list[BaseException] = []

    def send() -> None:
        try:
            sender.run()
        except MigrationError as exc:
            result.append(exc)

    run = threading.Thread(target=send)
    run.start()
    assert got_complete.wait(20)
    with pytest.raises(StateError, match="passed its point of no return"):
        sender.cancel()
    with pytest.raises(StateError, match="cannot change parameters: the migration is "
                                         "completing"):
        sender.set_parameters({"downtime_ms": 5})  # nothing left for it to change
    release.set()
    run.join(20)
    peer.join(10)
    listener.close()
    assert "source stays paused" in str(result[0])
    assert source.state is VmState.PAUSED
    source.resume()  # the operator's call: here nothing runs the guest


def test_the_receiver_refuses_a_cancel_after_the_hand_over(source):
    receiver, outcome, url = _receiver()
    MigrationSender(source, _send(url)).run()
    assert outcome.done.wait(10)
    with pytest.raises(StateError, match="already completed; nothing was changed"):
        receiver.cancel()
    assert outcome.machine.state is VmState.RUNNING  # the received VM runs on
    outcome.machine.close()


# --- fewer bytes on the wire ------------------------------------------------------------------


def test_compressed_chunks_shrink_the_wire_and_memory_still_verifies(source):
    _, outcome, url = _receiver()
    summary = MigrationSender(source, _send(url, connections=2, compress="zstd",
                                            verify_memory=True)).run()
    assert outcome.done.wait(10)
    assert summary["status"] == "completed" and summary["memory_verified"]
    # The guest stamps 16 bytes of each 4 KiB page: its pages compress very well.
    assert summary["wire_bytes"] < summary["bytes_transferred"] / 10, summary
    with outcome.machine as destination:
        assert destination.check_guest()["ok"]


def test_zero_pages_are_skipped_and_pages_that_become_zero_are_sent_as_zero_ranges():
    config = VmConfig.build(memory="64M", cpus=1, workload="dirty", working_set="16M",
                            dirty_rate=0)  # flat out: pre-copy iterates until the timeout
    with Machine.boot(config) as machine:
        top = machine.memory.size - (4 << 20)  # 4 MiB the guest never touches
        machine.memory.write(top, bytes(2 << 20))  # written, but zero: data, not a hole
        machine.memory.write(top + (2 << 20), b"\x5a" * (2 << 20))  # data, zeroed later
        _, outcome, url = _receiver()
        sender = MigrationSender(machine, _send(url, downtime_ms=0, timeout_s=2,
                                                timeout_strategy="ignore",
                                                verify_memory=True))
        thread = threading.Thread(target=lambda: outcome.__dict__.update(summary=sender.run()))
        thread.start()
        deadline = time.monotonic() + 20
        while sender.metrics.iterations < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        machine.memory.write(top + (2 << 20), bytes(2 << 20))  # now zero: sent as ZERO
        thread.join(30)
        summary = outcome.__dict__["summary"]
        assert outcome.done.wait(10)
    assert summary["status"] == "completed" and summary["memory_verified"]
    # the 2 MiB of zeros written before, skipped in the first pass, and the 2 MiB that
    # became zero, sent as a ZERO range later (the guest's own zero pages come on top)
    assert summary["zero_pages"] >= 2 * 512
    with outcome.machine as destination:
        assert destination.memory.read(top + (2 << 20), 4096) == bytes(4096)
        assert destination.check_guest()["ok"]


def _config_then_memory(source: Machine, extents: object) -> tuple[Response, Outcome]:
    """Send START and CONFIG with `extents` as data_extents on a raw MAIN connection."""
    receiver, outcome, url = _receiver()
    sock = _raw_main(url)
    conn, request = _requester(sock)

    try:
        assert request(conn.send(Start(migration_id=bytes(16)))).ok
        document = {"vm": source.config.to_dict(), "data_extents": extents}
        return request(conn.send(Config(json.dumps(document).encode()))), outcome
    finally:
        sock.close()
        assert outcome.done.wait(10)
        receiver.close()


@pytest.mark.parametrize(("extents", "words"), [
    ("all", "not a list"),
    ([[0, 4096, 1]], "data_extents"),
    ([[1, 4096]], "not 4096-byte aligned"),
    ([[0, 1 << 40]], "past guest memory"),
])
def test_a_bad_data_extents_hint_is_refused(source, extents, words):
    response, outcome = _config_then_memory(source, extents)
    assert not response.ok and "bad CONFIG" in response.message and words in response.message
    assert outcome.machine is None


def test_a_fresh_destination_allocates_the_data_ahead_of_it(source, monkeypatch):
    """From CONFIG on, the extents the source says hold data are allocated by
    migrate-alloc (and only those); the migration completes as before."""
    allocated: list[tuple[int, int]] = []
    real = MemoryBacking.allocate

    def record(self: GuestMemory, gpa: int = 0, length: int | None = None) -> None:
        allocated.append((gpa, length))
        real(self, gpa, length)

    monkeypatch.setattr(MemoryBacking, "allocate", record)
    extents = source.memory.backing.data_extents()
    receiver, outcome, url = _receiver()
    summary = MigrationSender(source, _send(url, connections=2)).run()
    assert summary["status"] == "completed"
    assert outcome.done.wait(10)
    receiver.close()
    with outcome.machine as destination:
        assert destination.check_guest()["ok"]
    assert allocated and sum(n for _, n in allocated) <= sum(n for _, n in extents)
    assert all(any(g <= gpa and gpa + n <= g + length for g, length in extents)
               for gpa, n in allocated)


def test_a_destination_that_cannot_allocate_fails_and_the_source_runs_on(source,
                                                                          monkeypatch):
    def no_memory(self: GuestMemory, gpa: int = 0, length: int | None = None) -> None:
        raise GuestMemoryError("cannot allocate guest memory: No space left on device")

    monkeypatch.setattr(MemoryBacking, "allocate", no_memory)
    receiver, outcome, url = _receiver()
    with pytest.raises(MigrationError):
        MigrationSender(source, _send(url, connections=2, reconnect_timeout_s=2)).run()
    assert outcome.done.wait(10)
    receiver.close()
    assert outcome.machine is None
    assert "cannot hold the guest's memory" in outcome.error
    assert source.state is VmState.RUNNING


def test_a_cancel_at_the_source_after_state_frees_the_destination_vm(source, monkeypatch):
    """ABANDON flagged CANCELLED after STATE: the VM the destination built is stopped and
    freed (no vCPU thread left), and both sides say cancelled, not failed."""
    threads_before = _threads()
    receiver, outcome, url = _receiver()
    sender = MigrationSender(source, _send(url))
    real = SendConnections.request

    def request(self: SendConnections, event: object) -> object:
        response = real(self, event)
        if isinstance(event, State):
            sender.cancel("the operator changed their mind")
        return response

    monkeypatch.setattr(SendConnections, "request", request)
    summary = sender.run()
    assert summary["status"] == "cancelled"
    assert source.state is VmState.RUNNING
    assert outcome.done.wait(10)
    receiver.close()
    assert outcome.machine is None
    assert outcome.error.startswith("the source cancelled the migration: ")
    assert receiver.metrics.view()["status"] == "cancelled"
    assert not [t for t in _threads() - threads_before if t.name.startswith("vcpu")]


def _host_as(monkeypatch, source: Machine, *, tsc_khz: int | None = None,
             cpuid_change=None) -> list[int]:
    """Make the receiver compare CONFIG with an edited host (the one that would run the
    guest); return a list that records every guest memory the receiver creates."""
    real = host_cpu()
    cpuid = real.cpuid if cpuid_change is None else tuple(cpuid_change(dict(entry))
                                                          for entry in real.cpuid)
    edited = HostCpu(tsc_khz=real.tsc_khz if tsc_khz is None else tsc_khz, cpuid=cpuid)
    monkeypatch.setattr(receiver_module, "host_cpu", lambda: edited)
    created: list[int] = []
    real_create = GuestMemory.create

    def record(size: int, *args, **kwargs) -> GuestMemory:
        created.append(size)
        return real_create(size, *args, **kwargs)

    monkeypatch.setattr(receiver_module.GuestMemory, "create", staticmethod(record))
    return created


def _refused_before_memory(source: Machine, created: list[int], **receive) -> str:
    receiver, outcome, url = _receiver(**receive)
    with pytest.raises(MigrationError) as raised:
        MigrationSender(source, _send(url, connections=4)).run()
    assert outcome.done.wait(10)
    receiver.close()
    assert outcome.machine is None and source.state is VmState.RUNNING
    assert created == []  # refused at CONFIG: no guest memory was made, none moved
    assert outcome.error is not None and outcome.error in str(raised.value)
    return outcome.error


def test_a_destination_whose_tsc_runs_at_another_frequency_refuses_at_config(
        source, monkeypatch):
    other = source.tsc_khz + source.tsc_khz * 400 // 1_000_000  # 400 ppm faster
    created = _host_as(monkeypatch, source, tsc_khz=other)
    error = _refused_before_memory(source, created)
    assert f"{source.tsc_khz} kHz" in error and f"{other} kHz" in error
    assert "allow_tsc_change" in error


@pytest.mark.parametrize(("ppm", "allow"), [(100, False), (400, True)])
def test_a_small_or_allowed_tsc_difference_migrates(source, monkeypatch, ppm, allow):
    other = source.tsc_khz + source.tsc_khz * ppm // 1_000_000
    _host_as(monkeypatch, source, tsc_khz=other)
    receiver, outcome, url = _receiver(allow_tsc_change=allow)
    summary = MigrationSender(source, _send(url, connections=2)).run()
    assert summary["status"] == "completed"
    assert outcome.done.wait(10)
    receiver.close()
    with outcome.machine as destination:
        assert destination.check_guest()["ok"]


def test_a_destination_without_a_cpu_feature_the_guest_has_refuses_at_config(
        source, monkeypatch):
    def without_sse2(entry: dict[str, int]) -> dict[str, int]:
        if entry["function"] == 1:
            entry["edx"] &= ~(1 << 26)  # SSE2
        return entry

    guest_leaf1 = next(e for e in source.guest_cpuid() if e["function"] == 1)
    assert guest_leaf1["edx"] >> 26 & 1  # the guest was given SSE2
    created = _host_as(monkeypatch, source, cpuid_change=without_sse2)
    error = _refused_before_memory(source, created)
    assert "CPU features" in error and "sse2" in error.lower()
