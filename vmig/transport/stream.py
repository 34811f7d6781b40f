"""Streams: exact-size reads and gathered writes on one connection, plain or TLS.

`Stream` is the interface the channels use; `PlainStream` and `TlsStream` are its two
variants. The plain one moves page bytes without a Python-level copy: from
guest-memory memoryviews to the socket with `sendmsg`, from the socket into guest
memory with `recvmsg_into`. Python's `SSLSocket` has neither, so the TLS one writes
each buffer with `SSL_write` (small ones gathered first, so that scattered pages do
not become one TLS record each) and reads with `recv_into`, record by record;
encryption needs a copy anyway, and `ssl` releases the GIL while it works. Socket
and TLS errors become TransportError naming the peer and what failed. Every TCP
stream finds a silent peer in its `dead_peer_timeout_s` (`vmig.transport.liveness`;
`set_dead_peer_timeout()` changes it): a blocked read or write then fails.
"""

from __future__ import annotations

import array
import contextlib
import socket
import ssl
from collections.abc import Iterator, Sequence

from vmig.errors import TransportError
from vmig.transport.liveness import (
    DEAD_PEER_TIMEOUT_S,
    gave_up,
    is_dead_peer,
    set_dead_peer_timeout,
)

IOV_MAX = 1024  # Linux UIO_MAXIOV: most buffers one sendmsg takes
IO_TIMEOUT_S = 60.0  # a peer silent this long is gone
# TLS: buffers smaller than this are gathered into one write of up to TLS_GATHER_BYTES;
# one SSL_write per 4 KiB page would cost a record header, a MAC and a syscall each.
TLS_SMALL_BYTES = 64 << 10
TLS_GATHER_BYTES = 256 << 10

Buffer = bytes | bytearray | memoryview


