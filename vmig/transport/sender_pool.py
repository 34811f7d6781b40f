"""`SenderPool`: memory over many connections through one shared work queue.

An iteration's range table is cut into chunks and queued once; every
connection's worker takes the next chunk whenever it has room in its pipeline
(`max_outstanding` unanswered chunks), so a slow connection simply takes fewer
chunks (the single shared queue Cloud Hypervisor's reviewers asked for, rather
than per-thread round robin). Every chunk is acknowledged by the receiver; an
iteration ends when all its chunks are. The first error stops the others from
taking more work and is raised to the caller; all worker threads are joined
before `send_iteration` returns either way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

from vmig.errors import TransportError, VmigError
from vmig.ranges import RangeTable
from vmig.transport.channel import SenderChannel, ViewsFor

OnAcked = Callable[[int], None]


class SenderPool:
    """Drives the channels of one migration (the first is MAIN); the caller owns and
    closes them, since it opens them before the pool exists and may cancel meanwhile."""

    def __init__(self, channels: Sequence[SenderChannel]) -> None:
        if not channels:
            raise ValueError("a pool needs at least the main channel")
        self.channels = list(channels)

    @property
    def main(self) -> SenderChannel:
        return self.channels[0]

    def send_iteration(self, chunks: Sequence[RangeTable], views_for: ViewsFor,
                       on_acked: OnAcked | None = None) -> int:
        """Send every chunk over whichever connection is free; return the bytes acked."""
        work: queue.SimpleQueue[RangeTable] = queue.SimpleQueue()
        for chunk in chunks:
            work.put(chunk)
        stop = threading.Event()
        errors: list[BaseException] = []
        acked = [0] * len(self.channels)

        def worker(index: int, channel: SenderChannel) -> None:
            try:
                acked[index] = _drain(channel, work, stop, views_for, on_acked)
            except BaseException as exc:  # first error wins; the others stop taking work
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=worker, args=(i, ch), name=f"migrate-send-{i}")
                   for i, ch in enumerate(self.channels)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            first = errors[0]
            if isinstance(first, VmigError):
                raise first
            raise TransportError(f"memory worker failed: {first!r}") from first
        return sum(acked)


def _drain(channel: SenderChannel, work: queue.SimpleQueue[RangeTable], stop: threading.Event,
           views_for: ViewsFor, on_acked: OnAcked | None) -> int:
    """One connection's share: keep its pipeline full until the queue is empty."""
    in_flight: list[int] = []
    total = 0
    while True:
        if not stop.is_set() and len(in_flight) < channel.max_outstanding:
            try:
                chunk = work.get_nowait()
            except queue.Empty:
                chunk = None
            if chunk is not None:
                channel.submit_memory(chunk, views_for)
                in_flight.append(chunk.total_bytes)
                continue
        if not in_flight:
            return total
        SenderChannel.check(channel.read_response())
        done = in_flight.pop(0)
        total += done
        if on_acked is not None:
            on_acked(done)
