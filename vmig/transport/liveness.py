"""Dead-peer detection on a TCP connection: keepalive and TCP_USER_TIMEOUT from one number.

A peer whose host died, or whose network went away without a word (no RST, no
ICMP), is otherwise found only by the 60 s read timeout, or never by a thread
blocked without one. `set_dead_peer_timeout(sock, T)` makes the kernel find it
in about T seconds, in both of the ways a connection can be waiting:

- with data sent and not acknowledged, TCP_USER_TIMEOUT = T ends the connection
  T s after its first retransmission, so one retransmission timeout (0.2 s on a
  LAN) after T s of silence (a zero window that the peer keeps answering probes
  for is not that: a slow peer is not a dead one);
- idle, keepalive probes start after `idle` s without a segment from the peer and
  go every `interval` s. With TCP_USER_TIMEOUT set, Linux ends the connection at
  the first probe time at or after T s of silence with a probe unanswered (it then
  ignores TCP_KEEPCNT), so `idle + count * interval` is made to equal T:
  interval = max(1, T // 5), count = max(1, (T - 1) // interval),
  idle = T - count * interval. T = 10 gives probes at 2, 4, 6, 8 s and the end at
  10 s; T = 2 gives 1 s and 2 s. Keepalive counts whole seconds, so T is taken as at
  least 2 there (T = 1 is found at 2 s when idle).

A stall shorter than T is ridden out as long as a probe or retransmission falls
between its end and T. Probes go every `interval` s. Retransmissions back off
exponentially (0.2, 0.6, 1.4, 3.0, 6.2 s into a silence on a LAN), which leaves
gaps wider than T / 2: with T = 5, a 3.5 s stall would get no retransmission
before the end at 5.2 s. Where the kernel has TCP_RTO_MAX_MS (Linux 6.15) the
backoff is capped at `interval` (at least the kernel's minimum of 1 s), so a
stall up to about T - interval is ridden out by a sender too (tests/unit/
test_liveness.py shows both). Older kernels skip that cap.

Every call here is one setsockopt: nothing blocks, and the GIL is held only for it.
UNIX sockets have neither keepalive nor retransmissions; they are left alone (a
peer process that dies closes them).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass

#: The default for a connection whose sender has not said (the receiver before START);
#: the send parameter `dead_peer_timeout_s` has the same default.
DEAD_PEER_TIMEOUT_S = 10
#: linux/tcp.h TCP_RTO_MAX_MS (6.15); Python 3.11's socket module has no name for it.
TCP_RTO_MAX_MS = 44
RTO_MAX_RANGE_MS = (1000, 120_000)  # what the kernel accepts for TCP_RTO_MAX_MS
PROBES_PER_TIMEOUT = 5  # about this many keepalive probes fit in one timeout
#: struct tcp_info's first bytes: tcpi_state, tcpi_ca_state, tcpi_retransmits, tcpi_probes.
TCP_INFO_HEAD = struct.Struct("BBBB")
TCP_CLOSE = 7  # include/net/tcp_states.h


@dataclass(frozen=True)
class Keepalive:
    """The socket options for one dead-peer timeout (seconds, except where named)."""

    idle: int  #: TCP_KEEPIDLE: silence before the first probe
    interval: int  #: TCP_KEEPINTVL: between probes
    count: int  #: TCP_KEEPCNT: unanswered probes that end it (without TCP_USER_TIMEOUT)
    user_timeout_ms: int  #: TCP_USER_TIMEOUT: unacknowledged data this long ends it
    rto_max_ms: int  #: TCP_RTO_MAX_MS: the longest wait between two retransmissions


def keepalive_for(dead_peer_timeout_s: float) -> Keepalive:
    """The options that find a silent peer in `dead_peer_timeout_s` (see the module
    docstring for how). ValueError if it is not positive."""
    if not dead_peer_timeout_s > 0:
        raise ValueError(f"dead_peer_timeout_s must be positive, not {dead_peer_timeout_s!r}")
    whole = max(2, int(dead_peer_timeout_s))
    interval = max(1, whole // PROBES_PER_TIMEOUT)
    count = max(1, (whole - 1) // interval)
    low, high = RTO_MAX_RANGE_MS
    return Keepalive(idle=whole - count * interval, interval=interval, count=count,
                     user_timeout_ms=round(dead_peer_timeout_s * 1000),
                     rto_max_ms=min(max(interval * 1000, low), high))


def set_dead_peer_timeout(sock: socket.socket, dead_peer_timeout_s: float) -> None:
    """Make the kernel end `sock` once its peer has been silent `dead_peer_timeout_s`
    seconds: SO_KEEPALIVE, TCP_KEEPIDLE/KEEPINTVL/KEEPCNT, TCP_USER_TIMEOUT (and
    TCP_RTO_MAX_MS where the kernel has it). A blocked recv or send then fails with
    ETIMEDOUT. UNIX sockets are left as they are. Works on an `ssl.SSLSocket` too (its
    options are the TCP socket's). OSError if a TCP socket refuses an option."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = keepalive_for(dead_peer_timeout_s)
    tcp = socket.IPPROTO_TCP
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(tcp, socket.TCP_KEEPIDLE, options.idle)
    sock.setsockopt(tcp, socket.TCP_KEEPINTVL, options.interval)
    sock.setsockopt(tcp, socket.TCP_KEEPCNT, options.count)
    sock.setsockopt(tcp, socket.TCP_USER_TIMEOUT, options.user_timeout_ms)
    with contextlib.suppress(OSError):  # ENOPROTOOPT before Linux 6.15: backoff uncapped
        sock.setsockopt(tcp, TCP_RTO_MAX_MS, options.rto_max_ms)


def is_dead_peer(exc: OSError) -> bool:
    """Whether `exc` is the kernel giving up on a silent peer (ETIMEDOUT), as opposed to
    a Python-level socket timeout (which has no errno)."""
    return exc.errno == errno.ETIMEDOUT


def gave_up(sock: socket.socket) -> bool:
    """Whether the kernel has ended `sock` for a silent peer: closed, with keepalive
    probes or retransmissions still unanswered (TCP_INFO).

    For TLS streams: Python 3.11's `ssl` loses the ETIMEDOUT of the socket under
    it and reports an end of stream (a read) or "EOF occurred in violation of
    protocol" (a write), so that is asked of the socket instead. A connection
    reset by a peer that answered only a retransmission counts too (it was
    silent until then); a reset or an end of stream otherwise does not.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
    except OSError:
        return False
    state, _, retransmits, probes = TCP_INFO_HEAD.unpack(info[:TCP_INFO_HEAD.size])
    return state == TCP_CLOSE and (retransmits > 0 or probes > 0)
