"""SenderConnection / ReceiverConnection: sequences, feeding patterns, errors, pipelining."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from proto_helpers import (
    MID,
    PAGES,
    TABLE,
    VERSIONS,
    ConnectionPair,
    default_request,
    drain,
    raw_request,
)

from vmig.errors import ProtocolError as BaseProtocolError
from vmig.proto import (
    MAX_MEMORY_PAYLOAD,
    MAX_RANGES_PER_REQUEST,
    NEED_DATA,
    PROTOCOL_VERSION,
    RESUMABLE_VERSION,
    TRANSITIONS,
    Abandon,
    Cancel,
    Command,
    Complete,
    Config,
    ConnectionClosed,
    ConnectionRole,
    EndOfPayload,
    Error,
    LocalProtocolError,
    Memory,
    MemoryFd,
    MemoryFlags,
    MemoryRequest,
    Ok,
    PayloadData,
    ReceiverConnection,
    ReceiverState,
    RemoteProtocolError,
    Response,
    SenderConnection,
    Start,
    StartFlags,
    State,
    Status,
)
from vmig.proto.state import shortest_paths
from vmig.proto.wire import (
    NO_HEADERS,
    encode_memory_headers,
    encode_request_header,
    encode_response_header,
    encode_sequenced_headers,
    encode_start_payload,
)
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, KiB, MiB

S = ReceiverState


# -- happy paths ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_full_sequence_on_main(version):
    pair = ConnectionPair(version=version)
    start = Start(version=version, migration_id=MID, connections=4)
    events, response = pair.exchange(start)
    assert events == [start]
    assert response == Response(Status.OK, "", Command.START)
    assert pair.receiver.state is S.STARTED and pair.sender.state is S.STARTED
    assert pair.receiver.start == start

    events, response = pair.exchange(Config(b'{"mem": 64}'))
    assert events == [Config(b'{"mem": 64}')] and response.ok
    assert pair.receiver.state is S.CONFIGURED is pair.sender.state

    for _ in range(3):
        events, response = pair.exchange(Memory(TABLE), PAGES)
        assert events[0] == MemoryRequest(TABLE, len(PAGES))
        assert b"".join(e.data for e in events if isinstance(e, PayloadData)) == PAGES
        assert events[-1] == EndOfPayload()
        assert response == Response(Status.OK, "", Command.MEMORY)
    assert pair.receiver.state is S.CONFIGURED

    events, response = pair.exchange(State(b"{}"))
    assert events == [State(b"{}")] and response.ok
    assert pair.sender.state is S.STATE_RECEIVED

    events, response = pair.exchange(Complete(b'{"memory_digest": "ab"}'))
    assert events == [Complete(b'{"memory_digest": "ab"}')] and response.ok
    assert pair.receiver.state is S.COMPLETED is pair.sender.state

    pair.receiver.receive_data(b"")
    assert pair.receiver.next_event() == ConnectionClosed()
    pair.sender.receive_data(b"")
    assert pair.sender.next_event() == ConnectionClosed()


@pytest.mark.parametrize("version", VERSIONS)
def test_local_mode_sequence_with_memory_fds(version):
    pair = ConnectionPair(version=version)
    pair.exchange(Start(version=version, migration_id=MID, flags=StartFlags.LOCAL))
    for slot in range(3):
        fd_event = MemoryFd(slot, slot * 64 * MiB, 64 * MiB)
        events, response = pair.exchange(fd_event)
        assert events == [fd_event] and response.ok
        assert pair.receiver.state is S.MEMORY_FDS_RECEIVED
    pair.advance((Command.CONFIG, Command.STATE, Command.COMPLETE))
    assert pair.receiver.state is S.COMPLETED is pair.sender.state


@pytest.mark.parametrize("version", VERSIONS)
def test_abandon_moves_both_sides_to_aborted(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START, Command.CONFIG))
    events, response = pair.exchange(Abandon("operator cancelled"))
    assert events == [Abandon("operator cancelled")] and response.ok
    assert pair.receiver.state is S.ABORTED is pair.sender.state
    with pytest.raises(LocalProtocolError):
        pair.sender.send(Memory(TABLE))
    # A request after ABANDON is a protocol error, still answerable with Error.
    pair.receiver.receive_data(pair.raw_request(Command.STATE))
    with pytest.raises(RemoteProtocolError, match="in state ABORTED"):
        pair.receiver.next_event()


@pytest.mark.parametrize("version", VERSIONS)
def test_receiver_error_answer_aborts_both_sides(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START,))
    pair.request(Config(b"{}"))
    response = pair.respond(Error("unsupported machine type"))
    assert response == Response(Status.ERROR, "unsupported machine type", Command.CONFIG)
    assert not response.ok
    assert pair.receiver.state is S.ABORTED is pair.sender.state
    with pytest.raises(LocalProtocolError, match="ABORTED"):
        pair.sender.send(Memory(TABLE))


# -- round trip of every request ------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "event",
    [
        Start(migration_id=MID),
        Start(migration_id=MID, connections=128, flags=StartFlags.VERIFY_MEMORY),
        Start(migration_id=MID, flags=StartFlags.LOCAL | StartFlags.VERIFY_MEMORY),
        Config(b""),
        Config(b'{"a": "\xc3\xa9"}'),
        Config(bytes(1 * MiB)),
        MemoryFd(7, 0x1_0000_0000, 2 * MiB),
        State(b'{"regs": [1, 2, 3]}'),
        Complete(),
        Complete(b'{"memory_digest": "x"}'),
        Abandon(),
        Abandon("disk full \u2603"),
        Abandon("operator cancelled", cancelled=True),
    ],
    ids=repr,
)
def test_request_round_trip(event, version):
    command = {
        Start: Command.START,
        Config: Command.CONFIG,
        MemoryFd: Command.MEMORY_FD,
        State: Command.STATE,
        Complete: Command.COMPLETE,
        Abandon: Command.ABANDON,
    }[type(event)]
    path = next(
        p for s, p in shortest_paths(ConnectionRole.MAIN).items() if (s, command) in TRANSITIONS
    )
    if isinstance(event, Start):
        event = replace(event, version=version)
    pair = ConnectionPair(version=version)
    pair.advance(path)
    events, response = pair.exchange(event)
    assert events == [event]
    assert response.ok and response.command is command


@pytest.mark.parametrize("version", VERSIONS)
def test_memory_round_trip_various_tables(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START, Command.CONFIG))
    for table in (
        RangeTable(),
        RangeTable.full(PAGE_SIZE),
        RangeTable.from_pages(range(0, 200, 3), base_gpa=1 << 32),
        RangeTable([(8 * PAGE_SIZE, PAGE_SIZE), (0, PAGE_SIZE)]),  # any order is fine
    ):
        pages = bytes(table.total_bytes)
        events, response = pair.exchange(Memory(table), pages)
        assert events[0] == MemoryRequest(table, table.total_bytes)
        assert events[-1] == EndOfPayload()
        assert response.ok


@pytest.mark.parametrize("version", VERSIONS)
def test_abandon_reason_is_cut_to_4k(version):
    pair = ConnectionPair(version=version)
    events, _ = pair.exchange(Abandon("\u00e9" * 5000))
    (abandon,) = events
    assert abandon.reason == "\u00e9" * 2048


# -- feeding patterns -----------------------------------------------------------------


def _request_cases():
    cases = []
    for command, path in [
        (Command.START, ()),
        (Command.MEMORY_FD, (Command.START,)),
        (Command.CONFIG, (Command.START,)),
        (Command.MEMORY, (Command.START, Command.CONFIG)),
        (Command.STATE, (Command.START, Command.CONFIG)),
        (Command.COMPLETE, (Command.START, Command.CONFIG, Command.STATE)),
        (Command.ABANDON, (Command.START,)),
    ]:
        cases.append(pytest.param(command, path, id=command.name))
    return cases


def _expected_events(command, version):
    event, _ = default_request(command, version)
    if command is Command.MEMORY:
        return [MemoryRequest(TABLE, len(PAGES)), PayloadData(PAGES, 0), EndOfPayload()]
    return [event]


def _request_bytes(pair, command):
    event, payload = default_request(command, pair.version)
    return pair.sender.send(event) + payload


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("command", "path"), _request_cases())
def test_request_fed_whole(command, path, version):
    pair = ConnectionPair(version=version)
    pair.advance(path)
    pair.receiver.receive_data(_request_bytes(pair, command))
    assert drain(pair.receiver) == _expected_events(command, version)
    assert pair.receiver.awaiting_response
    assert pair.receiver.bytes_wanted() == 0
    assert pair.respond().ok


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("command", "path"), _request_cases())
def test_request_fed_byte_by_byte(command, path, version):
    pair = ConnectionPair(version=version)
    pair.advance(path)
    data = _request_bytes(pair, command)
    events = []
    for i in range(len(data)):
        wanted = pair.receiver.bytes_wanted()
        assert wanted >= 1
        pair.receiver.receive_data(data[i : i + 1])
        while True:
            event = pair.receiver.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, (EndOfPayload, Start, Config, MemoryFd, State, Complete, Abandon)):
                assert i == len(data) - 1, "a request completed before its last byte"
                break
        if i < len(data) - 1 and command is not Command.MEMORY:
            assert events == []
    if command is Command.MEMORY:
        assert events[0] == MemoryRequest(TABLE, len(PAGES))
        data_events = [e for e in events if isinstance(e, PayloadData)]
        assert len(data_events) == len(PAGES)
        assert [e.offset for e in data_events] == list(range(len(PAGES)))
        assert b"".join(e.data for e in data_events) == PAGES
        assert events[-1] == EndOfPayload()
    else:
        assert events == _expected_events(command, version)
    assert pair.respond().ok


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("command", "path"), _request_cases())
def test_trailing_bytes_are_left_unconsumed(command, path, version):
    pair = ConnectionPair(version=version)
    pair.advance(path)
    trailing = b"\x02\x00rest-of-next-request"
    pair.receiver.receive_data(_request_bytes(pair, command) + trailing)
    assert drain(pair.receiver) == _expected_events(command, version)
    # The next request is not parsed until this one is answered ...
    with pytest.raises(LocalProtocolError, match="answer"):
        pair.receiver.next_event()
    pair.respond()
    # ... and the trailing bytes are all still there: a 16-byte header is complete.
    assert pair.receiver.bytes_wanted() == 0
    with pytest.raises(RemoteProtocolError):
        pair.receiver.next_event()


@pytest.mark.parametrize("version", VERSIONS)
def test_back_to_back_requests_in_one_buffer(version):
    pair = ConnectionPair(version=version)
    sender = pair.sender
    data = sender.send(Start(version=version, migration_id=MID))
    pair.receiver.receive_data(data)
    assert drain(pair.receiver) == [Start(version=version, migration_id=MID)]
    pair.sender.receive_data(pair.receiver.send(Ok()))
    assert pair.sender.next_event().ok
    # Two requests at once (as a pipelining peer would send) are parsed one at a time.
    pair.receiver.receive_data(sender.send(Config(b"{}")) + raw_request(Command.MEMORY))
    assert drain(pair.receiver) == [Config(b"{}")]
    pair.receiver.send(Ok())
    events = drain(pair.receiver)
    assert events[0] == MemoryRequest(TABLE, len(PAGES))
    assert events[-1] == EndOfPayload()


# -- MEMORY payload handling ----------------------------------------------------------


def _memory_pair(version=PROTOCOL_VERSION):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START, Command.CONFIG))
    return pair


def test_memory_payload_via_payload_received():
    pair = _memory_pair()
    header = pair.sender.send(Memory(TABLE))
    receiver = pair.receiver
    receiver.receive_data(header)
    assert receiver.next_event() == MemoryRequest(TABLE, len(PAGES))
    assert receiver.payload_remaining == len(PAGES)
    assert receiver.bytes_wanted() == len(PAGES)
    assert receiver.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError, match="outstanding"):
        receiver.send(Ok())
    receiver.payload_received(PAGE_SIZE)
    assert receiver.payload_received_bytes == PAGE_SIZE
    assert receiver.bytes_wanted() == len(PAGES) - PAGE_SIZE
    with pytest.raises(LocalProtocolError, match="outstanding"):
        receiver.payload_received(len(PAGES))
    with pytest.raises(LocalProtocolError):
        receiver.payload_received(-1)
    receiver.payload_received(len(PAGES) - PAGE_SIZE)
    assert receiver.bytes_wanted() == 0
    assert receiver.awaiting_response
    assert receiver.next_event() == EndOfPayload()
    pair.sender.receive_data(receiver.send(Ok()))
    assert pair.sender.next_event().ok
    with pytest.raises(LocalProtocolError, match="outside"):
        receiver.payload_received(1)


@pytest.mark.parametrize("version", VERSIONS)
def test_ok_may_follow_payload_received_without_end_of_payload(version):
    pair = _memory_pair(version)
    pair.receiver.receive_data(pair.sender.send(Memory(TABLE)))
    assert isinstance(pair.receiver.next_event(), MemoryRequest)
    pair.receiver.payload_received(len(PAGES))
    assert pair.respond().ok
    assert pair.receiver.state is S.CONFIGURED


def test_payload_received_refused_while_bytes_are_buffered():
    pair = _memory_pair()
    pair.receiver.receive_data(pair.sender.send(Memory(TABLE)) + PAGES[:10])
    assert isinstance(pair.receiver.next_event(), MemoryRequest)
    with pytest.raises(LocalProtocolError, match="buffered"):
        pair.receiver.payload_received(1)
    assert pair.receiver.next_event() == PayloadData(PAGES[:10], 0)
    pair.receiver.payload_received(len(PAGES) - 10)
    assert pair.receiver.next_event() == EndOfPayload()


def test_mixed_payload_data_and_payload_received_offsets():
    pair = _memory_pair()
    pair.receiver.receive_data(pair.sender.send(Memory(TABLE)))
    assert isinstance(pair.receiver.next_event(), MemoryRequest)
    pair.receiver.payload_received(100)
    pair.receiver.receive_data(PAGES[100:300])
    assert pair.receiver.next_event() == PayloadData(PAGES[100:300], 100)
    pair.receiver.receive_data(PAGES[300:])
    assert pair.receiver.next_event() == PayloadData(PAGES[300:], 300)
    assert pair.receiver.next_event() == EndOfPayload()


@pytest.mark.parametrize("version", VERSIONS)
def test_reading_bytes_wanted_keeps_pages_out_of_the_buffer(version):
    """An I/O layer that reads exactly bytes_wanted() never sees PayloadData."""
    sender = SenderConnection(version=version)
    receiver = ReceiverConnection(version=version)
    stream = bytearray()
    requests = [
        (Start(version=version, migration_id=MID), b""),
        (Config(b"{}"), b""),
        (Memory(TABLE), PAGES),
        (Memory(RangeTable.full(3 * PAGE_SIZE)), bytes(range(256)) * 48),
        (State(b"{}"), b""),
    ]
    guest = bytearray()
    for event, payload in requests:
        stream += sender.send(event) + payload
        sender.receive_data(encode_response_header(Status.OK))
        assert sender.next_event().ok
    pos = 0
    seen = []
    while True:
        event = receiver.next_event()
        if event is NEED_DATA:
            wanted = receiver.bytes_wanted()
            assert wanted > 0
            if pos == len(stream):
                break
            receiver.receive_data(bytes(stream[pos : pos + wanted]))
            pos += wanted
        elif isinstance(event, MemoryRequest):
            wanted = receiver.bytes_wanted()
            assert wanted == event.payload_bytes
            guest += stream[pos : pos + wanted]  # the I/O layer's recv_into(guest_view)
            pos += wanted
            receiver.payload_received(wanted)
        else:
            assert not isinstance(event, PayloadData)
            seen.append(type(event).__name__)
            receiver.send(Ok())
    assert seen == ["Start", "Config", "EndOfPayload", "EndOfPayload", "State"]
    assert bytes(guest) == PAGES + bytes(range(256)) * 48
    assert receiver.state is S.STATE_RECEIVED


@pytest.mark.parametrize("version", VERSIONS)
def test_receiver_error_in_the_middle_of_a_payload_kills_the_connection(version):
    pair = _memory_pair(version)
    pair.receiver.receive_data(pair.sender.send(Memory(TABLE)))
    assert isinstance(pair.receiver.next_event(), MemoryRequest)
    data = pair.receiver.send(Error("range outside guest memory"))
    assert data[:2] == struct.pack("<H", Status.ERROR)
    assert pair.receiver.state is S.ABORTED
    with pytest.raises(LocalProtocolError):
        pair.receiver.next_event()
    with pytest.raises(LocalProtocolError):
        pair.receiver.send(Error("again"))


# -- receiver: protocol errors --------------------------------------------------------


def _assert_rejected(receiver: ReceiverConnection, data: bytes, match: str) -> None:
    receiver.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        while receiver.next_event() is not NEED_DATA:
            pass
    assert isinstance(info.value, BaseProtocolError)
    assert info.value.status == Status.ERROR
    assert receiver.state is S.ABORTED
    # The error can still be answered, once; afterwards everything raises.
    response = receiver.send(Error(info.value.message))
    status, padding, _ = struct.unpack("<H6sQ", response[:16])
    assert (status, padding) == (Status.ERROR, bytes(6))
    assert response[16:].decode() == info.value.message[:4096]
    with pytest.raises(RemoteProtocolError, match=match):
        receiver.next_event()
    with pytest.raises(LocalProtocolError):
        receiver.send(Error("twice"))
    with pytest.raises(LocalProtocolError):
        receiver.send(Ok())
    assert receiver.bytes_wanted() == 0


# The raw bytes below are version 2's (no sequence numbers); version 3's own rules are in
# test_proto_resume.py, and what both share runs against either in the tests above.


def _established():
    return ReceiverConnection(migration_id=MID, version=2)


def _configured():
    pair = ConnectionPair(version=2)
    pair.advance((Command.START, Command.CONFIG))
    return pair.receiver


def _start_bytes(version=2, flags=0, mid=MID, connections=1, reserved=0):
    payload = struct.pack("<II16sII", version, flags, mid, connections, reserved)
    return encode_request_header(Command.START, len(payload)) + payload


def _memory_bytes(pairs, page_bytes=None, count=None, reserved=0, length=None):
    table = b"".join(struct.pack("<QQ", g, n) for g, n in pairs)
    if page_bytes is None:
        page_bytes = sum(n for _, n in pairs)
    count = len(pairs) if count is None else count
    headers = struct.pack("<IH", count, reserved)
    if length is None:
        length = len(table) + page_bytes
    return encode_request_header(Command.MEMORY, length, headers) + table


@pytest.mark.parametrize(
    ("make", "data", "match"),
    [
        (_established, encode_request_header(0, 0), "INVALID"),
        (_established, encode_request_header(99, 0), "unknown command 99"),
        (_established, encode_request_header(0xFFFF, 0), "unknown command 65535"),
        (_established, encode_request_header(Command.CONFIG, 2) + b"{}", "CONFIG in state ESTAB"),
        (_established, _start_bytes(version=1), "version 1"),
        (_established, _start_bytes(version=3), "START for protocol version 3 on a connection "
                                                "that said hello with version 2"),
        (_established, _start_bytes(version=4), "version 4"),
        (_established, _start_bytes(version=0), "version 0"),
        (_established, _start_bytes(flags=16), "unknown flags"),
        (_established, _start_bytes(reserved=1), "reserved"),
        (_established, _start_bytes(connections=0), "0 connections"),
        (_established, _start_bytes(connections=129), "129 connections"),
        (_established, _start_bytes(mid=bytes(16)), "migration"),
        (_established, encode_request_header(Command.START, 31), "31-byte payload"),
        (
            _established,
            encode_request_header(Command.START, 32, b"\x01" + bytes(5)),
            "non-zero command headers",
        ),
        (_established, encode_request_header(Command.ABANDON, 0, bytes(4) + b"\x02\x00"),
         "ABANDON with command headers"),
        (_established, encode_request_header(Command.ABANDON, 0, b"\x01" + bytes(5)),
         "ABANDON with command headers"),
        (
            lambda: _started(StartFlags.NONE),
            encode_request_header(Command.MEMORY_FD, 16, bytes(6)) + struct.pack("<QQ", 0, 4096),
            "LOCAL",
        ),
        (
            lambda: _started(StartFlags.LOCAL),
            encode_request_header(Command.MEMORY_FD, 16, bytes(4) + b"\x01\x00"),
            "reserved",
        ),
        (
            lambda: _started(StartFlags.LOCAL),
            encode_request_header(Command.MEMORY_FD, 16, bytes(6)) + struct.pack("<QQ", 1, 4096),
            "aligned",
        ),
        (
            lambda: _started(StartFlags.LOCAL),
            encode_request_header(Command.MEMORY_FD, 16, bytes(6)) + struct.pack("<QQ", 0, 0),
            "size 0",
        ),
        (
            lambda: _started(StartFlags.LOCAL),
            encode_request_header(Command.MEMORY_FD, 17, bytes(6)),
            "17-byte payload",
        ),
        (
            lambda: _started(StartFlags.NONE),
            encode_request_header(Command.CONFIG, 1 * MiB + 1),
            "limit",
        ),
        (_configured, encode_request_header(Command.STATE, 16 * MiB + 1), "limit"),
        (_configured, encode_request_header(Command.ABANDON, 4 * KiB + 1), "limit"),
        (_configured, _memory_bytes([(0, 4096)], reserved=4), "unknown flags"),
        (_configured, _memory_bytes([(0, 4096)], reserved=3), "both ZERO and ZSTD"),
        (_configured, _memory_bytes([(0, 4096)], reserved=1), "ZERO MEMORY with 4096"),
        (_configured, _memory_bytes([(0, 4096)], reserved=2), "START did not set COMPRESS"),
        (_configured, _memory_bytes([], count=MAX_RANGES_PER_REQUEST + 1), "ranges"),
        (_configured, _memory_bytes([(0, 4096)], length=15), "fewer than"),
        (
            _configured,
            _memory_bytes([(0, 4096)], page_bytes=MAX_MEMORY_PAYLOAD + 1),
            "page bytes; the limit",
        ),
        (_configured, _memory_bytes([(0, 4096)], page_bytes=8192), "announces 8192"),
        (_configured, _memory_bytes([(0, 8192)], page_bytes=4096), "announces 4096"),
        (_configured, _memory_bytes([(100, 4096)]), "aligned"),
        (_configured, _memory_bytes([(0, 100)], page_bytes=100), "aligned"),
        (_configured, _memory_bytes([(0, 0)]), "length 0"),
        (_configured, _memory_bytes([((1 << 64) - 4096, 8192)]), "64-bit"),
        (_configured, _memory_bytes([(0, (1 << 63))], page_bytes=4096), "limit"),
        (
            _configured,
            encode_request_header(Command.STATE, 2, b"\x00\x00\x00\x00\x00\x01") + b"{}",
            "non-zero command headers",
        ),
    ],
)
def test_receiver_rejects(make, data, match):
    _assert_rejected(make(), data, match)


def _started(flags):
    pair = ConnectionPair(version=2)
    pair.exchange(Start(migration_id=MID, flags=flags, version=2))
    return pair.receiver


def test_memory_role_rejects_everything_but_memory_and_abandon():
    receiver = ReceiverConnection(ConnectionRole.MEMORY)
    assert receiver.state is S.STREAMING
    _assert_rejected(receiver, raw_request(Command.START), "START in state STREAMING")


def test_receiver_without_migration_id_accepts_any_start():
    receiver = ReceiverConnection(version=2)
    receiver.receive_data(_start_bytes(mid=bytes(16)))
    assert receiver.next_event() == Start(migration_id=bytes(16), version=2)


@pytest.mark.parametrize(
    ("setup", "data", "match"),
    [
        ((), encode_request_header(Command.START, 32)[:7], "request header"),
        ((), encode_request_header(Command.START, 32) + bytes(5), "START request"),
        (
            (Command.START, Command.CONFIG),
            _memory_bytes([(0, 8192)])[:40],
            "MEMORY request",
        ),
        (
            (Command.START, Command.CONFIG),
            _memory_bytes([(0, 8192)]) + bytes(100),
            "page bytes",
        ),
    ],
)
def test_eof_in_the_middle_of_a_request(setup, data, match):
    pair = ConnectionPair(version=2)
    pair.advance(setup)
    receiver = pair.receiver
    receiver.receive_data(data)
    receiver.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=match):
        drain(receiver)
    assert receiver.state is S.ABORTED
    receiver.send(Error("eof"))


def test_eof_between_requests_is_connection_closed():
    pair = ConnectionPair()
    pair.advance((Command.START,))
    pair.receiver.receive_data(b"")
    assert pair.receiver.next_event() == ConnectionClosed()
    assert pair.receiver.state is S.STARTED  # the I/O layer decides what an early EOF means
    with pytest.raises(LocalProtocolError, match="after EOF"):
        pair.receiver.receive_data(b"x")


def test_receiver_refuses_answers_with_nothing_to_answer():
    receiver = ReceiverConnection()
    with pytest.raises(LocalProtocolError, match="no request"):
        receiver.send(Ok())
    with pytest.raises(LocalProtocolError, match="no request"):
        receiver.send(Error("x"))
    with pytest.raises(LocalProtocolError):
        receiver.send(Config(b""))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        ReceiverConnection(ConnectionRole.INVALID)


def test_error_message_is_cut_to_4k_on_the_wire():
    receiver = ReceiverConnection(version=2)
    receiver.receive_data(raw_request(Command.START))
    receiver.next_event()
    data = receiver.send(Error("x" * 10000))
    assert struct.unpack("<Q", data[8:16])[0] == 4096
    assert len(data) == 16 + 4096


# -- sender: ordering and arguments ---------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_sender_refuses_out_of_order_requests(version):
    sender = SenderConnection(version=version)
    with pytest.raises(LocalProtocolError, match="cannot send CONFIG in state ESTABLISHED"):
        sender.send(Config(b"{}"))
    sender.send(Start(version=version, migration_id=MID))
    with pytest.raises(LocalProtocolError, match="waiting for the response to START"):
        sender.send(Config(b"{}"))
    sender.receive_data(encode_response_header(Status.OK))
    assert sender.next_event() == Response(Status.OK, "", Command.START)
    with pytest.raises(LocalProtocolError, match="MEMORY in state STARTED"):
        sender.send(Memory(TABLE))
    with pytest.raises(LocalProtocolError, match="LOCAL"):
        sender.send(MemoryFd(0, 0, 4096))
    with pytest.raises(LocalProtocolError, match="STATE in state STARTED"):
        sender.send(State(b"{}"))
    assert sender.outstanding == ()
    assert sender.state is S.STARTED


def test_sender_memory_returns_header_and_table_only():
    pair = _memory_pair()
    data = pair.sender.send(Memory(TABLE))
    assert len(data) == 16 + 16 * len(TABLE)
    command, headers, length = struct.unpack("<H6sQ", data[:16])
    assert command == Command.MEMORY
    assert headers == encode_memory_headers(len(TABLE))
    assert length == 16 * len(TABLE) + TABLE.total_bytes
    assert data[16:] == TABLE.encode()
    assert Memory(TABLE).payload_bytes == len(PAGES)


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (Start(migration_id=MID, connections=0), "connections"),
        (Start(migration_id=MID, connections=129), "connections"),
        (Start(migration_id=b"short"), "16 bytes"),
        (Start(migration_id=MID, flags=StartFlags(16)), "flags"),
        (Start(migration_id=MID, version=1 << 32), "version 4294967296 on a version 3"),
    ],
)
def test_sender_refuses_bad_start(event, match):
    sender = SenderConnection()
    with pytest.raises(LocalProtocolError, match=match):
        sender.send(event)
    assert sender.outstanding == ()
    sender.send(Start(migration_id=MID))  # still usable


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (Memory(RangeTable([(100, 4096)])), "aligned"),
        (Memory(RangeTable([(0, 100)])), "aligned"),
        (Memory(RangeTable.full(MAX_MEMORY_PAYLOAD + PAGE_SIZE)), "limit"),
        (State(bytes(16 * MiB + 1)), "limit"),
    ],
)
def test_sender_refuses_bad_payloads(event, match):
    pair = _memory_pair()
    with pytest.raises(LocalProtocolError, match=match):
        pair.sender.send(event)
    assert pair.sender.outstanding == ()


def test_sender_refuses_oversized_config():
    pair = ConnectionPair()
    pair.advance((Command.START,))
    with pytest.raises(LocalProtocolError, match="limit"):
        pair.sender.send(Config(bytes(1 * MiB + 1)))


def test_sender_refuses_bad_memory_fd():
    pair = ConnectionPair()
    pair.exchange(Start(migration_id=MID, flags=StartFlags.LOCAL))
    with pytest.raises(LocalProtocolError, match="aligned"):
        pair.sender.send(MemoryFd(0, 1, 4096))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        pair.sender.send(MemoryFd(1 << 32, 0, 4096))


def test_sender_refuses_non_requests_and_bad_roles():
    with pytest.raises(LocalProtocolError):
        SenderConnection().send(Ok())  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        SenderConnection(ConnectionRole.INVALID)
    with pytest.raises(LocalProtocolError):
        SenderConnection(ConnectionRole.MAIN, max_outstanding=2)
    with pytest.raises(LocalProtocolError):
        SenderConnection(ConnectionRole.MEMORY, max_outstanding=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_abandon_queues_behind_an_outstanding_request(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START,))
    data = pair.sender.send(Config(b"{}")) + pair.sender.send(Abandon("stop"))
    assert pair.sender.outstanding == (Command.CONFIG, Command.ABANDON)
    with pytest.raises(LocalProtocolError, match="ABANDON was already sent"):
        pair.sender.send(Abandon())
    pair.receiver.receive_data(data)
    assert drain(pair.receiver) == [Config(b"{}")]
    first = pair.respond()
    assert first.ok and first.command is Command.CONFIG
    assert pair.sender.state is S.CONFIGURED
    assert drain(pair.receiver) == [Abandon("stop")]
    second = pair.respond()
    assert second.ok and second.command is Command.ABANDON
    assert pair.sender.state is S.ABORTED is pair.receiver.state


@pytest.mark.parametrize("version", VERSIONS)
def test_abandon_refused_after_complete_or_abort(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START, Command.CONFIG, Command.STATE))
    pair.sender.send(Complete())
    with pytest.raises(LocalProtocolError, match="ABANDON in state COMPLETED"):
        pair.sender.send(Abandon())
    pair = ConnectionPair(version=version)
    pair.request(Start(version=version, migration_id=MID))
    pair.respond(Error("no"))
    with pytest.raises(LocalProtocolError, match="ABORTED"):
        pair.sender.send(Abandon())


# -- sender: reading responses --------------------------------------------------------


def _waiting_sender(version=PROTOCOL_VERSION):
    sender = SenderConnection(version=version)
    sender.send(Start(migration_id=MID, version=version))
    return sender


def test_response_fed_byte_by_byte_and_with_message():
    sender = _waiting_sender()
    data = encode_response_header(Status.ERROR, 5) + b"nope!"
    for i, byte in enumerate(data):
        assert sender.next_event() is NEED_DATA
        assert sender.bytes_wanted() >= 1
        sender.receive_data(bytes([byte]))
        if i < len(data) - 1:
            assert sender.next_event() is NEED_DATA
    assert sender.next_event() == Response(Status.ERROR, "nope!", Command.START)
    assert sender.state is S.ABORTED
    assert sender.bytes_wanted() == 0


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack("<H6sQ", 0, bytes(6), 0), "invalid status 0"),
        (struct.pack("<H6sQ", 4, bytes(6), 0), "invalid status 4"),
        (struct.pack("<H6sQ", 1, b"\x01" + bytes(5), 0), "padding"),
        (struct.pack("<H6sQ", 2, bytes(6), 4097), "limit"),
    ],
)
def test_sender_rejects_malformed_responses(data, match, version):
    sender = _waiting_sender(version)
    sender.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        sender.next_event()
    assert sender.state is S.ABORTED
    with pytest.raises(RemoteProtocolError, match=match):
        sender.next_event()
    with pytest.raises(LocalProtocolError, match="failed"):
        sender.send(Config(b"{}"))
    # Reading failed, writing may not have: ABANDON can still tell the receiver why, once.
    headers = encode_sequenced_headers(2) if version >= RESUMABLE_VERSION else NO_HEADERS
    assert sender.send(Abandon("bye")).startswith(
        encode_request_header(Command.ABANDON, 3, headers))
    with pytest.raises(LocalProtocolError, match="ABANDON was already sent"):
        sender.send(Abandon())


def test_sender_rejects_unsolicited_response():
    sender = SenderConnection()
    sender.receive_data(encode_response_header(Status.OK))
    with pytest.raises(RemoteProtocolError, match="no request outstanding"):
        sender.next_event()


def test_sender_eof_with_outstanding_request():
    sender = _waiting_sender()
    sender.receive_data(encode_response_header(Status.OK)[:3])
    sender.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=r"1 request\(s\) unanswered \(START\)"):
        sender.next_event()


def test_sender_eof_when_idle_is_connection_closed():
    sender = SenderConnection()
    assert sender.next_event() is NEED_DATA
    assert sender.bytes_wanted() == 0
    sender.receive_data(b"")
    assert sender.next_event() == ConnectionClosed()


def test_response_trailing_bytes_stay_buffered():
    pair = ConnectionPair(ConnectionRole.MEMORY, max_outstanding=2)
    pair.sender.send(Memory(TABLE))
    pair.sender.send(Memory(TABLE))
    ok = encode_response_header(Status.OK)
    pair.sender.receive_data(ok + ok[:5])
    assert pair.sender.next_event().ok
    assert pair.sender.next_event() is NEED_DATA
    assert pair.sender.bytes_wanted() == 11
    pair.sender.receive_data(ok[5:])
    assert pair.sender.next_event().ok


# -- MEMORY role: pipelining ----------------------------------------------------------


def test_memory_role_pipeline():
    pair = ConnectionPair(ConnectionRole.MEMORY, max_outstanding=3)
    assert pair.sender.state is S.STREAMING
    tables = [RangeTable.full(PAGE_SIZE, base_gpa=i * PAGE_SIZE) for i in range(3)]
    stream = b"".join(
        pair.sender.send(Memory(t)) + bytes([i]) * PAGE_SIZE for i, t in enumerate(tables)
    )
    assert pair.sender.outstanding == (Command.MEMORY,) * 3
    with pytest.raises(LocalProtocolError, match="3 outstanding, limit 3"):
        pair.sender.send(Memory(tables[0]))
    with pytest.raises(LocalProtocolError, match="START in state STREAMING"):
        pair.sender.send(Start(migration_id=MID))
    pair.receiver.receive_data(stream)
    responses = b""
    for i, table in enumerate(tables):
        events = drain(pair.receiver)
        assert events[0] == MemoryRequest(table, PAGE_SIZE)
        assert events[1] == PayloadData(bytes([i]) * PAGE_SIZE, 0)
        assert events[-1] == EndOfPayload()
        responses += pair.receiver.send(Ok())
    # Responses come back in order and free pipeline slots one by one.
    pair.sender.receive_data(responses)
    for _ in tables:
        response = pair.sender.next_event()
        assert response == Response(Status.OK, "", Command.MEMORY)
        pair.sender.send(Memory(tables[0]))  # a slot was freed
        with pytest.raises(LocalProtocolError):
            pair.sender.send(Memory(tables[0]))
    assert pair.sender.state is S.STREAMING


def test_memory_role_default_depth_and_abandon():
    pair = ConnectionPair(ConnectionRole.MEMORY)
    assert pair.sender.max_outstanding == 4
    events, response = pair.exchange(Abandon("bye"))
    assert events == [Abandon("bye")] and response.ok
    assert pair.receiver.state is S.ABORTED is pair.sender.state


def test_memory_role_error_poisons_the_rest_of_the_pipeline():
    pair = ConnectionPair(ConnectionRole.MEMORY, max_outstanding=2)
    stream = pair.sender.send(Memory(TABLE)) + PAGES + pair.sender.send(Memory(TABLE)) + PAGES
    pair.receiver.receive_data(stream)
    drain(pair.receiver)
    answers = pair.receiver.send(Error("write failed"))
    with pytest.raises(RemoteProtocolError, match="in state ABORTED"):
        drain(pair.receiver)
    answers += pair.receiver.send(Error("aborted"))
    pair.sender.receive_data(answers)
    first = pair.sender.next_event()
    assert first == Response(Status.ERROR, "write failed", Command.MEMORY)
    assert pair.sender.state is S.ABORTED
    with pytest.raises(LocalProtocolError, match="ABORTED"):
        pair.sender.send(Memory(TABLE))
    second = pair.sender.next_event()
    assert not second.ok and pair.sender.state is S.ABORTED
    assert pair.sender.outstanding == ()


def test_late_ok_after_error_does_not_revive_the_sender():
    sender = SenderConnection(ConnectionRole.MEMORY, max_outstanding=2)
    sender.send(Memory(TABLE))
    sender.send(Memory(TABLE))
    sender.receive_data(encode_response_header(Status.ERROR) + encode_response_header(Status.OK))
    assert not sender.next_event().ok
    assert sender.next_event().ok
    assert sender.state is S.ABORTED


def test_start_payload_helper_matches_sender():
    sender = SenderConnection()
    data = sender.send(Start(migration_id=MID, connections=2, flags=StartFlags.LOCAL))
    assert data[16:] == encode_start_payload(PROTOCOL_VERSION, StartFlags.LOCAL, MID, 2)


# --- a receiver that cancels -------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_receiver_cancels_between_requests_and_the_sender_reads_it_unprompted(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START,))
    data = pair.receiver.send(Cancel("operator said stop"))
    assert pair.receiver.state is ReceiverState.ABORTED
    pair.sender.receive_data(data)
    response = pair.sender.next_event()
    assert isinstance(response, Response) and response.cancelled and not response.ok
    assert response.message == "operator said stop" and response.command is Command.INVALID
    assert pair.sender.state is ReceiverState.ABORTED
    with pytest.raises(LocalProtocolError):
        pair.sender.send(Config(b"{}"))
    with pytest.raises(LocalProtocolError):
        pair.receiver.send(Cancel("again"))  # the connection is over


@pytest.mark.parametrize("version", VERSIONS)
def test_a_cancel_answers_whatever_is_outstanding(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START, Command.CONFIG))
    pair.request(Memory(TABLE), PAGES)  # answered by the cancel instead of OK
    pair.sender.receive_data(pair.receiver.send(Cancel("stop")))
    response = pair.sender.next_event()
    assert response.cancelled and response.command is Command.MEMORY
    assert pair.sender.outstanding == ()


def test_only_main_cancels_and_an_unprompted_error_is_still_a_protocol_error():
    pair = ConnectionPair(ConnectionRole.MEMORY)
    with pytest.raises(LocalProtocolError, match="MAIN"):
        pair.receiver.send(Cancel("x"))
    sender = SenderConnection()
    sender.receive_data(encode_response_header(Status.ERROR, 1) + b"x")
    with pytest.raises(RemoteProtocolError, match="no request outstanding"):
        sender.next_event()


# --- zero ranges and compressed frames -------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_a_zero_range_carries_no_page_bytes(version):
    pair = ConnectionPair(version=version)
    pair.advance((Command.START, Command.CONFIG))
    events = pair.request(Memory(TABLE, MemoryFlags.ZERO))
    assert events == [MemoryRequest(TABLE, 0, MemoryFlags.ZERO), EndOfPayload()]
    assert pair.respond().ok


@pytest.mark.parametrize("version", VERSIONS)
def test_a_compressed_frame_needs_compress_in_start_and_is_handed_over_as_bytes(version):
    pair = ConnectionPair(version=version)
    start = Start(version=version, migration_id=MID, connections=1, flags=StartFlags.COMPRESS)
    _, response = pair.exchange(start)
    assert response.ok and pair.receiver.start.compress
    pair.advance((Command.CONFIG,))
    frame = b"z" * 10  # the core does not look inside
    events = pair.request(Memory(TABLE, MemoryFlags.ZSTD, len(frame)), frame)
    assert events[0] == MemoryRequest(TABLE, 10, MemoryFlags.ZSTD)
    assert isinstance(events[-1], EndOfPayload)
    assert pair.respond().ok
    with pytest.raises(LocalProtocolError, match="0-byte compressed"):
        pair.sender.send(Memory(TABLE, MemoryFlags.ZSTD, 0))
