"""`CutProxy`: a byte-level TCP proxy that can cut one of the connections it carries.

Put it between a source and a destination (the source dials the proxy); it
forwards every connection to the destination, both ways, and cuts connection
number `cut_index` (in the order they were accepted: 0 is MAIN) once `cut_after`
bytes have gone from the source to the destination on it. A cut resets both
sides of that connection, as a broken link would. Every thread
is joined and every socket closed by `close()`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

CHUNK = 256 * 1024


@dataclass
class Carried:
    """One connection through the proxy."""

    index: int
    client: socket.socket
    server: socket.socket
    sent: int = 0  # source -> destination bytes forwarded
    cut: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


class CutProxy:
    """Forwards 127.0.0.1:<port> to `target`; cuts one connection after some bytes."""

    def __init__(self, target: tuple[str, int], *, cut_index: int | None = None,
                 cut_after: int = 0) -> None:
        self.target = target
        self.cut_index = cut_index
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"tcp:127.0.0.1:{self.port}"
        self.connections: list[Carried] = []
        self._lock = threading.Lock()
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def cuts(self) -> int:
        return sum(1 for c in self.connections if c.cut)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                carried = Carried(len(self.connections), client, server)
                self.connections.append(carried)
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pump, args=(carried, source, sink,
                                                                   upstream),
                                          name=f"proxy-{carried.index}", daemon=True)
                carried.threads.append(thread)
                thread.start()

    def _pump(self, carried: Carried, source: socket.socket, sink: socket.socket,
              upstream: bool) -> None:
        limit = self.cut_after if upstream and carried.index == self.cut_index else None
        try:
            while True:
                want = CHUNK if limit is None else min(CHUNK, limit - carried.sent)
                if want <= 0:
                    self._cut(carried)
                    return
                data = source.recv(want)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
                if upstream:
                    carried.sent += len(data)
        except OSError:
            self._cut(carried, counted=False)

    def _cut(self, carried: Carried, *, counted: bool = True) -> None:
        """Break the connection as a failing link would: both ends reset, at once."""
        with self._lock:
            if counted:
                carried.cut = True
        for sock in (carried.client, carried.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):  # linger 0: close sends a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        self._acceptor.join(5)
        with self._lock:
            connections = list(self.connections)
        for carried in connections:
            for sock in (carried.client, carried.server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for thread in carried.threads:
                thread.join(5)
            for sock in (carried.client, carried.server):
                sock.close()

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
