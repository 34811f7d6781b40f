"""`ApiClient`: talk to a VMM's API over its UNIX socket (used by the CLI and the tests).

Depends on `vmig.errors`, the stdlib and httpx only, so a client never loads
the VMM. Every failure is an `ApiError` whose message is one line: the
server's own `error` for an error status, or "cannot reach VMM at PATH: ..."
(`VmmUnreachableError`) when nothing answers.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from vmig.errors import ApiError, VmmUnreachableError, one_line

API_PREFIX = "/api/v1"
METRICS_URL = "http://localhost/metrics"  # outside API_PREFIX
DEFAULT_TIMEOUT_S = 30.0
LONG_TIMEOUT_S = 600.0  # create/restore/snapshot move the whole guest memory
SEND_TIMEOUT_S = 3600.0  # the VMM's default pre-copy timeout (vm.send-migration's timeout_s)
#: wait_for_migration's polls: the first interval, doubled up to the longest.
FOLLOW_FIRST_S = 0.01
FOLLOW_MAX_S = 0.25
#: migration-info's fields about following a migration, not in its summary.
FOLLOW_ONLY = ("active", "outcome")


class ApiClient:
    """One VMM's API at `socket_path`. Methods return the decoded JSON (or None for 204)."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT_S,
                 long_timeout: float = LONG_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.long_timeout = max(long_timeout, timeout)
        # The host part of the URL is ignored on a UNIX socket; "localhost" keeps httpx happy.
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                                  base_url=f"http://localhost{API_PREFIX}", timeout=timeout)

    def fresh(self) -> ApiClient:
        """A new client for the same VMM, with its own connections: a request cut short
        (Ctrl-C) may leave this client's connection pool mid-request."""
        return ApiClient(self.socket_path, self.timeout, self.long_timeout)

    # --- the endpoints -------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """{"version", "pid"} of the VMM (`timeout`: seconds, instead of the client's)."""
        return self._request("GET", "vmm.ping", timeout=timeout)

    def resources(self) -> dict[str, Any]:
        """fds, threads and TCP listeners of the VMM process."""
        return self._request("GET", "vmm.resources")

    def shutdown_vmm(self) -> None:
        """Ask the VMM process to shut its VM down and exit."""
        self._request("PUT", "vmm.shutdown")

    def info(self) -> dict[str, Any]:
        """The VM's state and counters; {"state": "empty"} when there is no VM."""
        return self._request("GET", "vm.info")

    def create(self, **fields: Any) -> dict[str, Any]:
        """Build and boot a VM; `fields` are VmCreateRequest's (None ones are left out)."""
        body = {name: value for name, value in fields.items() if value is not None}
        return self._request("PUT", "vm.create", body, timeout=self.long_timeout)

    def pause(self) -> None:
        self._request("PUT", "vm.pause")

    def resume(self) -> None:
        self._request("PUT", "vm.resume")

    def shutdown(self) -> None:
        """Stop the VM (the VMM keeps serving)."""
        self._request("PUT", "vm.shutdown")

    def snapshot(self, destination: str) -> None:
        """Write the paused VM to `destination` (file:///DIR or an absolute path)."""
        self._request("PUT", "vm.snapshot", {"destination_url": destination},
                      timeout=self.long_timeout)

    def restore(self, source: str, *, resume: bool = True, memory_file: str | None = None,
                serial_log: str | None = None) -> dict[str, Any]:
        """Start a VM from the snapshot at `source` (file:///DIR or an absolute path)."""
        body: dict[str, Any] = {"source_url": source, "resume": resume}
        if memory_file is not None:
            body["memory_file"] = memory_file
        if serial_log is not None:
            body["serial_log"] = serial_log
        return self._request("PUT", "vm.restore", body, timeout=self.long_timeout)

    def check_guest(self, timeout: float = 60.0) -> dict[str, Any]:
        """Have the guest verify its working set: {"ok", "pages_checked", "bad_pages", ...}."""
        return self._request("PUT", "vm.check-guest", {"timeout": timeout},
                             timeout=timeout + self.timeout)

    def receive_migration(self, url: str, **params: Any) -> dict[str, Any]:
        """Have an empty VMM listen on `url` (tcp:HOST:PORT or unix:PATH); `params` are
        ReceiveMigrationRequest's (None ones are left out). Returns {"receiver_url",
        "token", ...}."""
        body: dict[str, Any] = {"receiver_url": url}
        body.update({name: value for name, value in params.items() if value is not None})
        return self._request("PUT", "vm.receive-migration", body, timeout=self.long_timeout)

    def send_migration(self, *, wait: bool = True, **params: Any) -> dict[str, Any]:
        """Live-migrate the VM; `params` are SendMigrationRequest's (None ones are left out).

        The VMM answers 202 as soon as the migration has started. `wait=False` returns
        that answer: {"id", **migration-info}. `wait=True` follows the migration
        (`wait_for_migration`) and returns its summary once it is over (status
        "completed" or "cancelled"); a failed migration raises ApiError(500, the one-line
        reason), as the VMM's blocking answer did before. (A VMM older than the 202
        answer still blocks, and its answer, the summary, is returned either way.)
        """
        body = {name: value for name, value in params.items() if value is not None}
        # A VMM older than the 202 answer blocks until the migration is over and answers
        # the summary: it may take the pre-copy timeout plus the final copy.
        timeout_s = body.get("timeout_s")
        precopy = float(timeout_s) if isinstance(timeout_s, int | float) else SEND_TIMEOUT_S
        response = self._send("PUT", "vm.send-migration", body,
                              timeout=precopy + self.long_timeout)
        answer = self._decode(response)
        if response.status_code != 202 or not wait:  # (the older VMM's answer: a summary)
            return answer
        return self.wait_for_migration(answer["id"])

    def wait_for_migration(self, migration_id: str, *,
                           on_info: Callable[[dict[str, Any]], None] | None = None,
                           poll_s: float | None = None) -> dict[str, Any]:
        """Follow migration `migration_id` through vm.migration-info until it is over.

        Each poll is a short request of its own, so a long migration never meets an HTTP
        timeout. `on_info(info)` sees every poll; `poll_s` is the interval (default: from
        10 ms up to FOLLOW_MAX_S, so a short migration is not waited on for long).
        Returns the summary (migration-info but FOLLOW_ONLY: the metrics' final view, as
        the "completed" or "cancelled" event carries it); raises ApiError(500, its
        reason) if it failed, ApiError(None, ...) if another migration took its place.
        """
        delay = poll_s or FOLLOW_FIRST_S
        while True:
            info = self.migration_info()
            if info.get("migration_id") != migration_id:
                raise ApiError(None, f"migration {migration_id} is no longer the VMM's last "
                                    f"one (now {info.get('migration_id')}): its outcome is "
                                    "unknown")
            if on_info is not None:
                on_info(info)
            if not info.get("active"):
                break
            time.sleep(delay)
            delay = poll_s or min(delay * 2, FOLLOW_MAX_S)
        if info.get("outcome") == "failed" or info.get("status") == "failed":
            raise ApiError(500, info.get("error") or "migration failed")
        return {name: value for name, value in info.items() if name not in FOLLOW_ONLY}

    def cancel_migration(self) -> dict[str, Any]:
        """Cancel the running migration on this side; its figures once it ended (409 when
        none runs, or when it is past the point of no return)."""
        return self._request("PUT", "vm.cancel-migration", timeout=self.long_timeout)

    def recover_migration(self, destination_url: str | None = None) -> dict[str, Any]:
        """Re-dial the post-copy migration in postcopy-paused now (the source's VMM)."""
        body = {} if destination_url is None else {"destination_url": destination_url}
        return self._request("PUT", "vm.recover-migration", body)

    def migration_set_parameters(self, **changes: Any) -> dict[str, Any]:
        """Change parameters of the send running on this VMM (MigrationSetParametersRequest's
        fields, e.g. downtime_ms=500, max_bandwidth="50M"; None is sent as null, which
        lifts a bandwidth cap). Returns migration-info, with the values now in force
        under "parameters"."""
        return self._request("PUT", "vm.migration-set-parameters", changes)

    def migration_start_postcopy(self) -> dict[str, Any]:
        """Switch the outgoing migration to post-copy now (the source's VMM); its figures."""
        return self._request("PUT", "vm.migration-start-postcopy")

    def migration_force_complete(self) -> dict[str, Any]:
        """Pause and switch the outgoing migration over now (the source's VMM); its figures."""
        return self._request("PUT", "vm.migration-force-complete")

    def migration_info(self) -> dict[str, Any]:
        """Progress of the running (or last) migration, with "active"; 404 if none ran."""
        return self._request("GET", "vm.migration-info")

    def metrics(self) -> str:
        """GET /metrics: the VMM's figures in Prometheus' text format."""
        return self._send("GET", METRICS_URL).text

    @contextlib.contextmanager
    def events(self) -> Iterator[Iterator[dict[str, Any]]]:
        """Follow vmm.events: `with client.events() as events: for event in events: ...`.

        Subscribed once the `with` is entered (the VMM answered): every event from then
        on comes, as the dict the event monitor writes, until the VMM stops or the `with`
        is left (which closes the stream). Blocks between events; no read timeout.
        """
        try:
            with self._http.stream("GET", "vmm.events",
                                   timeout=httpx.Timeout(self.timeout, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, _error_message(response))
                yield _server_sent_events(response)
        except httpx.TransportError as exc:
            raise VmmUnreachableError(
                f"cannot reach VMM at {self.socket_path}: {_reason(exc)}") from None

    # --- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, endpoint: str, body: dict[str, Any] | None = None, *,
                 timeout: float | None = None) -> Any:
        return self._decode(self._send(method, endpoint, body, timeout=timeout))

    def _decode(self, response: httpx.Response) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiError(response.status_code,
                           f"VMM at {self.socket_path} sent a reply that is not JSON") from None

    def _send(self, method: str, endpoint: str, body: dict[str, Any] | None = None, *,
              timeout: float | None = None) -> httpx.Response:
        """The answer to one request (`endpoint` relative to /api/v1, or a whole URL);
        VmmUnreachableError when nothing answers, ApiError for an error status."""
        try:
            response = self._http.request(method, endpoint, json=body,
                                          timeout=timeout or self.timeout)
        except httpx.TimeoutException:
            raise VmmUnreachableError(
                f"VMM at {self.socket_path} did not answer {endpoint} within "
                f"{timeout or self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise VmmUnreachableError(
                f"cannot reach VMM at {self.socket_path}: {_reason(exc)}") from None
        if response.status_code >= 400:
            raise ApiError(response.status_code, _error_message(response))
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _server_sent_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The `data:` of each server-sent event, decoded (comments and ids are skipped)."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


def _reason(exc: httpx.HTTPError) -> str:
    """The OS-level reason behind an httpx transport error, e.g. 'No such file or directory'."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return one_line(exc, type(exc).__name__)


def _error_message(response: httpx.Response) -> str:
    """The server's one-line `error`, or a short stand-in if the body is not ours."""
    try:
        message = response.json().get("error")
    except (ValueError, AttributeError):
        message = None
    if not isinstance(message, str) or not message:
        text = one_line(response.text)[:200]
        message = f"HTTP {response.status_code} {response.reason_phrase}" + (
            f": {text}" if text else "")
    return one_line(message)

