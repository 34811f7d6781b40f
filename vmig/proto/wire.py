"""The migration wire format: constants, struct layouts, header encode/decode.

Everything is little-endian. docs/protocol.md is the full write-up; this is
the reference card.

Connections
-----------
The sender opens one MAIN connection and ``connections - 1`` extra MEMORY
connections to the receiver's one listening address. Each connection starts
with a 32-byte *hello*, so one listener can sort incoming sockets::

    offset size  field
    0      8     magic          b"VMIGCONN"
    8      2     role           ConnectionRole: MAIN=1, MEMORY=2 (0 INVALID)
    10     2     version        the sender's PROTOCOL_VERSION
    12     4     reserved       zero
    16     16    migration id   random; the same on every connection of a migration

The receiver answers every hello with a response: ERROR with a reason (then it
closes), or OK with ``u32 method, u32 reserved, 16-byte nonce`` (method NONE: the
channel, TLS or a UNIX socket, authenticated the peer; TOKEN: the sender must
send AUTH with its nonce and an HMAC proof, which the receiver answers with OK and
its own proof, or ERROR). vmig.proto.handshake has the exchange. After that, the
sender sends *requests*; the receiver answers each with exactly one *response*,
in order.

Request (16-byte header, then ``length`` payload bytes)::

    0   2   command          Command (u16)
    2   6   command headers  per command; zero unless listed below
    8   8   length           payload bytes that follow (u64)

Response (16-byte header, then ``length`` payload bytes)::

    0   2   status           Status: OK=1, ERROR=2 (0 INVALID)
    2   6   padding          zero
    8   8   length           payload bytes: the UTF-8 error message (<= 4 KiB)

Commands and their payloads::

    START=1      payload: u32 version, u32 flags (bit0 LOCAL, bit1 VERIFY_MEMORY,
                 bit2 COMPRESS),
                 16-byte migration id, u32 connections, u32 reserved zero (32 bytes)
    CONFIG=2     payload: UTF-8 JSON object, opaque here (<= 1 MiB)
    STATE=3      payload: UTF-8 JSON, opaque here (<= 16 MiB)
    MEMORY=4     headers: u32 range count, u16 flags (bit0 ZERO, bit1 ZSTD);
                 payload: count x (u64 gpa, u64 length), then the page bytes of
                 those ranges in table order; length == 16*count + sum(lengths);
                 ZERO: no page bytes (the ranges are zeros now); ZSTD: one zstd
                 frame of the page bytes instead (START set COMPRESS);
                 every gpa and length 4 KiB aligned, lengths > 0
    COMPLETE=5   payload: empty or UTF-8 JSON (e.g. {"memory_digest": ...}; <= 1 MiB)
    ABANDON=6    payload: empty or a UTF-8 reason (<= 4 KiB)
    MEMORY_FD=7  headers: u32 slot, u16 reserved zero; payload: u64 gpa, u64 size;
                 the fd itself rides along as SCM_RIGHTS data (LOCAL mode only)
    AUTH=8       handshake only: payload 16-byte sender nonce, 32-byte proof
    INVALID=0    reserved; always rejected

Command sequence on MAIN (each request answered OK before the next is sent)::

    hello(MAIN)
    START -> OK
    [MEMORY_FD -> OK]*                          LOCAL mode only
    CONFIG -> OK                                receiver builds the VM
    [MEMORY -> OK]*                             pre-copy iterations, source running
    STATE -> OK                                 source paused; device and vCPU state
    COMPLETE -> OK                              receiver resumes the VM
    ABANDON -> OK                               allowed at any point instead

On a MEMORY connection: hello(MEMORY), then ``[MEMORY -> OK]*`` (pipelined:
several requests may be in flight; responses come back in order), ABANDON allowed.

Receiver states (vmig.proto.state.TRANSITIONS is the one copy of the rules)::

    ESTABLISHED -START-> STARTED -MEMORY_FD-> MEMORY_FDS_RECEIVED (-MEMORY_FD->)*
    STARTED | MEMORY_FDS_RECEIVED -CONFIG-> CONFIGURED (-MEMORY->)*
    CONFIGURED -STATE-> STATE_RECEIVED -COMPLETE-> COMPLETED
    any state but COMPLETED/ABORTED -ABANDON-> ABORTED
    STREAMING (-MEMORY->)*                      MEMORY connections

A request moves the receiver on when it answers OK; answering ERROR moves it to
ABORTED. Versioning: START carries the sender's version and the receiver accepts
`SUPPORTED_VERSIONS` (the current and the previous version) only.

Decoders here read the peer's bytes and raise `RemoteProtocolError`; encoders
are given our own values and raise `LocalProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import NamedTuple

import numpy as np

from vmig.proto.errors import LocalProtocolError, RemoteProtocolError
from vmig.ranges import RANGE_ENTRY_SIZE, RangeTable
from vmig.units import PAGE_SIZE, GiB, KiB, MiB

__all__ = [
    "AUTH_PAYLOAD_SIZE",
    "BLOB_LIMITS",
    "HEADER_SIZE",
    "HELLO_MAGIC",
    "HELLO_REPLY_SIZE",
    "HELLO_SIZE",
    "MAX_COMPLETE_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_CONNECTIONS",
    "MAX_MEMORY_PAYLOAD",
    "MAX_MESSAGE_SIZE",
    "MAX_RANGES_PER_REQUEST",
    "MAX_STATE_SIZE",
    "MEMORY_FD_PAYLOAD_SIZE",
    "MIGRATION_ID_SIZE",
    "NONCE_SIZE",
    "NO_HEADERS",
    "PROOF_SIZE",
    "PROTOCOL_VERSION",
    "RESUMABLE_VERSION",
    "SEQUENCED_COMMANDS",
    "START_PAYLOAD_SIZE",
    "SUPPORTED_VERSIONS",
    "AuthMethod",
    "Command",
    "ConnectionRole",
    "Hello",
    "MemoryFlags",
    "RequestHeader",
    "ResponseHeader",
    "StartFlags",
    "StartPayload",
    "Status",
    "check_version",
    "decode_auth",
    "decode_hello_reply",
    "decode_memory_fd_headers",
    "decode_memory_fd_payload",
    "decode_memory_headers",
    "decode_range_table",
    "decode_request_header",
    "decode_response_header",
    "decode_sequenced_headers",
    "decode_start_payload",
    "encode_auth",
    "encode_hello",
    "encode_hello_reply",
    "encode_memory_fd_headers",
    "encode_memory_fd_payload",
    "encode_memory_headers",
    "encode_request_header",
    "encode_response",
    "encode_response_header",
    "encode_sequenced_headers",
    "encode_start_payload",
    "encode_text",
    "parse_hello",
    "range_table_problem",
]

#: The version this code speaks; START and the hello carry it.
PROTOCOL_VERSION = 3
#: Versions a receiver accepts: the current one and the one before it (version 1 had no
#: authentication, and a receiver never takes an unauthenticated peer). docs/protocol.md,
#: "Versioning", has the promise.
SUPPORTED_VERSIONS = frozenset({2, 3})
#: The first version with resumable connections: the hello's index and resume count,
#: sequence numbers on MAIN, PING, and START's reconnect and dead-peer timeouts.
RESUMABLE_VERSION = 3


class Command(IntEnum):
    """Request type, the first u16 of a request header."""

    INVALID = 0
    START = 1
    CONFIG = 2
    STATE = 3
    MEMORY = 4
    COMPLETE = 5
    ABANDON = 6
    MEMORY_FD = 7
    #: Handshake only: the sender's token proof (see vmig.proto.handshake).
    AUTH = 8
    #: FAULT connection only, from the receiver: the pages a faulting guest needs now.
    FAULT = 9
    #: Switch to post-copy: the destination runs the guest while these pages come.
    POSTCOPY = 10
    #: Version 3, MAIN only: the heartbeat, answered OK in any state but a final one.
    PING = 11


class Status(IntEnum):
    """Response status, the first u16 of a response header."""

    INVALID = 0
    OK = 1
    ERROR = 2
    #: The receiver cancelled the migration (an operator asked it to). Like ERROR it
    #: ends the migration; it may come with no request outstanding, on MAIN only.
    CANCELLED = 3


class ConnectionRole(IntEnum):
    """What a connection carries; sent in its hello."""

    INVALID = 0
    #: The control connection: START ... COMPLETE, strictly one request at a time.
    MAIN = 1
    #: An extra data connection: MEMORY requests only (pipelined), or ABANDON.
    MEMORY = 2
    #: Post-copy's page-fault connection: the receiver asks for pages, the sender answers.
    FAULT = 3


class AuthMethod(IntEnum):
    """How a receiver authenticates a connection; named in its answer to the hello."""

    #: The channel itself is authenticated: mutual TLS, or a UNIX socket's file mode.
    NONE = 0
    #: Both sides prove they know a shared token: HMAC-SHA256 over both nonces.
    TOKEN = 1


class StartFlags(IntFlag):
    """Bits of START's flags word; unknown bits are rejected."""

    NONE = 0
    #: Memory is shared by fd (MEMORY_FD + SCM_RIGHTS), not copied: same-host mode.
    LOCAL = 1
    #: COMPLETE carries a digest of guest memory for the receiver to check.
    VERIFY_MEMORY = 2
    #: MEMORY requests may carry their page bytes as a zstd frame (MemoryFlags.ZSTD).
    COMPRESS = 4
    #: The sender may switch to post-copy (POSTCOPY); a FAULT connection comes with START.
    POSTCOPY = 8


