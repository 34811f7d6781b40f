"""The API app, server and client together, in-process, with a fake Machine (no KVM needed).

The server runs on a real UNIX socket in a thread; the Machine is replaced by
`FakeMachine`, which follows the real one's lifecycle rules, so everything
between the socket and the Machine is tested: routing, error mapping, the
controller's preconditions, socket handling and shutdown.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from vmig import __version__
from vmig.api import controller
from vmig.api.client import ApiClient
from vmig.api.controller import Vmm
from vmig.api.server import ApiServer, bind_unix_socket
from vmig.cli import cli
from vmig.config import VmConfig
from vmig.errors import (
    ApiError,
    ApiSocketError,
    ConfigError,
    GuestError,
    GuestMemoryError,
    KvmError,
    KvmUnavailableError,
    SnapshotError,
    StateError,
    VmmUnreachableError,
)
from vmig.proto import ConnectionRole, encode_hello
from vmig.transport.address import parse_url
from vmig.transport.channel import Identity, SenderChannel
from vmig.transport.endpoint import dial
from vmig.transport.security import Security
from vmig.vmm.machine import VmState

TOKEN = "0123456789abcdef0123456789abcdef"


class FakeMachine:
    """Stands in for vmig.vmm.machine.Machine: same lifecycle rules, no KVM."""

    booted: list[FakeMachine] = []

    def __init__(self, config: VmConfig | None = None) -> None:
        self.config = config or VmConfig.build()
        self.state = VmState.RUNNING
        self.error: str | None = None
        self.busy: str | None = None
        self.fail_with: BaseException | None = None
        self.snapshots: list[str] = []
        self.closed = False
        self.check_result = {"ok": True, "pages_checked": 16, "bad_pages": 0,
                             "first_bad_page": None}

    @classmethod
    def boot(cls, config: VmConfig) -> FakeMachine:
        machine = cls(config)
        cls.booted.append(machine)
        return machine

    @classmethod
    def restore_snapshot(cls, directory: str, *, serial_log: str | None = None,
                         memory_file: str | None = None, resume: bool = True) -> FakeMachine:
        if not directory.startswith("/snap"):
            raise SnapshotError(f"{directory} is not a vmig snapshot: state.json is missing")
        machine = cls()
        machine.state = VmState.RUNNING if resume else VmState.PAUSED
        return machine

    def listen(self, on_failure: object, on_halt: object) -> None:
        self.on_failure, self.on_halt = on_failure, on_halt

    def _require(self, wanted: VmState, action: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if self.state is not wanted:
            raise StateError(f"cannot {action}: VM is {self.state.value}, "
                             f"it must be {wanted.value}")

    def pause(self) -> None:
        self._require(VmState.RUNNING, "pause")
        self.state = VmState.PAUSED

    def resume(self) -> None:
        self._require(VmState.PAUSED, "resume")
        self.state = VmState.RUNNING

    def shutdown(self) -> None:
        self.state = VmState.SHUTDOWN
        self.closed = True

    close = shutdown

    def snapshot(self, directory: str) -> None:
        self._require(VmState.PAUSED, "snapshot")
        self.snapshots.append(directory)

    def check_guest(self, timeout: float = 60.0) -> dict[str, Any]:
        self._require(VmState.RUNNING, "check the guest")
        return self.check_result

    def info(self) -> dict[str, Any]:
        return {"state": self.state.value, "memory_bytes": self.config.memory_bytes,
                "cpus": self.config.cpus, "error": self.error, "heartbeat": 7,
                "pages_written": 3, "vcpus": [{"id": 0, "state": "running", "exits": 1}]}


@dataclass
class Served:
    vmm: Vmm
    client: ApiClient
    path: str
    thread: threading.Thread

    def raw(self) -> httpx.Client:
        """A plain httpx client on the socket, for requests ApiClient would never send."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.path),
                            base_url="http://localhost/api/v1")

    def machine(self) -> FakeMachine:
        self.vmm.machine = FakeMachine()
        return self.vmm.machine  # type: ignore[return-value]


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setattr(controller, "Machine", FakeMachine)
    FakeMachine.booted = []
    path = str(tmp_path / "api.sock")
    vmm = Vmm()
    server = ApiServer.bind(path)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(vmm,),
                              kwargs={"on_ready": ready.set}, daemon=True)
    thread.start()
    assert ready.wait(10), "server did not start"
    client = ApiClient(path, timeout=10)
    yield Served(vmm, client, path, thread)
    client.close()
    vmm.request_exit()
    thread.join(15)
    assert not thread.is_alive(), "server did not stop"
    assert not os.path.lexists(path), "socket file left behind"


