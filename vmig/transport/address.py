"""Migration URLs ("tcp:HOST:PORT", "unix:PATH") and the sockets they open."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass

from vmig.errors import ConfigError, TransportError

CONNECT_TIMEOUT_S = 10.0
SOCKET_BUFFER_BYTES = 4 << 20  # net.core.wmem_max here; bigger buffers keep loopback busy


@dataclass(frozen=True)
class Address:
    """Where a migration receiver listens."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"unix:{self.path}"


def parse_url(url: str) -> Address:
    """Parse 'tcp:HOST:PORT' or 'unix:PATH'; ConfigError names the problem."""
    kind, sep, rest = url.partition(":")
    if not sep or kind not in ("tcp", "unix"):
        raise ConfigError(f"bad migration URL {url!r}: expected tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        if not rest:
            raise ConfigError(f"bad migration URL {url!r}: unix: needs a socket path")
        return Address("unix", path=rest)
    host, sep, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bad migration URL {url!r}: expected tcp:HOST:PORT with a port "
                          "number between 0 and 65535")
    return Address("tcp", host=host, port=int(port_text))


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)


def connect(address: Address, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Open a connection to a receiver; TransportError says why it failed."""
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except TimeoutError:
        raise TransportError(f"cannot connect to {address}: timed out after {timeout} s") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {address}: "
                             f"{exc.strerror or exc}") from None
    _tune(sock)
    return sock


def listen(address: Address, backlog: int = 128) -> socket.socket:
    """Bind and listen; a stale UNIX socket file is replaced, a live one is an error."""
    try:
        if address.kind == "unix":
            _remove_stale_unix_socket(address.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            info = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            family = info[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            _tune(sock)
            sock.bind(address.path if address.kind == "unix" else info[0][4])
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def bound_address(listener: socket.socket, address: Address) -> Address:
    """The address a listener really has (tcp port 0 becomes the chosen port)."""
    if address.kind == "tcp":
        port = listener.getsockname()[1]
        return Address("tcp", host=address.host, port=port)
    return address


def _remove_stale_unix_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody is listening: a leftover from a dead process
        return
    finally:
        probe.close()
    raise TransportError(f"cannot listen on unix:{path}: another process is listening there")
