"""`Vmm`: the one object per VMM process that owns the VM and carries out API commands.

This is the only API module that imports `vmig.vmm` (and the migration engine,
which drives a Machine). Every command takes one lock, so commands never
interleave (a pause cannot land in the middle of a snapshot), and every
precondition that is about the *VMM* (is there a VM at all?) is checked here;
preconditions about the VM's own lifecycle (pause only when running) are the
Machine's, which raises `StateError` itself.

Migrations are the exception to "one command at a time": they take minutes, and
vm.info and vm.migration-info must answer meanwhile. A send is admitted under
the command lock and then runs without it, on a thread of its own that no request
waits for: vm.send-migration answers once it has started (the Machine's `busy`
flag keeps user pause/resume/snapshot away, and this class refuses shutdown and a
second migration). A receive only starts a listener, whose thread later installs
the received Machine. The migration bookkeeping has its own small lock, never held
while anything blocks, so the receiver's callback can never deadlock with a
command.

Every change of the VM and every migration step is published on `events`
(`vmig.api.events`): the VM's from here, a migration's by subscribing to its
`MigrationMetrics`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from vmig.api.events import EventBus
from vmig.config import VmConfig
from vmig.errors import (
    ConfigError,
    GuestMemoryError,
    StateError,
    TransportError,
    VmigError,
    one_line,
)
from vmig.migration.lifecycle import refused_after
from vmig.migration.metrics import MigrationMetrics, Phase
from vmig.migration.params import ReceiveParams, SendParams, check_changes
from vmig.migration.receiver import MigrationReceiver
from vmig.migration.sender import MigrationSender
from vmig.transport.address import dialable
from vmig.vmm.machine import Machine, VmState, install_kick_handler

log = logging.getLogger(__name__)

NO_VM = "no VM: create or restore one first"
RECEIVING_NO_VM = "no VM yet: an incoming migration is awaited"
EMPTY = "empty"  # the `state` vm.info reports when there is no VM
RECEIVING = "receiving"  # ... and when there is none yet because one is being received
#: vm.info's `busy` at a destination whose guest runs in post-copy (not handed over yet)
POSTCOPY_BUSY = "receiving its last pages (post-copy)"
CLOSE_WAIT_S = 5.0  # how long close() waits for a running command before stopping the VM
SEND_ABORT_POLL_S = 0.1  # close(): how often a send that is still connecting is interrupted
CANCEL_WAIT_S = 10.0  # vm.cancel-migration waits this long for the migration to wind down
SEND_THREAD = "send-migration"  # the thread an outgoing migration runs on

# A VM in one of these states is over: creating, restoring or receiving replaces it.
_FINISHED = (VmState.SHUTDOWN, VmState.FAILED, VmState.MIGRATED)


class Vmm:
    """Holds `machine` (None when empty) and serialises the commands run on it.

    `serial_log` is the VMM's own `--serial-log`: a VM received by migration
    writes its serial output there.
    """

    def __init__(self, serial_log: str | None = None, events: EventBus | None = None) -> None:
        self._lock = threading.Lock()
        self.machine: Machine | None = None
        self.serial_log = serial_log
        self.events = events or EventBus()
        self.exit_requested = threading.Event()
        # Migration bookkeeping, guarded by _mig_lock (short critical sections only).
        self._mig_lock = threading.Lock()
        self._sender: MigrationSender | None = None  # the send running now
        self._send_done = threading.Event()  # the running (or last) send is over
        self._send_done.set()
        self._send_thread: threading.Thread | None = None  # the running (or last) send's
        self._receiver: MigrationReceiver | None = None  # the last receiver started
        self._receiving = False  # _receiver has not reported its outcome yet
        self._metrics: MigrationMetrics | None = None  # the running or the last migration
        self._last_error: str | None = None  # why the last incoming migration gave no VM

    @staticmethod
    def prepare_process() -> None:
        """Process-wide setup before any VM exists; call once from the main thread."""
        install_kick_handler()

    # --- creating a VM -------------------------------------------------------------------

    def create(self, config: VmConfig) -> dict[str, Any]:
        """Build and boot a VM from `config`; StateError if one is already there."""
        with self._lock:
            self._make_room("create a VM")
            self.machine = self._adopt(Machine.boot(config))
            info = self.machine.info()
        self._vm_event("booted", info)
        return info

    def restore(self, directory: str, *, resume: bool = True, serial_log: str | None = None,
                memory_file: str | None = None) -> dict[str, Any]:
        """Start a VM from the snapshot in `directory`; StateError if one is already there."""
        with self._lock:
            self._make_room("restore a VM")
            self.machine = self._adopt(Machine.restore_snapshot(
                directory, serial_log=serial_log, memory_file=memory_file, resume=resume))
            info = self.machine.info()
        self._vm_event("restored", {**info, "directory": directory})
        return info

    def _make_room(self, action: str) -> None:
        """Refuse while a live VM exists or one is being received; drop a finished VM."""
        with self._mig_lock:
            if self._receiving:
                raise StateError(f"cannot {action}: an incoming migration is awaited; "
                                 "shut the VMM down to cancel it")
        machine = self.machine
        if machine is None:
            return
        if machine.state not in _FINISHED:
            raise StateError(f"cannot {action}: a VM already exists and is "
                             f"{machine.state.value}; shut it down first")
        machine.close()
        self.machine = None

    # --- commands on the VM ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """`Machine.info()`; with no VM {"state": "empty"} or "receiving" (+ last_error).

        Does not wait for the command lock, so it answers during a long command
        (check-guest, snapshot); `Machine.info()` is safe on a machine being closed.
        """
        with self._mig_lock:
            machine, receiving = self.machine, self._receiving
            last_error = self._last_error
            receiver = self._receiver
        if machine is not None:
            return machine.info()
        running = receiver.postcopy_machine() if receiving and receiver is not None else None
        if running is not None:  # post-copy: the guest runs here, its last pages still coming
            return running.info() | {"busy": POSTCOPY_BUSY}
        data: dict[str, Any] = {"state": RECEIVING if receiving else EMPTY}
        if receiving and receiver is not None:
            data["receiver_url"] = str(receiver.address)
        if last_error is not None:
            data["last_error"] = last_error
        return data

    def pause(self) -> None:
        with self._lock:
            self._require("pause").pause()
        self._vm_event("paused")

    def resume(self) -> None:
        with self._lock:
            self._require("resume").resume()
        self._vm_event("resumed")

    def shutdown(self) -> None:
        """Stop the VM (it stays visible in vm.info as `shutdown`); idempotent."""
        with self._lock:
            machine = self._require("shut down")
            if machine.busy is not None:  # the Machine would stop under the sender's feet
                raise StateError(f"cannot shut down: VM is {machine.busy}")
            live = machine.state not in _FINISHED
            machine.shutdown()
        if live:
            self._vm_event("shutdown")

    def snapshot(self, directory: str) -> None:
        with self._lock:
            self._require("snapshot").snapshot(directory)
        self._vm_event("snapshot", {"directory": directory})

    def _adopt(self, machine: Machine) -> Machine:
        """`machine` becomes this VMM's: its failure is published as a ``vm.failed`` event,
        an image guest's final halt as ``vm.halted``."""
        machine.listen(on_failure=lambda error: self._vm_event("failed", {"error": error}),
                       on_halt=lambda reason: self._vm_event("halted", {"reason": reason}))
        return machine

    def _vm_event(self, event: str, properties: dict[str, Any] | None = None) -> None:
        self.events.publish("vm", event, properties)

    def _migration_event(self, event: str, properties: dict[str, Any]) -> None:
        self.events.publish("migration", event, properties)

    def check_guest(self, timeout: float = 60.0) -> dict[str, Any]:
        with self._lock:
            return self._require("check the guest").check_guest(timeout)

    def _require(self, action: str) -> Machine:
        with self._mig_lock:
            machine, receiving = self.machine, self._receiving
        if machine is None:
            raise StateError(f"cannot {action}: {RECEIVING_NO_VM if receiving else NO_VM}")
        return machine

    # --- migration -------------------------------------------------------------------------

    def receive_migration(self, params: ReceiveParams) -> dict[str, Any]:
        """Listen for one incoming migration; return where a sender reaches it.

        Needs an empty VMM (a finished VM is dropped). Every file (TLS, token) is
        read and checked before anything listens. Returns once listening (after
        faulting in `prealloc` bytes of guest RAM, if given), with the token made
        for this migration when none was given; the received VM becomes this
        VMM's VM when the migration completes, and a failure leaves the VMM empty
        with `last_error` in vm.info.
        """
        resolved = params.resolve()
        with self._lock:
            if self.exit_requested.is_set():
                raise StateError("cannot receive a migration: the VMM is shutting down")
            self._make_room("receive a migration")
            with self._mig_lock:
                previous = self._receiver
            if previous is not None:
                previous.close()  # finished already (not _receiving): this only joins threads
            receiver = MigrationReceiver(resolved, self._on_received, serial_log=self.serial_log)
            receiver.metrics.subscribe(self._migration_event)
            with self._mig_lock:  # before start(): its callback may come at any time after
                self._receiver, self._receiving = receiver, True
            try:
                address = receiver.start()
            except BaseException as exc:
                with self._mig_lock:
                    self._receiver, self._receiving = None, False
                if isinstance(exc, TransportError):
                    raise ConfigError(f"receiver_url: {exc}") from None
                if isinstance(exc, GuestMemoryError):
                    raise ConfigError(f"prealloc: {exc}") from None
                raise
            with self._mig_lock:
                self._metrics = receiver.metrics
                self._last_error = None
        url, hosts = dialable(address)
        for warning in resolved.warnings:
            log.warning("%s", warning)
        log.info("listening for a migration on %s (%s)", address, resolved.security.describe())
        reply = {"receiver_url": str(url), "token": resolved.generated_token,
                 "security": resolved.security.describe(), "listening_on": hosts,
                 "warnings": list(resolved.warnings)}
        listening = {key: value for key, value in reply.items() if key != "token"}
        self._migration_event("listening", {**receiver.metrics.view(), **listening})
        return reply

    def _on_received(self, machine: Machine | None, error: str | None) -> None:
        """The receiver's outcome (on its thread): install the VM, or remember why not."""
        with self._mig_lock:
            self._receiving = False
            receiver = self._receiver
            if machine is not None:
                self.machine = self._adopt(machine)
                self._last_error = None
            else:
                self._last_error = error or "the incoming migration ended without a VM"
        if receiver is not None:
            receiver.metrics.settle()
        if machine is not None:
            log.info("incoming migration completed: the VM runs here")
            self._vm_event("received", machine.info())

    def send_migration(self, params: SendParams) -> dict[str, Any]:
        """Start migrating the VM as `params` say; return at once {"id", **migration-info}.

        ConfigError (bad parameters) comes before StateError (no VM, wrong state, a
        migration already running), and both before anything starts. The migration then
        runs on a thread of this VMM (`close()` joins it), whatever becomes of the request
        that started it: its progress and outcome are vm.migration-info's (`outcome`,
        `error`), the events' and /metrics'. A failure leaves the VM running here. The
        command lock is held only to admit the send.
        """
        resolved = params.resolve()
        with self._lock:
            if self.exit_requested.is_set():
                raise StateError("cannot send a migration: the VMM is shutting down")
            machine = self._require("send a migration")
            with self._mig_lock:
                if self._sender is not None or self._receiving:
                    raise StateError("cannot send a migration: a migration is already running")
            if machine.busy is not None:
                raise StateError(f"cannot send a migration: VM is {machine.busy}")
            if machine.state not in (VmState.RUNNING, VmState.PAUSED):
                raise StateError(f"cannot send a migration: VM is {machine.state.value}, it "
                                 "must be running or paused")
            metrics = MigrationMetrics("send")
            metrics.subscribe(self._migration_event)
            sender = MigrationSender(machine, resolved, metrics)
            done = threading.Event()
            thread = threading.Thread(target=self._run_send, args=(sender, done),
                                      name=SEND_THREAD, daemon=True)
            with self._mig_lock:
                self._sender, self._metrics = sender, metrics
                self._send_done, self._send_thread = done, thread
            log.info("sending the VM to %s over %d connection(s)", params.destination_url,
                     params.connections)
            self._migration_event("started", metrics.view())
            thread.start()
        return {"id": sender.migration_id.hex(), **_info(metrics, not done.is_set())}

    def _run_send(self, sender: MigrationSender, done: threading.Event) -> None:
        """The send's thread: run it, keep its outcome with its metrics, say it is over."""
        error: str | None = None
        try:
            sender.run()
        except Exception as exc:  # the outcome: vm.migration-info says why
            error = one_line(exc, type(exc).__name__)
            if not isinstance(exc, VmigError):
                log.exception("outgoing migration failed")
        try:
            sender.metrics.settle(error)
            if sender.machine.state is VmState.MIGRATED:
                self._vm_event("migrated", {"destination": sender.metrics.peer})
        finally:
            with self._mig_lock:
                self._sender = None
            done.set()

    def migration_info(self) -> dict[str, Any] | None:
        """The running (or last) migration's figures plus "active" and "outcome"; None if
        none ever ran."""
        with self._mig_lock:
            metrics = self._metrics
            receiver = self._receiver
            # A receiver is active until its threads are joined, after the hand-over too.
            active = self._sender is not None or self._receiving or (
                receiver is not None and receiver.metrics is metrics and not receiver.finished)
        if metrics is None:
            return None
        return _info(metrics, active)

    def recover_migration(self, url: str | None = None) -> dict[str, Any]:
        """Re-dial the outgoing migration in postcopy-paused now (at `url`, if given);
        StateError when there is none."""
        with self._mig_lock:
            sender = self._sender
        if sender is None:
            raise StateError("nothing to recover: no outgoing migration is running here "
                             "(recover-migration is given at the source)")
        sender.recover(url)
        info = self.migration_info()
        assert info is not None
        return info

    def migration_set_parameters(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change parameters of the outgoing migration running here; return its figures
        (`parameters` holds the values now in force).

        ConfigError (unknown field, value out of range) comes before StateError: a
        parameter that cannot change mid-flight, no send running here, or one past
        the point where a change matters (COMPLETE sent).
        """
        changes = check_changes(changes)
        self._outgoing("change parameters").set_parameters(changes)
        return self._current_info()

    def migration_start_postcopy(self) -> dict[str, Any]:
        """Switch the outgoing migration to post-copy at the end of its current pass; its
        figures. StateError when none runs here or it cannot (MigrationSender says why)."""
        self._outgoing("start post-copy").start_postcopy()
        return self._current_info()

    def migration_force_complete(self) -> dict[str, Any]:
        """Pause the guest and switch the outgoing migration over at the end of its current
        pass, whatever the expected downtime; its figures. StateError as for start-postcopy."""
        self._outgoing("force the switch-over").force_complete()
        return self._current_info()

    def _outgoing(self, action: str) -> MigrationSender:
        """The send running here; StateError naming `action` when there is none."""
        with self._mig_lock:
            sender = self._sender
        if sender is None:
            raise StateError(f"cannot {action}: no outgoing migration is running here (it is "
                             "asked for at the source)")
        return sender

    def _current_info(self) -> dict[str, Any]:
        info = self.migration_info()
        assert info is not None
        return info

    def cancel_migration(self, reason: str = "cancelled by the operator") -> dict[str, Any]:
        """Cancel the running migration, on either side; return its figures once it ended.

        Before the switch-over's point of no return the source keeps (or resumes) its VM
        and the destination discards what it received and is empty again. StateError
        when no migration runs, or when it is past that point; a migration that already
        completed or failed is left as it is (StateError says so). A cancel while one is
        being cancelled, or after, answers the same outcome as the first: cancelling is
        idempotent.
        """
        with self._mig_lock:
            sender, receiver = self._sender, self._receiver if self._receiving else None
            done, last = self._send_done, self._metrics
        if sender is not None:
            sender.cancel(reason)
            done.wait(CANCEL_WAIT_S)
        elif receiver is not None:
            receiver.cancel(reason)
            receiver.wait(CANCEL_WAIT_S)
        else:
            _refuse_cancel(last)
        info = self.migration_info()
        assert info is not None
        return info

    def _interrupt_send(self) -> None:
        """Make a running send fail fast (it abandons and resumes the VM); never blocks."""
        sender = self._sender  # no lock: this runs from a signal handler too
        if sender is not None:
            with contextlib.suppress(StateError):  # past the point of no return: let it end
                sender.cancel("the VMM is shutting down")

    # --- the process ------------------------------------------------------------------------

    def request_exit(self) -> None:
        """Ask the server to stop serving (vmm.shutdown, SIGTERM); `close()` follows.

        A send still running is interrupted now, so that the server's graceful
        shutdown does not wait for it; it ends with an error and the VM resumed.
        """
        if not self.exit_requested.is_set():
            self.events.publish("vmm", "shutdown")
        self.exit_requested.set()
        self.events.end_streams()  # the server's graceful shutdown waits for open responses
        self._interrupt_send()

    def close(self) -> None:
        """Cancel migrations, shut the VM down and forget it; idempotent, never raises.

        An incoming migration is cancelled (its receiver closed and joined). A
        send gets CLOSE_WAIT_S to unwind after being interrupted, and a command
        still running (a long check-guest, say) as long again; after that the VM
        is shut down under it anyway (the Machine has its own lock, and its
        waits end when the VM stops).
        """
        self.exit_requested.set()
        with self._mig_lock:
            receiver = self._receiver
        if receiver is not None:
            receiver.close()  # aborts if still running; _on_received has run when it returns
        deadline = time.monotonic() + CLOSE_WAIT_S
        while not self._send_done.is_set() and time.monotonic() < deadline:
            self._interrupt_send()  # again: the pool may not have existed the first time
            self._send_done.wait(SEND_ABORT_POLL_S)
        self._join_send(max(deadline - time.monotonic(), SEND_ABORT_POLL_S))
        acquired = self._lock.acquire(timeout=CLOSE_WAIT_S)
        try:
            with self._mig_lock:
                machine, self.machine = self.machine, None
            if machine is not None:
                live = machine.state not in _FINISHED
                try:
                    machine.close()
                except Exception as exc:  # the process is going away: log, do not raise
                    log.error("shutting the VM down: %s", exc)
                if live:
                    self._vm_event("shutdown")
        finally:
            if acquired:
                self._lock.release()
            self._join_send(CLOSE_WAIT_S)  # a send admitted while close() began: it fails now
            self.events.close()

    def _join_send(self, timeout: float) -> None:
        with self._mig_lock:
            thread = self._send_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("the outgoing migration did not end within %.0f s of the VMM "
                          "stopping", timeout)


def _info(metrics: MigrationMetrics, active: bool) -> dict[str, Any]:
    """vm.migration-info: the metrics' view, whether the migration runs, how it ended."""
    return {**metrics.view(), "active": active, "outcome": metrics.outcome}


def _refuse_cancel(last: MigrationMetrics | None) -> None:
    """No migration runs: refuse the cancel (StateError), unless the last one was cancelled,
    which a second cancel answers with again. Nothing is changed either way."""
    if last is None or not last.phase.final:
        raise StateError("cannot cancel: no migration is running")
    if last.phase is not Phase.CANCELLED:
        raise StateError(refused_after(last.phase.value))
