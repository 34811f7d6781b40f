"""Protocol events: what the drivers in vmig.proto.connection take and return.

Requests (`Start`, `Config`, `MemoryFd`, `State`, `Complete`, `Abandon`) are
the same objects on both sides: the sender passes them to
`SenderConnection.send()` and the receiver gets equal ones from
`ReceiverConnection.next_event()`. MEMORY is the exception, because its page
bytes never go through the core: the sender sends `Memory(ranges)` and writes
the pages itself; the receiver gets `MemoryRequest(ranges, payload_bytes)`, then
the pages (`PayloadData` events, or straight into guest memory followed by
`payload_received()`), then `EndOfPayload`. The receiver answers with `Ok` or
`Error`; the sender reads those back as `Response`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, TypeAlias

from vmig.proto.wire import PROTOCOL_VERSION, Command, MemoryFlags, StartFlags, Status
from vmig.ranges import RangeTable

__all__ = [
    "NEED_DATA",
    "Abandon",
    "Cancel",
    "Complete",
    "Config",
    "ConnectionClosed",
    "EndOfPayload",
    "Error",
    "Memory",
    "MemoryFd",
    "MemoryRequest",
    "NeedData",
    "Ok",
    "PayloadData",
    "Ping",
    "Postcopy",
    "ReceiverEvent",
    "Repeated",
    "Request",
    "Response",
    "SenderEvent",
    "Start",
    "State",
]


class NeedData(Enum):
    """Type of the `NEED_DATA` sentinel."""

    #: `next_event()` cannot finish an event with the bytes it has; feed more.
    NEED_DATA = "NEED_DATA"


#: Returned by `next_event()` when more bytes are needed (see `bytes_wanted()`).
NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, kw_only=True)
class Start:
    """START: opens a migration on the MAIN connection.

    `connections` counts all connections including MAIN; `flags` selects LOCAL
    (memory by fd) and VERIFY_MEMORY (COMPLETE carries a digest).
    """

    migration_id: bytes
    connections: int = 1
    flags: StartFlags = StartFlags.NONE
    version: int = PROTOCOL_VERSION
    #: Version 3: how long the sender re-dials a lost connection (the receiver keeps the
    #: migration that long), and after how long a silent peer is lost; 0 before.
    reconnect_timeout_s: int = 0
    dead_peer_timeout_s: int = 0

    @property
    def local(self) -> bool:
        """Memory is shared by fd (MEMORY_FD) instead of copied."""
        return bool(self.flags & StartFlags.LOCAL)

    @property
    def verify_memory(self) -> bool:
        """COMPLETE carries a memory digest the receiver should check."""
        return bool(self.flags & StartFlags.VERIFY_MEMORY)

    @property
    def compress(self) -> bool:
        """MEMORY requests may carry zstd frames."""
        return bool(self.flags & StartFlags.COMPRESS)

    @property
    def postcopy(self) -> bool:
        """The sender may switch to post-copy; a FAULT connection comes with START."""
        return bool(self.flags & StartFlags.POSTCOPY)


@dataclass(frozen=True)
class Config:
    """CONFIG: the VM configuration as UTF-8 JSON, opaque to the protocol."""

    data: bytes


@dataclass(frozen=True)
class MemoryFd:
    """MEMORY_FD: the fd for memory slot `slot` backs ``[gpa, gpa + size)``.

    The fd travels as SCM_RIGHTS ancillary data next to this request; the I/O
    layer attaches and collects it.
    """

    slot: int
    gpa: int
    size: int


@dataclass(frozen=True)
class Memory:
    """MEMORY, sender side: announce `ranges`; the caller then sends their page bytes.

    With `MemoryFlags.ZERO` no bytes follow (the ranges are zero now); with
    `MemoryFlags.ZSTD` the caller sends `compressed_bytes` bytes: one zstd frame
    of the ranges' bytes (START must have set COMPRESS).
    """

    ranges: RangeTable
    flags: MemoryFlags = MemoryFlags.NONE
    compressed_bytes: int = 0

    @property
    def payload_bytes(self) -> int:
        """Bytes the caller must send after the header and table."""
        if self.flags & MemoryFlags.ZERO:
            return 0
        if self.flags & MemoryFlags.ZSTD:
            return self.compressed_bytes
        return self.ranges.total_bytes


@dataclass(frozen=True)
class MemoryRequest:
    """MEMORY, receiver side: `payload_bytes` bytes for `ranges` follow.

    Plain: the page bytes of the ranges, in order. ZERO: nothing (the ranges now
    read as zeros). ZSTD: one zstd frame that decompresses to the page bytes.
    """

    ranges: RangeTable
    payload_bytes: int
    flags: MemoryFlags = MemoryFlags.NONE


@dataclass(frozen=True)
class PayloadData:
    """Page bytes of the current MEMORY request that arrived through `receive_data()`.

    `offset` is where `data` starts in the request's page-byte stream (see
    `RangeTable.slice_bytes`).
    """

    data: bytes
    offset: int


@dataclass(frozen=True)
class EndOfPayload:
    """All page bytes of the current MEMORY request are in; answer it now."""


@dataclass(frozen=True)
class Postcopy:
    """POSTCOPY: switch to post-copy; `ranges` are the pages the destination still lacks.

    The destination resumes the guest at once and gets those pages on demand (the
    FAULT connection) and in the background (MEMORY), until COMPLETE.
    """

    ranges: RangeTable


@dataclass(frozen=True)
class State:
    """STATE: vCPU and device state as UTF-8 JSON, opaque to the protocol."""

    data: bytes


@dataclass(frozen=True)
class Complete:
    """COMPLETE: hand over; `data` is empty or UTF-8 JSON (e.g. a memory digest)."""

    data: bytes = b""


@dataclass(frozen=True)
class Abandon:
    """ABANDON: the sender gives up; `reason` is for logs (cut to 4 KiB on the wire).
    `cancelled`: an operator cancelled it at the source, rather than a failure."""

    reason: str = ""
    cancelled: bool = False


@dataclass(frozen=True)
class Ping:
    """PING (version 3, MAIN): the heartbeat; answered OK, changes nothing."""


@dataclass(frozen=True)
class Repeated:
    """Receiver: a request re-sent on a resumed MAIN that was already answered (its
    sequence number is one of the last two answered: a request and an ABANDON queued
    behind it); `answer_repeat()` gives the same answer."""

    command: Command
    seq: int


@dataclass(frozen=True)
class Ok:
    """Receiver's answer: the request was applied."""


