"""Migration URLs ("tcp:HOST:PORT", "unix:PATH") and the plain sockets they open.

`bind_unix_socket` is the one place a UNIX socket file is bound: mode 0600 from
the start (a umask, so there is no moment where others can connect), a stale
file nobody listens on is replaced, and anything else at the path is refused.
The VMM's API socket and a `unix:` migration listener both use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass

from vmig.errors import ConfigError, TransportError, VmigError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
SOCKET_BUFFER_BYTES = 4 << 20  # net.core.wmem_max here; bigger buffers keep loopback busy
UNIX_BACKLOG = 64
PROBE_TIMEOUT_S = 1.0  # a live server accepts at once; a full backlog also counts as "in use"


@dataclass(frozen=True)
class Address:
    """Where a migration receiver listens."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"tcp:{format_host(self.host)}:{self.port}"


def format_host(host: str) -> str:
    """An IPv6 address in brackets ('[::1]'), anything else as it is."""
    return f"[{host}]" if ":" in host else host


def parse_url(url: str) -> Address:
    """Parse 'tcp:HOST:PORT' (IPv6 hosts in brackets) or 'unix:PATH'; ConfigError names
    the problem."""
    kind, sep, rest = url.partition(":")
    if not sep or kind not in ("tcp", "unix"):
        raise ConfigError(f"bad migration URL {url!r}: expected tcp:HOST:PORT or unix:PATH")
    if rest.startswith("//"):
        raise ConfigError(f"bad migration URL {url!r}: write {kind}:{rest[2:]} "
                          f"(no '//' after '{kind}:')")
    if kind == "unix":
        if not rest:
            raise ConfigError(f"bad migration URL {url!r}: unix: needs a socket path")
        return Address("unix", path=rest)
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"bad migration URL {url!r}: put an IPv6 address in brackets, "
                          "e.g. tcp:[::1]:7000")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bad migration URL {url!r}: expected tcp:HOST:PORT with a port "
                          "number between 0 and 65535")
    return Address("tcp", host=host, port=int(port_text))


def is_wildcard(host: str) -> bool:
    """True for 0.0.0.0, :: and the like: a listening address no source can dial."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def tune(sock: socket.socket) -> None:
    """No Nagle on TCP, big buffers on both kinds."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)


def connect(address: Address, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Open a plain connection to a receiver; TransportError says why it failed."""
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
        raise TransportError(f"cannot connect to {address}: timed out after "
                             f"{timeout:g} s") from None
    except socket.gaierror as exc:
        raise TransportError(f"cannot connect to {address}: cannot resolve "
                             f"{address.host!r} ({exc.strerror})") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {address}: "
                             f"{exc.strerror or exc}") from None
    tune(sock)
    return sock


def listen(address: Address, backlog: int = 128) -> socket.socket:
    """Bind and listen: a `unix:` socket is born mode 0600 (see `bind_unix_socket`)."""
    if address.kind == "unix":
        sock = bind_unix_socket(address.path, what="migration socket", backlog=backlog)
        tune(sock)
        return sock
    try:
        info = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(f"cannot listen on {address}: cannot resolve {address.host!r} "
                             f"({exc.strerror})") from None
    family, _, _, _, sockaddr = info[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune(sock)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def bound_address(listener: socket.socket, address: Address) -> Address:
    """The address a listener really has (tcp port 0 becomes the chosen port)."""
    if address.kind == "tcp":
        port = listener.getsockname()[1]
        return Address("tcp", host=address.host, port=port)
    return address


def bind_unix_socket(path: str, *, what: str, backlog: int = UNIX_BACKLOG,
                     error: type[VmigError] = TransportError) -> socket.socket:
    """A listening AF_UNIX socket at `path`, mode 0600.

    A stale socket file (nobody accepts) is replaced; a live one, a path that
    is not a socket, or one that cannot be probed raises `error` with a
    one-line reason naming `what` ("API socket", "migration socket").
    """
    _remove_stale_socket(path, what, error)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # the file is born 0600; no window where others can connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise error(f"{what} {path} is in use by another process") from None
        raise error(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    return sock


def _remove_stale_socket(path: str, what: str, error: type[VmigError]) -> None:
    """Unlink `path` if it is a socket nobody listens on; refuse anything else that is there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"cannot use {what} path {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise error(f"{what} path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: the process that bound it is gone
    except (TimeoutError, BlockingIOError):
        raise error(f"{what} {path} is in use by another process") from None
    except OSError as exc:  # EACCES and the like: not ours to judge, so not ours to remove
        raise error(f"cannot probe {what} {path}: {exc.strerror or exc}") from None
    else:
        raise error(f"{what} {path} is in use by another process")
    finally:
        probe.close()
    log.info("replacing stale %s %s", what, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def local_addresses(family: socket.AddressFamily = socket.AF_INET) -> list[str]:
    """This host's addresses of `family`, non-loopback first (link-local IPv6 left out).

    Read from the interfaces themselves (SIOCGIFADDR for IPv4, /proc/net/if_inet6
    for IPv6), so no name lookup is involved.
    """
    found: list[str] = []
    if family == socket.AF_INET:
        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                request = struct.pack("256s", name.encode()[:15])
                try:
                    reply = fcntl.ioctl(probe.fileno(), siocgifaddr, request)
                except OSError:
                    continue  # no IPv4 address on this interface
                found.append(socket.inet_ntoa(reply[20:24]))
    else:
        with contextlib.suppress(OSError), open("/proc/net/if_inet6") as table:
            for line in table:
                raw, scope = line.split()[0], int(line.split()[3], 16)
                if scope == 0x20:  # link-local: needs an interface name to be dialled
                    continue
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    return sorted(set(found), key=lambda a: (ipaddress.ip_address(a).is_loopback, a))


def dialable(address: Address) -> tuple[Address, list[str]]:
    """For a listener on a wildcard host: an address a source can dial, and every address
    of the host. Other addresses come back as they are."""
    if address.kind != "tcp" or not is_wildcard(address.host):
        return address, []
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    hosts = local_addresses(family)
    if not hosts:
        return address, []
    return Address("tcp", host=hosts[0], port=address.port), hosts
