"""`VmmProcess`: run `vmig vmm` as a subprocess, wait for its API, and always stop it.

Used by `vmig demo` and by the tests. It talks to the VMM only through its
API socket and its exit status, so it imports no VMM code.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

from vmig.api.client import ApiClient
from vmig.errors import ApiError, VmmUnreachableError

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# `vmig vmm` logs READY_MESSAGE on stderr once its API serves (always, whatever the log
# level or --log-file, in the log's format); the mark is what we look for.
READY_MESSAGE = "serving API on {socket_path} (pid {pid})"
READY_MARK = "serving API on "
POLL_S = 0.05


class VmmProcess:
    """A `vmig vmm` child process with its API client. Stop it with `stop()` or `with`."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: str, stderr_path: str,
                 client: ApiClient) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.stderr_path = stderr_path
        self.client = client

    @classmethod
    def start(cls, socket_path: str, args: Sequence[str] = (), *, stderr_path: str,
              ready_timeout: float = READY_TIMEOUT_S, client_timeout: float = 30.0,
              env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> VmmProcess:
        """Start `python -m vmig vmm --api-socket SOCKET ARGS...` and wait until it answers ping.

        `prefix` runs it through another command (e.g. ``ip netns exec NAME``).
        stderr goes to `stderr_path`. Raises VmmUnreachableError (with the
        child's last stderr line) if it exits first or does not answer in time;
        the child is killed in that case.
        """
        command = [*prefix, sys.executable, "-m", "vmig", "vmm", "--api-socket", socket_path,
                   *args]
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        process = cls(proc, socket_path, stderr_path, ApiClient(socket_path, client_timeout))
        try:
            process.wait_ready(ready_timeout)
        except BaseException:
            process.kill()
            raise
        return process

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, object]:
        """Wait for the ready line on stderr, then ping; return ping's reply.

        Waiting for the line rather than pinging in a loop matters: the VMM binds
        its socket before it boots the VM, so an early ping would just sit in the
        socket's backlog.
        """
        deadline = time.monotonic() + timeout
        while READY_MARK not in self.stderr_text():
            code = self.proc.poll()
            if code is not None:
                reason = self.last_stderr_line().removeprefix("vmig: error: ")
                raise VmmUnreachableError(f"vmig vmm exited with status {code} before its "
                                          f"API answered: {reason}")
            if time.monotonic() >= deadline:
                raise VmmUnreachableError(f"vmig vmm did not serve its API on "
                                          f"{self.socket_path} within {timeout:g} s")
            time.sleep(POLL_S)
        return self.client.ping()

    def stderr_text(self) -> str:
        """Everything the child wrote to stderr so far."""
        try:
            with open(self.stderr_path, "rb") as stderr:
                return stderr.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def last_stderr_line(self) -> str:
        lines = [line for line in self.stderr_text().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """vmm.shutdown, then SIGTERM, then SIGKILL, each given `timeout`; return the exit code."""
        if self.running:
            with contextlib.suppress(ApiError):
                self.client.shutdown_vmm()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.running:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.running:
            self.kill()
        self.client.close()
        return self.proc.returncode

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL and reap; the socket file may be left behind (the next VMM replaces it)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        self.client.close()

    def __enter__(self) -> VmmProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

