"""PROVISIONAL (replaced by the state branch's module at merge)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TSC_TOLERANCE_PPM = 250
#: Leaf 1's EBX holds the APIC ID of the CPU that asked, not features.
_FEATURE_REGISTERS = {1: ("ecx", "edx"), 7: ("ebx", "ecx", "edx"), 0x80000001: ("ecx", "edx")}
_NAMES = {(1, "edx", 26): "sse2", (1, "edx", 25): "sse", (1, "ecx", 0): "sse3"}


def missing_features(guest: Sequence[Mapping[str, int]],
                     host: Sequence[Mapping[str, int]]) -> list[str]:
    """Feature bits set in the guest's CPUID that the host's supported CPUID lacks."""
    offered = {(e["function"], e["index"]): e for e in host}
    missing = []
    for entry in guest:
        registers = _FEATURE_REGISTERS.get(entry["function"], ())
        if entry["function"] == 7 and entry["index"] != 0:
            continue
        have = offered.get((entry["function"], entry["index"]), {})
        for reg in registers:
            extra = entry[reg] & ~have.get(reg, 0)
            for bit in range(32):
                if extra >> bit & 1:
                    missing.append(_NAMES.get((entry["function"], reg, bit),
                                             f"cpuid {entry['function']:#x}.{reg}[{bit}]"))
    return missing


def tsc_change_refusal(source_khz: int, dest_khz: int,
                       tolerance_ppm: int = TSC_TOLERANCE_PPM) -> str | None:
    if abs(dest_khz - source_khz) * 1_000_000 <= tolerance_ppm * source_khz:
        return None
    return (f"the TSC runs at {source_khz} kHz at the source and {dest_khz} kHz here, more "
            f"than {tolerance_ppm} ppm apart, and KVM here cannot scale it")
