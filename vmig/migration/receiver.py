"""The receiving side: one incoming migration, driven by the protocol's state machine.

Threads (all owned here, all joined by `close()`):

- ``migrate-accept``: accepts connections, reads each hello, answers it, and
  hands the MAIN connection to the coordinator and each MEMORY connection to
  a worker of its own;
- ``migrate-recv``: the coordinator: serves the MAIN connection request by
  request (START, [MEMORY_FD], CONFIG, MEMORY*, STATE, COMPLETE), then cleans up
  and reports the outcome through `on_finished`;
- ``migrate-mem-N``: one per extra connection: MEMORY requests straight into
  guest memory.

Every request gets exactly one response. A request the protocol core rejects,
a command that fails here (a range outside guest memory, a bad state document,
a digest mismatch) or a dropped connection gets an ERROR response where one can
still be sent and aborts the migration: the listener closes, every connection
closes, every thread is joined, and guest memory is discarded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable

from vmig.config import VmConfig
from vmig.errors import GuestMemoryError, MigrationError, ProtocolError, VmigError, describe
from vmig.memory import GuestMemory
from vmig.migration.digest import DIGEST_ALGORITHM, BackgroundDigest, memory_digest
from vmig.migration.progress import MigrationProgress, Phase
from vmig.proto import (
    HELLO_SIZE,
    MAX_CONNECTIONS,
    Abandon,
    Complete,
    Config,
    ConnectionClosed,
    ConnectionRole,
    MemoryFd,
    MemoryRequest,
    Start,
    State,
    parse_hello,
)
from vmig.transport.address import Address, bound_address, listen, parse_url
from vmig.transport.channel import ReceiverChannel, answer_hello
from vmig.transport.stream import IO_TIMEOUT_S, Stream
from vmig.vmm.machine import Machine
from vmig.vmm.state import MachineState

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
EXTRA_CONNECTIONS_WAIT_S = 10.0
ACCEPT_POLL_S = 0.2
BULK_POPULATE_BYTES = 256 * 1024  # below this one madvise costs more than the faults it saves

OnFinished = Callable[[Machine | None, str | None], None]


class MigrationReceiver:
    """Listens for one migration and builds the Machine it carries."""

    def __init__(self, url: str, on_finished: OnFinished, *, serial_log: str | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 prealloc_bytes: int | None = None) -> None:
        self.address: Address = parse_url(url)
        self._on_finished = on_finished
        self._serial_log = serial_log
        self._max_connections = max_connections
        self._prealloc_bytes = prealloc_bytes
        self._prealloc: GuestMemory | None = None
        self.progress = MigrationProgress("receive")
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._main_queue: queue.SimpleQueue[ReceiverChannel | None] = queue.SimpleQueue()
        self._main: ReceiverChannel | None = None
        self._migration_id: bytes | None = None
        self._extras: list[ReceiverChannel] = []
        self._workers: list[threading.Thread] = []
        self._extras_arrived = threading.Condition(self._lock)
        self._start: Start | None = None
        self._digest: BackgroundDigest | None = None
        self._memory: GuestMemory | None = None
        self._machine: Machine | None = None
        self._error: str | None = None
        self._done = threading.Event()
        self._reported = False
        self._memory_preallocated = False
        self._closing = False
        self._accept_thread: threading.Thread | None = None
        self._coordinator: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Address:
        """Listen and return the bound address; threads run until the migration ends.

        With `prealloc_bytes`, guest memory of that size is created and faulted in
        first (like a QEMU destination started with its memory preallocated):
        first-touch page faults are the slowest part of receiving on nested hosts.
        """
        if self._prealloc_bytes:
            self._prealloc = GuestMemory.create(self._prealloc_bytes)
            self._prealloc.populate()
        try:
            self._listener = listen(self.address)
        except BaseException:
            self._discard_prealloc()
            raise
        self._listener.settimeout(ACCEPT_POLL_S)
        self.address = bound_address(self._listener, self.address)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="migrate-accept")
        self._coordinator = threading.Thread(target=self._coordinate, name="migrate-recv")
        self._accept_thread.start()
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
        self._main_queue.put(None)
        for thread in (self._coordinator, self._accept_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join()

    # --- accepting connections ------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            while not self._closing:
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break  # listener closed
                self._greet(sock)
        finally:
            self._close_listener()

    def _greet(self, sock: socket.socket) -> None:
        """Read and answer a hello; hand the connection to its handler."""
        stream = Stream(sock, "migration source", timeout=HELLO_TIMEOUT_S)
        try:
            hello = parse_hello(stream.recv_exact(HELLO_SIZE))
        except (VmigError, OSError) as exc:
            answer_hello(stream, f"bad hello: {exc}")
            stream.close()
            return
        refusal = self._admit(hello.role, hello.migration_id)
        if refusal is not None:
            answer_hello(stream, refusal)
            stream.close()
            return
        try:
            answer_hello(stream)
        except VmigError:  # the source left: let a new MAIN try again
            if hello.role is ConnectionRole.MAIN:
                with self._lock:
                    self._migration_id = None
            stream.close()
            return
        stream.sock.settimeout(None if hello.role is ConnectionRole.MEMORY else IO_TIMEOUT_S)
        local = self.address.kind == "unix"
        channel = ReceiverChannel(stream, hello.role, hello.migration_id,
                                  accept_fds=local and hello.role is ConnectionRole.MAIN)
        if hello.role is ConnectionRole.MAIN:
            self._main_queue.put(channel)
            return
        with self._lock:
            self._extras.append(channel)
            index = len(self._extras)
            worker = threading.Thread(target=self._serve_memory, args=(channel,),
                                      name=f"migrate-mem-{index}")
            self._workers.append(worker)
            self._extras_arrived.notify_all()
        worker.start()

    def _admit(self, role: ConnectionRole, migration_id: bytes) -> str | None:
        """None to accept the connection, or why it is refused."""
        with self._lock:
            if self._closing:
                return "the receiver is closing"
            if role is ConnectionRole.MAIN:
                if self._migration_id is not None:
                    return "a migration is already in progress"
                self._migration_id = migration_id
                return None
            if migration_id != self._migration_id:
                return "no migration with this id is in progress"
            if len(self._extras) + 1 >= self._max_connections:
                return f"this receiver takes at most {self._max_connections} connections"
            return None

    # --- the coordinator --------------------------------------------------------------------

    def _coordinate(self) -> None:
        channel = self._main_queue.get()
        try:
            if channel is not None:
                self._main = channel
                self.progress.update(phase=Phase.RECEIVING, connections=1)
                self._serve_main(channel)
        except BaseException as exc:
            self._abort(describe(exc))
        finally:
            self._finish()

    def _serve_main(self, channel: ReceiverChannel) -> None:
        while True:
            event = self._next(channel)
            if isinstance(event, ConnectionClosed):
                raise MigrationError("the source closed the connection before COMPLETE")
            try:
                finished = self._handle(channel, event)
            except VmigError as exc:
                channel.reject(str(exc))
                raise
            self.progress.update(receiver_state=channel.conn.state.value)
            if finished:
                return

    def _next(self, channel: ReceiverChannel) -> object:
        try:
            return channel.next_request()
        except ProtocolError as exc:
            channel.reject(str(exc))
            raise MigrationError(f"source broke the protocol: {exc}") from None

    def _handle(self, channel: ReceiverChannel, event: object) -> bool:
        """Apply one request on MAIN and answer it; True once the VM runs here."""
        if isinstance(event, Start):
            self._on_start(event)
        elif isinstance(event, MemoryFd):
            self._on_memory_fd(channel, event)
        elif isinstance(event, Config):
            self._on_config(event)
        elif isinstance(event, MemoryRequest):
            self._receive_memory(channel, event)
            return False  # _receive_memory answered
        elif isinstance(event, State):
            self._on_state(event)
        elif isinstance(event, Complete):
            self._on_complete(event)
            self._hand_over()  # before the OK: once the sender hears it, the VM is ours
            channel.accept()
            return True
        elif isinstance(event, Abandon):
            channel.accept()
            raise MigrationError(f"the source abandoned the migration: {event.reason}")
        else:
            raise MigrationError(f"unexpected event {event!r}")
        channel.accept()
        return False

    def _on_start(self, start: Start) -> None:
        if start.local and self.address.kind != "unix":
            raise MigrationError("local migration needs a unix: receiver")
        extras = start.connections - 1
        with self._lock:
            arrived = self._extras_arrived.wait_for(lambda: len(self._extras) >= extras,
                                                   EXTRA_CONNECTIONS_WAIT_S)
            count = len(self._extras)
        if not arrived or count != extras:
            raise MigrationError(f"START announced {extras} extra connections, "
                                 f"{count} arrived")
        self.progress.update(connections=start.connections)
        self._start = start

    def _on_memory_fd(self, channel: ReceiverChannel, request: MemoryFd) -> None:
        fd = channel.take_fd()
        if request.slot != GuestMemory.SLOT or request.gpa != 0:
            os.close(fd)
            raise MigrationError(f"memory fd for slot {request.slot} at {request.gpa:#x}: "
                                 "only slot 0 at GPA 0 exists")
        self._memory = GuestMemory.from_fd(fd, request.size)

    def _on_config(self, request: Config) -> None:
        try:
            document = json.loads(request.data)
            config = VmConfig.from_dict(document["vm"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MigrationError(f"bad CONFIG: {exc}") from None
        self.progress.update(memory_bytes=config.memory_bytes,
                             bytes_remaining=config.memory_bytes)
        if self._memory is not None:  # local: memory came by fd
            if self._memory.size != config.memory_bytes:
                raise MigrationError(f"memory fd holds {self._memory.size} bytes, CONFIG says "
                                     f"{config.memory_bytes}")
            return
        prealloc, self._prealloc = self._prealloc, None
        if prealloc is not None and prealloc.size == config.memory_bytes:
            self._memory = prealloc
            self._memory_preallocated = True
            return
        if prealloc is not None:
            prealloc.close()
        self._memory = GuestMemory.create(config.memory_bytes)

    def _receive_memory(self, channel: ReceiverChannel, request: MemoryRequest) -> None:
        memory = self._memory
        if memory is None:
            raise MigrationError("MEMORY arrived before CONFIG")
        gpas, lengths = request.ranges.as_arrays()
        if len(gpas) and int((gpas + lengths).max()) > memory.size:
            raise GuestMemoryError(f"MEMORY range ends past guest memory "
                                   f"({int((gpas + lengths).max()):#x} > {memory.size:#x})")
        if not self._memory_preallocated:  # fault big ranges in with one call each
            big = lengths >= BULK_POPULATE_BYTES
            for gpa, length in zip(gpas[big].tolist(), lengths[big].tolist(), strict=True):
                memory.populate(gpa, length)
        views = memory.views(request.ranges)
        try:
            channel.receive_payload(views)
        finally:
            for view in views:
                view.release()
        channel.accept()
        self.progress.add_bytes(request.payload_bytes)

    def _on_state(self, request: State) -> None:
        if self._memory is None:
            raise MigrationError("STATE arrived before any memory")
        state = MachineState.from_json(request.data)
        if state.config.memory_bytes != self._memory.size:
            raise MigrationError("STATE describes a different memory size than CONFIG")
        memory, self._memory = self._memory, None
        self._machine = Machine.restore(state, memory, serial_log=self._serial_log,
                                        resume=False)
        if self._start is not None and self._start.verify_memory:
            # Memory is final once STATE arrives (the sender sends it only after every
            # chunk was acknowledged): hash it while the source hashes its own copy.
            self._digest = BackgroundDigest(self._machine.memory)

    def _on_complete(self, request: Complete) -> None:
        machine = self._machine
        if machine is None:
            raise MigrationError("COMPLETE arrived before STATE")
        if self._start is not None and self._start.verify_memory:
            try:
                claimed = json.loads(request.data or b"{}")["memory_digest"]
            except (ValueError, KeyError, TypeError):
                raise MigrationError("COMPLETE carries no memory digest although START "
                                     "asked to verify memory") from None
            if claimed.get("algorithm") != DIGEST_ALGORITHM:
                raise MigrationError(f"unknown digest algorithm {claimed.get('algorithm')!r}")
            ours = self._digest.result() if self._digest else memory_digest(machine.memory)
            if ours != claimed.get("hex"):
                raise MigrationError("memory verification failed: the destination's memory "
                                     "digest differs from the source's; not resuming")
        machine.resume()

    # --- extra connections ----------------------------------------------------------------

    def _serve_memory(self, channel: ReceiverChannel) -> None:
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
                try:
                    self._receive_memory(channel, event)
                except VmigError as exc:
                    channel.reject(str(exc))
                    raise
        except BaseException as exc:  # after a hand-over _abort() ignores this
            self._abort(describe(exc))

    # --- ending -----------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Record the first error and wake every thread blocked on a socket."""
        with self._lock:
            if self._closing:
                return  # already ending: the first reason stands
            self._closing = True
            self._error = reason
        self._shut_connections()
        self._main_queue.put(None)

    def _shut_connections(self) -> tuple[list[ReceiverChannel], list[threading.Thread]]:
        """Wake every thread blocked on a migration socket and stop accepting; return the
        connections and workers there are."""
        with self._lock:
            channels = [*self._extras, *([self._main] if self._main else [])]
            workers = list(self._workers)
        for channel in channels:
            channel.stream.shutdown()
        self._close_listener()
        return channels, workers

    def _discard_prealloc(self) -> None:
        prealloc, self._prealloc = self._prealloc, None
        if prealloc is not None:
            prealloc.close()

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self.address.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(self.address.path)

    def _hand_over(self) -> None:
        """Report the running VM now; from here on it belongs to the caller."""
        machine, self._machine = self._machine, None
        self._reported = True
        self.progress.update(phase=Phase.COMPLETED, bytes_remaining=0)
        try:
            self._on_finished(machine, None)
        except Exception:
            log.exception("on_finished callback failed")

    def _finish(self) -> None:
        """Close every connection, join the workers, then report the outcome once."""
        with self._lock:
            self._closing = True
        channels, workers = self._shut_connections()
        for worker in workers:
            worker.join()
        if self._accept_thread is not None:
            self._accept_thread.join()
        for channel in channels:
            channel.close()
        # drain connections that were queued but never served
        while True:
            try:
                pending = self._main_queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.close()
        self._discard_prealloc()
        machine, error = self._machine, self._error
        self._machine = None
        if self._reported:  # handed over; a late error (the OK not delivered) is only logged
            if error is not None:
                log.warning("after the hand-over: %s", error)
            self._done.set()
            return
        if self._digest is not None:
            with contextlib.suppress(Exception):
                self._digest.result()
        if machine is not None:  # built from STATE but never completed
            machine.close()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if error is None:
            error = "the receiver was closed before a migration arrived"
        self.progress.update(phase=Phase.FAILED, error=error)
        log.warning("incoming migration failed: %s", error)
        self._done.set()
        try:
            self._on_finished(None, error)
        except Exception:
            log.exception("on_finished callback failed")

