"""ctypes mirrors of the `linux/kvm.h` structs vmig uses (x86_64), and their ioctls.

Field names follow the kernel header so that the header is the documentation.
`tests/unit/test_kvm_abi.py` checks every struct's size against the kernel ABI.
"""

from __future__ import annotations

import ctypes
import enum

from vmig.kvm._ioctl import io, ior, iow, iowr

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVM_API_VERSION = 12
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason values (KVM_EXIT_*) that vmig knows by name."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    DIRTY_RING_FULL = 31


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers for KVM_CHECK_EXTENSION."""

    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    GET_TSC_KHZ = 61
    IMMEDIATE_EXIT = 136
    MAX_VCPUS = 66
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    MP_STATE = 14
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    KVMCLOCK_CTRL = 76
    VCPU_ATTRIBUTES = 127
    SREGS2 = 200
    XSAVE2 = 208
    DIRTY_LOG_RING = 192
    DIRTY_LOG_RING_ACQ_REL = 223


# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3
# vCPU device attributes: group KVM_VCPU_TSC_CTRL, attribute KVM_VCPU_TSC_OFFSET
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0
# kvm_sregs2.flags
KVM_SREGS2_FLAGS_PDPTRS_VALID = 1
KVM_MAX_XCRS = 16
#: The fixed kvm_xsave of KVM_GET_XSAVE; KVM_GET_XSAVE2 may need more (KVM_CAP_XSAVE2).
KVM_XSAVE_LEGACY_BYTES = 4096


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
    )]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_sregs2(ctypes.Structure):
    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("flags", u64),
        ("pdptrs", u64 * 4),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_xsave(ctypes.Structure):
    """The 4 KiB kvm_xsave; a bigger KVM_GET_XSAVE2 buffer comes from `buffers.xsave_buffer()`."""

    _fields_ = [("region", u32 * (KVM_XSAVE_LEGACY_BYTES // 4))]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header of the variable-length kvm_msrs; see `buffers.msrs_buffer()`."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(ctypes.Structure):
    """Header of the variable-length kvm_msr_list; see `buffers.msr_list_buffer()`."""

    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header of the variable-length kvm_cpuid2; see `buffers.cpuid_buffer()`."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_dirty_gfn(ctypes.Structure):
    """One dirty-ring entry: KVM sets DIRTY, userspace sets RESET once it has read it."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


# kvm_dirty_gfn.flags
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
#: Page offset of a vCPU's dirty ring in its fd's mmap space (x86).
KVM_DIRTY_LOG_PAGE_OFFSET = 64


class kvm_vcpu_events(ctypes.Structure):
    class _exception(ctypes.Structure):
        _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                    ("error_code", u32)]

    class _interrupt(ctypes.Structure):
        _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]

    class _nmi(ctypes.Structure):
        _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]

    class _smi(ctypes.Structure):
        _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]

    _fields_ = [
        ("exception", _exception),
        ("interrupt", _interrupt),
        ("nmi", _nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _smi),
        ("reserved", u8 * 27),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


# --- kvm_run: the page shared with the kernel for each vCPU -------------------

class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(ctypes.Structure):
    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]


# --- ioctl numbers, each derived from its argument's size ----------------------

# /dev/kvm
KVM_GET_API_VERSION = io(0x00)
KVM_CREATE_VM = io(0x01)
KVM_GET_MSR_INDEX_LIST = iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = io(0x03)
KVM_GET_VCPU_MMAP_SIZE = io(0x04)
KVM_GET_SUPPORTED_CPUID = iowr(0x05, kvm_cpuid2)
KVM_GET_EMULATED_CPUID = iowr(0x09, kvm_cpuid2)
# VM fd
KVM_CREATE_VCPU = io(0x41)
KVM_GET_DIRTY_LOG = iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = iow(0x46, kvm_userspace_memory_region)
KVM_SET_CLOCK = iow(0x7B, kvm_clock_data)
KVM_ENABLE_CAP = iow(0xA3, kvm_enable_cap)
KVM_RESET_DIRTY_RINGS = io(0xC7)
KVM_GET_CLOCK = ior(0x7C, kvm_clock_data)
# vCPU fd
KVM_RUN = io(0x80)
KVM_GET_REGS = ior(0x81, kvm_regs)
KVM_SET_REGS = iow(0x82, kvm_regs)
KVM_GET_SREGS = ior(0x83, kvm_sregs)
KVM_SET_SREGS = iow(0x84, kvm_sregs)
KVM_GET_MSRS = iowr(0x88, kvm_msrs)
KVM_SET_MSRS = iow(0x89, kvm_msrs)
KVM_GET_FPU = ior(0x8C, kvm_fpu)
KVM_SET_FPU = iow(0x8D, kvm_fpu)
KVM_SET_CPUID2 = iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = iowr(0x91, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = iow(0xA0, kvm_vcpu_events)
KVM_GET_MP_STATE = ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = iow(0x99, kvm_mp_state)
KVM_GET_DEBUGREGS = ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = iow(0xA2, kvm_debugregs)
KVM_GET_TSC_KHZ = io(0xA3)
KVM_GET_XSAVE = ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = iow(0xA5, kvm_xsave)
KVM_GET_XCRS = ior(0xA6, kvm_xcrs)
KVM_SET_XCRS = iow(0xA7, kvm_xcrs)
KVM_KVMCLOCK_CTRL = io(0xAD)
KVM_GET_SREGS2 = ior(0xCC, kvm_sregs2)
KVM_SET_SREGS2 = iow(0xCD, kvm_sregs2)
KVM_GET_XSAVE2 = ior(0xCF, kvm_xsave)
KVM_SET_DEVICE_ATTR = iow(0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = iow(0xE2, kvm_device_attr)
KVM_HAS_DEVICE_ATTR = iow(0xE3, kvm_device_attr)

# Sizes of the structs in the x86_64 kernel ABI (from linux/kvm.h and asm/kvm.h),
# checked by the unit tests against the ctypes mirrors above.
ABI_SIZES: dict[type[ctypes.Structure], int] = {
    kvm_userspace_memory_region: 32,
    kvm_regs: 144,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_sregs: 312,
    kvm_fpu: 416,
    kvm_sregs2: 320,
    kvm_mp_state: 4,
    kvm_xsave: 4096,
    kvm_xcr: 16,
    kvm_xcrs: 392,
    kvm_debugregs: 128,
    kvm_clock_data: 48,
    kvm_device_attr: 24,
    kvm_msr_entry: 16,
    kvm_msrs: 8,
    kvm_msr_list: 4,
    kvm_cpuid_entry2: 40,
    kvm_cpuid2: 8,
    kvm_dirty_log: 16,
    kvm_enable_cap: 104,
    kvm_dirty_gfn: 16,
    kvm_vcpu_events: 64,
    kvm_run_io: 16,
    kvm_run_exit: 256,
    kvm_run: 2352,
}

