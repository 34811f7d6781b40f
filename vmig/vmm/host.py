"""What this host's KVM offers a guest: the CPUID it supports and the vCPUs' TSC frequency.

A migration destination compares these with what CONFIG says the guest was given, before
any memory moves (docs/protocol.md, "CONFIG").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vmig.kvm import Kvm
from vmig.kvm.buffers import cpuid_entries

__all__ = ["HostCpu", "host_cpu"]

@dataclass(frozen=True)
class HostCpu:
    """What a guest can be given here."""

    tsc_khz: int
    cpuid: tuple[dict[str, int], ...]


@functools.cache
def host_cpu() -> HostCpu:
    """Ask KVM once per process. The CPUID is what a vCPU given KVM's supported list reads
    back (on PVM, KVM_GET_CPUID2 adds host features to what was set, so a guest's saved
    CPUID must be compared with the same readback); a throwaway vCPU also tells the TSC
    frequency."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                vcpu.set_cpuid2(kvm.supported_cpuid())
                offered = tuple(cpuid_entries(vcpu.get_cpuid2()))
                tsc_khz = vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()
    return HostCpu(tsc_khz=tsc_khz, cpuid=offered)
