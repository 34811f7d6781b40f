"""Channels: a `Stream` driving the sans-IO protocol, handshake first.

`SenderChannel` says hello, proves the token if the receiver asks (and checks
the receiver's proof), then writes requests and reads responses.
`receive_handshake()` is the receiving side of that handshake; the
`ReceiverChannel` it returns reads requests and writes responses. These are the
only code that moves bytes between streams and `vmig.proto`: page bytes go
straight between sockets and the memoryviews the caller passes (guest memory),
never through the protocol buffer.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable, Sequence

from vmig.errors import MigrationCancelled, MigrationError, TransportError
from vmig.proto import (
    NEED_DATA,
    AuthenticationError,
    AuthMethod,
    Challenged,
    ConnectionClosed,
    ConnectionRole,
    EndOfPayload,
    Error,
    Established,
    Hello,
    HelloReceived,
    Memory,
    MemoryFd,
    Ok,
    PayloadData,
    ReceiverConnection,
    ReceiverEvent,
    ReceiverHandshake,
    Refused,
    RemoteProtocolError,
    Request,
    Response,
    SenderConnection,
    SenderHandshake,
)
from vmig.proto.wire import NONCE_SIZE
from vmig.ranges import RangeTable
from vmig.transport.ratelimit import RateLimitStopped, TokenBucket
from vmig.transport.stream import Buffer, PlainStream, Stream

ViewsFor = Callable[[RangeTable], list[memoryview]]
#: Admission: None to take the connection, or the reason it is refused.
Admit = Callable[[Hello], "str | None"]


class HandshakeRefused(TransportError):
    """The receiving side refused a connection during its handshake (the peer was told)."""


class ChannelInterrupted(TransportError):
    """`ReceiverChannel.interrupt()` woke a wait for the next request."""


class SenderChannel:
    """The sending end of one connection: handshake, then requests and their responses."""

    def __init__(self, stream: Stream, role: ConnectionRole, migration_id: bytes, *,
                 token: bytes | None = None, max_outstanding: int | None = None) -> None:
        self.stream = stream
        self.role = role
        # A FAULT connection carries no requests after its handshake (vmig.proto.postcopy).
        self.conn = SenderConnection(
            ConnectionRole.MEMORY if role is ConnectionRole.FAULT else role,
            max_outstanding=max_outstanding)
        #: The migration's bandwidth cap, shared by all its channels (None: no cap).
        self.limiter: TokenBucket | None = None
        self.method = self._handshake(migration_id, token)

    def _handshake(self, migration_id: bytes, token: bytes | None) -> AuthMethod:
        handshake = SenderHandshake(self.role, migration_id, token=token,
                                    nonce=os.urandom(NONCE_SIZE))
        name = self.role.name
        try:
            self.stream.send_all([handshake.hello()])
            while True:
                event = handshake.next_event()
                if event is NEED_DATA:
                    handshake.receive_data(self.stream.recv_some(max(handshake.bytes_wanted(),
                                                                     1)))
                elif isinstance(event, Challenged):
                    self.stream.send_all([handshake.authenticate()])
                elif isinstance(event, Refused):
                    raise MigrationError(f"destination refused the {name} connection: "
                                         f"{event.reason}")
                elif isinstance(event, Established):
                    leftover = handshake.unused_data()
                    if leftover:
                        self.conn.receive_data(leftover)
                    return event.method
        except AuthenticationError as exc:
            raise MigrationError(f"{self.stream.peer}: {exc}") from None
        except RemoteProtocolError as exc:
            raise MigrationError(f"handshake with {self.stream.peer} failed: {exc}"
                                 f"{_hint(self.stream)}") from None
        except TransportError as exc:
            raise TransportError(f"handshake on the {name} connection failed: {exc}"
                                 f"{_hint(self.stream)}") from None

    @property
    def max_outstanding(self) -> int:
        return self.conn.max_outstanding

    def submit(self, event: Request, payload: Sequence[Buffer] = ()) -> None:
        """Write one request (and, for Memory, its page bytes) without waiting for its
        answer (but for the bandwidth cap)."""
        header = self.conn.send(event)
        if self.limiter is not None:
            try:
                self.limiter.take(len(header) + sum(len(part) for part in payload))
            except RateLimitStopped:
                raise TransportError("stopped while waiting for the bandwidth cap") from None
        self.stream.send_all([header, *payload])

    def submit_memory(self, ranges: RangeTable, views_for: ViewsFor) -> None:
        """Write a Memory request whose page bytes come from `views_for(ranges)`."""
        views = views_for(ranges)
        try:
            self.submit(Memory(ranges), views)
        finally:
            for view in views:
                view.release()

    def submit_with_fd(self, event: MemoryFd, fd: int) -> None:
        """Write a MemoryFd request with `fd` attached (SCM_RIGHTS; UNIX sockets only)."""
        if not isinstance(self.stream, PlainStream) or not self.stream.passes_fds:
            raise MigrationError("memory fds can only be passed over a unix: connection")
        self.stream.send_with_fds(self.conn.send(event), [fd])

    def read_response(self) -> Response:
        """Block until the oldest outstanding request is answered.

        The peer closing the connection first is a TransportError (the connection is
        lost), not a protocol error.
        """
        closed = False
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                if closed:
                    raise TransportError(f"receiving from {self.stream.peer}: {exc}") from None
                raise
            if isinstance(event, Response):
                return event
            if isinstance(event, ConnectionClosed):
                raise TransportError(f"{self.stream.peer} closed the connection")
            wanted = max(self.conn.bytes_wanted(), 1)
            data = self.stream.recv_some(wanted)
            closed = not data
            self.conn.receive_data(data)

    def request(self, event: Request, payload: Sequence[memoryview] = ()) -> Response:
        """Write a request and wait for its response; an ERROR answer raises MigrationError."""
        self.submit(event, payload)
        return self.check(self.read_response())

    @staticmethod
    def check(response: Response) -> Response:
        """`response` if it is OK; MigrationCancelled or MigrationError otherwise."""
        if response.cancelled:
            raise MigrationCancelled(f"the destination cancelled the migration: "
                                     f"{response.message}")
        if not response.ok:
            raise MigrationError(f"destination rejected {response.command.name}: "
                                 f"{response.message}")
        return response

    def close(self) -> None:
        self.stream.close()


def _hint(stream: Stream) -> str:
    """What a handshake that broke off most likely means, given how this side connected."""
    if stream.encrypted:  # our TLS handshake passed; the destination then ended the session
        return (" (the destination does not accept this side's certificate: is "
                "client-cert.pem signed by the CA the destination trusts?)")
    if stream.sock.family in (socket.AF_INET, socket.AF_INET6):
        return " (does the destination expect TLS? then pass --tls-dir)"
    return ""


def receive_handshake(stream: Stream, *, token: bytes | None, admit: Admit,
                      accept_fds: bool = False) -> ReceiverChannel:
    """Run the receiving side of the handshake on `stream`; return the admitted channel.

    `admit(hello)` is asked once the peer is authenticated (after its proof with a
    `token`; right after the hello without one, the channel having authenticated
    it): None takes the connection, a string refuses it with that reason. Raises
    HandshakeRefused (the peer was told why) or TransportError; the caller closes
    the stream either way.
    """
    handshake = ReceiverHandshake(token=token, nonce=os.urandom(NONCE_SIZE))
    while True:
        try:
            event = handshake.next_event()
        except RemoteProtocolError as exc:
            with contextlib.suppress(TransportError):
                stream.send_all([handshake.refuse(str(exc))])
            raise HandshakeRefused(str(exc)) from None
        if event is NEED_DATA:
            handshake.receive_data(stream.recv_some(max(handshake.bytes_wanted(), 1)))
            continue
        if isinstance(event, ConnectionClosed):
            raise TransportError("the peer closed the connection before its hello")
        if isinstance(event, HelloReceived) and handshake.method is AuthMethod.TOKEN:
            stream.send_all([handshake.challenge()])
            continue
        hello = event.hello
        refusal = admit(hello)
        if refusal is not None:
            with contextlib.suppress(TransportError):
                stream.send_all([handshake.refuse(refusal)])
            raise HandshakeRefused(refusal)
        stream.send_all([handshake.admit()])
        channel = ReceiverChannel(stream, hello.role, hello.migration_id,
                                  accept_fds=accept_fds)
        leftover = handshake.unused_data()
        if leftover:
            channel.conn.receive_data(leftover)
        return channel


class ReceiverChannel:
    """The receiving end of one connection, after its handshake admitted it."""

    def __init__(self, stream: Stream, role: ConnectionRole, migration_id: bytes,
                 accept_fds: bool = False) -> None:
        self.stream = stream
        self.role = role
        self.migration_id = migration_id
        #: Its place in the migration: MAIN is 0, MEMORY connections 1, 2, ... as admitted.
        self.index = 0
        # A FAULT connection carries no requests after its handshake (vmig.proto.postcopy).
        self.conn = ReceiverConnection(
            ConnectionRole.MEMORY if role is ConnectionRole.FAULT else role,
            migration_id=migration_id)
        self._accept_fds = accept_fds and isinstance(stream, PlainStream) and stream.passes_fds
        self.fds: list[int] = []
        self._scratch = bytearray()
        # MAIN can be woken while it waits for the next request (a cancel), without
        # touching the connection, which then still carries the answer to the source.
        self._wake: tuple[int, int] | None = None
        if role is ConnectionRole.MAIN:
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def next_request(self) -> ReceiverEvent:
        """Read until the next complete request (a MemoryRequest leaves its payload unread).

        Raises RemoteProtocolError (from the protocol core) if the peer broke the
        rules; answer it with `reject()`.
        """
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self._fill(self.conn.bytes_wanted())
                continue
            return event

    def interrupt(self) -> None:
        """Wake `next_request()` (from any thread): it raises ChannelInterrupted."""
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"!")

    def _wait_readable(self) -> None:
        """Block until the socket has bytes (or the stream's timeout), unless interrupted."""
        assert self._wake is not None
        if self.stream.pending():
            return  # TLS: decrypted bytes are already buffered
        poller = select.poll()
        poller.register(self.stream.sock.fileno(), select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        timeout = self.stream.sock.gettimeout()
        ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        if self._wake[0] in ready:
            raise ChannelInterrupted(f"waiting for {self.stream.peer}: interrupted")
        if not ready:
            raise TransportError(f"receiving from {self.stream.peer}: timed out")

    def drain(self, seconds: float) -> None:
        """Read and drop what the peer still sends, until it closes or `seconds` pass: the
        peer then reads our last answer instead of a reset."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TransportError, OSError):
            while (left := deadline - time.monotonic()) > 0:
                self.stream.settimeout(left)
                if not self.stream.recv_some(1 << 20):
                    return

    def _fill(self, wanted: int) -> None:
        if self._wake is not None:
            self._wait_readable()
        if self._accept_fds:
            assert isinstance(self.stream, PlainStream)
            data, fds = self.stream.recv_some_with_fds(max(wanted, 1))
            self.fds.extend(fds)
        else:
            data = self.stream.recv_some(max(wanted, 1))
        self.conn.receive_data(data)

    def receive_payload(self, views: Sequence[memoryview]) -> None:
        """Read the current Memory request's page bytes straight into `views`."""
        self.stream.recv_into_all(views)
        self.conn.payload_received(sum(len(view) for view in views))
        event = self.conn.next_event()
        if isinstance(event, PayloadData):  # exact-size reads keep pages out of the buffer
            raise MigrationError("page bytes arrived through the protocol buffer")
        if not isinstance(event, EndOfPayload):
            raise MigrationError(f"expected the end of the memory payload, got {event!r}")

    def scratch(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes, kept for this connection (compressed frames)."""
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        return self._scratch

    def accept(self) -> None:
        self.stream.send_all([self.conn.send(Ok())])

    def reject(self, message: str) -> None:
        """Answer with ERROR (best effort: the peer may already be gone)."""
        with contextlib.suppress(Exception):
            self.stream.send_all([self.conn.send(Error(message))])

    def take_fd(self) -> int:
        if not self.fds:
            raise MigrationError("MEMORY_FD arrived without a file descriptor")
        return self.fds.pop(0)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        if self._wake is not None:
            for fd in self._wake:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake = None
        self.stream.close()
