"""Channels: a `Stream` driving the sans-IO protocol, handshake first.

`SenderChannel` says hello, proves the token if the receiver asks (and checks
the receiver's proof), then writes requests and reads responses.
`receive_handshake()` is the receiving side of that handshake; the
`ReceiverChannel` it returns reads requests and writes responses. Post-copy's FAULT
connection has channels of its own: `SourceFaultChannel` answers page requests,
`DestinationFaultChannel` makes them. These are the only code that moves bytes
between streams and `vmig.proto` (through `pump.pull`): page bytes go straight
between sockets and the memoryviews the caller passes (guest memory), never
through the protocol buffer.

Protocol version 3 resumes connections: a channel opened with `lost=` (the channel
whose stream failed) says a hello with the lost one's index and a higher resume count,
authenticates afresh, and carries on where the lost one was (`SenderConnection.resumed`,
`ReceiverConnection.resumed`): MAIN re-sends its unanswered request, which the
receiver answers from its record if it had answered it already.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable, Sequence

from vmig.errors import MigrationCancelled, MigrationError, TransportError
from vmig.proto import (
    AuthMethod,
    Cancel,
    ConnectionClosed,
    ConnectionRole,
    EndOfPayload,
    Error,
    Hello,
    HelloReceived,
    Memory,
    MemoryFd,
    Ok,
    PayloadData,
    Ping,
    ReceiverConnection,
    ReceiverEvent,
    ReceiverHandshake,
    RemoteProtocolError,
    Request,
    Response,
    SenderConnection,
)
from vmig.proto.state import ReceiverState
from vmig.proto.wire import NONCE_SIZE
from vmig.ranges import RangeTable
from vmig.transport.fault_channel import DestinationFaultChannel, SourceFaultChannel
from vmig.transport.hello import Identity, VersionRefused, sender_handshake
from vmig.transport.pump import pull
from vmig.transport.ratelimit import RateLimitStopped, TokenBucket
from vmig.transport.stream import Buffer, PlainStream, Stream

__all__ = ["ChannelInterrupted", "DestinationFaultChannel", "HandshakeRefused", "Identity",
           "ReceiverChannel", "SenderChannel", "SourceFaultChannel", "VersionRefused",
           "receive_handshake", "sender_handshake"]

ViewsFor = Callable[[RangeTable], list[memoryview]]
#: Admission: None to take the connection, or the reason it is refused.
Admit = Callable[[Hello], "str | None"]


class HandshakeRefused(TransportError):
    """The receiving side refused a connection during its handshake (the peer was told)."""


class ChannelInterrupted(TransportError):
    """`ReceiverChannel.interrupt()` woke a wait for the next request."""


class SenderChannel:
    """The sending end of one MAIN or MEMORY connection: handshake, then requests and
    their responses. With `lost`, it resumes that channel (protocol version 3)."""

    def __init__(self, stream: Stream, identity: Identity, *, token: bytes | None = None,
                 max_outstanding: int | None = None,
                 lost: SenderChannel | None = None) -> None:
        self.stream = stream
        self.identity = identity
        self.role = identity.role
        if lost is not None:
            self.conn = SenderConnection.resumed(lost.conn)
        else:
            self.conn = SenderConnection(identity.role, max_outstanding=max_outstanding,
                                         version=identity.version)
        #: The migration's bandwidth cap, shared by all its channels (None: no cap).
        self.limiter: TokenBucket | None = lost.limiter if lost is not None else None
        self.method, leftover = sender_handshake(stream, identity, token)
        if leftover:
            self.conn.receive_data(leftover)
        if lost is not None:
            again = self.conn.resend()  # MAIN's unanswered request, same sequence number
            if again:
                self.stream.send_all([again])

    @property
    def max_outstanding(self) -> int:
        return self.conn.max_outstanding

    @property
    def peer(self) -> str:
        return self.stream.peer

    @property
    def receiver_state(self) -> ReceiverState:
        """The receiver's state as its answers on this connection confirmed it."""
        return self.conn.state

    @property
    def outstanding(self) -> int:
        """Requests written and not yet answered."""
        return len(self.conn.outstanding)

    def shutdown(self) -> None:
        """Wake any thread blocked on this connection (from any thread)."""
        self.stream.shutdown()

    def settle(self) -> None:
        """Read the answers to every outstanding request (a resumed MAIN's re-sent PING)."""
        while self.conn.outstanding:
            self.check(self.read_response())

    def ping(self, timeout: float | None = None) -> None:
        """The heartbeat (version 3, MAIN): PING, and wait for its OK (`timeout`: at most
        that long; a silent peer is then a TransportError)."""
        before = self.stream.sock.gettimeout()
        if timeout is not None:
            self.stream.settimeout(timeout)
        try:
            self.request(Ping())
        finally:
            self.stream.settimeout(before)

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

        def read(wanted: int) -> bytes:
            nonlocal closed
            data = self.stream.recv_some(wanted)
            closed = not data
            return data

        try:
            event = pull(self.conn, read)
        except RemoteProtocolError as exc:
            if closed:
                raise TransportError(f"receiving from {self.stream.peer}: {exc}") from None
            raise
        if isinstance(event, ConnectionClosed):
            raise TransportError(f"{self.stream.peer} closed the connection")
        assert isinstance(event, Response)
        return event

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