_KNOWN_FLAGS = int(StartFlags.LOCAL | StartFlags.VERIFY_MEMORY | StartFlags.COMPRESS
                   | StartFlags.POSTCOPY)


class MemoryFlags(IntFlag):
    """Bits of a MEMORY request's u16 of command headers; unknown bits are rejected."""

    NONE = 0
    #: The ranges now read as zeros: no page bytes follow (the receiver discards them).
    ZERO = 1
    #: The page bytes follow as one zstd frame (START set COMPRESS).
    ZSTD = 2


_KNOWN_MEMORY_FLAGS = int(MemoryFlags.ZERO | MemoryFlags.ZSTD)


class AbandonFlags(IntFlag):
    """Bits of ABANDON's u16 of command headers (after a u32 0); unknown bits are rejected."""

    NONE = 0
    #: An operator cancelled the migration at the source (not a failure).
    CANCELLED = 1


def encode_abandon_headers(flags: AbandonFlags = AbandonFlags.NONE, seq: int = 0) -> bytes:
    """ABANDON command headers: u32 sequence number (0 before version 3), u16 flags."""
    return _pack(_MEMORY_HEADERS, "ABANDON headers", seq, int(flags))


def decode_abandon_headers(headers: bytes, *, sequenced: bool = False) -> AbandonFlags:
    """ABANDON's flags; an unknown flag (or a first word that is not 0 before version 3)
    is refused."""
    first, flags = _MEMORY_HEADERS.unpack(headers)
    if (first and not sequenced) or flags & ~int(AbandonFlags.CANCELLED):
        raise RemoteProtocolError(f"sender sent ABANDON with command headers {headers.hex()}")
    return AbandonFlags(flags)


