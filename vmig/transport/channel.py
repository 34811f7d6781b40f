"""Channels: a `Stream` driving a sans-IO protocol connection.

`SenderChannel` writes requests and reads responses; `ReceiverChannel` reads
requests and writes responses. They are the only code that moves bytes between
sockets and `vmig.proto`: page bytes go straight between sockets and the
memoryviews the caller passes (guest memory), never through the protocol buffer.

Every connection opens with a 32-byte hello (role + migration id), which the
receiver answers with a plain response header (OK, or ERROR and a reason) before
any request, so a sender knows which of its connections the receiver took.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

from vmig.errors import MigrationError, TransportError
from vmig.proto import (
    NEED_DATA,
    ConnectionClosed,
    ConnectionRole,
    EndOfPayload,
    Error,
    Memory,
    MemoryFd,
    Ok,
    PayloadData,
    ReceiverConnection,
    ReceiverEvent,
    Request,
    Response,
    SenderConnection,
    wire,
)
from vmig.ranges import RangeTable
from vmig.transport.stream import Stream

ViewsFor = Callable[[RangeTable], list[memoryview]]


class SenderChannel:
    """The sending end of one connection: hello, then requests and their responses."""

    def __init__(self, stream: Stream, role: ConnectionRole, migration_id: bytes,
                 max_outstanding: int | None = None) -> None:
        self.stream = stream
        self.role = role
        self.conn = SenderConnection(role, max_outstanding=max_outstanding)
        self._hello(migration_id)

    def _hello(self, migration_id: bytes) -> None:
        self.stream.send_all([wire.encode_hello(self.role, migration_id)])
        header = wire.decode_response_header(self.stream.recv_exact(wire.HEADER_SIZE))
        message = self.stream.recv_exact(header.length).decode("utf-8", "replace")
        if header.status is not wire.Status.OK:
            raise MigrationError(f"destination refused the {self.role.name} connection: "
                                 f"{message}")

    @property
    def max_outstanding(self) -> int:
        return self.conn.max_outstanding

    def submit(self, event: Request, payload: Sequence[memoryview] = ()) -> None:
        """Write one request (and, for Memory, its page bytes) without waiting."""
        self.stream.send_all([self.conn.send(event), *payload])

    def submit_memory(self, ranges: RangeTable, views_for: ViewsFor) -> None:
        """Write a Memory request whose page bytes come from `views_for(ranges)`."""
        views = views_for(ranges)
        try:
            self.submit(Memory(ranges), views)
        finally:
            for view in views:
                view.release()

    def submit_with_fd(self, event: MemoryFd, fd: int) -> None:
        """Write a MemoryFd request with `fd` attached (SCM_RIGHTS)."""
        self.stream.send_with_fds(self.conn.send(event), [fd])

    def read_response(self) -> Response:
        """Block until the oldest outstanding request is answered."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, Response):
                return event
            if isinstance(event, ConnectionClosed):
                raise TransportError(f"{self.stream.peer} closed the connection")
            wanted = max(self.conn.bytes_wanted(), 1)
            self.conn.receive_data(self.stream.recv_some(wanted))

    def request(self, event: Request, payload: Sequence[memoryview] = ()) -> Response:
        """Write a request and wait for its response; an ERROR answer raises MigrationError."""
        self.submit(event, payload)
        return self.check(self.read_response())

    @staticmethod
    def check(response: Response) -> Response:
        if not response.ok:
            raise MigrationError(f"destination rejected {response.command.name}: "
                                 f"{response.message}")
        return response

    def close(self) -> None:
        self.stream.close()


class ReceiverChannel:
    """The receiving end of one connection, after its hello was accepted."""

    def __init__(self, stream: Stream, role: ConnectionRole, migration_id: bytes,
                 accept_fds: bool = False) -> None:
        self.stream = stream
        self.role = role
        self.conn = ReceiverConnection(role, migration_id=migration_id)
        self._accept_fds = accept_fds
        self.fds: list[int] = []

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

    def _fill(self, wanted: int) -> None:
        if self._accept_fds:
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
        self.stream.close()


def answer_hello(stream: Stream, error: str | None = None) -> None:
    """The receiver's reply to a hello: OK, or ERROR with a reason."""
    if error is None:
        stream.send_all([wire.encode_response(wire.Status.OK)])
    else:
        with contextlib.suppress(TransportError):
            stream.send_all([wire.encode_response(wire.Status.ERROR, error)])

