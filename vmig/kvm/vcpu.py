"""`Vcpu`: the owner of a vCPU fd and its kvm_run mapping."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from vmig.errors import KvmError
from vmig.kvm import bindings as b
from vmig.kvm._ioctl import ioctl

# MSRs a migrated or restored vCPU needs beyond regs/sregs/fpu. EFER, FS/GS base
# are in kvm_sregs already; the TSC is the one the guest's pacing depends on.
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_CR_PAT = 0x277
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
SAVED_MSRS = (
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_IA32_CR_PAT,
    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE, MSR_TSC_AUX,
    MSR_IA32_TSC,  # last, so that restoring it is the final write before the guest runs
)


@dataclass(frozen=True)
class VcpuExit:
    """Why KVM_RUN returned. `reason` is an ExitReason; `interrupted` means a kick (EINTR)."""

    reason: b.ExitReason | int
    interrupted: bool = False


class Vcpu:
    """A KVM vCPU: registers, MSRs, CPUID and the run loop's single step `run()`."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self._fd = fd
        self.vcpu_id = vcpu_id
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct: b.kvm_run | None = b.kvm_run.from_buffer(self._run_map)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError(f"vCPU {self.vcpu_id}", errno.EBADF, "vCPU is closed")
        return self._fd

    @property
    def kvm_run(self) -> b.kvm_run:
        """The shared kvm_run page: exit details after `run()`, immediate_exit before."""
        if self.run_struct is None:
            raise KvmError(f"vCPU {self.vcpu_id}", errno.EBADF, "vCPU is closed")
        return self.run_struct

    def run(self) -> VcpuExit:
        """KVM_RUN once. A kick (signal + immediate_exit) returns `interrupted=True`."""
        try:
            ioctl(self.fd, b.KVM_RUN, 0, name="KVM_RUN")
        except InterruptedError:
            return VcpuExit(b.ExitReason.INTR, interrupted=True)
        reason = self.kvm_run.exit_reason
        try:
            return VcpuExit(b.ExitReason(reason))
        except ValueError:
            return VcpuExit(reason)

    def io_data(self) -> ctypes.Array:
        """The data bytes of the current KVM_EXIT_IO (size * count bytes, in kvm_run)."""
        io = self.kvm_run.io
        return (ctypes.c_uint8 * (io.size * io.count)).from_buffer(self._run_map, io.data_offset)

    def set_immediate_exit(self, value: bool) -> None:
        """Make the next (or current, with a signal) KVM_RUN return at once."""
        self.kvm_run.immediate_exit = 1 if value else 0

    def _get(self, request: int, struct: type[ctypes.Structure], name: str) -> ctypes.Structure:
        value = struct()
        ioctl(self.fd, request, value, name=name)
        return value

    def get_regs(self) -> b.kvm_regs:
        return self._get(b.KVM_GET_REGS, b.kvm_regs, "KVM_GET_REGS")

    def set_regs(self, regs: b.kvm_regs) -> None:
        ioctl(self.fd, b.KVM_SET_REGS, regs, name="KVM_SET_REGS")

    def get_sregs(self) -> b.kvm_sregs:
        return self._get(b.KVM_GET_SREGS, b.kvm_sregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs: b.kvm_sregs) -> None:
        ioctl(self.fd, b.KVM_SET_SREGS, sregs, name="KVM_SET_SREGS")

    def get_fpu(self) -> b.kvm_fpu:
        return self._get(b.KVM_GET_FPU, b.kvm_fpu, "KVM_GET_FPU")

    def set_fpu(self, fpu: b.kvm_fpu) -> None:
        ioctl(self.fd, b.KVM_SET_FPU, fpu, name="KVM_SET_FPU")

    def get_vcpu_events(self) -> b.kvm_vcpu_events:
        return self._get(b.KVM_GET_VCPU_EVENTS, b.kvm_vcpu_events, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: b.kvm_vcpu_events) -> None:
        ioctl(self.fd, b.KVM_SET_VCPU_EVENTS, events, name="KVM_SET_VCPU_EVENTS")

    def get_msrs(self, indices: list[int] | tuple[int, ...]) -> dict[int, int]:
        """KVM_GET_MSRS for `indices`; MSRs KVM cannot read are left out."""
        buf, entries = b.msrs_buffer(list(indices))
        count = ioctl(self.fd, b.KVM_GET_MSRS, buf, name="KVM_GET_MSRS")
        return {entries[i].index: entries[i].data for i in range(count)}

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS; every MSR must be accepted."""
        buf, entries = b.msrs_buffer(list(msrs))
        for entry in entries:
            entry.data = msrs[entry.index]
        count = ioctl(self.fd, b.KVM_SET_MSRS, buf, name="KVM_SET_MSRS")
        if count != len(msrs):
            bad = entries[count].index
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        ioctl(self.fd, b.KVM_SET_CPUID2, cpuid, name="KVM_SET_CPUID2")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC's frequency."""
        return ioctl(self.fd, b.KVM_GET_TSC_KHZ, 0, name="KVM_GET_TSC_KHZ")

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU fd; idempotent."""
        if self._fd >= 0:
            self.run_struct = None
            self._run_map.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