#: Version 3: MAIN's requests but MEMORY carry a sequence number in their command headers
#: (``u32 seq, u16 extra``: ABANDON's flags, MEMORY_FD's slot, else 0), so a request
#: re-sent on a resumed MAIN is recognised and answered from the receiver's record.
SEQUENCED_COMMANDS = frozenset({Command.START, Command.CONFIG, Command.STATE,
                                Command.COMPLETE, Command.ABANDON, Command.MEMORY_FD,
                                Command.POSTCOPY, Command.PING})


def encode_sequenced_headers(seq: int, extra: int = 0) -> bytes:
    """Version 3 command headers of a MAIN request: u32 seq, u16 extra."""
    return _pack(_MEMORY_HEADERS, "command headers", seq, extra)


def decode_sequenced_headers(headers: bytes) -> tuple[int, int]:
    """``(seq, extra)`` of a version 3 MAIN request."""
    seq, extra = _MEMORY_HEADERS.unpack(headers)
    return seq, extra

# -- sizes and limits --------------------------------------------------------------

#: Request and response headers: u16 + 6 bytes + u64 (struct '<H6sQ').
HEADER_SIZE = 16
_HEADER = struct.Struct("<H6sQ")
#: The 6 command-header bytes of commands that use none.
NO_HEADERS = bytes(6)

