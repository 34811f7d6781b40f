"""Reading a paused VM's vCPU and clock state into `MachineState` parts, and back.

The restore order is Firecracker's `restore_state`, per vCPU: CPUID, MP state, regs,
sregs (sregs2 where KVM has it), XSAVE, XCRs, debug registers, MSRs (TSC first, so
before TSC_DEADLINE), vCPU events last. Then, for the whole VM, time as the kernel's
Documentation/virt/kvm/devices/vcpu.rst (KVM_VCPU_TSC_OFFSET) says: KVM_SET_CLOCK with
the saved kvmclock and CLOCK_REALTIME (KVM adds the real time since), KVM_GET_CLOCK,
and each vCPU's TSC offset moved by the kvmclock time that passed and by the change
of host TSC, so TSC and kvmclock advance together and the vCPUs stay in step.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vmig.errors import KvmError
from vmig.kvm import Kvm, Vcpu, Vm, buffers
from vmig.kvm import bindings as b
from vmig.kvm.msrs import MSR_IA32_TSC, msr_name, msrs_to_save, restore_order
from vmig.vmm.state import (
    CLOCK_FIELDS,
    VcpuState,
    dict_to_struct,
    sregs_from_sregs2,
    struct_to_dict,
)


@dataclass(frozen=True)
class StateSupport:
    """What this host's KVM can save and restore, found out once per VM."""

    sregs2: bool
    xsave_size: int  # KVM_CAP_XSAVE2's size; 0 means the 4 KiB KVM_GET_XSAVE
    msrs: tuple[int, ...]  # the MSRs to save: KVM's index list without the PMU ones
    tsc_offset: bool  # the KVM_VCPU_TSC_OFFSET attribute

    @classmethod
    def probe(cls, kvm: Kvm, vcpu: Vcpu) -> StateSupport:
        return cls(
            sregs2=kvm.check_extension(b.Cap.SREGS2) > 0,
            xsave_size=kvm.xsave_size(),
            msrs=tuple(msrs_to_save(kvm.msr_index_list())),
            tsc_offset=vcpu.has_device_attr(b.KVM_VCPU_TSC_CTRL, b.KVM_VCPU_TSC_OFFSET),
        )


def read_vcpu_state(vcpu: Vcpu, support: StateSupport) -> VcpuState:
    """A paused vCPU's whole state (format version 2)."""
    sregs2 = struct_to_dict(vcpu.get_sregs2()) if support.sregs2 else None
    return VcpuState(
        vcpu_id=vcpu.vcpu_id,
        cpuid=buffers.cpuid_entries(vcpu.get_cpuid2()),
        mp_state=struct_to_dict(vcpu.get_mp_state()),
        regs=struct_to_dict(vcpu.get_regs()),
        sregs=None if sregs2 is not None else struct_to_dict(vcpu.get_sregs()),
        sregs2=sregs2,
        fpu=None,
        xsave=vcpu.get_xsave(support.xsave_size).hex(),
        xcrs=struct_to_dict(vcpu.get_xcrs()),
        debugregs=struct_to_dict(vcpu.get_debugregs()),
        msrs=vcpu.get_msrs(list(support.msrs)),
        events=struct_to_dict(vcpu.get_vcpu_events()),
        tsc_offset=vcpu.get_tsc_offset() if support.tsc_offset else None,
    )


def load_vcpu_state(vcpu: Vcpu, state: VcpuState, support: StateSupport) -> None:
    """Write `state` into a fresh vCPU in the restore order (see the module's docstring).

    A version-1 state has no CPUID (the caller set the host's), MP state, XSAVE, XCRs or
    debug registers; it carries the legacy FPU area instead.
    """
    if state.cpuid is not None:
        vcpu.set_cpuid2(buffers.cpuid_from_entries(state.cpuid))
    mp_state = state.kvm_mp_state()
    if mp_state is not None:
        vcpu.set_mp_state(mp_state)
    vcpu.set_regs(state.kvm_regs())
    _load_sregs(vcpu, state, support)
    xsave = state.xsave_bytes()
    if xsave is not None:
        vcpu.set_xsave(xsave, support.xsave_size)
    fpu = state.kvm_fpu()
    if fpu is not None:
        vcpu.set_fpu(fpu)
    xcrs = state.kvm_xcrs()
    if xcrs is not None:
        vcpu.set_xcrs(xcrs)
    debugregs = state.kvm_debugregs()
    if debugregs is not None:
        vcpu.set_debugregs(debugregs)
    load_msrs(vcpu, state.msrs)
    events = state.kvm_vcpu_events()
    if events is not None:
        vcpu.set_vcpu_events(events)


