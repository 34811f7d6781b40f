"""Live progress of a migration (what `vm.migration-info` shows) and its final summary."""

from __future__ import annotations

import enum
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class Phase(enum.StrEnum):
    """Where a migration is, on either side."""

    CONNECTING = "connecting"  #: opening connections, START/CONFIG
    PRECOPY = "precopy"  #: copying memory while the guest runs
    DOWNTIME = "downtime"  #: guest paused: last dirty pages, state, complete
    LISTENING = "listening"  #: receiver waits for the sender
    RECEIVING = "receiving"  #: receiver takes memory and state
    COMPLETED = "completed"  #: the destination runs the VM
    FAILED = "failed"  #: ended without handing over; see `error`


class MigrationProgress:
    """Counters updated by the migration threads and read by the API; thread-safe."""

    def __init__(self, role: str, memory_bytes: int = 0, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.role = role
        self.phase = Phase.LISTENING if role == "receive" else Phase.CONNECTING
        self.started_at = clock()
        self.memory_bytes = memory_bytes
        self.iteration = 0
        self.bytes_transferred = 0
        self.bytes_remaining = memory_bytes
        self.dirty_rate_bytes_per_s = 0.0
        self.throughput_bytes_per_s = 0.0
        self.expected_downtime_ms: float | None = None
        self.connections = 0
        self.migration_id: str | None = None
        self.receiver_state: str | None = None
        self.error: str | None = None
        self.warnings: list[str] = []

    def update(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, value)

    def add_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_transferred += nbytes
            self.bytes_remaining = max(self.bytes_remaining - nbytes, 0)

    def warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)

    def snapshot(self) -> dict[str, Any]:
        """A consistent JSON-able view of the counters."""
        with self._lock:
            elapsed = self._clock() - self.started_at
            return {
                "role": self.role,
                "phase": self.phase.value,
                "iteration": self.iteration,
                "elapsed_s": round(elapsed, 3),
                "memory_bytes": self.memory_bytes,
                "bytes_transferred": self.bytes_transferred,
                "bytes_remaining": self.bytes_remaining,
                "dirty_rate_bytes_per_s": round(self.dirty_rate_bytes_per_s),
                "throughput_bytes_per_s": round(self.throughput_bytes_per_s),
                "expected_downtime_ms": _finite_or_none(self.expected_downtime_ms),
                "connections": self.connections,
                "migration_id": self.migration_id,
                "receiver_state": self.receiver_state,
                "error": self.error,
                "warnings": list(self.warnings),
            }


@dataclass
class MigrationSummary:
    """What `vm.send-migration` returns once the migration is over."""

    status: str
    connections: int
    iterations: int
    bytes_sent: int
    duration_ms: float
    downtime_ms: float
    throughput_bytes_per_s: float
    memory_verified: bool = False
    heartbeat_at_pause: int | None = None  # the guest's heartbeat when the source stopped
    local: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_ms"] = round(self.duration_ms, 1)
        data["downtime_ms"] = round(self.downtime_ms, 1)
        data["throughput_bytes_per_s"] = round(self.throughput_bytes_per_s)
        return data


def _finite_or_none(value: float | None) -> float | None:
    """`value` to 0.1, or None when unknown or not measured yet (JSON has no infinity)."""
    return None if value is None or not math.isfinite(value) else round(value, 1)
