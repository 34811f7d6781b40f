"""`SenderPool`: memory over many connections through one shared work queue.

An iteration's range table is cut into chunks and queued once; every
connection's worker takes the next chunk whenever it has room in its pipeline
(`max_outstanding` unanswered chunks), so a slow connection simply takes fewer
chunks (the single shared queue Cloud Hypervisor's reviewers asked for, rather
than per-thread round robin). Every chunk is acknowledged by the receiver; an
iteration ends when all its chunks are.

The pool owns each chunk's bookkeeping (`Chunk`: its requests, the answers still
due, what the caller's `prepare` counted) until it is acknowledged. When a connection
fails (a transport error: reset, closed, timed out), its worker asks `resume` for a
connection in its place (protocol version 3 re-dials it; the receiver answers the
resumed hello only after it ended the old connection's worker, so no old copy of a
chunk can land after a newer one), and only then puts its unacknowledged chunks back
on the queue. Without a resumed connection, a MEMORY connection's chunks go to the
others and it is out of the pool from then on (`on_lost` says which and why); MAIN's
failure, an ERROR answer on any connection, or `stop()` ends the iteration: the
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

#: Writes one request on a channel.
Writer = Callable[[SenderChannel], None]


class Chunk:
    """One unit of work: its ranges, the requests that carry it (set by `prepare`, on
    the connection's thread that took it), the answers still due, and what `prepare`
    wants to know once it is acknowledged (`sent`, `zero_pages`, `wire`)."""

    __slots__ = ("due", "ranges", "sent", "todo", "wire", "writers", "zero_pages")

    def __init__(self, ranges: RangeTable) -> None:
        self.ranges = ranges
        self.writers: list[Writer] = []
        self.todo: collections.deque[Writer] = collections.deque()
        self.due = 0
        #: Page bytes its requests carry, zero pages they cover, bytes on the wire.
        self.sent = ranges.total_bytes
        self.zero_pages = 0
        self.wire: int | None = None

    @property
    def done(self) -> bool:
        return not self.todo and not self.due

    def rewind(self) -> None:
        """Its connection was lost: write it again from its first request."""
        self.todo = collections.deque(self.writers)
        self.due = 0


#: Sets a chunk's writers (none: nothing to send, e.g. a chunk of zero pages in a first
#: pass) and its figures. Called on the connection's thread that took the chunk.
Prepare = Callable[[Chunk], None]
#: (connection index, the chunk) once the receiver acknowledged it.
OnAcked = Callable[[int, Chunk], None]
#: (connection index, the channel, why) when a MEMORY connection is lost for good.
OnLost = Callable[[int, SenderChannel, str], None]
#: (connection index, the lost channel, why): a connection in its place, or None.
Resume = Callable[[int, SenderChannel, TransportError], "SenderChannel | None"]
#: (MAIN's channel): the heartbeat, while MAIN waits for work with nothing in flight.
Heartbeat = Callable[[SenderChannel], None]
#: (the error): a pass stopped on it.
OnStop = Callable[[BaseException], None]


class _Work:
    """The chunks of one iteration: queued, or taken and not yet acknowledged."""

    def __init__(self, chunks: Sequence[RangeTable]) -> None:
        self._queue = collections.deque(Chunk(ranges) for ranges in chunks)
        self._unacked = len(self._queue)
        self._changed = threading.Condition()
        self.stopped = False

    def take(self, *, wait: bool, timeout: float | None = None) -> Chunk | None:
        """The next chunk; None when the iteration is over (or stopped), or, without
        `wait` (or after `timeout` s), when nothing is queued right now."""
        with self._changed:
            while True:
                if self.stopped or self._unacked == 0:
                    return None
                if self._queue:
                    return self._queue.popleft()
                if not wait:
                    return None
                if not self._changed.wait(timeout):
                    return None

    @property
    def over(self) -> bool:
        with self._changed:
            return self.stopped or self._unacked == 0

    def acked(self) -> None:
        with self._changed:
            self._unacked -= 1
            if self._unacked == 0:
                self._changed.notify_all()

    def requeue(self, chunks: Sequence[Chunk]) -> None:
        """Chunks a lost connection took: back to the front of the queue."""
        for chunk in chunks:
            chunk.rewind()
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
                first = chunk.ranges[0].gpa
                last = chunk.ranges[len(chunk.ranges) - 1].end
                (near if first - window <= gpa < last + window else far).append(chunk)
            if near:
                self._queue = collections.deque(near + far)


class SenderPool:
    """Drives the channels of one migration (the first is MAIN); the caller owns and
    closes them, since it opens them before the pool exists and may cancel meanwhile.
    A resumed connection replaces the lost one in `channels`."""

    def __init__(self, channels: Sequence[SenderChannel], on_lost: OnLost | None = None,
                 resume: Resume | None = None, heartbeat: Heartbeat | None = None,
                 heartbeat_s: float | None = None, on_stop: OnStop | None = None) -> None:
        if not channels:
            raise ValueError("a pool needs at least the main channel")
        self.channels = list(channels)
        self._alive = [True] * len(self.channels)
        self._on_lost = on_lost
        self._resume = resume
        self._heartbeat = heartbeat
        self._heartbeat_s = heartbeat_s
        #: Told when a pass stops on an error (say, the destination's cancel on MAIN), so
        #: that a connection being re-dialled meanwhile gives up instead of at its window.
        self._on_stop = on_stop
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

        `prepare(chunk)` sets the requests that carry a chunk (`plain_memory(views_for)`:
        one plain MEMORY request each); they are written as the pipeline has room.
        """
        work = self._work = _Work(chunks)
        errors: list[BaseException] = []
        acked = [0] * len(self.channels)

        def fail(exc: BaseException) -> None:  # the first error wins; the others stop
            errors.append(exc)
            work.stop()
            if self._on_stop is not None:
                self._on_stop(exc)

        def worker(index: int) -> None:
            in_flight: collections.deque[Chunk] = collections.deque()
            while True:
                channel = self.channels[index]
                try:
                    acked[index] += self._drain(index, channel, work, in_flight, prepare,
                                                on_acked)
                    return
                except TransportError as exc:
                    if work.stopped:
                        errors.append(exc)
                        return
                    try:
                        resumed = self._resume(index, channel, exc) if self._resume else None
                    except BaseException as failed:  # the window ran out, refused, cancelled
                        fail(failed)  # (raised in a handler: the clause below would not
                        return  # see it, and the thread would just die)
                    if resumed is not None:  # fenced: the old copies cannot land any more
                        self.channels[index] = resumed
                        try:
                            resumed.settle()  # MAIN: a heartbeat re-sent with its number
                        except TransportError:
                            continue  # lost again: resumed again
                        work.requeue(list(in_flight))
                        in_flight.clear()
                        continue
                    if index == 0:
                        fail(exc)
                        return
                    self._alive[index] = False  # a lost MEMORY connection: the others go on
                    work.requeue(list(in_flight))
                    if self._on_lost is not None:
                        self._on_lost(index, channel, f"{exc}; its {len(in_flight)} "
                                      "unacknowledged chunks went to the other connections")
                    return
                except BaseException as exc:  # first error wins; the others stop taking work
                    fail(exc)
                    return

        threads = [threading.Thread(target=worker, args=(i,), name=f"migrate-send-{i}")
                   for i in range(len(self.channels)) if self._alive[i]]
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

    def _drain(self, index: int, channel: SenderChannel, work: _Work,
               in_flight: collections.deque[Chunk], prepare: Prepare,
               on_acked: OnAcked | None) -> int:
        """One connection's share: keep its pipeline full until the iteration is
        acknowledged.

        Requests are written in order, as the pipeline (`max_outstanding` unanswered) has
        room, so the answers come back in that order too; a chunk is acknowledged once all
        of its requests are. `in_flight` holds what this connection took and has not had
        acknowledged (a failed connection's worker puts it back on the queue). MAIN sends
        the heartbeat while it waits for work with nothing in flight.
        """
        total = 0
        due = 0
        while True:
            for chunk in in_flight:  # write what waits, oldest first
                while chunk.todo and due < channel.max_outstanding:
                    chunk.todo.popleft()(channel)
                    chunk.due += 1
                    due += 1
            if due < channel.max_outstanding and not (in_flight and in_flight[-1].todo):
                beat = index == 0 and self._heartbeat is not None and not in_flight
                chunk = work.take(wait=not in_flight,
                                  timeout=self._heartbeat_s if beat else None)
                if chunk is None and beat and not work.over:
                    assert self._heartbeat is not None
                    self._heartbeat(channel)
                    continue
                if chunk is not None:
                    prepare(chunk)
                    chunk.todo = collections.deque(chunk.writers)
                    in_flight.append(chunk)
                    total += _acknowledge(index, in_flight, work, on_acked)
                    continue
            if not in_flight:
                return total
            SenderChannel.check(channel.read_response())
            due -= 1
            next(chunk for chunk in in_flight if chunk.due).due -= 1
            total += _acknowledge(index, in_flight, work, on_acked)


def _acknowledge(index: int, in_flight: collections.deque[Chunk], work: _Work,
                 on_acked: OnAcked | None) -> int:
    """Pop the chunks at the front that are fully acknowledged; return their bytes."""
    total = 0
    while in_flight and in_flight[0].done:
        chunk = in_flight.popleft()
        work.acked()
        total += chunk.ranges.total_bytes
        if on_acked is not None:
            on_acked(index, chunk)
    return total


def plain_memory(views_for: ViewsFor) -> Prepare:
    """Each chunk as one MEMORY request of the views `views_for` gives."""
    def prepare(chunk: Chunk) -> None:
        ranges = chunk.ranges
        chunk.writers = [lambda channel: channel.submit_memory(ranges, views_for)]
    return prepare


def role_name(channel: SenderChannel) -> str:
    return "main" if channel.role is ConnectionRole.MAIN else "memory"