#: Length of the random migration id in the hello and START.
MIGRATION_ID_SIZE = 16
_START = struct.Struct("<II16sIHH")
#: START payload: version, flags, migration id, connections, then (version 3; zero
#: before) u16 reconnect timeout and u16 dead-peer timeout, in seconds.
START_PAYLOAD_SIZE = _START.size
_MEMORY_HEADERS = struct.Struct("<IH")  # range count, flags
_MEMORY_FD_HEADERS = struct.Struct("<IH")  # slot, reserved
_MEMORY_FD_PAYLOAD = struct.Struct("<QQ")  # gpa, size
#: MEMORY_FD payload: u64 gpa, u64 size.
MEMORY_FD_PAYLOAD_SIZE = _MEMORY_FD_PAYLOAD.size

_HELLO = struct.Struct("<8sHHHH16s")
#: The connection preamble: magic, role, version, connection index, resume count (those
#: two zero before version 3), migration id.
HELLO_SIZE = _HELLO.size
HELLO_MAGIC = b"VMIGCONN"

#: Random bytes each side contributes to a token authentication (128 bits).
NONCE_SIZE = 16
#: An HMAC-SHA256 proof.
PROOF_SIZE = 32
_HELLO_REPLY = struct.Struct("<II16s")  # auth method, reserved, receiver nonce
#: Payload of the receiver's OK answer to a hello.
HELLO_REPLY_SIZE = _HELLO_REPLY.size
_AUTH = struct.Struct("<16s32s")  # sender nonce, sender proof
#: Payload of AUTH: the sender's nonce and proof.
AUTH_PAYLOAD_SIZE = _AUTH.size

#: Error messages and ABANDON reasons: a line or a short paragraph for a human.
MAX_MESSAGE_SIZE = 4 * KiB
#: CONFIG: a VM config JSON is a few KiB; 1 MiB leaves room without inviting abuse.
MAX_CONFIG_SIZE = 1 * MiB
#: STATE: vCPU registers and device state; generous for many vCPUs.
MAX_STATE_SIZE = 16 * MiB
#: COMPLETE: empty or a small JSON (memory digest).
MAX_COMPLETE_SIZE = 1 * MiB
#: Ranges in one MEMORY request: 16 MiB of table at most, which is a 1 GiB
#: payload as scattered single pages at worst (2**18 pages) with margin.
MAX_RANGES_PER_REQUEST = 1 << 20
#: Page bytes in one MEMORY request. Senders chunk far smaller (16 MiB by default,
#: one ack each); this bounds what a receiver commits to on one header.
MAX_MEMORY_PAYLOAD = 1 * GiB
#: Connections per migration (CH: MAX_MIGRATION_CONNECTIONS).
MAX_CONNECTIONS = 128

#: Payload limits of the commands whose payload is one opaque blob.
BLOB_LIMITS = {
    Command.CONFIG: MAX_CONFIG_SIZE,
    Command.STATE: MAX_STATE_SIZE,
    Command.COMPLETE: MAX_COMPLETE_SIZE,
    Command.ABANDON: MAX_MESSAGE_SIZE,
}

_U64_LIMIT = 1 << 64


class RequestHeader(NamedTuple):
    """A request header as read off the wire (command not yet checked)."""

    command: int
    command_headers: bytes
    length: int


class ResponseHeader(NamedTuple):
    """A checked response header."""

    status: Status
    length: int


