"""The receiving side: one incoming migration as a step function over one context.

Like Cloud Hypervisor's receiver (`vm_receive_migration_step`), the migration is
a current *phase* (vmig.migration.receive_phases: what exists at that point) and a
step per request: ``step(phase, request) -> next phase``, after which the request
is answered OK (any error answers ERROR and aborts). `_STEPS` is the table.

Connections are the `ReceiverPool`'s (vmig.transport): it accepts, authenticates
and admits them. The coordinator thread (``migrate-recv``) serves MAIN and steps;
every MEMORY connection's thread calls `_serve_memory`, whose pages go straight
into guest memory (vmig.migration.memory_writer). Post-copy's page faults are the
`PostcopyService`'s (vmig.migration.postcopy). On any failure the pool is shut
down (every blocked thread wakes), what was received is discarded (guest memory,
the VM built at STATE), every thread is joined, and `on_finished(None, reason)`
reports why. `ReceiveLifecycle` owns closing, cancel and the point of no return.

Protocol version 3: a lost connection is waited for while the source re-dials it
(START says for how long; in post-copy for ever, `postcopy-paused`): the migration,
its memory and its phase stay. MAIN's coordinator lets go of the lost MAIN and takes
the resumed one (`ReceiverPool.resumed_main`); a request the source sends again comes
as `Repeated` and is answered from the record. After COMPLETE is answered the
coordinator stays a while (`_linger`): if MAIN is lost instead of closed, the answer
may not have arrived, and the source will re-send COMPLETE on a resumed MAIN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from vmig.cpu_compat import missing_features, tsc_change_refusal
from vmig.errors import (
    MigrationError,
    ProtocolError,
    TransportError,
    VmigError,
    describe,
)
from vmig.memory import GuestMemory
from vmig.migration.digest import DIGEST_ALGORITHM, BackgroundDigest, memory_digest
from vmig.migration.documents import CompleteDocument, ConfigDocument, DocumentError
from vmig.migration.lifecycle import ROLLBACK_WARNING, ReceiveLifecycle
from vmig.migration.memory_writer import (
    AllocateAhead,
    install_memory,
    write_memory,
)
from vmig.migration.metrics import MigrationMetrics, Phase
from vmig.migration.params import (
    DEFAULT_DEAD_PEER_TIMEOUT_S,
    DEFAULT_RECONNECT_TIMEOUT_S,
    ResolvedReceive,
)
from vmig.migration.postcopy import PostcopyService, check_userfaultfd
from vmig.migration.receive_phases import (
    Aborted,
    Built,
    Completed,
    FdReceived,
    Listening,
    MemoryReady,
    PostcopyActive,
    ReceivePhase,
    Started,
    discard,
)
from vmig.proto import (
    Abandon,
    Complete,
    Config,
    ConnectionClosed,
    MemoryFd,
    MemoryFlags,
    MemoryRequest,
    Ping,
    Postcopy,
    Repeated,
    Start,
    State,
)
from vmig.transport.address import Address
from vmig.transport.channel import DestinationFaultChannel, ReceiverChannel
from vmig.transport.receiver_pool import ReceiverPool
from vmig.units import PAGE_SIZE
from vmig.vmm.host import host_cpu
from vmig.vmm.machine import Machine
from vmig.vmm.state import MachineState

log = logging.getLogger(__name__)

EXTRA_CONNECTIONS_WAIT_S = 10.0
#: After answering a cancel on MAIN, read (and drop) what the source still sends for this
#: long, so that it reads the answer rather than a connection reset.
CANCEL_DRAIN_S = 2.0
#: A cancel waits this long for a request being received to finish, then cuts MAIN.
CANCEL_GRACE_S = 2.0

#: The FAULT connection's place in `reconnecting` (after MAIN and up to 127 MEMORY ones).
FAULT_INDEX = 128

OnFinished = Callable[[Machine | None, str | None], None]


class MigrationReceiver:
    """Listens for one migration and builds the Machine it carries."""

    def __init__(self, params: ResolvedReceive, on_finished: OnFinished, *,
                 serial_log: str | None = None) -> None:
        self.params = params
        self.address: Address = params.address
        self.security = params.security
        self._on_finished = on_finished
        self._serial_log = serial_log
        self.metrics = MigrationMetrics("receive")
        self._pool = ReceiverPool(params.address, params.security,
                                  max_connections=params.params.max_connections,
                                  serve_memory=self._serve_memory)
        self.lifecycle = ReceiveLifecycle(self.metrics)
        self._lock = self.lifecycle.lock
        self._phase: ReceivePhase = Listening()
        self._prealloc: GuestMemory | None = None
        self._start: Start | None = None
        self._fault_channel: DestinationFaultChannel | None = None  # post-copy's
        self._grace: threading.Timer | None = None
        self._done = threading.Event()
        self._coordinator: threading.Thread | None = None

    @property
    def phase(self) -> ReceivePhase:
        return self._phase

    def postcopy_machine(self) -> Machine | None:
        """The VM that runs here during post-copy, before it is handed over; else None."""
        phase = self._phase
        return phase.machine if isinstance(phase, PostcopyActive) else None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Address:
        """Listen and return the bound address; threads run until the migration ends.

        With `prealloc_bytes`, guest memory of that size is created and faulted in
        first (like a QEMU destination started with its memory preallocated):
        first-touch page faults are the slowest part of receiving on nested hosts.
        """
        if self.params.prealloc_bytes:
            self._prealloc = GuestMemory.create(self.params.prealloc_bytes)
            try:
                self._prealloc.backing.populate()
            except BaseException:
                self._discard_prealloc()
                raise
        try:
            self.address = self._pool.start()
        except BaseException:
            self._discard_prealloc()
            raise
        self._coordinator = threading.Thread(target=self._coordinate, name="migrate-recv")
        self._coordinator.start()
        return self.address

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        """Abort if still running, and join every thread; idempotent."""
        self._abort("the destination VMM is shutting down")
        coordinator = self._coordinator
        if coordinator is not None and coordinator is not threading.current_thread():
            coordinator.join()
        elif coordinator is None:
            self._pool.close()

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        """Stop waiting for, or receiving, the migration (from any thread; never blocks).

        What was received is discarded and the source told (it keeps its VM). Raises
        StateError once COMPLETE is being applied: the VM is (about to be) running here;
        and in post-copy, but while it is paused, where it is the explicit rollback (the
        guest stops here; it warns that it is one).
        """
        new, rollback = self.lifecycle.cancel(reason)
        if rollback:
            log.warning("%s", ROLLBACK_WARNING)
            self.metrics.warn(ROLLBACK_WARNING)
        if not new:
            return
        self._pool.interrupt()
        grace = threading.Timer(CANCEL_GRACE_S + CANCEL_DRAIN_S, self._pool.shutdown)
        grace.daemon = True
        grace.start()
        self._grace = grace

    # --- the coordinator: MAIN, step by step ---------------------------------------------

    def _coordinate(self) -> None:
        channel = None
        try:
            channel = self._pool.main()
            if channel is not None:
                self.metrics.update(started_at=time.monotonic(), peer=channel.peer,
                                    migration_id=channel.migration_id.hex())
                self.metrics.set_phase(Phase.RECEIVING)
                self.metrics.open_connections(["main"])
                channel = self._serve_main(channel)
                self._linger(channel)
        except BaseException as exc:
            _log_if_unexpected(exc)
            reason = describe(exc)
            cancel_reason = self.lifecycle.cancel_reason
            if cancel_reason is not None:
                reason = f"migration cancelled at the destination: {cancel_reason}"
                if channel is not None:  # tell the source, on the one thread that writes MAIN
                    channel.send_cancel(reason)
                    channel.drain(CANCEL_DRAIN_S)
            self._abort(reason)
        finally:
            self._finish()

    def _serve_main(self, channel: ReceiverChannel) -> ReceiverChannel:
        """MAIN's requests until COMPLETE is answered; returns the channel that answered it
        (another one than `channel` when MAIN was resumed)."""
        while True:
            try:
                if self._serve_request(channel):
                    return channel
            except TransportError as exc:
                channel = self._resume_main(channel, exc)

    def _serve_request(self, channel: ReceiverChannel) -> bool:
        """Read and answer one request on MAIN; True once COMPLETE is answered."""
        event = self._next(channel)
        if isinstance(event, ConnectionClosed):
            if channel.version >= 3 and self._start is not None:
                raise TransportError("the source closed the MAIN connection before COMPLETE")
            raise MigrationError("the source closed the connection before COMPLETE")
        if isinstance(event, MemoryRequest):
            self._receive_memory(channel, event)
            return False
        if isinstance(event, Ping):
            channel.accept()
            return False
        if isinstance(event, Repeated):  # re-sent on a resumed MAIN: answered already
            log.info("the source re-sent %s (sequence %d) after a resume: answering it as "
                     "the first time", event.command.name, event.seq)
            channel.answer_repeat()
            return isinstance(self._phase, Completed)
        try:
            phase = self._step(channel, event)
        except VmigError as exc:
            if isinstance(exc, TransportError):
                raise  # the answer could not be written: a lost connection
            channel.reject(str(exc))
            raise
        self.metrics.update(receiver_state=channel.state.value)
        return isinstance(phase, Completed)

    def _resume_main(self, lost: ReceiverChannel, exc: TransportError) -> ReceiverChannel:
        """Wait for the source to resume MAIN (version 3); raise `exc` when it is not to be
        waited for, MigrationError when it did not come in time."""
        start = self._start
        # before START the source's window is not known yet: the default one
        window = DEFAULT_RECONNECT_TIMEOUT_S if start is None else start.reconnect_timeout_s
        dead_peer = DEFAULT_DEAD_PEER_TIMEOUT_S if start is None else start.dead_peer_timeout_s
        if self.lifecycle.ending or lost.version < 3 or not window:
            raise exc
        cause = describe(exc)
        waiting = self.lifecycle.postcopy and not isinstance(self._phase, Completed)
        timeout = None if waiting else float(window + dead_peer)
        log.warning("the MAIN connection was lost (%s); waiting %s for the source to resume "
                    "it", cause, "for it" if timeout is None else f"up to {timeout:.0f} s")
        self.lifecycle.connection_lost(0, "main", cause)
        channel = self._pool.resumed_main(lost, timeout)
        if channel is None:
            if self.lifecycle.ending:
                raise exc
            raise MigrationError(f"the MAIN connection was lost ({cause}) and the source did "
                                 f"not resume it within {timeout:.0f} s")
        self.lifecycle.connection_back(0)
        return channel

    def _linger(self, channel: ReceiverChannel) -> None:
        """COMPLETE is answered and the VM is handed over. Wait for the source to close
        MAIN (it read the answer); if MAIN is lost instead, the answer may be lost too:
        answer the COMPLETE the source re-sends on a resumed MAIN, from the record."""
        while True:
            try:
                event = channel.next_request()
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, Repeated):
                    channel.answer_repeat()
                elif isinstance(event, Ping):
                    channel.accept()
                else:
                    return
            except TransportError as exc:
                try:
                    channel = self._resume_main(channel, exc)
                except VmigError as gone:
                    log.info("after the hand-over: %s", describe(gone))
                    return
            except ProtocolError:
                return

    def _next(self, channel: ReceiverChannel) -> object:
        try:
            return channel.next_request()
        except ProtocolError as exc:
            channel.reject(str(exc))
            raise MigrationError(f"source broke the protocol: {exc}") from None

    def _step(self, channel: ReceiverChannel, event: object) -> ReceivePhase:
        """Apply one request to the current phase, answer it, and move on."""
        phase = self._phase
        if isinstance(event, Abandon):
            what = "cancelled" if event.cancelled else "abandoned"
            reason = f"the source {what} the migration: {event.reason}"
            self.lifecycle.source_cancelled = event.cancelled
            with contextlib.suppress(TransportError):  # it ends either way
                channel.accept()  # _finish discards what the phase holds, then says Aborted
            raise MigrationError(reason)
        if isinstance(event, Complete):
            self.lifecycle.commit_complete()  # from here on a cancel is refused
        handler = _STEPS.get((type(phase), type(event)))
        if handler is None:
            raise MigrationError(f"unexpected {type(event).__name__} while "
                                 f"{type(phase).__name__}")
        following = handler(self, phase, event, channel)
        self._set_phase(following)
        if isinstance(following, Completed):
            with self._lock:
                self.lifecycle.completed = True
            self._hand_over(following.machine)  # before the OK: then the VM is ours
        channel.accept()
        return following

    def _set_phase(self, phase: ReceivePhase) -> None:
        with self._lock:
            self._phase = phase

    # --- the steps -------------------------------------------------------------------------

    def _on_start(self, phase: Listening, start: Start, channel: ReceiverChannel) -> Started:
        if start.local and self.address.kind != "unix":
            raise MigrationError("local migration needs a unix: receiver")
        self._start = start
        if start.dead_peer_timeout_s:  # the source sends a heartbeat: silence means it is lost
            self._pool.set_dead_peer_timeout(float(start.dead_peer_timeout_s))
        extras = start.connections - 1
        count = self._pool.close_admission(extras, EXTRA_CONNECTIONS_WAIT_S)
        if count != extras:
            raise MigrationError(f"START announced {extras} extra connections, "
                                 f"{count} arrived")
        self.metrics.open_connections(["main"] + ["memory"] * extras)
        if start.postcopy:
            problem = check_userfaultfd()
            if problem is not None:
                raise MigrationError(f"this destination cannot run post-copy: {problem}")
            self._fault_channel = self._pool.fault_channel(EXTRA_CONNECTIONS_WAIT_S)
            if self._fault_channel is None:
                raise MigrationError("START allows post-copy, but no FAULT connection arrived")
        return Started(start)

    def _on_memory_fd(self, phase: Started, request: MemoryFd,
                      channel: ReceiverChannel) -> FdReceived:
        fd = channel.take_fd()
        if request.slot != GuestMemory.SLOT or request.gpa != 0:
            os.close(fd)
            raise MigrationError(f"memory fd for slot {request.slot} at {request.gpa:#x}: "
                                 "only slot 0 at GPA 0 exists")
        return FdReceived(phase.start, GuestMemory.from_fd(fd, request.size))

    def _on_config(self, phase: Started | FdReceived, request: Config,
                   channel: ReceiverChannel) -> MemoryReady:
        try:
            document = ConfigDocument.from_json(request.data)
        except DocumentError as exc:
            raise MigrationError(f"the source sent {exc}") from None
        config = document.vm
        self.metrics.update(memory_bytes=config.memory_bytes)
        refusal = self._host_refusal(document)
        if refusal is not None:
            raise MigrationError(refusal)
        if isinstance(phase, FdReceived):  # local: memory came by fd
            if phase.memory.size != config.memory_bytes:
                raise MigrationError(f"memory fd holds {phase.memory.size} bytes, CONFIG says "
                                     f"{config.memory_bytes}")
            return MemoryReady(phase.start, config, phase.memory)
        prealloc, self._prealloc = self._prealloc, None
        if prealloc is not None and prealloc.size == config.memory_bytes:
            return MemoryReady(phase.start, config, prealloc)
        if prealloc is not None:
            prealloc.close()
        extents = list(document.data_extents)
        memory = GuestMemory.create(config.memory_bytes)
        allocator = AllocateAhead(memory, extents, on_failure=self._abort).start() \
            if extents else None
        return MemoryReady(phase.start, config, memory, allocator)

    def _host_refusal(self, document: ConfigDocument) -> str | None:
        """Why this host cannot run the guest CONFIG describes (None if it can): a CPUID
        feature KVM here cannot offer, or another TSC frequency (KVM here cannot scale it)."""
        host = host_cpu()
        if document.cpuid is not None:
            missing = missing_features(document.cpuid, host.cpuid)
            if missing:
                return ("refused at CONFIG: this host's KVM cannot give the guest the CPU "
                        f"features it has: {', '.join(missing)}")
        if document.tsc_khz and not self.params.params.allow_tsc_change:
            problem = tsc_change_refusal(document.tsc_khz, host.tsc_khz)
            if problem is not None:
                return f"refused at CONFIG: {problem} (allow_tsc_change accepts it)"
        return None

    def _on_state(self, phase: MemoryReady, request: State, channel: ReceiverChannel) -> Built:
        if phase.allocator is not None:  # every page is here: what it has not done is not needed
            phase.allocator.close()
        state = MachineState.from_json(request.data)
        if state.config.memory_bytes != phase.memory.size:
            raise MigrationError("STATE describes a different memory size than CONFIG")
        machine = Machine.restore(state, phase.memory, serial_log=self._serial_log,
                                  resume=False)
        digest = None
        if phase.start.verify_memory and not phase.start.postcopy:
            # Memory is final once STATE arrives (the sender sends it only after every
            # chunk was acknowledged): hash it while the source hashes its own copy. (With
            # post-copy allowed, POSTCOPY may come instead: then nothing is hashed.)
            digest = BackgroundDigest(machine.memory)
        return Built(phase.start, machine, digest)

    def _on_postcopy(self, phase: Built, request: Postcopy,
                     channel: ReceiverChannel) -> PostcopyActive:
        """Switch to post-copy: punch the owed pages out, catch their faults, resume."""
        assert self._fault_channel is not None  # _on_start made sure
        resume = self._resume_fault if phase.start.reconnect_timeout_s else None
        vcpu_threads = {handle.native_id: handle.vcpu.vcpu_id
                        for handle in phase.machine.handles if handle.native_id is not None}
        service = PostcopyService(phase.machine.memory, request.ranges, self._fault_channel,
                                  on_failure=self._abort, resume=resume,
                                  vcpu_threads=vcpu_threads)
        try:
            service.start()
            phase.machine.resume()
        except BaseException:
            service.close()
            raise
        self.metrics.update(postcopy_pages=service.owed_pages,
                            postcopy_pages_left=service.owed_pages,
                            fault_latency_source=service.latency_figures)
        with self._lock:
            self.lifecycle.postcopy = True
        self.metrics.set_phase(Phase.POSTCOPY)
        log.info("post-copy: the guest runs here; %d pages to come", service.owed_pages)
        return PostcopyActive(phase.start, phase.machine, service)

    def _on_postcopy_complete(self, phase: PostcopyActive, request: Complete,
                              channel: ReceiverChannel) -> Completed:
        """Every owed page is here: stop catching faults; the VM is ours."""
        service = phase.service
        self._postcopy_figures(service)
        if service.pages_left:
            raise MigrationError(f"COMPLETE came with {service.pages_left} pages still "
                                 "missing")
        service.close()
        return Completed(phase.machine)

    def _resume_fault(self, lost: DestinationFaultChannel, cause: str
                      ) -> DestinationFaultChannel | None:
        """Post-copy's FAULT connection was lost: wait (for ever) for its resumed one."""
        if self.lifecycle.ending:
            return None
        log.warning("post-copy: the FAULT connection was lost (%s); waiting for the source "
                    "to resume it", cause)
        self.lifecycle.connection_lost(FAULT_INDEX, "fault", cause)
        channel = self._pool.resumed_fault(lost, None)
        if channel is not None:
            self.lifecycle.connection_back(FAULT_INDEX)
        return channel

    def _postcopy_figures(self, service: PostcopyService) -> None:
        self.metrics.update(postcopy_pages_left=service.pages_left,
                            faults_served=service.faults,
                            fault_latency=service.latency_figures(),
                            fault_latency_source=None)

    def _on_complete(self, phase: Built, request: Complete,
                     channel: ReceiverChannel) -> Completed:
        try:
            document = CompleteDocument.from_json(request.data)
        except DocumentError as exc:
            raise MigrationError(f"the source sent {exc}") from None
        run = document.run
        # START asked for verification, or the sender asks for it now (it lost a MEMORY
        # connection mid-chunk: docs/protocol.md, "Memory verification").
        claimed = document.memory_digest
        if phase.start.verify_memory or claimed is not None:
            if claimed is None:
                raise MigrationError("COMPLETE carries no memory digest although START "
                                     "asked to verify memory")
            if claimed.algorithm != DIGEST_ALGORITHM:
                raise MigrationError(f"unknown digest algorithm {claimed.algorithm!r}")
            ours = phase.digest.result() if phase.digest else memory_digest(phase.machine.memory)
            if ours != claimed.hex:
                raise MigrationError("memory verification failed: the destination's memory "
                                     "digest differs from the source's; not resuming")
            self.metrics.update(memory_verified=True)
        if run:
            phase.machine.resume()
        else:  # the VM was paused at the source: it stays paused here (CompletePaused)
            self.metrics.update(vm_paused=True)
        return Completed(phase.machine)

    # --- memory, on MAIN and on every MEMORY connection ------------------------------------

    def _receive_memory(self, channel: ReceiverChannel, request: MemoryRequest) -> None:
        phase = self._phase
        if isinstance(phase, PostcopyActive):
            try:
                install_memory(channel, phase.service, request)
            except TransportError:
                raise  # a lost connection: the chunk comes again
            except VmigError as exc:
                channel.reject(str(exc))
                raise
            channel.accept()
            self.metrics.transferred(channel.index, request.ranges.total_bytes,
                                     wire=request.payload_bytes)
            self.metrics.update(postcopy_pages_left=phase.service.pages_left)
            return
        if not isinstance(phase, MemoryReady):
            error = MigrationError(f"MEMORY arrived while {type(phase).__name__}; it is "
                                   "allowed between CONFIG and STATE")
            channel.reject(str(error))
            raise error
        if phase.allocator is not None:
            phase.allocator.received(request.ranges)
        try:
            write_memory(channel, phase.memory, request, compress=phase.start.compress)
        except TransportError:
            raise  # a lost connection: the chunk comes again
        except VmigError as exc:
            channel.reject(str(exc))
            raise
        channel.accept()
        pages = request.ranges.total_bytes
        if request.flags & MemoryFlags.ZERO:
            self.metrics.transferred(channel.index, 0, covered=pages,
                                     zero_pages=pages // PAGE_SIZE)
        else:
            self.metrics.transferred(channel.index, pages, wire=request.payload_bytes)

    def _serve_memory(self, channel: ReceiverChannel) -> None:
        """A MEMORY connection, until it closes (run on its pool thread)."""
        if channel.hello.resumed:
            self.lifecycle.connection_back(channel.index)
        try:
            while True:
                event = self._next(channel)
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, Abandon):
                    channel.accept()
                    return
                if not isinstance(event, MemoryRequest):
                    raise MigrationError(f"unexpected {type(event).__name__} on a memory "
                                         "connection")
                self._receive_memory(channel, event)
        except TransportError as exc:
            if self.lifecycle.ending:
                return  # ending anyway: the connection was shut on purpose
            # A lost data connection: what it half received was never acknowledged, so the
            # source sends it again, on this connection resumed (version 3) or another one.
            # The migration goes on.
            start = self._start
            if channel.version >= 3 and start is not None and start.reconnect_timeout_s:
                log.warning("memory connection %d lost (%s); waiting for the source to "
                            "resume it", channel.index, exc)
                self.lifecycle.connection_lost(channel.index, "memory", str(exc))
                return
            message = f"memory connection {channel.index} lost: {exc}"
            log.warning("%s", message)
            self.metrics.connection_lost(channel.index, str(exc))
            self.metrics.warn(message)
        except BaseException as exc:  # after a hand-over _abort() ignores this
            _log_if_unexpected(exc)
            self._abort(describe(exc))

    # --- ending -----------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Record the first error and wake every thread blocked on a connection."""
        if self.lifecycle.abort(reason):  # else already ending: the first reason stands
            self._pool.shutdown()

    def _discard_prealloc(self) -> None:
        prealloc, self._prealloc = self._prealloc, None
        if prealloc is not None:
            prealloc.close()

    def _hand_over(self, machine: Machine) -> None:
        """Report the running VM now; from here on it belongs to the caller."""
        self.metrics.finish(Phase.COMPLETED)
        try:
            self._on_finished(machine, None)
        except Exception:
            log.exception("on_finished callback failed")

    def _finish(self) -> None:
        """Close every connection, join the pool's threads, then report the outcome once."""
        with self._lock:
            self.lifecycle.closing = True
            phase = self._phase
            error = self.lifecycle.error
        if self._grace is not None:
            self._grace.cancel()
        self._pool.close()
        self._discard_prealloc()
        if isinstance(phase, Completed):  # handed over; a late error is only logged
            if error is not None:
                log.warning("after the hand-over: %s", error)
            self._done.set()
            return
        discard(phase)
        if error is None:
            cancel_reason = self.lifecycle.cancel_reason
            error = ("the receiver was closed before a migration arrived"
                     if cancel_reason is None else
                     f"migration cancelled at the destination: {cancel_reason}")
        self._set_phase(Aborted(error))
        cancelled = self.lifecycle.cancel_reason is not None or self.lifecycle.source_cancelled
        if isinstance(phase, PostcopyActive):
            self._postcopy_figures(phase.service)  # the last ones, frozen
        if isinstance(phase, PostcopyActive) and not error.startswith("post-copy failed"):
            # whatever broke, it broke post-copy: the guest had to be stopped here
            error = f"post-copy failed: {error}"
        self.metrics.finish(Phase.CANCELLED if cancelled else Phase.FAILED, error=error)
        (log.info if cancelled else log.warning)("incoming migration %s: %s",
                                                 "cancelled" if cancelled else "failed", error)
        self._done.set()
        try:
            self._on_finished(None, error)
        except Exception:
            log.exception("on_finished callback failed")


#: (phase, request) -> step. The engine-side mirror of vmig.proto.state.TRANSITIONS
#: (which the protocol core has already enforced on MAIN).
_STEPS: dict[tuple[type, type], Callable[..., ReceivePhase]] = {
    (Listening, Start): MigrationReceiver._on_start,
    (Started, MemoryFd): MigrationReceiver._on_memory_fd,
    (Started, Config): MigrationReceiver._on_config,
    (FdReceived, Config): MigrationReceiver._on_config,
    (MemoryReady, State): MigrationReceiver._on_state,
    (Built, Complete): MigrationReceiver._on_complete,
    (Built, Postcopy): MigrationReceiver._on_postcopy,
    (PostcopyActive, Complete): MigrationReceiver._on_postcopy_complete,
}


def _log_if_unexpected(exc: BaseException) -> None:
    """A failure that is not a VmigError is a defect: its traceback goes to the log (the
    outcome keeps its one line)."""
    if not isinstance(exc, VmigError):
        log.error("unexpected error in the incoming migration", exc_info=exc)
