"""vmig's own guest under QEMU: the command that boots it, and its status and self-check
read through QEMU's RAM file.

QEMU boots the guest image as a Multiboot kernel (``-kernel``), with the command line
vmig would write into its config page (`vmig.guest.cmdline.render`), so both VMMs run
the same dirtying guest. QEMU's RAM is a ``memory-backend-file`` with ``share=on``:
file offset = guest-physical address for everything the guest uses (RAM below the PCI
hole starts at offset 0, and the guest refuses a working set beyond the first memory
hole), so `QemuGuest` reads the heartbeat and status pages and asks for a self-check
there, through `vmig.guest.status`, the functions vmig's own check-guest uses.

    config = VmConfig.build(memory="64M", workload="dirty", working_set="16M",
                            dirty_rate=20_000)
    argv = qemu_command(config, ram, serial_log=log)   # add -qmp, -incoming, ... as needed
    ...
    with QemuGuest(ram, config) as guest:
        guest.wait_booted()
        guest.counters()        # {"heartbeat": ..., "pages_written": ...}
        guest.check()           # {"ok": True, "pages_checked": ..., "bad_pages": 0, ...}

Start QEMU on a new (all-zero) RAM file: the status page of an earlier run would look
booted. Booted by Multiboot the guest has one vCPU (``cpus`` must be 1) and spins where
vmig's would halt (no VMM re-enters a halted vCPU there), so it keeps a host CPU busy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vmig.config import VmConfig
from vmig.errors import GuestError
from vmig.guest import status
from vmig.guest.build import ensure_guest_image
from vmig.guest.cmdline import render
from vmig.guest.layout import CPU_STATE_RUNNING
from vmig.kvm import Kvm
from vmig.memory import GuestMemory
from vmig.units import MiB

__all__ = ["QEMU", "QemuGuest", "host_tsc_khz", "qemu_command"]

QEMU = "qemu-system-x86_64"
POLL_S = 0.005
BOOT_TIMEOUT_S = 30.0  # SeaBIOS takes seconds here before it loads the kernel
CHECK_TIMEOUT_S = 60.0


def host_tsc_khz() -> int:
    """The TSC frequency of a KVM guest on this host (KVM here cannot scale it)."""
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        return vcpu.get_tsc_khz()


def qemu_command(config: VmConfig, ram: Path | str, *, serial_log: Path | str | None = None,
                 tsc_khz: int | None = None, kernel: Path | str | None = None,
                 binary: str = QEMU) -> list[str]:
    """argv of a QEMU that boots vmig's guest with `config`'s workload, RAM in file `ram`.

    One vCPU, no devices but COM1 (to `serial_log`, or nowhere). `tsc_khz` defaults to
    this host's (`host_tsc_khz`); `kernel` to vmig's guest image, built if needed.
    """
    if config.cpus != 1:
        raise GuestError(f"under QEMU vmig's guest boots one vCPU, not {config.cpus}")
    khz = host_tsc_khz() if tsc_khz is None else tsc_khz
    image = ensure_guest_image() if kernel is None else kernel
    size = config.memory_bytes
    return [
        binary, "-enable-kvm", "-m", f"{size // MiB}M", "-smp", "1",
        "-object", f"memory-backend-file,id=ram,size={size},mem-path={ram},share=on",
        "-machine", "pc,memory-backend=ram", "-nographic", "-nodefaults",
        "-serial", f"file:{serial_log}" if serial_log is not None else "none",
        "-kernel", str(image), "-append", render(config, khz),
    ]


class QemuGuest:
    """vmig's guest in a running QEMU, seen through QEMU's RAM file (opened shared)."""

    def __init__(self, ram: Path | str, config: VmConfig) -> None:
        self.config = config
        self.memory = GuestMemory.create(config.memory_bytes, str(ram))

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_u64(self, gpa: int) -> int:
        return self.memory.read_u64(gpa)

    def write_u64(self, gpa: int, value: int) -> None:
        self.memory.write_u64(gpa, value)

    def booted(self) -> bool:
        """True once the guest has stamped its working set and runs its workload."""
        states = status.cpu_states(self.read_u64, self.config.cpus)
        return all(state == CPU_STATE_RUNNING for state in states)

    def wait_booted(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.booted():
            if time.monotonic() > deadline:
                states = status.cpu_states(self.read_u64, self.config.cpus)
                raise GuestError(f"guest did not finish booting within {timeout:g} s "
                                 f"(vCPU states {states})")
            time.sleep(POLL_S)

    def counters(self) -> dict[str, int]:
        """Heartbeat and pages written, as vmig's vm.info reports them."""
        return status.counters(self.read_u64, self.config.cpus)

    def check(self, timeout: float = CHECK_TIMEOUT_S) -> dict[str, Any]:
        """The guest's self-check, as vmig's check-guest runs it: ok, pages checked, bad."""
        request = status.request_check(self.read_u64, self.write_u64)
        deadline = time.monotonic() + timeout
        while not status.check_done(self.read_u64, self.config.cpus, request):
            if time.monotonic() > deadline:
                raise GuestError(f"guest did not finish its self-check within {timeout:g} s")
            time.sleep(POLL_S)
        return status.check_result(self.read_u64, self.config.cpus,
                                   self.config.working_set_pages)
