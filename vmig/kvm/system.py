"""`Kvm`: the owner of the /dev/kvm fd; creates `Vm`s."""

from __future__ import annotations

import ctypes
import errno
import os

from vmig.errors import KvmError, KvmUnavailableError
from vmig.kvm import bindings as b
from vmig.kvm import buffers
from vmig.kvm._ioctl import ioctl
from vmig.kvm.vcpu import read_cpuid_list
from vmig.kvm.vm import Vm

KVM_DEVICE = "/dev/kvm"


class Kvm:
    """An open /dev/kvm. Use as a context manager, or call `close()`."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, "
                "or enable nested virtualisation)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path} is not accessible: run as root or join the 'kvm' group"
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        self.path = path
        try:
            version = ioctl(self._fd, b.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
        except KvmError as exc:
            os.close(self._fd)
            raise KvmUnavailableError(f"{path} is not a KVM device: {exc}") from None
        if version != b.KVM_API_VERSION:
            os.close(self._fd)
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; vmig needs {b.KVM_API_VERSION}"
            )
        self.vcpu_mmap_size = ioctl(self._fd, b.KVM_GET_VCPU_MMAP_SIZE,
                                    name="KVM_GET_VCPU_MMAP_SIZE")

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmError("/dev/kvm", errno.EBADF, "Kvm is closed")
        return self._fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if `cap` is missing, else a positive capability value."""
        return ioctl(self.fd, b.KVM_CHECK_EXTENSION, int(cap), name="KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID: what this KVM can offer a guest."""
        return read_cpuid_list(self.fd, b.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def emulated_cpuid(self) -> ctypes.Structure:
        """KVM_GET_EMULATED_CPUID: features KVM emulates (slowly) beyond the supported list."""
        return read_cpuid_list(self.fd, b.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID")

    def xsave_size(self) -> int:
        """Bytes KVM_GET_XSAVE2 needs (KVM_CAP_XSAVE2), or 0: use the 4 KiB KVM_GET_XSAVE."""
        return self.check_extension(b.Cap.XSAVE2)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs this KVM can save and restore; the kernel
        lists its emulated MSRs (kvmclock's among them) after the hardware ones."""
        buf = buffers.msr_list_buffer(1024)
        ioctl(self.fd, b.KVM_GET_MSR_INDEX_LIST, buf, name="KVM_GET_MSR_INDEX_LIST")
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM: a new, empty VM owned by the caller."""
        fd = ioctl(self.fd, b.KVM_CREATE_VM, 0, name="KVM_CREATE_VM")
        return Vm(fd, self)

    def close(self) -> None:
        """Close /dev/kvm; idempotent. VMs already created keep working."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

