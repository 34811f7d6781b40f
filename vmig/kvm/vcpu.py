"""`Vcpu`: the owner of a vCPU fd and its kvm_run mapping."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from vmig.errors import KvmError
from vmig.kvm import bindings as b
from vmig.kvm import buffers
from vmig.kvm._ioctl import ioctl


def read_cpuid_list(fd: int, request: int, name: str) -> ctypes.Structure:
    """A kvm_cpuid2-returning ioctl, growing the buffer until the kernel is satisfied."""
    capacity = 64
    while True:
        buf = buffers.cpuid_buffer(capacity)
        try:
            ioctl(fd, request, buf, name=name)
            return buf
        except KvmError as exc:
            if exc.errno != errno.E2BIG or capacity >= 4096:
                raise
            capacity *= 2


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
            ioctl(self.fd, b.KVM_RUN, 0, name="KVM_RUN", restart=False)
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

    def get_sregs2(self) -> b.kvm_sregs2:
        return self._get(b.KVM_GET_SREGS2, b.kvm_sregs2, "KVM_GET_SREGS2")

    def set_sregs2(self, sregs: b.kvm_sregs2) -> None:
        ioctl(self.fd, b.KVM_SET_SREGS2, sregs, name="KVM_SET_SREGS2")

    def get_mp_state(self) -> b.kvm_mp_state:
        return self._get(b.KVM_GET_MP_STATE, b.kvm_mp_state, "KVM_GET_MP_STATE")

    def set_mp_state(self, state: b.kvm_mp_state) -> None:
        ioctl(self.fd, b.KVM_SET_MP_STATE, state, name="KVM_SET_MP_STATE")

    def get_xsave(self, size: int) -> bytes:
        """The XSAVE area: KVM_GET_XSAVE2 into `size` bytes, or KVM_GET_XSAVE (4 KiB) when
        `size` is 0 (no KVM_CAP_XSAVE2)."""
        buf = buffers.xsave_buffer(size)
        if size:
            ioctl(self.fd, b.KVM_GET_XSAVE2, buf, name="KVM_GET_XSAVE2")
        else:
            ioctl(self.fd, b.KVM_GET_XSAVE, buf, name="KVM_GET_XSAVE")
        return bytes(buf)

    def set_xsave(self, area: bytes, size: int = 0) -> None:
        """KVM_SET_XSAVE; the kernel reads as many bytes as its KVM_CAP_XSAVE2 `size` says,
        so the buffer has at least that many."""
        buf = buffers.xsave_buffer(max(len(area), size))
        ctypes.memmove(buf, area, len(area))
        ioctl(self.fd, b.KVM_SET_XSAVE, buf, name="KVM_SET_XSAVE")

    def get_xcrs(self) -> b.kvm_xcrs:
        return self._get(b.KVM_GET_XCRS, b.kvm_xcrs, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: b.kvm_xcrs) -> None:
        ioctl(self.fd, b.KVM_SET_XCRS, xcrs, name="KVM_SET_XCRS")

    def get_debugregs(self) -> b.kvm_debugregs:
        return self._get(b.KVM_GET_DEBUGREGS, b.kvm_debugregs, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs: b.kvm_debugregs) -> None:
        ioctl(self.fd, b.KVM_SET_DEBUGREGS, debugregs, name="KVM_SET_DEBUGREGS")

    def get_msrs(self, indices: list[int] | tuple[int, ...]) -> dict[int, int]:
        """KVM_GET_MSRS for `indices`; KVM stops at the first MSR it cannot read, so the
        rest are read one by one and those that fail are left out."""
        buf, entries = buffers.msrs_buffer(list(indices))
        count = ioctl(self.fd, b.KVM_GET_MSRS, buf, name="KVM_GET_MSRS")
        values = {entries[i].index: entries[i].data for i in range(count)}
        for index in list(indices)[count + 1:]:
            one, entry = buffers.msrs_buffer([index])
            if ioctl(self.fd, b.KVM_GET_MSRS, one, name="KVM_GET_MSRS") == 1:
                values[index] = entry[0].data
        return values

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """KVM_SET_MSRS in the dict's order; returns how many KVM accepted (it stops at
        the first it refuses, which is then `list(msrs)[count]`)."""
        buf, entries = buffers.msrs_buffer(list(msrs))
        for entry in entries:
            entry.data = msrs[entry.index]
        return ioctl(self.fd, b.KVM_SET_MSRS, buf, name="KVM_SET_MSRS")

    def _device_attr(self, request: int, name: str, group: int, attr: int,
                     value: ctypes.c_uint64 | None = None) -> None:
        arg = b.kvm_device_attr(group=group, attr=attr,
                                addr=0 if value is None else ctypes.addressof(value))
        ioctl(self.fd, request, arg, name=name)

    def has_device_attr(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR on the vCPU fd (ENXIO: not there)."""
        try:
            self._device_attr(b.KVM_HAS_DEVICE_ATTR, "KVM_HAS_DEVICE_ATTR", group, attr)
        except KvmError as exc:
            if exc.errno in (errno.ENXIO, errno.EINVAL, errno.ENOTTY):
                return False
            raise
        return True

    def get_tsc_offset(self) -> int:
        """KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET): guest TSC - host TSC."""
        value = ctypes.c_uint64()
        self._device_attr(b.KVM_GET_DEVICE_ATTR, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)",
                          b.KVM_VCPU_TSC_CTRL, b.KVM_VCPU_TSC_OFFSET, value)
        return value.value

    def set_tsc_offset(self, offset: int) -> None:
        value = ctypes.c_uint64(offset & (1 << 64) - 1)
        self._device_attr(b.KVM_SET_DEVICE_ATTR, "KVM_SET_DEVICE_ATTR(TSC_OFFSET)",
                          b.KVM_VCPU_TSC_CTRL, b.KVM_VCPU_TSC_OFFSET, value)

    def kvmclock_ctrl(self) -> bool:
        """KVMCLOCK_CTRL: tell the guest it was paused (no soft-lockup warning). False
        when the guest has not registered kvmclock (the kernel answers EINVAL)."""
        try:
            ioctl(self.fd, b.KVM_KVMCLOCK_CTRL, 0, name="KVM_KVMCLOCK_CTRL")
        except KvmError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        return True

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        ioctl(self.fd, b.KVM_SET_CPUID2, cpuid, name="KVM_SET_CPUID2")

    def get_cpuid2(self) -> ctypes.Structure:
        """KVM_GET_CPUID2: the CPUID entries as set on this vCPU."""
        return read_cpuid_list(self.fd, b.KVM_GET_CPUID2, "KVM_GET_CPUID2")

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
