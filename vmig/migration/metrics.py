"""One metrics object per migration; the summary and `vm.migration-info` are views of it.

`MigrationMetrics` is what the sender or the receiver updates as it works and
what the API reads meanwhile (thread-safe). `view()` renders it: `vm.migration-info`
is the view (plus "active" and "outcome"), a send's summary is the view at the end, and the
Prometheus metrics and events (vmig.api) read the same object, so no figure is
copied by hand from one to another. Which figures the view has, their types, units and
libvirt's names for them, is `vmig.migration.figures` (the API models come from it too).
Each rate is defined once, here:

- ``throughput_bytes_per_s``: bytes transferred / elapsed time, over the whole migration;
- ``bandwidth_bytes_per_s``: the send rate the pre-copy policy measures per iteration;
- ``dirty_rate_bytes_per_s``: how fast the guest dirties memory (sender only);
- ``pages_per_s``: pages transferred / elapsed time;
- ``progress_percent``: data processed / (processed + remaining), the highest so far.

The clock stops when the migration ends, so a finished migration reads the same
every time. Figures one side cannot know are absent (None), not zero.

Observers (`subscribe`) hear of what happens, with the view at that moment: the
receiver's "started" (a source connected), each pre-copy "iteration" (QMP's
MIGRATION_PASS, with that pass's figures under "last_iteration"), a "stalled" pre-copy
(with what was done, under "stall"), "switchover", "postcopy", the sender's
"parameters-changed" (vm.migration-set-parameters, with the values under "changed"),
and the ending,
"completed", "cancelled" or "failed", announced once by `finish()`, when the side has its
last figures (the downtime, say).
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmig.migration.figures import POSTCOPY, SUMMARY_FIGURES
from vmig.units import PAGE_SIZE

__all__ = ["ConnectionMetrics", "MigrationMetrics", "Observer", "Phase", "Status"]

log = logging.getLogger(__name__)

#: The highest `progress_percent` before the migration has completed.
_BELOW_DONE = 99.9

#: Hears (event, properties): the view, plus the event's own figures.
Observer = Callable[[str, dict[str, Any]], None]


class Phase(enum.StrEnum):
    """Where a migration is, on either side."""

    LISTENING = "listening"  #: receiver: waiting for an authenticated source
    CONNECTING = "connecting"  #: sender: connections, handshake, START, CONFIG
    PRECOPY = "precopy"  #: sender: copying memory while the guest runs
    RECEIVING = "receiving"  #: receiver: taking memory and state
    POSTCOPY = "postcopy"  #: the destination runs the guest; its last pages follow
    #: post-copy with a connection down: both sides wait for it (vCPUs that need a missing
    #: page wait too) and go on when it is back; nothing is rolled back
    POSTCOPY_PAUSED = "postcopy-paused"
    SWITCHOVER = "switchover"  #: sender: guest paused; last pages and state (cancellable)
    COMPLETING = "completing"  #: sender: COMPLETE sent, the point of no return
    COMPLETED = "completed"  #: the destination runs (or holds, paused) the VM
    CANCELLED = "cancelled"  #: cancelled on either side; the source keeps the VM
    FAILED = "failed"  #: ended without handing over; see `error`

    @property
    def final(self) -> bool:
        return self in (Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED)


class Status(enum.StrEnum):
    """The coarse status, as QEMU's query-migrate names it."""

    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


_STATUS = {
    Phase.LISTENING: Status.SETUP, Phase.CONNECTING: Status.SETUP,
    Phase.PRECOPY: Status.ACTIVE, Phase.RECEIVING: Status.ACTIVE,
    Phase.SWITCHOVER: Status.ACTIVE, Phase.COMPLETING: Status.ACTIVE,
    Phase.POSTCOPY: Status.POSTCOPY_ACTIVE, Phase.POSTCOPY_PAUSED: Status.POSTCOPY_PAUSED,
    Phase.COMPLETED: Status.COMPLETED, Phase.CANCELLED: Status.CANCELLED,
    Phase.FAILED: Status.FAILED,
}
#: The phases observers hear of as they begin (the final ones come from `finish`).
_PHASE_EVENTS = {Phase.RECEIVING: "started", Phase.SWITCHOVER: "switchover",
                 Phase.POSTCOPY: "postcopy", Phase.POSTCOPY_PAUSED: "postcopy-paused"}


