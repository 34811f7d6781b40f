"""The handshake every connection opens with, sans-IO: the hello and token authentication.

Nothing here does I/O or reads a clock; nonces are handed in by the caller
(docs/protocol.md, "Handshake", is the full write-up)::

    sender                                               receiver
    HELLO (32 B: magic, role, version, 0, migration id) ->
                                      <- ERROR + reason                  refused, closed
                                      <- OK + (method, 0, nonce Nr)
    method NONE: established. The channel authenticates the peer already
                 (mutual TLS, or a UNIX socket's file mode).
    method TOKEN:
    AUTH (nonce Ns, proof S)                            ->
                                      <- ERROR + reason                  wrong proof, or refused
                                      <- OK + proof R                    established

    S = HMAC-SHA256(token, "vmig-V sender proof"   || hello || Nr || Ns)
    R = HMAC-SHA256(token, "vmig-V receiver proof" || hello || Nr || Ns)

V is the hello's protocol version (2 or 3).

The hello holds the role, the version and the migration id, so every proof is
bound to them; both nonces make each proof fresh, and the two labels keep one
side's proof from passing for the other's. The token never crosses the wire. The
sender proves first, so a receiver gives nothing computed from the token to a
peer that has not proved it knows it; a sender checks the receiver's proof
before it sends any request, so an impostor destination gets no guest memory.

Both sides are state machines driven by a table, like `vmig.proto.state`:
`RECEIVER_STEPS` and `SENDER_STEPS` map ``(state, step)`` to the next state, and
a step the table does not allow raises LocalProtocolError.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

from vmig.proto.buffer import ReceiveBuffer
from vmig.proto.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from vmig.proto.events import NEED_DATA, ConnectionClosed, NeedData
from vmig.proto.wire import (
    AUTH_PAYLOAD_SIZE,
    HEADER_SIZE,
    HELLO_SIZE,
    NO_HEADERS,
    NONCE_SIZE,
    PROOF_SIZE,
    PROTOCOL_VERSION,
    AuthMethod,
    Command,
    ConnectionRole,
    Hello,
    Status,
    decode_auth,
    decode_hello_reply,
    decode_request_header,
    decode_response_header,
    encode_auth,
    encode_hello,
    encode_hello_reply,
    encode_response,
    encode_response_header,
    parse_hello,
)

__all__ = [
    "RECEIVER_STEPS",
    "SENDER_STEPS",
    "Authenticated",
    "Challenged",
    "Established",
    "HandshakeStep",
    "HelloReceived",
    "ReceiverHandshake",
    "ReceiverHandshakeState",
    "Refused",
    "SenderHandshake",
    "SenderHandshakeState",
    "proof",
    "render_handshake_mermaid",
]

#: Shortest token either side accepts: a guessable secret would authenticate nothing.
MIN_TOKEN_BYTES = 16
#: Longest token: a secret, not a document.
MAX_TOKEN_BYTES = 1024

def _labels(version: int) -> tuple[bytes, bytes]:
    """The sender's and the receiver's proof labels of a protocol version ("vmig-3 sender
    proof", ...): a proof made for one version never passes for another's."""
    return (f"vmig-{version} sender proof".encode(), f"vmig-{version} receiver proof".encode())


def proof(token: bytes, label: bytes, hello: bytes, receiver_nonce: bytes,
          sender_nonce: bytes) -> bytes:
    """HMAC-SHA256 of the handshake transcript under `token`."""
    message = label + hello + receiver_nonce + sender_nonce
    return hmac.new(token, message, hashlib.sha256).digest()


def check_token(token: bytes | None) -> bytes | None:
    """`token` if it is usable as a shared secret; LocalProtocolError names the rule."""
    if token is not None and not MIN_TOKEN_BYTES <= len(token) <= MAX_TOKEN_BYTES:
        raise LocalProtocolError(
            f"a token must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes, not {len(token)}"
        )
    return token


def _check_nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"a nonce must be {NONCE_SIZE} random bytes")
    return nonce


class HandshakeStep(Enum):
    """What moves a handshake on: a message read, or an answer the caller writes."""

    HELLO = "hello"  #: the sender's hello (written by the sender, read by the receiver)
    CHALLENGE = "challenge"  #: the receiver's OK answer asking for the token
    AUTH = "auth"  #: the sender's AUTH, with a proof the receiver checked
    ADMIT = "admit"  #: the receiver's final OK (with its proof, after AUTH)
    REFUSE = "refuse"  #: the receiver's ERROR answer
    FAIL = "fail"  #: a broken rule or a wrong proof, found by this side


