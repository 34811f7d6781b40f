"""The handshake (hello + token authentication) in the sans-IO core, including a
property-based fuzz of the exchange (hypothesis)."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmig.proto import (
    NEED_DATA,
    Authenticated,
    AuthenticationError,
    AuthMethod,
    Challenged,
    ConnectionClosed,
    ConnectionRole,
    Established,
    HelloReceived,
    LocalProtocolError,
    ReceiverHandshake,
    ReceiverHandshakeState,
    Refused,
    RemoteProtocolError,
    SenderHandshake,
    SenderHandshakeState,
    encode_hello,
    wire,
)
from vmig.proto.handshake import RECEIVER_STEPS, SENDER_STEPS, render_handshake_mermaid

MID = bytes(range(16))
TOKEN = b"a-shared-secret-of-32-characters"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

tokens = st.binary(min_size=16, max_size=64)
nonces = st.binary(min_size=16, max_size=16)
roles = st.sampled_from([ConnectionRole.MAIN, ConnectionRole.MEMORY])


def _next(side: SenderHandshake | ReceiverHandshake) -> object:
    event = side.next_event()
    assert event is not NEED_DATA
    return event


def run(sender: SenderHandshake, receiver: ReceiverHandshake, *, chunk: int = 0,
        admit: bool = True) -> tuple[object, object]:
    """Drive both ends with a perfect link (fed `chunk` bytes at a time when > 0)."""

    def feed(target: SenderHandshake | ReceiverHandshake, data: bytes) -> None:
        if not chunk:
            target.receive_data(data)
            return
        for i in range(0, len(data), chunk):
            target.receive_data(data[i:i + chunk])
            if i + chunk < len(data):
                assert target.next_event() is NEED_DATA

    feed(receiver, sender.hello())
    event = _next(receiver)
    assert isinstance(event, HelloReceived)
    if receiver.method is AuthMethod.TOKEN:
        feed(sender, receiver.challenge())
        reply = _next(sender)
        if not isinstance(reply, Challenged):
            return reply, event
        feed(receiver, sender.authenticate())
        event = _next(receiver)
        assert isinstance(event, Authenticated)
    feed(sender, receiver.admit() if admit else receiver.refuse("no"))
    return _next(sender), event


@settings(max_examples=60, deadline=None)
@given(token=tokens, n1=nonces, n2=nonces, role=roles, mid=st.binary(min_size=16, max_size=16),
       chunk=st.integers(0, 7))
def test_an_honest_exchange_establishes_both_sides(token, n1, n2, role, mid, chunk):
    sender = SenderHandshake(role, mid, token=token, nonce=n1)
    receiver = ReceiverHandshake(token=token, nonce=n2)
    result, event = run(sender, receiver, chunk=chunk)
    assert result == Established(AuthMethod.TOKEN)
    assert isinstance(event, Authenticated) and event.hello.role is role
    assert event.hello.migration_id == mid
    assert sender.state is SenderHandshakeState.ESTABLISHED
    assert receiver.state is ReceiverHandshakeState.ESTABLISHED
    assert sender.unused_data() == receiver.unused_data() == b""


def test_no_token_no_authentication():
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=None, nonce=os.urandom(16))
    receiver = ReceiverHandshake(token=None, nonce=os.urandom(16))
    result, event = run(sender, receiver)
    assert result == Established(AuthMethod.NONE) and isinstance(event, HelloReceived)


@settings(max_examples=40, deadline=None)
@given(mine=tokens, theirs=tokens, n1=nonces, n2=nonces)
def test_a_wrong_token_fails_on_the_receiver_and_never_authenticates(mine, theirs, n1, n2):
    if mine == theirs:
        return
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=mine, nonce=n1)
    receiver = ReceiverHandshake(token=theirs, nonce=n2)
    receiver.receive_data(sender.hello())
    assert isinstance(receiver.next_event(), HelloReceived)
    sender.receive_data(receiver.challenge())
    assert isinstance(sender.next_event(), Challenged)
    receiver.receive_data(sender.authenticate())
    with pytest.raises(AuthenticationError, match="does not know"):
        receiver.next_event()
    assert receiver.state is ReceiverHandshakeState.FAILED
    with pytest.raises(LocalProtocolError):
        receiver.admit()  # a failed peer cannot be admitted
    sender.receive_data(receiver.refuse("authentication failed"))
    assert sender.next_event() == Refused("authentication failed")
    assert sender.state is SenderHandshakeState.REFUSED


def challenged(role: ConnectionRole, n1: bytes, n2: bytes
               ) -> tuple[SenderHandshake, ReceiverHandshake]:
    """Both ends with the token, up to the sender's AUTH (not yet written)."""
    sender = SenderHandshake(role, MID, token=TOKEN, nonce=n1)
    receiver = ReceiverHandshake(token=TOKEN, nonce=n2)
    receiver.receive_data(sender.hello())
    receiver.next_event()
    sender.receive_data(receiver.challenge())
    sender.next_event()
    return sender, receiver


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, 63), bit=st.integers(0, 7), n1=nonces, n2=nonces)
def test_any_flipped_bit_in_the_senders_auth_fails(position, bit, n1, n2):
    sender, receiver = challenged(ConnectionRole.MEMORY, n1, n2)
    auth = bytearray(sender.authenticate())
    auth[position] ^= 1 << bit
    receiver.receive_data(bytes(auth))
    with pytest.raises(RemoteProtocolError):
        receiver.next_event()
    assert receiver.state is ReceiverHandshakeState.FAILED


