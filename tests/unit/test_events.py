"""The event bus (vmig.api.events) and the migration metrics' observers, without a VMM."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from vmig.api.events import EventBus, EventFile
from vmig.errors import ConfigError
from vmig.migration.metrics import MigrationMetrics, Phase


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_events_reach_listeners_in_order_with_both_clocks(tmp_path: Path) -> None:
    clock = FakeClock()
    bus = EventBus(clock)
    heard: list[Any] = []
    bus.add_listener(heard.append)
    bus.add_listener(EventFile(str(tmp_path / "events")))
    clock.now += 1.5
    bus.publish("vm", "booted", {"cpus": 2})
    bus.publish("vm", "paused")
    bus.close()
    lines = [json.loads(line) for line in (tmp_path / "events").read_text().splitlines()]
    assert [(e["source"], e["event"], e["properties"]) for e in lines] == [
        ("vm", "booted", {"cpus": 2}), ("vm", "paused", None)]
    assert lines[0]["uptime_s"] == 1.5 and lines[0]["timestamp"].endswith("+00:00")
    assert [e.seq for e in heard] == [1, 2]
    assert heard[0].to_sse().startswith("id: 1\nevent: vm.booted\ndata: {")


def test_an_unusable_event_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot open event monitor file {tmp_path}/no/x: "
                                          "No such file or directory"):
        EventFile(str(tmp_path / "no" / "x"))


def test_a_failing_listener_does_not_stop_the_others() -> None:
    bus = EventBus()
    heard: list[Any] = []

    def broken(event: Any) -> None:
        raise OSError("disk full")

    bus.add_listener(broken)
    bus.add_listener(heard.append)
    bus.publish("vm", "paused")
    assert len(heard) == 1


def test_streams_get_events_from_any_thread_drop_the_oldest_and_unsubscribe() -> None:
    bus = EventBus()

    async def scenario() -> None:
        stream = bus.stream(asyncio.get_running_loop(), maxsize=3)
        assert bus.streams == 1
        publishers = [threading.Thread(target=bus.publish, args=("vm", f"e{i}"))
                      for i in range(5)]
        for thread in publishers:
            thread.start()
            thread.join()
        await asyncio.sleep(0)  # the loop runs the deliveries
        got = [await stream.get() for _ in range(3)]
        assert [e.event for e in got if e] == ["e2", "e3", "e4"]  # a slow client loses the oldest
        assert stream.dropped == 2
        stream.close()
        stream.close()  # idempotent
        assert bus.streams == 0
        bus.publish("vm", "unheard")  # nothing is queued for a closed stream

        follower = bus.stream(asyncio.get_running_loop())
        bus.end_streams()  # the VMM stops: every stream ends
        assert await follower.get() is None
        late = bus.stream(asyncio.get_running_loop())  # and a new one ends at once
        assert await late.get() is None and bus.streams == 0

    asyncio.run(scenario())


def test_a_stream_whose_loop_is_gone_is_forgotten() -> None:
    bus = EventBus()
    loop = asyncio.new_event_loop()
    bus.stream(loop)
    loop.close()
    bus.publish("vm", "paused")
    assert bus.streams == 0


# --- MigrationMetrics' observers -------------------------------------------------------------


def observed(role: str) -> tuple[MigrationMetrics, list[tuple[str, dict[str, Any]]], FakeClock]:
    clock = FakeClock()
    metrics = MigrationMetrics(role, clock)
    heard: list[tuple[str, dict[str, Any]]] = []
    metrics.subscribe(lambda event, properties: heard.append((event, properties)))
    return metrics, heard, clock


def test_a_send_is_heard_step_by_step_and_ends_once_with_its_last_figures() -> None:
    metrics, heard, clock = observed("send")
    metrics.set_phase(Phase.PRECOPY)  # the sender's start is announced by the controller
    metrics.update(dirty_rate_bytes_per_s=1e6, bytes_remaining=4096)
    clock.now += 2
    figures = metrics.iteration_done(1, 8 << 20, 0.5, "continue", "over budget")
    assert figures == {"iteration": 1, "bytes": 8 << 20, "seconds": 0.5,
                       "rate_bytes_per_s": 16 << 20, "dirty_rate_bytes_per_s": 1e6,
                       "bytes_remaining": 4096, "elapsed_s": 2.0, "decision": "continue",
                       "reason": "over budget"}
    metrics.set_phase(Phase.SWITCHOVER)
    clock.now += 0.1
    metrics.set_phase(Phase.COMPLETED)  # the sender ends the phase first ...
    metrics.end_downtime()  # ... then measures the downtime ...
    metrics.finish(Phase.COMPLETED)  # ... and the end is announced with it
    metrics.finish(Phase.FAILED, "late")  # the first ending stands, and is heard once
    assert [event for event, _ in heard] == ["iteration", "switchover", "completed"]
    assert heard[0][1]["last_iteration"] == figures and heard[0][1]["phase"] == "precopy"
    assert heard[-1][1]["downtime_ms"] == pytest.approx(100.0)
    assert heard[-1][1] == metrics.view() and metrics.error is None


def test_a_receive_is_heard_from_the_source_connecting_to_its_failure() -> None:
    metrics, heard, _ = observed("receive")
    metrics.set_phase(Phase.RECEIVING)
    metrics.set_phase(Phase.POSTCOPY)
    metrics.finish(Phase.FAILED, "the source went away")
    assert [event for event, _ in heard] == ["started", "postcopy", "failed"]
    assert heard[-1][1]["error"] == "the source went away"
    assert heard[-1][1]["status"] == "failed"


def test_a_broken_observer_does_not_break_the_migration() -> None:
    metrics, heard, _ = observed("send")

    def broken(event: str, properties: dict[str, Any]) -> None:
        raise RuntimeError("observer bug")

    metrics.subscribe(broken)
    metrics.finish(Phase.CANCELLED, "cancelled by the operator")
    assert heard[-1][0] == "cancelled"
