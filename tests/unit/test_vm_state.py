"""The saved VM state is plain versioned data that round-trips exactly."""

import json

import pytest

from vmig.config import VmConfig
from vmig.errors import SnapshotError
from vmig.kvm import bindings as b
from vmig.vmm.state import MachineState, VcpuState, dict_to_struct, struct_to_dict


def _vcpu(vcpu_id: int) -> VcpuState:
    regs = b.kvm_regs(rax=1, rip=0x8000 + vcpu_id, rflags=2)
    sregs = b.kvm_sregs(cr0=0x80000011, efer=0x500)
    sregs.cs.selector = 8
    sregs.cs.l = 1
    fpu = b.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
    fpu.xmm[3][5] = 7
    return VcpuState(vcpu_id, struct_to_dict(regs), struct_to_dict(sregs), struct_to_dict(fpu),
                     {0x10: 123456789}, struct_to_dict(b.kvm_vcpu_events()))


def test_struct_dict_round_trip_is_byte_exact():
    sregs = b.kvm_sregs(cr3=0x1000, apic_base=0xFEE00900)
    sregs.gdt.base, sregs.gdt.limit = 0x8100, 23
    sregs.interrupt_bitmap[2] = 5
    again = dict_to_struct(b.kvm_sregs, struct_to_dict(sregs))
    assert bytes(again) == bytes(sregs)


def test_machine_state_json_round_trip():
    state = MachineState(VmConfig.build(cpus=2), 2_600_000, [_vcpu(0), _vcpu(1)],
                         devices={"serial": {"regs": {"lcr": 3}}})
    again = MachineState.from_json(state.to_json())
    assert again.config == state.config
    assert again.vcpus[1].msrs == {0x10: 123456789}
    assert bytes(again.vcpus[1].kvm_regs()) == bytes(state.vcpus[1].kvm_regs())
    assert bytes(again.vcpus[0].kvm_fpu()) == bytes(state.vcpus[0].kvm_fpu())


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="other"), "not a vmig VM state"),
    (lambda d: d["vcpus"][0]["regs"].pop("rip"), "fields"),
    (lambda d: d["vcpus"].pop(), "configuration says 2"),
    (lambda d: d["config"].update(cpus=0), "malformed"),
])
def test_bad_state_documents_are_refused(mutate, words):
    state = MachineState(VmConfig.build(cpus=2), 1000, [_vcpu(0), _vcpu(1)])
    document = json.loads(state.to_json())
    mutate(document)
    with pytest.raises(SnapshotError, match=words):
        MachineState.from_json(json.dumps(document))


def test_state_that_is_not_json():
    with pytest.raises(SnapshotError, match="not valid JSON"):
        MachineState.from_json(b"\x00garbage")
