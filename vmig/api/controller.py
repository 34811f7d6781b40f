"""`Vmm`: the one object per VMM process that owns the VM and carries out API commands.

This is the only API module that imports `vmig.vmm`. Every command takes one
lock, so commands never interleave (a pause cannot land in the middle of a
snapshot), and every precondition that is about the *VMM* (is there a VM at
all?) is checked here; preconditions about the VM's own lifecycle (pause only
when running) are the Machine's, which raises `StateError` itself.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from vmig.config import VmConfig
from vmig.errors import StateError, VmigError
from vmig.vmm.machine import Machine, VmState, install_kick_handler

log = logging.getLogger(__name__)

NO_VM = "no VM: create or restore one first"
EMPTY = "empty"  # the `state` vm.info reports when there is no VM
CLOSE_WAIT_S = 5.0  # how long close() waits for a running command before stopping the VM

# A VM in one of these states is over: creating or restoring replaces it.
_FINISHED = (VmState.SHUTDOWN, VmState.FAILED)


class Vmm:
    """Holds `machine` (None when empty) and serialises the commands run on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.machine: Machine | None = None
        self.exit_requested = threading.Event()

    @staticmethod
    def prepare_process() -> None:
        """Process-wide setup before any VM exists; call once from the main thread."""
        install_kick_handler()

    # --- creating a VM -------------------------------------------------------------------

    def create(self, config: VmConfig) -> dict[str, Any]:
        """Build and boot a VM from `config`; StateError if one is already there."""
        with self._lock:
            self._make_room("create a VM")
            self.machine = Machine.boot(config)
            return self.machine.info()

    def restore(self, directory: str, *, resume: bool = True, serial_log: str | None = None,
                memory_file: str | None = None) -> dict[str, Any]:
        """Start a VM from the snapshot in `directory`; StateError if one is already there."""
        with self._lock:
            self._make_room("restore a VM")
            self.machine = Machine.restore_snapshot(directory, serial_log=serial_log,
                                                    memory_file=memory_file, resume=resume)
            return self.machine.info()

    def _make_room(self, action: str) -> None:
        """Refuse while a live VM exists; drop a VM that is shut down or failed."""
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
        """`Machine.info()`, or {"state": "empty"} when there is no VM."""
        with self._lock:
            if self.machine is None:
                return {"state": EMPTY}
            return self.machine.info()

    def pause(self) -> None:
        with self._lock:
            self._require("pause").pause()

    def resume(self) -> None:
        with self._lock:
            self._require("resume").resume()

    def shutdown(self) -> None:
        """Stop the VM (it stays visible in vm.info as `shutdown`); idempotent."""
        with self._lock:
            self._require("shut down").shutdown()

    def snapshot(self, directory: str) -> None:
        with self._lock:
            self._require("snapshot").snapshot(directory)

    def check_guest(self, timeout: float = 60.0) -> dict[str, Any]:
        with self._lock:
            return self._require("check the guest").check_guest(timeout)

    def _require(self, action: str) -> Machine:
        if self.machine is None:
            raise StateError(f"cannot {action}: {NO_VM}")
        return self.machine

    # --- the process ------------------------------------------------------------------------

    def request_exit(self) -> None:
        """Ask the server to stop serving (vmm.shutdown); `close()` follows."""
        self.exit_requested.set()

    def close(self) -> None:
        """Shut the VM down and forget it; idempotent, never raises a VmigError.

        A command still running (a long check-guest, say) gets CLOSE_WAIT_S to
        finish; after that the VM is shut down under it anyway (the Machine has
        its own lock, and its waits end when the VM stops).
        """
        acquired = self._lock.acquire(timeout=CLOSE_WAIT_S)
        try:
            machine, self.machine = self.machine, None
            if machine is not None:
                try:
                    machine.close()
                except VmigError as exc:
                    log.error("shutting the VM down: %s", exc)
        finally:
            if acquired:
                self._lock.release()
