"""Buffers for the variable-length KVM structs (kvm_msrs, kvm_msr_list, kvm_cpuid2, the
XSAVE area), and CPUID entries as plain data."""

from __future__ import annotations

import ctypes

from vmig.cpu_compat import CPUID_ENTRY_FIELDS
from vmig.kvm.bindings import KVM_XSAVE_LEGACY_BYTES, kvm_cpuid_entry2, kvm_msr_entry, u8, u32


def msrs_buffer(indices: list[int]) -> tuple[ctypes.Structure, ctypes.Array]:
    """A kvm_msrs with `len(indices)` entries; returns (whole buffer, entries array)."""
    n = len(indices)

    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    buf = _Msrs(nmsrs=n)
    for entry, index in zip(buf.entries, indices, strict=True):
        entry.index = index
    return buf, buf.entries


def msr_list_buffer(capacity: int) -> ctypes.Structure:
    """A kvm_msr_list with room for `capacity` indices."""

    class _MsrList(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * capacity)]

    return _MsrList(nmsrs=capacity)


def cpuid_buffer(capacity: int) -> ctypes.Structure:
    """A kvm_cpuid2 with room for `capacity` entries."""

    class _Cpuid(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * capacity)]

    return _Cpuid(nent=capacity)


def xsave_buffer(size: int) -> ctypes.Array:
    """A zeroed buffer of `size` bytes (at least the 4 KiB kvm_xsave) for KVM_GET/SET_XSAVE(2)."""
    return (u8 * max(size, KVM_XSAVE_LEGACY_BYTES))()


def cpuid_entries(cpuid: ctypes.Structure) -> list[dict[str, int]]:
    """A kvm_cpuid2's entries as plain dicts (the form saved state and CONFIG carry)."""
    return [{name: int(getattr(entry, name)) for name in CPUID_ENTRY_FIELDS}
            for entry in cpuid.entries[: cpuid.nent]]


def cpuid_from_entries(entries: list[dict[str, int]]) -> ctypes.Structure:
    """The inverse of `cpuid_entries`: a kvm_cpuid2 for KVM_SET_CPUID2."""
    buf = cpuid_buffer(len(entries))
    for target, entry in zip(buf.entries, entries, strict=True):
        for name in CPUID_ENTRY_FIELDS:
            setattr(target, name, int(entry[name]))
    return buf
