"""The lifecycle of a migration on each side: its phase, cancel, the point of no return,
and connections lost and resumed. One object per side owns all of it, so that the
sender and the receiver ask one place whether a cancel is allowed, whether a lost
connection may be waited for, and whether post-copy is paused.

`SendLifecycle` (the source): phase per `policy.SEND_TRANSITIONS`; a cancel is allowed
until COMPLETE (or POSTCOPY) is sent, and in post-copy only while it is paused, when it
is the explicit rollback. `ReceiveLifecycle` (the destination) mirrors it over the
receiver's phases (`receive_phases`). Both count the connections that are down and
being re-dialled (`reconnecting`): in post-copy, one down is `postcopy-paused`, and the
last one back is post-copy again. The metrics are the view of all of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmig.errors import MigrationCancelled, MigrationError, StateError, describe
from vmig.migration.metrics import MigrationMetrics, Phase
from vmig.migration.policy import (
    CANCELLABLE,
    SWITCHOVER_COMMANDS,
    SendPhase,
    Switchover,
    next_send_phase,
)

__all__ = ["PHASE_METRICS", "ROLLBACK_WARNING", "ReceiveLifecycle", "SendLifecycle",
           "refused_after"]

#: What a cancel in postcopy-paused means, said when it is given.
ROLLBACK_WARNING = ("cancelling post-copy is a rollback: the guest goes back to the source's "
                    "copy, paused at the switch-over, and loses what it did at the destination "
                    "since then")

#: The metrics' phase of each of the sender's phases.
PHASE_METRICS = {SendPhase.CONNECTING: Phase.CONNECTING, SendPhase.PRECOPY: Phase.PRECOPY,
                  SendPhase.SWITCHOVER: Phase.SWITCHOVER, SendPhase.POSTCOPY: Phase.POSTCOPY,
                  SendPhase.COMPLETING: Phase.COMPLETING,
                  SendPhase.COMPLETED: Phase.COMPLETED, SendPhase.CANCELLED: Phase.CANCELLED,
                  SendPhase.FAILED: Phase.FAILED}


#: How a refused switch-over command names the phase the migration is already in.
_PAST_PRECOPY = {SendPhase.SWITCHOVER: "switching over", SendPhase.POSTCOPY: "in post-copy",
                 SendPhase.COMPLETING: "completing (COMPLETE was sent)"}


class _Connections:
    """Connections down and being re-dialled (index -> cause), with the metrics' view."""

    def __init__(self, metrics: MigrationMetrics) -> None:
        self.metrics = metrics
        self.down: dict[int, str] = {}

    def lost(self, index: int, role: str, cause: str) -> None:
        self.down[index] = cause
        self.metrics.reconnecting(index, role, cause)

    def back(self, index: int) -> None:
        if self.down.pop(index, None) is not None:
            self.metrics.reconnected(index)


