"""Test helpers for vmig.proto: a sender/receiver pair joined in memory (h11 style)."""

from __future__ import annotations

from vmig.proto import (
    NEED_DATA,
    PROTOCOL_VERSION,
    RESUMABLE_VERSION,
    SUPPORTED_VERSIONS,
    Abandon,
    Command,
    Complete,
    Config,
    ConnectionClosed,
    ConnectionRole,
    EndOfPayload,
    Memory,
    MemoryFd,
    Ok,
    Ping,
    Postcopy,
    ReceiverConnection,
    Repeated,
    Response,
    SenderConnection,
    Start,
    StartFlags,
    State,
)
from vmig.proto.wire import (
    encode_memory_fd_headers,
    encode_memory_fd_payload,
    encode_memory_headers,
    encode_request_header,
    encode_sequenced_headers,
    encode_start_payload,
)
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, MiB

MID = bytes(range(16))
TABLE = RangeTable([(0, PAGE_SIZE), (4 * PAGE_SIZE, 2 * PAGE_SIZE)])
PAGES = bytes(i % 251 for i in range(TABLE.total_bytes))

# Events after which the receiver must answer before reading on.
COMPLETE_EVENTS = (Start, Config, MemoryFd, State, Postcopy, Complete, Abandon, Ping,
                   Repeated, EndOfPayload)
#: The protocol versions a core speaks, oldest first (tests parametrize over them).
VERSIONS = tuple(sorted(SUPPORTED_VERSIONS))


def default_request(command: Command, version: int = PROTOCOL_VERSION) -> tuple[object, bytes]:
    """A well-formed request event for `command` and the page bytes it needs."""
    if command is Command.START:
        flags = StartFlags.LOCAL | StartFlags.VERIFY_MEMORY | StartFlags.POSTCOPY
        return Start(migration_id=MID, connections=2, flags=flags, version=version), b""
    if command is Command.MEMORY_FD:
        return MemoryFd(slot=0, gpa=0, size=1 * MiB), b""
    if command is Command.CONFIG:
        return Config(b'{"vcpus": 1}'), b""
    if command is Command.MEMORY:
        return Memory(TABLE), PAGES
    if command is Command.STATE:
        return State(b'{"vcpus": []}'), b""
    if command is Command.COMPLETE:
        return Complete(b'{"memory_digest": "00"}'), b""
    if command is Command.ABANDON:
        return Abandon("test"), b""
    if command is Command.POSTCOPY:
        return Postcopy(TABLE), b""
    if command is Command.PING:
        return Ping(), b""
    raise AssertionError(command)


def raw_request(command: int, seq: int = 0, *, version: int | None = None) -> bytes:
    """The full bytes of a well-formed request for any command value (even invalid ones),
    built with the wire encoders directly so no sender-side check gets in the way.

    `seq` 0: version 2's command headers; `seq` > 0: version 3's sequenced ones (u32 seq,
    u16 extra) for the commands that carry them on MAIN. START's payload says `version`
    (by default 3 with a `seq`, else 2).
    """
    if version is None:
        version = RESUMABLE_VERSION if seq else 2
    if command == Command.START:
        flags = StartFlags.LOCAL | StartFlags.POSTCOPY
        payload = encode_start_payload(version, flags, MID, 2)
        return encode_request_header(command, len(payload), _headers(seq)) + payload
    if command == Command.POSTCOPY:
        table = TABLE.encode()
        headers = _headers(seq) if seq else encode_memory_headers(len(TABLE))
        return encode_request_header(command, len(table), headers) + table
    if command == Command.MEMORY_FD:
        payload = encode_memory_fd_payload(0, 1 * MiB)
        headers = encode_sequenced_headers(seq, 0) if seq else encode_memory_fd_headers(0)
        return encode_request_header(command, 16, headers) + payload
    if command == Command.MEMORY:  # never sequenced
        table = TABLE.encode()
        headers = encode_memory_headers(len(TABLE))
        return encode_request_header(command, len(table) + len(PAGES), headers) + table + PAGES
    if command == Command.PING:
        return encode_request_header(command, 0, _headers(seq))
    payload = b"{}"
    return encode_request_header(command, len(payload), _headers(seq)) + payload


def _headers(seq: int) -> bytes:
    return encode_sequenced_headers(seq) if seq else bytes(6)


def drain(receiver: ReceiverConnection) -> list[object]:
    """Pull events until NEED_DATA, EOF or a request that must be answered."""
    events: list[object] = []
    while True:
        event = receiver.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, (*COMPLETE_EVENTS, ConnectionClosed)):
            return events


class ConnectionPair:
    """A SenderConnection and a ReceiverConnection with a perfect link between them."""

    def __init__(
        self,
        role: ConnectionRole = ConnectionRole.MAIN,
        *,
        max_outstanding: int | None = None,
        migration_id: bytes | None = MID,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self.version = version
        self.sender = SenderConnection(role, max_outstanding=max_outstanding, version=version)
        self.receiver = ReceiverConnection(role, migration_id=migration_id, version=version)

    @property
    def sequenced(self) -> bool:
        """Whether this pair's requests (but MEMORY) carry sequence numbers."""
        return self.version >= RESUMABLE_VERSION and self.sender.role is ConnectionRole.MAIN

    def raw_request(self, command: int) -> bytes:
        """`raw_request(command)` for this pair's version, numbered next after the last
        request the receiver answered."""
        seq = self.receiver.last_seq + 1 if self.sequenced else 0
        return raw_request(command, seq, version=self.version)

    def request(self, event: object, payload: bytes = b"") -> list[object]:
        """Send a request (plus MEMORY page bytes) and return what the receiver parsed."""
        self.receiver.receive_data(self.sender.send(event) + payload)  # type: ignore[arg-type]
        return drain(self.receiver)

    def respond(self, answer: object = None) -> Response:
        """Answer on the receiver and return the Response the sender reads."""
        data = self.receiver.send(Ok() if answer is None else answer)  # type: ignore[arg-type]
        self.sender.receive_data(data)
        response = self.sender.next_event()
        assert isinstance(response, Response), response
        return response

    def exchange(
        self, event: object, payload: bytes = b"", answer: object = None
    ) -> tuple[list[object], Response]:
        """One request and its response."""
        events = self.request(event, payload)
        return events, self.respond(answer)

    def advance(self, commands: tuple[Command, ...]) -> None:
        """Drive both sides through `commands` with default requests, all answered OK."""
        for command in commands:
            event, payload = default_request(command, self.version)
            _, response = self.exchange(event, payload)
            assert response.ok, response
