"""What a Machine tells its owner (the API's controller): that the VM failed, or that
its guest halted for good, each once, in one line, to a listener that must not block.

A report that comes before anyone listens (a guest that halts at once, before the
controller has adopted the Machine) is kept and told when the listener is set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Listener", "Reports"]

log = logging.getLogger(__name__)

Listener = Callable[[str], None]


class Reports:
    """The failure and halt listeners of one Machine, and the last halt's reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on_failure: Listener | None = None
        self._on_halt: Listener | None = None
        self.halted: str | None = None  #: why the guest halted for good, if it did
        self._halt_unheard = False  # halted before anyone listened

    def listen(self, on_failure: Listener | None, on_halt: Listener | None) -> None:
        """Set both listeners; a halt that came before is told to `on_halt` now."""
        with self._lock:
            self._on_failure, self._on_halt = on_failure, on_halt
            missed = self.halted if self._halt_unheard else None
            self._halt_unheard = False
        if missed is not None:
            _tell(on_halt, missed, "the guest's halt")

    def failed(self, message: str) -> None:
        """The VM failed (tell once: the caller knows whether it is the first failure)."""
        with self._lock:
            listener = self._on_failure
        _tell(listener, message, "the VM's failure")

    def halted_for_good(self, message: str) -> None:
        with self._lock:
            self.halted = message
            listener = self._on_halt
            self._halt_unheard = listener is None
        _tell(listener, message, "the guest's halt")


def _tell(listener: Listener | None, message: str, what: str) -> None:
    if listener is None:
        return
    try:
        listener(message)
    except Exception:  # a listener's fault must not hide the VM's
        log.exception("reporting %s failed", what)
