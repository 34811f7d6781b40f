"""The FAULT connection's sans-IO ends: page requests and their answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmig.proto import NEED_DATA, ConnectionClosed, EndOfPayload, RemoteProtocolError, wire
from vmig.proto.postcopy import PageRequest, PageRequester, Pages, PageServer
from vmig.ranges import RangeTable

PAGE = 4096
WANT = RangeTable([(0x10000, PAGE), (0x40000, 2 * PAGE)])


def test_a_request_and_its_answer_byte_by_byte():
    requester, server = PageRequester(), PageServer()
    for byte in requester.request(WANT):
        assert server.next_event() is NEED_DATA
        server.receive_data(bytes([byte]))
    assert server.next_event() == PageRequest(WANT)
    answer = server.answer(WANT) + bytes(range(256)) * (3 * PAGE // 256)
    requester.receive_data(answer[:20])
    assert requester.next_event() is NEED_DATA
    requester.receive_data(answer[20:wire.HEADER_SIZE + 32])
    assert requester.next_event() == Pages(WANT, 3 * PAGE)
    assert requester.bytes_wanted() == 3 * PAGE
    requester.payload_received(3 * PAGE)  # read straight into guest memory
    assert requester.next_event() == EndOfPayload()
    assert requester.outstanding == 0
    requester.receive_data(b"")
    assert isinstance(requester.next_event(), ConnectionClosed)


def test_answers_must_match_their_requests_in_order():
    requester = PageRequester()
    requester.request(WANT)
    requester.receive_data(PageServer.answer(RangeTable([(0, PAGE)])))
    with pytest.raises(RemoteProtocolError, match="other pages"):
        requester.next_event()
    unasked = PageRequester()
    unasked.receive_data(PageServer.answer(WANT))
    with pytest.raises(RemoteProtocolError, match="nobody asked for"):
        unasked.next_event()


def test_eof_with_requests_unanswered_is_an_error():
    requester = PageRequester()
    requester.request(WANT)
    requester.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="1 page requests unanswered"):
        requester.next_event()


def test_the_server_takes_nothing_but_fault_requests():
    server = PageServer()
    server.receive_data(wire.encode_request_header(wire.Command.START, 0))
    with pytest.raises(RemoteProtocolError, match="expected FAULT"):
        server.next_event()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), split=st.integers(1, 40))
def test_arbitrary_bytes_never_crash_either_end(data, split):
    for end in (PageServer(), PageRequester()):
        if isinstance(end, PageRequester):
            end.request(WANT)
        for i in range(0, len(data), split):
            end.receive_data(data[i:i + split])
            try:
                event = end.next_event()
            except RemoteProtocolError:
                break
            assert event is NEED_DATA or isinstance(event, PageRequest | Pages | EndOfPayload)
