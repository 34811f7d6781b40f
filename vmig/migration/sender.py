"""The sending side: pre-copy over many connections, then stop-and-copy and hand-over.

Sequence (docs/protocol.md has the wire view), one explicit phase at a time
(`vmig.migration.policy.SendPhase`; `SEND_TRANSITIONS` is the table)::

    CONNECTING  connect MAIN + N-1 MEMORY (handshake each), START, [MEMORY_FD], CONFIG
    PRECOPY     iteration 0: memory that holds data; iteration k: pages dirtied
                meanwhile; chunks on SenderPool's shared queue; until policy.decide()
    SWITCHOVER  pause the guest (if it ran) -> last dirty pages -> STATE
    COMPLETING  COMPLETE [digest, run|stay paused] sent: the point of no return
    COMPLETED   the destination acknowledged: the source is MIGRATED

A cancel (from any thread) is allowed until COMPLETE is sent, and so is any
failure's recovery: ABANDON where the MAIN connection still carries it, every
connection closed, the guest resumed if the migration paused it. A cancelled
migration returns a summary whose status is "cancelled"; a failed one raises
MigrationError. `SendLifecycle` owns the phase, the cancel and the point of no
return; `SendConnections` the connections. With protocol version 3 any lost
connection is re-dialled for up to `reconnect_timeout_s` and the migration goes on
where it was, post-copy included (`postcopy-paused` meanwhile). The exceptions to
"the source runs again": COMPLETE sent and its answer never came, even after MAIN
was re-dialled (the destination may already run the guest), and a failure after
the switch to post-copy: the source then stays paused and the error says so. A
cancel in postcopy-paused is the explicit rollback: the source resumes its copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import blake3
import numpy as np

from vmig.errors import MigrationCancelled as Cancelled
from vmig.errors import MigrationError, StateError, TransportError, describe
from vmig.memory import GuestMemory
from vmig.migration.connections import SendConnections
from vmig.migration.digest import DIGEST_ALGORITHM, BackgroundDigest
from vmig.migration.documents import (
    MAX_CONFIG_EXTENTS,
    CompleteDocument,
    ConfigDocument,
    MemoryDigest,
    document_version_for,
)
from vmig.migration.lifecycle import PHASE_METRICS, ROLLBACK_WARNING, SendLifecycle
from vmig.migration.memory_reader import ChunkSender
from vmig.migration.metrics import MigrationMetrics, Phase
from vmig.migration.params import (
    MAX_ITERATIONS,
    MIN_CHUNK_BYTES,
    ResolvedSend,
    SendParams,
    changeable_values,
    check_changes,
)
from vmig.migration.policy import (
    STALL_DECISIONS,
    SWITCHOVER_COMMANDS,
    Decision,
    MemoryMigrationStats,
    SendPhase,
    StallDetector,
    Switchover,
    decide_with_reason,
    next_throttle,
    switchover_cause,
)
from vmig.migration.postcopy import PRIORITY_WINDOW_BYTES, FaultResponder, split_owed
from vmig.proto import (
    RESUMABLE_VERSION,
    Abandon,
    Complete,
    Config,
    MemoryFd,
    Postcopy,
    Start,
    StartFlags,
    State,
)
from vmig.ranges import RangeTable
from vmig.transport.address import Address, parse_url
from vmig.transport.channel import SenderChannel
from vmig.transport.ratelimit import TokenBucket
from vmig.transport.sender_pool import Chunk, SenderPool, role_name
from vmig.units import PAGE_SIZE, MiB, format_rate, format_size
from vmig.vmm.machine import Machine, VmState

log = logging.getLogger(__name__)

OPERATION = "migrating"
#: A cancel lets the MAIN connection finish what it writes, so that ABANDON can tell the
#: destination why; after this long the connection is cut anyway.
CANCEL_GRACE_S = 2.0
#: Phases in which a parameter change still matters (until COMPLETE is sent).
_CHANGEABLE_PHASES = frozenset({SendPhase.CONNECTING, SendPhase.PRECOPY, SendPhase.SWITCHOVER,
                                SendPhase.POSTCOPY})


class MigrationSender:
    """Migrates one Machine to one destination; `run()` once."""

    def __init__(self, machine: Machine, params: SendParams | ResolvedSend,
                 metrics: MigrationMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolved = params if isinstance(params, ResolvedSend) else params.resolve()
        self.address: Address = self.resolved.address
        self.machine = machine
        self.params = self.resolved.params
        self.clock = clock
        self.metrics = metrics or MigrationMetrics("send")
        self.migration_id = os.urandom(16)
        self.metrics.update(migration_id=self.migration_id.hex(), peer=str(self.address),
                            memory_bytes=machine.config.memory_bytes, local=self.params.local)
        for warning in self.resolved.warnings:
            log.warning("%s", warning)
            self.metrics.warn(warning)
        self.stats = MemoryMigrationStats(started_at=clock())
        self.lifecycle = SendLifecycle(self.metrics)
        self.lifecycle.on_cancel(self._interrupt)
        self.connections = SendConnections(self.resolved, self.migration_id, self.lifecycle,
                                           clock)
        self._grace: threading.Timer | None = None
        self._limiter: TokenBucket | None = None
        self._params_lock = threading.Lock()  # set_parameters() against the cap's setup
        self.metrics.update(parameters=changeable_values(self.params))
        self._throttle_streak = 0
        self._faults: FaultResponder | None = None  # post-copy's FAULT connection
        self._was_running = False
        self._pool: SenderPool | None = None
        self._unsent_dirty: np.ndarray | None = None  # dirty bitmap pre-copy left for downtime
        self._extents: list[tuple[int, int]] = []  # where memory holds data (set by run)
        self._chunks = ChunkSender(machine.memory, self.metrics, self.params.compress_level)
        self._stall: StallDetector | None = None  # set when pre-copy begins, if asked for

    @property
    def phase(self) -> SendPhase:
        return self.lifecycle.phase

    @property
    def memory(self) -> GuestMemory:
        return self.machine.memory

    def _enter(self, phase: SendPhase) -> None:
        self.lifecycle.enter(phase)

    # --- cancel and recover --------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        """Stop the migration (from any thread; never blocks); the source runs on.

        Raises StateError once COMPLETE (or POSTCOPY) is sent: the destination may
        already run the VM; except in postcopy-paused, where it is the explicit
        rollback (it warns that it is one). The data connections are cut at once;
        MAIN gets CANCEL_GRACE_S to take the answer it waits for, so that ABANDON can
        then tell the destination why.
        """
        if self.lifecycle.cancel(reason):
            log.warning("%s", ROLLBACK_WARNING)
            self.metrics.warn(ROLLBACK_WARNING)

    def recover(self, url: str | None = None) -> None:
        """recover-migration: in postcopy-paused, re-dial the lost connections now, at
        `url` if given (another address of the destination); StateError otherwise."""
        if url is not None:
            parse_url(url)  # ConfigError now rather than in the re-dial
        self.lifecycle.recover(url)

    def _interrupt(self) -> None:
        self.connections.interrupt_dialling()
        pool = self._pool
        if pool is not None:
            pool.stop()
        if self._limiter is not None:
            self._limiter.stop()
        channels = list(self.connections.channels)
        for channel in channels[1:]:
            channel.shutdown()
        if self._faults is not None:
            self._faults.shutdown()
        if channels and self._grace is None:  # MAIN: its answer, then ABANDON; or cut it
            self._grace = threading.Timer(CANCEL_GRACE_S, channels[0].shutdown)
            self._grace.daemon = True
            self._grace.start()

    def _check_cancelled(self) -> None:
        self.lifecycle.check_cancelled()

    @property
    def _document_version(self) -> int:
        """CONFIG's and STATE's version for the protocol the destination took (a version-2
        destination reads version-1 documents only)."""
        return document_version_for(self.connections.version)

    # --- the whole migration -------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Migrate; return the summary (also when cancelled) or raise MigrationError."""
        self.machine.begin(OPERATION)
        self._was_running = self.machine.state is VmState.RUNNING
        self._extents = self.memory.backing.data_extents()  # once: SEEK_HOLE walks every page
        self.metrics.update(vm_paused=not self._was_running,
                            data_bytes=sum(n for _, n in self._extents))
        try:
            try:
                self._migrate()
            except BaseException as exc:
                outcome = self._fail(exc)
                if outcome is SendPhase.FAILED:
                    if isinstance(exc, MigrationError):
                        raise MigrationError(self.metrics.error or describe(exc)) from None
                    raise MigrationError(f"migration failed: {self.metrics.error}") from exc
                return self.metrics.view()
        finally:
            if self._grace is not None:
                self._grace.cancel()
            self.machine.end(OPERATION)
        return self.metrics.view()

    def _migrate(self) -> None:
        links = self.connections
        self._pool = SenderPool(self._open_connections(), on_lost=self._lost,
                                resume=links.resume_data, heartbeat=links.ping,
                                heartbeat_s=links.heartbeat_s,
                                on_stop=self.lifecycle.abandon_redials)
        links.channels = self._pool.channels  # one list: a resumed channel takes its place
        with self._params_lock:
            self._apply_bandwidth_cap()
        flags = StartFlags.NONE
        if self.params.local:
            flags |= StartFlags.LOCAL
        if self.params.verify_memory:
            flags |= StartFlags.VERIFY_MEMORY
        if self.params.compress_level is not None:
            flags |= StartFlags.COMPRESS
        if self.params.postcopy:
            flags |= StartFlags.POSTCOPY
        resumable = links.version >= RESUMABLE_VERSION
        links.request(Start(
            migration_id=self.migration_id, connections=len(self._pool.channels),
            flags=flags, version=links.version,
            reconnect_timeout_s=self.params.reconnect_timeout_s if resumable else 0,
            dead_peer_timeout_s=self.params.dead_peer_timeout_s if resumable else 0))
        links.start_heartbeat()
        if self.params.local:
            main = links.main
            with links.main_lock:
                main.submit_with_fd(MemoryFd(GuestMemory.SLOT, 0, self.memory.size),
                                    self.memory.fd)
                SenderChannel.check(main.read_response())
        config = ConfigDocument(
            vm=self.machine.config, tsc_khz=self.machine.tsc_khz,
            # where the data is: a fresh destination allocates it ahead of the pages
            data_extents=tuple(RangeTable(self._extents).coarsened(MAX_CONFIG_EXTENTS)),
            cpuid=self.machine.guest_cpuid())
        began = self.clock()
        links.request(Config(config.to_json(version=document_version_for(links.version))))
        self.stats.switchover_overhead_ms = self._switchover_overhead_ms(self.clock() - began)
        self._check_cancelled()

        if self.params.local:  # the destination maps this memory: nothing to track or copy
            self._stop_and_copy()
        else:
            self.machine.start_dirty_log()
            try:
                self._enter(SendPhase.PRECOPY)
                if self._precopy() is Decision.POSTCOPY and self._was_running:
                    self._postcopy()
                else:
                    self._stop_and_copy()
            finally:
                self.machine.stop_dirty_log()
        self._enter(SendPhase.COMPLETED)
        self.metrics.end_downtime()
        self._budget_check()
        self.metrics.finish(Phase.COMPLETED)
        self.machine.mark_migrated()
        self._close()

    def _switchover_overhead_ms(self, round_trip_s: float) -> float:
        """What the pause costs besides the last pages: STATE and COMPLETE (a round trip
        each, measured on CONFIG) and, with verify_memory, the digests (timed here on
        16 MiB, scaled to the memory that holds data; both sides hash at once)."""
        overhead = 2 * round_trip_s * 1000
        if self.params.verify_memory:
            sample = bytes(16 * MiB)
            began = time.perf_counter()
            blake3.blake3(sample, max_threads=blake3.blake3.AUTO).digest()
            rate = len(sample) / max(time.perf_counter() - began, 1e-6)
            data = self.metrics.data_bytes or self.memory.size
            overhead += data / rate * 1000
            if overhead > self.params.downtime_ms:
                message = (f"verify_memory adds about {overhead:.0f} ms to the pause, more "
                           f"than the {self.params.downtime_ms} ms budget")
                log.warning("%s", message)
                self.metrics.warn(message)
        return overhead

    def _budget_check(self) -> None:
        downtime = self.metrics.downtime_ms
        if downtime is not None and downtime > self.params.downtime_ms:
            self.metrics.warn(f"downtime {downtime:.1f} ms exceeded the {self.params.downtime_ms}"
                              " ms budget")

    # --- connections ---------------------------------------------------------------------

    def _open_connections(self) -> list[SenderChannel]:
        """MAIN, then up to N-1 MEMORY connections (docs/protocol.md: partial acceptance)."""
        links = self.connections
        links.open_main()
        wanted = self.params.connections - 1
        failures: list[str] = []
        for _ in range(wanted):
            try:
                links.open_memory()
            except (TransportError, MigrationError) as exc:
                if isinstance(exc, Cancelled):
                    raise
                failures.append(str(exc))
        channels = links.channels
        if self.params.postcopy:  # post-copy's page requests come on a connection of their own
            fault_index = self.params.connections
            self._faults = FaultResponder(
                links.open_fault(), self.memory, self._fault_served,
                redial=(lambda lost, cause: links.redial(fault_index, lost, cause))
                if links.resumable else None)
        opened = len(channels) - 1
        if wanted and opened == 0:
            message = (f"could not open any of {wanted} extra connections ({failures[0]}); "
                       "continuing on one connection")
            log.warning(message)
            self.metrics.warn(message)
        elif opened < wanted:
            raise MigrationError(f"destination accepted only {opened} of {wanted} extra "
                                 f"connections: {failures[0]}")
        self.metrics.open_connections([role_name(c) for c in channels])
        return channels

    def _lost(self, index: int, channel: SenderChannel, reason: str) -> None:
        message = f"connection {index} ({channel.role.name}) lost: {reason}"
        if not self.params.verify_memory and not self.params.postcopy:
            message += "; memory will be verified at the switch-over"
        log.warning("%s", message)
        self.metrics.connection_lost(index, reason)
        self.metrics.warn(message)

    # --- pre-copy ------------------------------------------------------------------------

    def _send(self, ranges: RangeTable, chunk_bytes: int | None = None, *,
              count_pass: bool = True) -> int:
        """Send one iteration's ranges over the pool; record bandwidth. With `count_pass`
        false the caller publishes the pass count itself (with the pass's other figures)."""
        assert self._pool is not None
        self._check_cancelled()
        began = self.clock()
        connections = self._pool.alive
        fair_share = ranges.total_bytes // (2 * connections) // PAGE_SIZE * PAGE_SIZE
        chunk = chunk_bytes or min(self.params.chunk_bytes, max(fair_share, MIN_CHUNK_BYTES))
        chunks = ranges.partition(chunk)
        try:
            with self.connections.main_lock:  # MAIN's worker sends the heartbeat meanwhile
                sent = self._pool.send_iteration(chunks, self._chunks.prepare, self._acked)
        except TransportError as exc:
            raise TransportError(f"the MAIN connection failed: {exc}") from None
        seconds = self.clock() - began
        self.stats.record_iteration(sent, seconds)
        self.metrics.update(bandwidth_bytes_per_s=self.stats.bandwidth_bytes_per_s)
        if count_pass:
            self.metrics.update(iterations=self.stats.iteration)
        self._chunks.first_pass = False
        return sent

    def _acked(self, index: int, chunk: Chunk) -> None:
        self._chunks.acked(index, chunk)
        if self.phase is SendPhase.POSTCOPY:
            left = self.metrics.postcopy_pages_left or 0
            pages = chunk.ranges.total_bytes // PAGE_SIZE
            self.metrics.update(postcopy_pages_left=max(left - pages, 0))

    def _precopy(self) -> Decision:
        """Iterate until the policy says CONVERGE (returned), POSTCOPY (returned) or ABORT."""
        # The destination starts from zeroed memory: the first pass copies only the
        # parts of the backing file that hold data (never-touched pages are holes), and
        # of those only the pages that are not all zeros (`ChunkSender.prepare`).
        ranges = RangeTable(self._extents)
        last_collect = self.clock()
        self._watch_for_stalls(last_collect, ranges.total_bytes)
        while True:
            self.metrics.update(bytes_remaining=ranges.total_bytes)
            self._send(ranges, count_pass=False)  # counted below, with its dirty rate
            dirty = self.machine.collect_dirty()
            ranges = RangeTable.from_bitmap(dirty, 0, PAGE_SIZE)
            now = self.clock()
            self.stats.record_dirty(ranges.total_bytes, now - last_collect)
            last_collect = now
            params = self.params  # one set of values per decision (set_parameters swaps it)
            decision, why = decide_with_reason(
                self.stats, params.downtime_ms, params.timeout_s,
                params.timeout_strategy, now, MAX_ITERATIONS,
                params.postcopy_after_iterations if params.postcopy else None)
            decision, why = self._switchover(decision, why, now)
            self.metrics.update(iterations=self.stats.iteration,
                                bytes_remaining=ranges.total_bytes,
                                dirty_rate_bytes_per_s=self.stats.dirty_rate_bytes_per_s,
                                expected_downtime_ms=self.stats.expected_downtime_ms)
            done = self.metrics.iteration_done(
                self.stats.iteration, self.stats.last_iteration_bytes,
                self.stats.last_iteration_seconds, decision.value, why)
            log.info("iteration %d: %s in %.2f s (%s), guest dirtied %s, %s left, %.1f s elapsed: "
                     "%s -> %s", done["iteration"], format_size(done["bytes"]), done["seconds"],
                     format_rate(done["rate_bytes_per_s"]),
                     format_rate(done["dirty_rate_bytes_per_s"]),
                     format_size(done["bytes_remaining"] or 0), done["elapsed_s"], why,
                     decision.value, extra=done)
            if decision is Decision.CONTINUE:
                self._auto_converge(params)
            if decision in (Decision.CONVERGE, Decision.POSTCOPY):
                self._unsent_dirty = dirty
                return decision
            if decision is Decision.ABORT:
                raise Cancelled(f"migration cancelled: {why}")

    def _auto_converge(self, params: SendParams) -> None:
        """Step the vCPU throttle up while the guest dirties faster than we send (with
        auto_converge; turned off mid-flight, the throttle is lifted)."""
        current = self.machine.throttle.percent
        if params.auto_converge:
            percent, self._throttle_streak = next_throttle(
                current, self._throttle_streak, self.stats.dirty_rate_bytes_per_s,
                self.stats.bandwidth_bytes_per_s, initial=params.auto_converge_initial,
                step=params.auto_converge_step, maximum=params.auto_converge_max)
        else:
            percent, self._throttle_streak = 0, 0
        if percent != current:
            log.info("auto-converge: throttling the vCPUs to %d%%", percent)
            self.machine.throttle.set(percent)
            self.metrics.update(throttle_percent=percent)
            if self._stall is not None:  # auto-converge is still acting: not a stall
                self._stall.restart(self.clock(), self.stats.remaining_bytes)

    # --- switch-over on command, and stall detection -------------------------------------

    def start_postcopy(self) -> None:
        """vm.migration-start-postcopy: switch to post-copy at the end of the current pass
        (from any thread; never blocks). StateError says why when it cannot apply: post-copy
        not allowed, still connecting, past pre-copy, force-complete asked already."""
        if not self.params.postcopy:
            raise StateError("cannot start post-copy: this migration does not allow it "
                             "(send it with postcopy)")
        self.lifecycle.command_switchover(Switchover.START_POSTCOPY)

    def force_complete(self) -> None:
        """vm.migration-force-complete: pause the guest and switch over at the end of the
        current pass, whatever the expected downtime (from any thread; never blocks).
        StateError says why when it cannot apply: local (no pre-copy), past pre-copy,
        start-postcopy asked already."""
        if self.params.local:
            raise StateError("cannot force the switch-over: a local migration has no "
                             "pre-copy, it switches over at once")
        self.lifecycle.command_switchover(Switchover.FORCE_COMPLETE)

    def _watch_for_stalls(self, now: float, bytes_left: int) -> None:
        """Start stall detection (unless stall_timeout_s is 0) from the first pass's bytes."""
        if self.params.stall_timeout_s > 0:
            self._stall = StallDetector(self.params.stall_timeout_s, self.params.stall_margin)
            self._stall.observe(now, bytes_left)

    def _switchover(self, decision: Decision, why: str, now: float) -> tuple[Decision, str]:
        """The pass's decision after the operator's command and the stall check; a pre-copy
        that ends says why in the metrics (`switchover`). The policy's own switch-over wins;
        a command overrides going on and the timeout's cancel; a stall, going on."""
        command = self.lifecycle.switchover_command
        stalled = self._stall is not None and self._stall.observe(now,
                                                                   self.stats.remaining_bytes)
        cause: Switchover | None = None
        if decision in (Decision.CONVERGE, Decision.POSTCOPY):
            cause = switchover_cause(
                decision, self.stats, self.params.downtime_ms, self.params.timeout_s, now,
                self.params.postcopy_after_iterations if self.params.postcopy else None)
        elif command is not None:
            decision, cause = SWITCHOVER_COMMANDS[command], command
            why = f"{command.value} asked for by the operator"
        elif stalled and decision is Decision.CONTINUE:
            decision, why = self._stalled(now, why)
            cause = Switchover.STALL
        if cause is not None and decision in (Decision.CONVERGE, Decision.POSTCOPY):
            self.metrics.update(switchover=cause.value)
            log.info("switching over (%s): %s", cause.value, why)
        return decision, why

    def _stalled(self, now: float, why: str) -> tuple[Decision, str]:
        """A stall was found: report it (event "stalled", `stall`) and apply the strategy."""
        detector = self._stall
        assert detector is not None and detector.best_bytes is not None
        strategy = self.params.stall_strategy
        left = self.stats.remaining_bytes
        stalled_s = detector.stalled_for(now)
        reason = (f"stalled: the bytes left ({format_size(left)}) have not fallen "
                  f"{detector.margin:.0%} below the best so far "
                  f"({format_size(detector.best_bytes)}) in {stalled_s:.1f} s; stall "
                  f"strategy {strategy.value}")
        log.warning("%s", reason)
        self.metrics.stalled({"action": strategy.value, "stalled_s": round(stalled_s, 3),
                              "elapsed_s": round(self.metrics.elapsed_s(), 3),
                              "bytes_remaining": left,
                              "best_bytes_remaining": detector.best_bytes,
                              "stalls": detector.stalls, "reason": reason})
        decision = STALL_DECISIONS[strategy]
        return decision, (reason if decision is not Decision.CONTINUE else f"{why}; {reason}")

    # --- parameters changed while migrating (vm.migration-set-parameters) -----------------

    def set_parameters(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change parameters of this running send (from any thread); returns the values
        now in force. They apply from the next chunk (max_bandwidth) or the next
        iteration's decision (downtime_ms, timeout_s, auto-converge), and are announced
        as a "parameters-changed" event.

        ConfigError / StateError as `check_changes`; StateError once COMPLETE was sent
        (or the migration ended): nothing is left for them to change.
        """
        changes = check_changes(changes)
        with self._params_lock:
            if self.phase not in _CHANGEABLE_PHASES:
                raise StateError(f"cannot change parameters: the migration is "
                                 f"{self.phase.value}")
            self.params = dataclasses.replace(self.params, **changes)
            if "max_bandwidth" in changes and self._pool is not None:
                self._apply_bandwidth_cap()
            current = changeable_values(self.params)
        log.info("migration parameters changed: %s",
                 ", ".join(f"{name}={value}" for name, value in changes.items()))
        self.metrics.parameters_changed(changes, current)
        return current

    def _apply_bandwidth_cap(self) -> None:
        """Make the connections keep to `params.max_bandwidth` (under _params_lock): a
        new cap gets a bucket shared by every channel, a changed one a new rate."""
        assert self._pool is not None
        cap = self.params.max_bandwidth_bytes
        if self._limiter is not None:
            self._limiter.set_rate(cap)
        elif cap is not None:
            self._limiter = TokenBucket(cap)
            if self.lifecycle.stopped.is_set():  # cancelled meanwhile: never wait for it
                self._limiter.stop()
            for channel in self._pool.channels:
                channel.limiter = self._limiter
        self.metrics.update(max_bandwidth_bytes_per_s=cap)

    # --- stop and copy -------------------------------------------------------------------

    def _stop_and_copy(self) -> None:
        self._enter(SendPhase.SWITCHOVER)
        if self._was_running:
            self.machine.pause_for(OPERATION)
        if not self.params.local:
            dirty = self.machine.collect_dirty()
            if self._unsent_dirty is not None:
                dirty |= self._unsent_dirty
            final = RangeTable.from_bitmap(dirty, 0, PAGE_SIZE)
            self.metrics.update(bytes_remaining=final.total_bytes)
            self._send(final)
        state = self.machine.save_state()
        self.metrics.update(heartbeat_at_pause=self.machine.guest_counters()["heartbeat"])
        digest: BackgroundDigest | None = None
        if self._verify:  # hash while STATE travels and the destination hashes
            digest = BackgroundDigest(self.memory)
        try:
            self.connections.request(State(state.to_json(version=self._document_version).encode()))
        finally:
            value = digest.result() if digest is not None else None
        complete = CompleteDocument(
            run=self._was_running,
            memory_digest=None if value is None else MemoryDigest(DIGEST_ALGORITHM, value))
        self.lifecycle.commit(SendPhase.COMPLETING)  # a cancel came before, or is refused
        self.connections.request(Complete(complete.to_json()))
        self.metrics.update(memory_verified=self._verify)

    @property
    def _verify(self) -> bool:
        """Verify memory: asked for, or a MEMORY connection was lost. The destination may
        still write the rest of a lost connection's chunk after the same chunk arrived
        again on another connection; only a digest would see those pages go stale."""
        return self.params.verify_memory or self.metrics.connections_lost > 0

    # --- post-copy -----------------------------------------------------------------------

    def _postcopy(self) -> None:
        """Pause, send the state and the list of owed pages; the destination resumes the
        guest at once. Then push every owed page over all data connections (near recent
        faults first) while the fault server answers the pages the guest asks for."""
        self._enter(SendPhase.SWITCHOVER)
        if self._was_running:
            self.machine.pause_for(OPERATION)
        dirty = self.machine.collect_dirty()
        if self._unsent_dirty is not None:
            dirty |= self._unsent_dirty
        now, later = split_owed(dirty, self.memory.size, self.machine.vmm_pages())
        if len(now):
            self._send(now)
        state = self.machine.save_state()
        self.metrics.update(heartbeat_at_pause=self.machine.guest_counters()["heartbeat"])
        self.connections.request(State(state.to_json(version=self._document_version).encode()))
        if self.params.verify_memory:
            message = ("memory verification is skipped: after a switch to post-copy the guest "
                       "runs at the destination before all its memory is there")
            log.warning("%s", message)
            self.metrics.warn(message)
        # from here the destination runs the guest: no cancel (but paused), no resume here
        self.lifecycle.commit(SendPhase.POSTCOPY)
        self.metrics.update(postcopy_pages=later.total_bytes // PAGE_SIZE,
                            postcopy_pages_left=later.total_bytes // PAGE_SIZE)
        self.connections.request(Postcopy(later))
        self.metrics.end_downtime()  # the guest runs again, at the destination
        assert self._faults is not None
        self._faults.start()
        self._send(later, chunk_bytes=MIN_CHUNK_BYTES)  # small chunks follow faults closely
        self.lifecycle.enter(SendPhase.COMPLETING)
        self.connections.request(Complete(CompleteDocument(run=self._was_running).to_json()))
        self.metrics.update(postcopy_pages_left=0)

    def _fault_served(self, ranges: RangeTable) -> None:
        """migrate-fault-srv sent `ranges`: count it, and push the chunks near it next."""
        self.metrics.update(faults_served=self.metrics.faults_served + len(ranges))
        pool = self._pool  # read once: _close() may clear it meanwhile
        if pool is not None:
            pool.prioritize(ranges[0].gpa, PRIORITY_WINDOW_BYTES)

    # --- failure -------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> SendPhase:
        """Leave exactly one running VM, say why; return CANCELLED or FAILED."""
        self.connections.stop_heartbeat()
        phase = self.phase
        reason = describe(exc)
        cancel_reason = self.lifecycle.cancel_reason
        cancelled = cancel_reason is not None or isinstance(exc, Cancelled)
        if cancel_reason is not None:
            reason = f"migration cancelled: {cancel_reason}"
        in_doubt = phase is SendPhase.COMPLETING and not isinstance(exc, MigrationError)
        rollback = self.lifecycle.postcopy_started and cancel_reason is not None
        if rollback:  # postcopy-paused, cancelled: the operator chose the source's copy
            reason = (f"{reason}; {ROLLBACK_WARNING}: the source resumes its copy (stop the "
                      "destination's, cancel it there)")
            in_doubt = False
        elif self.lifecycle.postcopy_started and phase in (SendPhase.POSTCOPY,
                                                           SendPhase.COMPLETING):
            # The guest ran at the destination, which now lacks pages: neither side has
            # the whole VM. Resuming here would roll the guest back: the operator decides.
            reason = (f"post-copy failed: {reason}; the guest ran at the destination, which "
                      "stops it; the source keeps the VM paused as it was at the switch-over "
                      "(resuming it rolls the guest back to that moment)")
            in_doubt, cancelled = True, False
        elif in_doubt:
            # COMPLETE went out but its answer did not come back: the destination may be
            # running the guest. Resuming here could leave two copies running.
            reason += ("; COMPLETE was sent but not answered, so the destination may be "
                       "running the VM: the source stays paused (resume it only if the "
                       "destination does not run it)")
            cancelled = False
        outcome = SendPhase.CANCELLED if cancelled else SendPhase.FAILED
        self.lifecycle.end(outcome)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.main.submit(Abandon(reason, cancelled=cancelled))
        self._close()
        with contextlib.suppress(Exception):
            self.machine.stop_dirty_log()
        self.machine.throttle.set(0)  # the source runs at full speed again
        self.metrics.update(throttle_percent=0)
        if not in_doubt and self._was_running and self.machine.state is VmState.PAUSED:
            self.machine.resume_for(OPERATION)
        (log.info if cancelled else log.warning)("outgoing migration %s: %s", outcome.value,
                                                 reason)
        self.metrics.finish(PHASE_METRICS[outcome], error=reason)
        return outcome

    def _close(self) -> None:
        if self._faults is not None:  # first: its thread must not take the end for a fault
            self._faults.close()
            self._faults = None
        self.connections.close()
        self._pool = None

