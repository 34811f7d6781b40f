"""Where a sent chunk's pages come from: guest memory, as MEMORY requests.

The sender's mirror of `memory_writer`. `ChunkSender.prepare` runs on the connection
thread that took a chunk from `SenderPool`'s queue: it splits the chunk into data
pages and zero pages (the first pass skips zero pages, as the destination starts
zeroed; a later pass sends them as a ZERO range, no page bytes) and returns the
writers that put them on the connection: the data as views of guest memory (no copy),
or as one zstd frame when compression is on and shrinks them. The pool's `Chunk` keeps
what was sent until the chunk is acknowledged; `acked` then books it in the migration's
metrics.

On a plain TCP or UNIX connection, the uncompressed data pages of runs of at least
`SENDFILE_MIN_BYTES` go with sendfile from guest memory's fd (`GuestMemory.sendfile_fd`)
after the request's header: the socket takes the memfd's pages, with no copy in the
sender; the bytes on the wire are the same as sendmsg's. The socket may read a page
later than the call, while it is still queued, so the destination can get bytes newer
than at the call (or, as with sendmsg's copy of live memory, a page changed halfway).
That is safe for the same reason a copy of a running guest is: the dirty log was
cleared before the pass read the page, so any write since marks it dirty (KVM's dirty
log, or the VMM's own bitmap) and the next pass sends it again; a pass ends only when
every chunk is acknowledged, i.e. its bytes have left the socket, so no queued old copy
can overtake a later one; the final pass runs with the guest paused, and post-copy's
pages are sent while the source is paused, so nothing changes under them. A lost
connection's queued bytes never land either: the destination fences the lost
connection (its worker ended) before the chunk is sent again (docs/protocol.md).
"""

from __future__ import annotations

import zstandard

from vmig.memory import GuestMemory
from vmig.migration.metrics import MigrationMetrics
from vmig.proto import Memory, MemoryFlags
from vmig.ranges import RangeTable
from vmig.transport.channel import SenderChannel
from vmig.transport.sender_pool import Chunk, Writer
from vmig.units import PAGE_SIZE

__all__ = ["ChunkSender", "Writer"]


class ChunkSender:
    """Turns chunks of `memory` into MEMORY requests; one per migration."""

    def __init__(self, memory: GuestMemory, metrics: MigrationMetrics,
                 compress_level: int | None) -> None:
        self._memory = memory
        self._metrics = metrics
        self._level = compress_level
        #: The first pass skips zero pages; later passes send them as ZERO ranges.
        self.first_pass = True
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}  # per channel (thread)
        #: Uncompressed pages go with sendfile from here on plain streams (None: never).
        self._file_fd = memory.sendfile_fd()

    def prepare(self, chunk: Chunk) -> None:
        """The requests that carry `chunk`: its zero pages as a ZERO range (not in the
        first pass), then its data pages."""
        data, zero = self._memory.split_zero_pages(chunk.ranges)
        writers: list[Writer] = []
        if len(zero) and not self.first_pass:
            writers.append(lambda channel: channel.submit(Memory(zero, MemoryFlags.ZERO)))
        if len(data):
            def write_data(channel: SenderChannel) -> None:
                chunk.wire = self._submit_data(channel, data)
            writers.append(write_data)
        chunk.writers = writers
        chunk.sent, chunk.zero_pages, chunk.wire = data.total_bytes, \
            zero.total_bytes // PAGE_SIZE, 0

    def _submit_data(self, channel: SenderChannel, data: RangeTable) -> int:
        """One MEMORY request with `data`'s pages, zstd-compressed when asked for and when
        it shrinks them; returns the bytes it put on the wire."""
        if self._level is None:
            channel.submit_memory(data, self._memory.views, self._file_fd)
            return data.total_bytes
        compressor = self._compressors.get(id(channel))
        if compressor is None:
            compressor = self._compressors[id(channel)] = zstandard.ZstdCompressor(
                level=self._level)
        views = self._memory.views(data)
        try:
            stream = compressor.compressobj(size=data.total_bytes)
            frame = [stream.compress(view) for view in views]  # the GIL is released meanwhile
            frame.append(stream.flush())
            size = sum(len(part) for part in frame)
            if size >= data.total_bytes:  # did not shrink: as it is
                channel.submit(Memory(data), views)
                return data.total_bytes
            channel.submit(Memory(data, MemoryFlags.ZSTD, size), frame)
            return size
        finally:
            for view in views:
                view.release()

    def acked(self, index: int, chunk: Chunk) -> None:
        """The destination acknowledged `chunk` on connection `index`: count it."""
        self._metrics.transferred(index, chunk.sent, covered=chunk.ranges.total_bytes,
                                  zero_pages=chunk.zero_pages, wire=chunk.wire)
