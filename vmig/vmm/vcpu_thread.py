"""One thread per vCPU with an explicit running / paused / stopped loop.

The thread is the only caller of KVM_RUN on its vCPU. Other threads change the
*desired* state and kick: `immediate_exit = 1` plus a signal makes a KVM_RUN in
progress (or the next one) return with EINTR, so pausing works while the guest
is busy in a loop that never exits on its own (Firecracker's vcpu.rs).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import threading
from collections.abc import Callable

from vmig.errors import GuestError, VmigError, describe
from vmig.kvm import Vcpu
from vmig.kvm.bindings import KVM_EXIT_IO_OUT, ExitReason
from vmig.vmm.devices import IoBus, pack_io, unpack_io

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
# There are no timer interrupts: a halted guest is re-entered after this long. A pacing
# guest halts between batches of page writes, so it wants short naps; an idle one only
# beats and serves checks, and longer naps keep an idle VMM near 1% of a core.
HLT_WAIT_S = 0.002
IDLE_HLT_WAIT_S = 0.02
PAUSE_TIMEOUT_S = 10.0
RFLAGS_IF = 1 << 9


def install_kick_handler() -> None:
    """Install the no-op handler for KICK_SIGNAL; must run in the main thread, once.

    Without a handler the kick would kill the process; with one, the signal only
    interrupts the vCPU thread's KVM_RUN (EINTR).
    """
    if signal.getsignal(KICK_SIGNAL) is _kick_noop:
        return
    if threading.current_thread() is not threading.main_thread():
        raise VmigError("install_kick_handler() must be called from the main thread")
    signal.signal(KICK_SIGNAL, _kick_noop)


def _kick_noop(signum: int, frame: object) -> None:
    """Nothing to do: the signal's only job is to interrupt KVM_RUN."""


def kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) is _kick_noop


class VcpuRunState(enum.Enum):
    """The vCPU loop's states; the thread moves between them, others only ask."""

    RUNNING = "running"  #: in or about to enter KVM_RUN
    PAUSED = "paused"  #: parked outside KVM_RUN; registers may be read or written
    STOPPED = "stopped"  #: the thread has ended (shut down, or the guest failed)


