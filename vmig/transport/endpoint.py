"""The one place that dials and accepts migration connections and returns streams.

`dial()` opens a connection to a receiver, secured as `Security` says (TLS
handshake with the receiver's certificate checked against the CA and the URL's
host), and `Listener` accepts them and runs the server side of TLS under a
deadline. The protocol's own handshake (hello, token) follows in
`vmig.transport.channel`; this module only moves and secures bytes. Every TCP
connection is watched for a silent peer from its first byte on
(`vmig.transport.liveness`): a dialled one with the sender's `dead_peer_timeout_s`,
an accepted one with the default until the receiver learns the sender's value
(`Stream.set_dead_peer_timeout`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import time

from vmig.errors import TransportError
from vmig.transport.address import Address, bound_address, connect, listen, tune
from vmig.transport.liveness import DEAD_PEER_TIMEOUT_S, set_dead_peer_timeout
from vmig.transport.security import Security
from vmig.transport.stream import IO_TIMEOUT_S, PlainStream, Stream, TlsStream, tls_reason

__all__ = ["Listener", "dial"]

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 0.2  # how often a blocked accept looks at the closing flag


def dial(address: Address, security: Security, *, timeout: float = IO_TIMEOUT_S,
         dead_peer_timeout_s: float = DEAD_PEER_TIMEOUT_S) -> Stream:
    """Connect to the receiver at `address`; return a plain or TLS stream that finds a
    silent peer in `dead_peer_timeout_s` (TCP only; the TLS handshake included).

    TransportError says why it failed, with a hint where the cause is likely a
    mismatch (TLS on one side only, a certificate from another CA).
    """
    sock = connect(address)
    peer = str(address)
    try:
        set_dead_peer_timeout(sock, dead_peer_timeout_s)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot watch the connection to {peer} for a silent peer: "
                             f"{exc.strerror or exc}") from None
    stream = _dial_secured(sock, peer, address, security, timeout)
    stream.dead_peer_timeout_s = dead_peer_timeout_s
    return stream


def _dial_secured(sock: socket.socket, peer: str, address: Address, security: Security,
                  timeout: float) -> Stream:
    if security.tls is None:
        return PlainStream(sock, peer, timeout)
    try:
        wrapped = security.tls.context.wrap_socket(
            sock, server_hostname=address.host or None, do_handshake_on_connect=False)
    except (ssl.SSLError, ValueError) as exc:
        sock.close()
        raise TransportError(f"TLS with {peer} failed: {exc}") from None
    try:
        wrapped.settimeout(timeout)
        wrapped.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        wrapped.close()
        raise TransportError(
            f"TLS handshake with {peer} failed: {tls_reason(exc)} (the destination's "
            f"certificate must be signed by {security.tls.directory}/ca-cert.pem and name "
            f"{address.host})") from None
    except ssl.SSLError as exc:
        wrapped.close()
        raise TransportError(f"TLS handshake with {peer} failed: {tls_reason(exc)} (does the "
                             "destination listen with TLS?)") from None
    except (OSError, TimeoutError) as exc:
        wrapped.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise TransportError(f"TLS handshake with {peer} failed: {reason} (does the "
                             "destination listen with TLS?)") from None
    return TlsStream(wrapped, peer, timeout)


class Listener:
    """The listening socket of one incoming migration. `close()` it."""

    def __init__(self, address: Address, security: Security) -> None:
        self.security = security
        self._sock = listen(address)
        self._sock.settimeout(ACCEPT_POLL_S)
        self.address = bound_address(self._sock, address)
        self._closed = False
        self._identity: tuple[int, int] | None = None
        if address.kind == "unix":  # to remove only our own socket file later
            info = os.stat(address.path)
            self._identity = (info.st_dev, info.st_ino)

    def accept(self) -> tuple[socket.socket, str] | None:
        """The next connection and a name for its peer, watched for a silent peer with
        the default dead-peer timeout; None after a poll interval with none (or with
        one that could not be watched, closed). Raises TransportError once the
        listener is closed."""
        try:
            sock, peer = self._sock.accept()
        except TimeoutError:
            if self._closed:
                raise TransportError("the listener is closed") from None
            return None
        except OSError as exc:
            raise TransportError(f"accepting on {self.address}: "
                                 f"{exc.strerror or exc}") from None
        sock.settimeout(None)
        name = _peer_name(peer, self.address)
        try:  # the sender's own value comes with START: Stream.set_dead_peer_timeout
            set_dead_peer_timeout(sock, DEAD_PEER_TIMEOUT_S)
        except OSError as exc:
            log.warning("closing the connection from %s: cannot watch it for a silent "
                        "peer: %s", name, exc.strerror or exc)
            sock.close()
            return None
        return sock, name

    def secure(self, sock: socket.socket, peer: str, deadline: float) -> Stream:
        """The stream for an accepted socket: TLS handshake (by `deadline`, a monotonic
        time) when this listener has TLS. Closes `sock` and raises TransportError on
        failure."""
        tune(sock)
        remaining = deadline - time.monotonic()
        if self.security.tls is None:
            return PlainStream(sock, peer, max(remaining, 0.001))
        try:
            wrapped = self.security.tls.context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise TransportError(f"TLS with {peer} failed: {exc}") from None
        try:
            wrapped.settimeout(max(remaining, 0.001))
            wrapped.do_handshake()
        except ssl.SSLError as exc:
            wrapped.close()
            raise TransportError(f"TLS handshake with {peer} failed: "
                                 f"{tls_reason(exc)}") from None
        except (OSError, TimeoutError) as exc:
            wrapped.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise TransportError(f"TLS handshake with {peer} failed: {reason}") from None
        return TlsStream(wrapped, peer, max(deadline - time.monotonic(), 0.001))

    def close(self) -> None:
        """Stop listening; a `unix:` socket file is removed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._identity is not None:
            with contextlib.suppress(OSError):
                info = os.lstat(self.address.path)
                if (info.st_dev, info.st_ino) == self._identity:
                    os.unlink(self.address.path)


def _peer_name(peer: object, address: Address) -> str:
    if address.kind == "unix":
        return f"a peer on {address}"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"{'[' + host + ']' if ':' in host else host}:{peer[1]}"
    return "a peer"