@settings(max_examples=80, deadline=None)
@given(position=st.integers(16, 47), bit=st.integers(0, 7), n1=nonces, n2=nonces)
def test_any_flipped_bit_in_the_receivers_proof_fails(position, bit, n1, n2):
    """An impostor destination cannot produce the proof; the sender sends nothing after."""
    sender, receiver = challenged(ConnectionRole.MAIN, n1, n2)
    receiver.receive_data(sender.authenticate())
    receiver.next_event()
    answer = bytearray(receiver.admit())
    answer[position] ^= 1 << bit
    sender.receive_data(bytes(answer))
    with pytest.raises(RemoteProtocolError):
        sender.next_event()
    assert sender.state is SenderHandshakeState.FAILED


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), split=st.integers(1, 50), token=st.sampled_from([None, TOKEN]))
def test_arbitrary_bytes_never_crash_or_authenticate_the_receiver(data, split, token):
    """Whatever a peer sends, the receiver only ever returns events, asks for more, or
    raises RemoteProtocolError; without the token it never authenticates anyone."""
    receiver = ReceiverHandshake(token=token, nonce=bytes(16))
    pieces = [data[i:i + split] for i in range(0, len(data), split)] + [b""]
    for piece in pieces:
        receiver.receive_data(piece)
        while True:
            try:
                event = receiver.next_event()
            except RemoteProtocolError:
                assert receiver.state is ReceiverHandshakeState.FAILED
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            if isinstance(event, HelloReceived):
                if token is None:
                    return  # no token: admission is the caller's call
                receiver.challenge()
                continue
            raise AssertionError(f"random bytes authenticated: {event!r}")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), split=st.integers(1, 50))
def test_arbitrary_answers_never_establish_a_sender_with_a_token(data, split):
    """An impostor destination that answers anything gets no request from a sender."""
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=TOKEN, nonce=bytes(16))
    sender.hello()
    pieces = [data[i:i + split] for i in range(0, len(data), split)] + [b""]
    for piece in pieces:
        sender.receive_data(piece)
        while True:
            try:
                event = sender.next_event()
            except RemoteProtocolError:
                assert sender.state is SenderHandshakeState.FAILED
                return
            except LocalProtocolError:
                return  # refused: nothing more to read
            if event is NEED_DATA:
                break
            if isinstance(event, Challenged):
                sender.authenticate()
                continue
            assert not isinstance(event, Established), "an impostor was trusted"
            return


def test_a_sender_with_a_token_refuses_a_receiver_that_does_not_ask():
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=TOKEN, nonce=bytes(16))
    receiver = ReceiverHandshake(token=None, nonce=bytes(16))
    receiver.receive_data(sender.hello())
    receiver.next_event()
    sender.receive_data(receiver.admit())
    with pytest.raises(AuthenticationError, match="did not ask for the token"):
        sender.next_event()


def test_a_sender_without_a_token_is_told_to_get_one():
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=None, nonce=bytes(16))
    receiver = ReceiverHandshake(token=TOKEN, nonce=bytes(16))
    receiver.receive_data(sender.hello())
    receiver.next_event()
    sender.receive_data(receiver.challenge())
    with pytest.raises(AuthenticationError, match="requires a token"):
        sender.next_event()


