"""`Machine`: one KVM VM built from a VmConfig, with its memory, vCPU threads and devices.

Ownership is a tree: the Machine owns the Kvm, the Vm, the GuestMemory, the
vCPUs (each driven by a VcpuHandle thread), and the serial log. `close()`
releases all of it, in reverse order of construction.

Lifecycle::

    boot() / restore() --> RUNNING <--pause()/resume()--> PAUSED
                              |                              |
                              +---- shutdown() / failure ----+--> SHUTDOWN / FAILED
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from vmig.config import VmConfig, Workload
from vmig.errors import ConfigError, GuestError, KvmError, SnapshotError, StateError, VmigError
from vmig.guest import layout
from vmig.guest.build import guest_image
from vmig.kvm import Kvm, Vcpu, Vm
from vmig.memory import GuestMemory
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE
from vmig.vmm.boot import enter_real_mode, write_boot_memory
from vmig.vmm.devices import SERIAL_PORTS, STATUS_PORTS, IoBus, Serial8250, StatusPort
from vmig.vmm.snapshot import read_snapshot, write_snapshot
from vmig.vmm.state import MachineState
from vmig.vmm.throttle import Throttle
from vmig.vmm.vcpu_state import notify_paused, restore_vcpus, save_vcpus
from vmig.vmm.vcpu_thread import (
    HLT_WAIT_S,
    IDLE_HLT_WAIT_S,
    VcpuHandle,
    VcpuRunState,
    install_kick_handler,
)

__all__ = ["Machine", "VmState", "install_kick_handler"]

log = logging.getLogger(__name__)

CHECK_POLL_S = 0.02
BOOT_TIMEOUT_S = 30.0


class VmState(enum.StrEnum):
    """Where a Machine is in its life."""

    RUNNING = "running"  #: vCPUs are executing the guest
    PAUSED = "paused"  #: every vCPU is parked; state and memory are stable
    SHUTDOWN = "shutdown"  #: stopped on request; resources released
    FAILED = "failed"  #: a vCPU hit an error the VMM cannot handle; see `error`
    MIGRATED = "migrated"  #: handed over to a migration destination; resources released


class Machine:
    """A running or paused VM. Build it with `boot()`, `restore()` or `restore_snapshot()`."""

    def __init__(self, config: VmConfig, kvm: Kvm, vm: Vm, memory: GuestMemory,
                 vcpus: list[Vcpu], serial_log: BinaryIO | None, tsc_khz: int) -> None:
        self.config = config
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.vcpus = vcpus
        self.tsc_khz = tsc_khz
        self.error: str | None = None
        self.state = VmState.PAUSED
        #: Told the reason once, on the failing vCPU's thread, when the VM fails (the
        #: VMM publishes it as an event); must not block.
        self.on_failure: Callable[[str], None] | None = None
        self.busy: str | None = None  # e.g. "migrating": user pause/resume/snapshot must wait
        self._serial_log = serial_log
        self._lock = threading.RLock()
        # Guards reading guest memory for info() against _release() unmapping it, without
        # waiting for long operations that hold _lock (a snapshot being written, say).
        self._memory_lock = threading.Lock()
        self._events = threading.Condition()
        self.booted_cpus: set[int] = set()
        self.serial = Serial8250(serial_log)
        self.bus = IoBus()
        self.bus.register(*SERIAL_PORTS, self.serial)
        self.bus.register(*STATUS_PORTS, StatusPort(self._guest_event))
        self.handles: list[VcpuHandle] = []
        self.throttle = Throttle(lambda: self.handles)
        idle = config.workload is Workload.IDLE
        hlt_wait = IDLE_HLT_WAIT_S if idle else HLT_WAIT_S
        try:
            for vcpu in vcpus:
                self.handles.append(VcpuHandle(vcpu, self.bus, self._vcpu_failed, hlt_wait))
        except BaseException:
            self._release()
            raise

    # --- construction ------------------------------------------------------------------

    @classmethod
    def boot(cls, config: VmConfig) -> Machine:
        """Build a VM from `config`, load the guest and start it running."""
        config.validate()
        image = guest_image()
        memory = GuestMemory.create(config.memory_bytes, config.memory_file)
        machine = cls._assemble(config, memory, restore=None)
        try:
            with machine._lock:
                write_boot_memory(memory, config, image, machine.tsc_khz)
                for vcpu in machine.vcpus:
                    enter_real_mode(vcpu, layout.entry_gpa(vcpu.vcpu_id))
                machine._resume_vcpus()
            machine.wait_booted()
        except BaseException:
            machine.close()
            raise
        return machine

    @classmethod
    def restore(cls, state: MachineState, memory: GuestMemory, *,
                serial_log: str | None = None, resume: bool = True) -> Machine:
        """Continue a VM from its saved state and memory; the Machine takes `memory`."""
        # Host paths in a saved configuration belong to the VMM that saved it.
        config = dataclasses.replace(state.config, serial_log=serial_log,
                                     memory_file=memory.path)
        if memory.size != config.memory_bytes:
            memory.close()
            raise SnapshotError(f"memory holds {memory.size} bytes but the VM state says "
                                f"{config.memory_bytes}")
        machine = cls._assemble(config, memory, restore=state)
        if resume:
            try:
                machine.resume()
            except BaseException:
                machine.close()
                raise
        return machine

    @classmethod
    def restore_snapshot(cls, directory: str, *, serial_log: str | None = None,
                         memory_file: str | None = None, resume: bool = True) -> Machine:
        """Start a VM from a snapshot directory written by `snapshot()`."""
        state, memory = read_snapshot(directory, memory_file)
        return cls.restore(state, memory, serial_log=serial_log, resume=resume)

    @classmethod
    def _assemble(cls, config: VmConfig, memory: GuestMemory,
                  restore: MachineState | None) -> Machine:
        """Create KVM objects around `memory` (which it takes), vCPUs paused."""
        with contextlib.ExitStack() as stack:
            stack.callback(memory.close)
            kvm = Kvm()
            stack.callback(kvm.close)
            vm = kvm.create_vm()
            stack.callback(vm.close)
            vm.set_user_memory_region(GuestMemory.SLOT, 0, memory.size, memory.host_addr)
            cpuid = kvm.supported_cpuid()
            vcpus: list[Vcpu] = []
            for index in range(config.cpus):
                vcpu = vm.create_vcpu(index)
                stack.callback(vcpu.close)
                vcpu.set_cpuid2(cpuid)  # a version-2 restore sets the saved CPUID instead
                vcpus.append(vcpu)
            tsc_khz = vcpus[0].get_tsc_khz()
            if restore is not None:
                restore_vcpus(kvm, vm, vcpus, restore.vcpus, restore.clock, tsc_khz)
            serial_log = _open_serial_log(config.serial_log)
            if serial_log is not None:
                stack.callback(serial_log.close)
            machine = cls(config, kvm, vm, memory, vcpus, serial_log, tsc_khz)
            stack.pop_all()
        if restore is not None:
            machine.serial.restore_state(restore.devices.get("serial", {"regs": {}}))
            machine.booted_cpus = set(range(config.cpus))
        return machine

    # --- lifecycle ---------------------------------------------------------------------

    def pause(self) -> None:
        """Park every vCPU outside KVM_RUN; works while the guest is busy."""
        self.pause_for(None)

    def resume(self) -> None:
        """Let a paused VM run again."""
        self.resume_for(None)

    def pause_for(self, owner: str | None) -> None:
        """Pause on behalf of `owner` (the operation holding `busy`, or None for a user)."""
        with self._lock:
            if self.busy != owner:
                self._require_idle("pause")
            self._require(VmState.RUNNING, "pause")
            self._pause_vcpus()
            notify_paused(self.vcpus)
            self.state = VmState.PAUSED

    def resume_for(self, owner: str | None) -> None:
        """Resume on behalf of `owner` (see `pause_for`)."""
        with self._lock:
            if self.busy != owner:
                self._require_idle("resume")
            self._require(VmState.PAUSED, "resume")
            self._resume_vcpus()

    def begin(self, operation: str) -> None:
        """Mark the VM busy with a long operation (e.g. "migrating"); refuse a second one."""
        with self._lock:
            self._require_idle(operation)
            if self.state not in (VmState.RUNNING, VmState.PAUSED):
                raise StateError(f"cannot start {operation}: VM is {self.state.value}")
            self.busy = operation

    def end(self, operation: str) -> None:
        with self._lock:
            if self.busy == operation:
                self.busy = None

    def mark_migrated(self) -> None:
        """The destination runs the VM now: release everything here, state MIGRATED."""
        with self._lock:
            self._release()
            self.state = VmState.MIGRATED
            self.busy = None

    def _require_idle(self, action: str) -> None:
        if self.busy is not None:
            raise StateError(f"cannot {action}: VM is {self.busy}")

    def shutdown(self) -> None:
        """Stop the vCPUs and release everything; idempotent."""
        with self._lock:
            if self.state in (VmState.SHUTDOWN, VmState.MIGRATED):
                return
            self._release()
            if self.state is not VmState.FAILED:
                self.state = VmState.SHUTDOWN

    close = shutdown

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self, wanted: VmState, action: str) -> None:
        if self.state is not wanted:
            raise StateError(f"cannot {action}: VM is {self.state.value}, "
                             f"it must be {wanted.value}")

    def _pause_vcpus(self) -> None:
        for handle in self.handles:
            handle.request_pause()
        for handle in self.handles:
            handle.wait_paused()

    def _resume_vcpus(self) -> None:
        for handle in self.handles:
            handle.resume()
        self.state = VmState.RUNNING

    def _release(self) -> None:
        errors: list[str] = []
        self.throttle.close()
        for handle in self.handles:
            try:
                handle.stop()
            except VmigError as exc:
                errors.append(str(exc))
        self.handles = []
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.kvm.close()
        with self._memory_lock:
            self.memory.close()
        if self._serial_log is not None:
            self._serial_log.close()
        if errors:
            log.error("shutdown: %s", "; ".join(errors))

    def _vcpu_failed(self, vcpu_id: int, message: str) -> None:
        """Called on a vCPU thread when its guest fails: park the others, mark FAILED."""
        first = self.state is not VmState.FAILED
        self.error = message
        self.state = VmState.FAILED
        for handle in self.handles:
            handle.request_pause()
        with self._events:
            self._events.notify_all()
        if first and self.on_failure is not None:
            try:
                self.on_failure(message)
            except Exception:  # a listener's fault must not hide the VM's
                log.exception("reporting the VM's failure failed")

    def _guest_event(self, event: int, cpu: int) -> None:
        if event == layout.EVENT_BOOTED:
            self.booted_cpus.add(cpu)
        elif event == layout.EVENT_PANIC:
            log.error("guest vCPU %d panicked", cpu)
        with self._events:
            self._events.notify_all()

    def wait_booted(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Wait until every vCPU reports that it reached long mode and filled its pages."""
        deadline = time.monotonic() + timeout
        with self._events:
            while True:
                if self.state is VmState.FAILED:
                    raise GuestError(f"guest failed while booting: {self.error}")
                states = [self._status(cpu, layout.ST_STATE) for cpu in range(self.config.cpus)]
                if all(s == layout.CPU_STATE_RUNNING for s in states):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest did not finish booting within {timeout:.0f} s "
                                     f"(vCPU states {states})")
                self._events.wait(min(remaining, CHECK_POLL_S))

    # --- the guest's view -----------------------------------------------------------------

    def _status(self, cpu: int, field: int) -> int:
        return self.memory.read_u64(layout.status_gpa(cpu) + field)

    def guest_counters(self) -> dict[str, int]:
        """Heartbeat and pages written, summed over vCPUs, read from the status page."""
        cpus = range(self.config.cpus)
        return {
            "heartbeat": sum(self._status(c, layout.ST_HEARTBEAT) for c in cpus),
            "pages_written": sum(self._status(c, layout.ST_PAGES_WRITTEN) for c in cpus),
        }

    def check_guest(self, timeout: float = 60.0) -> dict[str, Any]:
        """Ask the guest to verify every working-set page against its table; wait for it."""
        with self._lock:
            self._require(VmState.RUNNING, "check the guest")
            request = self.memory.read_u64(layout.CONFIG_GPA + layout.CFG_CHECK_REQUEST) + 1
            self.memory.write_u64(layout.CONFIG_GPA + layout.CFG_CHECK_REQUEST, request)
        deadline = time.monotonic() + timeout
        cpus = range(self.config.cpus)
        with self._events:
            while not all(self._status(c, layout.ST_CHECK_DONE) >= request for c in cpus):
                if self.state is not VmState.RUNNING:
                    raise StateError(f"guest check interrupted: VM is {self.state.value}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest did not finish its self-check within {timeout} s")
                self._events.wait(min(remaining, CHECK_POLL_S))
        pages = sum(self._status(c, layout.ST_CHECK_PAGES) for c in cpus)
        bad = sum(self._status(c, layout.ST_CHECK_BAD) for c in cpus)
        first_bad = [self._status(c, layout.ST_FIRST_BAD) for c in cpus]
        first_bad = [index for index in first_bad if index != (1 << 64) - 1]
        return {
            "ok": bad == 0 and pages == self.config.working_set_pages,
            "pages_checked": pages,
            "bad_pages": bad,
            "first_bad_page": min(first_bad) if first_bad else None,
        }

    def info(self) -> dict[str, Any]:
        """What `vm.info` reports: configuration, state and the guest's counters."""
        config = self.config
        data: dict[str, Any] = {
            "state": self.state.value,
            "memory_bytes": config.memory_bytes,
            "cpus": config.cpus,
            "workload": config.workload.value,
            "order": config.order.value,
            "working_set_bytes": config.working_set_bytes,
            "working_set_gpa": config.working_set_gpa,
            "dirty_rate": config.dirty_rate,
            "memory_file": config.memory_file,
            "serial_log": config.serial_log,
            "error": self.error,
            "heartbeat": None,
            "pages_written": None,
            "vcpus": [{"id": h.vcpu.vcpu_id, "state": h.state.value, "exits": h.exits}
                      for h in self.handles],
        }
        data["busy"] = self.busy
        data["throttle_percent"] = self.throttle.percent
        with self._memory_lock:
            if self.memory.is_open:
                data.update(self.guest_counters())
        return data

    # --- saving and restoring ---------------------------------------------------------------

    def save_state(self) -> MachineState:
        """The paused VM's state as plain data (memory excluded)."""
        with self._lock:
            self._require(VmState.PAUSED, "save the VM state")
            for handle in self.handles:
                if handle.state is not VcpuRunState.PAUSED:
                    raise StateError(f"vCPU {handle.vcpu.vcpu_id} is {handle.state.value}")
            clock, vcpus = save_vcpus(self.kvm, self.vm, self.vcpus)
            return MachineState(
                config=self.config,
                tsc_khz=self.tsc_khz,
                vcpus=vcpus,
                clock=clock,
                devices={"serial": self.serial.save_state()},
                guest={"layout": "vmig/guest/layout.py", "booted_cpus": sorted(self.booted_cpus)},
            )

    def snapshot(self, directory: str) -> None:
        """Write state.json and memory.bin of the paused VM into `directory`."""
        with self._lock:
            self._require_idle("snapshot")
            self._require(VmState.PAUSED, "snapshot")
            write_snapshot(directory, self.save_state(), self.memory)

    def vmm_pages(self) -> RangeTable:
        """The guest pages the VMM itself reads or writes (the config and status pages).

        Post-copy sends these before the destination resumes: its VMM reads them holding
        the GIL, and a fault there could never be served.
        """
        return RangeTable([(layout.CONFIG_GPA, PAGE_SIZE), (layout.STATUS_GPA, PAGE_SIZE)])

    # --- dirty tracking for migration -------------------------------------------------------

    def start_dirty_log(self) -> None:
        """Switch on KVM's dirty log and forget earlier VMM-side writes."""
        self.vm.set_dirty_logging(GuestMemory.SLOT, True)
        self.memory.take_vmm_dirty()

    def collect_dirty(self) -> np.ndarray:
        """Pages written since the last call: KVM's log OR the VMM's own writes."""
        words = self.vm.get_dirty_log(GuestMemory.SLOT)
        words |= self.memory.take_vmm_dirty()
        return words

    def stop_dirty_log(self) -> None:
        with contextlib.suppress(KvmError):
            self.vm.set_dirty_logging(GuestMemory.SLOT, False)


# --- helpers ------------------------------------------------------------------------------

def _open_serial_log(path: str | None) -> BinaryIO | None:
    if path is None:
        return None
    try:
        return open(path, "ab")
    except OSError as exc:  # the caller's path: a 4xx, not the VMM's failure
        raise ConfigError(f"serial_log: cannot open {path}: {exc.strerror}") from None


