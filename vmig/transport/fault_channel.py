"""Post-copy's FAULT connection, both ends: after its handshake it runs the other way
round (vmig.proto.postcopy): the destination asks for the pages a faulting guest needs,
the source answers. `SourceFaultChannel` answers, `DestinationFaultChannel` asks."""

from __future__ import annotations

from collections.abc import Sequence

from vmig.errors import MigrationError
from vmig.proto import ConnectionClosed, EndOfPayload, Hello
from vmig.proto.postcopy import PageRequest, PageRequester, Pages, PageServer
from vmig.ranges import RangeTable
from vmig.transport.hello import Identity, sender_handshake
from vmig.transport.pump import pull
from vmig.transport.stream import Stream

__all__ = ["DestinationFaultChannel", "SourceFaultChannel"]


class SourceFaultChannel:
    """Post-copy's FAULT connection at the source: it reads the destination's page
    requests and answers each with the pages (vmig.proto.postcopy). With `lost`, it
    resumes that channel: the destination asks again for what it still lacks."""

    def __init__(self, stream: Stream, identity: Identity, *,
                 token: bytes | None = None) -> None:
        self.stream = stream
        self.identity = identity
        self.role = identity.role
        self._server = PageServer()
        self.method, leftover = sender_handshake(stream, identity, token)
        if leftover:
            self._server.receive_data(leftover)

    @property
    def peer(self) -> str:
        return self.stream.peer

    def next_request(self) -> RangeTable | None:
        """The pages the destination asks for next; None when it closed the connection."""
        event = pull(self._server, self.stream.recv_some)
        if isinstance(event, ConnectionClosed):
            return None
        assert isinstance(event, PageRequest)
        return event.ranges

    def answer(self, ranges: RangeTable, views: Sequence[memoryview]) -> None:
        """Send the pages of `ranges` (the views of them, in order)."""
        self.stream.send_all([self._server.answer(ranges), *views])

    def shutdown(self) -> None:
        self.stream.shutdown()

    def close(self) -> None:
        self.stream.close()


class DestinationFaultChannel:
    """Post-copy's FAULT connection at the destination: it asks the source for the pages
    a faulting guest needs and reads the answers (vmig.proto.postcopy)."""

    def __init__(self, stream: Stream, hello: Hello) -> None:
        self.stream = stream
        self.hello = hello
        self.role = hello.role
        self.migration_id = hello.migration_id
        self.version = hello.version
        self.index = 0
        self._requester = PageRequester()

    @property
    def peer(self) -> str:
        return self.stream.peer

    def receive_data(self, data: bytes) -> None:
        if data:
            self._requester.receive_data(data)

    def request(self, ranges: RangeTable) -> None:
        """Ask for `ranges` (answers come in order)."""
        self.stream.send_all([self._requester.request(ranges)])

    def next_pages(self) -> Pages | None:
        """The next answer's header (its ranges and size); None when the source closed
        the connection. Read its bytes with `receive_pages`."""
        event = pull(self._requester, self.stream.recv_some)
        if isinstance(event, ConnectionClosed):
            return None
        assert isinstance(event, Pages)
        return event

    def receive_pages(self, view: memoryview) -> None:
        """Read the current answer's page bytes into `view` (exactly its size)."""
        self.stream.recv_into_exact(view)
        self._requester.payload_received(len(view))
        event = self._requester.next_event()
        if not isinstance(event, EndOfPayload):
            raise MigrationError(f"expected the end of the pages, got {event!r}")

    def shutdown(self) -> None:
        self.stream.shutdown()

    def close(self) -> None:
        self.stream.close()