class StartPayload(NamedTuple):
    """The fields of a START payload."""

    version: int
    flags: StartFlags
    migration_id: bytes
    connections: int
    reconnect_timeout_s: int = 0
    dead_peer_timeout_s: int = 0


@dataclass(frozen=True)
class Hello:
    """The connection preamble: which role this connection plays in which migration.

    Version 3: `index` is the connection's place (MAIN 0, MEMORY 1..N-1, FAULT 0), and
    `resume` counts its re-dials (0 on the first); a resumed hello asks the receiver to
    put this connection in the place of the lost one."""

    role: ConnectionRole
    migration_id: bytes
    version: int = PROTOCOL_VERSION
    index: int = 0
    resume: int = 0

    @property
    def resumed(self) -> bool:
        return self.resume > 0


def encode_text(text: str, limit: int = MAX_MESSAGE_SIZE) -> bytes:
    """UTF-8 encode `text`, cut to at most `limit` bytes on a character boundary."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def _pack(layout: struct.Struct, what: str, *values: object) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise LocalProtocolError(f"cannot encode {what} {values!r}: {exc}") from exc


# -- request and response headers ---------------------------------------------------


def encode_request_header(command: int, length: int, command_headers: bytes = NO_HEADERS) -> bytes:
    """The 16-byte request header. Raises LocalProtocolError on out-of-range values."""
    if len(command_headers) != 6:
        raise LocalProtocolError(f"command headers must be 6 bytes, not {len(command_headers)}")
    return _pack(_HEADER, "request header", command, command_headers, length)


def decode_request_header(data: bytes | bytearray | memoryview) -> RequestHeader:
    """Split 16 header bytes into command, command headers and payload length."""
    command, headers, length = _HEADER.unpack(data)
    return RequestHeader(command, headers, length)


def encode_response_header(status: Status, length: int = 0) -> bytes:
    """The 16-byte response header (padding zero)."""
    return _pack(_HEADER, "response header", int(status), NO_HEADERS, length)


def encode_response(status: Status, message: str = "") -> bytes:
    """A whole response: header plus the UTF-8 `message` cut to MAX_MESSAGE_SIZE."""
    payload = encode_text(message)
    return encode_response_header(status, len(payload)) + payload


def decode_response_header(data: bytes | bytearray | memoryview) -> ResponseHeader:
    """Check and split a 16-byte response header.

    Raises RemoteProtocolError on an unknown or INVALID status, non-zero padding
    or a payload longer than MAX_MESSAGE_SIZE.
    """
    status, padding, length = _HEADER.unpack(data)
    if status not in (Status.OK, Status.ERROR, Status.CANCELLED):
        raise RemoteProtocolError(f"receiver sent a response with invalid status {status}")
    if padding != NO_HEADERS:
        raise RemoteProtocolError(f"receiver sent a response with non-zero padding {padding!r}")
    if length > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(
            f"receiver sent a {length}-byte response payload; the limit is {MAX_MESSAGE_SIZE}"
        )
    return ResponseHeader(Status(status), length)


# -- command payloads and headers -----------------------------------------------------


def encode_start_payload(version: int, flags: int, migration_id: bytes, connections: int,
                         reconnect_timeout_s: int = 0, dead_peer_timeout_s: int = 0) -> bytes:
    """The 32-byte START payload. Raises LocalProtocolError on a bad id, connection
    count or unknown flags."""
    if len(migration_id) != MIGRATION_ID_SIZE:
        raise LocalProtocolError(f"migration id must be {MIGRATION_ID_SIZE} bytes")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise LocalProtocolError(
            f"cannot send START with {connections} connections; allowed are 1 to "
            f"{MAX_CONNECTIONS}"
        )
    if int(flags) & ~_KNOWN_FLAGS:
        raise LocalProtocolError(f"cannot send START with unknown flags {flags!r}")
    if version < RESUMABLE_VERSION and (reconnect_timeout_s or dead_peer_timeout_s):
        raise LocalProtocolError(f"protocol version {version} has no resume timeouts")
    return _pack(_START, "START payload", version, int(flags), migration_id, connections,
                 reconnect_timeout_s, dead_peer_timeout_s)


def decode_start_payload(data: bytes | bytearray | memoryview) -> StartPayload:
    """Parse a START payload. Raises RemoteProtocolError on unknown flags or reserved bits.

    The version is returned as sent; whether it is supported is the caller's call.
    """
    if len(data) != START_PAYLOAD_SIZE:
        raise RemoteProtocolError(
            f"sender sent a {len(data)}-byte START payload; expected {START_PAYLOAD_SIZE}"
        )
    version, flags, migration_id, connections, reconnect_s, dead_peer_s = _START.unpack(data)
    if version < RESUMABLE_VERSION and (reconnect_s or dead_peer_s):
        reserved = reconnect_s | dead_peer_s << 16
        raise RemoteProtocolError(f"sender sent START with reserved field {reserved:#x}")
    if flags & ~_KNOWN_FLAGS:
        raise RemoteProtocolError(f"sender sent START with unknown flags {flags:#x}")
    return StartPayload(version, StartFlags(flags), migration_id, connections, reconnect_s,
                        dead_peer_s)


def encode_memory_headers(count: int, flags: MemoryFlags = MemoryFlags.NONE) -> bytes:
    """MEMORY command headers: u32 range count, u16 flags."""
    return _pack(_MEMORY_HEADERS, "MEMORY headers", count, int(flags))


def decode_memory_headers(headers: bytes) -> tuple[int, MemoryFlags]:
    """The range count and flags of MEMORY command headers; unknown flags are refused."""
    count, flags = _MEMORY_HEADERS.unpack(headers)
    if flags & ~_KNOWN_MEMORY_FLAGS:
        raise RemoteProtocolError(f"sender sent MEMORY with unknown flags {flags:#x}")
    if flags == _KNOWN_MEMORY_FLAGS:
        raise RemoteProtocolError("sender sent MEMORY flagged both ZERO and ZSTD")
    return int(count), MemoryFlags(flags)


def encode_memory_fd_headers(slot: int) -> bytes:
    """MEMORY_FD command headers: u32 slot, u16 reserved zero."""
    return _pack(_MEMORY_FD_HEADERS, "MEMORY_FD headers", slot, 0)


def decode_memory_fd_headers(headers: bytes) -> int:
    """The slot of MEMORY_FD command headers; reserved bytes must be zero."""
    slot, reserved = _MEMORY_FD_HEADERS.unpack(headers)
    if reserved:
        raise RemoteProtocolError(f"sender sent MEMORY_FD with reserved header bits {reserved:#x}")
    return int(slot)


def _region_problem(gpa: int, size: int) -> str | None:
    if gpa % PAGE_SIZE or size % PAGE_SIZE:
        return f"region gpa={gpa:#x} size={size:#x} is not {PAGE_SIZE}-byte aligned"
    if size <= 0:
        return f"region gpa={gpa:#x} has size 0"
    if gpa < 0 or gpa + size > _U64_LIMIT:
        return f"region gpa={gpa:#x} size={size:#x} runs past the 64-bit address space"
    return None


def encode_memory_fd_payload(gpa: int, size: int) -> bytes:
    """MEMORY_FD payload: u64 gpa, u64 size of the region the fd backs."""
    problem = _region_problem(gpa, size)
    if problem:
        raise LocalProtocolError(f"cannot send MEMORY_FD: {problem}")
    return _pack(_MEMORY_FD_PAYLOAD, "MEMORY_FD payload", gpa, size)


def decode_memory_fd_payload(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(gpa, size)`` from a MEMORY_FD payload, checked for alignment and overflow."""
    if len(data) != MEMORY_FD_PAYLOAD_SIZE:
        raise RemoteProtocolError(
            f"sender sent a {len(data)}-byte MEMORY_FD payload; expected {MEMORY_FD_PAYLOAD_SIZE}"
        )
    gpa, size = _MEMORY_FD_PAYLOAD.unpack(data)
    problem = _region_problem(gpa, size)
    if problem:
        raise RemoteProtocolError(f"sender sent MEMORY_FD with a bad {problem}")
    return gpa, size


