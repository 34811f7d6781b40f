"""The fence of a resumed connection, on real sockets: the rest of a chunk left in a dead
connection's buffer is never written after the chunk's second copy (docs/protocol.md,
"Resume")."""

from __future__ import annotations

import threading
import time

from vmig.errors import TransportError
from vmig.proto import ConnectionClosed, ConnectionRole, Memory, MemoryRequest, Start
from vmig.ranges import RangeTable
from vmig.transport.address import parse_url
from vmig.transport.channel import Identity, ReceiverChannel, SenderChannel
from vmig.transport.endpoint import dial
from vmig.transport.receiver_pool import ReceiverPool
from vmig.transport.security import Security

TOKEN = b"fence-test-token-0123456789"
PAGE = 4096
PAGES = 256  # 1 MiB: the whole chunk fits in the socket buffers at once
MID = bytes(range(16))
#: The first connection's worker writes a page every this many seconds: slow enough that
#: most of its chunk is still in the socket buffer when the sender loses the connection.
SLOW_S = 0.002


class _Destination:
    """A ReceiverPool whose MEMORY workers write pages into `memory`, the first
    connection's slowly, and a MAIN that answers START and then waits."""

    def __init__(self) -> None:
        self.memory = bytearray(PAGES * PAGE)
        self.writes: list[tuple[float, int, int]] = []  # (when, resume count, page)
        self.pool = ReceiverPool(parse_url("tcp:127.0.0.1:0"), Security(token=TOKEN),
                                 max_connections=4, serve_memory=self._serve)
        self.url = str(self.pool.start())
        self._main = threading.Thread(target=self._serve_main, daemon=True)
        self._main.start()

    def _serve_main(self) -> None:
        channel = self.pool.main()
        if channel is None:
            return
        try:
            event = channel.next_request()
            assert isinstance(event, Start)
            self.pool.close_admission(event.connections - 1, 5)
            channel.accept()
            while not isinstance(channel.next_request(), ConnectionClosed):
                channel.accept()
        except TransportError:
            return

    def _serve(self, channel: ReceiverChannel) -> None:
        delay = SLOW_S if channel.hello.resume == 0 else 0.0
        try:
            while True:
                event = channel.next_request()
                if not isinstance(event, MemoryRequest):
                    return
                for gpa, length in event.ranges:
                    for page in range(gpa // PAGE, (gpa + length) // PAGE):
                        view = memoryview(self.memory)[page * PAGE:(page + 1) * PAGE]
                        channel.stream.recv_into_exact(view)
                        channel.conn.payload_received(PAGE)
                        self.writes.append((time.monotonic(), channel.hello.resume, page))
                        time.sleep(delay)
                channel.conn.next_event()  # EndOfPayload
                channel.accept()
        except TransportError:
            return  # lost: the half-written chunk is dropped, never acknowledged

    def close(self) -> None:
        self.pool.close()


def test_the_rest_of_a_lost_chunk_never_lands_after_its_second_copy():
    destination = _Destination()
    address = parse_url(destination.url)
    security = Security(token=TOKEN)
    try:
        main = SenderChannel(dial(address, security), Identity(ConnectionRole.MAIN, MID),
                             token=TOKEN)
        memory = SenderChannel(dial(address, security),
                               Identity(ConnectionRole.MEMORY, MID, index=1), token=TOKEN)
        main.request(Start(migration_id=MID, connections=2, reconnect_timeout_s=10,
                           dead_peer_timeout_s=10))
        chunk = RangeTable([(0, PAGES * PAGE)])
        memory.submit(Memory(chunk), [b"\xaa" * (PAGES * PAGE)])  # the first copy ...
        memory.stream.close()  # ... then the link is lost, the copy still in the buffers
        lost_at = time.monotonic()
        resumed = SenderChannel(dial(address, security),
                                Identity(ConnectionRole.MEMORY, MID, index=1, resume=1),
                                token=TOKEN, lost=memory)
        answered_at = time.monotonic()  # the fence: the old worker has ended
        resumed.request(Memory(chunk), [b"\xbb" * (PAGES * PAGE)])  # the second copy
        stale = [page for when, resume, page in destination.writes
                 if resume == 0 and when > answered_at]
        assert not stale, f"{len(stale)} pages of the first copy were written after the resume"
        first = [page for _, resume, page in destination.writes if resume == 0]
        assert len(first) > PAGES // 4, "the first copy was not being written when it was lost"
        assert answered_at - lost_at >= SLOW_S * (len(first) - PAGES // 8)
        assert destination.memory == b"\xbb" * (PAGES * PAGE), "an old copy landed last"
        resumed.close()
        main.close()
    finally:
        destination.close()
