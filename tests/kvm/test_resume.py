"""Protocol version 3's resume, on real KVM and real sockets in this process: connections
cut by a proxy are re-dialled and the migration completes; a replayed resume handshake is
refused. The end-to-end outages through VMM processes are in tests/e2e."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from vmig.config import VmConfig
from vmig.errors import MigrationError
from vmig.migration.params import ReceiveParams, SendParams
from vmig.migration.receiver import MigrationReceiver
from vmig.migration.sender import MigrationSender
from vmig.proto import ConnectionRole
from vmig.transport.channel import Identity, SenderChannel
from vmig.transport.endpoint import dial
from vmig.transport.security import Security
from vmig.vmm.machine import Machine, VmState, install_kick_handler

sys.path.append(str(Path(__file__).resolve().parents[1]))
from faultproxy import CutProxy

pytestmark = pytest.mark.kvm

TOKEN = "resume-test-token-0123456789"


@pytest.fixture(scope="module", autouse=True)
def _kick_handler():
    install_kick_handler()


@pytest.fixture
def source():
    config = VmConfig.build(memory="128M", cpus=2, workload="dirty", working_set="32M",
                            dirty_rate=20_000)
    machine = Machine.boot(config)
    yield machine
    machine.close()


class Outcome:
    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, machine: Machine | None, error: str | None) -> None:
        self.machine, self.error = machine, error
        self.done.set()


@pytest.fixture
def destination():
    outcome = Outcome()
    receiver = MigrationReceiver(ReceiveParams("tcp:127.0.0.1:0", token=TOKEN).resolve(),
                                 outcome)
    address = receiver.start()
    yield receiver, outcome, address
    receiver.close()
    if outcome.machine is not None:
        outcome.machine.close()


def _migrate(source: Machine, url: str, **kwargs) -> dict:
    kwargs.setdefault("token", TOKEN)
    return MigrationSender(source, SendParams(url, **kwargs)).run()


def _check_arrived(source: Machine, outcome: Outcome) -> None:
    assert outcome.done.wait(30), "the destination did not finish"
    assert outcome.error is None, outcome.error
    assert source.state is VmState.MIGRATED
    machine = outcome.machine
    assert machine is not None and machine.state is VmState.RUNNING
    assert machine.check_guest()["ok"], "the guest's self-check failed at the destination"


@pytest.mark.parametrize("connections, cut_index, cut_after", [
    (2, 0, 6 << 20),  # MAIN, in the middle of pre-copy (it carries chunks too)
    (4, 2, 3 << 20),  # a MEMORY connection
])
def test_a_cut_connection_is_resumed_and_the_migration_completes(
        source, destination, connections, cut_index, cut_after):
    receiver, outcome, address = destination
    host, port = str(address).removeprefix("tcp:").rsplit(":", 1)
    with CutProxy((host, int(port)), cut_index=cut_index, cut_after=cut_after) as proxy:
        summary = _migrate(source, proxy.url, connections=connections, verify_memory=True,
                           reconnect_timeout_s=10)
        assert proxy.cuts == 1
    assert summary["status"] == "completed", summary
    assert summary["reconnects"] >= 1, summary
    assert summary["memory_verified"]
    assert summary["connections_lost"] == 0  # resumed, not given up
    _check_arrived(source, outcome)
    assert receiver.metrics.view()["reconnects"] >= 1


def test_without_a_window_a_lost_main_fails_and_the_source_runs_on(source, destination):
    _, outcome, address = destination
    host, port = str(address).removeprefix("tcp:").rsplit(":", 1)
    with CutProxy((host, int(port)), cut_index=0, cut_after=6 << 20) as proxy, \
            pytest.raises(MigrationError, match="MAIN"):
        _migrate(source, proxy.url, connections=2, reconnect_timeout_s=0)
    assert source.state is VmState.RUNNING
    assert outcome.done.wait(30) and outcome.machine is None


class _Recorder(CutProxy):
    """A proxy that also keeps the first bytes each connection sent (its handshake)."""

    def __init__(self, *args, **kwargs) -> None:
        self.first: dict[int, bytes] = {}
        super().__init__(*args, **kwargs)

    def _pump(self, carried, source, sink, upstream):  # type: ignore[override]
        if upstream:
            head = b""
            while len(head) < 96:
                data = source.recv(96 - len(head))
                if not data:
                    break
                head += data
                sink.sendall(data)
            self.first[carried.index] = head
            carried.sent += len(head)
        super()._pump(carried, source, sink, upstream)


def test_a_replayed_resume_handshake_is_refused(destination):
    receiver, outcome, address = destination
    # slow enough (10 MB/s, a guest dirtying 2 MB/s) to replay while the migration runs
    source = Machine.boot(VmConfig.build(memory="128M", cpus=1, workload="dirty",
                                         working_set="24M", dirty_rate=500))
    host, port = str(address).removeprefix("tcp:").rsplit(":", 1)
    proxy = _Recorder((host, int(port)), cut_index=0, cut_after=3 << 20)
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(_migrate(
        source, proxy.url, connections=2, reconnect_timeout_s=10, max_bandwidth="10M")))
    run.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and receiver.metrics.view()["reconnects"] < 1:
            time.sleep(0.05)
        assert receiver.metrics.view()["reconnects"] >= 1, "MAIN was not resumed"
        resumed = [i for i, head in proxy.first.items() if head[14:16] != b"\0\0"]
        assert resumed, "no resumed hello went through the proxy"
        replay = proxy.first[resumed[0]]
        refused_before = receiver._pool.refused
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(replay[:32])  # the recorded resumed hello ...
            sock.recv(40)  # ... its challenge (a fresh nonce) ...
            sock.sendall(replay[32:96])  # ... and the recorded proof: stale
            answer = sock.recv(4096)
        assert answer[:2] == b"\x02\x00", f"the replay was not refused: {answer!r}"
        assert b"authentication failed" in answer or b"stale resume" in answer
        deadline = time.monotonic() + 5
        while receiver._pool.refused == refused_before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert receiver._pool.refused == refused_before + 1
        # A sender that knows the token, with a resume count already used: stale (what
        # keeps a replay out where TLS, not a token, authenticates the connection).
        migration_id = bytes.fromhex(receiver.metrics.view()["migration_id"])
        stale = Identity(ConnectionRole.MAIN, migration_id, resume=1)
        with pytest.raises(MigrationError, match="stale resume count 1"):
            SenderChannel(dial(address, Security(token=TOKEN.encode())), stale,
                          token=TOKEN.encode())
        run.join(60)
        assert result.get("status") == "completed", result
        _check_arrived(source, outcome)
    finally:
        run.join(60)
        proxy.close()
        source.close()