def range_table_problem(table: RangeTable,
                        payload_limit: int | None = MAX_MEMORY_PAYLOAD) -> str | None:
    """Why `table` cannot go in a MEMORY (or POSTCOPY: no payload limit) request, or None."""
    if len(table) > MAX_RANGES_PER_REQUEST:
        return f"{len(table)} ranges exceed the limit of {MAX_RANGES_PER_REQUEST}"
    if payload_limit is not None and table.total_bytes > payload_limit:
        return f"{table.total_bytes} page bytes exceed the limit of {payload_limit}"
    gpas, lengths = table.as_arrays()
    return _aligned_problem(gpas, lengths)


def _aligned_problem(gpas: np.ndarray, lengths: np.ndarray) -> str | None:
    mask = np.uint64(PAGE_SIZE - 1)
    bad = np.flatnonzero((gpas & mask) | (lengths & mask))
    if bad.size:
        i = int(bad[0])
        return (
            f"range {i} (gpa={int(gpas[i]):#x} length={int(lengths[i]):#x}) "
            f"is not {PAGE_SIZE}-byte aligned"
        )
    return None


def decode_range_table(data: bytes | bytearray | memoryview,
                       payload_bytes: int | None, *,
                       total_limit: int | None = MAX_MEMORY_PAYLOAD) -> RangeTable:
    """Parse and check a MEMORY range table against the page bytes the header announced.

    Raises RemoteProtocolError if a range is empty, unaligned or wraps around
    2**64, or the lengths do not add up to `payload_bytes` (not checked when None:
    ZERO and ZSTD requests carry no page bytes, or fewer; then the total must stay
    within MAX_MEMORY_PAYLOAD).
    """
    if len(data) % RANGE_ENTRY_SIZE:
        raise RemoteProtocolError(f"sender sent a {len(data)}-byte range table")
    pairs = np.frombuffer(data, dtype="<u8").reshape(-1, 2)
    gpas, lengths = pairs[:, 0], pairs[:, 1]
    # Each length is at most the payload limit, so the table's total cannot overflow.
    too_long = np.flatnonzero(lengths > np.uint64(MAX_MEMORY_PAYLOAD))
    if too_long.size:
        i = int(too_long[0])
        raise RemoteProtocolError(
            f"sender sent MEMORY with range {i} of {int(lengths[i])} bytes; "
            f"the limit is {MAX_MEMORY_PAYLOAD}"
        )
    try:
        table = RangeTable.from_arrays(gpas, lengths)  # empty and wrapping ranges
    except ValueError as exc:
        raise RemoteProtocolError(f"sender sent MEMORY whose {exc}") from None
    problem = _aligned_problem(gpas, lengths)
    if problem:
        raise RemoteProtocolError(f"sender sent MEMORY with {problem}")
    if payload_bytes is None:
        if total_limit is not None and table.total_bytes > total_limit:
            raise RemoteProtocolError(
                f"sender sent MEMORY whose ranges hold {table.total_bytes} bytes; the limit is "
                f"{total_limit}"
            )
    elif table.total_bytes != payload_bytes:
        raise RemoteProtocolError(
            f"sender sent MEMORY whose ranges hold {table.total_bytes} bytes but whose header "
            f"announces {payload_bytes} page bytes"
        )
    return table


