"""The whole vCPU state on real KVM: a guest that sets debug registers, XMM registers,
MSRs beyond vmig's version-1 set and kvmclock keeps them through a snapshot/restore
and a migration, and its TSC and kvmclock advance by the wall time in between.

Sender, receiver and both VMs run in this process; tests/e2e/test_vcpu_state.py does
the same through VMM processes. The guest is tests/guests/state_test.S, a boot image.
"""

from __future__ import annotations

import json
import time

import pytest
from asm import build_raw
from state_guest import SOURCE, check_carried, fresh_page, memory_reader

from vmig.config import VmConfig
from vmig.kvm import buffers
from vmig.memory import GuestMemory
from vmig.migration.params import ReceiveParams, SendParams
from vmig.migration.receiver import MigrationReceiver
from vmig.migration.sender import MigrationSender
from vmig.vmm.machine import Machine, VmState, install_kick_handler
from vmig.vmm.state import MachineState, struct_to_dict

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
    assert state_vm.vcpus[0].kvmclock_ctrl()  # the guest registered kvmclock: no EINVAL
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


V1_MSRS = (0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
           0xC0000102, 0xC0000103, 0x10)  # what format 1 saved


def test_a_version_1_state_of_vmigs_guest_still_restores():
    config = VmConfig.build(memory="128M", cpus=2, workload="dirty", working_set="16M",
                            dirty_rate=20_000)
    with Machine.boot(config) as source:
        source.pause()
        v2 = source.save_state()
        # the document format 1 wrote: regs, sregs, the FPU area, 11 MSRs, events
        document = json.loads(v2.to_json())
        document["version"] = 1
        del document["clock"]
        for saved, handle in zip(document["vcpus"], source.handles, strict=True):
            vcpu = handle.vcpu
            msrs = vcpu.get_msrs(V1_MSRS)
            for name in ("cpuid", "mp_state", "sregs2", "xsave", "xcrs", "debugregs",
                         "tsc_offset"):
                del saved[name]
            saved.update(sregs=struct_to_dict(vcpu.get_sregs()),
                         fpu=struct_to_dict(vcpu.get_fpu()),
                         msrs={f"{index:#x}": value for index, value in msrs.items()})
        v1 = MachineState.from_json(json.dumps(document))
        assert v1.version == 1
        memory = GuestMemory.create(source.memory.size)
        memory.view(0, memory.size)[:] = source.memory.view(0, memory.size)
    with Machine.restore(v1, memory) as restored:
        assert restored.check_guest()["ok"]
        restored.pause()  # vmig's guest has no kvmclock: KVMCLOCK_CTRL's EINVAL is no error
        assert not restored.vcpus[0].kvmclock_ctrl()
