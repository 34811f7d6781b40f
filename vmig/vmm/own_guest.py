"""vmig's own guest inside a Machine: boot memory, boot wait, counters, self-check.

The guest (vmig/guest) reads its parameters from a config page and reports through
its status pages and the status port; the VMM reads those pages, so post-copy must
send them first (`vmm_pages`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from vmig.config import Workload
from vmig.errors import GuestError, StateError
from vmig.guest import layout, status
from vmig.guest.build import guest_image
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE
from vmig.vmm.boot import enter_real_mode, write_boot_memory
from vmig.vmm.devices import STATUS_PORTS, IoBus, StatusPort
from vmig.vmm.vcpu_thread import HLT_WAIT_S, IDLE_HLT_WAIT_S

if TYPE_CHECKING:
    from vmig.vmm.machine import Machine

__all__ = ["OwnGuest"]

log = logging.getLogger(__name__)

CHECK_POLL_S = 0.02
BOOT_TIMEOUT_S = 30.0
KIND = "vmig"


class OwnGuest:
    """The guest vmig builds (`vmig.guest`), as one Machine runs it."""

    kind = KIND
    #: Its HLT is a nap (pacing, idle beats), never the end: there are no interrupts.
    final_halt = False

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.booted_cpus: set[int] = set()
        idle = machine.config.workload is Workload.IDLE
        self.hlt_wait_s = IDLE_HLT_WAIT_S if idle else HLT_WAIT_S

    def attach(self, bus: IoBus) -> None:
        """Register the guest's own devices (its status port)."""
        bus.register(*STATUS_PORTS, StatusPort(self._guest_event))

    def load(self) -> None:
        """Write the boot memory and point every vCPU at its entry stub."""
        machine = self._machine
        write_boot_memory(machine.memory, machine.config, guest_image(), machine.tsc_khz)
        for vcpu in machine.vcpus:
            enter_real_mode(vcpu, layout.entry_gpa(vcpu.vcpu_id))

    def save(self) -> dict[str, Any]:
        return {"kind": KIND, "layout": "vmig/guest/layout.py",
                "booted_cpus": sorted(self.booted_cpus)}

    def restored(self, saved: dict[str, Any]) -> None:
        self.booted_cpus = set(range(self._machine.config.cpus))

    def _guest_event(self, event: int, cpu: int) -> None:
        if event == layout.EVENT_BOOTED:
            self.booted_cpus.add(cpu)
        elif event == layout.EVENT_PANIC:
            log.error("guest vCPU %d panicked", cpu)
        self._machine.notify()

    def wait_booted(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Wait until every vCPU reports that it reached long mode and filled its pages."""
        machine = self._machine
        deadline = time.monotonic() + timeout
        with machine.events:
            while True:
                if machine.error is not None:
                    raise GuestError(f"guest failed while booting: {machine.error}")
                states = status.cpu_states(machine.memory.read_u64, machine.config.cpus)
                if all(s == layout.CPU_STATE_RUNNING for s in states):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest did not finish booting within {timeout:.0f} s "
                                     f"(vCPU states {states})")
                machine.events.wait(min(remaining, CHECK_POLL_S))

    def counters(self) -> dict[str, int | None]:
        """Heartbeat and pages written, summed over vCPUs, read from the status page."""
        return status.counters(self._machine.memory.read_u64, self._machine.config.cpus)

    def request_check(self) -> int:
        """Ask the guest for a self-check (caller holds the Machine's lock); its number."""
        memory = self._machine.memory
        return status.request_check(memory.read_u64, memory.write_u64)

    def wait_check(self, request: int, timeout: float) -> dict[str, Any]:
        """Wait for self-check `request` on every vCPU and sum up its result."""
        machine = self._machine
        deadline = time.monotonic() + timeout
        read, cpus = machine.memory.read_u64, machine.config.cpus
        with machine.events:
            while not status.check_done(read, cpus, request):
                if not machine.running:
                    raise StateError(f"guest check interrupted: VM is {machine.state.value}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest did not finish its self-check within {timeout} s")
                machine.events.wait(min(remaining, CHECK_POLL_S))
        return status.check_result(read, cpus, machine.config.working_set_pages)

    def describe(self) -> dict[str, Any]:
        """The guest's part of `vm.info`: its configuration."""
        config = self._machine.config
        return {"guest": KIND, "workload": config.workload.value, "order": config.order.value,
                "working_set_bytes": config.working_set_bytes,
                "working_set_gpa": config.working_set_gpa, "dirty_rate": config.dirty_rate}

    def vmm_pages(self) -> RangeTable:
        """The config and status pages, which the VMM reads and writes."""
        return RangeTable([(layout.CONFIG_GPA, PAGE_SIZE), (layout.STATUS_GPA, PAGE_SIZE)])
