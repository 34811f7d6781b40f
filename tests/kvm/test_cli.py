"""The `vmig` command line against real VMM processes (needs /dev/kvm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DIRTY_VM = ("--memory", "256M", "--cpus", "2", "--workload", "dirty")


def vmig(*args: str, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmig", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


def remote(vmm: Any, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return vmig("remote", "--api-socket", vmm.socket_path, *args, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmig: error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --- vmig vmm: refusing to start ---------------------------------------------------------------


def test_socket_in_use_is_refused_and_the_first_vmm_is_unaffected(spawn_vmm: Any) -> None:
    first = spawn_vmm(*DIRTY_VM)
    result = vmig("vmm", "--api-socket", first.socket_path, *DIRTY_VM)
    assert_one_line_error(result, f"API socket {first.socket_path} is in use by another "
                                  "process")
    assert first.client.ping()["pid"] == first.proc.pid
    assert first.client.info()["state"] == "running"
    assert os.path.lexists(first.socket_path)


def test_bad_size_string(tmp_path: Path) -> None:
    result = vmig("vmm", "--api-socket", str(tmp_path / "api.sock"), "--memory", "lots")
    assert_one_line_error(result, "bad memory size 'lots'")
    assert not (tmp_path / "api.sock").exists()


def test_more_memory_than_the_host_has(tmp_path: Path) -> None:
    result = vmig("vmm", "--api-socket", str(tmp_path / "api.sock"), "--memory", "60G")
    assert_one_line_error(result, "more than the host can give")
    assert not (tmp_path / "api.sock").exists()


def test_restore_of_something_that_is_not_a_snapshot(tmp_path: Path) -> None:
    result = vmig("vmm", "--api-socket", str(tmp_path / "api.sock"), "--restore", str(tmp_path))
    assert_one_line_error(result, "is not a vmig snapshot")
    assert not (tmp_path / "api.sock").exists()


def test_stale_socket_is_replaced(spawn_vmm: Any, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    vmm = spawn_vmm(socket_path=str(path))
    assert vmm.client.info() == {"state": "empty"}


# --- vmig remote -------------------------------------------------------------------------------


def test_remote_commands(spawn_vmm: Any, tmp_path: Path) -> None:
    vmm = spawn_vmm(*DIRTY_VM)

    result = remote(vmm, "ping")
    assert result.returncode == 0 and json.loads(result.stdout)["pid"] == vmm.proc.pid

    result = remote(vmm, "info")
    info = json.loads(result.stdout)
    assert result.returncode == 0 and info["state"] == "running" and info["cpus"] == 2
    assert result.stdout.startswith('{\n  "state": "running"')  # indent 2

    assert_one_line_error(remote(vmm, "resume"), "cannot resume: VM is running, it must be "
                                                 "paused")
    assert_one_line_error(remote(vmm, "snapshot", "snap"), "cannot snapshot: VM is running")

    result = remote(vmm, "check-guest")
    check = json.loads(result.stdout)
    assert result.returncode == 0 and check["ok"] is True and check["bad_pages"] == 0

    assert remote(vmm, "pause").returncode == 0
    assert_one_line_error(remote(vmm, "pause"), "cannot pause: VM is paused")
    result = remote(vmm, "snapshot", "snap", cwd=tmp_path)  # relative to the client's cwd
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "snap" / "state.json").exists()
    assert remote(vmm, "resume").returncode == 0

    assert remote(vmm, "shutdown").returncode == 0
    assert json.loads(remote(vmm, "info").stdout)["state"] == "shutdown"

    result = remote(vmm, "restore", str(tmp_path / "snap"), "--paused")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "paused"

    assert remote(vmm, "shutdown-vmm").returncode == 0
    assert vmm.proc.wait(20) == 0
    assert not os.path.lexists(vmm.socket_path)
    assert_one_line_error(remote(vmm, "ping"), f"cannot reach VMM at {vmm.socket_path}")


def test_remote_create(spawn_vmm: Any, tmp_path: Path) -> None:
    vmm = spawn_vmm()
    result = remote(vmm, "create", "--memory", "128M", "--workload", "dirty", "--working-set",
                    "16M", "--dirty-rate", "5000", "--order", "sequential", "--serial-log",
                    "serial.log", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["state"], info["working_set_bytes"], info["order"]) == ("running", 16 << 20,
                                                                          "sequential")
    assert info["serial_log"] == str(tmp_path / "serial.log")
    assert_one_line_error(remote(vmm, "create"), "a VM already exists")
    assert_one_line_error(remote(vmm, "create", "--memory", "1X"), "bad memory size '1X'")


def test_vmm_boots_from_a_snapshot(spawn_vmm: Any, tmp_path: Path) -> None:
    source = spawn_vmm(*DIRTY_VM)
    assert remote(source, "pause").returncode == 0
    assert remote(source, "snapshot", f"file://{tmp_path}/snap").returncode == 0
    restored = spawn_vmm("--restore", str(tmp_path / "snap"))
    result = remote(restored, "check-guest")
    assert result.returncode == 0 and json.loads(result.stdout)["ok"] is True


# --- vmig demo ---------------------------------------------------------------------------------


def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "vmig", "demo", "--seconds", "1"],
                            capture_output=True, text=True, timeout=120, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check-guest: ok" in result.stdout
    assert "state receiving" in result.stdout
    assert "heartbeat went on at the destination" in result.stdout
    assert "all good" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"


def test_demo_json_prints_only_its_report(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "vmig", "demo", "--seconds", "0",
                             "--memory", "128M", "--working-set", "16M", "--json"],
                            capture_output=True, text=True, timeout=120, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\n") == 1 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["heartbeat_continued"] is True
    assert report["summary"]["status"] == "completed" and report["check"]["ok"] is True


def test_restore_from_a_missing_directory_says_so(spawn_vmm: Any, tmp_path: Path) -> None:
    vmm = spawn_vmm()
    missing = tmp_path / "no-snapshot"
    assert_one_line_error(remote(vmm, "restore", str(missing)),
                          f"snapshot directory {missing} does not exist")
    assert_one_line_error(remote(vmm, "restore", str(tmp_path)), "is not a vmig snapshot: "
                                                                 "state.json is missing")


def test_page_overwritten_in_the_memory_file_fails_check_guest(spawn_vmm: Any,
                                                               tmp_path: Path) -> None:
    """The self-check can fail: a page changed behind the guest's back is caught.

    The guest is idle (it stamped its working set once and only halts since), so
    nothing rewrites the page between the corruption and the check.
    """
    memory_file = tmp_path / "ram"
    vmm = spawn_vmm("--memory", "128M", "--cpus", "2", "--working-set", "16M",
                    "--memory-file", str(memory_file))
    info = vmm.client.info()
    assert remote(vmm, "check-guest").returncode == 0
    victim = 3000
    with open(memory_file, "r+b") as ram:  # the VMM maps this file shared, like QEMU
        ram.seek(info["working_set_gpa"] + victim * 4096)
        ram.write(b"\xde\xad\xbe\xef" * 4)
    result = remote(vmm, "check-guest")
    check = json.loads(result.stdout)
    assert result.returncode == 1
    assert (check["ok"], check["bad_pages"], check["first_bad_page"]) == (False, 1, victim)
