"""The migration's figures, defined once (vmig.migration.figures): the metrics' view, the
API models, /metrics and docs/migration-info.md agree, and progress never goes backwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vmig.api.models import MigrationInfo, MigrationSummary
from vmig.api.prometheus import _MIGRATION_FIGURES, _POSTCOPY_FIGURES
from vmig.migration.figures import (
    INFO_FIGURES,
    POSTCOPY,
    REQUIRED,
    SUMMARY_FIGURES,
    Group,
    render_markdown,
)
from vmig.migration.metrics import MigrationMetrics, Phase
from vmig.units import PAGE_SIZE

DOC = Path(__file__).resolve().parents[2] / "docs" / "migration-info.md"
NAMES = [figure.name for figure in SUMMARY_FIGURES]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sender(data_pages: int = 1000) -> tuple[MigrationMetrics, FakeClock]:
    clock = FakeClock()
    metrics = MigrationMetrics("send", clock)
    metrics.update(memory_bytes=4 * data_pages * PAGE_SIZE, data_bytes=data_pages * PAGE_SIZE)
    metrics.set_phase(Phase.PRECOPY)
    return metrics, clock


def test_docs_contain_exactly_the_generated_table() -> None:
    table = render_markdown()
    text = DOC.read_text(encoding="utf-8")
    assert table in text, ("docs/migration-info.md is out of date: paste "
                           "`python -m vmig.migration.figures` into it")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [line for line in table.splitlines() if line.startswith("| `")]
    for name in ("TIME_ELAPSED", "TIME_REMAINING", "DATA_TOTAL", "DATA_PROCESSED",
                 "DATA_REMAINING", "MEMORY_CONSTANT", "MEMORY_NORMAL", "MEMORY_NORMAL_BYTES",
                 "MEMORY_BPS", "MEMORY_DIRTY_RATE", "MEMORY_ITERATION", "MEMORY_POSTCOPY_REQS",
                 "COMPRESSION_BYTES", "COMPRESSION_PAGES", "DOWNTIME", "SETUP_TIME"):
        assert f"`{name}`" in table, name


def test_the_view_is_exactly_the_figures_in_their_order() -> None:
    for metrics in (sender()[0], MigrationMetrics("receive")):
        assert list(metrics.view()) == NAMES
    metrics, _ = sender()
    metrics.update(postcopy_pages=10, postcopy_pages_left=4)
    assert list(metrics.view()["postcopy"]) == [f.name for f in POSTCOPY.figures]


def test_the_api_models_are_made_from_the_figures() -> None:
    assert list(MigrationSummary.model_fields) == NAMES
    assert list(MigrationInfo.model_fields) == NAMES + [f.name for f in INFO_FIGURES]
    for figure in SUMMARY_FIGURES:
        field = MigrationSummary.model_fields[figure.name]
        assert field.description.startswith(figure.help), figure.name
        assert field.is_required() == (figure.default is REQUIRED), figure.name
        for name in figure.libvirt:
            assert f"VIR_DOMAIN_JOB_{name}" in field.description
    postcopy = MigrationSummary.model_fields["postcopy"].annotation
    assert "PostcopyFigures" in str(postcopy)  # the nested object the old model had lost


def test_a_view_validates_against_the_models_with_nothing_left_over() -> None:
    metrics, clock = sender()
    metrics.open_connections(["main", "memory"])
    metrics.transferred(1, 8 * PAGE_SIZE, zero_pages=2)
    metrics.update(postcopy_pages=10, postcopy_pages_left=4)
    metrics.stalled({"action": "none", "stalled_s": 1.0, "elapsed_s": 2.0,
                     "bytes_remaining": 1, "best_bytes_remaining": 1, "stalls": 1,
                     "reason": "stalled"})
    metrics.reconnecting(1, "memory", "reset")
    clock.now += 1
    info = MigrationInfo.model_validate({**metrics.view(), "active": True, "outcome": None})
    assert not info.model_extra
    assert info.model_dump(mode="json") == {**metrics.view(), "active": True, "outcome": None}


def test_prometheus_exports_the_figures_that_name_a_metric() -> None:
    exported = {key: name for key, name, *_ in _MIGRATION_FIGURES}
    assert exported == {f.name: f.prometheus[0] for f in SUMMARY_FIGURES if f.prometheus}
    assert exported["bytes_transferred"] == "vmig_migration_bytes"
    assert exported["progress_percent"] == "vmig_migration_progress_percent"
    seconds = {key: divisor for key, _, _, _, divisor in _MIGRATION_FIGURES}
    assert seconds["elapsed_ms"] == 1000 and seconds["bytes_transferred"] == 1
    assert {key for key, *_ in _POSTCOPY_FIGURES} == {"pages", "pages_left", "faults_served",
                                                      "fault_latency_max_ms", "blocktime_ms"}


def test_every_group_is_documented_by_its_model() -> None:
    groups = [f.kind for f in SUMMARY_FIGURES if isinstance(f.kind, Group)]
    assert {g.name for g in groups} == {"PostcopyFigures", "ReconnectingFigures",
                                        "ConnectionFigures", "StallFigures"}


# --- the libvirt figures -----------------------------------------------------------------


def test_data_figures_before_during_and_after() -> None:
    metrics, clock = sender(data_pages=1000)
    view = metrics.view()
    # before the first pass: all the data is to send
    assert (view["data_processed_bytes"], view["data_remaining_bytes"],
            view["data_total_bytes"], view["progress_percent"]) == (0, 1000 * PAGE_SIZE,
                                                                    1000 * PAGE_SIZE, 0.0)
    metrics.update(bytes_remaining=1000 * PAGE_SIZE)
    metrics.transferred(0, 300 * PAGE_SIZE, covered=400 * PAGE_SIZE, zero_pages=100)
    metrics.update(bandwidth_bytes_per_s=100 * PAGE_SIZE, dirty_rate_bytes_per_s=50 * PAGE_SIZE)
    view = metrics.view()
    assert view["data_processed_bytes"] == 400 * PAGE_SIZE  # 300 sent + 100 found zero
    assert view["data_remaining_bytes"] == 600 * PAGE_SIZE
    assert view["data_total_bytes"] == 1000 * PAGE_SIZE
    assert view["progress_percent"] == 40.0
    assert view["expected_remaining_ms"] == 6000.0  # 600 pages at 100 pages/s
    assert view["dirty_rate_pages_per_s"] == 50.0
    assert (view["normal_pages"], view["zero_pages"]) == (300, 100)
    metrics.update(postcopy_pages=200, postcopy_pages_left=50)  # switched to post-copy
    assert metrics.view()["data_remaining_bytes"] == 50 * PAGE_SIZE
    clock.now += 5
    metrics.finish(Phase.COMPLETED)
    view = metrics.view()
    assert (view["data_remaining_bytes"], view["expected_remaining_ms"],
            view["progress_percent"]) == (0, 0.0, 100.0)


def test_a_sender_setting_up_reports_no_progress_yet_not_an_unknown_one() -> None:
    """Between the send's 202 and the memory measured: 0%, never null (a bar polled from
    the first moment; CI once saw null then 0.0)."""
    metrics = MigrationMetrics("send", FakeClock())
    assert metrics.view()["progress_percent"] == 0.0
    metrics.update(memory_bytes=4000 * PAGE_SIZE, data_bytes=1000 * PAGE_SIZE)
    metrics.set_phase(Phase.PRECOPY)
    assert metrics.view()["progress_percent"] == 0.0


def test_a_receiver_knows_no_progress_until_it_completed() -> None:
    metrics = MigrationMetrics("receive")
    metrics.set_phase(Phase.RECEIVING)
    metrics.transferred(1, 64 * PAGE_SIZE)
    view = metrics.view()
    assert view["data_processed_bytes"] == 64 * PAGE_SIZE
    assert view["data_remaining_bytes"] is None and view["progress_percent"] is None
    assert view["expected_remaining_ms"] is None and view["dirty_rate_pages_per_s"] is None
    metrics.finish(Phase.COMPLETED)
    assert metrics.view()["progress_percent"] == 100.0


def test_compressed_chunks_are_counted() -> None:
    metrics, _ = sender()
    metrics.transferred(0, 16 * PAGE_SIZE, wire=2 * PAGE_SIZE)  # shrank: went compressed
    metrics.transferred(0, 8 * PAGE_SIZE, wire=8 * PAGE_SIZE)  # did not: went as it was
    metrics.transferred(0, 4 * PAGE_SIZE)  # no compression asked for
    view = metrics.view()
    assert (view["compressed_bytes"], view["compressed_pages"]) == (2 * PAGE_SIZE, 16)
    assert view["wire_bytes"] == 14 * PAGE_SIZE and view["normal_pages"] == 28


# --- progress_percent never goes backwards -----------------------------------------------


def raw_ratio(view: dict[str, Any]) -> float:
    return view["data_processed_bytes"] / view["data_total_bytes"] * 100


def test_progress_holds_when_the_guest_dirties_more_than_was_left() -> None:
    metrics, _ = sender(data_pages=1000)
    metrics.update(bytes_remaining=1000 * PAGE_SIZE)
    metrics.transferred(0, 1000 * PAGE_SIZE)
    metrics.update(bytes_remaining=0)
    assert metrics.view()["progress_percent"] == 99.9  # all sent, not completed yet
    metrics.update(bytes_remaining=2000 * PAGE_SIZE)  # the guest dirtied twice as much
    view = metrics.view()
    assert raw_ratio(view) < 34  # the ratio fell ...
    assert view["progress_percent"] == 99.9  # ... the progress did not


passes = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 5000)), min_size=1, max_size=12)


@given(data_pages=st.integers(1, 5000), passes=passes, zero_share=st.floats(0, 1),
       postcopy=st.booleans())
def test_progress_is_monotone_and_ends_at_100(data_pages: int,
                                              passes: list[tuple[float, int]],
                                              zero_share: float, postcopy: bool) -> None:
    """Passes that send some share of what is left, then find any number of pages dirty
    (more than was left, often): the percentage reported never falls, stays in 0..99.9
    until completed, and is 100 then."""
    metrics, clock = sender(data_pages)
    reported = [metrics.view()["progress_percent"]]
    left = data_pages
    for share, dirtied in passes:
        metrics.update(bytes_remaining=left * PAGE_SIZE)
        sent = int(left * share)
        zero = int(sent * zero_share)
        metrics.transferred(0, (sent - zero) * PAGE_SIZE, covered=sent * PAGE_SIZE,
                            zero_pages=zero)
        clock.now += 0.1
        reported.append(metrics.view()["progress_percent"])
        left = dirtied
        metrics.update(bytes_remaining=left * PAGE_SIZE)
        reported.append(metrics.view()["progress_percent"])
    if postcopy:
        metrics.update(postcopy_pages=left, postcopy_pages_left=left)
        reported.append(metrics.view()["progress_percent"])
        metrics.transferred(0, left * PAGE_SIZE)
        metrics.update(postcopy_pages_left=0)
        reported.append(metrics.view()["progress_percent"])
    assert all(0 <= p <= 99.9 for p in reported), reported
    assert reported == sorted(reported), reported
    metrics.finish(Phase.COMPLETED)
    assert metrics.view()["progress_percent"] == 100.0


def test_a_cancelled_migration_keeps_its_last_progress() -> None:
    metrics, _ = sender(data_pages=100)
    metrics.update(bytes_remaining=100 * PAGE_SIZE)
    metrics.transferred(0, 25 * PAGE_SIZE)
    metrics.finish(Phase.CANCELLED, error="cancelled by the operator")
    assert metrics.view()["progress_percent"] == 25.0