# -- hello --------------------------------------------------------------------------

_ROLES = (ConnectionRole.MAIN, ConnectionRole.MEMORY, ConnectionRole.FAULT)


def encode_hello(
    role: ConnectionRole, migration_id: bytes, version: int = PROTOCOL_VERSION, *,
    index: int = 0, resume: int = 0,
) -> bytes:
    """The 32-byte preamble the sender writes first on every connection."""
    if role not in _ROLES:
        raise LocalProtocolError(f"cannot send a hello with role {role!r}")
    if len(migration_id) != MIGRATION_ID_SIZE:
        raise LocalProtocolError(f"migration id must be {MIGRATION_ID_SIZE} bytes")
    if version < RESUMABLE_VERSION and (index or resume):
        raise LocalProtocolError(f"protocol version {version} has no connection index or "
                                 "resume count")
    if role is not ConnectionRole.MEMORY and index:
        raise LocalProtocolError(f"cannot send a {ConnectionRole(role).name} hello with index "
                                 f"{index}; only MEMORY connections have one")
    return _pack(_HELLO, "hello", HELLO_MAGIC, int(role), version, index, resume,
                 migration_id)


def parse_hello(data: bytes | bytearray | memoryview) -> Hello:
    """Check and parse the 32-byte connection preamble.

    Raises RemoteProtocolError on a short hello, bad magic, an INVALID or unknown
    role, non-zero reserved bytes or an unsupported version.
    """
    if len(data) != HELLO_SIZE:
        raise RemoteProtocolError(f"peer sent a {len(data)}-byte hello; expected {HELLO_SIZE}")
    magic, role, version, index, resume, migration_id = _HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise RemoteProtocolError(f"peer sent a hello with bad magic {magic!r}")
    if role not in _ROLES:
        raise RemoteProtocolError(f"peer sent a hello with invalid role {role}")
    check_version(version, "peer")
    if version < RESUMABLE_VERSION and (index or resume):
        reserved = index | resume << 16
        raise RemoteProtocolError(f"peer sent a hello with reserved field {reserved:#x}")
    if role != ConnectionRole.MEMORY and index:
        raise RemoteProtocolError(f"peer sent a {ConnectionRole(role).name} hello with index "
                                  f"{index}; only MEMORY connections have one")
    return Hello(ConnectionRole(role), migration_id, version, index, resume)