def expect_error(status: int, call: Any, *args: Any) -> str:
    with pytest.raises(ApiError) as info:
        call(*args)
    assert info.value.status == status, info.value
    assert "\n" not in info.value.message
    return info.value.message


# --- the VMM ---------------------------------------------------------------------------------


def test_ping(served: Served) -> None:
    assert served.client.ping() == {"version": __version__, "pid": os.getpid()}


def test_info_without_a_vm_is_empty(served: Served) -> None:
    assert served.client.info() == {"state": "empty"}


def test_socket_is_private(served: Served) -> None:
    mode = os.stat(served.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize("command", ["pause", "resume", "shutdown", "check_guest"])
def test_commands_need_a_vm(served: Served, command: str) -> None:
    message = expect_error(409, getattr(served.client, command))
    assert "no VM: create or restore one first" in message


def test_snapshot_needs_a_vm(served: Served) -> None:
    assert "no VM" in expect_error(409, served.client.snapshot, "/tmp/snap")


def test_vmm_shutdown_stops_the_server_and_the_vm(served: Served) -> None:
    machine = served.machine()
    served.client.shutdown_vmm()
    served.thread.join(15)
    assert not served.thread.is_alive()
    assert machine.closed
    assert served.vmm.machine is None
    assert not os.path.lexists(served.path)
    with pytest.raises(VmmUnreachableError, match="cannot reach VMM at"):
        served.client.ping()


# --- the VM's lifecycle ----------------------------------------------------------------------


def test_create_then_info(served: Served) -> None:
    info = served.client.create(memory="128M", cpus=2, workload="dirty")
    assert info["state"] == "running" and info["cpus"] == 2
    assert FakeMachine.booted[0].config.memory_bytes == 128 << 20
    assert served.client.info()["heartbeat"] == 7


def test_create_when_a_vm_exists_is_a_conflict(served: Served) -> None:
    served.machine()
    message = expect_error(409, served.client.create)
    assert message == "cannot create a VM: a VM already exists and is running; shut it down first"
    assert FakeMachine.booted == []


def test_create_replaces_a_shut_down_vm(served: Served) -> None:
    old = served.machine()
    served.client.shutdown()
    assert served.client.info()["state"] == "shutdown"
    served.client.shutdown()  # idempotent
    assert served.client.create()["state"] == "running"
    assert served.vmm.machine is not old and old.closed


def test_pause_resume_and_wrong_states(served: Served) -> None:
    served.machine()
    expect_error(409, served.client.resume)
    served.client.pause()
    assert served.client.info()["state"] == "paused"
    message = expect_error(409, served.client.pause)
    assert message == "cannot pause: VM is paused, it must be running"
    served.client.resume()
    assert served.client.info()["state"] == "running"


def test_snapshot_while_running_is_a_conflict(served: Served) -> None:
    served.machine()
    assert "must be paused" in expect_error(409, served.client.snapshot, "/tmp/snap")


def test_snapshot_takes_urls_and_paths(served: Served) -> None:
    machine = served.machine()
    served.client.pause()
    served.client.snapshot("file:///tmp/snap%201")
    served.client.snapshot("/tmp/snap2")
    assert machine.snapshots == ["/tmp/snap 1", "/tmp/snap2"]
    message = expect_error(400, served.client.snapshot, "tcp://somewhere:1")
    assert message.startswith("destination_url: unsupported URL scheme 'tcp'")


def test_restore(served: Served) -> None:
    assert served.client.restore("file:///snap/a", resume=False)["state"] == "paused"
    assert "already exists" in expect_error(409, served.client.restore, "/snap/a")


def test_restore_of_a_missing_snapshot_is_a_bad_request(served: Served) -> None:
    message = expect_error(400, served.client.restore, "/elsewhere")
    assert message == "/elsewhere is not a vmig snapshot: state.json is missing"
    assert served.client.info() == {"state": "empty"}


def test_check_guest(served: Served) -> None:
    served.machine()
    assert served.client.check_guest(5)["ok"] is True
    with served.raw() as raw:  # the body is optional
        assert raw.put("/vm.check-guest").json()["pages_checked"] == 16


def test_info_answers_while_a_long_command_holds_the_vm(served: Served) -> None:
    machine = served.machine()
    entered, release = threading.Event(), threading.Event()

    def slow_check(timeout: float = 60.0) -> dict[str, Any]:
        entered.set()
        release.wait(20)
        return machine.check_result

    machine.check_guest = slow_check  # type: ignore[method-assign]
    with ApiClient(served.path, timeout=30) as other:
        check = threading.Thread(target=other.check_guest, args=(60,), daemon=True)
        check.start()
        try:
            assert entered.wait(10), "check-guest did not start"
            with ApiClient(served.path, timeout=2) as quick:
                assert quick.info()["state"] == "running"
            assert check.is_alive()  # info answered while the check held the VM
        finally:
            release.set()
            check.join(10)
    assert not check.is_alive()


def test_cli_check_guest_exits_1_when_the_guest_is_not_ok(served: Served) -> None:
    machine = served.machine()
    runner = CliRunner()
    result = runner.invoke(cli, ["remote", "--api-socket", served.path, "check-guest"])
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True
    machine.check_result = {"ok": False, "pages_checked": 16, "bad_pages": 2,
                            "first_bad_page": 5}
    result = runner.invoke(cli, ["remote", "--api-socket", served.path, "check-guest"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == machine.check_result
    assert result.stderr == ""


def test_cli_json_is_one_object_on_one_line(served: Served) -> None:
    served.machine()
    runner = CliRunner()

    def answer(*args: str) -> dict[str, Any]:
        result = runner.invoke(cli, ["remote", "--api-socket", served.path, *args, "--json"])
        assert result.exit_code == 0, result.stderr
        assert result.stdout.count("\n") == 1, result.stdout  # one line
        return json.loads(result.stdout)

    assert answer("wait") == {"version": __version__, "pid": os.getpid()}
    assert answer("info")["state"] == "running"
    assert answer("pause")["state"] == "paused"  # the VM after the command
    assert answer("snapshot", "/tmp/snap-json") == {"destination": "/tmp/snap-json"}
    assert answer("resume")["state"] == "running"
    assert answer("shutdown")["state"] == "shutdown"
    assert answer("shutdown-vmm") == {"api_socket": served.path, "stopping": True}
    served.thread.join(15)
    # the VMM is gone: `wait` gives up after its timeout, with one line
    result = runner.invoke(cli, ["remote", "--api-socket", served.path, "wait",
                                 "--timeout", "0.3"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"vmig: error: VMM at {served.path} did not answer within 0.3 s: "
                             "No such file or directory\n")


def test_cli_wait_returns_once_a_late_vmm_answers(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    vmm = Vmm()
    stopped = threading.Event()

    def serve_later() -> None:
        time.sleep(0.5)  # the socket does not exist yet; then it is bound and served
        ApiServer.bind(path).serve(vmm)
        stopped.set()

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    try:
        began = time.monotonic()
        result = CliRunner().invoke(cli, ["remote", "--api-socket", path, "wait", "--timeout",
                                          "20"])
        assert result.exit_code == 0 and result.stdout == "", result.stderr
        assert 0.4 < time.monotonic() - began < 10
    finally:
        vmm.request_exit()
        assert stopped.wait(15)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "status"), [
    (ConfigError("bad thing"), 400),
    (SnapshotError("cannot write snapshot to /x: No space left on device"), 400),
    (KvmUnavailableError("/dev/kvm does not exist: is KVM enabled?"), 400),
    (GuestMemoryError("guest memory 60 GiB is more than the host can give"), 400),
    (StateError("cannot pause: VM is failed, it must be running"), 409),
    (KvmError("KVM_RUN", 14), 500),
    (GuestError("triple fault"), 500),
])
def test_vmig_errors_map_to_statuses(served: Served, error: Exception, status: int) -> None:
    served.machine().fail_with = error
    assert expect_error(status, served.client.pause) == str(error)


def test_unexpected_exception_is_a_one_line_500(served: Served,
                                                caplog: pytest.LogCaptureFixture) -> None:
    served.machine().fail_with = RuntimeError("boom\nsecond line")
    message = expect_error(500, served.client.pause)
    assert message == "internal error: RuntimeError: boom second line"
    assert "Traceback" not in message
    assert any(record.exc_info for record in caplog.records), "traceback not logged"


def test_bad_create_bodies(served: Served) -> None:
    with served.raw() as raw:
        response = raw.put("/vm.create", json={"cpus": 99})
        assert response.status_code == 400
        assert response.json() == {"error": "cpus: input should be less than or equal to 16"}
        response = raw.put("/vm.create", content=b"{nope",
                           headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"].startswith("body: invalid JSON")
        response = raw.put("/vm.create")
        assert response.json() == {"error": "body: field required"}
    message = expect_error(400, lambda: served.client.create(memory="lots"))
    assert message == ("bad memory size 'lots': expected a number with an optional K, M, G or "
                       "T suffix")
    assert served.client.info() == {"state": "empty"}


def test_unknown_route_and_method(served: Served) -> None:
    with served.raw() as raw:
        response = raw.get("/vm.nope")
        assert response.status_code == 404
        assert response.json() == {"error": "Not Found: GET /api/v1/vm.nope"}
        response = raw.get("/vm.pause")
        assert response.status_code == 405
        assert response.json()["error"].startswith("Method Not Allowed")


# --- the socket --------------------------------------------------------------------------------


def test_second_server_on_a_live_socket_is_refused(served: Served) -> None:
    with pytest.raises(ApiSocketError, match=f"API socket {served.path} is in use by another "
                       "process"):
        ApiServer.bind(served.path)
    assert served.client.ping()["pid"] == os.getpid()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with ApiServer.bind(path) as server:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert not os.path.lexists(path)


def test_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("precious")
    with pytest.raises(ApiSocketError, match="exists and is not a socket"):
        bind_unix_socket(str(path))
    assert path.read_text() == "precious"


def test_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ApiSocketError, match=r"cannot create API socket .*: No such file"):
        bind_unix_socket(str(tmp_path / "nowhere" / "api.sock"))


def test_close_leaves_a_successors_socket_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    server = ApiServer.bind(path)
    os.unlink(path)
    successor = bind_unix_socket(path)
    try:
        server.close()
        assert os.path.lexists(path)
    finally:
        successor.close()


def test_client_on_a_missing_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with ApiClient(path) as client, pytest.raises(VmmUnreachableError) as info:
        client.ping()
    assert str(info.value) == f"cannot reach VMM at {path}: No such file or directory"


# --- migration (no VM is ever built: validation, refusals, the receiver's listening side) -----


def wait_until(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_migration_info_before_any_migration_is_404(served: Served) -> None:
    with served.raw() as raw:
        response = raw.get("/vm.migration-info")
    assert response.status_code == 404
    assert response.json() == {"error": "no migration has run in this VMM"}


def test_send_migration_checks_parameters_before_the_state(served: Served) -> None:
    with served.raw() as raw:
        response = raw.put("/vm.send-migration", json={"destination_url": "tcp:h:1",
                                                       "connections": 0})
        assert response.status_code == 400
        assert response.json() == {"error": "connections: input should be greater than or "
                                            "equal to 1"}
        response = raw.put("/vm.send-migration", json={"destination_url": "tcp:h:1",
                                                       "hurry": True})
        assert response.json() == {"error": "hurry: unknown field"}
    message = expect_error(400, lambda: served.client.send_migration(
        destination_url="tcp:h:1", local=True))
    assert message.startswith("local: needs a unix: destination_url")
    message = expect_error(400, lambda: served.client.send_migration(destination_url="h:1"))
    assert message.startswith("destination_url: bad migration URL 'h:1'")
    message = expect_error(400, lambda: served.client.send_migration(destination_url="tcp:h:1"))
    assert message.startswith("token: a tcp: destination needs the token")
    message = expect_error(400, lambda: served.client.send_migration(
        destination_url="tcp:h:1", token="short"))
    assert message.startswith("token: must be at least 16 characters")
    message = expect_error(409, lambda: served.client.send_migration(destination_url="tcp:h:1",
                                                                     token=TOKEN))
    assert message == "cannot send a migration: no VM: create or restore one first"


def test_send_migration_needs_a_live_vm(served: Served) -> None:
    served.machine()
    served.client.shutdown()
    message = expect_error(409, lambda: served.client.send_migration(destination_url="tcp:h:1",
                                                                     token=TOKEN))
    assert message == ("cannot send a migration: VM is shutdown, it must be running or paused")


def test_receive_migration_listens_until_the_vmm_stops(served: Served) -> None:
    url = served.client.receive_migration("tcp:127.0.0.1:0")["receiver_url"]
    host, port = url.removeprefix("tcp:").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert served.client.info() == {"state": "receiving", "receiver_url": url}
    info = served.client.migration_info()
    assert (info["active"], info["role"], info["phase"]) == (True, "receive", "listening")
    message = expect_error(409, served.client.receive_migration, "tcp:127.0.0.1:0")
    assert message == ("cannot receive a migration: an incoming migration is awaited; shut "
                       "the VMM down to cancel it")
    assert "an incoming migration is awaited" in expect_error(409, served.client.create)
    message = expect_error(409, served.client.pause)
    assert message == "cannot pause: no VM yet: an incoming migration is awaited"

    served.client.shutdown_vmm()  # cancels the receive: the port is closed
    served.thread.join(15)
    assert not served.thread.is_alive()
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 5):
        pass


def test_failed_receive_leaves_the_vmm_empty_with_the_reason(served: Served) -> None:
    reply = served.client.receive_migration("tcp:127.0.0.1:0", max_connections=2)
    url, token = reply["receiver_url"], reply["token"]
    assert reply["security"] == "token" and len(token) == 32
    host, port = url.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port)), 5) as sock:  # a peer without the token
        sock.sendall(encode_hello(ConnectionRole.MAIN, bytes(16)))
        assert sock.recv(16)  # the challenge; then it leaves: nothing changes
    time.sleep(0.2)
    assert served.client.info()["state"] == "receiving"
    # A source that authenticates, then gives up.
    channel = SenderChannel(dial(parse_url(url), Security(token=token.encode())),
                            Identity(ConnectionRole.MAIN, bytes(16)), token=token.encode())
    channel.close()
    info = wait_until(lambda: (i := served.client.info())["state"] == "empty" and i,
                      "the receiver to give up")
    assert info == {"state": "empty",
                    "last_error": "the source closed the connection before COMPLETE"}
    progress = served.client.migration_info()
    assert (progress["active"], progress["phase"]) == (False, "failed")
    assert progress["error"] == info["last_error"]
    # Ready for the next attempt, which clears the old reason.
    served.client.receive_migration("tcp:127.0.0.1:0")
    assert "last_error" not in served.client.info()


