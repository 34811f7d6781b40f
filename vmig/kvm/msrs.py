"""Which MSRs a saved vCPU carries, their names, and the order they are written back.

Pure data and functions of MSR indices (no ioctls). The list to save is KVM's own
(`KVM_GET_MSR_INDEX_LIST`, whose tail is KVM's emulated MSRs) without the performance
monitoring ones, as Firecracker filters them (`arch/x86_64/msr.rs`): vmig offers the
guest no PMU, so those counters are neither meaningful nor always readable.
"""

from __future__ import annotations

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01

#: The MSRs state version 1 carried (vmig up to db2c624): SYSENTER_CS/ESP/EIP, CR_PAT,
#: STAR, LSTAR, CSTAR, SYSCALL_MASK, KERNEL_GS_BASE, TSC_AUX and the TSC.
V1_MSRS = (0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
           0xC0000102, 0xC0000103, MSR_IA32_TSC)

#: Names of the MSRs seen in this KVM's index list (and the common architectural ones),
#: so that an error can say which MSR it is about.
MSR_NAMES: dict[int, str] = {
    0x10: "IA32_TSC", 0x11: "KVM_WALL_CLOCK", 0x12: "KVM_SYSTEM_TIME",
    0x34: "SMI_COUNT", 0x3A: "IA32_FEAT_CTL", 0x3B: "IA32_TSC_ADJUST",
    0x48: "IA32_SPEC_CTRL", 0x8B: "IA32_UCODE_REV", 0x10A: "IA32_ARCH_CAPABILITIES",
    0x140: "MISC_FEATURES_ENABLES", 0xCE: "PLATFORM_INFO",
    0x174: "IA32_SYSENTER_CS", 0x175: "IA32_SYSENTER_ESP", 0x176: "IA32_SYSENTER_EIP",
    0x17A: "IA32_MCG_STATUS", 0x17B: "IA32_MCG_CTL", 0x1A0: "IA32_MISC_ENABLE",
    0x1D9: "IA32_DEBUGCTL", 0x1DB: "LASTBRANCHFROMIP", 0x1DC: "LASTBRANCHTOIP",
    0x1DD: "LASTINTFROMIP", 0x1DE: "LASTINTTOIP", 0x1FC: "IA32_POWER_CTL",
    0x277: "IA32_CR_PAT", 0x345: "IA32_PERF_CAPABILITIES", 0x6E0: "IA32_TSC_DEADLINE",
    0xC0000080: "EFER", 0xC0000081: "STAR", 0xC0000082: "LSTAR", 0xC0000083: "CSTAR",
    0xC0000084: "SYSCALL_MASK", 0xC0000100: "FS_BASE", 0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE", 0xC0000103: "TSC_AUX",
    0xC0010015: "K7_HWCR", 0xC0010117: "VM_HSAVE_PA", 0xC001011F: "AMD64_VIRT_SPEC_CTRL",
    0x4B564D00: "KVM_WALL_CLOCK_NEW", 0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN", 0x4B564D03: "KVM_STEAL_TIME", 0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL", 0x4B564D06: "KVM_ASYNC_PF_INT",
    0x4B564D07: "KVM_ASYNC_PF_ACK",
}

#: (first, count) ranges of PMU MSRs, from Firecracker's list of MSRs it does not dump,
#: plus the global control/status MSRs of AMD's PerfMonV2 and Intel's PEBS/DS. The
#: general-purpose counters and event selects are 8 (KVM's KVM_MAX_NR_GP_COUNTERS), not
#: Firecracker's 18, whose counter range would also cover 0xce, PLATFORM_INFO.
PMU_MSR_RANGES: tuple[tuple[int, int], ...] = (
    (0xC1, 8),  # ARCH_PERFMON_PERFCTRn
    (0x186, 8),  # ARCH_PERFMON_EVENTSELn
    (0x309, 3),  # ARCH_PERFMON_FIXED_CTRn
    (0x38D, 5),  # CORE_PERF_FIXED_CTR_CTRL, GLOBAL_STATUS, GLOBAL_CTRL, GLOBAL_OVF_CTRL, _SET
    (0x345, 1),  # IA32_PERF_CAPABILITIES
    (0x3F1, 2),  # IA32_PEBS_ENABLE, PEBS_DATA_CFG
    (0x600, 1),  # IA32_DS_AREA
    (0x4C1, 8),  # IA32_PMCn (full-width counter writes)
    (0xC0000300, 3),  # AMD64_PERF_CNTR_GLOBAL_STATUS, _CTL, _STATUS_CLR
    (0xC0010000, 4),  # K7_EVNTSELn
    (0xC0010004, 4),  # K7_PERFCTRn
    (0xC0010200, 12),  # F15H_PERF_CTLn / F15H_PERF_CTRn, interleaved
)


def msr_name(index: int) -> str:
    """`0x1a0 (IA32_MISC_ENABLE)`, or just the hex index when the name is not known."""
    name = MSR_NAMES.get(index)
    return f"{index:#x} ({name})" if name else f"{index:#x}"


def is_pmu_msr(index: int) -> bool:
    return any(first <= index < first + count for first, count in PMU_MSR_RANGES)


def msrs_to_save(index_list: list[int]) -> list[int]:
    """KVM's index list without the PMU MSRs, in KVM's order, without duplicates."""
    return list(dict.fromkeys(index for index in index_list if not is_pmu_msr(index)))


def restore_order(indices: list[int]) -> list[int]:
    """`indices` in the order to write them: the TSC first, so before TSC_DEADLINE (the
    deadline is a TSC value), the rest as KVM listed them."""
    return sorted(indices, key=lambda index: index != MSR_IA32_TSC)
