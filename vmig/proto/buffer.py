"""Received bytes not yet parsed: the one receive buffer both protocol drivers use."""

from __future__ import annotations

from vmig.proto.errors import LocalProtocolError

__all__ = ["ReceiveBuffer"]


class ReceiveBuffer:
    """Received bytes not yet parsed, consumed from the front; remembers EOF."""

    __slots__ = ("_data", "eof")

    def __init__(self) -> None:
        self._data = bytearray()
        self.eof = False

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; ``b""`` records EOF (bytes after it are a caller bug)."""
        if not data:
            self.eof = True
            return
        if self.eof:
            raise LocalProtocolError("receive_data() called with bytes after EOF")
        self._data += data

    def take(self, count: int) -> bytes | None:
        """Remove and return exactly `count` bytes, or None (nothing removed) if short."""
        if len(self._data) < count:
            return None
        return self.take_up_to(count)

    def take_up_to(self, count: int) -> bytes:
        """Remove and return at most `count` bytes (one copy)."""
        with memoryview(self._data) as view:
            out = bytes(view[:count])
        del self._data[:count]  # O(1) from the front of a bytearray in CPython
        return out

