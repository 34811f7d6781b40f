"""What this host's KVM offers a guest: the CPUID it supports and the vCPUs' TSC frequency.

A migration destination compares these with what CONFIG says the guest was given, before
any memory moves (docs/protocol.md, "CONFIG").
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from vmig.kvm import Kvm

__all__ = ["HostCpu", "cpuid_entries", "host_cpu"]

#: The fields of one kvm_cpuid_entry2 that mean something (the rest is padding).
_ENTRY_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def cpuid_entries(cpuid: ctypes.Structure) -> tuple[dict[str, int], ...]:
    """A kvm_cpuid2 buffer's entries as plain data."""
    return tuple({name: int(getattr(entry, name)) for name in _ENTRY_FIELDS}
                 for entry in cpuid.entries[: cpuid.nent])


@dataclass(frozen=True)
class HostCpu:
    """What a guest can be given here."""

    tsc_khz: int
    cpuid: tuple[dict[str, int], ...]


@functools.cache
def host_cpu() -> HostCpu:
    """Ask KVM once per process (a throwaway VM and vCPU tell the TSC frequency)."""
    with Kvm() as kvm:
        supported = cpuid_entries(kvm.supported_cpuid())
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                tsc_khz = vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()
    return HostCpu(tsc_khz=tsc_khz, cpuid=supported)
