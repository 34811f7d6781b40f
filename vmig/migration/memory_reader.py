"""Where a sent chunk's pages come from: guest memory, as MEMORY requests.

The sender's mirror of `memory_writer`. `ChunkSender.prepare` runs on the connection
thread that took a chunk from `SenderPool`'s queue: it splits the chunk into data
pages and zero pages (the first pass skips zero pages, as the destination starts
zeroed; a later pass sends them as a ZERO range, no page bytes) and returns the
writers that put them on the connection: the data as views of guest memory (no copy),
or as one zstd frame when compression is on and shrinks them. The pool's `Chunk` keeps
what was sent until the chunk is acknowledged; `acked` then books it in the migration's
metrics.
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
            channel.submit_memory(data, self._memory.views)
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
