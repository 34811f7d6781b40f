"""What a user asks of a migration: validated, plain data (CH's VmSendMigrationData)."""

from __future__ import annotations

from dataclasses import dataclass

from vmig.errors import ConfigError
from vmig.migration.policy import TimeoutStrategy
from vmig.proto import MAX_CONNECTIONS
from vmig.transport.address import Address, parse_url
from vmig.units import MiB

DEFAULT_DOWNTIME_MS = 300
DEFAULT_TIMEOUT_S = 3600
# Chunk = the unit of work on the shared queue and of acknowledgement. Each chunk
# costs a request, a range table and an acknowledgement (a few hundred microseconds
# of Python on both sides), so big chunks keep that overhead small: 16 MiB moved
# 1 GiB about 20% faster than 4 MiB over 2-4 connections here. Small iterations are
# cut finer (see MIN_CHUNK_BYTES) so that they still spread over every connection.
DEFAULT_CHUNK_BYTES = 16 * MiB
MIN_CHUNK_BYTES = 1 * MiB
MAX_ITERATIONS = 1000  # a safety net far beyond what a converging migration needs


@dataclass(frozen=True)
class SendParams:
    """Parameters of `vm.send-migration`."""

    destination_url: str
    connections: int = 1
    local: bool = False
    downtime_ms: int = DEFAULT_DOWNTIME_MS
    timeout_s: float = DEFAULT_TIMEOUT_S
    timeout_strategy: TimeoutStrategy = TimeoutStrategy.CANCEL
    verify_memory: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.timeout_strategy, TimeoutStrategy):
            try:
                strategy = TimeoutStrategy(self.timeout_strategy)
            except ValueError:
                raise ConfigError(f"timeout_strategy: must be 'cancel' or 'ignore', "
                                  f"got {self.timeout_strategy!r}") from None
            object.__setattr__(self, "timeout_strategy", strategy)

    def validate(self) -> Address:
        """Check every rule; return the parsed destination. ConfigError names the field."""
        try:
            address = parse_url(self.destination_url)
        except ConfigError as exc:
            raise ConfigError(f"destination_url: {exc}") from None
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ConfigError(f"connections: must be between 1 and {MAX_CONNECTIONS}, "
                              f"got {self.connections}")
        if self.connections > 1 and address.kind == "unix":
            raise ConfigError("connections: must be 1 with a unix: destination_url "
                              "(several connections need tcp:)")
        if self.connections > 1 and self.local:
            raise ConfigError("connections: must be 1 when local is true "
                              "(memory is shared, not copied)")
        if self.local and address.kind != "unix":
            raise ConfigError("local: needs a unix: destination_url (memory fds are passed "
                              "over a UNIX socket)")
        if self.downtime_ms < 0:
            raise ConfigError(f"downtime_ms: must be >= 0, got {self.downtime_ms}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ConfigError(f"chunk_bytes: must be a positive multiple of 4096, "
                              f"got {self.chunk_bytes}")
        return address