class ReceiverHandshakeState(Enum):
    """Where the receiving end of a connection is in its handshake."""

    #: Reading the 32-byte hello.
    AWAIT_HELLO = "await_hello"
    #: Hello read; answer with `challenge()` (token), `admit()` (no token) or `refuse()`.
    HELLO_RECEIVED = "hello_received"
    #: The challenge went out; reading the sender's AUTH.
    AWAIT_AUTH = "await_auth"
    #: The sender proved it knows the token; `admit()` or `refuse()`.
    AUTHENTICATED = "authenticated"
    #: Admitted: requests follow (`ReceiverConnection`). Final.
    ESTABLISHED = "established"
    #: The peer broke a rule or failed to prove the token; `refuse()` answers it once.
    FAILED = "failed"
    #: Refused; close the connection. Final.
    REFUSED = "refused"


class SenderHandshakeState(Enum):
    """Where the sending end of a connection is in its handshake."""

    #: Nothing sent yet; `hello()` comes first.
    IDLE = "idle"
    #: Hello sent; reading the receiver's answer.
    AWAIT_REPLY = "await_reply"
    #: The receiver asked for the token; `authenticate()` comes next.
    CHALLENGED = "challenged"
    #: AUTH sent; reading the receiver's answer and proof.
    AWAIT_AUTH_REPLY = "await_auth_reply"
    #: Both sides are satisfied: requests may follow (`SenderConnection`). Final.
    ESTABLISHED = "established"
    #: The receiver refused the connection (the reason came with it). Final.
    REFUSED = "refused"
    #: The receiver broke a rule, asked for what this side cannot give, or failed to
    #: prove the token. Final.
    FAILED = "failed"


_R = ReceiverHandshakeState
_S = SenderHandshakeState
_H = HandshakeStep

#: The receiver's handshake: (state, step) -> next state. The one copy of its rules.
RECEIVER_STEPS: dict[tuple[ReceiverHandshakeState, HandshakeStep], ReceiverHandshakeState] = {
    (_R.AWAIT_HELLO, _H.HELLO): _R.HELLO_RECEIVED,
    (_R.HELLO_RECEIVED, _H.CHALLENGE): _R.AWAIT_AUTH,
    (_R.HELLO_RECEIVED, _H.ADMIT): _R.ESTABLISHED,  # method NONE: TLS or UNIX socket
    (_R.AWAIT_AUTH, _H.AUTH): _R.AUTHENTICATED,
    (_R.AUTHENTICATED, _H.ADMIT): _R.ESTABLISHED,
    (_R.HELLO_RECEIVED, _H.REFUSE): _R.REFUSED,
    (_R.AUTHENTICATED, _H.REFUSE): _R.REFUSED,
    (_R.FAILED, _H.REFUSE): _R.REFUSED,
    (_R.AWAIT_HELLO, _H.FAIL): _R.FAILED,
    (_R.AWAIT_AUTH, _H.FAIL): _R.FAILED,
}

#: The sender's handshake: (state, step) -> next state.
SENDER_STEPS: dict[tuple[SenderHandshakeState, HandshakeStep], SenderHandshakeState] = {
    (_S.IDLE, _H.HELLO): _S.AWAIT_REPLY,
    (_S.AWAIT_REPLY, _H.CHALLENGE): _S.CHALLENGED,
    (_S.AWAIT_REPLY, _H.ADMIT): _S.ESTABLISHED,  # method NONE, and no token expected
    (_S.CHALLENGED, _H.AUTH): _S.AWAIT_AUTH_REPLY,
    (_S.AWAIT_AUTH_REPLY, _H.ADMIT): _S.ESTABLISHED,  # the receiver's proof checked
    (_S.AWAIT_REPLY, _H.REFUSE): _S.REFUSED,
    (_S.AWAIT_AUTH_REPLY, _H.REFUSE): _S.REFUSED,
    (_S.AWAIT_REPLY, _H.FAIL): _S.FAILED,
    (_S.AWAIT_AUTH_REPLY, _H.FAIL): _S.FAILED,
}


