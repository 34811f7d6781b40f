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
from typing import Any, BinaryIO

import numpy as np

from vmig.config import VmConfig
from vmig.errors import ConfigError, KvmError, SnapshotError, StateError, VmigError
from vmig.kvm import Kvm, Vcpu, Vm
from vmig.kvm.buffers import cpuid_entries
from vmig.memory import GuestMemory
from vmig.ranges import RangeTable
from vmig.vmm.devices import A20_PORTS, SERIAL_PORTS, FastA20, IoBus, Serial8250
from vmig.vmm.image_guest import ImageGuest
from vmig.vmm.images import BootPlan, plan_boot
from vmig.vmm.own_guest import BOOT_TIMEOUT_S, OwnGuest
from vmig.vmm.reports import Listener, Reports
from vmig.vmm.snapshot import read_snapshot, write_snapshot
from vmig.vmm.state import MachineState
from vmig.vmm.throttle import Throttle
from vmig.vmm.vcpu_state import notify_paused, restore_vcpus, save_vcpus
from vmig.vmm.vcpu_thread import VcpuHandle, VcpuRunState, install_kick_handler

__all__ = ["Machine", "VmState", "install_kick_handler"]

log = logging.getLogger(__name__)


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
                 vcpus: list[Vcpu], serial_log: BinaryIO | None, tsc_khz: int,
                 plan: BootPlan | None = None) -> None:
        self.config = config
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.vcpus = vcpus
        self.tsc_khz = tsc_khz
        self.error: str | None = None
        self._cpuid: tuple[dict[str, int], ...] = ()
        self.state = VmState.PAUSED
        #: Failure and final halt, told to the owner's listeners (see `listen`).
        self.reports = Reports()
        self.busy: str | None = None  # e.g. "migrating": user pause/resume/snapshot must wait
        self._serial_log = serial_log
        self._lock = threading.RLock()
        # Guards reading guest memory for info() against _release() unmapping it, without
        # waiting for long operations that hold _lock (a snapshot being written, say).
        self._memory_lock = threading.Lock()
        self.events = threading.Condition()  # notified when the guest or the VM changes
        self.guest: OwnGuest | ImageGuest = (ImageGuest(self, plan) if config.is_image_guest
                                             else OwnGuest(self))
        self.serial = Serial8250(serial_log)
        self.a20 = FastA20()
        self.bus = IoBus()
        self.bus.register(*SERIAL_PORTS, self.serial)
        self.bus.register(*A20_PORTS, self.a20)
        self.guest.attach(self.bus)
        self.handles: list[VcpuHandle] = []
        self.throttle = Throttle(lambda: self.handles)
        on_halt = self._vcpu_halted if self.guest.final_halt else None
        try:
            for vcpu in vcpus:
                self.handles.append(VcpuHandle(vcpu, self.bus, self._vcpu_failed,
                                               self.guest.hlt_wait_s, on_halt))
        except BaseException:
            self._release()
            raise

    # --- construction ------------------------------------------------------------------

    @classmethod
    def boot(cls, config: VmConfig) -> Machine:
        """Build a VM from `config`, load the guest (vmig's or a boot image) and start it."""
        config.validate()
        plan = None
        if config.is_image_guest:  # read the file first: a bad image fails before any KVM work
            config, plan = plan_boot(config)
        memory = GuestMemory.create(config.memory_bytes, config.memory_file)
        machine = cls._assemble(config, memory, restore=None, plan=plan)
        try:
            with machine._lock:
                machine.guest.load()
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
                  restore: MachineState | None, plan: BootPlan | None = None) -> Machine:
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
            machine = cls(config, kvm, vm, memory, vcpus, serial_log, tsc_khz, plan)
            # Read once now: a vCPU ioctl waits while that vCPU is inside KVM_RUN.
            machine._cpuid = tuple(cpuid_entries(vcpus[0].get_cpuid2()))
            stack.pop_all()
        if restore is not None:
            machine.serial.restore_state(restore.devices.get("serial", {"regs": {}}))
            machine.a20.restore_state(restore.devices.get("a20", {}))
            machine.guest.restored(restore.guest)
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
        self.notify()
        if first:
            self.reports.failed(message)

    def _vcpu_halted(self, vcpu_id: int, message: str) -> None:
        """Called on a vCPU thread when an image guest halts for good (once per halt)."""
        self.reports.halted_for_good(message)
        self.notify()

    def listen(self, on_failure: Listener | None, on_halt: Listener | None) -> None:
        """Told once, on a vCPU thread, each in one line: the VM failed (`on_failure`), the
        guest halted for good (`on_halt`); the VMM publishes them as events. Must not block."""
        self.reports.listen(on_failure, on_halt)

    def notify(self) -> None:
        """Wake whoever waits on `events` (boot, self-check)."""
        with self.events:
            self.events.notify_all()

    @property
    def running(self) -> bool:
        return self.state is VmState.RUNNING

    # --- the guest's view (OwnGuest or ImageGuest) --------------------------------------------

    @property
    def booted_cpus(self) -> set[int]:
        return self.guest.booted_cpus

    def wait_booted(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """vmig's guest: wait until every vCPU has booted; an image guest: return at once."""
        self.guest.wait_booted(timeout)

    def guest_counters(self) -> dict[str, int | None]:
        """Heartbeat and pages written (vmig's guest), or None for each (an image guest)."""
        return self.guest.counters()

    def check_guest(self, timeout: float = 60.0) -> dict[str, Any]:
        """Ask the guest to verify every working-set page against its table; wait for it.
        An image guest has no self-check: StateError (409)."""
        with self._lock:
            self._require(VmState.RUNNING, "check the guest")
            request = self.guest.request_check()
        return self.guest.wait_check(request, timeout)

    def info(self) -> dict[str, Any]:
        """What `vm.info` reports: configuration, state and the guest's counters."""
        config = self.config
        data: dict[str, Any] = {
            "state": self.state.value,
            "memory_bytes": config.memory_bytes,
            "cpus": config.cpus,
            **self.guest.describe(),
            "memory_file": config.memory_file,
            "serial_log": config.serial_log,
            "error": self.error,
            "halted": self.reports.halted,
            "heartbeat": None,
            "pages_written": None,
            "vcpus": [{"id": h.vcpu.vcpu_id, "state": h.state.value, "exits": h.exits}
                      for h in self.handles],
            "unknown_ports": self.bus.unknown_ports(),
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
                devices={"serial": self.serial.save_state(), "a20": self.a20.save_state()},
                guest=self.guest.save(),
            )

    def guest_cpuid(self) -> tuple[dict[str, int], ...]:
        """The CPUID the vCPUs were given (all alike), as plain data: CONFIG carries it."""
        return self._cpuid

    def snapshot(self, directory: str) -> None:
        """Write state.json and memory.bin of the paused VM into `directory`."""
        with self._lock:
            self._require_idle("snapshot")
            self._require(VmState.PAUSED, "snapshot")
            write_snapshot(directory, self.save_state(), self.memory)

    def vmm_pages(self) -> RangeTable:
        """The guest pages the VMM itself reads or writes (vmig's guest: the config and
        status pages; an image guest: none).

        Post-copy sends these before the destination resumes: its VMM reads them holding
        the GIL, and a fault there could never be served.
        """
        return self.guest.vmm_pages()

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


