"""The FAULT connection of a post-copy migration, sans-IO: page requests and their pages.

After its handshake (role FAULT) this connection runs the other way round: the
receiver (destination), whose guest faulted on pages it lacks, asks; the sender
(source) answers, in order, one answer per request::

    receiver -> sender  FAULT   request header (command 9, u32 count, u16 0, length 16*count)
                                + the range table of the pages wanted
    sender -> receiver  PAGES   request header (command 4 MEMORY, u32 count, u16 0,
                                length 16*count + sum(lengths)) + the same table + the bytes

Requests may be pipelined. An answer must carry exactly the ranges of the request it
answers; anything else is a protocol error. EOF between messages is the end.
`PageRequester` is the receiver's end, `PageServer` the sender's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vmig.proto.buffer import ReceiveBuffer
from vmig.proto.errors import LocalProtocolError, RemoteProtocolError
from vmig.proto.events import NEED_DATA, ConnectionClosed, EndOfPayload, NeedData
from vmig.proto.wire import (
    HEADER_SIZE,
    MAX_MEMORY_PAYLOAD,
    MAX_RANGES_PER_REQUEST,
    Command,
    decode_memory_headers,
    decode_range_table,
    decode_request_header,
    encode_memory_headers,
    encode_request_header,
    range_table_problem,
)
from vmig.ranges import RANGE_ENTRY_SIZE, RangeTable

__all__ = ["PageRequest", "PageRequester", "PageServer", "Pages"]


@dataclass(frozen=True)
class PageRequest:
    """PageServer: the receiver wants these pages now."""

    ranges: RangeTable


@dataclass(frozen=True)
class Pages:
    """PageRequester: the pages of `ranges` follow (`payload_bytes` of them)."""

    ranges: RangeTable
    payload_bytes: int


def _encode(command: Command, ranges: RangeTable, payload_bytes: int) -> bytes:
    problem = range_table_problem(ranges)
    if problem:
        raise LocalProtocolError(f"cannot send {command.name}: {problem}")
    if not len(ranges):
        raise LocalProtocolError(f"cannot send an empty {command.name}")
    table = ranges.encode()
    return encode_request_header(command, len(table) + payload_bytes,
                                 encode_memory_headers(len(ranges))) + table


class _Reader:
    """Reads header, range table and (for PAGES) the page bytes of one message."""

    def __init__(self, command: Command, side: str) -> None:
        self._command = command
        self._side = side
        self.buffer = ReceiveBuffer()
        self._count = -1
        self._length = 0
        self.pages: Pages | None = None  # a PAGES message whose bytes are being read
        self.payload_left = 0

    def bytes_wanted(self) -> int:
        have = len(self.buffer)
        if self.pages is not None:
            return max(self.payload_left - have, 0)
        if self._count < 0:
            return max(HEADER_SIZE - have, 0)
        return max(RANGE_ENTRY_SIZE * self._count - have, 0)

    def read_table(self) -> RangeTable | NeedData | ConnectionClosed:
        if self._count < 0:
            raw = self.buffer.take(HEADER_SIZE)
            if raw is None:
                return self._short("a header")
            value, headers, length = decode_request_header(raw)
            if value != self._command:
                raise RemoteProtocolError(f"{self._side} sent command {value} on the FAULT "
                                          f"connection; expected {self._command.name}")
            count, flags = decode_memory_headers(headers)
            if flags or not 0 < count <= MAX_RANGES_PER_REQUEST:
                raise RemoteProtocolError(f"{self._side} sent {self._command.name} with "
                                          f"{count} ranges and flags {int(flags):#x}")
            self._count, self._length = count, length
        table_size = RANGE_ENTRY_SIZE * self._count
        body = self.buffer.take(table_size)
        if body is None:
            return self._short(f"a {self._command.name} table")
        payload = self._length - table_size
        if payload < 0 or payload > MAX_MEMORY_PAYLOAD:
            raise RemoteProtocolError(f"{self._side} sent {self._command.name} announcing "
                                      f"{self._length} bytes for {self._count} ranges")
        if self._command is Command.FAULT and payload:
            raise RemoteProtocolError(f"{self._side} sent FAULT with {payload} page bytes")
        # PAGES carry exactly their ranges' bytes; a FAULT request asks for at most a
        # MEMORY request's worth.
        ranges = decode_range_table(body, payload if self._command is Command.MEMORY else None)
        self._count = -1
        return ranges

    def _short(self, what: str) -> NeedData | ConnectionClosed:
        if not self.buffer.eof:
            return NEED_DATA
        if self._count < 0 and not len(self.buffer):
            return ConnectionClosed()
        raise RemoteProtocolError(f"{self._side} closed the FAULT connection in the middle of "
                                  f"{what}")


class PageRequester:
    """The receiver's end: ask for pages, read them back (straight into guest memory)."""

    def __init__(self) -> None:
        self._reader = _Reader(Command.MEMORY, "sender")
        self._asked: deque[RangeTable] = deque()

    @property
    def outstanding(self) -> int:
        return len(self._asked)

    def request(self, ranges: RangeTable) -> bytes:
        """The bytes of a FAULT request for `ranges`."""
        data = _encode(Command.FAULT, ranges, 0)
        self._asked.append(ranges)
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.buffer.feed(data)

    def bytes_wanted(self) -> int:
        return self._reader.bytes_wanted()

    def next_event(self) -> Pages | EndOfPayload | NeedData | ConnectionClosed:
        """The next answer's table (`Pages`), then `EndOfPayload` once the caller reported
        its bytes with `payload_received()`."""
        reader = self._reader
        if reader.pages is not None:
            if reader.payload_left:
                if reader.buffer.eof:
                    raise RemoteProtocolError("sender closed the FAULT connection in the "
                                              "middle of PAGES")
                return NEED_DATA
            reader.pages = None
            return EndOfPayload()
        ranges = reader.read_table()
        if not isinstance(ranges, RangeTable):
            if isinstance(ranges, ConnectionClosed) and self._asked:
                raise RemoteProtocolError(f"sender closed the FAULT connection with "
                                          f"{len(self._asked)} page requests unanswered")
            return ranges
        if not self._asked:
            raise RemoteProtocolError("sender sent PAGES nobody asked for")
        asked = self._asked.popleft()
        if ranges != asked:
            raise RemoteProtocolError("sender answered a FAULT request with other pages")
        reader.pages = Pages(ranges, ranges.total_bytes)
        reader.payload_left = ranges.total_bytes
        return reader.pages

    def payload_received(self, nbytes: int) -> None:
        """Record page bytes read straight into memory (the buffer must hold none)."""
        reader = self._reader
        if reader.pages is None or len(reader.buffer) or not 0 <= nbytes <= reader.payload_left:
            raise LocalProtocolError(f"payload_received({nbytes}) outside PAGES, or too many")
        reader.payload_left -= nbytes


class PageServer:
    """The sender's end: read page requests, answer each with its pages."""

    def __init__(self) -> None:
        self._reader = _Reader(Command.FAULT, "receiver")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.buffer.feed(data)

    def bytes_wanted(self) -> int:
        return self._reader.bytes_wanted()

    def next_event(self) -> PageRequest | NeedData | ConnectionClosed:
        ranges = self._reader.read_table()
        if isinstance(ranges, RangeTable):
            return PageRequest(ranges)
        return ranges

    @staticmethod
    def answer(ranges: RangeTable) -> bytes:
        """Header and table of the PAGES answer; the caller writes the page bytes after."""
        return _encode(Command.MEMORY, ranges, ranges.total_bytes)