class VcpuHandle:
    """Owns a vCPU's thread. Created paused; `resume()` starts the guest running."""

    def __init__(self, vcpu: Vcpu, bus: IoBus, on_failure: Callable[[int, str], None],
                 hlt_wait_s: float = HLT_WAIT_S,
                 on_final_halt: Callable[[int, str], None] | None = None) -> None:
        """`on_final_halt`, if given, makes HLT with RFLAGS.IF clear final (nothing can
        wake the guest): it is told once per halt, and the vCPU waits until kicked
        (pause, stop) instead of re-entering KVM_RUN. Without it every HLT is a nap."""
        if not kick_handler_installed():
            raise VmigError("vCPU kick handler not installed: call install_kick_handler() "
                            "from the main thread first")
        self.vcpu = vcpu
        self._bus = bus
        self._on_failure = on_failure
        self._hlt_wait_s = hlt_wait_s
        self._on_final_halt = on_final_halt
        self._halt_told = False
        self._cond = threading.Condition()
        self._desired = VcpuRunState.PAUSED
        self._actual = VcpuRunState.PAUSED
        self._wake = threading.Event()
        self._nap = 0.0  # seconds to stay out of KVM_RUN at the next exit (throttling)
        self.error: str | None = None
        self.exits = 0
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{vcpu.vcpu_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def state(self) -> VcpuRunState:
        return self._actual

    @property
    def native_id(self) -> int | None:
        """The kernel's id of the vCPU's thread (userfaultfd's faulting thread id)."""
        return self._thread.native_id

    # --- control (any thread) ----------------------------------------------------

    def resume(self) -> None:
        """Let the vCPU run."""
        with self._cond:
            if self._actual is VcpuRunState.STOPPED:
                raise GuestError(f"vCPU {self.vcpu.vcpu_id} has stopped: {self.error}")
            self._desired = VcpuRunState.RUNNING
            self._cond.notify_all()

    def request_pause(self) -> None:
        """Ask the vCPU to leave KVM_RUN and park; returns at once (see `wait_paused`)."""
        with self._cond:
            if self._desired is VcpuRunState.STOPPED:
                return
            self._desired = VcpuRunState.PAUSED
        self._kick()

    def wait_paused(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Wait until the vCPU is parked (or stopped)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._actual is not VcpuRunState.RUNNING, timeout)
        if not ok:
            raise GuestError(f"vCPU {self.vcpu.vcpu_id} did not pause within {timeout:.0f} s")

    def stop(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """End the thread and join it; idempotent."""
        with self._cond:
            self._desired = VcpuRunState.STOPPED
            self._cond.notify_all()
        self._kick()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise GuestError(f"vCPU thread {self._thread.name} did not stop within {timeout} s")

    def nap(self, seconds: float) -> None:
        """Keep the vCPU out of KVM_RUN for `seconds` (a throttle's share of its time);
        a pause or a stop cuts the nap short."""
        with self._cond:
            if self._desired is not VcpuRunState.RUNNING:
                return
            self._nap = seconds
        self._kick()

    def _kick(self) -> None:
        self._wake.set()
        if self.vcpu.run_struct is not None:
            self.vcpu.set_immediate_exit(True)
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                signal.pthread_kill(ident, KICK_SIGNAL)

    # --- the loop (vCPU thread only) ------------------------------------------------

    def _set_actual(self, state: VcpuRunState) -> None:
        with self._cond:
            self._actual = state
            self._cond.notify_all()

    def _loop(self) -> None:
        try:
            while True:
                self.vcpu.set_immediate_exit(False)
                with self._cond:
                    desired = self._desired
                    if desired is VcpuRunState.PAUSED:
                        self._actual = VcpuRunState.PAUSED
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._desired is not VcpuRunState.PAUSED)
                        continue
                    if desired is VcpuRunState.STOPPED:
                        break
                    if self._nap > 0:  # throttled: sit this share of the time out
                        nap, self._nap = self._nap, 0.0
                        self._cond.wait_for(
                            lambda: self._desired is not VcpuRunState.RUNNING, nap)
                        continue
                    self._actual = VcpuRunState.RUNNING
                self._run_once()
        except Exception as exc:  # the guest or the VMM failed: record it, stop this vCPU
            self.error = describe(exc)
            log.error("vCPU %d failed: %s", self.vcpu.vcpu_id, self.error)
            self._on_failure(self.vcpu.vcpu_id, self.error)
        finally:
            self._set_actual(VcpuRunState.STOPPED)

    def _run_once(self) -> None:
        exit_ = self.vcpu.run()
        self.exits += 1
        if exit_.interrupted:
            return
        reason = exit_.reason
        if reason == ExitReason.IO:
            self._handle_io()
        elif reason == ExitReason.HLT:
            if self._on_final_halt is not None and self._halted_for_good():
                self._wake.wait()  # until a pause, a stop or a nap kicks
            else:
                self._wake.wait(self._hlt_wait_s)
            self._wake.clear()
        elif reason == ExitReason.INTR:
            return
        else:
            raise GuestError(self._describe_exit(reason))

    def _halted_for_good(self) -> bool:
        """HLT with interrupts disabled: no interrupt controller exists to wake it."""
        regs = self.vcpu.get_regs()
        if regs.rflags & RFLAGS_IF:
            self._halt_told = False
            return False
        # KVM has moved RIP past the 1-byte HLT; a real CPU would stay on it forever. Step
        # back, so that a kick, a snapshot or a migration re-enters HLT, not what follows.
        regs.rip -= 1
        self.vcpu.set_regs(regs)
        if not self._halt_told and self._on_final_halt is not None:
            self._halt_told = True
            self._on_final_halt(self.vcpu.vcpu_id, f"vCPU {self.vcpu.vcpu_id} halted for good at "
                                f"rip={regs.rip:#x}: HLT with interrupts disabled, and there "
                                "is no interrupt to wake it")
        return True

    def _handle_io(self) -> None:
        io = self.vcpu.kvm_run.io
        data = self.vcpu.io_data()
        size = io.size
        for i in range(io.count):
            chunk = slice(i * size, (i + 1) * size)
            if io.direction == KVM_EXIT_IO_OUT:
                self._bus.write(io.port, size, unpack_io(size, bytes(data[chunk])))
            else:
                data[chunk] = pack_io(size, self._bus.read(io.port, size))

    def _describe_exit(self, reason: int) -> str:
        run = self.vcpu.kvm_run
        try:
            rip = self.vcpu.get_regs().rip
        except VmigError:
            rip = -1
        where = f"vCPU {self.vcpu.vcpu_id} at rip={rip:#x}"
        if reason == ExitReason.SHUTDOWN:
            return f"{where}: guest shut down (triple fault)"
        if reason == ExitReason.FAIL_ENTRY:
            code = run.fail_entry.hardware_entry_failure_reason
            return f"{where}: KVM could not enter the guest (reason {code:#x})"
        if reason == ExitReason.INTERNAL_ERROR:
            return f"{where}: KVM internal error (suberror {run.internal.suberror})"
        if reason == ExitReason.MMIO:
            return f"{where}: MMIO access to unmapped address {run.mmio.phys_addr:#x}"
        name = reason.name if isinstance(reason, ExitReason) else str(reason)
        return f"{where}: unexpected exit {name}"
