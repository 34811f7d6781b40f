"""`Vm`: the owner of a VM fd; memory slots, dirty logging and vCPUs."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import numpy as np

from vmig.errors import KvmError
from vmig.kvm import bindings as b
from vmig.kvm._ioctl import ioctl
from vmig.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from vmig.kvm.system import Kvm

PAGE_SIZE = 4096


def dirty_bitmap_words(memory_size: int) -> int:
    """Number of u64 words in a slot's dirty bitmap: one bit per 4 KiB page."""
    pages = (memory_size + PAGE_SIZE - 1) // PAGE_SIZE
    return (pages + 63) // 64


class Vm:
    """A KVM VM. Owns its fd; vCPUs it creates are owned by the caller."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self._fd = fd
        self.kvm = kvm
        self._slots: dict[int, b.kvm_userspace_memory_region] = {}

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError("VM", errno.EBADF, "VM is closed")
        return self._fd

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, log_dirty: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host memory at `userspace_addr` into the guest."""
        region = b.kvm_userspace_memory_region(
            slot=slot,
            flags=b.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, b.KVM_SET_USER_MEMORY_REGION, region, name="KVM_SET_USER_MEMORY_REGION")
        self._slots[slot] = region

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """Switch KVM's dirty-page log on or off for an existing slot."""
        region = self._slots[slot]
        self.set_user_memory_region(slot, region.guest_phys_addr, region.memory_size,
                                    region.userspace_addr, log_dirty=enabled)

    def dirty_logging(self, slot: int) -> bool:
        """Whether dirty logging is on for `slot`."""
        return bool(self._slots[slot].flags & b.KVM_MEM_LOG_DIRTY_PAGES)

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the pages written since the last call, as u64 words.

        Reading the log also clears it (and write-protects the pages again).
        """
        words = np.zeros(dirty_bitmap_words(self._slots[slot].memory_size), dtype=np.uint64)
        log = b.kvm_dirty_log(slot=slot, dirty_bitmap=words.ctypes.data)
        ioctl(self.fd, b.KVM_GET_DIRTY_LOG, log, name="KVM_GET_DIRTY_LOG")
        return words

    def get_clock(self) -> b.kvm_clock_data:
        """KVM_GET_CLOCK: kvmclock ns, with host CLOCK_REALTIME and TSC where flagged."""
        data = b.kvm_clock_data()
        ioctl(self.fd, b.KVM_GET_CLOCK, data, name="KVM_GET_CLOCK")
        return data

    def set_clock(self, data: b.kvm_clock_data) -> None:
        """KVM_SET_CLOCK; with KVM_CLOCK_REALTIME KVM adds the realtime elapsed since."""
        ioctl(self.fd, b.KVM_SET_CLOCK, data, name="KVM_SET_CLOCK")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU, with its kvm_run page mapped; owned by the caller."""
        fd = ioctl(self.fd, b.KVM_CREATE_VCPU, vcpu_id, name="KVM_CREATE_VCPU")
        try:
            return Vcpu(fd, vcpu_id, self.kvm.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the VM fd; idempotent. The kernel frees the VM once its vCPUs close too."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

