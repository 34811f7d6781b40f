"""`CutProxy`: a byte-level TCP proxy that breaks the connections it carries, as a network would.

Put it between a source and a destination (the source dials the proxy); it
forwards every connection to the destination, both ways. What it can do to them:

- **cut after N bytes**: connection number `cut_index` (in the order accepted: 0 is
  the first MAIN) is reset once `cut_after` bytes have gone from the source to the
  destination on it;
- **cut MAIN now** (`cut_main()`), at a moment the caller chooses;
- **stall** (`stall(seconds)`): nothing is forwarded on any connection, either way,
  and every connection stays open; then forwarding goes on;
- **outage** (`outage(seconds)`): every carried connection is reset at once, and for
  `seconds` a new connection is accepted and reset at once (so a re-dial fails fast,
  as against a host that answers but whose network is down); then new connections
  are carried again;
- **lose COMPLETE's answer** (`lose_complete_answer=True`): on MAIN, the proxy
  parses the source's stream (the 32-byte hello, then requests: a 16-byte `<H6sQ`
  header, command/headers/length, and `length` payload bytes; the token's AUTH is
  one of them) and the destination's (one response per hello or request, same
  header layout). Once a whole COMPLETE request has been forwarded, nothing more is
  forwarded on that connection either way; when the destination's answer to it
  begins to arrive it is dropped and the connection reset. This happens to the
  first COMPLETE only, so one re-sent over a re-dialled MAIN goes through.

A reset is what a broken link gives: both sides closed with SO_LINGER 0 (an RST,
no FIN). The proxy reads each connection's hello (role, and in protocol v3 the
connection's index and resume count: bytes 12..16), so MAIN is known however many
times it was re-dialled. It needs plain TCP (token auth, not TLS) to parse
anything; cuts, stalls and outages work on any stream. Every thread is joined and
every socket closed by `close()`.

Either side may be a UNIX socket, as with KubeVirt's migration proxies (a VMM dials a
socket file, the proxy carries the bytes over TCP): `listen_path=` listens on a socket
file instead of 127.0.0.1 (`url` is then `unix:PATH`), and a target `"unix:PATH"`
dials one. A reset of a UNIX socket is a plain close (UNIX sockets have no RST: the
peer reads an end of stream, or a write fails with EPIPE).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK = 256 * 1024
#: How often a forwarding thread looks at the proxy's orders while it waits for a socket.
TICK_S = 0.02
HELLO = struct.Struct("<8sHHHH16s")  # magic, role, version, index, resume count, migration id
HEADER = struct.Struct("<H6sQ")  # request and response headers alike
ROLE_MAIN = 1
COMMAND_COMPLETE = 5
#: A COMPLETE whose answer never begins to come within this long is still cut off.
ANSWER_WAIT_S = 10.0
_LINGER_0 = struct.pack("ii", 1, 0)


class _Frames:
    """Counts whole frames in one direction of a connection: an optional fixed-size
    prologue (the hello), then `<H6sQ` headers each followed by `length` bytes."""

    def __init__(self, prologue: int) -> None:
        self.prologue = prologue  # bytes of prologue still to come
        self.header = bytearray()
        self.payload_left = 0
        self.frames = 0  # frames (the prologue counts as one) wholly seen
        self.command = -1  # the command of the frame being read (or last read)

    def feed(self, data: bytes) -> list[tuple[int, int, int]]:
        """Consume `data`; return (end offset in data, frame number, command) for each frame
        that ended in it (command -1 for the prologue)."""
        ends = []
        at = 0
        while at < len(data):
            if self.prologue:
                take = min(self.prologue, len(data) - at)
                self.prologue -= take
                at += take
                if not self.prologue:
                    ends.append((at, self.frames, -1))
                    self.frames += 1
                continue
            if self.payload_left:
                take = min(self.payload_left, len(data) - at)
                self.payload_left -= take
                at += take
            else:
                take = min(HEADER.size - len(self.header), len(data) - at)
                self.header += data[at:at + take]
                at += take
                if len(self.header) < HEADER.size:
                    continue
                self.command, _, self.payload_left = HEADER.unpack(self.header)
                self.header.clear()
            if not self.payload_left:
                ends.append((at, self.frames, self.command))
                self.frames += 1
        return ends

    def begun(self) -> bool:
        """Some bytes of the next frame have been seen."""
        return bool(self.header) or bool(self.payload_left)


@dataclass
class Carried:
    """One connection through the proxy."""

    index: int  # in the order accepted
    client: socket.socket
    server: socket.socket
    sent: int = 0  # source -> destination bytes forwarded
    cut: bool = False  # reset by an order of the test (not by a peer)
    dead: bool = False  # reset or closed: its threads end
    hello: bytes = b""
    threads: list[threading.Thread] = field(default_factory=list)
    #: Lose-COMPLETE's-answer state: requests and responses counted on MAIN.
    requests: _Frames = field(default_factory=lambda: _Frames(HELLO.size))
    responses: _Frames = field(default_factory=lambda: _Frames(0))
    complete_frame: int | None = None  # the request number of the COMPLETE forwarded
    complete_at: float = 0.0
    ended: int = 0  # forwarding threads that returned

    @property
    def role(self) -> int | None:
        return HELLO.unpack(self.hello)[1] if len(self.hello) == HELLO.size else None

    @property
    def hello_index(self) -> int | None:
        """Bytes 12..14 of the hello: the connection's index (protocol v3; zero in v2)."""
        return HELLO.unpack(self.hello)[3] if len(self.hello) == HELLO.size else None

    @property
    def resume_count(self) -> int | None:
        """Bytes 14..16 of the hello (protocol v3; zero in v2)."""
        return HELLO.unpack(self.hello)[4] if len(self.hello) == HELLO.size else None

    @property
    def main(self) -> bool:
        role = self.role
        return role == ROLE_MAIN if role is not None else self.index == 0


