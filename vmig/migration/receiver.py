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
reports why.
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
    MigrationCancelled,
    MigrationError,
    ProtocolError,
    StateError,
    TransportError,
    VmigError,
    describe,
)
from vmig.memory import GuestMemory
from vmig.migration.digest import DIGEST_ALGORITHM, BackgroundDigest, memory_digest
from vmig.migration.documents import CompleteDocument, ConfigDocument, DocumentError
from vmig.migration.memory_writer import (
    AllocateAhead,
    install_memory,
    write_memory,
)
from vmig.migration.metrics import MigrationMetrics, Phase
from vmig.migration.params import ResolvedReceive
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
    Cancel,
    Complete,
    Config,
    ConnectionClosed,
    MemoryFd,
    MemoryFlags,
    MemoryRequest,
    Postcopy,
    Start,
    State,
)
from vmig.transport.address import Address
from vmig.transport.channel import ReceiverChannel
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
        self._lock = threading.Lock()
        self._phase: ReceivePhase = Listening()
        self._prealloc: GuestMemory | None = None
        self._error: str | None = None
        self._closing = False
        self._cancel_reason: str | None = None
        self._source_cancelled = False  # ABANDON said an operator cancelled at the source
        self._committing = False  # COMPLETE is being applied: too late to cancel
        self._fault_channel: ReceiverChannel | None = None  # post-copy's
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
        StateError once COMPLETE is being applied: the VM is (about to be) running here.
        """
        with self._lock:
            if self._committing or isinstance(self._phase, Completed):
                raise StateError("cannot cancel: the switch-over passed its point of no "
                                 "return (COMPLETE arrived; the VM runs here)")
            if isinstance(self._phase, PostcopyActive):
                raise StateError("cannot cancel: post-copy is under way (the guest runs here "
                                 "and its memory is split between both hosts)")
            if self._closing or self._cancel_reason is not None:
                return
            self._cancel_reason = reason
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
                self.metrics.update(started_at=time.monotonic(), peer=channel.stream.peer,
                                    migration_id=channel.migration_id.hex())
                self.metrics.set_phase(Phase.RECEIVING)
                self.metrics.open_connections(["main"])
                self._serve_main(channel)
        except BaseException as exc:
            reason = describe(exc)
            if self._cancel_reason is not None:
                reason = f"migration cancelled at the destination: {self._cancel_reason}"
                if channel is not None:  # tell the source, on the one thread that writes MAIN
                    with contextlib.suppress(Exception):
                        channel.stream.send_all([channel.conn.send(Cancel(reason))])
                        channel.drain(CANCEL_DRAIN_S)
            self._abort(reason)
        finally:
            self._finish()

    def _serve_main(self, channel: ReceiverChannel) -> None:
        while True:
            event = self._next(channel)
            if isinstance(event, ConnectionClosed):
                raise MigrationError("the source closed the connection before COMPLETE")
            if isinstance(event, MemoryRequest):
                self._receive_memory(channel, event)
                continue
            try:
                phase = self._step(channel, event)
            except VmigError as exc:
                channel.reject(str(exc))
                raise
            self.metrics.update(receiver_state=channel.conn.state.value)
            if isinstance(phase, Completed):
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
            self._source_cancelled = event.cancelled
            channel.accept()  # _finish discards what the phase holds, then says Aborted
            raise MigrationError(reason)
        if isinstance(event, Complete):
            with self._lock:  # from here on a cancel is refused
                if self._cancel_reason is not None:
                    raise MigrationCancelled(f"migration cancelled at the destination: "
                                             f"{self._cancel_reason}")
                self._committing = True
        handler = _STEPS.get((type(phase), type(event)))
        if handler is None:
            raise MigrationError(f"unexpected {type(event).__name__} while "
                                 f"{type(phase).__name__}")
        following = handler(self, phase, event, channel)
        self._set_phase(following)
        if isinstance(following, Completed):
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
        service = PostcopyService(phase.machine.memory, request.ranges, self._fault_channel,
                                  on_failure=self._abort)
        try:
            service.start()
            phase.machine.resume()
        except BaseException:
            service.close()
            raise
        self.metrics.update(postcopy_pages=service.owed_pages,
                            postcopy_pages_left=service.owed_pages)
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

    def _postcopy_figures(self, service: PostcopyService) -> None:
        p50, p99 = service.latency_ms()
        self.metrics.update(postcopy_pages_left=service.pages_left,
                            faults_served=service.faults, fault_latency_p50_ms=p50,
                            fault_latency_p99_ms=p99)

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
            if self._closing or self._cancel_reason is not None:
                return  # ending anyway: the connection was shut on purpose
            # A lost data connection: what it half received was never acknowledged, so the
            # source sends it again on another connection. The migration goes on.
            message = f"memory connection {channel.index} lost: {exc}"
            log.warning("%s", message)
            self.metrics.connection_lost(channel.index, str(exc))
            self.metrics.warn(message)
        except BaseException as exc:  # after a hand-over _abort() ignores this
            self._abort(describe(exc))

    # --- ending -----------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Record the first error and wake every thread blocked on a connection."""
        with self._lock:
            if self._closing:
                return  # already ending: the first reason stands
            self._closing = True
            self._error = reason
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
            self._closing = True
            phase = self._phase
            error = self._error
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
            error = ("the receiver was closed before a migration arrived"
                     if self._cancel_reason is None else
                     f"migration cancelled at the destination: {self._cancel_reason}")
        self._set_phase(Aborted(error))
        cancelled = self._cancel_reason is not None or self._source_cancelled
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
