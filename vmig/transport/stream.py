"""`Stream`: exact-size reads and scatter/gather writes on one socket, without copies.

Page bytes go from guest-memory memoryviews to the socket with `sendmsg` and
from the socket into guest memory with `recvmsg_into`; no Python-level copy.
Socket errors become TransportError naming the peer and what failed.
"""

from __future__ import annotations

import array
import contextlib
import socket
from collections.abc import Iterator, Sequence

from vmig.errors import TransportError

IOV_MAX = 1024  # Linux UIO_MAXIOV: most buffers one sendmsg takes
IO_TIMEOUT_S = 60.0  # a peer silent this long is gone


class Stream:
    """Owns a connected socket. Close it with `close()` or a `with` block."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = IO_TIMEOUT_S):
        self.sock = sock
        self.peer = peer
        sock.settimeout(timeout)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            raise TransportError(f"{action} {self.peer}: timed out") from None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            raise TransportError(f"{action} {self.peer}: the peer closed the connection") from None
        except OSError as exc:
            raise TransportError(f"{action} {self.peer}: {exc.strerror or exc}") from None

    def recv_some(self, limit: int) -> bytes:
        """Up to `limit` bytes; b"" at end of stream."""
        with self._errors("receiving from"):
            return self.sock.recv(limit)

    def recv_exact(self, size: int) -> bytes:
        """Exactly `size` bytes, or TransportError if the peer closes first."""
        buffer = bytearray(size)
        self.recv_into_exact(memoryview(buffer))
        return bytes(buffer)

    def recv_into_exact(self, view: memoryview) -> None:
        """Fill `view` completely from the socket (zero-copy into e.g. guest memory)."""
        done, size = 0, len(view)
        with self._errors("receiving from"):
            while done < size:
                n = self.sock.recv_into(view[done:])
                if n == 0:
                    raise TransportError(f"receiving from {self.peer}: the peer closed the "
                                         f"connection ({size - done} bytes missing)")
                done += n

    def recv_into_all(self, views: Sequence[memoryview]) -> None:
        """Fill every view in order; scattered pages land with few recvmsg_into calls."""
        pending = [memoryview(v) for v in views if len(v)]
        first = 0
        try:
            with self._errors("receiving from"):
                while first < len(pending):
                    n = self.sock.recvmsg_into(pending[first:first + IOV_MAX])[0]
                    if n == 0:
                        raise TransportError(f"receiving from {self.peer}: the peer closed "
                                             "the connection in the middle of a memory payload")
                    first = _advance(pending, first, n)
        finally:
            _release(pending)

    def send_all(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Send every buffer in order with sendmsg, resuming after partial writes."""
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        first = 0
        try:
            with self._errors("sending to"):
                while first < len(pending):
                    sent = self.sock.sendmsg(pending[first:first + IOV_MAX])
                    first = _advance(pending, first, sent)
        finally:
            _release(pending)

    def send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send `data` with `fds` attached as SCM_RIGHTS (UNIX sockets only)."""
        rights = array.array("i", fds).tobytes()
        with self._errors("sending file descriptors to"):
            sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        if sent < len(data):
            self.send_all([memoryview(data)[sent:]])

    def recv_some_with_fds(self, limit: int, max_fds: int = 4) -> tuple[bytes, list[int]]:
        """Up to `limit` bytes plus any fds that came with them (the caller owns the fds);
        (b"", []) at end of stream."""
        with self._errors("receiving from"):
            data, ancdata, _flags, _ = self.sock.recvmsg(limit, socket.CMSG_SPACE(max_fds * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        return data, fds

    def shutdown(self) -> None:
        """Wake up any thread blocked on this socket (it sees end of stream)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _advance(pending: list[memoryview], first: int, nbytes: int) -> int:
    """Consume `nbytes` from pending[first:]; return the index of the first unfinished view."""
    while nbytes:
        head = pending[first]
        if nbytes >= len(head):
            nbytes -= len(head)
            first += 1
        else:
            pending[first] = head[nbytes:]
            head.release()
            nbytes = 0
    return first


def _release(views: list[memoryview]) -> None:
    """Release the views this module made: a view left to the garbage collector (say, in
    a traceback) would keep guest memory from being unmapped (BufferError on close)."""
    for view in views:
        view.release()