class Stream:
    """One connected socket, owned: close it with `close()` or a `with` block."""

    #: Whether file descriptors can travel with the bytes (UNIX sockets only).
    passes_fds = False
    #: Whether bytes are encrypted and authenticated on the wire.
    encrypted = False

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = IO_TIMEOUT_S):
        self.sock = sock
        self.peer = peer
        #: Seconds of silence after which the kernel gives up on the peer (TCP only);
        #: set where the socket was made (`dial`, `Listener.accept`).
        self.dead_peer_timeout_s: float = DEAD_PEER_TIMEOUT_S
        sock.settimeout(timeout)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def set_dead_peer_timeout(self, seconds: float) -> None:
        """Find a silent peer in `seconds` from now on (keepalive and TCP_USER_TIMEOUT,
        see `vmig.transport.liveness`; nothing on a UNIX socket). The receiver calls it
        with the sender's value from START. Safe while another thread is blocked on
        the socket: it is a few setsockopt calls. ValueError unless `seconds` > 0."""
        with self.errors("setting the dead-peer timeout for"):
            set_dead_peer_timeout(self.sock, seconds)
        self.dead_peer_timeout_s = seconds

    def pending(self) -> int:
        """Bytes already read off the socket and buffered above it (TLS records)."""
        return 0

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """OSError and ssl.SSLError -> TransportError("ACTION PEER: why")."""
        try:
            yield
        except TimeoutError as exc:
            if is_dead_peer(exc):  # the kernel's keepalive or TCP_USER_TIMEOUT
                raise self._silent(action) from None
            raise TransportError(f"{action} {self.peer}: timed out") from None
        except ssl.SSLError as exc:
            if gave_up(self.sock):  # ssl reports a kernel ETIMEDOUT as an EOF
                raise self._silent(action) from None
            raise TransportError(f"{action} {self.peer}: TLS: {tls_reason(exc)}") from None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            raise TransportError(f"{action} {self.peer}: the peer closed the connection") from None
        except OSError as exc:
            raise TransportError(f"{action} {self.peer}: {exc.strerror or exc}") from None

    def _silent(self, action: str) -> TransportError:
        return TransportError(f"{action} {self.peer}: the peer is silent (nothing heard "
                              f"for {self.dead_peer_timeout_s:g} s)")

    def _ended(self, action: str, what: str) -> TransportError:
        """The error for an end of stream where bytes were expected (`what`: which)."""
        if self.encrypted and gave_up(self.sock):  # ssl's view of a kernel ETIMEDOUT
            return self._silent(action)
        return TransportError(f"{action} {self.peer}: the peer closed the connection{what}")

    # --- reading --------------------------------------------------------------------

    def recv_some(self, limit: int) -> bytes:
        """Up to `limit` bytes; b"" at end of stream. TransportError if the peer fell
        silent (TLS too, where `ssl` would report an end of stream)."""
        with self.errors("receiving from"):
            data = self.sock.recv(limit)
        if not data and self.encrypted and gave_up(self.sock):
            raise self._silent("receiving from")
        return data

    def recv_into_exact(self, view: memoryview) -> None:
        """Fill `view` completely from the socket (zero-copy into e.g. guest memory)."""
        done, size = 0, len(view)
        with self.errors("receiving from"):
            while done < size:
                with view[done:] as rest:
                    n = self.sock.recv_into(rest)
                if n == 0:
                    raise self._ended("receiving from", f" ({size - done} bytes missing)")
                done += n

    def recv_into_all(self, views: Sequence[memoryview]) -> None:
        """Fill every view in order."""
        for view in views:
            if len(view):
                self.recv_into_exact(view)

    # --- writing --------------------------------------------------------------------

    def send_all(self, buffers: Sequence[Buffer]) -> None:
        """Send every buffer, in order."""
        raise NotImplementedError

    # --- ending ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Wake up any thread blocked on this socket (it sees end of stream or an error).

        Only the socket is shut down, never the TLS session: another thread may
        be inside OpenSSL on it right now.
        """
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainStream(Stream):
    """A TCP or UNIX socket, zero-copy: `sendmsg` and `recvmsg_into` on memoryviews."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = IO_TIMEOUT_S):
        super().__init__(sock, peer, timeout)
        self.passes_fds = sock.family == socket.AF_UNIX

    def recv_into_all(self, views: Sequence[memoryview]) -> None:
        """Fill every view in order; scattered pages land with few recvmsg_into calls."""
        pending = [memoryview(v) for v in views if len(v)]
        first = 0
        try:
            with self.errors("receiving from"):
                while first < len(pending):
                    n = self.sock.recvmsg_into(pending[first:first + IOV_MAX])[0]
                    if n == 0:
                        raise TransportError(f"receiving from {self.peer}: the peer closed "
                                             "the connection in the middle of a memory payload")
                    first = _advance(pending, first, n)
        finally:
            _release(pending)

    def send_all(self, buffers: Sequence[Buffer]) -> None:
        """Send every buffer in order with sendmsg, resuming after partial writes."""
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        first = 0
        try:
            with self.errors("sending to"):
                while first < len(pending):
                    sent = self.sock.sendmsg(pending[first:first + IOV_MAX])
                    first = _advance(pending, first, sent)
        finally:
            _release(pending)

    def send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send `data` with `fds` attached as SCM_RIGHTS (UNIX sockets only)."""
        rights = array.array("i", fds).tobytes()
        with self.errors("sending file descriptors to"):
            sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        if sent < len(data):
            self.send_all([memoryview(data)[sent:]])

    def recv_some_with_fds(self, limit: int, max_fds: int = 4) -> tuple[bytes, list[int]]:
        """Up to `limit` bytes plus any fds that came with them (the caller owns the fds);
        (b"", []) at end of stream."""
        with self.errors("receiving from"):
            data, ancdata, _flags, _ = self.sock.recvmsg(limit, socket.CMSG_SPACE(max_fds * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(array.array("i", payload[:usable]))
        return data, fds


class TlsStream(Stream):
    """A TLS 1.3 connection (handshake already done): `SSL_write` / `SSL_read`."""

    encrypted = True
    sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket, peer: str, timeout: float | None = IO_TIMEOUT_S):
        super().__init__(sock, peer, timeout)
        self._gather = bytearray(TLS_GATHER_BYTES)

    def pending(self) -> int:
        return self.sock.pending()

    def send_all(self, buffers: Sequence[Buffer]) -> None:
        """Write every buffer in order; small ones are gathered into one TLS write."""
        gathered = 0
        gather = self._gather
        with self.errors("sending to"), memoryview(gather) as out:
            for buffer in buffers:
                size = len(buffer)
                if not size:
                    continue
                if size < TLS_SMALL_BYTES:
                    if gathered + size > len(gather):
                        self.sock.sendall(out[:gathered])
                        gathered = 0
                    out[gathered:gathered + size] = buffer
                    gathered += size
                    continue
                if gathered:
                    self.sock.sendall(out[:gathered])
                    gathered = 0
                self.sock.sendall(buffer)
            if gathered:
                self.sock.sendall(out[:gathered])


def tls_reason(exc: ssl.SSLError) -> str:
    """The useful words of an SSLError ('certificate verify failed: unable to get local
    issuer certificate', 'tlsv13 alert certificate required')."""
    verify = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    text = reason.lower().replace("_", " ")
    return f"{text}: {verify}" if verify else text


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
