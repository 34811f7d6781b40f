"""Can a destination host run a guest as the source gave it? CPUID features and TSC rate.

Pure functions of plain data (no KVM): a CPUID entry is a dict with the keys
`function`, `index`, `flags`, `eax`, `ebx`, `ecx`, `edx`, the form the saved vCPU
state (`vmig.vmm.state`) and CONFIG carry. The destination compares the guest's
entries with what its KVM supports, and its TSC frequency with the source's (KVM here
cannot scale the TSC), and refuses before any memory moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CpuidEntry = Mapping[str, int]
#: The keys of a CpuidEntry: kvm_cpuid_entry2's fields, its padding left out.
CPUID_ENTRY_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

#: The CPUID flag that says an entry's value depends on its subleaf (ECX input).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
TSC_TOLERANCE_PPM = 250
DYNAMIC_BITS = frozenset({"osxsave", "ospke", "hypervisor"})


def _names(*bits: str) -> dict[int, str]:
    """Bit number -> feature name for a register, from names listed bit 0 first ('' = none)."""
    return {bit: name for bit, name in enumerate(bits) if name}


#: (leaf, subleaf, register) -> {bit: feature name}, as in Linux's cpufeatures.h.
FEATURE_BITS: dict[tuple[int, int, str], dict[int, str]] = {
    (1, 0, "ecx"): _names(
        "sse3", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est",
        "tm2", "ssse3", "cid", "sdbg", "fma", "cx16", "xtpr", "pdcm",
        "", "pcid", "dca", "sse4_1", "sse4_2", "x2apic", "movbe", "popcnt",
        "tsc_deadline_timer", "aes", "xsave", "osxsave", "avx", "f16c", "rdrand", "hypervisor"),
    (1, 0, "edx"): _names(
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce",
        "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "pn", "clflush", "", "dts", "acpi", "mmx",
        "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe"),
    (7, 0, "ebx"): _names(
        "fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", "fdp_excptn_only", "smep",
        "bmi2", "erms", "invpcid", "rtm", "cqm", "zero_fcs_fds", "mpx", "rdt_a",
        "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "", "clflushopt",
        "clwb", "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni", "avx512bw",
        "avx512vl"),
    (7, 0, "ecx"): _names(
        "prefetchwt1", "avx512vbmi", "umip", "pku", "ospke", "waitpkg", "avx512_vbmi2", "cet_ss",
        "gfni", "vaes", "vpclmulqdq", "avx512_vnni", "avx512_bitalg", "tme",
        "avx512_vpopcntdq", "", "la57", "", "", "", "", "", "rdpid", "kl",
        "bus_lock_detect", "cldemote", "", "movdiri", "movdir64b", "enqcmd", "sgx_lc", "pks"),
    (7, 0, "edx"): _names(
        "", "sgx_keys", "avx512_4vnniw", "avx512_4fmaps", "fsrm", "uintr", "", "",
        "avx512_vp2intersect", "srbds_ctrl", "md_clear", "rtm_always_abort", "", "tsx_force_abort",
        "serialize", "hybrid_cpu", "tsxldtrk", "", "pconfig", "arch_lbr", "ibt", "",
        "amx_bf16", "avx512_fp16", "amx_tile", "amx_int8", "spec_ctrl", "intel_stibp",
        "flush_l1d", "arch_capabilities", "core_capabilities", "spec_ctrl_ssbd"),
    (0x80000001, 0, "ecx"): _names(
        "lahf_lm", "cmp_legacy", "svm", "extapic", "cr8_legacy", "abm", "sse4a", "misalignsse",
        "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp",
        "fma4", "tce", "", "nodeid_msr", "", "tbm", "topoext", "perfctr_core",
        "perfctr_nb", "", "bpext", "ptsc", "perfctr_llc", "mwaitx"),
    (0x80000001, 0, "edx"): _names(
        "", "", "", "", "", "", "", "", "", "", "", "syscall", "", "", "", "",
        "", "", "", "mp", "nx", "", "mmxext", "", "", "fxsr_opt", "pdpe1gb", "rdtscp",
        "", "lm", "3dnowext", "3dnow"),
}


def _lookup(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    """Entries by (leaf, subleaf); an entry whose subleaf does not matter is subleaf 0."""
    table: dict[tuple[int, int], CpuidEntry] = {}
    for entry in entries:
        significant = int(entry.get("flags", 0)) & KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        table[(int(entry["function"]), int(entry["index"]) if significant else 0)] = entry
    return table


def features(entries: Iterable[CpuidEntry]) -> set[str]:
    """The named features that `entries` offer."""
    table = _lookup(entries)
    found: set[str] = set()
    for (leaf, subleaf, register), bits in FEATURE_BITS.items():
        entry = table.get((leaf, subleaf))
        if entry is None:
            continue
        value = int(entry[register])
        found.update(name for bit, name in bits.items() if value >> bit & 1)
    return found


def missing_features(guest_entries: Iterable[CpuidEntry],
                     host_entries: Iterable[CpuidEntry]) -> list[str]:
    """Features the guest was given that the host cannot offer, by name, sorted.

    Bits that mirror the guest's own control registers (osxsave, ospke) or that KVM sets
    itself (hypervisor) are not features a host offers, so they are not compared.
    """
    return sorted(features(guest_entries) - features(host_entries) - DYNAMIC_BITS)


def tsc_change_refusal(source_khz: int, dest_khz: int,
                       tolerance_ppm: int = TSC_TOLERANCE_PPM) -> str | None:
    """A one-line refusal when the two TSC frequencies differ by more than
    `tolerance_ppm`, else None."""
    if source_khz <= 0:
        return f"the source's TSC frequency {source_khz} kHz is not a frequency"
    difference_ppm = abs(dest_khz - source_khz) * 1_000_000 / source_khz
    if difference_ppm <= tolerance_ppm:
        return None
    return (f"TSC frequency differs: source {source_khz} kHz, destination {dest_khz} kHz "
            f"({difference_ppm:.0f} ppm apart, over the {tolerance_ppm} ppm this KVM can "
            "hide without TSC scaling)")
