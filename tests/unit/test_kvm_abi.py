"""The ctypes mirrors match the kernel ABI, and ioctl numbers follow from their sizes."""

import ctypes
import errno

import pytest

from vmig.kvm import _ioctl
from vmig.kvm import bindings as b
from vmig.kvm._ioctl import io, ior, iow, iowr


@pytest.mark.parametrize("struct", list(b.ABI_SIZES), ids=lambda s: s.__name__)
def test_struct_size_matches_kernel_abi(struct):
    assert ctypes.sizeof(struct) == b.ABI_SIZES[struct]


def test_kvm_run_field_offsets():
    # linux/kvm.h: exit_reason at 8, the exit union at 32, kvm_valid_regs after 256 bytes of it
    assert b.kvm_run.immediate_exit.offset == 1
    assert b.kvm_run.exit_reason.offset == 8
    assert b.kvm_run.exit.offset == 32
    assert b.kvm_run.kvm_valid_regs.offset == 288


def test_ioctl_numbers_known_values():
    # Values as printed by the kernel headers' _IO* macros on x86_64.
    assert b.KVM_GET_API_VERSION == 0xAE00
    assert b.KVM_CREATE_VM == 0xAE01
    assert b.KVM_RUN == 0xAE80
    assert b.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert b.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert b.KVM_GET_REGS == 0x8090AE81
    assert b.KVM_SET_REGS == 0x4090AE82
    assert b.KVM_GET_SREGS == 0x8138AE83
    assert b.KVM_SET_SREGS == 0x4138AE84
    assert b.KVM_GET_FPU == 0x81A0AE8C
    assert b.KVM_GET_MSRS == 0xC008AE88
    assert b.KVM_SET_CPUID2 == 0x4008AE90
    assert b.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert b.KVM_GET_CLOCK == 0x8030AE7C
    assert b.KVM_SET_CLOCK == 0x4030AE7B
    assert b.KVM_ENABLE_CAP == 0x4068AEA3
    assert b.KVM_RESET_DIRTY_RINGS == 0xAEC7
    assert b.KVM_GET_MP_STATE == 0x8004AE98
    assert b.KVM_GET_DEBUGREGS == 0x8080AEA1
    assert b.KVM_GET_XSAVE == 0x9000AEA4
    assert b.KVM_GET_XSAVE2 == 0x9000AECF
    assert b.KVM_GET_XCRS == 0x8188AEA6
    assert b.KVM_GET_SREGS2 == 0x8140AECC
    assert b.KVM_KVMCLOCK_CTRL == 0xAEAD
    assert b.KVM_SET_DEVICE_ATTR == 0x4018AEE1
    assert b.KVM_HAS_DEVICE_ATTR == 0x4018AEE3


def test_ioctl_helpers_encode_direction_and_size():
    class Twelve(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32 * 3)]

    assert io(1) == 0xAE01
    assert ior(2, Twelve) == (2 << 30) | (12 << 16) | 0xAE02
    assert iow(3, Twelve) == (1 << 30) | (12 << 16) | 0xAE03
    assert iowr(4, Twelve) == (3 << 30) | (12 << 16) | 0xAE04


def test_an_interrupted_ioctl_is_issued_again_except_kvm_run(monkeypatch) -> None:
    """EINTR means nothing was done: issue it again; KVM_RUN's is a kick for the caller."""
    calls: list[int] = []

    def interrupted_once(fd: int, request: int, arg: object = 0, mutate: bool = False) -> int:
        calls.append(request)
        if len(calls) == 1:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return 7

    monkeypatch.setattr(_ioctl.fcntl, "ioctl", interrupted_once)
    assert _ioctl.ioctl(3, 0xAE01, name="KVM_CREATE_VM") == 7 and len(calls) == 2
    calls.clear()
    with pytest.raises(InterruptedError):
        _ioctl.ioctl(3, 0xAE80, name="KVM_RUN", restart=False)
    assert len(calls) == 1
