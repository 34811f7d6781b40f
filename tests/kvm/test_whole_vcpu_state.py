"""The whole vCPU state on real KVM: a guest that sets debug registers, XMM registers,
MSRs beyond vmig's version-1 set and kvmclock keeps them through a snapshot/restore
and a migration, and its TSC and kvmclock advance by the wall time in between.

Sender, receiver and both VMs run in this process; tests/e2e/test_vcpu_state.py does
the same through VMM processes. The guest is tests/guests/state_test.S, a boot image.
"""

from __future__ import annotations

import time

import pytest
from asm import build_raw
from state_guest import SOURCE, check_carried, fresh_page, memory_reader

from vmig.config import VmConfig
from vmig.kvm import buffers
from vmig.migration.params import ReceiveParams, SendParams
from vmig.migration.receiver import MigrationReceiver
from vmig.migration.sender import MigrationSender
from vmig.vmm.machine import Machine, VmState, install_kick_handler

pytestmark = pytest.mark.kvm

TOKEN = "state-test-token-0123456789"
AWAY_S = 1.5  # how long the VM stays saved: the TSC must account for it


@pytest.fixture(scope="module", autouse=True)
def _kick_handler():
    install_kick_handler()


@pytest.fixture
def state_vm(tmp_path):
    """The state-test guest running in a 64 MiB VM."""
    image = build_raw(SOURCE, tmp_path)
    with Machine.boot(VmConfig.build(memory="64M", boot_image=str(image))) as machine:
        yield machine


def test_snapshot_and_restore_keep_the_whole_vcpu_state(state_vm, tmp_path):
    before, wall_before = fresh_page(memory_reader(state_vm.memory))
    state_vm.pause()
    state_vm.snapshot(str(tmp_path / "snap"))
    state = state_vm.save_state()
    assert state.version == 2
    time.sleep(AWAY_S)
    with Machine.restore_snapshot(str(tmp_path / "snap")) as restored:
        after, wall_after = fresh_page(memory_reader(restored.memory))
        check_carried(before, after, wall_after - wall_before, state_vm.tsc_khz)
        assert wall_after - wall_before >= AWAY_S
        restored.pause()  # the CPUID applied is the saved one, not the host's
        assert buffers.cpuid_entries(restored.vcpus[0].get_cpuid2()) == state.vcpus[0].cpuid


def test_migration_keeps_the_whole_vcpu_state(state_vm):
    outcome: dict[str, object] = {}

    def finished(machine: Machine | None, error: str | None) -> None:
        outcome.update(machine=machine, error=error)

    receiver = MigrationReceiver(ReceiveParams("tcp:127.0.0.1:0", token=TOKEN).resolve(),
                                 finished)
    try:
        url = str(receiver.start())
        # a fresh VM's kvmclock starts at 0: let the source's run ahead, so a destination
        # that did not set the clock would show it going back
        time.sleep(1.0)
        before, wall_before = fresh_page(memory_reader(state_vm.memory))
        summary = MigrationSender(state_vm, SendParams(url, token=TOKEN, connections=2)).run()
        assert summary["status"] == "completed"
        deadline = time.monotonic() + 10
        while "machine" not in outcome and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outcome.get("error") is None and state_vm.state is VmState.MIGRATED
        with outcome["machine"] as destination:
            after, wall_after = fresh_page(memory_reader(destination.memory))
            check_carried(before, after, wall_after - wall_before, destination.tsc_khz)
    finally:
        receiver.close()
