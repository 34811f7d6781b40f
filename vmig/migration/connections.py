"""The source's connections of one migration: opened, kept alive, and resumed.

`SendConnections` dials MAIN (protocol version 3, or 2 when the destination speaks only
that), the extra MEMORY connections and post-copy's FAULT connection, each with a
hello naming its place (`Identity`). With version 3 and a `reconnect_timeout_s`,
a lost connection is re-dialled (`redial`) with backoff for up to that long, each
attempt a new hello with a higher resume count and a fresh authentication; the
destination answers only after it fenced the lost connection (docs/protocol.md,
"Resume"). MAIN's requests go through `request`, which resumes MAIN and re-sends the
unanswered request (its sequence number makes the destination answer it from its
record if it had applied it). A heartbeat thread (``migrate-beat``) sends PING when
MAIN would otherwise be silent, so the destination can tell a silent source from a
busy one. In post-copy, a re-dial whose window ran out waits for
`recover-migration` or a cancel: the lifecycle says which.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from vmig.errors import MigrationCancelled, MigrationError, TransportError, describe
from vmig.migration.lifecycle import SendLifecycle
from vmig.migration.params import ResolvedSend
from vmig.proto import PROTOCOL_VERSION, RESUMABLE_VERSION, ConnectionRole, Request, Response
from vmig.transport.address import Address, parse_url
from vmig.transport.channel import (
    Identity,
    SenderChannel,
    SourceFaultChannel,
    VersionRefused,
)
from vmig.transport.endpoint import dial
from vmig.transport.stream import IO_TIMEOUT_S, Stream

__all__ = ["SendConnections"]

log = logging.getLogger(__name__)

#: Re-dial backoff: the first wait, and the longest.
REDIAL_FIRST_S = 0.05
REDIAL_MAX_S = 1.0
#: The heartbeat goes this many times per dead-peer timeout.
BEATS_PER_TIMEOUT = 3

Channel = SenderChannel | SourceFaultChannel


class SendConnections:
    """Opens, keeps alive and resumes the connections of one outgoing migration."""

    def __init__(self, resolved: ResolvedSend, migration_id: bytes,
                 lifecycle: SendLifecycle,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolved = resolved
        self.params = resolved.params
        self.address: Address = resolved.address
        self.migration_id = migration_id
        self.lifecycle = lifecycle
        self.clock = clock
        #: The protocol version the destination took.
        self.version = PROTOCOL_VERSION
        self.main_lock = threading.Lock()
        self._last_main_io = clock()
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        #: The channels in their places (MAIN first), as the pool sees them.
        self.channels: list[SenderChannel] = []
        #: Streams dialled and still in their handshake (`interrupt_dialling` cuts them).
        self._dialling: set[Stream] = set()
        self._dialling_lock = threading.Lock()

    @property
    def resumable(self) -> bool:
        """Lost connections are re-dialled (version 3, a window, not local)."""
        return (self.version >= RESUMABLE_VERSION and self.params.reconnect_timeout_s > 0
                and not self.params.local)

    @property
    def heartbeat_s(self) -> float | None:
        if self.version < RESUMABLE_VERSION:
            return None
        return self.params.dead_peer_timeout_s / BEATS_PER_TIMEOUT

    # --- opening ---------------------------------------------------------------------------

    def open_main(self) -> SenderChannel:
        """MAIN, in version 3, or in version 2 when the destination speaks only that."""
        try:
            channel = self._connect(Identity(ConnectionRole.MAIN, self.migration_id))
        except VersionRefused as exc:
            message = (f"{exc}; falling back to protocol version 2 (lost connections are "
                       "not resumed)")
            log.warning("%s", message)
            self.lifecycle.metrics.warn(message)
            self.version = 2
            channel = self._connect(Identity(ConnectionRole.MAIN, self.migration_id, 2))
        assert isinstance(channel, SenderChannel)
        self.channels.append(channel)
        return channel

    def open_memory(self) -> SenderChannel:
        index = len(self.channels) if self.version >= RESUMABLE_VERSION else 0
        channel = self._connect(Identity(ConnectionRole.MEMORY, self.migration_id,
                                         self.version, index))
        assert isinstance(channel, SenderChannel)
        self.channels.append(channel)
        return channel

    def open_fault(self) -> SourceFaultChannel:
        channel = self._connect(Identity(ConnectionRole.FAULT, self.migration_id,
                                         self.version))
        assert isinstance(channel, SourceFaultChannel)
        return channel

    def _connect(self, identity: Identity, lost: Channel | None = None,
                 timeout: float = IO_TIMEOUT_S) -> Channel:
        """Dial and say hello; `timeout` bounds the connect and the handshake (a re-dial's
        is short: a destination that does not answer is tried again)."""
        self.lifecycle.check_cancelled()
        security = self.resolved.security
        stream = dial(self.address, security, timeout=timeout,
                      dead_peer_timeout_s=self.params.dead_peer_timeout_s)
        with self._dialling_lock:
            self._dialling.add(stream)
        try:
            self.lifecycle.check_cancelled()  # a cancel that came during the dial
            channel: Channel
            if identity.role is ConnectionRole.FAULT:
                channel = SourceFaultChannel(stream, identity, token=security.token)
            else:
                assert lost is None or isinstance(lost, SenderChannel)
                channel = SenderChannel(stream, identity, token=security.token, lost=lost)
        except BaseException:
            stream.close()
            raise
        finally:
            with self._dialling_lock:
                self._dialling.discard(stream)
        stream.settimeout(IO_TIMEOUT_S)
        return channel

    def interrupt_dialling(self) -> None:
        """A cancel: cut every connection still in its handshake (a destination that
        accepted but does not answer would otherwise hold the cancel for IO_TIMEOUT_S)."""
        with self._dialling_lock:
            streams = list(self._dialling)
        for stream in streams:
            stream.shutdown()

    # --- resuming --------------------------------------------------------------------------

    def redial(self, index: int, lost: Channel, cause: str) -> Channel:
        """A connection in the place of `lost` (see the module doc); TransportError when the
        window ran out (before post-copy), MigrationError when the destination refused to
        resume it, MigrationCancelled on a cancel."""
        window = self.params.reconnect_timeout_s
        name = lost.identity.name
        role = lost.identity.role.name.lower()
        log.warning("the %s connection was lost (%s); re-dialling it for up to %d s",
                    name, cause, window)
        self.lifecycle.connection_lost(index, role, cause)
        identity = lost.identity
        deadline = self.clock() + window
        delay = REDIAL_FIRST_S
        last = cause
        while True:
            identity = identity.next_resume()  # every attempt: a fresh resume count
            attempt_s = max(min(deadline - self.clock(), self.params.dead_peer_timeout_s), 0.5)
            try:
                channel = self._connect(identity, lost, attempt_s)
            except MigrationCancelled:
                raise
            except MigrationError as exc:  # refused: the destination cannot resume it
                raise MigrationError(f"the destination refused to resume the {name} "
                                     f"connection: {exc}") from None
            except TransportError as exc:
                last = describe(exc)
            else:
                lost.close()
                self.lifecycle.connection_back(index)
                log.info("the %s connection is back (resume %d)", name, identity.resume)
                return channel
            now = self.clock()
            if now >= deadline:
                if not self.lifecycle.postcopy_started:
                    raise TransportError(f"the {name} connection was lost ({cause}) and could "
                                         f"not be re-dialled within {window} s: {last}")
                log.warning("post-copy is paused: the %s connection could not be re-dialled "
                            "within %d s (%s); waiting for recover-migration or a cancel",
                            name, window, last)
                url = self.lifecycle.wait_for_recovery()
                if url is not None:
                    self.address = parse_url(url)
                deadline = self.clock() + window
                delay = REDIAL_FIRST_S
                continue
            if self.lifecycle.stopped.wait(min(delay, deadline - now)):
                self.lifecycle.check_cancelled()
                self.lifecycle.check_abandoned()
            delay = min(delay * 2, REDIAL_MAX_S)

    def resume_data(self, index: int, lost: SenderChannel, exc: TransportError
                    ) -> SenderChannel | None:
        """The pool's `resume`: a connection in the place of a lost one, or None (not
        resumable: the pool then carries on without it, or fails on MAIN)."""
        if not self.resumable or self.lifecycle.cancelled:
            return None
        channel = self.redial(index, lost, describe(exc))
        assert isinstance(channel, SenderChannel)
        self.channels[index] = channel
        return channel

    # --- MAIN ------------------------------------------------------------------------------

    @property
    def main(self) -> SenderChannel:
        return self.channels[0]

    def request(self, event: Request) -> Response:
        """Write a request on MAIN and wait for its answer (an ERROR answer raises
        MigrationError), resuming MAIN as often as it is lost while the window allows."""
        with self.main_lock:
            channel = self.main
            if channel.outstanding:  # a heartbeat that was never answered: MAIN is dead
                channel = self._resume_main(channel, TransportError(
                    "MAIN's heartbeat was not answered"))
                channel.settle()
            try:
                channel.submit(event)
            except TransportError as exc:
                channel = self._resume_main(channel, exc)
            while True:
                try:
                    response = channel.read_response()
                    self._last_main_io = self.clock()
                    return SenderChannel.check(response)
                except TransportError as exc:
                    channel = self._resume_main(channel, exc)

    def _resume_main(self, lost: SenderChannel, exc: TransportError) -> SenderChannel:
        channel = self.resume_data(0, lost, exc)
        if channel is None:
            raise exc
        return channel

    # --- the heartbeat ---------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """PING on MAIN whenever it was silent for a beat (version 3; after START)."""
        if self.heartbeat_s is None or self._beat is not None:
            return
        self._beat = threading.Thread(target=self._heartbeat, name="migrate-beat",
                                      daemon=True)
        self._beat.start()

    def ping(self, channel: SenderChannel) -> None:
        """One heartbeat on `channel` (MAIN), answered within the dead-peer timeout."""
        channel.ping(timeout=float(self.params.dead_peer_timeout_s))
        self._last_main_io = self.clock()

    def _heartbeat(self) -> None:
        interval = self.heartbeat_s
        assert interval is not None
        while not self._beat_stop.wait(interval):
            if not self.main_lock.acquire(blocking=False):
                continue  # MAIN is busy: not silent
            try:
                if self.clock() - self._last_main_io < interval:
                    continue
                channel = self.main
                try:
                    self.ping(channel)
                except TransportError as exc:
                    # MAIN is dead: whoever uses it next resumes it (or fails)
                    log.warning("MAIN's heartbeat failed: %s", describe(exc))
                    channel.shutdown()
                except MigrationError as exc:
                    log.warning("MAIN's heartbeat was refused: %s", describe(exc))
                    return
            finally:
                self.main_lock.release()

    def stop_heartbeat(self) -> None:
        self._beat_stop.set()
        beat, self._beat = self._beat, None
        if beat is not None and beat is not threading.current_thread():
            beat.join()

    # --- ending ----------------------------------------------------------------------------

    def close(self) -> None:
        self.stop_heartbeat()
        for channel in self.channels:
            channel.close()
        self.channels = []

