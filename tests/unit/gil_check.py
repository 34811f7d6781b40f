"""Does a call let go of the GIL? Run it next to a Python thread that spins."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def spinner_pause_during(fn: Callable[[], object]) -> tuple[float, float]:
    """Call `fn` while another thread spins in Python: (seconds it took, the spinner's
    longest pause between two turns of its loop during the call).

    A call that holds the GIL stops the spinner for about its whole length; one that
    releases it leaves the spinner pausing no longer than a scheduler slice or a GIL
    switch interval (5 ms).
    """
    stop = threading.Event()
    state = {"turns": 0, "last": time.perf_counter(), "gap": 0.0, "measuring": False}

    def spin() -> None:
        while not stop.is_set():
            now = time.perf_counter()
            if state["measuring"] and now - state["last"] > state["gap"]:
                state["gap"] = now - state["last"]
            state["last"] = now
            state["turns"] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        while state["turns"] < 1000:  # spinning
            time.sleep(0.001)
        state["measuring"] = True
        began = time.perf_counter()
        fn()
        seconds = time.perf_counter() - began
        turns = state["turns"]
        while state["turns"] < turns + 2:  # the spinner ends the pause it was in
            time.sleep(0.0005)
        state["measuring"] = False
    finally:
        stop.set()
        thread.join()
    return seconds, float(state["gap"])
