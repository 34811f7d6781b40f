"""Post-copy's background push at the destination: at most `PUSH_INSTALLERS` requests are
received and installed at once, and each one's pages land (real userfaultfd)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from vmig.memory import GuestMemory
from vmig.migration.memory_writer import install_memory
from vmig.migration.postcopy import PUSH_INSTALLERS, PostcopyService
from vmig.proto.events import MemoryRequest
from vmig.ranges import RangeTable
from vmig.units import PAGE_SIZE, MiB

CONNECTIONS = 6
PAGES_EACH = 4


class IdleFaultChannel:
    """A FAULT connection nobody answers on: the rx thread waits until shut down."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def next_pages(self) -> None:
        self._closed.wait(10)
        return None

    def shutdown(self) -> None:
        self._closed.set()


class SlowDataChannel:
    """One data connection whose payload takes a while to arrive; counts how many
    connections are receiving at the same moment."""

    receiving = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, fill: int) -> None:
        self._fill = fill
        self._scratch = bytearray()

    def scratch(self, size: int) -> bytearray:
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        return self._scratch

    def receive_payload(self, views: Sequence[memoryview]) -> None:
        cls = type(self)
        with cls.lock:
            cls.receiving += 1
            cls.most = max(cls.most, cls.receiving)
        time.sleep(0.05)
        for view in views:
            view[:] = bytes([self._fill]) * len(view)
        with cls.lock:
            cls.receiving -= 1


def test_push_installs_at_most_push_installers_requests_at_once() -> None:
    assert 1 <= PUSH_INSTALLERS < CONNECTIONS
    size = CONNECTIONS * PAGES_EACH * PAGE_SIZE
    with GuestMemory.create(max(size, MiB)) as memory:
        failures: list[str] = []
        service = PostcopyService(memory, RangeTable.full(size), IdleFaultChannel(),
                                  failures.append)
        service.start()
        try:
            def push(index: int) -> None:
                gpa = index * PAGES_EACH * PAGE_SIZE
                request = MemoryRequest(RangeTable([(gpa, PAGES_EACH * PAGE_SIZE)]),
                                        PAGES_EACH * PAGE_SIZE)
                install_memory(SlowDataChannel(index + 1), service, request)

            threads = [threading.Thread(target=push, args=(i,)) for i in range(CONNECTIONS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert not any(thread.is_alive() for thread in threads)
            assert SlowDataChannel.most == PUSH_INSTALLERS
            assert service.pages_left == 0
            for index in range(CONNECTIONS):
                gpa = index * PAGES_EACH * PAGE_SIZE
                with memory.view(gpa, PAGES_EACH * PAGE_SIZE) as view:
                    assert bytes(view) == bytes([index + 1]) * len(view)
        finally:
            service.close()
        assert failures == []