@dataclass
class ConnectionMetrics:
    """What went over one connection (QEMU's multifd counters)."""

    index: int
    role: str
    bytes: int = 0
    chunks: int = 0
    #: Why the connection was lost mid-migration, if it was.
    lost: str | None = None


class MigrationMetrics:
    """Counters of one migration, updated by its threads and read by the API."""

    def __init__(self, role: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.role = role  # "send" or "receive"
        self.phase = Phase.LISTENING if role == "receive" else Phase.CONNECTING
        self.started_at = clock()
        self.ended_at: float | None = None
        self.migration_id: str | None = None
        self.peer: str | None = None  # the destination (sender) or the source (receiver)
        self.local = False
        self.memory_bytes = 0
        #: Memory that holds data when the migration starts: what the first pass sends.
        self.data_bytes: int | None = None
        self.bytes_transferred = 0
        self.precopy_bytes = 0
        self.switchover_bytes = 0
        self.bytes_remaining: int | None = None
        self.normal_pages = 0
        self.zero_pages = 0
        #: Page payload bytes on the wire (compressed ones as compressed).
        self.wire_bytes = 0
        #: The chunks that went compressed: their bytes on the wire, and their pages.
        self.compressed_bytes = 0
        self.compressed_pages = 0
        #: The highest progress reported so far (`progress_percent` never goes back).
        self._progress_high: float | None = None
        self.iterations: int | None = 0 if role == "send" else None
        self.bandwidth_bytes_per_s: float | None = None
        self.dirty_rate_bytes_per_s: float | None = None
        self.expected_downtime_ms: float | None = None
        self.setup_ms: float | None = None
        self.paused_at: float | None = None
        self.downtime_ms: float | None = None
        #: The VM was paused when the migration began and stays paused at the destination.
        self.vm_paused = False
        self.memory_verified = False
        self.heartbeat_at_pause: int | None = None
        self.receiver_state: str | None = None
        self.max_bandwidth_bytes_per_s: int | None = None
        #: Post-copy: pages owed at the switch, still missing, faults answered, latency.
        self.postcopy_pages: int | None = None
        self.postcopy_pages_left: int | None = None
        self.faults_served = 0
        #: Receiver: the remote faults' latency figures (PostcopyService.latency_figures),
        #: read live at each view while post-copy runs, then frozen (`fault_latency`).
        self.fault_latency_source: Callable[[], dict[str, Any]] | None = None
        self.fault_latency: dict[str, Any] | None = None
        self.throttle_percent: int | None = 0 if role == "send" else None
        #: Sender: the parameters a running send may change, as they are now.
        self.parameters: dict[str, Any] | None = None
        self.connections: list[ConnectionMetrics] = []
        #: Connections down and being re-dialled (protocol version 3): index -> figures.
        self._reconnecting: dict[int, dict[str, Any]] = {}
        #: Connections resumed so far.
        self.reconnects = 0
        self.warnings: list[str] = []
        self.error: str | None = None
        #: Sender: why pre-copy ended (policy.Switchover's value); None before, or local.
        self.switchover: str | None = None
        #: Sender: the last stall found (`stalled`), None while there was none.
        self.stall: dict[str, Any] | None = None
        #: How the side's run ended once it has settled (`settle`): "completed", "cancelled"
        #: or "failed"; None while it runs. vm.migration-info shows it beside the view.
        self.outcome: str | None = None
        #: The last pre-copy pass (`iteration_done`), None before the first.
        self.last_iteration: dict[str, Any] | None = None
        self._observers: list[Observer] = []
        self._announced_end = False

    # --- observers -----------------------------------------------------------------------

    def subscribe(self, observer: Observer) -> None:
        """Call `observer(event, properties)` on every event from now on (on the thread that
        caused it, never under this object's lock). An observer that raises is logged."""
        with self._lock:
            self._observers.append(observer)

    def _notify(self, event: str, **extra: Any) -> None:
        with self._lock:
            observers = list(self._observers)
        if not observers:
            return
        properties = {**self.view(), **extra}
        for observer in observers:
            try:
                observer(event, properties)
            except Exception:
                log.exception("migration event observer failed on %r", event)

    # --- updates (any thread) ------------------------------------------------------------

    def update(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                if not hasattr(self, name):
                    raise AttributeError(f"MigrationMetrics has no {name!r}")
                setattr(self, name, value)

    def set_phase(self, phase: Phase) -> None:
        with self._lock:
            if self.phase.final or self.phase is phase:
                return  # the first ending stands
            was = self.phase
            self.phase = phase
            now = self._clock()
            if phase is Phase.SWITCHOVER and self.paused_at is None:
                self.paused_at = now
            if phase.final:
                self.ended_at = now
        event = _PHASE_EVENTS.get(phase)
        if phase is Phase.POSTCOPY and was is Phase.POSTCOPY_PAUSED:
            event = "postcopy-resumed"
        if event is not None:
            self._notify(event)

    def iteration_done(self, iteration: int, nbytes: int, seconds: float,
                       decision: str | None = None, reason: str | None = None
                       ) -> dict[str, Any]:
        """A pre-copy pass sent `nbytes` in `seconds` and the policy decided; tell the
        observers ("iteration"). Returns the pass's figures (also the log line's extras)."""
        with self._lock:
            figures = {
                "iteration": iteration, "bytes": nbytes, "seconds": round(seconds, 3),
                "rate_bytes_per_s": round(nbytes / seconds) if seconds > 0 else None,
                "dirty_rate_bytes_per_s": _round(self.dirty_rate_bytes_per_s, 0),
                "bytes_remaining": self.bytes_remaining,
                "elapsed_s": round(self.elapsed_s(), 3),
                "decision": decision, "reason": reason,
            }
            self.last_iteration = figures
        self._notify("iteration", last_iteration=figures)
        return figures

    def parameters_changed(self, changed: dict[str, Any], current: dict[str, Any]) -> None:
        """vm.migration-set-parameters changed `changed`; `current` are the values now in
        force. Observers hear "parameters-changed" (with `changed`)."""
        with self._lock:
            self.parameters = dict(current)
        self._notify("parameters-changed", changed=dict(changed))

    def stalled(self, figures: dict[str, Any]) -> None:
        """Pre-copy stalled (`figures`: the action taken and why); tell the observers
        ("stalled")."""
        with self._lock:
            self.stall = dict(figures)
        self._notify("stalled", stall=dict(figures))

    def open_connections(self, roles: list[str]) -> None:
        with self._lock:
            self.connections = [ConnectionMetrics(i, role) for i, role in enumerate(roles)]

    def transferred(self, index: int, nbytes: int, *, covered: int | None = None,
                    zero_pages: int = 0, wire: int | None = None) -> None:
        """A chunk went over connection `index` and was acknowledged: `nbytes` page bytes
        sent (`wire` of them on the wire, if compressed), `zero_pages` skipped or sent as
        zero ranges, `covered` bytes of guest memory done in all (default `nbytes`)."""
        with self._lock:
            if self.setup_ms is None:
                self.setup_ms = (self._clock() - self.started_at) * 1000
            self.bytes_transferred += nbytes
            self.wire_bytes += nbytes if wire is None else wire
            if wire is not None and wire < nbytes:  # a chunk that went compressed
                self.compressed_bytes += wire
                self.compressed_pages += nbytes // PAGE_SIZE
            if self.paused_at is None:
                self.precopy_bytes += nbytes
            else:
                self.switchover_bytes += nbytes
            self.normal_pages += nbytes // PAGE_SIZE
            self.zero_pages += zero_pages
            done = nbytes if covered is None else covered
            if self.bytes_remaining is not None:
                self.bytes_remaining = max(self.bytes_remaining - done, 0)
            while len(self.connections) <= index:
                self.connections.append(ConnectionMetrics(len(self.connections), "memory"))
            connection = self.connections[index]
            connection.bytes += nbytes
            connection.chunks += 1

    def connection_lost(self, index: int, reason: str) -> None:
        with self._lock:
            if index < len(self.connections):
                self.connections[index].lost = reason

    def reconnecting(self, index: int, role: str, cause: str) -> None:
        """Connection `index` was lost and is being re-dialled ("reconnecting")."""
        with self._lock:
            self._reconnecting[index] = {"index": index, "role": role, "cause": cause,
                                         "since": self._clock()}
        self._notify("reconnecting", connection=index, connection_role=role, cause=cause)

    def reconnected(self, index: int) -> None:
        """Connection `index` is back, resumed ("reconnected")."""
        with self._lock:
            down = self._reconnecting.pop(index, None)
            self.reconnects += 1
            seconds = None if down is None else round(self._clock() - down["since"], 3)
        self._notify("reconnected", connection=index, outage_s=seconds)

    def warn(self, message: str) -> None:
        with self._lock:
            if message not in self.warnings:
                self.warnings.append(message)

    def finish(self, phase: Phase, error: str | None = None) -> None:
        """End the migration: the clock stops; the first ending stands (`set_phase` may
        have ended it already). The observers hear of the ending once, here."""
        with self._lock:
            if self._announced_end:
                return
            self._announced_end = True
            if not self.phase.final:
                self.phase = phase
                self.ended_at = self._clock()
                if error is not None:
                    self.error = error
                if phase is Phase.COMPLETED:
                    self.bytes_remaining = 0
            event = self.phase.value
        self._notify(event)

    def settle(self, error: str | None = None) -> None:
        """The run is over and its side has settled (the VM handed over, or running here
        again): the outcome is the final phase, or "failed" with `error`, the one-line
        reason a run that raised gave (it replaces `error`)."""
        if error is not None:
            self.finish(Phase.FAILED, error=error)  # a run that raised before it ended
        with self._lock:
            if error is not None:
                self.error = error
            self.outcome = Phase.FAILED.value if error is not None else self.phase.value

    def end_downtime(self) -> None:
        """The guest runs again, at the destination: COMPLETE (or POSTCOPY) was
        acknowledged. The pause ends once; a later call changes nothing."""
        with self._lock:
            if self.paused_at is not None and not self.vm_paused and self.downtime_ms is None:
                self.downtime_ms = (self._clock() - self.paused_at) * 1000

    # --- views ------------------------------------------------------------------------------

    @property
    def connections_lost(self) -> int:
        return sum(1 for c in self.connections if c.lost is not None)

    def elapsed_s(self) -> float:
        end = self.ended_at if self.ended_at is not None else self._clock()
        return max(end - self.started_at, 0.0)

    def view(self) -> dict[str, Any]:
        """Every figure of `SUMMARY_FIGURES`, in its order, JSON-able: vm.migration-info and
        the send's summary. A figure is the attribute of its name, unless `_derived` has it."""
        with self._lock:
            derived = self._derived()
            return {figure.name: derived[figure.name] if figure.name in derived
                    else getattr(self, figure.name) for figure in SUMMARY_FIGURES}

    def _derived(self) -> dict[str, Any]:
        """The figures computed from the counters (under the lock)."""
        elapsed = self.elapsed_s()
        pages = self.normal_pages
        sender = self.role == "send"  # only the sender knows when the guest paused
        processed, remaining = self._data_processed(), self._data_remaining()
        rate = self.bandwidth_bytes_per_s or (self.bytes_transferred / elapsed
                                              if elapsed > 0 else None)
        return {
            "status": _STATUS[self.phase].value,
            "phase": self.phase.value,
            "progress_percent": self._progress_percent(processed, remaining),
            "elapsed_ms": round(elapsed * 1000, 1),
            "expected_remaining_ms": (None if remaining is None else 0.0 if remaining == 0
                                      else _round(remaining / rate * 1000) if rate else None),
            "setup_ms": _round(self.setup_ms),
            "downtime_ms": _round(self.downtime_ms),
            "expected_downtime_ms": _round(self.expected_downtime_ms),
            "paused": self.vm_paused,
            "data_total_bytes": None if remaining is None else processed + remaining,
            "data_processed_bytes": processed,
            "data_remaining_bytes": remaining,
            "precopy_bytes": self.precopy_bytes if sender else None,
            "switchover_bytes": self.switchover_bytes if sender else None,
            "pages_per_s": round(pages / elapsed) if elapsed > 0 else None,
            "throughput_bytes_per_s": (round(self.bytes_transferred / elapsed)
                                       if elapsed > 0 else None),
            "bandwidth_bytes_per_s": _round(self.bandwidth_bytes_per_s, 0),
            "dirty_rate_bytes_per_s": _round(self.dirty_rate_bytes_per_s, 0),
            "dirty_rate_pages_per_s": (None if self.dirty_rate_bytes_per_s is None else
                                       _round(self.dirty_rate_bytes_per_s / PAGE_SIZE)),
            "parameters": None if self.parameters is None else dict(self.parameters),
            "postcopy": None if self.postcopy_pages is None else self._postcopy_view(),
            "connections": len(self.connections),
            "connections_lost": self.connections_lost,
            "reconnecting": [
                {"index": r["index"], "role": r["role"], "cause": r["cause"],
                 "for_s": round(self._clock() - r["since"], 3)}
                for r in self._reconnecting.values()],
            "per_connection": [
                {"index": c.index, "role": c.role, "bytes": c.bytes, "chunks": c.chunks,
                 "lost": c.lost} for c in self.connections],
            "stall": None if self.stall is None else dict(self.stall),
            "warnings": list(self.warnings),
        }

    def _postcopy_view(self) -> dict[str, Any]:
        """The `postcopy` object: the pages and faults, and the receiver's fault latency
        (live from its source while post-copy runs; absent ones at their defaults)."""
        source = self.fault_latency_source
        latency = source() if source is not None else self.fault_latency or {}
        figures = {"pages": self.postcopy_pages, "pages_left": self.postcopy_pages_left,
                   "faults_served": self.faults_served, **latency}
        return {figure.name: figures.get(figure.name, _empty(figure.default))
                for figure in POSTCOPY.figures}

    # --- progress (libvirt's data figures, and a percentage that never goes back) -----------

    def _data_processed(self) -> int:
        """Guest memory dealt with: page bytes acknowledged plus the zero pages found (what
        `bytes_remaining` is counted down by)."""
        return self.bytes_transferred + self.zero_pages * PAGE_SIZE

    def _data_remaining(self) -> int | None:
        """Memory still to deal with; None where this side cannot know it."""
        if self.phase is Phase.COMPLETED:
            return 0
        if self.postcopy_pages_left is not None:  # switched to post-copy: the owed pages
            return self.postcopy_pages_left * PAGE_SIZE
        if self.bytes_remaining is not None:
            return self.bytes_remaining
        return self.data_bytes  # before the first pass: all the data is to send

    def _progress_percent(self, processed: int, remaining: int | None) -> float | None:
        """processed / (processed + remaining), as a percentage below 100 until completed,
        and never below what was reported before: the guest dirtying pages grows what is
        left, and a progress bar must not run backwards (KubeVirt #10722)."""
        if self.phase is Phase.COMPLETED:
            self._progress_high = 100.0
        elif remaining is not None and processed + remaining > 0:
            percent = min(processed / (processed + remaining) * 100, _BELOW_DONE)
            self._progress_high = max(self._progress_high or 0.0, percent)
        elif self.role == "send":  # setting up, the memory not measured yet: none done
            self._progress_high = 0.0
        return None if self._progress_high is None else round(self._progress_high, 1)


def _empty(default: Any) -> Any:
    """A figure's value when unknown: its default (a list for a tuple)."""
    return list(default) if isinstance(default, tuple) else default


def _round(value: float | None, digits: int = 1) -> float | None:
    """`value` rounded, or None when unknown or not finite (JSON has no infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits) if digits else float(round(value))
