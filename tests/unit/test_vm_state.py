"""The saved VM state is plain versioned data that round-trips exactly."""

import json

import pytest
from state_samples import CLOCK, V1_DOCUMENT, sample_vcpu

from vmig.config import VmConfig
from vmig.errors import SnapshotError
from vmig.kvm import bindings as b
from vmig.vmm.state import MachineState, dict_to_struct, struct_to_dict


def _state(**fields) -> MachineState:
    return MachineState(VmConfig.build(cpus=2), 2_600_000, [sample_vcpu(0), sample_vcpu(1)],
                        clock=CLOCK, **fields)


def test_struct_dict_round_trip_is_byte_exact():
    sregs = b.kvm_sregs(cr3=0x1000, apic_base=0xFEE00900)
    sregs.gdt.base, sregs.gdt.limit = 0x8100, 23
    sregs.interrupt_bitmap[2] = 5
    again = dict_to_struct(b.kvm_sregs, struct_to_dict(sregs))
    assert bytes(again) == bytes(sregs)


def test_machine_state_v2_json_round_trip():
    state = _state(devices={"serial": {"regs": {"lcr": 3}}})
    document = json.loads(state.to_json())
    assert document["version"] == 2
    again = MachineState.from_json(state.to_json())
    assert again == state
    assert list(again.vcpus[1].msrs) == [0x10, 0x6E0, 0x4B564D01]  # the order read is kept
    for name in ("kvm_regs", "kvm_sregs2", "kvm_xcrs", "kvm_debugregs", "kvm_mp_state",
                 "kvm_vcpu_events"):
        assert bytes(getattr(again.vcpus[1], name)()) == bytes(getattr(state.vcpus[1], name)())
    assert again.vcpus[0].xsave_bytes()[160 + 53] == 7
    assert again.vcpus[0].kvm_fpu() is None and again.vcpus[0].kvm_sregs() is None
    assert again.clock == CLOCK


def test_version_1_documents_still_load():
    state = MachineState.from_json(V1_DOCUMENT.read_bytes())
    assert state.version == 1
    vcpu = state.vcpus[1]
    assert vcpu.msrs == {0x10: 123456789, 0x174: 8}
    assert vcpu.kvm_fpu().xmm[3][5] == 7
    assert vcpu.kvm_sregs().cs.l == 1
    assert vcpu.xsave is None and vcpu.cpuid is None and state.clock is None


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="other"), "not a vmig VM state"),
    (lambda d: d["vcpus"][0]["regs"].pop("rip"), "fields"),
    (lambda d: d["vcpus"].pop(), "configuration says 2"),
    (lambda d: d["config"].update(cpus=0), "malformed"),
    (lambda d: d.pop("clock"), "lacks the clock"),
    (lambda d: d["vcpus"][0].update(xsave=None), "lacks xsave"),
    (lambda d: d["vcpus"][0].update(debugregs=None), "lacks debugregs"),
    (lambda d: d["vcpus"][0].update(xsave="zz"), "not hex"),
    (lambda d: d["vcpus"][0].update(sregs2=None), "sregs or sregs2"),
    (lambda d: d["vcpus"][0]["debugregs"].pop("dr7"), "fields"),
    (lambda d: d["vcpus"][0].update(extra=1), "unknown fields"),
])
def test_bad_state_documents_are_refused(mutate, words):
    state = _state()
    document = json.loads(state.to_json())
    mutate(document)
    with pytest.raises(SnapshotError, match=words):
        MachineState.from_json(json.dumps(document))


def test_state_that_is_not_json():
    with pytest.raises(SnapshotError, match="not valid JSON"):
        MachineState.from_json(b"\x00garbage")
