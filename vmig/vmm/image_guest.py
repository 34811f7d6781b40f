"""A guest booted from an image vmig did not build (a boot sector or a Multiboot kernel).

It has no config or status pages and no self-check: the VMM only loads it, starts
its vCPU as a PC BIOS (raw) or a Multiboot loader would, and then just runs it. The
image file is read once, at boot: a restore or a migration carries guest memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmig.config import BootFormat
from vmig.errors import StateError
from vmig.ranges import RangeTable
from vmig.vmm import multiboot
from vmig.vmm.boot import enter_real_mode
from vmig.vmm.devices import IoBus
from vmig.vmm.images import RAW_BOOT_DRIVE, BootPlan, plan_boot
from vmig.vmm.vcpu_thread import HLT_WAIT_S

if TYPE_CHECKING:
    from vmig.memory import GuestMemory
    from vmig.vmm.machine import Machine

__all__ = ["NO_SELF_CHECK", "ImageGuest", "plan_boot"]

KIND = "image"
NO_SELF_CHECK = "this guest was booted from an image and has no self-check"


def write_plan(memory: GuestMemory, plan: BootPlan, cmdline: str) -> int:
    """Put the plan (and for Multiboot the trampoline and MBI) in memory; the real-mode
    address the vCPU starts at. Fresh guest memory reads zeros, so bss needs no writes."""
    for segment in plan.segments:
        memory.write(segment.gpa, segment.data)
    if plan.format is BootFormat.RAW:
        return plan.entry
    for gpa, data in (*multiboot.information(memory.size, cmdline),
                      *multiboot.trampoline(plan.entry)):
        memory.write(gpa, data)
    return multiboot.TRAMPOLINE_GPA


class ImageGuest:
    """A boot image's guest, as one Machine runs it (1 vCPU)."""

    kind = KIND
    #: HLT with interrupts off ends it: there is no interrupt controller to wake it.
    final_halt = True
    hlt_wait_s = HLT_WAIT_S

    def __init__(self, machine: Machine, plan: BootPlan | None = None) -> None:
        self._machine = machine
        self._plan = plan  # None when restored: memory already holds the guest
        self.booted_cpus: set[int] = set()  # the guest never says; stays empty

    def attach(self, bus: IoBus) -> None:
        """No devices of its own: the machine's (COM1, port 0x92) are what it sees."""

    def load(self) -> None:
        machine = self._machine
        assert self._plan is not None, "a restored image guest is not loaded again"
        start = write_plan(machine.memory, self._plan, machine.config.boot_cmdline or "")
        vcpu = machine.vcpus[0]
        enter_real_mode(vcpu, start)
        if self._plan.format is BootFormat.RAW:  # the BIOS hands over the boot drive in DL
            regs = vcpu.get_regs()
            regs.rdx = RAW_BOOT_DRIVE
            vcpu.set_regs(regs)

    def save(self) -> dict[str, Any]:
        config = self._machine.config
        return {"kind": KIND, "format": config.boot_format and config.boot_format.value}

    def restored(self, saved: dict[str, Any]) -> None:
        """Nothing to rebuild: the guest is all in memory and registers."""

    def wait_booted(self, timeout: float = 0.0) -> None:
        """An image says nothing when it has booted: running is all there is."""

    def counters(self) -> dict[str, int | None]:
        return {"heartbeat": None, "pages_written": None}

    def request_check(self) -> int:
        raise StateError(f"cannot check the guest: {NO_SELF_CHECK}")

    def wait_check(self, request: int, timeout: float) -> dict[str, Any]:
        raise StateError(f"cannot check the guest: {NO_SELF_CHECK}")

    def describe(self) -> dict[str, Any]:
        """The guest's part of `vm.info`; the own-guest fields do not apply (None)."""
        config = self._machine.config
        return {"guest": KIND, "workload": None, "order": None, "working_set_bytes": None,
                "working_set_gpa": None, "dirty_rate": None,
                "boot_image": config.boot_image,
                "boot_format": config.boot_format and config.boot_format.value,
                "boot_sha256": config.boot_sha256, "boot_cmdline": config.boot_cmdline}

    def vmm_pages(self) -> RangeTable:
        """None: the VMM never reads an image guest's memory."""
        return RangeTable([])
