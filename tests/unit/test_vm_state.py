"""The saved VM state is plain versioned data that round-trips exactly."""

import json
from pathlib import Path

import pytest

from vmig.config import VmConfig
from vmig.errors import SnapshotError
from vmig.kvm import bindings as b
from vmig.vmm.state import MachineState, VcpuState, dict_to_struct, struct_to_dict

#: Written by the format-1 code (vmig before state version 2), two vCPUs.
V1_DOCUMENT = Path(__file__).parent / "data" / "state_v1.json"
CLOCK = {"clock": 5_000_000, "flags": 14, "realtime": 1_796_000_000_000_000_000,
         "host_tsc": 9_000_000_000}


def _vcpu(vcpu_id: int) -> VcpuState:
    """A version-2 vCPU state with a value in every part."""
    regs = b.kvm_regs(rax=1, rip=0x8000 + vcpu_id, rflags=2)
    sregs2 = b.kvm_sregs2(cr0=0x80000011, efer=0x500, flags=b.KVM_SREGS2_FLAGS_PDPTRS_VALID)
    sregs2.cs.selector = 8
    sregs2.pdptrs[3] = 0x1234
    xsave = bytearray(4096)
    xsave[160 + 16 * 3 + 5] = 7  # XMM3 byte 5
    xcrs = b.kvm_xcrs(nr_xcrs=1)
    xcrs.xcrs[0].value = 3
    debugregs = b.kvm_debugregs(dr7=0x402)
    debugregs.db[2] = 0xDEAD0000 + vcpu_id
    cpuid = [{"function": 1, "index": 0, "flags": 0, "eax": 0x806F8, "ebx": 0, "ecx": 1 << 31,
              "edx": 1 << 25}]
    return VcpuState(vcpu_id, struct_to_dict(regs), None, None,
                     {0x10: 123456789, 0x6E0: 0, 0x4B564D01: 0x3001},
                     struct_to_dict(b.kvm_vcpu_events()), cpuid=cpuid,
                     mp_state=struct_to_dict(b.kvm_mp_state(mp_state=0)),
                     sregs2=struct_to_dict(sregs2), xsave=bytes(xsave).hex(),
                     xcrs=struct_to_dict(xcrs), debugregs=struct_to_dict(debugregs),
                     tsc_offset=(1 << 64) - 5000)


def _state(**fields) -> MachineState:
    return MachineState(VmConfig.build(cpus=2), 2_600_000, [_vcpu(0), _vcpu(1)], clock=CLOCK,
                        **fields)


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
