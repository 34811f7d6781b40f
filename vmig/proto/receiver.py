"""`ReceiverConnection`: the receiving end of one migration connection, sans-IO (h11 style).

It does no I/O. The I/O layer feeds received bytes with ``receive_data(data)``
(``b""`` means EOF), pulls events with ``next_event()`` (an event, or `NEED_DATA`),
and answers each request with ``send(Ok())`` or ``send(Error(...))``.
``bytes_wanted()`` says how many bytes the parser needs to finish what it is
reading, so the I/O layer can read exactly that much and page bytes never pass
through the protocol buffer::

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
"""

from __future__ import annotations

from collections import deque
from enum import Enum, auto
from typing import NamedTuple

from vmig.proto.buffer import ReceiveBuffer
from vmig.proto.errors import LocalProtocolError, RemoteProtocolError
from vmig.proto.events import (
    NEED_DATA,
    Abandon,
    Cancel,
    Complete,
    Config,
    ConnectionClosed,
    EndOfPayload,
    Error,
    MemoryFd,
    MemoryRequest,
    Ok,
    PayloadData,
    Ping,
    Postcopy,
    ReceiverEvent,
    Repeated,
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
    MAX_CONNECTIONS,
    MAX_MEMORY_PAYLOAD,
    MAX_RANGES_PER_REQUEST,
    MAX_STATE_SIZE,
    MEMORY_FD_PAYLOAD_SIZE,
    NO_HEADERS,
    PROTOCOL_VERSION,
    RESUMABLE_VERSION,
    SEQUENCED_COMMANDS,
    START_PAYLOAD_SIZE,
    AbandonFlags,
    Command,
    ConnectionRole,
    MemoryFlags,
    Status,
    check_version,
    decode_abandon_headers,
    decode_memory_fd_headers,
    decode_memory_fd_payload,
    decode_memory_headers,
    decode_range_table,
    decode_request_header,
    decode_sequenced_headers,
    decode_start_payload,
    encode_response,
    encode_response_header,
)
from vmig.ranges import RANGE_ENTRY_SIZE

__all__ = ["ReceiverConnection"]


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
    """The request being parsed or answered (`seq` 0: not sequenced)."""

    command: Command
    length: int
    target: ReceiverState
    headers: bytes
    seq: int = 0
    repeat: bool = False


class _Answered(NamedTuple):
    """A numbered request's answer, kept to answer it again if it is re-sent."""

    seq: int
    command: Command
    answer: bytes


#: Answers kept: MAIN has at most two requests unanswered (one, and an ABANDON queued behind
#: it), so a resumed sender re-sends at most two, both perhaps answered already.
_RECORDS = 2


