"""Sample saved vCPU states for the unit tests of the saved state and its restore."""

from __future__ import annotations

from pathlib import Path

from vmig.kvm import bindings as b
from vmig.vmm.state import VcpuState, struct_to_dict

#: Written by the format-1 code (vmig before state version 2), two vCPUs.
V1_DOCUMENT = Path(__file__).parent / "data" / "state_v1.json"
CLOCK = {"clock": 5_000_000, "flags": 14, "realtime": 1_796_000_000_000_000_000,
         "host_tsc": 9_000_000_000}


def sample_vcpu(vcpu_id: int) -> VcpuState:
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
