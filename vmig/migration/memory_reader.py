"""Where a sent chunk's pages come from: guest memory, as MEMORY requests.

The sender's mirror of `memory_writer`. `ChunkSender.prepare` runs on the connection
thread that took a chunk from `SenderPool`'s queue: it splits the chunk into data
pages and zero pages (the first pass skips zero pages, as the destination starts
zeroed; a later pass sends them as a ZERO range, no page bytes) and returns the
writers that put them on the connection: the data as views of guest memory (no copy),
or as one zstd frame when compression is on and shrinks them. `acked` books a chunk
in the migration's metrics once the destination has acknowledged it.
"""

from __future__ import annotations

from collections.abc import Callable

import zstandard

from vmig.memory import GuestMemory
from vmig.migration.metrics import MigrationMetrics
from vmig.proto import Memory, MemoryFlags
from vmig.ranges import RangeTable
from vmig.transport.channel import SenderChannel
from vmig.units import PAGE_SIZE

__all__ = ["ChunkSender", "Writer"]

#: Puts (part of) a chunk on one connection, on that connection's thread.
Writer = Callable[[SenderChannel], None]


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
        # id(chunk) -> (page bytes sent, zero pages, [bytes on the wire]) until acknowledged
        self._accounts: dict[int, tuple[int, int, list[int]]] = {}

    def prepare(self, chunk: RangeTable) -> list[Writer]:
        """The requests that carry `chunk`: its zero pages as a ZERO range (not in the
        first pass), then its data pages."""
        data, zero = self._memory.split_zero_pages(chunk)
        wire = [0]
        writers: list[Writer] = []
        if len(zero) and not self.first_pass:
            writers.append(lambda channel: channel.submit(Memory(zero, MemoryFlags.ZERO)))
        if len(data):
            def write_data(channel: SenderChannel) -> None:
                wire[0] = self._submit_data(channel, data)
            writers.append(write_data)
        self._accounts[id(chunk)] = (data.total_bytes, zero.total_bytes // PAGE_SIZE, wire)
        return writers

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

    def acked(self, index: int, chunk: RangeTable) -> None:
        """The destination acknowledged `chunk` on connection `index`: count it."""
        sent, zero, wire = self._accounts.pop(id(chunk), (chunk.total_bytes, 0, [None]))
        self._metrics.transferred(index, sent, covered=chunk.total_bytes, zero_pages=zero,
                                  wire=wire[0])
