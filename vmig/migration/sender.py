"""The sending side: pre-copy over many connections, then stop-and-copy and hand-over.

Sequence (docs/protocol.md has the wire view)::

    connect MAIN (hello) -> connect N-1 MEMORY connections (hello each)
    START -> [MEMORY_FD, local only] -> CONFIG
    start dirty logging
    iteration 0: all memory            } pre-copy, guest running; chunks on the
    iteration k: pages dirtied meanwhile }  shared queue of SenderPool
    ... until policy.decide() says CONVERGE (or ABORT on timeout with "cancel")
    pause guest -> last dirty pages -> STATE -> COMPLETE [digest] -> source MIGRATED

Any failure before COMPLETE is sent leaves the source VM as it was (resumed if
we paused it), sends ABANDON when it still can, and closes every connection;
the error names the cause. If COMPLETE was sent but not answered, the
destination may already run the guest, so the source stays paused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from vmig.errors import MigrationError, TransportError, describe
from vmig.memory import GuestMemory
from vmig.migration.digest import DIGEST_ALGORITHM, BackgroundDigest
from vmig.migration.params import MAX_ITERATIONS, MIN_CHUNK_BYTES, ResolvedSend, SendParams
from vmig.migration.policy import Decision, MemoryMigrationStats, decide_with_reason
from vmig.migration.progress import MigrationProgress, MigrationSummary, Phase
from vmig.proto import (
    Abandon,
    Complete,
    Config,
    ConnectionRole,
    MemoryFd,
    Start,
    StartFlags,
    State,
)
from vmig.ranges import RangeTable
from vmig.transport.address import Address
from vmig.transport.channel import SenderChannel
from vmig.transport.endpoint import dial
from vmig.transport.sender_pool import SenderPool
from vmig.units import PAGE_SIZE
from vmig.vmm.machine import Machine, VmState

log = logging.getLogger(__name__)

OPERATION = "migrating"


class MigrationSender:
    """Migrates one Machine to one destination; `run()` once."""

    def __init__(self, machine: Machine, params: SendParams | ResolvedSend,
                 progress: MigrationProgress | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolved = params if isinstance(params, ResolvedSend) else params.resolve()
        self.address: Address = self.resolved.address
        self.machine = machine
        self.params = self.resolved.params
        self.clock = clock
        self.progress = progress or MigrationProgress("send")
        for warning in self.resolved.warnings:
            log.warning("%s", warning)
            self.progress.warn(warning)
        self.progress.update(memory_bytes=machine.config.memory_bytes,
                             bytes_remaining=machine.config.memory_bytes)
        self.migration_id = os.urandom(16)
        self.progress.update(migration_id=self.migration_id.hex())
        self.stats = MemoryMigrationStats(started_at=clock())
        self._pool: SenderPool | None = None
        self._paused_by_us = False
        self._downtime_started = 0.0
        self._heartbeat_at_pause: int | None = None
        self._unsent_dirty: np.ndarray | None = None  # dirty bitmap pre-copy left for downtime
        self._cancelled: str | None = None
        self._complete_sent = False
        self._channels: list[SenderChannel] = []

    def cancel(self, reason: str = "cancelled") -> None:
        """Make a running `run()` fail fast (from any thread; never blocks).

        Every connection is shut down, so blocked sends and receives return at
        once; `run()` then abandons, resumes the VM if it paused it, and raises.
        """
        self._cancelled = reason
        for channel in list(self._channels):
            channel.stream.shutdown()

    def _check_cancelled(self) -> None:
        if self._cancelled is not None:
            raise MigrationError(f"migration cancelled: {self._cancelled}")

    @property
    def memory(self) -> GuestMemory:
        return self.machine.memory

    # --- the whole migration -------------------------------------------------------------

    def run(self) -> MigrationSummary:
        """Migrate; return the summary or raise MigrationError (see the module docstring)."""
        self.machine.begin(OPERATION)
        try:
            summary = self._migrate()
        except BaseException as exc:
            reason = describe(exc)
            if self._cancelled is not None:
                reason = f"migration cancelled: {self._cancelled}"
            if self._complete_sent and not isinstance(exc, MigrationError):
                # COMPLETE went out but its answer did not come back: the destination may
                # be running the guest. Resuming here could leave two copies running.
                reason += ("; COMPLETE was sent but not answered, so the destination may be "
                           "running the VM: the source stays paused (resume it only if the "
                           "destination does not run it)")
                self._paused_by_us = False
            self._recover(reason)
            self.progress.update(phase=Phase.FAILED, error=reason)
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"migration failed: {reason}") from exc
        finally:
            self.machine.end(OPERATION)
        self.progress.update(phase=Phase.COMPLETED)
        return summary

    def _migrate(self) -> MigrationSummary:
        started = self.clock()
        self._pool = SenderPool(self._open_connections())
        main = self._pool.main
        flags = StartFlags.NONE
        if self.params.local:
            flags |= StartFlags.LOCAL
        if self.params.verify_memory:
            flags |= StartFlags.VERIFY_MEMORY
        connections = len(self._pool.channels)
        main.request(Start(migration_id=self.migration_id, connections=connections, flags=flags))
        if self.params.local:
            main.submit_with_fd(MemoryFd(GuestMemory.SLOT, 0, self.memory.size), self.memory.fd)
            SenderChannel.check(main.read_response())
        config = {"vm": self.machine.config.to_dict(), "tsc_khz": self.machine.tsc_khz}
        main.request(Config(json.dumps(config).encode()))

        if self.params.local:  # the destination maps this memory: nothing to track or copy
            self._stop_and_copy(main)
        else:
            self.machine.start_dirty_log()
            try:
                self._precopy()
                self._stop_and_copy(main)
            finally:
                self.machine.stop_dirty_log()
        downtime_ms = (self.clock() - self._downtime_started) * 1000
        duration = self.clock() - started
        sent = self.stats.bytes_sent_total
        summary = MigrationSummary(
            status="completed",
            connections=connections,
            iterations=self.stats.iteration,
            bytes_sent=sent,
            duration_ms=duration * 1000,
            downtime_ms=downtime_ms,
            throughput_bytes_per_s=sent / duration if duration > 0 else 0.0,
            memory_verified=self.params.verify_memory,
            heartbeat_at_pause=self._heartbeat_at_pause,
            local=self.params.local,
            warnings=list(self.progress.warnings),
        )
        self.machine.mark_migrated()
        self._close()
        return summary

    # --- connections ---------------------------------------------------------------------

    def _open_connections(self) -> list[SenderChannel]:
        """MAIN, then up to N-1 MEMORY connections (docs/protocol.md: partial acceptance)."""
        channels = self._channels
        channels.append(self._open(ConnectionRole.MAIN))
        wanted = self.params.connections - 1
        failures: list[str] = []
        try:
            for _ in range(wanted):
                try:
                    channels.append(self._open(ConnectionRole.MEMORY))
                except (TransportError, MigrationError) as exc:
                    failures.append(str(exc))
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        opened = len(channels) - 1
        if wanted and opened == 0:
            message = (f"could not open any of {wanted} extra connections ({failures[0]}); "
                       "continuing on one connection")
            log.warning(message)
            self.progress.warn(message)
        elif opened < wanted:
            reason = (f"destination accepted only {opened} of {wanted} extra connections: "
                      f"{failures[0]}")
            with contextlib.suppress(Exception):  # tell the destination why we leave
                channels[0].submit(Abandon(reason))
            for channel in channels:
                channel.close()
            raise MigrationError(reason)
        self.progress.update(connections=len(channels))
        return channels

    def _open(self, role: ConnectionRole) -> SenderChannel:
        self._check_cancelled()
        security = self.resolved.security
        stream = dial(self.address, security)
        try:
            return SenderChannel(stream, role, self.migration_id, token=security.token)
        except BaseException:
            stream.close()
            raise

    # --- pre-copy ------------------------------------------------------------------------

    def _send(self, ranges: RangeTable) -> int:
        """Send one iteration's ranges over the pool; record bandwidth."""
        assert self._pool is not None
        self._check_cancelled()
        began = self.clock()
        connections = len(self._pool.channels)
        fair_share = ranges.total_bytes // (2 * connections) // PAGE_SIZE * PAGE_SIZE
        chunk = min(self.params.chunk_bytes, max(fair_share, MIN_CHUNK_BYTES))
        chunks = ranges.partition(chunk)
        sent = self._pool.send_iteration(chunks, self.memory.views, self.progress.add_bytes)
        seconds = self.clock() - began
        self.stats.record_iteration(sent, seconds)
        self.progress.update(iteration=self.stats.iteration,
                             throughput_bytes_per_s=self.stats.bandwidth_bytes_per_s)
        return sent


    def _precopy(self) -> None:
        self.progress.update(phase=Phase.PRECOPY)
        # The destination starts from zeroed memory: the first pass copies only the
        # parts of the backing file that hold data (never-touched pages are holes).
        ranges = RangeTable(self.memory.data_extents())
        last_collect = self.clock()
        while True:
            self.progress.update(bytes_remaining=ranges.total_bytes)
            self._send(ranges)
            dirty = self.machine.collect_dirty()
            ranges = RangeTable.from_bitmap(dirty, 0, PAGE_SIZE)
            now = self.clock()
            self.stats.record_dirty(ranges.total_bytes, now - last_collect)
            last_collect = now
            decision, why = decide_with_reason(
                self.stats, self.params.downtime_ms, self.params.timeout_s,
                self.params.timeout_strategy, now, MAX_ITERATIONS)
            self.progress.update(
                bytes_remaining=ranges.total_bytes,
                dirty_rate_bytes_per_s=self.stats.dirty_rate_bytes_per_s,
                expected_downtime_ms=self.stats.expected_downtime_ms,
            )
            log.info("iteration %d: %s -> %s", self.stats.iteration, why, decision.value)
            if decision is Decision.CONVERGE:
                self._unsent_dirty = dirty
                return
            if decision is Decision.ABORT:
                raise MigrationError(f"migration cancelled: {why}")

    # --- stop and copy -------------------------------------------------------------------

    def _stop_and_copy(self, main: SenderChannel) -> None:
        self.progress.update(phase=Phase.DOWNTIME)
        self._downtime_started = self.clock()
        if self.machine.state is VmState.RUNNING:
            self.machine.pause_for(OPERATION)
            self._paused_by_us = True
        if not self.params.local:
            dirty = self.machine.collect_dirty()
            if self._unsent_dirty is not None:
                dirty |= self._unsent_dirty
            final = RangeTable.from_bitmap(dirty, 0, PAGE_SIZE)
            self.progress.update(bytes_remaining=final.total_bytes)
            self._send(final)
        state = self.machine.save_state()
        self._heartbeat_at_pause = self.machine.guest_counters()["heartbeat"]
        digest: BackgroundDigest | None = None
        if self.params.verify_memory:  # hash while STATE travels and the destination hashes
            digest = BackgroundDigest(self.memory)
        try:
            main.request(State(state.to_json().encode()))
        finally:
            value = digest.result() if digest is not None else None
        complete: dict[str, object] = {}
        if value is not None:
            complete["memory_digest"] = {"algorithm": DIGEST_ALGORITHM, "hex": value}
        self._check_cancelled()
        main.submit(Complete(json.dumps(complete).encode()))
        self._complete_sent = True  # from here the destination may already run the guest
        SenderChannel.check(main.read_response())
        self.progress.update(bytes_remaining=0)

    # --- failure -------------------------------------------------------------------------

    def _recover(self, reason: str) -> None:
        """Leave exactly one running VM: ours. Best effort ABANDON, close everything."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.main.submit(Abandon(reason))
        self._close()
        with contextlib.suppress(Exception):
            self.machine.stop_dirty_log()
        if self._paused_by_us and self.machine.state is VmState.PAUSED:
            self.machine.resume_for(OPERATION)
        self._paused_by_us = False

    def _close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels = []
        self._pool = None


