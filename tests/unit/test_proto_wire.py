"""Wire layouts: header formats, hello, START payload, range tables, text limits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmig.proto import (
    HELLO_SIZE,
    PROTOCOL_VERSION,
    RESUMABLE_VERSION,
    SUPPORTED_VERSIONS,
    Command,
    ConnectionRole,
    Hello,
    LocalProtocolError,
    RemoteProtocolError,
    Status,
    encode_hello,
    encode_response,
    parse_hello,
    wire,
)
from vmig.ranges import RangeTable

MID = bytes(range(16))


def test_enum_values_are_fixed():
    assert [(c.name, c.value) for c in Command] == [
        ("INVALID", 0),
        ("START", 1),
        ("CONFIG", 2),
        ("STATE", 3),
        ("MEMORY", 4),
        ("COMPLETE", 5),
        ("ABANDON", 6),
        ("MEMORY_FD", 7),
        ("AUTH", 8),
        ("FAULT", 9),
        ("POSTCOPY", 10),
        ("PING", 11),
    ]
    assert [s.value for s in Status] == [0, 1, 2, 3]
    assert [r.value for r in ConnectionRole] == [0, 1, 2, 3]
    assert int(wire.StartFlags.LOCAL) == 1 and int(wire.StartFlags.VERIFY_MEMORY) == 2


def test_versions():
    assert PROTOCOL_VERSION == 3 == RESUMABLE_VERSION
    # version 1 had no authentication: a receiver takes no unauthenticated peer
    assert frozenset({2, 3}) == SUPPORTED_VERSIONS


def test_request_header_layout():
    data = wire.encode_request_header(Command.MEMORY, 0x0102, wire.encode_memory_headers(3))
    assert len(data) == wire.HEADER_SIZE == 16
    assert data == bytes.fromhex("04000300000000000201000000000000")
    assert wire.decode_request_header(data) == (4, bytes.fromhex("030000000000"), 0x102)
    with pytest.raises(LocalProtocolError):
        wire.encode_request_header(Command.START, -1)
    with pytest.raises(LocalProtocolError):
        wire.encode_request_header(Command.START, 0, b"\x00")


def test_response_layout_and_checks():
    data = encode_response(Status.ERROR, "bad")
    assert data == bytes.fromhex("02000000000000000300000000000000") + b"bad"
    assert wire.decode_response_header(data[:16]) == (Status.ERROR, 3)
    assert encode_response(Status.OK) == struct.pack("<H6sQ", 1, bytes(6), 0)


def test_start_payload_round_trip_and_checks():
    payload = wire.encode_start_payload(1, wire.StartFlags.VERIFY_MEMORY, MID, 8)
    assert len(payload) == wire.START_PAYLOAD_SIZE == 32
    assert wire.decode_start_payload(payload) == (1, wire.StartFlags.VERIFY_MEMORY, MID, 8, 0, 0)
    with pytest.raises(RemoteProtocolError, match="unknown flags"):
        wire.decode_start_payload(struct.pack("<II16sII", 1, 0x80, MID, 1, 0))
    with pytest.raises(RemoteProtocolError, match="reserved"):
        wire.decode_start_payload(struct.pack("<II16sII", 1, 0, MID, 1, 5))
    with pytest.raises(RemoteProtocolError, match="31-byte"):
        wire.decode_start_payload(bytes(31))
    with pytest.raises(LocalProtocolError):
        wire.encode_start_payload(1, 0, b"x", 1)


def test_memory_fd_layout():
    assert wire.encode_memory_fd_headers(5) == bytes.fromhex("050000000000")
    assert wire.decode_memory_fd_headers(bytes.fromhex("050000000000")) == 5
    payload = wire.encode_memory_fd_payload(0x10_0000, 0x20_0000)
    assert wire.decode_memory_fd_payload(payload) == (0x10_0000, 0x20_0000)
    with pytest.raises(RemoteProtocolError, match="64-bit"):
        wire.decode_memory_fd_payload(struct.pack("<QQ", (1 << 64) - 4096, 8192))
    with pytest.raises(LocalProtocolError, match="MEMORY_FD"):  # a size u64 cannot hold
        wire.encode_memory_fd_payload(0, 1 << 64)


def test_decode_range_table():
    table = RangeTable([(0, 4096), (1 << 40, 8192)])
    assert wire.decode_range_table(table.encode(), 12288) == table
    assert wire.decode_range_table(b"", 0) == RangeTable()
    with pytest.raises(RemoteProtocolError, match="range 1"):
        wire.decode_range_table(RangeTable([(0, 4096), (10, 4096)]).encode(), 8192)
    with pytest.raises(RemoteProtocolError):
        wire.decode_range_table(bytes(17), 0)
    assert wire.range_table_problem(table) is None
    assert "aligned" in wire.range_table_problem(RangeTable([(0, 10)]))


def test_hello_round_trip():
    data = encode_hello(ConnectionRole.MEMORY, MID, 2)
    assert len(data) == HELLO_SIZE == 32
    assert data[:8] == b"VMIGCONN"
    assert data[8:16] == bytes.fromhex("0200020000000000")
    assert data[16:] == MID
    assert parse_hello(data) == Hello(ConnectionRole.MEMORY, MID, 2)
    assert parse_hello(encode_hello(ConnectionRole.MAIN, MID)).role is ConnectionRole.MAIN
    # version 3: the same layout, the reserved word now u16 index, u16 resume count
    data = encode_hello(ConnectionRole.MEMORY, MID, index=2, resume=1)
    assert data[8:16] == bytes.fromhex("0200030002000100")
    assert parse_hello(data) == Hello(ConnectionRole.MEMORY, MID, PROTOCOL_VERSION, 2, 1)
    assert parse_hello(data).resumed
    assert not parse_hello(encode_hello(ConnectionRole.MEMORY, MID, index=2)).resumed


def _hello(magic=b"VMIGCONN", role=1, version=2, reserved=0, mid=MID):
    return struct.pack("<8sHHI16s", magic, role, version, reserved, mid)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_hello(magic=b"VMIGCONX"), "bad magic"),
        (_hello(magic=b"GET / HT"), "bad magic"),
        (_hello(role=0), "invalid role 0"),
        (_hello(role=4), "invalid role 4"),
        (_hello(reserved=1), "reserved"),
        (_hello(reserved=1 << 16), "reserved"),  # a version 2 hello has no resume count
        (_hello(role=2, reserved=1), "reserved"),  # ... and no connection index
        (_hello(version=1), "version 1"),
        (_hello(version=4), "version 4"),
        (_hello(version=3, reserved=1), "MAIN hello with index 1; only MEMORY"),
        (_hello(version=3, role=3, reserved=2), "FAULT hello with index 2; only MEMORY"),
        (_hello()[:31], "31-byte hello"),
    ],
)
def test_parse_hello_rejects(data, match):
    with pytest.raises(RemoteProtocolError, match=match):
        parse_hello(data)


def test_encode_hello_checks_arguments():
    with pytest.raises(LocalProtocolError):
        encode_hello(ConnectionRole.INVALID, MID)
    with pytest.raises(LocalProtocolError):
        encode_hello(ConnectionRole.MAIN, b"short")


ROLES = (ConnectionRole.MAIN, ConnectionRole.MEMORY, ConnectionRole.FAULT)
u16 = st.integers(0, 0xFFFF)


@given(role=st.sampled_from(ROLES), mid=st.binary(min_size=16, max_size=16), index=u16,
       resume=u16)
def test_v3_hello_round_trip(role, mid, index, resume):
    if role is not ConnectionRole.MEMORY:
        index = 0  # only MEMORY connections have an index
    data = encode_hello(role, mid, 3, index=index, resume=resume)
    assert struct.unpack("<HH", data[12:16]) == (index, resume)
    assert parse_hello(data) == Hello(role, mid, 3, index, resume)
    assert parse_hello(data).resumed is (resume > 0)


@given(role=st.sampled_from(ROLES), index=u16, resume=u16)
def test_v2_hello_has_no_index_or_resume(role, index, resume):
    if index or resume:
        with pytest.raises(LocalProtocolError, match="version 2 has no connection index"):
            encode_hello(role, MID, 2, index=index, resume=resume)
        with pytest.raises(RemoteProtocolError, match="reserved field"):
            parse_hello(_hello(role=role, reserved=index | resume << 16))
    else:
        assert parse_hello(encode_hello(role, MID, 2)) == Hello(role, MID, 2)


@given(index=st.integers(1, 0xFFFF), role=st.sampled_from([ConnectionRole.MAIN,
                                                             ConnectionRole.FAULT]))
def test_only_memory_hellos_have_an_index(index, role):
    with pytest.raises(RemoteProtocolError, match="only MEMORY connections have one"):
        parse_hello(_hello(role=role, version=3, reserved=index))


@given(reconnect=u16, dead_peer=u16, connections=st.integers(1, 128))
def test_v3_start_carries_the_timeouts(reconnect, dead_peer, connections):
    payload = wire.encode_start_payload(3, wire.StartFlags.NONE, MID, connections, reconnect,
                                        dead_peer)
    assert len(payload) == wire.START_PAYLOAD_SIZE
    assert payload[28:] == struct.pack("<HH", reconnect, dead_peer)
    decoded = wire.decode_start_payload(payload)
    assert decoded == (3, wire.StartFlags.NONE, MID, connections, reconnect, dead_peer)
    assert (decoded.reconnect_timeout_s, decoded.dead_peer_timeout_s) == (reconnect, dead_peer)


@given(reconnect=u16, dead_peer=u16)
def test_v2_start_has_no_timeouts(reconnect, dead_peer):
    if not (reconnect or dead_peer):
        assert wire.decode_start_payload(wire.encode_start_payload(2, 0, MID, 1))[4:] == (0, 0)
        return
    with pytest.raises(LocalProtocolError, match="version 2 has no resume timeouts"):
        wire.encode_start_payload(2, 0, MID, 1, reconnect, dead_peer)
    raw = struct.pack("<II16sIHH", 2, 0, MID, 1, reconnect, dead_peer)
    with pytest.raises(RemoteProtocolError, match="reserved field"):
        wire.decode_start_payload(raw)


def test_start_timeouts_must_fit_u16():
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        wire.encode_start_payload(3, 0, MID, 1, 1 << 16, 10)


@given(seq=st.integers(0, 0xFFFF_FFFF), extra=u16)
def test_sequenced_headers_layout(seq, extra):
    headers = wire.encode_sequenced_headers(seq, extra)
    assert headers == struct.pack("<IH", seq, extra)
    assert wire.decode_sequenced_headers(headers) == (seq, extra)


def test_sequenced_commands_are_mains_but_memory():
    assert Command.MEMORY not in wire.SEQUENCED_COMMANDS
    assert {Command.AUTH, Command.FAULT, Command.INVALID}.isdisjoint(wire.SEQUENCED_COMMANDS)
    assert {
        Command.START, Command.CONFIG, Command.STATE, Command.COMPLETE, Command.ABANDON,
        Command.MEMORY_FD, Command.POSTCOPY, Command.PING} == wire.SEQUENCED_COMMANDS
    # ABANDON's flags keep their place; before version 3 the first word is 0
    assert wire.encode_abandon_headers(wire.AbandonFlags.CANCELLED, 7) == struct.pack("<IH", 7, 1)
    assert wire.decode_abandon_headers(struct.pack("<IH", 7, 1), sequenced=True) \
        is wire.AbandonFlags.CANCELLED
    with pytest.raises(RemoteProtocolError, match="ABANDON with command headers"):
        wire.decode_abandon_headers(struct.pack("<IH", 7, 1))


def test_encode_text_cuts_on_a_character_boundary():
    assert wire.encode_text("abc") == b"abc"
    cut = wire.encode_text("\u20ac" * 2000)  # 3 bytes each
    assert len(cut) == 4095
    assert cut.decode() == "\u20ac" * 1365


@pytest.mark.parametrize("role", [ConnectionRole.MAIN, ConnectionRole.FAULT])
def test_encode_hello_refuses_an_index_parse_hello_would_refuse(role):
    with pytest.raises(LocalProtocolError, match="only MEMORY connections have one"):
        encode_hello(role, MID, 3, index=1)
    assert parse_hello(encode_hello(role, MID, 3, resume=4)).resume == 4