def test_receive_migration_refusals(served: Served, tmp_path: Path) -> None:
    message = expect_error(400, served.client.receive_migration, "udp:1.2.3.4:5")
    assert message.startswith("receiver_url: bad migration URL 'udp:1.2.3.4:5'")
    message = expect_error(400, lambda: served.client.receive_migration(
        "tcp:127.0.0.1:0", max_connections=0))
    assert message == "max_connections: input should be greater than or equal to 1"
    message = expect_error(400, lambda: served.client.receive_migration(
        "tcp:127.0.0.1:0", prealloc="lots"))
    assert message.startswith("prealloc: bad size 'lots'")
    message = expect_error(400, lambda: served.client.receive_migration(
        "tcp:127.0.0.1:0", tls_dir=str(tmp_path)))
    assert message == f"tls_dir: {tmp_path}/ca-cert.pem is missing"
    message = expect_error(400, lambda: served.client.receive_migration(
        "tcp:127.0.0.1:0", token_file=str(tmp_path / "none")))
    assert message == f"token_file: {tmp_path}/none is missing"
    message = expect_error(400, lambda: served.client.receive_migration(
        "unix:/tmp/x.sock", token=TOKEN))
    assert message.startswith("token: not used with a unix: URL")
    message = expect_error(400, served.client.receive_migration,
                           f"unix:{tmp_path}/nowhere/mig.sock")
    assert message == (f"receiver_url: cannot create migration socket {tmp_path}/nowhere/"
                       "mig.sock: No such file or directory")
    assert served.client.info() == {"state": "empty"}
    expect_error(404, served.client.migration_info)
    served.machine()
    message = expect_error(409, served.client.receive_migration, "tcp:127.0.0.1:0")
    assert message == ("cannot receive a migration: a VM already exists and is running; "
                       "shut it down first")