@dataclass(frozen=True)
class Error:
    """Receiver's answer: the request failed; the migration is aborted."""

    message: str


@dataclass(frozen=True)
class Cancel:
    """Receiver's unprompted end: the migration is cancelled here, for `message`.

    Allowed at any point on MAIN, with or without a request waiting for its answer;
    the connection is dead afterwards.
    """

    message: str


@dataclass(frozen=True)
class Response:
    """A response as the sender reads it; `command` is the request it answers."""

    status: Status
    message: str = ""
    command: Command = Command.INVALID

    @property
    def ok(self) -> bool:
        """True for Status.OK."""
        return self.status is Status.OK

    @property
    def cancelled(self) -> bool:
        """True when the receiver cancelled the migration."""
        return self.status is Status.CANCELLED


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection between messages (EOF at a boundary)."""


#: Requests as `SenderConnection.send()` takes them.
Request: TypeAlias = (Start | Config | MemoryFd | Memory | State | Postcopy | Complete
                      | Abandon | Ping)
#: What `ReceiverConnection.next_event()` returns.
ReceiverEvent: TypeAlias = (
    Start
    | Config
    | MemoryFd
    | MemoryRequest
    | PayloadData
    | EndOfPayload
    | State
    | Postcopy
    | Complete
    | Abandon
    | Ping
    | Repeated
    | ConnectionClosed
    | Literal[NeedData.NEED_DATA]
)
#: What `SenderConnection.next_event()` returns.
SenderEvent: TypeAlias = Response | ConnectionClosed | Literal[NeedData.NEED_DATA]
