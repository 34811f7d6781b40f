"""Probe which parts of the vCPU and VM state this KVM saves and restores.

Run as root: `.venv/bin/python tests/probes/state_probe.py`. Prints one line per check;
what it found on the project's (PVM) machines is written down in docs/architecture.md
("What this KVM does not keep"). A measuring stick, not part of the suite.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import tempfile
from pathlib import Path

from vmig.errors import KvmError
from vmig.kvm import Kvm
from vmig.kvm import bindings as b

LOAD_GPA = 0x1000
KVMCLOCK_GPA = 0x3000
# Real mode: a data breakpoint on `target` (DR0, DR7 L0, write, 4 bytes) whose #DB handler
# writes 0xdb to port 0x81, then kvmclock registered at KVMCLOCK_GPA, then port 0x80.
GUEST = r"""
.code16
.globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $0x7000, %sp
    movw $db_handler, 4
    movw $0, 6
    movl $target, %eax
    movl %eax, %dr0
    movl $0x000d0001, %eax
    movl %eax, %dr7
    movl $1, target
    movw $0x80, %dx
    movb $1, %al
    outb %al, %dx
    movl $0x4b564d01, %ecx
    movl $0x3001, %eax
    xorl %edx, %edx
    wrmsr
    movw $0x80, %dx
    movb $2, %al
    outb %al, %dx
1:  hlt
    jmp 1b
db_handler:
    movw $0x81, %dx
    movb $0xdb, %al
    outb %al, %dx
    iret
.align 4
target: .long 0
"""


def build() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = (Path(tmp) / n for n in ("g.S", "g.o", "g.bin"))
        src.write_text(GUEST)
        subprocess.run(["as", "--32", str(src), "-o", str(obj)], check=True)
        subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={LOAD_GPA:#x}", "--oformat=binary",
                        str(obj), "-o", str(out)], check=True)
        return out.read_bytes()


def attempt(what: str, action) -> object:
    try:
        result = action()
    except KvmError as exc:
        print(f"{what}: FAILS ({exc})")
        return None
    print(f"{what}: ok {result if result is not None else ''}")
    return result


def main() -> None:
    kvm = Kvm()
    for cap in b.Cap:
        print(f"KVM_CAP_{cap.name} = {kvm.check_extension(cap)}")
    vm = kvm.create_vm()
    size = 16 << 20
    memory = mmap.mmap(-1, size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    vm.set_user_memory_region(0, 0, size, address)
    image = build()
    memory[LOAD_GPA:LOAD_GPA + len(image)] = image
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = LOAD_GPA, 2
    vcpu.set_regs(regs)

    attempt("KVMCLOCK_CTRL before the guest registers kvmclock", vcpu.kvmclock_ctrl)
    ports: list[tuple[int, int]] = []
    for _ in range(20):
        exit_ = vcpu.run()
        if exit_.reason == b.ExitReason.IO:
            ports.append((vcpu.kvm_run.io.port, vcpu.io_data()[0]))
            if ports[-1] == (0x80, 2):
                break
        else:
            print(f"guest exit {exit_.reason!r}")
            break
    print(f"guest port writes {[(hex(p), hex(v)) for p, v in ports]}")
    print("DR7 write breakpoint fires in the guest:", (0x81, 0xDB) in ports)
    debug = vcpu.get_debugregs()
    print(f"debug registers read back: db={[hex(x) for x in debug.db]} dr6={debug.dr6:#x} "
          f"dr7={debug.dr7:#x}")
    attempt("KVMCLOCK_CTRL after the guest registered kvmclock", vcpu.kvmclock_ctrl)
    pvclock = bytes(memory[KVMCLOCK_GPA:KVMCLOCK_GPA + 32])
    print(f"kvmclock struct at {KVMCLOCK_GPA:#x}: {pvclock.hex()}")

    attempt("KVM_GET_SREGS2", lambda: vcpu.get_sregs2().flags)
    xsave_size = kvm.xsave_size()
    print(f"KVM_CAP_XSAVE2 size = {xsave_size}")
    area = attempt("KVM_GET_XSAVE(2)", lambda: len(vcpu.get_xsave(xsave_size)))
    if area:
        attempt("KVM_SET_XSAVE", lambda: vcpu.set_xsave(vcpu.get_xsave(xsave_size)))
    xcrs = attempt("KVM_GET_XCRS", vcpu.get_xcrs)
    if xcrs is not None:
        print(f"  nr_xcrs={xcrs.nr_xcrs} xcr0={xcrs.xcrs[0].value:#x}")
        for value in (1, 3, 7):
            trial = b.kvm_xcrs(nr_xcrs=1)
            trial.xcrs[0].value = value
            attempt(f"KVM_SET_XCRS xcr0={value:#x}", lambda t=trial: vcpu.set_xcrs(t))
    trial_dr = b.kvm_debugregs(dr7=0x400 | 0x2, dr6=0xFFFF0FF0)
    trial_dr.db[:] = [0x1111, 0x2222, 0x3333, 0x4444]
    attempt("KVM_SET_DEBUGREGS", lambda: vcpu.set_debugregs(trial_dr))
    again = vcpu.get_debugregs()
    print(f"  read back db={[hex(x) for x in again.db]} dr7={again.dr7:#x}")
    attempt("KVM_GET_MP_STATE", lambda: vcpu.get_mp_state().mp_state)
    clock = attempt("KVM_GET_CLOCK", vm.get_clock)
    if clock is not None:
        print(f"  clock={clock.clock} flags={clock.flags} realtime={clock.realtime} "
              f"host_tsc={clock.host_tsc}")
        attempt("KVM_SET_CLOCK (realtime)", lambda: vm.set_clock(b.kvm_clock_data(
            clock=clock.clock, realtime=clock.realtime, flags=b.KVM_CLOCK_REALTIME)))
    has = vcpu.has_device_attr(b.KVM_VCPU_TSC_CTRL, b.KVM_VCPU_TSC_OFFSET)
    print(f"KVM_VCPU_TSC_OFFSET attribute: {has}")
    if has:
        offset = attempt("  get", vcpu.get_tsc_offset)
        if offset is not None:
            attempt("  set", lambda: vcpu.set_tsc_offset(offset))
    indices = kvm.msr_index_list()
    values = vcpu.get_msrs(indices)
    unreadable = [hex(i) for i in indices if i not in values]
    print(f"MSR index list: {len(indices)}: {[hex(i) for i in indices]}")
    print(f"  unreadable: {unreadable}")
    refused = []
    for index, value in values.items():
        if vcpu.set_msrs({index: value}) != 1:
            refused.append(hex(index))
    print(f"  refused writing back their own value: {refused}")
    print(f"  values: { {hex(i): hex(v) for i, v in values.items()} }")
    vcpu.close()
    vm.close()
    kvm.close()


if __name__ == "__main__":
    main()
