"""The API against real `vmig vmm` processes, real sockets and real VMs (needs /dev/kvm)."""

from __future__ import annotations

import os
import signal
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmig import __version__
from vmig.api.client import ApiClient
from vmig.api.process import VmmProcess
from vmig.errors import ApiError
from vmig.units import MiB

DIRTY_VM = ("--memory", "256M", "--cpus", "2", "--workload", "dirty")
WAIT_S = 10.0


def raw(vmm: VmmProcess) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=vmm.socket_path),
                        base_url="http://localhost/api/v1", timeout=30)


def expect_error(status: int, call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    assert info.value.status == status, info.value
    assert "\n" not in info.value.message and info.value.message
    return info.value.message


def wait_for(predicate: Any, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def counters_grow(client: ApiClient) -> bool:
    """True if heartbeat and pages_written both move within WAIT_S."""
    first = client.info()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = client.info()
        if (now["heartbeat"] > first["heartbeat"]
                and now["pages_written"] > first["pages_written"]):
            return True
    return False


def exit_status(vmm: VmmProcess, timeout: float = 20.0) -> int:
    return vmm.proc.wait(timeout)


# --- an empty VMM ------------------------------------------------------------------------------


def test_ping_answers_with_version_and_pid(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    assert vmm.client.ping() == {"version": __version__, "pid": vmm.proc.pid}


def test_info_on_an_empty_vmm(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    assert vmm.client.info() == {"state": "empty"}


def test_socket_file_is_mode_0600(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    mode = os.stat(vmm.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_commands_without_a_vm_are_409_json(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    with raw(vmm) as client:
        for endpoint in ("vm.pause", "vm.resume", "vm.shutdown", "vm.check-guest"):
            response = client.put(endpoint)
            assert response.status_code == 409, endpoint
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {
                "error": f"cannot {_verb(endpoint)}: no VM: create or restore one first"}


def _verb(endpoint: str) -> str:
    return {"vm.pause": "pause", "vm.resume": "resume", "vm.shutdown": "shut down",
            "vm.check-guest": "check the guest"}[endpoint]


def test_create_with_more_memory_than_the_host_has(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    message = expect_error(400, vmm.client.create, memory="60G")
    assert "more than the host" in message
    assert vmm.client.info() == {"state": "empty"}


def test_create_with_a_bad_size(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    message = expect_error(400, vmm.client.create, memory="big")
    assert message.startswith("bad memory size 'big'")


def test_create_with_an_unusable_serial_log_is_a_client_error(spawn_vmm: Any,
                                                              tmp_path: Path) -> None:
    vmm = spawn_vmm()
    path = tmp_path / "no-such-dir" / "serial.log"
    message = expect_error(400, vmm.client.create, memory="64M", serial_log=str(path))
    assert message == f"serial_log: cannot open {path}: No such file or directory"
    assert vmm.client.info() == {"state": "empty"}


def test_restore_of_a_missing_snapshot(spawn_vmm: Any, tmp_path: Path) -> None:
    vmm = spawn_vmm()
    message = expect_error(400, vmm.client.restore, str(tmp_path))
    assert "is not a vmig snapshot" in message


# --- a VM's lifecycle --------------------------------------------------------------------------


def test_boot_reports_the_vm_and_its_counters_grow(spawn_vmm: Any) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    info = vmm.client.info()
    assert info["state"] == "running"
    assert (info["memory_bytes"], info["cpus"], info["workload"]) == (256 * MiB, 2, "dirty")
    assert [vcpu["id"] for vcpu in info["vcpus"]] == [0, 1]
    assert counters_grow(vmm.client)


def test_create_in_an_empty_vmm_then_conflict_then_replace(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    info = vmm.client.create(memory="128M", cpus=1, workload="idle")
    assert (info["state"], info["memory_bytes"]) == ("running", 128 * MiB)
    message = expect_error(409, vmm.client.create)
    assert "a VM already exists and is running" in message
    vmm.client.shutdown()
    assert vmm.client.info()["state"] == "shutdown"
    vmm.client.shutdown()  # idempotent
    assert vmm.client.create(memory="64M")["memory_bytes"] == 64 * MiB


def test_pause_and_resume_in_the_wrong_state_are_409(spawn_vmm: Any) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    with raw(vmm) as client:
        response = client.put("vm.resume")
        assert response.status_code == 409
        assert response.json() == {"error": "cannot resume: VM is running, it must be paused"}
        assert client.put("vm.pause").status_code == 204
        response = client.put("vm.pause")
        assert response.status_code == 409
        assert response.json() == {"error": "cannot pause: VM is paused, it must be running"}
        assert client.put("vm.resume").status_code == 204


def test_snapshot_while_running_is_409(spawn_vmm: Any, tmp_path: Path) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    message = expect_error(409, vmm.client.snapshot, str(tmp_path / "snap"))
    assert message == "cannot snapshot: VM is running, it must be paused"
    assert not (tmp_path / "snap").exists()


def test_paused_counters_freeze_and_resume_moves_them(spawn_vmm: Any) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    assert counters_grow(vmm.client)
    vmm.client.pause()
    before = vmm.client.info()
    time.sleep(0.3)
    after = vmm.client.info()
    assert after["state"] == "paused"
    assert (after["heartbeat"], after["pages_written"]) == (before["heartbeat"],
                                                            before["pages_written"])
    assert all(vcpu["state"] == "paused" for vcpu in after["vcpus"])
    expect_error(409, vmm.client.check_guest)
    vmm.client.resume()
    assert counters_grow(vmm.client)


def test_check_guest_is_ok(spawn_vmm: Any) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    result = vmm.client.check_guest(30)
    assert result == {"ok": True, "pages_checked": result["pages_checked"], "bad_pages": 0,
                      "first_bad_page": None}
    assert result["pages_checked"] == 64 * MiB // 4096


def test_snapshot_and_restore_across_vmms(spawn_vmm: Any, tmp_path: Path) -> None:
    source = spawn_vmm(*DIRTY_VM)
    assert counters_grow(source.client)
    source.client.pause()
    snap = tmp_path / "snap"
    source.client.snapshot(snap.as_uri())
    assert {path.name for path in snap.iterdir()} >= {"state.json", "memory.bin"}
    paused_at = source.client.info()
    source.client.shutdown()

    # Restored at start-up, running.
    restored = spawn_vmm("--restore", str(snap))
    info = restored.client.info()
    assert (info["state"], info["cpus"], info["workload"]) == ("running", 2, "dirty")
    assert info["pages_written"] >= paused_at["pages_written"]
    assert restored.client.check_guest(30)["ok"]
    assert counters_grow(restored.client)

    # Restored through the API into an empty VMM, paused.
    empty = spawn_vmm()
    info = empty.client.restore(str(snap), resume=False)
    assert info["state"] == "paused"
    assert info["heartbeat"] == paused_at["heartbeat"]
    empty.client.resume()
    assert empty.client.check_guest(30)["ok"]


# --- stopping the VMM --------------------------------------------------------------------------


def test_vmm_shutdown_exits_cleanly(spawn_vmm: Any) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    vmm.client.shutdown_vmm()
    assert exit_status(vmm) == 0
    assert not os.path.lexists(vmm.socket_path)
    assert "Traceback" not in vmm.stderr_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(spawn_vmm: Any, signum: int) -> None:
    vmm = spawn_vmm(*DIRTY_VM)
    vmm.signal(signum)
    assert exit_status(vmm) == 0
    assert not os.path.lexists(vmm.socket_path)
    assert "Traceback" not in vmm.stderr_text()


def test_ready_line(spawn_vmm: Any) -> None:
    vmm = spawn_vmm()
    wait_for(lambda: "serving API" in vmm.stderr_text(), "the ready line")
    line = vmm.stderr_text().splitlines()[-1]
    stamp, rest = line.split(" ", 1)
    assert datetime.fromisoformat(stamp).tzinfo is not None, line
    assert rest == f"INFO vmig.cli: serving API on {vmm.socket_path} (pid {vmm.proc.pid})"


def test_sigterm_while_booting_unwinds(tmp_path: Path) -> None:
    """A signal before the API is up still shuts the half-built VM down and removes the socket."""
    import subprocess
    import sys

    path = tmp_path / "api.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vmig", "vmm", "--api-socket", str(path),
                             "--memory", "2G", "--working-set", "1G", "--cpus", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(path.exists, "the socket to be bound", timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 1), stderr  # 0 if it was already serving
    assert "Traceback" not in stderr
    assert not path.exists()