class ReceiverConnection:
    """The receiving end of one migration connection (MAIN or MEMORY role).

    Parses requests, checks them against `TRANSITIONS` and the wire limits, and
    produces the bytes of its answers. Every request is answered by exactly one
    `send(Ok())` or `send(Error(...))` before the next one is parsed; the state
    advances when the answer is OK and becomes ABORTED when it is an Error.
    """

    def __init__(
        self, role: ConnectionRole = ConnectionRole.MAIN, *, migration_id: bytes | None = None,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        """Start in the role's initial state (the hello has already been read).

        If `migration_id` is given (from the hello), START must carry the same id.
        `version` is the hello's: from version 3 on, MAIN's requests (but MEMORY) carry
        sequence numbers; one that repeats the last answered comes as `Repeated` and is
        answered from the record (`answer_repeat`), so a request re-sent on a resumed
        MAIN (`resumed`) is applied once.
        """
        if role not in INITIAL_STATES:
            raise LocalProtocolError(f"no receiver for connection role {role!r}")
        self.role = ConnectionRole(role)
        self._state = INITIAL_STATES[self.role]
        self._migration_id = migration_id
        self._start: Start | None = None
        self._buffer = ReceiveBuffer()
        self._phase = _Phase.HEADER
        self._request: _Request | None = None
        self._event: ReceiverEvent | None = None
        self._payload_total = 0
        self._payload_done = 0
        self._error: RemoteProtocolError | None = None
        self._state_before_error = self._state
        self.version = version
        self._sequenced = self.role is ConnectionRole.MAIN and version >= RESUMABLE_VERSION
        self._records: deque[_Answered] = deque(maxlen=_RECORDS)  # the last answered

    @classmethod
    def resumed(cls, lost: ReceiverConnection) -> ReceiverConnection:
        """The core of a resumed connection in the place of `lost`: the state its answers
        reached (a request it was reading when its stream failed is forgotten: it was never
        answered), the last sequence number answered and that answer."""
        new = cls(lost.role, migration_id=lost._migration_id, version=lost.version)
        new._state = lost._state_before_error if lost._error is not None else lost._state
        new._start = lost._start
        new._records = deque(lost._records, maxlen=_RECORDS)
        return new

    @property
    def last_seq(self) -> int:
        """The sequence number of the last request answered (0: none, or before version 3)."""
        return self._records[-1].seq if self._records else 0

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
            self._state_before_error = self._state
            self._state = ReceiverState.ABORTED
            self._phase = _Phase.FAILED
            self._error = exc
            raise

    # -- output ------------------------------------------------------------------------

    def send(self, event: Ok | Error | Cancel) -> bytes:
        """Answer the current request; return the response bytes to write.

        `Ok()` needs a complete request (for MEMORY: all page bytes received) and
        moves the state on per TRANSITIONS. `Error(message)` moves to ABORTED; it
        is also allowed after next_event() raised RemoteProtocolError, and in the
        middle of a MEMORY payload (the connection is then dead and must be closed).
        `Cancel(message)` is allowed at any point on MAIN before a final state, request
        or not: the migration ends (ABORTED) and nothing more is parsed or answered.
        Raises LocalProtocolError when there is nothing to answer.
        """
        if isinstance(event, Ok):
            return self._send_ok()
        if isinstance(event, Error):
            return self._send_error(event.message)
        if isinstance(event, Cancel):
            return self._send_cancel(event.message)
        raise LocalProtocolError(f"a receiver cannot send {event!r}")

    def _send_ok(self) -> bytes:
        if not self.awaiting_response:
            raise LocalProtocolError(f"cannot send OK: {self._nothing_to_answer()}")
        assert self._request is not None
        if self._request.repeat:
            raise LocalProtocolError("a repeated request is answered with answer_repeat()")
        self._state = self._request.target
        if isinstance(self._event, Start):
            self._start = self._event
        answer = encode_response_header(Status.OK)
        self._remember(answer)
        self._finish_request(_Phase.HEADER)
        return answer

    def answer_repeat(self) -> bytes:
        """The answer the `Repeated` request got the first time (the state stays)."""
        request = self._request
        if self._phase is not _Phase.RESPOND or request is None or not request.repeat:
            raise LocalProtocolError("answer_repeat() called without a repeated request")
        self._finish_request(_Phase.HEADER)
        return next(entry.answer for entry in self._records if entry.seq == request.seq)

    def _remember(self, answer: bytes) -> None:
        request = self._request
        assert request is not None
        if request.seq:
            self._records.append(_Answered(request.seq, request.command, answer))

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
        answer = encode_response(Status.ERROR, message)
        if self._request is not None and self.awaiting_response:
            self._remember(answer)
        self._finish_request(next_phase)
        return answer

    def _send_cancel(self, message: str) -> bytes:
        if self.role is not ConnectionRole.MAIN:
            raise LocalProtocolError("a migration is cancelled on the MAIN connection")
        if self._state in TERMINAL_STATES or self._phase is _Phase.DEAD:
            raise LocalProtocolError(f"cannot cancel in state {self._state.name}")
        self._state = ReceiverState.ABORTED
        self._finish_request(_Phase.DEAD)
        return encode_response(Status.CANCELLED, message)

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
            return RANGE_ENTRY_SIZE * decode_memory_headers(request.headers)[0]
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
                flags = decode_memory_headers(request.headers)[1]
                plain = flags is MemoryFlags.NONE
                ranges = decode_range_table(body, self._payload_total if plain else None)
                self._phase = _Phase.PAYLOAD
                self._event = MemoryRequest(ranges, self._payload_total, flags)
            elif request.repeat:
                self._phase = _Phase.RESPOND
                self._event = Repeated(request.command, request.seq)
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
        seq = 0
        if self._sequenced and command in SEQUENCED_COMMANDS:
            seq, extra = decode_sequenced_headers(headers)
            recorded = next((entry for entry in self._records if entry.seq == seq), None)
            if recorded is not None:
                if recorded.command is not command:
                    raise RemoteProtocolError(
                        f"sender sent {command.name} with sequence number {seq}, the number "
                        f"of {recorded.command.name}")
                request = _Request(command, length, self._state, headers, seq, repeat=True)
                self._check_length(request, limit=BLOB_LIMITS.get(command, MAX_STATE_SIZE))
                return request
            if seq != self.last_seq + 1:
                again = " or ".join(str(entry.seq) for entry in self._records)
                raise RemoteProtocolError(
                    f"sender sent {command.name} with sequence number {seq}; expected "
                    f"{self.last_seq + 1}" + (f" (or {again} again)" if again else ""))
            # the rest of the checks see the headers as version 2 had them
            if command is Command.ABANDON:
                headers = bytes(4) + headers[4:]
            elif command is Command.MEMORY_FD:
                headers = extra.to_bytes(4, "little") + bytes(2)
            elif command is Command.POSTCOPY:
                if extra:
                    raise RemoteProtocolError(f"sender sent POSTCOPY with command headers "
                                              f"{headers.hex()}")
                headers = (length // RANGE_ENTRY_SIZE).to_bytes(4, "little") + bytes(2)
            elif extra:
                raise RemoteProtocolError(
                    f"sender sent {command.name} with command headers {headers.hex()}")
            else:
                headers = NO_HEADERS
        elif command is Command.PING and self.version < RESUMABLE_VERSION:
            # (a version 3 MEMORY connection refuses it by its state, as any command)
            raise RemoteProtocolError(f"sender sent PING, which protocol version "
                                      f"{self.version} does not have")
        target = TRANSITIONS.get((self._state, command))
        if target is None:
            raise RemoteProtocolError(
                f"sender sent {command.name} in state {self._state.name}; "
                f"expected {expected_text(self._state)}"
            )
        request = _Request(command, length, target, headers, seq)
        if command is Command.MEMORY:
            self._check_memory_header(request)
        elif command is Command.POSTCOPY:
            count, flags = decode_memory_headers(headers)
            if flags or count > MAX_RANGES_PER_REQUEST:
                raise RemoteProtocolError(
                    f"sender sent POSTCOPY with {count} ranges and flags {int(flags):#x}")
            if self._start is None or not self._start.postcopy:
                raise RemoteProtocolError("sender sent POSTCOPY but START did not set POSTCOPY")
            self._check_length(request, exact=RANGE_ENTRY_SIZE * count)
        elif command is Command.ABANDON:
            decode_abandon_headers(headers)
            self._check_length(request, limit=BLOB_LIMITS[command])
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
            elif command is Command.PING:
                self._check_length(request, exact=0)
            else:
                self._check_length(request, limit=BLOB_LIMITS[command])
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

    def _check_memory_header(self, request: _Request) -> None:
        count, flags = decode_memory_headers(request.headers)
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
        if flags & MemoryFlags.ZERO and request.length != table:
            raise RemoteProtocolError(
                f"sender sent a ZERO MEMORY with {request.length - table} page bytes; it "
                "carries none"
            )
        if flags & MemoryFlags.ZSTD:
            if request.length == table:
                raise RemoteProtocolError("sender sent a ZSTD MEMORY with an empty frame")
            start = self._start
            if self.role is ConnectionRole.MAIN and (start is None or not start.compress):
                raise RemoteProtocolError("sender sent a ZSTD MEMORY but START did not set "
                                          "COMPRESS")

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
        if command is Command.POSTCOPY:
            return Postcopy(decode_range_table(body, None, total_limit=None))
        if command is Command.PING:
            return Ping()
        cancelled = bool(decode_abandon_headers(request.headers) & AbandonFlags.CANCELLED)
        return Abandon(body.decode("utf-8", errors="replace"), cancelled)

    def _parse_start(self, body: bytes) -> Start:
        version, flags, migration_id, connections, reconnect_s, dead_peer_s = \
            decode_start_payload(body)
        check_version(version, "sender")
        if version != self.version:
            raise RemoteProtocolError(f"sender sent START for protocol version {version} on a "
                                      f"connection that said hello with version {self.version}")
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
            migration_id=migration_id, connections=connections, flags=flags, version=version,
            reconnect_timeout_s=reconnect_s, dead_peer_timeout_s=dead_peer_s,
        )
