"""State version 1 written from version 2 on real KVM: the sregs and FPU area it derives
are what KVM_GET_SREGS and KVM_GET_FPU give for the same vCPU, and vmig's own guest,
saved as version 2 and written as version 1, restores and passes its self-check."""

from __future__ import annotations

import struct

import pytest

from vmig.config import VmConfig
from vmig.kvm import Kvm
from vmig.memory import GuestMemory
from vmig.vmm.machine import Machine, install_kick_handler
from vmig.vmm.state import MachineState, fpu_from_xsave, sregs_from_sregs2, struct_to_dict


@pytest.fixture(scope="module", autouse=True)
def _kick_handler():
    install_kick_handler()


def test_derived_sregs_and_fpu_are_what_kvm_gives() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.supported_cpuid())
        size = kvm.xsave_size()
        xsave = bytearray(vcpu.get_xsave(size))
        struct.pack_into("<HHBxHQQI", xsave, 0, 0x27F, 0x3800, 0x81, 0x123, 0x401000,
                         0x9000, 0x1F00)
        xsave[32:160] = bytes((i * 7) & 0xFF for i in range(128))  # ST0-7
        xsave[160:416] = bytes((i * 13 + 1) & 0xFF for i in range(256))  # XMM0-15
        struct.pack_into("<Q", xsave, 512, 3)  # XSTATE_BV: x87 and SSE in use
        vcpu.set_xsave(bytes(xsave), size)
        events = vcpu.get_vcpu_events()
        events.interrupt.injected, events.interrupt.nr = 1, 0x41
        vcpu.set_vcpu_events(events)
        sregs2 = vcpu.get_sregs2()
        sregs2.cr0, sregs2.cs.selector = 0x60000011, 0x10
        vcpu.set_sregs2(sregs2)

        derived = fpu_from_xsave(vcpu.get_xsave(size))
        kernel = struct_to_dict(vcpu.get_fpu())
        # KVM_GET_FPU leaves mxcsr 0 (and KVM_SET_FPU ignores it): version 1 gets the
        # real one, from the XSAVE area
        assert kernel["mxcsr"] == 0 and derived["mxcsr"] == 0x1F00
        assert {**derived, "mxcsr": 0} == kernel
        assert derived["xmm"][15][15] == (255 * 13 + 1) & 0xFF
        sregs = sregs_from_sregs2(struct_to_dict(vcpu.get_sregs2()),
                                  struct_to_dict(vcpu.get_vcpu_events()))
        assert sregs == struct_to_dict(vcpu.get_sregs())
        assert sregs["interrupt_bitmap"] == [0, 1 << 1, 0, 0]  # vector 0x41


def test_vmigs_guest_saved_as_version_2_restores_from_version_1() -> None:
    config = VmConfig.build(memory="64M", cpus=2, workload="dirty", working_set="16M",
                            dirty_rate=20_000)
    with Machine.boot(config) as source:
        source.pause()
        text = source.save_state().to_json(version=1)
        memory = GuestMemory.create(source.memory.size)
        memory.view(0, memory.size)[:] = source.memory.view(0, memory.size)
    state = MachineState.from_json(text)
    assert state.version == 1 and state.clock is None
    with Machine.restore(state, memory) as restored:
        assert restored.check_guest()["ok"]