def encode_hello_reply(method: AuthMethod, nonce: bytes) -> bytes:
    """The receiver's OK answer to a hello: response header + method + nonce."""
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"a nonce must be {NONCE_SIZE} bytes")
    payload = _pack(_HELLO_REPLY, "hello reply", int(method), 0, nonce)
    return encode_response_header(Status.OK, len(payload)) + payload


def decode_hello_reply(data: bytes) -> tuple[AuthMethod, bytes]:
    """``(method, receiver nonce)`` from the payload of an OK answer to a hello."""
    if len(data) != HELLO_REPLY_SIZE:
        raise RemoteProtocolError(
            f"receiver answered the hello with a {len(data)}-byte payload; "
            f"expected {HELLO_REPLY_SIZE}"
        )
    method, reserved, nonce = _HELLO_REPLY.unpack(data)
    if reserved:
        raise RemoteProtocolError(f"receiver answered the hello with reserved field {reserved:#x}")
    try:
        return AuthMethod(method), nonce
    except ValueError:
        raise RemoteProtocolError(
            f"receiver asked for unknown authentication method {method}"
        ) from None


def encode_auth(nonce: bytes, proof: bytes) -> bytes:
    """An AUTH request: header + sender nonce + sender proof."""
    if len(nonce) != NONCE_SIZE or len(proof) != PROOF_SIZE:
        raise LocalProtocolError(
            f"AUTH needs a {NONCE_SIZE}-byte nonce and a {PROOF_SIZE}-byte proof"
        )
    payload = _pack(_AUTH, "AUTH payload", nonce, proof)
    return encode_request_header(Command.AUTH, len(payload)) + payload


def decode_auth(data: bytes) -> tuple[bytes, bytes]:
    """``(sender nonce, sender proof)`` from an AUTH payload."""
    if len(data) != AUTH_PAYLOAD_SIZE:
        raise RemoteProtocolError(
            f"sender sent a {len(data)}-byte AUTH payload; expected {AUTH_PAYLOAD_SIZE}"
        )
    nonce, proof = _AUTH.unpack(data)
    return nonce, proof


def check_version(version: int, peer: str) -> None:
    """RemoteProtocolError unless `version` (sent by `peer`) is one this side speaks."""
    if version not in SUPPORTED_VERSIONS:
        accepted = " and ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise RemoteProtocolError(
            f"{peer} speaks protocol version {version}; this side accepts {accepted}"
        )