def receive_handshake(stream: Stream, *, token: bytes | None, admit: Admit,
                      accept_fds: bool = False
                      ) -> ReceiverChannel | DestinationFaultChannel:
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
            event = pull(handshake, stream.recv_some)
        except RemoteProtocolError as exc:
            with contextlib.suppress(TransportError):
                stream.send_all([handshake.refuse(str(exc))])
            raise HandshakeRefused(str(exc)) from None
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
        channel: ReceiverChannel | DestinationFaultChannel
        if hello.role is ConnectionRole.FAULT:
            channel = DestinationFaultChannel(stream, hello)
        else:
            channel = ReceiverChannel(stream, hello, accept_fds=accept_fds)
        channel.receive_data(handshake.unused_data())
        return channel


class ReceiverChannel:
    """The receiving end of one MAIN or MEMORY connection, after its handshake admitted
    it."""

    def __init__(self, stream: Stream, hello: Hello, accept_fds: bool = False) -> None:
        self.stream = stream
        self.hello = hello
        self.role = hello.role
        self.migration_id = hello.migration_id
        self.version = hello.version
        #: Its place in the migration: MAIN is 0, MEMORY connections 1, 2, ... (version 3:
        #: the hello's; version 2: as admitted).
        self.index = hello.index
        self.conn = ReceiverConnection(hello.role, migration_id=hello.migration_id,
                                       version=hello.version)
        self._accept_fds = accept_fds and isinstance(stream, PlainStream) and stream.passes_fds
        self.fds: list[int] = []
        self._scratch = bytearray()
        # MAIN can be woken while it waits for the next request (a cancel), without
        # touching the connection, which then still carries the answer to the source.
        self._wake: tuple[int, int] | None = None
        if self.role is ConnectionRole.MAIN:
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @property
    def peer(self) -> str:
        return self.stream.peer

    @property
    def state(self) -> ReceiverState:
        return self.conn.state

    @property
    def last_seq(self) -> int:
        return self.conn.last_seq

    def resume_from(self, lost: ReceiverChannel) -> None:
        """Carry on where `lost` (the connection this one resumes) was: its state, the last
        request it answered and that answer (a request it was reading is forgotten)."""
        self.conn = ReceiverConnection.resumed(lost.conn)

    def receive_data(self, data: bytes) -> None:
        if data:
            self.conn.receive_data(data)

    def shutdown(self) -> None:
        """Wake any thread blocked on this connection (from any thread)."""
        self.stream.shutdown()

    def settimeout(self, seconds: float | None) -> None:
        self.stream.settimeout(seconds)

    def next_request(self) -> ReceiverEvent:
        """Read until the next complete request (a MemoryRequest leaves its payload unread).

        Raises RemoteProtocolError (from the protocol core) if the peer broke the
        rules; answer it with `reject()`. The peer closing the connection in the middle
        of a request is a TransportError (the connection was lost), not a broken rule.
        """
        closed = False

        def read(wanted: int) -> bytes:
            nonlocal closed
            data = self._read(wanted)
            closed = not data
            return data

        try:
            return pull(self.conn, read)
        except RemoteProtocolError as exc:
            if closed:
                raise TransportError(f"receiving from {self.stream.peer}: {exc}") from None
            raise

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

    def _read(self, wanted: int) -> bytes:
        if self._wake is not None:
            self._wait_readable()
        if self._accept_fds:
            assert isinstance(self.stream, PlainStream)
            data, fds = self.stream.recv_some_with_fds(wanted)
            self.fds.extend(fds)
            return data
        return self.stream.recv_some(wanted)

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

    def answer_repeat(self) -> None:
        """Answer a request re-sent on a resumed MAIN as it was answered the first time."""
        self.stream.send_all([self.conn.answer_repeat()])

    def send_cancel(self, reason: str) -> None:
        """The destination's unprompted end (CANCELLED, MAIN only), best effort."""
        with contextlib.suppress(Exception):
            self.stream.send_all([self.conn.send(Cancel(reason))])

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
