"""The sans-IO drivers: `SenderConnection` and `ReceiverConnection` (h11 style).

Neither does any I/O. The I/O layer feeds received bytes with
``receive_data(data)`` (``b""`` means EOF), pulls events with ``next_event()``
(an event, or `NEED_DATA`), and turns events into bytes to write with
``send(event)``. ``bytes_wanted()`` says how many bytes the parser needs to
finish what it is reading, so the I/O layer can read exactly that much and page
bytes never pass through the protocol buffer:

Receiver loop (one per connection)::

    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(conn.bytes_wanted()))
        elif isinstance(event, MemoryRequest):
            for view in guest.views(event.ranges):     # zero copy into guest RAM
                recv_into_exactly(sock, view)
                conn.payload_received(len(view))
        elif isinstance(event, EndOfPayload):
            sock.sendall(conn.send(Ok()))
        elif isinstance(event, ConnectionClosed):
            break
        else:                                          # Start, Config, State, ...
            sock.sendall(conn.send(handle(event)))     # Ok() or Error(message)

A `RemoteProtocolError` from ``next_event()`` leaves the receiver ABORTED; the
I/O layer then sends ``conn.send(Error(str(exc)))`` and closes.

Sender, for each request: ``sock.sendall(conn.send(Start(...)))``; for MEMORY
``sock.sendmsg([conn.send(Memory(ranges)), *guest_views])``; then read until
``next_event()`` gives the `Response`.
"""

from __future__ import annotations

from collections import deque
from enum import Enum, auto
from typing import NamedTuple

from vmig.proto.errors import LocalProtocolError, RemoteProtocolError
from vmig.proto.events import (
    NEED_DATA,
    Abandon,
    Complete,
    Config,
    ConnectionClosed,
    EndOfPayload,
    Error,
    Memory,
    MemoryFd,
    MemoryRequest,
    Ok,
    PayloadData,
    ReceiverEvent,
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
    HEADER_SIZE,
    MAX_COMPLETE_SIZE,
    MAX_CONFIG_SIZE,
    MAX_CONNECTIONS,
    MAX_MEMORY_PAYLOAD,
    MAX_MESSAGE_SIZE,
    MAX_RANGES_PER_REQUEST,
    MAX_STATE_SIZE,
    MEMORY_FD_PAYLOAD_SIZE,
    NO_HEADERS,
    START_PAYLOAD_SIZE,
    Command,
    ConnectionRole,
    ResponseHeader,
    Status,
    check_version,
    decode_memory_fd_headers,
    decode_memory_fd_payload,
    decode_memory_headers,
    decode_range_table,
    decode_request_header,
    decode_response_header,
    decode_start_payload,
    encode_memory_fd_headers,
    encode_memory_fd_payload,
    encode_memory_headers,
    encode_request_header,
    encode_response,
    encode_response_header,
    encode_start_payload,
    encode_text,
    range_table_problem,
)
from vmig.ranges import RANGE_ENTRY_SIZE

__all__ = ["DEFAULT_PIPELINE_DEPTH", "ReceiverConnection", "SenderConnection"]

#: Outstanding MEMORY requests per MEMORY connection when not given. Two hide one
#: round trip behind the next chunk; four leave slack for a slow ack without
#: letting unacknowledged data pile up (a chunk is up to 16 MiB by default).
DEFAULT_PIPELINE_DEPTH = 4

# Payload limits of the commands whose payload is one opaque blob.
_BLOB_LIMITS = {
    Command.CONFIG: MAX_CONFIG_SIZE,
    Command.STATE: MAX_STATE_SIZE,
    Command.COMPLETE: MAX_COMPLETE_SIZE,
    Command.ABANDON: MAX_MESSAGE_SIZE,
}


class _Buffer:
    """Received bytes not yet parsed, consumed from the front; remembers EOF."""

    __slots__ = ("_data", "eof")

    def __init__(self) -> None:
        self._data = bytearray()
        self.eof = False

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; ``b""`` records EOF (bytes after it are a caller bug)."""
        if not data:
            self.eof = True
            return
        if self.eof:
            raise LocalProtocolError("receive_data() called with bytes after EOF")
        self._data += data

    def take(self, count: int) -> bytes | None:
        """Remove and return exactly `count` bytes, or None (nothing removed) if short."""
        if len(self._data) < count:
            return None
        return self.take_up_to(count)

    def take_up_to(self, count: int) -> bytes:
        """Remove and return at most `count` bytes (one copy)."""
        with memoryview(self._data) as view:
            out = bytes(view[:count])
        del self._data[:count]  # O(1) from the front of a bytearray in CPython
        return out


# ===================================================================================
# Receiver
# ===================================================================================


class _Phase(Enum):
    """What the receiver's parser is reading."""

    HEADER = auto()  # the next 16-byte request header
    BODY = auto()  # the whole payload of a non-MEMORY request
    TABLE = auto()  # the range table of a MEMORY request
    PAYLOAD = auto()  # the page bytes of a MEMORY request
    RESPOND = auto()  # a request is complete; the caller must answer it
    FAILED = auto()  # the peer broke the protocol; an Error response may still go out
    DEAD = auto()  # out of step with the byte stream; nothing more can be parsed


