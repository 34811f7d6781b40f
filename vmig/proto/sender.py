"""`SenderConnection`: the sending end of one migration connection, sans-IO (h11 style).

For each request: ``sock.sendall(conn.send(Start(...)))``; for MEMORY
``sock.sendmsg([conn.send(Memory(ranges)), *guest_views])``; then feed received
bytes with ``receive_data()`` until ``next_event()`` gives the `Response`.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from vmig.proto.buffer import ReceiveBuffer
from vmig.proto.errors import LocalProtocolError, RemoteProtocolError
from vmig.proto.events import (
    NEED_DATA,
    Abandon,
    Complete,
    Config,
    ConnectionClosed,
    Memory,
    MemoryFd,
    Ping,
    Postcopy,
    Request,
    Response,
    SenderEvent,
    Start,
    State,
)
from vmig.proto.state import (
    INITIAL_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    ReceiverState,
    expected_text,
)
from vmig.proto.wire import (
    BLOB_LIMITS,
    HEADER_SIZE,
    MAX_MEMORY_PAYLOAD,
    PROTOCOL_VERSION,
    RESUMABLE_VERSION,
    SEQUENCED_COMMANDS,
    AbandonFlags,
    Command,
    ConnectionRole,
    MemoryFlags,
    ResponseHeader,
    Status,
    decode_response_header,
    encode_abandon_headers,
    encode_memory_fd_headers,
    encode_memory_fd_payload,
    encode_memory_headers,
    encode_request_header,
    encode_sequenced_headers,
    encode_start_payload,
    encode_text,
    range_table_problem,
)

__all__ = ["DEFAULT_PIPELINE_DEPTH", "SenderConnection"]

#: Outstanding MEMORY requests per MEMORY connection when not given. Two hide one
#: round trip behind the next chunk; four leave slack for a slow ack without
#: letting unacknowledged data pile up (a chunk is up to 16 MiB by default).
DEFAULT_PIPELINE_DEPTH = 4


class _Outstanding(NamedTuple):
    """A request sent and not yet answered (`seq` 0: not sequenced, e.g. MEMORY)."""

    command: Command
    target: ReceiverState
    seq: int = 0
    event: Request | None = None


class SenderConnection:
    """The sending end of one migration connection (MAIN or MEMORY role).

    Turns requests into bytes, enforcing the order of `TRANSITIONS` against the
    receiver's state as confirmed by its responses, and parses the responses.
    MAIN allows one unanswered request (plus an ABANDON queued behind it); MEMORY
    allows `max_outstanding` pipelined MEMORY requests, answered in order.
    """

    def __init__(
        self, role: ConnectionRole = ConnectionRole.MAIN, *, max_outstanding: int | None = None,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        """Raises LocalProtocolError for an unknown role or a pipeline on MAIN.

        `version` is the one the handshake settled on: from version 3 on, MAIN's requests
        (but MEMORY) carry sequence numbers, so that one re-sent on a resumed MAIN
        (`resumed`, `resend`) is answered from the receiver's record."""
        if role not in INITIAL_STATES:
            raise LocalProtocolError(f"no sender for connection role {role!r}")
        self.role = ConnectionRole(role)
        if self.role is ConnectionRole.MAIN:
            if max_outstanding not in (None, 1):
                raise LocalProtocolError("the MAIN connection allows one outstanding request")
            depth = 1
        else:
            depth = DEFAULT_PIPELINE_DEPTH if max_outstanding is None else max_outstanding
            if depth < 1:
                raise LocalProtocolError(f"max_outstanding must be at least 1, not {depth}")
        self.max_outstanding = depth
        self._state = INITIAL_STATES[self.role]
        self._outstanding: deque[_Outstanding] = deque()
        self._abandoned = False
        self._start: Start | None = None
        self._buffer = ReceiveBuffer()
        self._header: ResponseHeader | None = None
        self._error: RemoteProtocolError | None = None
        self._state_before_error = self._state
        self.version = version
        self._sequenced = self.role is ConnectionRole.MAIN and version >= RESUMABLE_VERSION
        self._next_seq = 1
        self._to_resend: list[_Outstanding] = []

    @classmethod
    def resumed(cls, lost: SenderConnection) -> SenderConnection:
        """The core of a resumed connection in the place of `lost` (a connection whose
        stream failed): the receiver's state as `lost` last confirmed it, the next
        sequence number, and its unanswered sequenced requests, which `resend()` writes
        again (unanswered MEMORY requests are dropped: the caller sends them anew)."""
        if not lost._sequenced and lost.role is ConnectionRole.MAIN:
            raise LocalProtocolError(f"protocol version {lost.version} cannot resume MAIN")
        new = cls(lost.role, max_outstanding=lost.max_outstanding, version=lost.version)
        new._state = lost._state_before_error if lost._error is not None else lost._state
        if lost._state is ReceiverState.ABORTED and lost._error is None:
            raise LocalProtocolError("cannot resume a connection the receiver aborted")
        new._start = lost._start
        new._next_seq = lost._next_seq
        new._to_resend = [entry for entry in lost._outstanding if entry.seq]
        return new

    def resend(self) -> bytes:
        """The requests `resumed()` took over, as they were first sent (same sequence
        numbers); they are outstanding again. b"" when there are none."""
        entries, self._to_resend = self._to_resend, []
        data = []
        for entry in entries:
            assert entry.event is not None
            data.append(_encode_request(entry.event, entry.seq))
            self._outstanding.append(entry)
            if entry.command is Command.ABANDON:
                self._abandoned = True
        return b"".join(data)

    # -- introspection ---------------------------------------------------------------

    @property
    def state(self) -> ReceiverState:
        """The receiver's state as confirmed by the responses read so far."""
        return self._state

    @property
    def outstanding(self) -> tuple[Command, ...]:
        """Commands sent and not yet answered, oldest first."""
        return tuple(entry.command for entry in self._outstanding)

    @property
    def start(self) -> Start | None:
        """The START sent on this connection, if any."""
        return self._start

    def bytes_wanted(self) -> int:
        """How many more bytes finish the response being read (0 if none is expected)."""
        if self._error is not None or not self._outstanding:
            return 0
        have = len(self._buffer)
        if self._header is None:
            return max(HEADER_SIZE - have, 0)
        return max(self._header.length - have, 0)

    # -- output ------------------------------------------------------------------------

    def send(self, event: Request) -> bytes:
        """Encode a request and record it as outstanding; return the bytes to write.

        For `Memory(ranges)` the result is the header and range table only: the
        caller writes exactly ``ranges.total_bytes`` page bytes, in table order,
        right after it and before anything else.

        Raises LocalProtocolError if the request is not allowed now (wrong order,
        too many outstanding, after ABANDON or a failure) or its fields are out of
        range; nothing is recorded then.
        """
        command = _command_of(event)
        if self._to_resend:  # a new request would be numbered before them
            raise LocalProtocolError(f"cannot send {command.name}: resend() first the "
                                     "requests the lost connection left unanswered")
        if self._error is not None and command is not Command.ABANDON:
            raise LocalProtocolError(
                f"cannot send {command.name}: the connection failed ({self._error})"
            )
        if self._abandoned:
            raise LocalProtocolError(f"cannot send {command.name}: ABANDON was already sent")
        if command is Command.ABANDON:
            # ABANDON may queue behind unanswered requests; it is checked against
            # the state they will leave behind if answered OK. It may also follow a
            # failure to read: the connection's other direction may still carry it.
            state = self._expected_state()
            if self._error is not None:  # judged by the state before reading failed
                state = (self._outstanding[-1].target if self._outstanding
                         else self._state_before_error)
            target = TRANSITIONS.get((state, command))
            if target is None:
                raise LocalProtocolError(f"cannot send ABANDON in state {state.name}")
        else:
            state = self._expected_state()
            target = TRANSITIONS.get((state, command))
            if target is None:
                raise LocalProtocolError(
                    f"cannot send {command.name} in state {state.name}; "
                    f"expected {expected_text(state)}"
                )
            if len(self._outstanding) >= self.max_outstanding:
                raise LocalProtocolError(
                    f"cannot send {command.name}: waiting for the response to "
                    f"{self._outstanding[-1].command.name} "
                    f"({len(self._outstanding)} outstanding, limit {self.max_outstanding})"
                )
            if command is Command.MEMORY_FD and (self._start is None or not self._start.local):
                raise LocalProtocolError("cannot send MEMORY_FD: START did not set LOCAL")
            if command is Command.POSTCOPY and (self._start is None
                                                or not self._start.postcopy):
                raise LocalProtocolError("cannot send POSTCOPY: START did not set POSTCOPY")
            if isinstance(event, Start) and event.version != self.version:
                raise LocalProtocolError(
                    f"cannot send START for protocol version {event.version} on a version "
                    f"{self.version} connection")
            if command is Command.PING and not self._sequenced:
                raise LocalProtocolError(f"cannot send PING: protocol version {self.version} "
                                         "has no heartbeat")
        seq = 0
        if self._sequenced and command in SEQUENCED_COMMANDS:
            seq = self._next_seq
        data = _encode_request(event, seq)
        if seq:
            self._next_seq += 1
        self._outstanding.append(_Outstanding(command, target, seq, event if seq else None))
        if isinstance(event, Start):
            self._start = event
        elif isinstance(event, Abandon):
            self._abandoned = True
        return data

    def _expected_state(self) -> ReceiverState:
        """The receiver's state once every outstanding request is answered OK."""
        if self._outstanding and self._state not in TERMINAL_STATES:
            return self._outstanding[-1].target
        return self._state

    # -- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` records EOF.

        Raises LocalProtocolError if bytes arrive after EOF was recorded.
        """
        self._buffer.feed(data)

    def next_event(self) -> SenderEvent:
        """Parse the next response, or return NEED_DATA or ConnectionClosed.

        An OK response moves `state` on; an ERROR response moves it to ABORTED
        (the `Response` is returned either way). Raises RemoteProtocolError on a
        malformed or unsolicited response or EOF with requests unanswered; the
        connection is then ABORTED and every later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._state_before_error = self._state
            self._state = ReceiverState.ABORTED
            self._error = exc
            raise

    def _parse(self) -> SenderEvent:
        if self._header is None:
            raw = self._buffer.take(HEADER_SIZE)
            if raw is None:
                return self._short("a response header")
            header = decode_response_header(raw)
            if not self._outstanding and header.status is not Status.CANCELLED:
                raise RemoteProtocolError("receiver sent a response with no request outstanding")
            self._header = header
        payload = self._buffer.take(self._header.length)
        if payload is None:
            return self._short("a response message")
        status = self._header.status
        self._header = None
        message = payload.decode("utf-8", errors="replace")
        if status is Status.CANCELLED:  # the end, whatever was outstanding
            command = self._outstanding[0].command if self._outstanding else Command.INVALID
            self._outstanding.clear()
            self._state = ReceiverState.ABORTED
            return Response(status, message, command)
        command, target, _, _ = self._outstanding.popleft()
        if status is Status.ERROR or self._state is ReceiverState.ABORTED:
            self._state = ReceiverState.ABORTED
        else:
            self._state = target
        return Response(status, message, command)

    def _short(self, what: str) -> SenderEvent:
        if not self._buffer.eof:
            return NEED_DATA
        if not self._outstanding and not len(self._buffer):
            return ConnectionClosed()
        pending = ", ".join(c.name for c in self.outstanding)
        raise RemoteProtocolError(
            f"receiver closed the connection in the middle of {what} "
            f"with {len(self._outstanding)} request(s) unanswered ({pending})"
        )