def test_cli_migration_commands(served: Served) -> None:
    runner = CliRunner()
    base = ["remote", "--api-socket", served.path]
    result = runner.invoke(cli, [*base, "receive-migration", "tcp:127.0.0.1:0"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("receiver_url: tcp:127.0.0.1:")
    assert lines[1].startswith("token: ") and len(lines[1].split()[1]) == 32
    assert lines[2] == "security: token"
    result = runner.invoke(cli, [*base, "migration-info"])
    assert result.exit_code == 0 and json.loads(result.stdout)["phase"] == "listening"
    for args, text in ((["tcp:h:1", "--connections", "0"],
                        "Invalid value for '--connections': 0 is not in the range 1<=x<=128"),
                       (["tcp:h:1", "--timeout-strategy", "never"],
                        "Invalid value for '--timeout-strategy': 'never' is not one of")):
        result = runner.invoke(cli, [*base, "send-migration", *args])
        assert result.exit_code == 2 and result.stdout == "", (args, result.stdout)
        assert text in result.stderr
    for args, text in ((["unix:/x", "--connections", "2", "--local"],
                        "connections: must be 1 when local is true"),
                       (["tcp:h:1", "--json"], "token: a tcp: destination needs the token"),
                       (["tcp:h:1", "--json", "--token", TOKEN],
                        "cannot send a migration: no VM yet")):
        result = runner.invoke(cli, [*base, "send-migration", *args])
        assert result.exit_code == 1 and result.stdout == "", (args, result.stdout)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vmig: error: {text}"), result.stderr