#: Where the proxy forwards to: (host, port) over TCP, or "unix:PATH".
Target = tuple[str, int] | str


class CutProxy:
    """Forwards 127.0.0.1:<port> (or the socket file `listen_path`) to `target`, breaking
    connections when told to."""

    def __init__(self, target: Target, *, listen_path: str | None = None,
                 cut_index: int | None = None, cut_after: int = 0,
                 lose_complete_answer: bool = False) -> None:
        if isinstance(target, str) and not target.startswith("unix:"):
            raise ValueError(f"a string target is unix:PATH, not {target!r}")
        self.target = target
        self.cut_index = cut_index
        self.cut_after = cut_after
        self.lose_complete_answer = lose_complete_answer
        #: COMPLETE requests whose answer was dropped (0 or 1).
        self.answers_lost = 0
        #: Connections refused during outages (accepted and reset at once).
        self.refused = 0
        #: Outages and stalls begun.
        self.outages = 0
        self.stalls = 0
        self.listen_path = listen_path
        if listen_path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
            self.url = f"tcp:127.0.0.1:{self.port}"
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(listen_path)
            self.listener.listen(128)
            self.port = 0
            self.url = f"unix:{listen_path}"
        self.listener.settimeout(TICK_S * 5)
        self.connections: list[Carried] = []
        self._lock = threading.Lock()
        self._closing = False
        self._down_until = 0.0  # monotonic: new connections are refused until then
        self._stalled_until = 0.0  # monotonic: nothing is forwarded until then
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    # --- orders ---------------------------------------------------------------------------

    @property
    def cuts(self) -> int:
        """Connections reset by an order (a cut, an outage, a lost answer)."""
        return sum(1 for c in self.connections if c.cut)

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self._stalled_until

    def stall(self, seconds: float) -> None:
        """Forward nothing on any connection, either way, for `seconds` (returns at once);
        connections stay open and new ones are accepted but carry nothing meanwhile."""
        with self._lock:
            self.stalls += 1
            self._stalled_until = time.monotonic() + seconds

    def outage(self, seconds: float) -> int:
        """Reset every carried connection now, and refuse new ones for `seconds` (returns
        once the resets are done). Returns how many connections were reset."""
        with self._lock:
            self.outages += 1
            self._down_until = time.monotonic() + seconds
            live = [c for c in self.connections if not c.dead]
        for carried in live:
            self._reset(carried, counted=True)
        return len(live)

    def cut_main(self) -> bool:
        """Reset the live MAIN connection now (found by its hello's role); False if none."""
        with self._lock:
            mains = [c for c in self.connections if not c.dead and c.main]
        for carried in mains:
            self._reset(carried, counted=True)
        return bool(mains)

    def live(self) -> list[Carried]:
        with self._lock:
            return [c for c in self.connections if not c.dead]

    # --- machinery ------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.down:
                self._refuse(client)
                continue
            try:
                server = self._dial()
            except OSError:
                _hard_close(client)
                continue
            for sock in (client, server):
                sock.setblocking(False)
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                carried = Carried(len(self.connections), client, server)
                self.connections.append(carried)
                if self.down:  # the outage began while this one was being connected
                    carried.dead = carried.cut = True
                else:  # started under the lock: a reset always finds both threads started
                    for source, sink, upstream in ((client, server, True),
                                                   (server, client, False)):
                        thread = threading.Thread(target=self._pump,
                                                  args=(carried, source, sink, upstream),
                                                  name=f"proxy-{carried.index}", daemon=True)
                        carried.threads.append(thread)
                        thread.start()
            if carried.dead:
                _hard_close(client)
                _hard_close(server)

    def _dial(self) -> socket.socket:
        """A new connection to the target."""
        if isinstance(self.target, tuple):
            return socket.create_connection(self.target, timeout=5)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(self.target.removeprefix("unix:"))
        except BaseException:
            sock.close()
            raise
        return sock

    def _refuse(self, client: socket.socket) -> None:
        with self._lock:
            self.refused += 1
        _hard_close(client)

    def _pump(self, carried: Carried, source: socket.socket, sink: socket.socket,
              upstream: bool) -> None:
        readable = select.poll()
        readable.register(source, select.POLLIN)
        writable = select.poll()
        writable.register(sink, select.POLLOUT)
        tick = int(TICK_S * 1000)
        pending = memoryview(b"")
        reset_after = False  # reset once `pending` is out
        try:
            while not carried.dead and not self._closing:
                if self.stalled:
                    time.sleep(TICK_S)
                    continue
                if pending:
                    if writable.poll(tick):
                        with contextlib.suppress(BlockingIOError):
                            pending = pending[sink.send(pending):]
                    continue
                if reset_after:
                    self._reset(carried, counted=True)
                    return
                if (upstream and carried.complete_frame is not None
                        and time.monotonic() - carried.complete_at > ANSWER_WAIT_S):
                    self._reset(carried, counted=True)  # the answer never began: cut anyway
                    return
                if not readable.poll(tick):
                    continue
                try:
                    data = source.recv(CHUNK)
                except BlockingIOError:
                    continue
                if not data:  # the peer closed its side: pass that on
                    if not carried.dead:
                        with contextlib.suppress(OSError):
                            sink.shutdown(socket.SHUT_WR)
                    return
                forward, reset_after = (self._upstream(carried, data) if upstream
                                        else self._downstream(carried, data))
                pending = memoryview(forward)
        except OSError:
            if not carried.dead and not self._closing:
                self._reset(carried, counted=False)  # one end failed: the link goes with it
        finally:
            self._ended(carried)

    def _upstream(self, carried: Carried, data: bytes) -> tuple[bytes, bool]:
        """What of `data` (source -> destination) to forward, and whether to reset after."""
        if len(carried.hello) < HELLO.size:
            carried.hello += data[:HELLO.size - len(carried.hello)]
        if carried.complete_frame is not None:  # COMPLETE is out: nothing more goes
            return b"", False
        if carried.index == self.cut_index:
            left = self.cut_after - carried.sent
            if len(data) >= left:
                carried.sent += left
                return data[:left], True
        if self.lose_complete_answer and not self.answers_lost:
            for end, number, command in carried.requests.feed(data):
                if command != COMMAND_COMPLETE or not carried.main:
                    continue
                with self._lock:  # the first COMPLETE only (another MAIN may race)
                    if self.answers_lost:
                        break
                    self.answers_lost += 1
                carried.complete_frame = number
                carried.complete_at = time.monotonic()
                data = data[:end]  # set before its last byte goes: no answer slips by
                break
        carried.sent += len(data)
        return data, False

    def _downstream(self, carried: Carried, data: bytes) -> tuple[bytes, bool]:
        """What of `data` (destination -> source) to forward, and whether to reset after.

        Response number k answers request number k (the hello is number 0)."""
        if not self.lose_complete_answer:
            return data, False
        before = carried.responses.frames
        ends = carried.responses.feed(data)
        complete = carried.complete_frame  # read after the recv: see _upstream
        if complete is None:
            return data, False
        if before >= complete:  # all of it is COMPLETE's answer or later
            return b"", True
        forward = len(data)
        for end, number, _ in ends:
            if number == complete - 1:
                forward = end  # the last answer passed on
        responses = carried.responses
        begun = responses.frames > complete or (responses.frames == complete
                                                and responses.begun())
        return data[:forward], begun

    def _reset(self, carried: Carried, *, counted: bool) -> None:
        """Break the connection as a failing link would: both ends reset (RST), at once."""
        with self._lock:
            if carried.dead:
                return
            carried.dead = True
            if counted:
                carried.cut = True
        me = threading.current_thread()
        for thread in list(carried.threads):  # they see `dead` within a tick
            if thread is not me:
                thread.join(5)
        for sock in (carried.client, carried.server):
            _hard_close(sock)

    def _ended(self, carried: Carried) -> None:
        with self._lock:
            carried.ended += 1
            both = carried.ended == 2 and not carried.dead
            if both:
                carried.dead = True
        if both:  # both peers closed their sides: nothing is left to carry
            for sock in (carried.client, carried.server):
                sock.close()

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        self._acceptor.join(5)
        if self.listen_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_path)
        with self._lock:
            connections = list(self.connections)
        for carried in connections:
            for thread in carried.threads:
                thread.join(5)
            for sock in (carried.client, carried.server):
                sock.close()

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hard_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    sock.close()