def _command_of(event: object) -> Command:
    for kind, command in _REQUEST_COMMANDS:
        if isinstance(event, kind):
            return command
    raise LocalProtocolError(f"a sender cannot send {event!r}")


_REQUEST_COMMANDS: tuple[tuple[type, Command], ...] = (
    (Start, Command.START),
    (Config, Command.CONFIG),
    (MemoryFd, Command.MEMORY_FD),
    (Memory, Command.MEMORY),
    (State, Command.STATE),
    (Postcopy, Command.POSTCOPY),
    (Complete, Command.COMPLETE),
    (Abandon, Command.ABANDON),
    (Ping, Command.PING),
)


def _encode_request(event: Request, seq: int = 0) -> bytes:
    """Header (and payload, except MEMORY's page bytes) of a request; `seq` > 0: version
    3's sequenced command headers (u32 seq, u16 extra)."""
    if isinstance(event, Start):
        payload = encode_start_payload(
            event.version, event.flags, event.migration_id, event.connections,
            event.reconnect_timeout_s, event.dead_peer_timeout_s
        )
        return encode_request_header(Command.START, len(payload), _headers(seq)) + payload
    if isinstance(event, Ping):
        return encode_request_header(Command.PING, 0, _headers(seq))
    if isinstance(event, Memory):
        problem = range_table_problem(event.ranges)
        if problem:
            raise LocalProtocolError(f"cannot send MEMORY: {problem}")
        if event.flags & MemoryFlags.ZSTD and not 0 < event.compressed_bytes <= MAX_MEMORY_PAYLOAD:
            raise LocalProtocolError(
                f"cannot send a {event.compressed_bytes}-byte compressed MEMORY payload")
        table = event.ranges.encode()
        headers = encode_memory_headers(len(event.ranges), event.flags)
        length = len(table) + event.payload_bytes
        return encode_request_header(Command.MEMORY, length, headers) + table
    if isinstance(event, Postcopy):
        problem = range_table_problem(event.ranges, payload_limit=None)
        if problem:
            raise LocalProtocolError(f"cannot send POSTCOPY: {problem}")
        table = event.ranges.encode()
        headers = _headers(seq) if seq else encode_memory_headers(len(event.ranges))
        return encode_request_header(Command.POSTCOPY, len(table), headers) + table
    if isinstance(event, MemoryFd):
        payload = encode_memory_fd_payload(event.gpa, event.size)
        headers = (encode_sequenced_headers(seq, event.slot) if seq
                   else encode_memory_fd_headers(event.slot))
        return encode_request_header(Command.MEMORY_FD, len(payload), headers) + payload
    if isinstance(event, Abandon):
        payload = encode_text(event.reason)
        flags = AbandonFlags.CANCELLED if event.cancelled else AbandonFlags.NONE
        return encode_request_header(Command.ABANDON, len(payload),
                                     encode_abandon_headers(flags, seq)) + payload
    command = _command_of(event)
    payload = bytes(event.data)
    limit = BLOB_LIMITS[command]
    if len(payload) > limit:
        raise LocalProtocolError(
            f"cannot send {command.name} with {len(payload)} bytes; the limit is {limit}"
        )
    return encode_request_header(command, len(payload), _headers(seq)) + payload


def _headers(seq: int) -> bytes:
    return encode_sequenced_headers(seq) if seq else bytes(6)
