"""The whole vCPU state through real VMM processes: the state-test guest
(tests/guests/state_test.S, a boot image) sets DR0-DR3, XMM0-XMM7, MSRs beyond vmig's
version-1 state and kvmclock; after a live migration and after a snapshot/restore
each value is unchanged and its TSC and kvmclock moved on by the wall time between.
The test reads the guest's RESULT page from each VMM's guest memory fd."""

from __future__ import annotations

import time
from pathlib import Path

from asm import build_raw
from helpers import Spawn, receive, wait_for
from state_guest import SOURCE, check_carried, fresh_page, process_memory_reader

from vmig.kvm import Kvm

AWAY_S = 1.5  # between the snapshot and the restore


def _start(spawn_vmm: Spawn, tmp_path: Path):
    image = build_raw(SOURCE, tmp_path)
    source = spawn_vmm("--boot-image", str(image), "--memory", "64M")
    wait_for(lambda: source.client.info()["state"] == "running", "the state-test guest")
    return source


def test_live_migration_keeps_the_whole_vcpu_state(spawn_vmm: Spawn, tmp_path: Path) -> None:
    destination = spawn_vmm()
    source = _start(spawn_vmm, tmp_path)
    time.sleep(1.0)  # a fresh VM's kvmclock starts at 0: the source's must be ahead
    before, wall_before = fresh_page(process_memory_reader(source.proc.pid))
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, connections=4)
    assert summary["status"] == "completed"
    wait_for(lambda: destination.client.info()["state"] == "running", "the destination")
    after, wall_after = fresh_page(process_memory_reader(destination.proc.pid))
    check_carried(before, after, wall_after - wall_before, _tsc_khz())


def test_snapshot_and_restore_keep_the_whole_vcpu_state(spawn_vmm: Spawn, tmp_path: Path
                                                        ) -> None:
    source = _start(spawn_vmm, tmp_path)
    before, wall_before = fresh_page(process_memory_reader(source.proc.pid))
    source.client.pause()
    source.client.snapshot(str(tmp_path / "snap"))
    source.client.shutdown()
    time.sleep(AWAY_S)
    restored = spawn_vmm()
    restored.client.restore(str(tmp_path / "snap"))
    after, wall_after = fresh_page(process_memory_reader(restored.proc.pid))
    assert wall_after - wall_before >= AWAY_S
    check_carried(before, after, wall_after - wall_before, _tsc_khz())


def _tsc_khz() -> int:
    """This host's guest TSC frequency (both VMMs run here)."""
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        return vcpu.get_tsc_khz()
