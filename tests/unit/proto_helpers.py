"""Test helpers for vmig.proto: a sender/receiver pair joined in memory (h11 style)."""

from __future__ import annotations

from vmig.proto import (
    NEED_DATA,
    PROTOCOL_VERSION,
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
    Postcopy,
    ReceiverConnection,
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
    encode_start_payload,
)
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, MiB

MID = bytes(range(16))
TABLE = RangeTable([(0, PAGE_SIZE), (4 * PAGE_SIZE, 2 * PAGE_SIZE)])
PAGES = bytes(i % 251 for i in range(TABLE.total_bytes))

# Events after which the receiver must answer before reading on.
COMPLETE_EVENTS = (Start, Config, MemoryFd, State, Postcopy, Complete, Abandon, EndOfPayload)


def default_request(command: Command) -> tuple[object, bytes]:
    """A well-formed request event for `command` and the page bytes it needs."""
    if command is Command.START:
        flags = StartFlags.LOCAL | StartFlags.VERIFY_MEMORY | StartFlags.POSTCOPY
        return Start(migration_id=MID, connections=2, flags=flags), b""
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
    raise AssertionError(command)


def raw_request(command: int) -> bytes:
    """The full bytes of a well-formed request for any command value (even invalid ones),
    built with the wire encoders directly so no sender-side check gets in the way."""
    if command == Command.START:
        flags = StartFlags.LOCAL | StartFlags.POSTCOPY
        payload = encode_start_payload(PROTOCOL_VERSION, flags, MID, 2)
        return encode_request_header(command, len(payload)) + payload
    if command == Command.POSTCOPY:
        table = TABLE.encode()
        return encode_request_header(command, len(table), encode_memory_headers(len(TABLE))) \
            + table
    if command == Command.MEMORY_FD:
        payload = encode_memory_fd_payload(0, 1 * MiB)
        return encode_request_header(command, 16, encode_memory_fd_headers(0)) + payload
    if command == Command.MEMORY:
        table = TABLE.encode()
        headers = encode_memory_headers(len(TABLE))
        return encode_request_header(command, len(table) + len(PAGES), headers) + table + PAGES
    payload = b"{}"
    return encode_request_header(command, len(payload)) + payload


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
    ) -> None:
        self.sender = SenderConnection(role, max_outstanding=max_outstanding)
        self.receiver = ReceiverConnection(role, migration_id=migration_id)

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
            event, payload = default_request(command)
            _, response = self.exchange(event, payload)
            assert response.ok, response