def _next(table: dict, state: Enum, step: HandshakeStep, side: str) -> Enum:
    target = table.get((state, step))
    if target is None:
        raise LocalProtocolError(f"{side} handshake cannot {step.value} in state {state.name}")
    return target


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HelloReceived:
    """Receiver: the hello is in; answer it (`challenge`, `admit` or `refuse`)."""

    hello: Hello


@dataclass(frozen=True)
class Authenticated:
    """Receiver: the sender proved it knows the token; `admit` or `refuse` it."""

    hello: Hello


@dataclass(frozen=True)
class Challenged:
    """Sender: the receiver wants the token proved; call `authenticate()`."""


@dataclass(frozen=True)
class Established:
    """Sender: the connection is set up; requests may follow."""

    method: AuthMethod


@dataclass(frozen=True)
class Refused:
    """Sender: the receiver refused the connection, saying why."""

    reason: str


# -- receiver ----------------------------------------------------------------------------


class ReceiverHandshake:
    """The receiving end of one connection's handshake.

    With a `token`, the sender must prove it knows it (method TOKEN); without one
    the channel is trusted to authenticate the peer (method NONE: mutual TLS or a
    UNIX socket). `nonce` is 16 fresh random bytes from the caller.
    """

    def __init__(self, *, token: bytes | None, nonce: bytes) -> None:
        self._token = check_token(token)
        self._nonce = _check_nonce(nonce)
        self._state = _R.AWAIT_HELLO
        self._buffer = ReceiveBuffer()
        self._hello_bytes = b""
        self._hello: Hello | None = None
        self._sender_nonce = b""
        self._auth_length = -1  # the AUTH header's length, once read
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> ReceiverHandshakeState:
        return self._state

    @property
    def hello(self) -> Hello | None:
        """The sender's hello, once read."""
        return self._hello

    @property
    def method(self) -> AuthMethod:
        return AuthMethod.NONE if self._token is None else AuthMethod.TOKEN

    def bytes_wanted(self) -> int:
        """How many more bytes finish what is being read (0: call next_event())."""
        have = len(self._buffer)
        if self._state is _R.AWAIT_HELLO:
            return max(HELLO_SIZE - have, 0)
        if self._state is _R.AWAIT_AUTH:
            if self._auth_length < 0:
                return max(HEADER_SIZE - have, 0)
            return max(self._auth_length - have, 0)
        return 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` records EOF."""
        self._buffer.feed(data)

    def next_event(self) -> HelloReceived | Authenticated | ConnectionClosed | NeedData:
        """The next handshake event, or NEED_DATA.

        ConnectionClosed: the peer left before sending anything. Raises
        RemoteProtocolError on a bad hello or AUTH (AuthenticationError for a
        wrong proof); the state is then FAILED and `refuse()` answers it once.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._state = _next(RECEIVER_STEPS, self._state, _H.FAIL, "receiver")
            self._error = exc
            raise

    def _parse(self) -> HelloReceived | Authenticated | ConnectionClosed | NeedData:
        if self._state is _R.AWAIT_HELLO:
            raw = self._buffer.take(HELLO_SIZE)
            if raw is None:
                return self._short(HELLO_SIZE, "its hello")
            self._hello = parse_hello(raw)
            self._hello_bytes = raw
            self._state = _next(RECEIVER_STEPS, self._state, _H.HELLO, "receiver")
            return HelloReceived(self._hello)
        if self._state is _R.AWAIT_AUTH:
            if self._auth_length < 0:
                raw = self._buffer.take(HEADER_SIZE)
                if raw is None:
                    return self._short(HEADER_SIZE, "AUTH")
                self._auth_length = self._check_auth_header(raw)
            payload = self._buffer.take(self._auth_length)
            if payload is None:
                return self._short(self._auth_length, "AUTH")
            return self._check_proof(payload)
        raise LocalProtocolError(f"nothing to read in handshake state {self._state.name}")

    def _short(self, size: int, what: str) -> NeedData | ConnectionClosed:
        if not self._buffer.eof:
            return NEED_DATA
        if self._state is _R.AWAIT_HELLO and not len(self._buffer):
            return ConnectionClosed()
        raise RemoteProtocolError(
            f"peer closed the connection in the middle of {what} "
            f"({len(self._buffer)} of {size} bytes)"
        )

    @staticmethod
    def _check_auth_header(raw: bytes) -> int:
        value, headers, length = decode_request_header(raw)
        if value != Command.AUTH:
            try:
                name = Command(value).name
            except ValueError:
                name = f"command {value}"
            raise RemoteProtocolError(
                f"sender sent {name} before authenticating; expected AUTH"
            )
        if headers != NO_HEADERS:
            raise RemoteProtocolError(f"sender sent AUTH with non-zero command headers "
                                      f"{headers.hex()}")
        if length != AUTH_PAYLOAD_SIZE:
            raise RemoteProtocolError(
                f"sender sent AUTH with a {length}-byte payload; expected {AUTH_PAYLOAD_SIZE}"
            )
        return length

    def _check_proof(self, payload: bytes) -> Authenticated:
        assert self._token is not None and self._hello is not None
        sender_nonce, claimed = decode_auth(payload)
        expected = proof(self._token, _labels(self._hello.version)[0], self._hello_bytes,
                         self._nonce, sender_nonce)
        if not hmac.compare_digest(claimed, expected):
            raise AuthenticationError(
                "authentication failed: the sender does not know this receiver's token"
            )
        self._sender_nonce = sender_nonce
        self._state = _next(RECEIVER_STEPS, self._state, _H.AUTH, "receiver")
        return Authenticated(self._hello)

    def challenge(self) -> bytes:
        """Answer the hello by asking for the token (only with a token)."""
        if self._token is None:
            raise LocalProtocolError("no token to challenge for: admit() or refuse() the hello")
        self._state = _next(RECEIVER_STEPS, self._state, _H.CHALLENGE, "receiver")
        return encode_hello_reply(AuthMethod.TOKEN, self._nonce)

    def admit(self) -> bytes:
        """Take the connection: OK (with this side's proof after AUTH)."""
        if self._state is _R.HELLO_RECEIVED and self._token is not None:
            raise LocalProtocolError("the sender has not proved the token yet: challenge() first")
        before = self._state
        self._state = _next(RECEIVER_STEPS, self._state, _H.ADMIT, "receiver")
        if before is _R.HELLO_RECEIVED:
            return encode_hello_reply(AuthMethod.NONE, bytes(NONCE_SIZE))
        assert self._token is not None and self._hello is not None
        mine = proof(self._token, _labels(self._hello.version)[1], self._hello_bytes,
                     self._nonce, self._sender_nonce)
        return encode_response_header(Status.OK, len(mine)) + mine

    def refuse(self, reason: str) -> bytes:
        """ERROR with `reason`; the caller closes the connection after writing it."""
        self._state = _next(RECEIVER_STEPS, self._state, _H.REFUSE, "receiver")
        return encode_response(Status.ERROR, reason)

    def unused_data(self) -> bytes:
        """Bytes received beyond the handshake (for the connection that follows)."""
        return self._buffer.take_up_to(len(self._buffer))


# -- sender ------------------------------------------------------------------------------


class SenderHandshake:
    """The sending end of one connection's handshake.

    With a `token` the receiver must ask for it and prove it knows it; without
    one the receiver must not ask (method NONE: the channel, mutual TLS or a
    UNIX socket, authenticates it). `nonce` is 16 fresh random bytes.
    """

    def __init__(self, role: ConnectionRole, migration_id: bytes, *, token: bytes | None,
                 nonce: bytes, version: int = PROTOCOL_VERSION, index: int = 0,
                 resume: int = 0) -> None:
        self.version = version
        self._hello_bytes = encode_hello(role, migration_id, version, index=index,
                                         resume=resume)
        self._token = check_token(token)
        self._nonce = _check_nonce(nonce)
        self._state = _S.IDLE
        self._buffer = ReceiveBuffer()
        self._status: Status | None = None
        self._length = 0
        self._receiver_nonce = b""
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> SenderHandshakeState:
        return self._state

    def hello(self) -> bytes:
        """The 32-byte hello to write first."""
        self._state = _next(SENDER_STEPS, self._state, _H.HELLO, "sender")
        return self._hello_bytes

    def authenticate(self) -> bytes:
        """The AUTH request answering the receiver's challenge."""
        assert self._token is not None  # Challenged is only returned with a token
        self._state = _next(SENDER_STEPS, self._state, _H.AUTH, "sender")
        mine = proof(self._token, _labels(self.version)[0], self._hello_bytes,
                     self._receiver_nonce, self._nonce)
        return encode_auth(self._nonce, mine)

    def bytes_wanted(self) -> int:
        if self._state not in (_S.AWAIT_REPLY, _S.AWAIT_AUTH_REPLY):
            return 0
        have = len(self._buffer)
        if self._status is None:
            return max(HEADER_SIZE - have, 0)
        return max(self._length - have, 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.feed(data)

    def next_event(self) -> Challenged | Established | Refused | NeedData:
        """The receiver's answer, or NEED_DATA.

        Raises RemoteProtocolError on a malformed answer or EOF, and
        AuthenticationError when the receiver asks for a token this side does not
        have, does not ask for the one it has, or cannot prove it knows it; the
        state is then FAILED and no request may be sent.
        """
        if self._error is not None:
            raise self._error
        if self._state not in (_S.AWAIT_REPLY, _S.AWAIT_AUTH_REPLY):
            raise LocalProtocolError(f"nothing to read in handshake state {self._state.name}")
        try:
            return self._parse()
        except RemoteProtocolError as exc:
            self._state = _next(SENDER_STEPS, self._state, _H.FAIL, "sender")
            self._error = exc
            raise

    def _parse(self) -> Challenged | Established | Refused | NeedData:
        if self._status is None:
            raw = self._buffer.take(HEADER_SIZE)
            if raw is None:
                return self._short("its answer")
            header = decode_response_header(raw)
            self._status, self._length = header.status, header.length
        payload = self._buffer.take(self._length)
        if payload is None:
            return self._short("its answer")
        status, self._status = self._status, None
        if status is not Status.OK:
            self._state = _next(SENDER_STEPS, self._state, _H.REFUSE, "sender")
            return Refused(payload.decode("utf-8", errors="replace"))
        if self._state is _S.AWAIT_REPLY:
            return self._on_reply(payload)
        return self._on_proof(payload)

    def _short(self, what: str) -> NeedData:
        if not self._buffer.eof:
            return NEED_DATA
        raise RemoteProtocolError(f"receiver closed the connection before {what} "
                                  "to the hello")

    def _on_reply(self, payload: bytes) -> Challenged | Established:
        method, nonce = decode_hello_reply(payload)
        if method is AuthMethod.NONE:
            if self._token is not None:
                raise AuthenticationError(
                    "the destination did not ask for the token: it is not the receiver that "
                    "was given it (an impostor, or one started without a token); no guest "
                    "memory was sent"
                )
            self._state = _next(SENDER_STEPS, self._state, _H.ADMIT, "sender")
            return Established(method)
        if self._token is None:
            raise AuthenticationError(
                "the destination requires a token: pass the one its receive-migration "
                "printed (--token or --token-file)"
            )
        self._receiver_nonce = nonce
        self._state = _next(SENDER_STEPS, self._state, _H.CHALLENGE, "sender")
        return Challenged()

    def _on_proof(self, payload: bytes) -> Established:
        assert self._token is not None
        expected = proof(self._token, _labels(self.version)[1], self._hello_bytes,
                         self._receiver_nonce, self._nonce)
        if len(payload) != PROOF_SIZE or not hmac.compare_digest(payload, expected):
            raise AuthenticationError(
                "the destination could not prove it knows the token; no guest memory was sent"
            )
        self._state = _next(SENDER_STEPS, self._state, _H.ADMIT, "sender")
        return Established(AuthMethod.TOKEN)

    def unused_data(self) -> bytes:
        """Bytes received beyond the handshake (for the connection that follows)."""
        return self._buffer.take_up_to(len(self._buffer))


def render_handshake_mermaid() -> tuple[str, str]:
    """The receiver's and the sender's handshake tables as mermaid ``stateDiagram-v2``
    diagrams (docs/protocol.md embeds both verbatim)."""
    out = []
    for side, table, first in (("receiver", RECEIVER_STEPS, _R.AWAIT_HELLO),
                               ("sender", SENDER_STEPS, _S.IDLE)):
        lines = ["stateDiagram-v2", f"    %% {side}", f"    [*] --> {first.name}"]
        for (source, step), target in table.items():
            lines.append(f"    {source.name} --> {target.name}: {step.value}")
        finals = {t for t in table.values() if not any(s == t for s, _ in table)}
        lines.extend(f"    {state.name} --> [*]" for state in sorted(finals, key=lambda s: s.name))
        out.append("\n".join(lines) + "\n")
    return out[0], out[1]