def test_a_request_instead_of_auth_is_refused():
    receiver = ReceiverHandshake(token=TOKEN, nonce=bytes(16))
    receiver.receive_data(encode_hello(ConnectionRole.MAIN, MID))
    receiver.next_event()
    receiver.challenge()
    start = wire.encode_request_header(wire.Command.START, 32) + bytes(32)
    receiver.receive_data(start)
    with pytest.raises(RemoteProtocolError, match="START before authenticating; expected AUTH"):
        receiver.next_event()
    assert receiver.refuse("bad").startswith(wire.encode_response_header(wire.Status.ERROR, 3))


def test_eof_before_the_hello_is_a_clean_close_and_in_the_middle_an_error():
    receiver = ReceiverHandshake(token=TOKEN, nonce=bytes(16))
    receiver.receive_data(b"")
    assert isinstance(receiver.next_event(), ConnectionClosed)
    receiver = ReceiverHandshake(token=TOKEN, nonce=bytes(16))
    receiver.receive_data(encode_hello(ConnectionRole.MAIN, MID)[:10])
    receiver.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="in the middle of its hello"):
        receiver.next_event()


def test_steps_outside_the_tables_are_local_errors():
    receiver = ReceiverHandshake(token=TOKEN, nonce=bytes(16))
    for call in (receiver.challenge, receiver.admit, lambda: receiver.refuse("x")):
        with pytest.raises(LocalProtocolError):
            call()  # nothing received yet
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=TOKEN, nonce=bytes(16))
    with pytest.raises(LocalProtocolError):
        sender.authenticate()
    sender.hello()
    with pytest.raises(LocalProtocolError):
        sender.hello()
    with pytest.raises(LocalProtocolError, match="token must be 16"):
        SenderHandshake(ConnectionRole.MAIN, MID, token=b"short", nonce=bytes(16))
    with pytest.raises(LocalProtocolError, match="nonce"):
        ReceiverHandshake(token=TOKEN, nonce=b"x")


def test_every_state_is_reachable_and_final_states_lead_nowhere():
    for table, first in ((RECEIVER_STEPS, ReceiverHandshakeState.AWAIT_HELLO),
                         (SENDER_STEPS, SenderHandshakeState.IDLE)):
        reached = {first}
        changed = True
        while changed:
            changed = False
            for (source, _), target in table.items():
                if source in reached and target not in reached:
                    reached.add(target)
                    changed = True
        assert reached == set(type(first))


def test_docs_contain_the_rendered_handshake_diagrams():
    text = DOCS.read_text()
    for diagram in render_handshake_mermaid():
        assert f"```mermaid\n{diagram}```" in text


# -- version 3: proof labels, the hello's index and resume count ---------------------------


def _forged_auth(label: bytes, hello: bytes, receiver_nonce: bytes, nonce: bytes) -> bytes:
    """An AUTH whose proof is made by hand, under `label`."""
    mine = hmac.new(TOKEN, label + hello + receiver_nonce + nonce, hashlib.sha256).digest()
    return wire.encode_auth(nonce, mine)


@settings(max_examples=40, deadline=None)
@given(version=st.sampled_from(sorted(wire.SUPPORTED_VERSIONS)), role=roles, n1=nonces,
       n2=nonces, chunk=st.integers(0, 7))
def test_both_versions_establish_and_the_receiver_sees_index_and_resume(version, role, n1, n2,
                                                                         chunk):
    index, resume = (3, 2) if version >= wire.RESUMABLE_VERSION else (0, 0)
    index = index if role is ConnectionRole.MEMORY else 0
    sender = SenderHandshake(role, MID, token=TOKEN, nonce=n1, version=version, index=index,
                             resume=resume)
    receiver = ReceiverHandshake(token=TOKEN, nonce=n2)
    result, event = run(sender, receiver, chunk=chunk)
    assert result == Established(AuthMethod.TOKEN)
    assert event.hello == wire.Hello(role, MID, version, index, resume)