class _Request(NamedTuple):
    """The request being parsed or answered."""

    command: Command
    length: int
    target: ReceiverState
    headers: bytes


class ReceiverConnection:
    """The receiving end of one migration connection (MAIN or MEMORY role).

    Parses requests, checks them against `TRANSITIONS` and the wire limits, and
    produces the bytes of its answers. Every request is answered by exactly one
    `send(Ok())` or `send(Error(...))` before the next one is parsed; the state
    advances when the answer is OK and becomes ABORTED when it is an Error.
    """

    def __init__(
        self, role: ConnectionRole = ConnectionRole.MAIN, *, migration_id: bytes | None = None
    ) -> None:
        """Start in the role's initial state (the hello has already been read).

        If `migration_id` is given (from the hello), START must carry the same id.
        """
        if role not in INITIAL_STATES:
            raise LocalProtocolError(f"no receiver for connection role {role!r}")
        self.role = ConnectionRole(role)
        self._state = INITIAL_STATES[self.role]
        self._migration_id = migration_id
        self._start: Start | None = None
        self._buffer = _Buffer()
        self._phase = _Phase.HEADER
        self._request: _Request | None = None
        self._event: ReceiverEvent | None = None
        self._payload_total = 0
        self._payload_done = 0
        self._error: RemoteProtocolError | None = None

    # -- introspection ---------------------------------------------------------------

    @property
    def state(self) -> ReceiverState:
        """The current state; requests answered OK so far decide it."""
        return self._state

    @property
    def start(self) -> Start | None:
        """The START this connection accepted (answered OK), if any."""
        return self._start

    @property
    def awaiting_response(self) -> bool:
        """True when a complete request waits for `send(Ok())` / `send(Error(...))`."""
        return self._phase is _Phase.RESPOND or (
            self._phase is _Phase.PAYLOAD and self._payload_done == self._payload_total
        )

    @property
    def payload_received_bytes(self) -> int:
        """Page bytes of the current MEMORY request taken in so far (its stream offset)."""
        return self._payload_done if self._phase is _Phase.PAYLOAD else 0

    @property
    def payload_remaining(self) -> int:
        """Page bytes of the current MEMORY request still to come (0 outside one)."""
        if self._phase is not _Phase.PAYLOAD:
            return 0
        return self._payload_total - self._payload_done

    def bytes_wanted(self) -> int:
        """How many more bytes finish what the parser is reading (0: call next_event()).

        Reading at most this many bytes per `receive_data()` keeps the next
        request's bytes (and page bytes) out of the protocol buffer.
        """
        have = len(self._buffer)
        if self._phase is _Phase.HEADER:
            return max(HEADER_SIZE - have, 0)
        if self._phase in (_Phase.BODY, _Phase.TABLE):
            assert self._request is not None
            return max(self._body_size(self._request) - have, 0)
        if self._phase is _Phase.PAYLOAD:
            return max(self._payload_total - self._payload_done - have, 0)
        return 0

    # -- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` records EOF. Never parses or raises on content.

        Raises LocalProtocolError if bytes arrive after EOF was recorded.
        """
        self._buffer.feed(data)

    def payload_received(self, nbytes: int) -> None:
        """Record `nbytes` page bytes that the I/O layer read straight into guest memory.

        Only valid while a MEMORY payload is outstanding and the buffer holds none
        of it (drain buffered bytes as PayloadData with next_event() first).
        Raises LocalProtocolError otherwise or if `nbytes` exceeds what remains.
        """
        if self._phase is not _Phase.PAYLOAD:
            raise LocalProtocolError("payload_received() called outside a MEMORY payload")
        if len(self._buffer):
            raise LocalProtocolError(
                "payload_received() called while page bytes are still buffered; "
                "take them with next_event() first"
            )
        remaining = self._payload_total - self._payload_done
        if nbytes < 0 or nbytes > remaining:
            raise LocalProtocolError(
                f"payload_received({nbytes}) but {remaining} page bytes are outstanding"
            )
        self._payload_done += nbytes

    def next_event(self) -> ReceiverEvent:
        """Parse the next event from the buffer, or return NEED_DATA.

        Returns a request event (`Start`, `Config`, `MemoryFd`, `MemoryRequest`,
        `State`, `Complete`, `Abandon`), `PayloadData` / `EndOfPayload` during a
        MEMORY payload, `ConnectionClosed` on EOF between requests, or NEED_DATA.

        Raises RemoteProtocolError if the sender broke the protocol; the state is
        then ABORTED, `send(Error(...))` is still allowed once, and every later
        call raises the same error. Raises LocalProtocolError if a complete
        request has not been answered yet.
        """
        if self._phase in (_Phase.FAILED, _Phase.DEAD):
            if self._error is not None:
                raise self._error
            raise LocalProtocolError("the connection was aborted in the middle of a request")
        if self._phase is _Phase.RESPOND:
            assert self._request is not None
            raise LocalProtocolError(
                f"answer the {self._request.command.name} request with send() before "
                "reading the next one"
            )
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._state = ReceiverState.ABORTED
            self._phase = _Phase.FAILED
            self._error = exc
            raise

    # -- output ------------------------------------------------------------------------

    def send(self, event: Ok | Error) -> bytes:
        """Answer the current request; return the response bytes to write.

        `Ok()` needs a complete request (for MEMORY: all page bytes received) and
        moves the state on per TRANSITIONS. `Error(message)` moves to ABORTED; it
        is also allowed after next_event() raised RemoteProtocolError, and in the
        middle of a MEMORY payload (the connection is then dead and must be closed).
        Raises LocalProtocolError when there is nothing to answer.
        """
        if isinstance(event, Ok):
            return self._send_ok()
        if isinstance(event, Error):
            return self._send_error(event.message)
        raise LocalProtocolError(f"a receiver cannot send {event!r}")

    def _send_ok(self) -> bytes:
        if not self.awaiting_response:
            raise LocalProtocolError(f"cannot send OK: {self._nothing_to_answer()}")
        assert self._request is not None
        self._state = self._request.target
        if isinstance(self._event, Start):
            self._start = self._event
        self._finish_request(_Phase.HEADER)
        return encode_response_header(Status.OK)

    def _send_error(self, message: str) -> bytes:
        if self._phase is _Phase.FAILED:
            next_phase = _Phase.DEAD
        elif self.awaiting_response:
            next_phase = _Phase.HEADER
        elif self._phase is _Phase.PAYLOAD:
            next_phase = _Phase.DEAD  # page bytes are still on their way
        else:
            raise LocalProtocolError(f"cannot send ERROR: {self._nothing_to_answer()}")
        self._state = ReceiverState.ABORTED
        self._finish_request(next_phase)
        return encode_response(Status.ERROR, message)

    def _nothing_to_answer(self) -> str:
        if self._phase is _Phase.PAYLOAD:
            return f"{self.payload_remaining} page bytes of the MEMORY request are outstanding"
        if self._phase is _Phase.DEAD:
            return "the connection was aborted and already answered"
        return "no request is waiting for an answer"

    def _finish_request(self, phase: _Phase) -> None:
        self._phase = phase
        self._request = None
        self._event = None
        self._payload_total = self._payload_done = 0

    # -- parsing -----------------------------------------------------------------------

    @staticmethod
    def _body_size(request: _Request) -> int:
        """Bytes read in phase BODY (whole payload) or TABLE (the range table)."""
        if request.command is Command.MEMORY:
            return RANGE_ENTRY_SIZE * decode_memory_headers(request.headers)
        return request.length

    def _parse(self) -> ReceiverEvent:
        if self._phase is _Phase.HEADER:
            raw = self._buffer.take(HEADER_SIZE)
            if raw is None:
                return self._short(HEADER_SIZE, "a request header")
            self._request = self._check_header(raw)
            self._phase = _Phase.TABLE if self._request.command is Command.MEMORY else _Phase.BODY
        if self._phase in (_Phase.BODY, _Phase.TABLE):
            request = self._request
            assert request is not None
            size = self._body_size(request)
            body = self._buffer.take(size)
            if body is None:
                return self._short(size, f"a {request.command.name} request")
            if self._phase is _Phase.TABLE:
                self._payload_total = request.length - size
                self._payload_done = 0
                ranges = decode_range_table(body, self._payload_total)
                self._phase = _Phase.PAYLOAD
                self._event = MemoryRequest(ranges, self._payload_total)
            else:
                self._phase = _Phase.RESPOND
                self._event = self._parse_body(request, body)
            return self._event
        # _Phase.PAYLOAD
        remaining = self._payload_total - self._payload_done
        if remaining == 0:
            self._phase = _Phase.RESPOND
            return EndOfPayload()
        if len(self._buffer):
            data = self._buffer.take_up_to(remaining)
            offset = self._payload_done
            self._payload_done += len(data)
            return PayloadData(data, offset)
        if self._buffer.eof:
            raise RemoteProtocolError(
                f"sender closed the connection with {remaining} of {self._payload_total} "
                "page bytes of a MEMORY request missing"
            )
        return NEED_DATA

    def _short(self, size: int, what: str) -> ReceiverEvent:
        """NEED_DATA, ConnectionClosed or an error when fewer than `size` bytes are here."""
        have = len(self._buffer)
        if not self._buffer.eof:
            return NEED_DATA
        if self._phase is _Phase.HEADER and have == 0:
            return ConnectionClosed()
        raise RemoteProtocolError(
            f"sender closed the connection in the middle of {what} ({have} of {size} bytes)"
        )

    def _check_header(self, raw: bytes) -> _Request:
        """Validate a request header against the state and the wire limits."""
        value, headers, length = decode_request_header(raw)
        try:
            command = Command(value)
        except ValueError:
            raise RemoteProtocolError(f"sender sent unknown command {value}") from None
        if command is Command.INVALID:
            raise RemoteProtocolError("sender sent the reserved command INVALID (0)")
        target = TRANSITIONS.get((self._state, command))
        if target is None:
            raise RemoteProtocolError(
                f"sender sent {command.name} in state {self._state.name}; "
                f"expected {expected_text(self._state)}"
            )
        request = _Request(command, length, target, headers)
        if command is Command.MEMORY:
            self._check_memory_header(request)
        elif command is Command.MEMORY_FD:
            decode_memory_fd_headers(headers)
            if self._start is None or not self._start.local:
                raise RemoteProtocolError("sender sent MEMORY_FD but START did not set LOCAL")
            self._check_length(request, exact=MEMORY_FD_PAYLOAD_SIZE)
        else:
            if headers != NO_HEADERS:
                raise RemoteProtocolError(
                    f"sender sent {command.name} with non-zero command headers {headers.hex()}"
                )
            if command is Command.START:
                self._check_length(request, exact=START_PAYLOAD_SIZE)
            else:
                self._check_length(request, limit=_BLOB_LIMITS[command])
        return request

    @staticmethod
    def _check_length(request: _Request, *, exact: int = -1, limit: int = -1) -> None:
        name, length = request.command.name, request.length
        if exact >= 0 and length != exact:
            raise RemoteProtocolError(
                f"sender sent {name} with a {length}-byte payload; expected {exact}"
            )
        if limit >= 0 and length > limit:
            raise RemoteProtocolError(
                f"sender sent {name} with a {length}-byte payload; the limit is {limit}"
            )

    @staticmethod
    def _check_memory_header(request: _Request) -> None:
        count = decode_memory_headers(request.headers)
        if count > MAX_RANGES_PER_REQUEST:
            raise RemoteProtocolError(
                f"sender sent MEMORY with {count} ranges; the limit is {MAX_RANGES_PER_REQUEST}"
            )
        table = RANGE_ENTRY_SIZE * count
        if request.length < table:
            raise RemoteProtocolError(
                f"sender sent MEMORY announcing {request.length} bytes, fewer than its "
                f"{count}-range table ({table} bytes)"
            )
        if request.length - table > MAX_MEMORY_PAYLOAD:
            raise RemoteProtocolError(
                f"sender sent MEMORY with {request.length - table} page bytes; "
                f"the limit is {MAX_MEMORY_PAYLOAD}"
            )

    def _parse_body(self, request: _Request, body: bytes) -> ReceiverEvent:
        command = request.command
        if command is Command.START:
            return self._parse_start(body)
        if command is Command.MEMORY_FD:
            gpa, size = decode_memory_fd_payload(body)
            return MemoryFd(decode_memory_fd_headers(request.headers), gpa, size)
        if command is Command.CONFIG:
            return Config(body)
        if command is Command.STATE:
            return State(body)
        if command is Command.COMPLETE:
            return Complete(body)
        return Abandon(body.decode("utf-8", errors="replace"))

    def _parse_start(self, body: bytes) -> Start:
        version, flags, migration_id, connections = decode_start_payload(body)
        check_version(version, "sender")
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise RemoteProtocolError(
                f"sender asked for {connections} connections; allowed are 1 to {MAX_CONNECTIONS}"
            )
        if self._migration_id is not None and migration_id != self._migration_id:
            raise RemoteProtocolError(
                f"sender sent START for migration {migration_id.hex()} on a connection "
                f"opened for {self._migration_id.hex()}"
            )
        return Start(
            migration_id=migration_id, connections=connections, flags=flags, version=version
        )


# ===================================================================================
# Sender
# ===================================================================================


class _Outstanding(NamedTuple):
    """A request sent and not yet answered."""

    command: Command
    target: ReceiverState


class SenderConnection:
    """The sending end of one migration connection (MAIN or MEMORY role).

    Turns requests into bytes, enforcing the order of `TRANSITIONS` against the
    receiver's state as confirmed by its responses, and parses the responses.
    MAIN allows one unanswered request (plus an ABANDON queued behind it); MEMORY
    allows `max_outstanding` pipelined MEMORY requests, answered in order.
    """

    def __init__(
        self, role: ConnectionRole = ConnectionRole.MAIN, *, max_outstanding: int | None = None
    ) -> None:
        """Raises LocalProtocolError for an unknown role or a pipeline on MAIN."""
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
        self._buffer = _Buffer()
        self._header: ResponseHeader | None = None
        self._error: RemoteProtocolError | None = None

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
        if self._error is not None:
            raise LocalProtocolError(
                f"cannot send {command.name}: the connection failed ({self._error})"
            )
        if self._abandoned:
            raise LocalProtocolError(f"cannot send {command.name}: ABANDON was already sent")
        if command is Command.ABANDON:
            # ABANDON may queue behind unanswered requests; it is checked against
            # the state they will leave behind if answered OK.
            state = self._expected_state()
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
        data = _encode_request(event)
        self._outstanding.append(_Outstanding(command, target))
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
            self._state = ReceiverState.ABORTED
            self._error = exc
            raise

    def _parse(self) -> SenderEvent:
        if self._header is None:
            if len(self._buffer) and not self._outstanding:
                raise RemoteProtocolError("receiver sent a response with no request outstanding")
            raw = self._buffer.take(HEADER_SIZE)
            if raw is None:
                return self._short("a response header")
            self._header = decode_response_header(raw)
        payload = self._buffer.take(self._header.length)
        if payload is None:
            return self._short("a response message")
        status = self._header.status
        self._header = None
        command, target = self._outstanding.popleft()
        if status is Status.ERROR or self._state is ReceiverState.ABORTED:
            self._state = ReceiverState.ABORTED
        else:
            self._state = target
        return Response(status, payload.decode("utf-8", errors="replace"), command)

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
    (Complete, Command.COMPLETE),
    (Abandon, Command.ABANDON),
)


def _encode_request(event: Request) -> bytes:
    """Header (and payload, except MEMORY's page bytes) of a request."""
    if isinstance(event, Start):
        payload = encode_start_payload(
            event.version, event.flags, event.migration_id, event.connections
        )
        return encode_request_header(Command.START, len(payload)) + payload
    if isinstance(event, Memory):
        problem = range_table_problem(event.ranges)
        if problem:
            raise LocalProtocolError(f"cannot send MEMORY: {problem}")
        table = event.ranges.encode()
        headers = encode_memory_headers(len(event.ranges))
        length = len(table) + event.ranges.total_bytes
        return encode_request_header(Command.MEMORY, length, headers) + table
    if isinstance(event, MemoryFd):
        payload = encode_memory_fd_payload(event.gpa, event.size)
        headers = encode_memory_fd_headers(event.slot)
        return encode_request_header(Command.MEMORY_FD, len(payload), headers) + payload
    if isinstance(event, Abandon):
        payload = encode_text(event.reason)
        return encode_request_header(Command.ABANDON, len(payload)) + payload
    command = _command_of(event)
    payload = bytes(event.data)
    limit = _BLOB_LIMITS[command]
    if len(payload) > limit:
        raise LocalProtocolError(
            f"cannot send {command.name} with {len(payload)} bytes; the limit is {limit}"
        )
    return encode_request_header(command, len(payload)) + payload
