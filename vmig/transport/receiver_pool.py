"""`ReceiverPool`: the connections of one incoming migration (the mirror of `SenderPool`).

It listens, accepts, and runs every connection's handshake (TLS, hello, token
proof) on a thread of its own under a deadline of its own, so a silent or slow
peer costs only its own deadline, never anyone else's. At most
`max_pending` connections may be in their handshake at once; more are closed
at once. Admission follows the handshake:

- the migration belongs to the first MAIN connection that *authenticates*
  (not the first that says hello); a second MAIN is refused;
- a MEMORY connection must carry that MAIN's migration id, and is admitted only
  until START is accepted (`close_admission()`), and only up to
  `max_connections` in all.

The MAIN connection goes to whoever waits in `main()` (the migration's
coordinator); each admitted MEMORY connection's thread goes on to serve it with
the `serve_memory` the migration layer handed in. Threads (all joined by `close()`):
``migrate-accept``, ``migrate-hs-N`` per connection in its handshake, which
becomes ``migrate-mem-N`` once its MEMORY connection is admitted.

Protocol version 3 resumes connections. A hello with the migration's id, the index of
a connection admitted before and a resume count above the last one admitted for it
is a *resumed* connection, admitted at any point until the pool is shut down (a
lower or equal count is refused: a replayed handshake). Before its handshake is
answered OK the pool *fences* the connection it replaces: the old stream is shut
down and the old connection's user has let go of it (a MEMORY connection's worker
has ended, dropping a chunk it had half received; MAIN's coordinator and the FAULT
connection's user have called `resumed_main` / `resumed_fault`), so nothing read
from the old connection can be written after what comes on the new one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from vmig.errors import TransportError, describe
from vmig.proto import ConnectionRole, Hello
from vmig.transport.address import Address
from vmig.transport.channel import (
    DestinationFaultChannel,
    HandshakeRefused,
    ReceiverChannel,
    receive_handshake,
)
from vmig.transport.endpoint import Listener
from vmig.transport.hello import Identity
from vmig.transport.security import Security
from vmig.transport.stream import IO_TIMEOUT_S, Stream

log = logging.getLogger(__name__)

#: One connection's TLS handshake, hello and token proof, together.
HANDSHAKE_TIMEOUT_S = 10.0
#: Connections in their handshake (not yet authenticated) at once; more are closed.
MAX_PENDING_HANDSHAKES = 32

ServeMemory = Callable[[ReceiverChannel], None]


class ReceiverPool:
    """Accepts, authenticates and admits the connections of one migration."""

    def __init__(self, address: Address, security: Security, *, max_connections: int,
                 serve_memory: ServeMemory,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 max_pending: int = MAX_PENDING_HANDSHAKES) -> None:
        self.security = security
        self._requested = address
        self._max_connections = max_connections
        self._serve_memory = serve_memory
        self._handshake_timeout = handshake_timeout
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._listener: Listener | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._pending = 0
        self._main_queue: queue.SimpleQueue[ReceiverChannel | None] = queue.SimpleQueue()
        self._main: ReceiverChannel | None = None
        self._migration_id: bytes | None = None
        self._extras: list[ReceiverChannel] = []
        self._admitted_memory = 0  # MEMORY connections admitted so far (version 2's index)
        self._reserved = 0  # MEMORY connections admitted, not yet in _extras
        self._fault: DestinationFaultChannel | None = None  # post-copy's FAULT connection
        self._fault_claimed = False
        # Version 3: the last resume count admitted per (role, index); the threads serving
        # MEMORY connections by index; the MAIN and FAULT channels their users let go of.
        self._resumes: dict[tuple[ConnectionRole, int], int] = {}
        self._workers: dict[int, tuple[ReceiverChannel, threading.Thread]] = {}
        self._released: list[object] = []
        self._main_timeout: float | None = IO_TIMEOUT_S
        self._dead_peer_s: float | None = None  # the sender's, once START said it
        #: Connections resumed so far.
        self.resumed = 0
        self._admitting = True
        self._closing = False
        self._interrupted = False
        self._serial = 0
        #: Connections refused so far (handshake failures included), and the last reason.
        self.refused = 0
        self.last_refusal: str | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Address:
        """Listen; return the bound address (a tcp port 0 becomes the chosen one)."""
        self._listener = Listener(self._requested, self.security)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="migrate-accept")
        self._accept_thread.start()
        return self._listener.address

    @property
    def address(self) -> Address:
        return self._listener.address if self._listener is not None else self._requested

    def main(self) -> ReceiverChannel | None:
        """Block until a MAIN connection is admitted; None once the pool is shut down."""
        channel = self._main_queue.get()
        if channel is None:
            self._main_queue.put(None)  # later callers see it too
        return channel

    def close_admission(self, extras: int, timeout: float) -> int:
        """START is accepted: wait up to `timeout` s for `extras` MEMORY connections, then
        admit no more. Returns how many were admitted."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self._extras) >= extras or self._closing or self._interrupted,
                timeout)
            self._admitting = False
            return len(self._extras)

    def fault_channel(self, timeout: float) -> DestinationFaultChannel | None:
        """Post-copy's FAULT connection, waiting up to `timeout` s for it to be admitted."""
        with self._changed:
            self._changed.wait_for(lambda: self._fault is not None or self._closing
                                   or self._interrupted, timeout)
            return self._fault

    def set_dead_peer_timeout(self, seconds: float) -> None:
        """The sender's dead-peer timeout (from START): every connection's keepalive and
        TCP_USER_TIMEOUT, and how long MAIN's reader waits for a request (the sender's
        heartbeat keeps it busy); connections admitted later (resumed) get it too."""
        with self._lock:
            self._main_timeout = seconds
            self._dead_peer_s = seconds
            main = self._main
            channels = [*self._extras, *([self._fault] if self._fault else [])]
        if main is not None:
            main.settimeout(seconds)
        for channel in [*channels, *([main] if main else [])]:
            with contextlib.suppress(TransportError):
                channel.stream.set_dead_peer_timeout(seconds)

    def resumed_main(self, lost: ReceiverChannel, timeout: float | None
                     ) -> ReceiverChannel | None:
        """Let go of the lost MAIN connection and wait up to `timeout` s (None: for ever)
        for the sender to resume it; None when it did not (or the pool is shutting down)."""
        self._release(lost)
        try:
            channel = self._main_queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if channel is None:
            self._main_queue.put(None)
        return channel

    def resumed_fault(self, lost: DestinationFaultChannel, timeout: float | None
                      ) -> DestinationFaultChannel | None:
        """Let go of the lost FAULT connection and wait up to `timeout` s (None: for ever)
        for its resumed one; None when it did not come (or the pool is shutting down)."""
        self._release(lost)
        with self._changed:
            self._changed.wait_for(lambda: (self._fault is not lost and self._fault is not None)
                                   or self._closing or self._interrupted, timeout)
            return None if self._fault is lost or self._closing else self._fault

    def _release(self, lost: object) -> None:
        with self._changed:
            self._released.append(lost)
            self._changed.notify_all()

    @property
    def extras(self) -> list[ReceiverChannel]:
        with self._lock:
            return list(self._extras)

    def interrupt(self) -> None:
        """Stop admitting, and wake every thread blocked reading a connection, but leave
        MAIN able to write (a cancel is answered on it); never blocks."""
        with self._lock:
            self._interrupted = True
            self._admitting = False
            main, extras = self._main, list(self._extras)
            if self._fault is not None:
                extras.append(self._fault)
            self._changed.notify_all()
        listener = self._listener
        if listener is not None:
            listener.close()
        for channel in extras:
            channel.stream.shutdown()
        if main is not None:
            main.interrupt()
        self._main_queue.put(None)  # a coordinator waiting for MAIN, or for MAIN resumed

    def shutdown(self) -> None:
        """Stop accepting and wake every thread blocked on a connection; never blocks."""
        with self._lock:
            self._closing = True
            self._admitting = False
            channels = [*self._extras, *([self._main] if self._main else []),
                        *([self._fault] if self._fault else [])]
            self._changed.notify_all()
        for channel in channels:
            channel.stream.shutdown()
        listener = self._listener
        if listener is not None:
            listener.close()
        self._main_queue.put(None)

    def close(self) -> None:
        """Shut down, join every thread, close every connection; idempotent."""
        self.shutdown()
        accept = self._accept_thread
        if accept is not None and accept is not threading.current_thread():
            accept.join()
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
                self._threads = []
                if not threads:
                    break
            for thread in threads:
                thread.join()
        with self._lock:
            channels = [*self._extras, *([self._main] if self._main else []),
                        *([self._fault] if self._fault else [])]
            self._extras, self._main, self._fault = [], None, None
            self._workers.clear()
        for channel in channels:
            channel.close()
        while True:  # a MAIN handed over but never taken
            try:
                pending = self._main_queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.close()
        self._main_queue.put(None)

    # --- accepting ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing:
            try:
                accepted = listener.accept()
            except TransportError:
                break  # closed
            if accepted is None:
                continue
            sock, peer = accepted
            with self._lock:
                refuse = self._closing or self._pending >= self._max_pending
                if not refuse:
                    self._pending += 1
                    self._serial += 1
                    thread = threading.Thread(target=self._handle,
                                              args=(sock, peer, self._serial),
                                              name=f"migrate-hs-{self._serial}")
                    self._threads.append(thread)
            if refuse:
                self._note_refusal(peer, f"{self._max_pending} connections are already in "
                                         "their handshake")
                sock.close()
                continue
            thread.start()

    def _handle(self, sock: socket.socket, peer: str, serial: int) -> None:
        """One connection: secure it, run its handshake, admit it, then serve it."""
        deadline = time.monotonic() + self._handshake_timeout
        claimed: list[str] = []
        stream: Stream | None = None
        try:
            assert self._listener is not None
            stream = self._listener.secure(sock, peer, deadline)
            channel = receive_handshake(
                stream, token=self.security.token,
                admit=lambda hello: self._admit(hello, claimed),
                accept_fds=self.address.kind == "unix")
        except BaseException as exc:
            if claimed:
                self._unclaim(claimed)
            if not isinstance(exc, HandshakeRefused | TransportError):
                log.exception("handshake with %s failed", peer)  # a bug: never take the pool down
            self._note_refusal(peer, describe(exc))  # before closing: the peer sees it after
            if stream is not None:
                stream.close()
            return
        finally:
            with self._lock:
                self._pending -= 1
        self._install(channel, serial)

    def _install(self, channel: ReceiverChannel | DestinationFaultChannel,
                 serial: int) -> None:
        """Hand an admitted connection to its user."""
        resumed = channel.hello.resumed
        if self._dead_peer_s is not None:
            with contextlib.suppress(TransportError):
                channel.stream.set_dead_peer_timeout(self._dead_peer_s)
        if isinstance(channel, DestinationFaultChannel):  # post-copy's: the migration drives it
            channel.stream.settimeout(None)
            with self._lock:
                closing = self._closing or self._interrupted
                if not closing:
                    old, self._fault = self._fault, channel
                    if old is not None:
                        self._retire(old)
                    self._resumes[(channel.role, 0)] = channel.hello.resume
                    self.resumed += resumed
                    self._changed.notify_all()
            if closing:
                channel.close()
            return
        if channel.role is ConnectionRole.MAIN:
            with self._lock:
                closing = self._closing or self._interrupted
                if not closing:
                    old, self._main = self._main, channel
                    if old is not None:
                        channel.resume_from(old)
                        self._retire(old)
                    channel.settimeout(self._main_timeout)
                    self._resumes[(channel.role, 0)] = channel.hello.resume
                    self.resumed += resumed
            if closing:
                channel.close()
                return
            self._main_queue.put(channel)
            return
        channel.stream.settimeout(None)  # the sender drives; shutdown() wakes it
        with self._lock:
            if not resumed:
                self._reserved -= 1
                self._admitted_memory += 1
                if channel.version < 3:
                    channel.index = self._admitted_memory
            closing = self._closing or self._interrupted
            if not closing:
                self._extras.append(channel)
                self._workers[channel.index] = (channel, threading.current_thread())
                self._resumes[(channel.role, channel.index)] = channel.hello.resume
                self.resumed += resumed
                self._changed.notify_all()
        if closing:
            channel.close()
            return
        threading.current_thread().name = f"migrate-mem-{serial}"
        try:
            self._serve_memory(channel)
        except BaseException:  # the server reports its own errors; never kill the pool
            log.exception("serving a memory connection failed")
        finally:
            with self._lock:
                if channel in self._extras:
                    self._extras.remove(channel)
                    self._changed.notify_all()
                if self._workers.get(channel.index, (None,))[0] is channel:
                    del self._workers[channel.index]
            channel.close()

    def _retire(self, old: ReceiverChannel | DestinationFaultChannel) -> None:
        """A replaced connection (under the lock): closed once its user let go of it."""
        if old in self._released:
            self._released.remove(old)
        old.close()

    def _admit(self, hello: Hello, claimed: list[str]) -> str | None:
        """None to take an authenticated connection, or why it is refused."""
        if hello.resumed:
            return self._admit_resumed(hello)
        with self._lock:
            if self._closing or self._interrupted:
                return "the receiver is closing"
            if hello.role is ConnectionRole.MAIN:
                if self._migration_id is not None:
                    return "a migration is already in progress"
                self._migration_id = hello.migration_id
                claimed.append("main")
                return None
            if hello.role not in (ConnectionRole.MEMORY, ConnectionRole.FAULT):
                return f"this receiver takes no {hello.role.name} connection"
            if self._migration_id is None or hello.migration_id != self._migration_id:
                return "no migration with this id is in progress"
            if not self._admitting:
                return "the migration has started: no more connections are admitted"
            if hello.role is ConnectionRole.FAULT:
                if self._fault_claimed:
                    return "a migration has one FAULT connection"
                self._fault_claimed = True
                claimed.append("fault")
                return None
            if len(self._extras) + self._reserved + 1 >= self._max_connections:
                return f"this receiver takes at most {self._max_connections} connections"
            if hello.version >= 3:
                if not hello.index or (hello.role, hello.index) in self._resumes:
                    return f"MEMORY connection index {hello.index} is taken or invalid"
                self._resumes[(hello.role, hello.index)] = 0
            self._reserved += 1
            claimed.append("memory")
            return None

    def _admit_resumed(self, hello: Hello) -> str | None:
        """A resumed connection (version 3): refused, or admitted once the connection it
        replaces is fenced (see the module doc)."""
        key = (hello.role, hello.index)
        name = Identity(hello.role, hello.migration_id, hello.version, hello.index).name
        with self._lock:
            if self._closing or self._interrupted:
                return "the receiver is closing"
            if self._migration_id is None or hello.migration_id != self._migration_id:
                return "no migration with this id is in progress"
            last = self._resumes.get(key)
            if last is None:
                return f"this migration has no {name} connection to resume"
            if hello.resume <= last:
                return (f"stale resume count {hello.resume} for the {name} connection (it was "
                        f"resumed {last} times already): a replayed handshake?")
            self._resumes[key] = hello.resume
            old: object = None
            if hello.role is ConnectionRole.MAIN:
                old = self._main
            elif hello.role is ConnectionRole.FAULT:
                old = self._fault
            worker = self._workers.get(hello.index) if hello.role is ConnectionRole.MEMORY \
                else None
        log.info("resuming the %s connection (resume %d)", name, hello.resume)
        if worker is not None:  # its thread ends, dropping a chunk it had half received
            worker[0].shutdown()
            if worker[1] is not threading.current_thread():
                worker[1].join()
        elif old is not None:  # MAIN, FAULT: until their user lets go
            old.shutdown()  # type: ignore[attr-defined]
            with self._changed:
                self._changed.wait_for(lambda: old in self._released or self._closing)
                if self._closing:
                    return "the receiver is closing"
        return None

    def _unclaim(self, claimed: list[str]) -> None:
        """An admitted connection never got its answer: undo its admission (a MAIN's claim
        on the migration, so that another source may try)."""
        with self._lock:
            for what in claimed:
                if what == "main" and self._main is None:
                    self._migration_id = None
                elif what == "fault":
                    self._fault_claimed = False
                elif what == "memory":
                    self._reserved -= 1
                    self._changed.notify_all()
        claimed.clear()

    def _note_refusal(self, peer: str, reason: str) -> None:
        with self._lock:
            self.refused += 1
            self.last_refusal = f"{peer}: {reason}"
        if not self._closing:
            log.warning("refused a migration connection from %s: %s", peer, reason)

    def __enter__(self) -> ReceiverPool:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.close()
