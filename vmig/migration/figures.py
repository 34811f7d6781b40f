"""The figures of a migration, defined once: name, type, unit, meaning, libvirt's name.

`MigrationMetrics.view()` publishes exactly `SUMMARY_FIGURES` (a send's summary;
`vm.migration-info` adds `INFO_FIGURES`), the API's pydantic models are generated from
the same tables (`vmig.api.models`), `/metrics` takes its migration gauges and counters
from the figures that name a Prometheus metric, and `render_markdown()` is the table in
docs/migration-info.md (a test keeps the two equal). Adding a figure is one `Figure` here
and its value in `MigrationMetrics`.

`libvirt` names the fields of libvirt's virDomainGetJobStats (`VIR_DOMAIN_JOB_*`, without
the prefix) a figure answers, so an orchestrator written against libvirt finds its
figures under vmig's names. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["INFO_FIGURES", "POSTCOPY", "REQUIRED", "SUMMARY_FIGURES", "Figure", "Group",
           "render_markdown"]

#: `Figure.default` of a figure every view has (never absent, never null).
REQUIRED: Any = ...


@dataclass(frozen=True)
class Group:
    """A nested object of figures (an API model of its own, `name`)."""

    name: str
    doc: str
    figures: tuple[Figure, ...]


@dataclass(frozen=True)
class Figure:
    """One figure of the view.

    `kind` is int, float, str, bool, dict (an object of any fields) or a `Group`;
    `many`: a list of them. A figure whose `default` is None is null when the side
    cannot know it (or before it is known); REQUIRED ones are always there.
    """

    name: str
    kind: Any
    help: str
    default: Any = None
    many: bool = False
    #: What the number counts: "bytes", "pages", "ms", "bytes/s", "pages/s", "%", "faults".
    unit: str = ""
    #: libvirt's virDomainGetJobStats fields (VIR_DOMAIN_JOB_ without the prefix).
    libvirt: tuple[str, ...] = ()
    #: The Prometheus metric and its type ("counter", "gauge", or "histogram": a list of
    #: log2 µs bucket counts, exported in seconds); a figure in ms is exported in seconds.
    prometheus: tuple[str, str] | None = None
    examples: tuple[Any, ...] = field(default=())

    @property
    def nullable(self) -> bool:
        return self.default is None


CONNECTION = Group("ConnectionFigures", "What went over one connection (QEMU's multifd "
                   "counters).", (
    Figure("index", int, "0 is MAIN; MEMORY connections follow.", REQUIRED),
    Figure("role", str, "`main` or `memory`.", REQUIRED),
    Figure("bytes", int, "Page bytes acknowledged on this connection.", REQUIRED,
           unit="bytes"),
    Figure("chunks", int, "MEMORY requests acknowledged on this connection.", REQUIRED),
    Figure("lost", str, "Why the connection was lost mid-migration."),
))

RECONNECTING = Group("ReconnectingFigures", "A connection lost and being re-dialled "
                     "(protocol version 3).", (
    Figure("index", int, "Its place: 0 MAIN, 1.. MEMORY; FAULT after them.", REQUIRED),
    Figure("role", str, "`main`, `memory` or `fault`.", REQUIRED),
    Figure("cause", str, "Why it was lost.", REQUIRED),
    Figure("for_s", float, "How long it has been down.", REQUIRED, unit="s"),
))

STALL = Group("StallFigures", "The last stall of pre-copy found (stall detection, "
              "`stall_timeout_s`).", (
    Figure("action", str, "The stall_strategy applied: `postcopy`, `force-complete`, "
           "`cancel` or `none` (only reported).", REQUIRED),
    Figure("stalled_s", float, "Seconds without progress when it was found.", REQUIRED,
           unit="s"),
    Figure("elapsed_s", float, "Seconds into the migration when it was found.", REQUIRED,
           unit="s"),
    Figure("bytes_remaining", int, "Bytes left after the last pass.", REQUIRED, unit="bytes"),
    Figure("best_bytes_remaining", int, "Bytes left when progress was last seen.", REQUIRED,
           unit="bytes"),
    Figure("stalls", int, "Stalls found so far (more than one only with `none`).", REQUIRED),
    Figure("reason", str, "The stall, in one line.", REQUIRED),
))

POSTCOPY = Group("PostcopyFigures", "Post-copy: the pages the destination was owed at the "
                 "switch, and the faults answered.", (
    Figure("pages", int, "Pages owed at the switch to post-copy.", REQUIRED, unit="pages",
           prometheus=("vmig_migration_postcopy_pages", "gauge")),
    Figure("pages_left", int, "Owed pages still missing.", unit="pages",
           prometheus=("vmig_migration_postcopy_pages_left", "gauge")),
    Figure("faults_served", int, "Page faults of the guest answered (its requests for a "
           "missing page).", 0, libvirt=("MEMORY_POSTCOPY_REQS",),
           prometheus=("vmig_migration_postcopy_faults", "counter")),
    # Receiver: the remote faults' service time, from the fault read off userfaultfd to
    # the page installed and the vCPU woken (vmig.migration.faultstats).
    Figure("fault_latency_count", int, "Receiver: remote faults timed (a vCPU's fault on an "
           "owed page, until the page was installed by the fault's answer or the push); "
           "the sum of `fault_latency_dist`.", unit="faults"),
    Figure("fault_latency_dist", int, "Receiver: the remote faults' service times as "
           "QEMU's `postcopy-latency-dist`: element i counts those in [2^i, 2^(i+1)) µs, "
           "i = 0 .. 32 (element 0 also those under 1 µs, element 32 all from 2^32 µs); "
           "empty on the sender.", (), many=True, unit="faults",
           prometheus=("vmig_migration_postcopy_fault_latency_seconds", "histogram")),
    Figure("fault_latency_p50_ms", float, "Receiver: median service time of a remote fault "
           "(nearest rank, over a uniform sample of at most 8192 faults).", unit="ms"),
    Figure("fault_latency_p99_ms", float, "Receiver: 99th percentile of the service time "
           "of a remote fault (as p50).", unit="ms"),
    Figure("fault_latency_max_ms", float, "Receiver: the longest service time of a remote "
           "fault (exact).", unit="ms",
           prometheus=("vmig_migration_postcopy_fault_latency_max_seconds", "gauge")),
    Figure("fault_latency_sum_ms", float, "Receiver: the service times of the remote faults "
           "added up (over `fault_latency_count`: QEMU's `postcopy-latency`, the mean).",
           unit="ms"),
    Figure("blocktime_ms", float, "Receiver: the time vCPUs waited for pages: the union of "
           "the intervals in which at least one remote fault waited (QEMU's "
           "`postcopy-blocktime` counts only the time all vCPUs waited at once).", unit="ms",
           prometheus=("vmig_migration_postcopy_blocktime_seconds", "gauge")),
    Figure("vcpu_blocktime_ms", float, "Receiver: per vCPU (by index), the time it waited "
           "for remote pages, from its fault read to its page installed (QEMU's "
           "`postcopy-vcpu-blocktime`); empty where userfaultfd cannot name the faulting "
           "thread (UFFD_FEATURE_THREAD_ID), and on the sender.", (), many=True, unit="ms"),
))

#: The metrics' view: a send's summary, and vm.migration-info without `INFO_FIGURES`.
SUMMARY_FIGURES: tuple[Figure, ...] = (
    Figure("role", str, "`send` (this VMM is the source) or `receive`.", REQUIRED),
    Figure("status", str, "As QEMU's query-migrate: `setup`, `active`, `postcopy-active`, "
           "`postcopy-paused`, `completed`, `cancelled` or `failed`.", REQUIRED),
    Figure("phase", str, "Sender: `connecting`, `precopy`, `switchover` (guest paused), "
           "`completing` (COMPLETE sent: no cancel any more); receiver: `listening`, "
           "`receiving`; both: `postcopy`, `postcopy-paused` (a connection is down; both "
           "wait for it), `completed`, `cancelled`, `failed`.", REQUIRED),
    Figure("migration_id", str, "The migration's random id (hex), the same on both sides; "
           "null while listening."),
    Figure("peer", str, "The destination's URL (sender) or the source's address "
           "(receiver)."),
    Figure("local", bool, "Memory was handed over by file descriptor.", False),
    Figure("progress_percent", float, "How much of the migration is done, 0 to 100: "
           "`data_processed_bytes` over `data_total_bytes`, never lower than a value "
           "reported before (the guest's dirtying grows the total), 100 only once "
           "completed; 0 while a sender sets up; null while unknown (a receiver before the "
           "end).", unit="%",
           prometheus=("vmig_migration_progress_percent", "gauge")),
    Figure("elapsed_ms", float, "Since the migration began (receiver: since the source's "
           "MAIN connection was admitted); stops at the end.", REQUIRED, unit="ms",
           libvirt=("TIME_ELAPSED",),
           prometheus=("vmig_migration_elapsed_seconds", "gauge")),
    Figure("expected_remaining_ms", float, "Sender: an estimate of the time left, "
           "`data_remaining_bytes` at the measured bandwidth (the guest may dirty more "
           "meanwhile); 0 once completed.", unit="ms", libvirt=("TIME_REMAINING",),
           prometheus=("vmig_migration_expected_remaining_seconds", "gauge")),
    Figure("setup_ms", float, "Until the first memory was acknowledged (connections, "
           "handshakes, START, CONFIG).", unit="ms", libvirt=("SETUP_TIME",),
           prometheus=("vmig_migration_setup_seconds", "gauge")),
    Figure("downtime_ms", float, "Sender: from pausing the guest to the destination's "
           "acknowledgement of COMPLETE; null when the guest was paused throughout, or not "
           "reached.", unit="ms", libvirt=("DOWNTIME",),
           prometheus=("vmig_migration_downtime_seconds", "gauge")),
    Figure("expected_downtime_ms", float, "The pause a switch-over now would take (last "
           "pages + fixed costs).", unit="ms",
           prometheus=("vmig_migration_expected_downtime_seconds", "gauge")),
    Figure("paused", bool, "The VM was paused when the migration began and stays paused at "
           "the destination (no guest downtime).", False),
    Figure("memory_bytes", int, "Guest RAM being migrated (0 until known).", REQUIRED,
           unit="bytes", libvirt=("MEMORY_TOTAL",),
           prometheus=("vmig_migration_memory_bytes", "gauge")),
    Figure("data_bytes", int, "Sender: guest memory that held data when the migration "
           "began (what the first pass sends).", unit="bytes",
           prometheus=("vmig_migration_data_bytes", "gauge")),
    Figure("data_total_bytes", int, "Sender: `data_processed_bytes` + "
           "`data_remaining_bytes`: the memory that held data, and the pages the guest "
           "dirtied since (it grows while pre-copy chases a busy guest).", unit="bytes",
           libvirt=("DATA_TOTAL",),
           prometheus=("vmig_migration_data_total_bytes", "gauge")),
    Figure("data_processed_bytes", int, "Guest memory dealt with so far: page bytes "
           "acknowledged plus the zero pages found.", 0, unit="bytes",
           libvirt=("DATA_PROCESSED", "MEMORY_PROCESSED"),
           prometheus=("vmig_migration_data_processed_bytes", "counter")),
    Figure("data_remaining_bytes", int, "Sender: memory still to deal with: the data "
           "before the first pass, then what is left of each pass, then the pages post-copy "
           "still owes; 0 once completed.", unit="bytes",
           libvirt=("DATA_REMAINING", "MEMORY_REMAINING"),
           prometheus=("vmig_migration_data_remaining_bytes", "gauge")),
    Figure("bytes_transferred", int, "Guest memory bytes acknowledged so far (normal "
           "pages' bytes).", REQUIRED, unit="bytes", libvirt=("MEMORY_NORMAL_BYTES",),
           prometheus=("vmig_migration_bytes", "counter")),
    Figure("bytes_remaining", int, "Sender: bytes left in the current pass (data, then "
           "dirty pages).", unit="bytes",
           prometheus=("vmig_migration_remaining_bytes", "gauge")),
    Figure("precopy_bytes", int, "Sender: bytes sent while the guest ran (a receiver does "
           "not know when it paused).", unit="bytes",
           prometheus=("vmig_migration_precopy_bytes", "counter")),
    Figure("switchover_bytes", int, "Sender: bytes sent while it was paused.", unit="bytes",
           prometheus=("vmig_migration_switchover_bytes", "counter")),
    Figure("normal_pages", int, "Pages transferred with their bytes.", 0, unit="pages",
           libvirt=("MEMORY_NORMAL",),
           prometheus=("vmig_migration_normal_pages", "counter")),
    Figure("zero_pages", int, "Pages skipped or sent as zero ranges (QEMU's `duplicate`).",
           0, unit="pages", libvirt=("MEMORY_CONSTANT",),
           prometheus=("vmig_migration_zero_pages", "counter")),
    Figure("wire_bytes", int, "Page bytes on the wire: as `bytes_transferred`, but "
           "compressed chunks count as compressed.", 0, unit="bytes",
           prometheus=("vmig_migration_wire_bytes", "counter")),
    Figure("compressed_bytes", int, "Bytes on the wire of the chunks sent compressed (zstd; "
           "a chunk that would not shrink goes as it is).", 0, unit="bytes",
           libvirt=("COMPRESSION_BYTES",),
           prometheus=("vmig_migration_compressed_bytes", "counter")),
    Figure("compressed_pages", int, "Pages sent in compressed chunks.", 0, unit="pages",
           libvirt=("COMPRESSION_PAGES",),
           prometheus=("vmig_migration_compressed_pages", "counter")),
    Figure("pages_per_s", float, "normal_pages / elapsed time.", unit="pages/s"),
    Figure("iterations", int, "Sender: memory passes sent (pre-copy iterations plus the "
           "final one); null on the receiver.", libvirt=("MEMORY_ITERATION",),
           prometheus=("vmig_migration_iterations", "counter")),
    Figure("throughput_bytes_per_s", float, "bytes_transferred / elapsed time.",
           unit="bytes/s",
           prometheus=("vmig_migration_throughput_bytes_per_second", "gauge")),
    Figure("bandwidth_bytes_per_s", float, "Sender: the send rate measured per iteration "
           "(smoothed).", unit="bytes/s", libvirt=("MEMORY_BPS",),
           prometheus=("vmig_migration_bandwidth_bytes_per_second", "gauge")),
    Figure("dirty_rate_bytes_per_s", float, "Sender: how fast the guest dirties memory.",
           unit="bytes/s",
           prometheus=("vmig_migration_dirty_rate_bytes_per_second", "gauge")),
    Figure("dirty_rate_pages_per_s", float, "Sender: how fast the guest dirties memory, in "
           "pages.", unit="pages/s", libvirt=("MEMORY_DIRTY_RATE",)),
    Figure("max_bandwidth_bytes_per_s", int, "Sender: the bandwidth cap; null for none.",
           unit="bytes/s",
           prometheus=("vmig_migration_max_bandwidth_bytes_per_second", "gauge")),
    Figure("throttle_percent", int, "Sender: how much auto-converge slows the guest's vCPUs "
           "now (0: not at all).", unit="%", libvirt=("AUTO_CONVERGE_THROTTLE",),
           prometheus=("vmig_migration_throttle_percent", "gauge")),
    Figure("parameters", dict, "Sender: the parameters vm.migration-set-parameters may "
           "change, with the values now in force.",
           examples=({"downtime_ms": 300, "timeout_s": 3600, "max_bandwidth": "50M",
                      "auto_converge": False, "auto_converge_initial": 20,
                      "auto_converge_step": 10, "auto_converge_max": 99},)),
    Figure("postcopy", POSTCOPY, "Once switched to post-copy: the pages owed and the "
           "faults answered; null before (and without post-copy)."),
    Figure("connections", int, "Connections the migration opened.", REQUIRED,
           prometheus=("vmig_migration_connections", "gauge")),
    Figure("connections_lost", int, "Data connections lost mid-migration (their chunks "
           "went over the others).", 0,
           prometheus=("vmig_migration_connections_lost", "gauge")),
    Figure("reconnecting", RECONNECTING, "Connections lost and being re-dialled now, with "
           "the cause (protocol version 3).", (), many=True),
    Figure("reconnects", int, "Connections resumed so far.", 0,
           prometheus=("vmig_migration_reconnects", "gauge")),
    Figure("per_connection", CONNECTION, "Bytes and chunks per connection (MAIN first).",
           (), many=True),
    Figure("memory_verified", bool, "Both sides' memory digests matched.", False),
    Figure("heartbeat_at_pause", int, "The guest's heartbeat when the source paused it; "
           "the destination goes on from it."),
    Figure("receiver_state", str, "Receiver: the protocol state of the main connection."),
    Figure("switchover", str, "Sender: why pre-copy ended: `converged`, "
           "`postcopy-after-iterations`, `timeout`, `stall`, `start-postcopy` or "
           "`force-complete` (commanded); null before, and for a local migration."),
    Figure("stall", STALL, "Sender: the last stall of pre-copy found, and what was done; "
           "null if none."),
    Figure("warnings", str, "Things that went less well than asked (fewer connections, a "
           "lost connection, a downtime over the budget).", (), many=True),
    Figure("error", str, "Why it failed or was cancelled.", libvirt=("ERRMSG",)),
)

#: What vm.migration-info adds to the view (the controller knows them).
INFO_FIGURES: tuple[Figure, ...] = (
    Figure("active", bool, "A migration is running now; false: these are the last one's "
           "final figures.", REQUIRED),
    Figure("outcome", str, "How it ended, once this side has settled (the VM handed over, "
           "or running here again): `completed`, `cancelled` or `failed` (then `error` is "
           "the one-line reason); null while it runs.", libvirt=("SUCCESS",)),
)


def _kind_name(figure: Figure) -> str:
    kind = figure.kind
    name = kind.name if isinstance(kind, Group) else {dict: "object"}.get(kind, kind.__name__)
    return f"list of {name}" if figure.many else name


def _metric(figure: Figure) -> str:
    """The metric as a scrape shows it (prometheus_client ends a counter in `_total`)."""
    if figure.prometheus is None:
        return ""
    name, kind = figure.prometheus
    if kind == "histogram":
        return f"`{name}` (histogram)"
    return f"`{name}_total`" if kind == "counter" else f"`{name}`"


def _rows(figures: tuple[Figure, ...], prefix: str = "") -> list[str]:
    rows = []
    for figure in figures:
        libvirt = ", ".join(f"`{name}`" for name in figure.libvirt)
        kind = _kind_name(figure) + (" or null" if figure.nullable else "")
        meaning = figure.help.replace("|", "\\|")
        rows.append(f"| `{prefix}{figure.name}` | {kind} | {figure.unit} | {libvirt} | "
                    f"{_metric(figure)} | {meaning} |")
        if isinstance(figure.kind, Group) and not figure.many and any(
                f.libvirt or f.prometheus for f in figure.kind.figures):
            rows.extend(_rows(figure.kind.figures, prefix=f"{prefix}{figure.name}."))
    return rows


def render_markdown() -> str:
    """The table of docs/migration-info.md: every figure of vm.migration-info, its type and
    unit, libvirt's virDomainGetJobStats fields it answers and its Prometheus metric."""
    header = ["| figure | type | unit | libvirt `VIR_DOMAIN_JOB_*` | Prometheus | meaning |",
              "|---|---|---|---|---|---|"]
    return "\n".join(header + _rows(SUMMARY_FIGURES + INFO_FIGURES)) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