def _load_sregs(vcpu: Vcpu, state: VcpuState, support: StateSupport) -> None:
    sregs2 = state.kvm_sregs2()
    if sregs2 is not None and support.sregs2:
        vcpu.set_sregs2(sregs2)
        return
    sregs = state.kvm_sregs()
    if sregs is None:  # sregs2 saved, but this KVM has only KVM_SET_SREGS
        assert state.sregs2 is not None  # (the events, set last, carry any interrupt)
        sregs = dict_to_struct(b.kvm_sregs, sregs_from_sregs2(state.sregs2, None))
    vcpu.set_sregs(sregs)


def load_msrs(vcpu: Vcpu, msrs: dict[int, int]) -> None:
    """Write the saved MSRs that differ from the fresh vCPU's (the TSC always), TSC first.

    An MSR KVM refuses is a KvmError naming it; none is dropped. MSRs that already hold
    the saved value are not written: KVM refuses some writes (KVM_ASYNC_PF_INT = 0 here)
    that would change nothing.
    """
    order = restore_order(list(msrs))
    current = vcpu.get_msrs(order)
    writes = {index: msrs[index] for index in order
              if index == MSR_IA32_TSC or current.get(index) != msrs[index]}
    if not writes:
        return
    accepted = vcpu.set_msrs(writes)
    if accepted != len(writes):
        index = list(writes)[accepted]
        raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                       f"KVM refused MSR {msr_name(index)} = {writes[index]:#x}")


def read_clock(vm: Vm) -> dict[str, int]:
    """KVM_GET_CLOCK as plain data: step 1 of the kernel's procedure (before the TSC
    offsets are read)."""
    data = vm.get_clock()
    return {name: int(getattr(data, name)) for name in CLOCK_FIELDS}


def restore_time(vm: Vm, vcpus: list[Vcpu], states: list[VcpuState],
                 clock: dict[str, int] | None, tsc_khz: int) -> None:
    """Steps 4-7 of vcpu.rst: kvmclock, then each vCPU's TSC offset, so both advance by
    the real time since `clock` was read."""
    if clock is None:  # a version-1 state: the TSC MSR alone, as it was saved
        return
    vm.set_clock(b.kvm_clock_data(clock=clock["clock"],
                                  realtime=clock["realtime"],
                                  flags=clock["flags"] & b.KVM_CLOCK_REALTIME))
    offsets = [state.tsc_offset for state in states]
    if any(offset is None for offset in offsets) or not clock["flags"] & b.KVM_CLOCK_HOST_TSC:
        return
    now = vm.get_clock()
    if not now.flags & b.KVM_CLOCK_HOST_TSC:
        return
    elapsed_ticks = (now.clock - clock["clock"]) * tsc_khz // 1_000_000
    host_tsc_change = clock["host_tsc"] - now.host_tsc
    for vcpu, offset in zip(vcpus, offsets, strict=True):
        assert offset is not None
        vcpu.set_tsc_offset(offset + elapsed_ticks + host_tsc_change)


def notify_paused(vcpus: list[Vcpu]) -> list[int]:
    """KVMCLOCK_CTRL on each vCPU after a pause; returns the vCPUs whose guest has not
    registered kvmclock (the kernel answers EINVAL for them)."""
    return [vcpu.vcpu_id for vcpu in vcpus if not vcpu.kvmclock_ctrl()]



def save_vcpus(kvm: Kvm, vm: Vm, vcpus: list[Vcpu]
               ) -> tuple[dict[str, int], list[VcpuState]]:
    """The paused VM's clock, then each vCPU's state (the kernel's order: clock first)."""
    support = StateSupport.probe(kvm, vcpus[0])
    clock = read_clock(vm)
    return clock, [read_vcpu_state(vcpu, support) for vcpu in vcpus]


def restore_vcpus(kvm: Kvm, vm: Vm, vcpus: list[Vcpu], states: list[VcpuState],
                  clock: dict[str, int] | None, tsc_khz: int) -> None:
    """Load every vCPU's saved state into fresh vCPUs, then the time (see the docstring)."""
    support = StateSupport.probe(kvm, vcpus[0])
    for vcpu, state in zip(vcpus, states, strict=True):
        load_vcpu_state(vcpu, state, support)
    restore_time(vm, vcpus, states, clock, tsc_khz)
