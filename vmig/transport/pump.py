"""The one loop that feeds a sans-IO core from a stream.

Every core in `vmig.proto` (the handshakes, both connection ends, both ends of the FAULT
connection) has the same three calls: `next_event()` (an event, or NEED_DATA),
`bytes_wanted()` and `receive_data()`. `pull()` asks for the next event, reading exactly
what the core wants whenever it needs more, so nothing beyond the message being parsed
(page bytes above all) lands in a protocol buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vmig.proto import NEED_DATA

__all__ = ["Core", "pull"]

#: Reads up to n bytes (b"" at the end of the stream).
Read = Callable[[int], bytes]


class Core(Protocol):
    def next_event(self) -> Any: ...
    def bytes_wanted(self) -> int: ...
    def receive_data(self, data: bytes) -> None: ...


def pull(core: Core, read: Read) -> Any:
    """The core's next event, reading from `read` while it says NEED_DATA."""
    while True:
        event = core.next_event()
        if event is not NEED_DATA:
            return event
        core.receive_data(read(max(core.bytes_wanted(), 1)))
