"""The VMM's events: one bus, heard by a JSON-lines file and by server-sent-event streams.

Every event is one object, as Cloud Hypervisor's ``--event-monitor`` writes them::

    {"timestamp": "2026-11-30T06:04:08.123456+00:00", "uptime_s": 3.52,
     "source": "migration", "event": "iteration", "properties": {...}}

``timestamp`` is the wall clock (UTC, ISO-8601); ``uptime_s`` counts from the VMM's
start on the monotonic clock (Cloud Hypervisor's own timestamp), for durations.
Sources and events (the `Vmm` controller publishes them; migration events come from
the migration's `MigrationMetrics`, whose view is their properties):

- ``vmm``: ``starting``, ``ready`` (the API serves), ``shutdown`` (asked to stop);
- ``vm``: ``booted``, ``restored``, ``received`` (by migration), ``paused``,
  ``resumed``, ``snapshot``, ``migrated`` (handed over), ``shutdown``, ``failed`` (a
  vCPU hit an error the VMM cannot handle, a triple fault say; ``error`` says which in
  one line), ``halted`` (an image guest halted for good; ``reason`` says where);
- ``migration``: ``listening``, ``started`` (both sides), ``iteration`` (each pre-copy
  pass, with ``last_iteration``), ``switchover``, ``postcopy``, then one of
  ``completed``, ``cancelled``, ``failed``.

`EventBus.publish` may be called from any thread. Synchronous listeners (the
`EventFile`) hear each event under the bus's lock, so the file's order is the
order of publication. An `EventStream` (one per `GET /api/v1/vmm.events` client)
is a bounded asyncio queue filled from any thread through its event loop; a client
that falls STREAM_QUEUE events behind loses the oldest (counted in `dropped`, and
said in the stream), never blocks the publisher, and is forgotten when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from vmig.errors import ConfigError

log = logging.getLogger(__name__)

STREAM_QUEUE = 256  # events one stream may hold; a migration's pre-copy makes a few per second

Listener = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """One event; `seq` numbers them in the order published (the stream's SSE `id`)."""

    seq: int
    timestamp: str
    uptime_s: float
    source: str
    event: str
    properties: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "uptime_s": self.uptime_s, "source": self.source,
                "event": self.event, "properties": self.properties}

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(self.to_dict(), default=str)

    def to_sse(self) -> str:
        """The event as one server-sent event (`event:` is "source.event")."""
        return f"id: {self.seq}\nevent: {self.source}.{self.event}\ndata: {self.to_json()}\n\n"


class EventFile:
    """A listener that appends each event to a file as one JSON line (--event-monitor)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot open event monitor file {path}: {exc.strerror}") from None

    def __call__(self, event: Event) -> None:
        self._file.write(event.to_json() + "\n")  # line-buffered: one write, then flushed

    def close(self) -> None:
        self._file.close()


class EventStream:
    """One subscriber's bounded queue, drained by a coroutine on `loop`."""

    def __init__(self, bus: EventBus, loop: asyncio.AbstractEventLoop,
                 maxsize: int = STREAM_QUEUE) -> None:
        self._bus = bus
        self._loop = loop
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self.dropped = 0  # events lost because the client fell behind

    def deliver(self, event: Event | None) -> None:
        """From any thread; None ends the stream. RuntimeError if the loop is closed."""
        self._loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Event | None) -> None:  # on the loop
        if self._queue.full():
            self._queue.get_nowait()  # the oldest goes: a slow client never blocks the bus
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> Event | None:
        """The next event; None once the bus has ended the stream."""
        return await self._queue.get()

    def close(self) -> None:
        """Unsubscribe; idempotent."""
        self._bus.unsubscribe(self)


class EventBus:
    """Publishes events to its listeners and streams (see the module's docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # Reentrant: SIGTERM's handler publishes "shutdown" on the main thread, which may
        # be inside publish() at that moment.
        self._lock = threading.RLock()
        self._clock = clock
        self._started = clock()
        self._seq = 0
        self._listeners: list[Listener] = []
        self._streams: list[EventStream] = []
        self._streaming = True  # False once end_streams() ran: no new stream is admitted

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def publish(self, source: str, event: str, properties: dict[str, Any] | None = None
                ) -> Event:
        """Tell every listener and stream (from any thread); never raises for a listener."""
        with self._lock:
            self._seq += 1
            now = self._clock()
            record = Event(self._seq, datetime.now(UTC).isoformat(timespec="microseconds"),
                           round(now - self._started, 6), source, event, properties)
            for listener in self._listeners:
                try:
                    listener(record)
                except Exception as exc:  # an unwritable file must not stop the VMM
                    log.error("event listener failed on %s.%s: %s", source, event, exc)
            for stream in list(self._streams):
                try:
                    stream.deliver(record)
                except RuntimeError:  # its event loop is closed: the server is gone
                    self._streams.remove(stream)
        return record

    def stream(self, loop: asyncio.AbstractEventLoop, maxsize: int = STREAM_QUEUE
               ) -> EventStream:
        """A new stream, subscribed now: it gets every event published from here on. Once
        the bus has ended its streams, the new one is ended at once."""
        stream = EventStream(self, loop, maxsize)
        with self._lock:
            if self._streaming:
                self._streams.append(stream)
            else:
                stream.deliver(None)
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._streams.remove(stream)

    @property
    def streams(self) -> int:
        """How many streams are subscribed now."""
        with self._lock:
            return len(self._streams)

    def end_streams(self) -> None:
        """End every stream (the VMM is stopping: its HTTP responses must finish)."""
        with self._lock:
            self._streaming = False
            streams, self._streams = self._streams, []
        for stream in streams:
            with contextlib.suppress(RuntimeError):
                stream.deliver(None)

    def close(self) -> None:
        """End the streams and close the listeners that can be closed; idempotent."""
        self.end_streams()
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            close = getattr(listener, "close", None)
            if close is not None:
                close()