@pytest.mark.parametrize("version", sorted(wire.SUPPORTED_VERSIONS))
def test_the_proof_labels_name_the_version(version):
    n1, n2 = os.urandom(16), os.urandom(16)
    hello = encode_hello(ConnectionRole.MAIN, MID, version)
    for label, passes in ((f"vmig-{version} sender proof".encode(), True),
                          *((f"vmig-{other} sender proof".encode(), False)
                            for other in wire.SUPPORTED_VERSIONS if other != version),
                          (f"vmig-{version} receiver proof".encode(), False)):
        receiver = ReceiverHandshake(token=TOKEN, nonce=n2)
        receiver.receive_data(hello)
        receiver.next_event()
        receiver.challenge()
        receiver.receive_data(_forged_auth(label, hello, n2, n1))
        if passes:
            assert isinstance(receiver.next_event(), Authenticated)
            assert receiver.admit()[wire.HEADER_SIZE:] == hmac.new(
                TOKEN, f"vmig-{version} receiver proof".encode() + hello + n2 + n1,
                hashlib.sha256).digest()
        else:  # a version 2 proof does not pass for version 3, nor the other way round
            with pytest.raises(AuthenticationError, match="does not know"):
                receiver.next_event()


def test_a_receiver_proof_for_another_version_fails_the_sender():
    n1, n2 = os.urandom(16), os.urandom(16)
    sender = SenderHandshake(ConnectionRole.MAIN, MID, token=TOKEN, nonce=n1, version=3)
    hello = sender.hello()
    sender.receive_data(wire.encode_hello_reply(AuthMethod.TOKEN, n2))
    assert isinstance(sender.next_event(), Challenged)
    sender.authenticate()
    v2_proof = hmac.new(TOKEN, b"vmig-2 receiver proof" + hello + n2 + n1,
                        hashlib.sha256).digest()
    sender.receive_data(wire.encode_response_header(wire.Status.OK, 32) + v2_proof)
    with pytest.raises(AuthenticationError, match="could not prove"):
        sender.next_event()


@settings(max_examples=40, deadline=None)
@given(n1=nonces, first=nonces, second=nonces, resume=st.integers(1, 0xFFFF))
def test_a_recorded_resume_handshake_replayed_fails(n1, first, second, resume):
    """Someone who recorded a resumed connection's hello and AUTH cannot open another with
    them: the new receiver's fresh nonce makes the recorded proof worthless."""
    if first == second:
        return
    sender = SenderHandshake(ConnectionRole.MEMORY, MID, token=TOKEN, nonce=n1, index=1,
                             resume=resume)
    receiver = ReceiverHandshake(token=TOKEN, nonce=first)
    hello = sender.hello()
    receiver.receive_data(hello)
    assert receiver.next_event().hello.resume == resume
    sender.receive_data(receiver.challenge())
    sender.next_event()
    auth = sender.authenticate()
    receiver.receive_data(auth)
    assert isinstance(receiver.next_event(), Authenticated)
    replayed = ReceiverHandshake(token=TOKEN, nonce=second)
    replayed.receive_data(hello)
    assert isinstance(replayed.next_event(), HelloReceived)
    replayed.challenge()
    replayed.receive_data(auth)
    with pytest.raises(AuthenticationError, match="does not know"):
        replayed.next_event()
    assert replayed.state is ReceiverHandshakeState.FAILED


@pytest.mark.parametrize(("offset", "value"), [(12, 2), (14, 2), (14, 0)])
def test_the_proof_binds_the_index_and_the_resume_count(offset, value):
    """A hello whose index or resume count was changed in transit fails authentication."""
    n1, n2 = os.urandom(16), os.urandom(16)
    sender = SenderHandshake(ConnectionRole.MEMORY, MID, token=TOKEN, nonce=n1, index=1,
                             resume=1)
    hello = bytearray(sender.hello())
    hello[offset:offset + 2] = value.to_bytes(2, "little")
    receiver = ReceiverHandshake(token=TOKEN, nonce=n2)
    receiver.receive_data(bytes(hello))
    receiver.next_event()
    sender.receive_data(receiver.challenge())
    sender.next_event()
    receiver.receive_data(sender.authenticate())
    with pytest.raises(AuthenticationError):
        receiver.next_event()


def test_a_v2_sender_cannot_say_index_or_resume():
    with pytest.raises(LocalProtocolError, match="version 2 has no connection index"):
        SenderHandshake(ConnectionRole.MEMORY, MID, token=TOKEN, nonce=bytes(16), version=2,
                        index=1)
