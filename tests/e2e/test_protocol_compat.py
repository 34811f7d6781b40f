"""The rolling-upgrade rule with a real old release: db2c624, the last protocol-2 commit,
taken from this repository's history (a git worktree, its own guest built there: the
`old_release` fixture, tests/oldrelease.py), migrates a dirtying guest to HEAD, and HEAD
migrates one to it. Each VMM is driven with requests its own API takes (db2c624's
vmig/api/models.py: the same endpoints and fields as used here).

Old to new: HEAD takes a protocol-2 sender and its version-1 CONFIG and STATE, and runs
db2c624's guest (built for its memory layout: entry at 0x8000, a config page of u64
fields) on. New to old: HEAD's sender meets a receiver that knows protocol 2 and
documents version 1 only, and sends those.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from asm import build_raw
from helpers import BUSY_GUEST, GUEST, Spawn, expect_api_error, heartbeat_grows, receive
from oldrelease import OldRelease

from vmig.api.process import VmmProcess

CONNECTIONS = 2
#: Switch to post-copy after one pass (a guest dirtying flat out never converges), so
#: that STATE goes the post-copy way and the destination serves faults.
POSTCOPY = {"postcopy": True, "postcopy_after_iterations": 1, "downtime_ms": 0}
#: Pre-copy verifies memory: COMPLETE then carries the source's digest, which the other
#: version must read and compare.
PRECOPY = {"verify_memory": True}


@pytest.fixture
def spawn_old(spawn_vmm: Spawn, old_release: OldRelease) -> Spawn:
    """`spawn_old(*args)`: a `vmig vmm` of db2c624 (its code, its guest), stopped by
    spawn_vmm's teardown like any other."""
    old_release.build_guest()

    def spawn(*args: str) -> VmmProcess:
        vmm = spawn_vmm(*args, prefix=old_release.vmm_prefix)
        assert os.readlink(f"/proc/{vmm.proc.pid}/cwd") == str(old_release.path)
        return vmm

    return spawn


def _is_old(vmm: VmmProcess) -> bool:
    """For a VMM that runs a VM: db2c624's vm.info has no ``guest`` (HEAD's says which
    kind of guest runs)."""
    info = vmm.client.info()
    assert info["state"] == "running", info
    return "guest" not in info


def _migrate(source: VmmProcess, destination: VmmProcess, **params: object) -> dict:
    url, auth = receive(destination)
    assert "token" in auth and url.startswith("tcp:127.0.0.1:")
    before = source.client.info()
    assert before["state"] == "running" and heartbeat_grows(source.client, before["heartbeat"])
    summary = source.client.send_migration(destination_url=url, **auth,
                                           connections=CONNECTIONS, **params)
    assert summary["status"] == "completed", summary
    assert (summary.get("postcopy") is not None) is bool(params.get("postcopy")), summary
    assert summary["memory_verified"] is bool(params.get("verify_memory")), summary
    assert summary["connections"] == CONNECTIONS
    # exactly one VM runs: the destination's
    assert source.client.info()["state"] == "migrated"
    after = destination.client.info()
    assert after["state"] == "running", after
    assert after["cpus"] == 2 and after["workload"] == "dirty"
    assert after["heartbeat"] >= summary["heartbeat_at_pause"] >= before["heartbeat"]
    assert heartbeat_grows(destination.client, after["heartbeat"])
    check = destination.client.check_guest(60)
    assert check["ok"] and check["bad_pages"] == 0, check
    return summary


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_db2c624_migrates_its_guest_to_head(spawn_vmm: Spawn, spawn_old: Spawn,
                                            postcopy: bool) -> None:
    destination = spawn_vmm()
    source = spawn_old(*(BUSY_GUEST if postcopy else GUEST))
    assert _is_old(source)
    _migrate(source, destination, **(POSTCOPY if postcopy else PRECOPY))
    assert not _is_old(destination)
    # HEAD has adopted db2c624's guest: it saves its whole state (version 2) and migrates
    # it on to another HEAD, where it keeps dirtying and checks out again
    _migrate(destination, spawn_vmm(), **PRECOPY)


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_head_migrates_its_guest_to_db2c624(spawn_vmm: Spawn, spawn_old: Spawn,
                                            postcopy: bool) -> None:
    destination = spawn_old()
    source = spawn_vmm(*(BUSY_GUEST if postcopy else GUEST))
    assert not _is_old(source)
    _migrate(source, destination, **(POSTCOPY if postcopy else PRECOPY))
    assert _is_old(destination)
    assert destination.client.check_guest(60)["ok"]


def test_a_guest_db2c624_cannot_run_is_refused_by_name(spawn_vmm: Spawn, spawn_old: Spawn,
                                                       tmp_path: Path) -> None:
    """A boot-image guest: version 1's configuration cannot say so (db2c624 would drop
    the field and build its own guest). CONFIG is refused before any memory moves, the
    destination is left empty and the guest runs on at the source."""
    destination = spawn_old()
    image = build_raw("counter_boot.S", tmp_path)
    source = spawn_vmm("--boot-image", str(image), "--memory", "64M")
    url, auth = receive(destination)
    message = expect_api_error(500, source.client.send_migration, destination_url=url,
                               **auth, connections=CONNECTIONS)
    assert "boot_image cannot be expressed in configuration version 1" in message
    assert source.client.info()["state"] == "running"
    assert source.client.migration_info()["bytes_transferred"] == 0
    assert destination.client.info()["state"] in ("empty", "receiving")