class SendLifecycle:
    """The source's side: phase, cancel, point of no return, resume (see module doc)."""

    def __init__(self, metrics: MigrationMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._phase = SendPhase.CONNECTING
        self._connections = _Connections(metrics)
        self.cancel_reason: str | None = None
        #: Set on cancel: wakes a re-dial's backoff and a wait for recover-migration.
        self.stopped = threading.Event()
        #: Why re-dials give up early: a pass stopped on another connection's error.
        self.abandoned: str | None = None
        self._recover = threading.Condition(self._lock)
        self._recover_url: str | None = None
        self._recoveries = 0
        self._interrupt: Callable[[], None] = lambda: None
        self.postcopy_started = False
        #: The switch-over an operator asked for, taken at the end of the current pass.
        self.switchover_command: Switchover | None = None

    @property
    def phase(self) -> SendPhase:
        return self._phase

    def on_cancel(self, interrupt: Callable[[], None]) -> None:
        """What a cancel does to the running migration (cut its connections)."""
        self._interrupt = interrupt

    def enter(self, phase: SendPhase) -> None:
        with self._lock:
            self._phase = next_send_phase(self._phase, phase)
            paused = self.postcopy_started and bool(self._connections.down)
        self.metrics.set_phase(Phase.POSTCOPY_PAUSED if paused and not phase_final(phase)
                               else PHASE_METRICS[phase])

    def commit(self, phase: SendPhase) -> None:
        """Move past a point of no return (POSTCOPY, COMPLETING): a cancel either came
        before this (MigrationCancelled) or is refused from now on."""
        with self._lock:
            self._check_cancelled()
            self._phase = next_send_phase(self._phase, phase)
            if phase is SendPhase.POSTCOPY:
                self.postcopy_started = True
        self.metrics.set_phase(PHASE_METRICS[phase])

    def end(self, phase: SendPhase) -> None:
        """The outcome (CANCELLED or FAILED) after a failure, whatever the phase was."""
        with self._lock:
            self._phase = phase

    # --- cancel --------------------------------------------------------------------------

    def cancel(self, reason: str) -> bool:
        """Record a cancel (from any thread, never blocks); StateError when refused. True
        when it is post-copy's rollback (the caller warns). A cancel while the migration
        is being cancelled, or once it is, changes nothing and is not refused: the caller
        answers with the same outcome as the first."""
        with self._lock:
            if self._phase is SendPhase.CANCELLED:
                return False
            rollback = self.postcopy_paused_locked()
            if self._phase not in CANCELLABLE and not rollback:
                raise StateError(self._refusal())
            if self.cancel_reason is None:
                self.cancel_reason = reason
            self._recover.notify_all()
        self.stopped.set()
        self._interrupt()
        return rollback

    def abandon_redials(self, error: BaseException) -> None:
        """A pass stopped on `error` (the destination's cancel answered on MAIN, a
        connection that could not be resumed): the migration is ending, so a connection
        being re-dialled meanwhile gives up now rather than at the end of its window."""
        with self._lock:
            if self.abandoned is None:
                self.abandoned = describe(error)
            self._recover.notify_all()
        self.stopped.set()

    def check_abandoned(self) -> None:
        """MigrationError once `abandon_redials` was called (a re-dial's way out)."""
        if self.abandoned is not None:
            raise MigrationError(f"re-dialling given up: {self.abandoned}")

    def _refusal(self) -> str:
        if self.postcopy_started:
            return ("cannot cancel: post-copy is under way (the guest runs at the destination "
                    "and its memory is split between both hosts); a cancel is allowed only "
                    "while it is paused (postcopy-paused), as a rollback")
        if self._phase is SendPhase.COMPLETING:
            return ("cannot cancel: the switch-over passed its point of no return (COMPLETE "
                    "was sent; the destination may already run the VM)")
        return refused_after(self._phase.value)

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def check_cancelled(self) -> None:
        with self._lock:
            self._check_cancelled()

    def _check_cancelled(self) -> None:
        if self.cancel_reason is not None:
            raise MigrationCancelled(f"migration cancelled: {self.cancel_reason}")

    # --- switch-over on command ----------------------------------------------------------

    def command_switchover(self, command: Switchover) -> None:
        """Record start-postcopy or force-complete for the pre-copy loop to take at the end
        of its current pass (from any thread, never blocks). StateError with the reason when
        it cannot apply: cancelled, past pre-copy, the other one asked already, or (post-copy)
        still connecting. Asking twice for the same is the same as once."""
        assert command in SWITCHOVER_COMMANDS
        what = ("start post-copy" if command is Switchover.START_POSTCOPY
                else "force the switch-over")
        with self._lock:
            if self.cancel_reason is not None:
                raise StateError(f"cannot {what}: the migration is being cancelled")
            if command is Switchover.START_POSTCOPY and self._phase is SendPhase.CONNECTING:
                raise StateError(f"cannot {what} yet: the migration is still connecting (the "
                                 "destination has not taken the memory yet); ask again once "
                                 "it is in pre-copy")
            if self._phase not in (SendPhase.CONNECTING, SendPhase.PRECOPY):
                raise StateError(f"cannot {what}: the migration is already "
                                 f"{_PAST_PRECOPY.get(self._phase, self._phase.value)}")
            asked = self.switchover_command
            if asked is not None and asked is not command:
                raise StateError(f"cannot {what}: {asked.value} was asked for already")
            self.switchover_command = command

    # --- connections lost and resumed ----------------------------------------------------

    def connection_lost(self, index: int, role: str, cause: str) -> None:
        with self._lock:
            self._connections.lost(index, role, cause)
            paused = self.postcopy_started and not phase_final(self._phase)
        if paused:
            self.metrics.set_phase(Phase.POSTCOPY_PAUSED)

    def connection_back(self, index: int) -> None:
        with self._lock:
            self._connections.back(index)
            resumed = (self.postcopy_started and not self._connections.down
                       and not phase_final(self._phase))
            phase = self._phase
        if resumed:
            self.metrics.set_phase(PHASE_METRICS[phase])

    def postcopy_paused_locked(self) -> bool:
        return self.postcopy_started and bool(self._connections.down) \
            and not phase_final(self._phase)

    @property
    def postcopy_paused(self) -> bool:
        with self._lock:
            return self.postcopy_paused_locked()

    def wait_for_recovery(self) -> str | None:
        """Post-copy whose re-dial window ran out: wait (for ever) for `recover()` or a
        cancel. Returns the URL to dial (None: the same one); raises on cancel."""
        with self._recover:
            seen = self._recoveries
            self._recover.wait_for(lambda: self._recoveries != seen
                                   or self.cancel_reason is not None
                                   or self.abandoned is not None)
            self._check_cancelled()
            self.check_abandoned()
            return self._recover_url or None

    def recover(self, url: str | None) -> None:
        """recover-migration: re-dial now (at `url`, if given); StateError unless paused."""
        with self._lock:
            if not self.postcopy_paused_locked():
                raise StateError("nothing to recover: the migration is not in "
                                 "postcopy-paused")
            self._recover_url = url
            self._recoveries += 1
            self._recover.notify_all()


class ReceiveLifecycle:
    """The destination's side: closing, the first error, cancel, the point of no return
    (COMPLETE being applied; POSTCOPY accepted) and resume."""

    def __init__(self, metrics: MigrationMetrics) -> None:
        self.metrics = metrics
        self.lock = threading.Lock()
        self._connections = _Connections(metrics)
        self.closing = False
        self.error: str | None = None
        self.cancel_reason: str | None = None
        self.source_cancelled = False  # ABANDON said an operator cancelled at the source
        self.committing = False  # COMPLETE is being applied: too late to cancel
        self.postcopy = False  # POSTCOPY accepted: the guest runs here
        self.completed = False

    def cancel(self, reason: str) -> tuple[bool, bool]:
        """Record a cancel; StateError when refused. Returns (new, rollback): whether this
        cancel is the first, and whether it is post-copy's rollback."""
        with self.lock:
            if self.completed:
                raise StateError(refused_after("completed"))
            if self.committing:
                raise StateError("cannot cancel: the switch-over passed its point of no "
                                 "return (COMPLETE arrived; the VM runs here)")
            rollback = self.postcopy and bool(self._connections.down)
            if self.postcopy and not rollback:
                raise StateError("cannot cancel: post-copy is under way (the guest runs here "
                                 "and its memory is split between both hosts); a cancel is "
                                 "allowed only while it is paused (postcopy-paused), as a "
                                 "rollback")
            if self.closing or self.cancel_reason is not None:
                return False, rollback
            self.cancel_reason = reason
            return True, rollback

    def abort(self, reason: str) -> bool:
        """Record the first error; False if already ending."""
        with self.lock:
            if self.closing:
                return False
            self.closing = True
            self.error = reason
            return True

    @property
    def ending(self) -> bool:
        return self.closing or self.cancel_reason is not None

    def commit_complete(self) -> None:
        """COMPLETE arrived: from here on a cancel is refused."""
        with self.lock:
            if self.cancel_reason is not None:
                raise MigrationCancelled(f"migration cancelled at the destination: "
                                         f"{self.cancel_reason}")
            self.committing = True

    def connection_lost(self, index: int, role: str, cause: str) -> None:
        with self.lock:
            self._connections.lost(index, role, cause)
            paused = self.postcopy and not self.completed
        if paused:
            self.metrics.set_phase(Phase.POSTCOPY_PAUSED)

    def connection_back(self, index: int) -> None:
        with self.lock:
            self._connections.back(index)
            resumed = self.postcopy and not self._connections.down and not self.completed
        if resumed:
            self.metrics.set_phase(Phase.POSTCOPY)

    @property
    def postcopy_paused(self) -> bool:
        with self.lock:
            return self.postcopy and bool(self._connections.down) and not self.completed


def refused_after(outcome: str) -> str:
    """Why a cancel is refused once the migration has `outcome` (completed or failed)."""
    return f"cannot cancel: the migration already {outcome}; nothing was changed"


def phase_final(phase: SendPhase) -> bool:
    return phase in (SendPhase.COMPLETED, SendPhase.CANCELLED, SendPhase.FAILED)
