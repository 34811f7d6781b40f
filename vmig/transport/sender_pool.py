"""`SenderPool`: memory over many connections through one shared work queue.

An iteration's range table is cut into chunks and queued once; every
connection's worker takes the next chunk whenever it has room in its pipeline
(`max_outstanding` unanswered chunks), so a slow connection simply takes fewer
chunks (the single shared queue Cloud Hypervisor's reviewers asked for, rather
than per-thread round robin). Every chunk is acknowledged by the receiver; an
iteration ends when all its chunks are.

A chunk stays the pool's until it is acknowledged. When a MEMORY connection
fails (a transport error: reset, closed, timed out), its unacknowledged chunks
go back to the queue and the other connections carry them; the connection is
out of the pool from then on, and `on_lost` says which and why. A failure on
MAIN, an ERROR answer on any connection, or `stop()` ends the iteration: the
first error is raised, after every worker thread has been joined.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence

from vmig.errors import MigrationError, TransportError, VmigError
from vmig.proto import ConnectionRole
from vmig.ranges import RangeTable
from vmig.transport.channel import SenderChannel, ViewsFor

#: (connection index, the chunk it carried) once the receiver acknowledged it.
OnAcked = Callable[[int, RangeTable], None]
#: Writes one request on a channel.
Writer = Callable[[SenderChannel], None]
#: The requests that carry a chunk, as writers (none: nothing to send, e.g. a chunk of
#: zero pages in a first pass). Called on the connection's thread that took the chunk.
Prepare = Callable[[RangeTable], list[Writer]]
#: (connection index, the channel, why) when a MEMORY connection is lost.
OnLost = Callable[[int, SenderChannel, str], None]


class _Work:
    """The chunks of one iteration: queued, or taken and not yet acknowledged."""

    def __init__(self, chunks: Sequence[RangeTable]) -> None:
        self._queue = collections.deque(chunks)
        self._unacked = len(self._queue)
        self._changed = threading.Condition()
        self.stopped = False

    def take(self, *, wait: bool) -> RangeTable | None:
        """The next chunk; None when the iteration is over (or stopped), or, without
        `wait`, when nothing is queued right now."""
        with self._changed:
            while True:
                if self.stopped or self._unacked == 0:
                    return None
                if self._queue:
                    return self._queue.popleft()
                if not wait:
                    return None
                self._changed.wait()

    def acked(self) -> None:
        with self._changed:
            self._unacked -= 1
            if self._unacked == 0:
                self._changed.notify_all()

    def requeue(self, chunks: Sequence[RangeTable]) -> None:
        """Chunks a lost connection took: back to the front of the queue."""
        with self._changed:
            self._queue.extendleft(reversed(chunks))
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self.stopped = True
            self._changed.notify_all()

    def prioritize(self, gpa: int, window: int) -> None:
        """Move queued chunks within `window` bytes of `gpa` to the front (post-copy:
        pages near a fault are likely wanted next)."""
        with self._changed:
            near, far = [], []
            for chunk in self._queue:
                first = chunk[0].gpa
                last = chunk[len(chunk) - 1].end
                (near if first - window <= gpa < last + window else far).append(chunk)
            if near:
                self._queue = collections.deque(near + far)


class SenderPool:
    """Drives the channels of one migration (the first is MAIN); the caller owns and
    closes them, since it opens them before the pool exists and may cancel meanwhile."""

    def __init__(self, channels: Sequence[SenderChannel], on_lost: OnLost | None = None) -> None:
        if not channels:
            raise ValueError("a pool needs at least the main channel")
        self.channels = list(channels)
        self._alive = [True] * len(self.channels)
        self._on_lost = on_lost
        self._work: _Work | None = None

    @property
    def main(self) -> SenderChannel:
        return self.channels[0]

    @property
    def alive(self) -> int:
        """Connections still in use (MAIN included)."""
        return sum(self._alive)

    def stop(self) -> None:
        """Make a running `send_iteration` stop taking work (from any thread)."""
        work = self._work
        if work is not None:
            work.stop()

    def prioritize(self, gpa: int, window: int) -> None:
        """Send the queued chunks near `gpa` next (from any thread; see `_Work`)."""
        work = self._work
        if work is not None:
            work.prioritize(gpa, window)

    def send_iteration(self, chunks: Sequence[RangeTable], prepare: Prepare,
                       on_acked: OnAcked | None = None) -> int:
        """Send every chunk over whichever live connection is free; return the bytes acked.

        `prepare(chunk)` gives the requests that carry a chunk (`plain_memory(views_for)`:
        one plain MEMORY request each); they are written as the pipeline has room.
        """
        work = self._work = _Work(chunks)
        errors: list[BaseException] = []
        acked = [0] * len(self.channels)

        def worker(index: int, channel: SenderChannel) -> None:
            in_flight: collections.deque[_Taken] = collections.deque()
            try:
                acked[index] = _drain(index, channel, work, in_flight, prepare, on_acked)
            except TransportError as exc:
                if index == 0 or work.stopped:
                    errors.append(exc)
                    work.stop()
                    return
                self._alive[index] = False  # a lost MEMORY connection: the others carry on
                work.requeue([taken.chunk for taken in in_flight])
                if self._on_lost is not None:
                    self._on_lost(index, channel, f"{exc}; its {len(in_flight)} "
                                  "unacknowledged chunks went to the other connections")
            except BaseException as exc:  # first error wins; the others stop taking work
                errors.append(exc)
                work.stop()

        threads = [threading.Thread(target=worker, args=(i, ch), name=f"migrate-send-{i}")
                   for i, ch in enumerate(self.channels) if self._alive[i]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._work = None
        if errors:
            first = errors[0]
            if isinstance(first, VmigError):
                raise first
            raise TransportError(f"memory worker failed: {first!r}") from first
        if work.stopped:
            raise MigrationError("the iteration was stopped")
        return sum(acked)


class _Taken:
    """A chunk a connection took: its requests still to write, and answers still due."""

    __slots__ = ("chunk", "due", "todo")

    def __init__(self, chunk: RangeTable, writers: list[Writer]) -> None:
        self.chunk = chunk
        self.todo = collections.deque(writers)
        self.due = 0

    @property
    def done(self) -> bool:
        return not self.todo and not self.due


def _drain(index: int, channel: SenderChannel, work: _Work,
           in_flight: collections.deque[_Taken], prepare: Prepare,
           on_acked: OnAcked | None) -> int:
    """One connection's share: keep its pipeline full until the iteration is acknowledged.

    Requests are written in order, as the pipeline (`max_outstanding` unanswered) has
    room, so the answers come back in that order too; a chunk is acknowledged once
    all of its requests are. `in_flight` holds what this connection took and has not
    had acknowledged (a failed connection's caller puts it back on the queue).
    """
    total = 0
    due = 0
    while True:
        for taken in in_flight:  # write what waits, oldest first
            while taken.todo and due < channel.max_outstanding:
                taken.todo.popleft()(channel)
                taken.due += 1
                due += 1
        if due < channel.max_outstanding and not (in_flight and in_flight[-1].todo):
            chunk = work.take(wait=not in_flight)
            if chunk is not None:
                in_flight.append(_Taken(chunk, prepare(chunk)))
                total += _acknowledge(index, in_flight, work, on_acked)
                continue
        if not in_flight:
            return total
        SenderChannel.check(channel.read_response())
        due -= 1
        next(taken for taken in in_flight if taken.due).due -= 1
        total += _acknowledge(index, in_flight, work, on_acked)


def _acknowledge(index: int, in_flight: collections.deque[_Taken], work: _Work,
                 on_acked: OnAcked | None) -> int:
    """Pop the chunks at the front that are fully acknowledged; return their bytes."""
    total = 0
    while in_flight and in_flight[0].done:
        chunk = in_flight.popleft().chunk
        work.acked()
        total += chunk.total_bytes
        if on_acked is not None:
            on_acked(index, chunk)
    return total


def plain_memory(views_for: ViewsFor) -> Prepare:
    """Each chunk as one MEMORY request of the views `views_for` gives."""
    def prepare(chunk: RangeTable) -> list[Writer]:
        return [lambda channel: channel.submit_memory(chunk, views_for)]
    return prepare


def role_name(channel: SenderChannel) -> str:
    return "main" if channel.role is ConnectionRole.MAIN else "memory"
