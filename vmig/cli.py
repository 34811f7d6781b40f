"""The `vmig` command: `vmm` runs a VMM, `remote` drives one over its API, `demo` shows one.

Every error a user can cause (a bad size, a socket in use, no /dev/kvm, a
request in the wrong state) is printed as one line, ``vmig: error: ...``, with
exit status 1; click's usage errors keep click's format and exit status 2.
With ``--json`` every command but `vmm` (whose output is its log: ``--log-format
json``) prints exactly one JSON object, on one line, on stdout.
Heavy modules (the VMM, uvicorn) are imported only by the commands that need them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click

from vmig import __version__
from vmig.api.client import ApiClient
from vmig.api.process import READY_MESSAGE
from vmig.config import BOOT_CMDLINE_HELP, BOOT_IMAGE_HELP, VmConfig
from vmig.errors import SnapshotError, VmigError, VmmUnreachableError, one_line
from vmig.guest.layout import MAX_CPUS
from vmig.logs import FORMATS, open_log_file
from vmig.logs import configure as configure_logging
from vmig.migration.params import (
    CHANGEABLE_PARAMETERS,
    RECEIVE_PARAMETERS,
    SEND_PARAMETERS,
    Param,
    parameter,
)

F = TypeVar("F", bound=Callable[..., Any])

LOG_LEVELS = ("debug", "info", "warning", "error")
WAIT_POLL_S = 0.1  # `remote wait`: how often an absent VMM is asked again


class CliError(click.ClickException):
    """A VmigError on its way out: one line on stderr, exit status 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"vmig: error: {self.format_message()}", err=True, file=file)


class _Group(click.Group):
    """A group that turns every VmigError raised below it into a CliError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmigError as exc:
            raise CliError(one_line(exc)) from None


def _abspath(path: str | None) -> str | None:
    """Paths go to a VMM whose working directory may not be ours: make them absolute."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _location(text: str) -> str:
    """A snapshot location: URLs as given, plain paths made absolute."""
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _print_json(data: Any, one_line: bool = False) -> None:
    """`data` as JSON: indented for people, or (--json) one object on one line."""
    click.echo(json.dumps(data) if one_line else json.dumps(data, indent=2))


def json_option(help_text: str = "Print the answer as one JSON object on one line."
                ) -> Callable[[F], F]:
    """The --json flag every command has (parameter `as_json`)."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def vm_options(command: F) -> F:
    """The options that describe a VM, shared by `vmm` and `remote create` (None = not given)."""
    options = [
        click.option("--memory", metavar="SIZE",
                     help="Guest RAM, e.g. 256M or 1G (a multiple of 2 MiB).  [default: 256M]"),
        click.option("--cpus", type=click.IntRange(1, MAX_CPUS), metavar="N",
                     help=f"Number of vCPUs (1-{MAX_CPUS}).  [default: 1]"),
        click.option("--workload", type=click.Choice(["idle", "dirty"]),
                     help="idle: halt between heartbeats; dirty: keep rewriting pages.  "
                          "[default: idle]"),
        click.option("--working-set", metavar="SIZE",
                     help="Memory the guest stamps and checks.  [default: 64M or what fits]"),
        click.option("--dirty-rate", type=click.IntRange(min=0), metavar="PAGES/S",
                     help="Pages per second the dirty workload rewrites; 0 = flat out.  "
                          "[default: 10000]"),
        click.option("--order", type=click.Choice(["sequential", "random"]),
                     help="Order in which the dirty workload walks its pages.  [default: random]"),
        click.option("--memory-file", type=click.Path(dir_okay=False), metavar="PATH",
                     help="Back guest RAM with this file instead of an anonymous memfd."),
        click.option("--serial-log", type=click.Path(dir_okay=False), metavar="PATH",
                     help="Append the guest's serial output to this file."),
        click.option("--boot-image", type=click.Path(dir_okay=False), metavar="FILE",
                     help=BOOT_IMAGE_HELP),
        click.option("--boot-cmdline", metavar="TEXT", help=BOOT_CMDLINE_HELP),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmig")
def cli() -> None:
    """vmig: a KVM micro-VMM with live migration."""


# --- vmig vmm ---------------------------------------------------------------------------------


@cli.command()
@click.option("--api-socket", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="UNIX socket to serve the API on (created with mode 0600).")
@vm_options
@click.option("--restore", "restore_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Start from the snapshot in DIR instead of booting (excludes --memory).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning", show_default=True,
              help="Log level (stderr, or --log-file).")
@click.option("--log-file", type=click.Path(dir_okay=False), metavar="PATH",
              help="Append the log to this file instead of stderr (the ready line goes to "
                   "stderr too).")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text: 'TIMESTAMP LEVEL LOGGER: MESSAGE'; json: one object per line.")
@click.option("--event-monitor", type=click.Path(dir_okay=False), metavar="PATH",
              help="Append every event (VM lifecycle, migration steps) to this file, one JSON "
                   "object per line; GET /api/v1/vmm.events streams the same.")
def vmm(api_socket: str, memory: str | None, cpus: int | None, workload: str | None,
        working_set: str | None, dirty_rate: int | None, order: str | None,
        memory_file: str | None, serial_log: str | None, boot_image: str | None,
        boot_cmdline: str | None, restore_dir: str | None,
        log_level: str, log_file: str | None, log_format: str,
        event_monitor: str | None) -> None:
    """Run a VMM in the foreground and serve its API on --api-socket.

    With --memory or --boot-image it boots a VM first, with --restore it restores one, with
    neither it waits, empty, for `vmig remote create`, `restore` or
    `receive-migration` (a VM received by migration writes its serial output
    to --serial-log). It stops on SIGTERM, Ctrl-C or `vmig remote
    shutdown-vmm`, shutting its VM down and removing the socket.
    """
    given = {name: value for name, value in (("cpus", cpus), ("workload", workload),
                                              ("working_set", working_set),
                                              ("dirty_rate", dirty_rate), ("order", order),
                                              ("boot_cmdline", boot_cmdline))
             if value is not None}
    if restore_dir is not None and (memory is not None or boot_image is not None):
        flag = "--memory" if memory is not None else "--boot-image"
        raise click.UsageError(f"--restore and {flag} are mutually exclusive")
    boots = memory is not None or boot_image is not None
    if boot_cmdline is not None and boot_image is None:
        raise click.UsageError("--boot-cmdline needs --boot-image")
    if given and not boots:
        flag = "--" + next(iter(given)).replace("_", "-")
        if restore_dir is not None:
            raise click.UsageError(f"{flag} cannot be used with --restore: the snapshot sets it")
        raise click.UsageError(f"{flag} needs --memory (or create the VM later with "
                               "`vmig remote create`)")
    memory_file, serial_log = _abspath(memory_file), _abspath(serial_log)

    # Validate everything before touching anything.
    config = None
    if boots:
        sized = {} if memory is None else {"memory": memory}
        config = VmConfig.build(memory_file=memory_file, serial_log=serial_log,
                                boot_image=_abspath(boot_image), **sized, **given)
        if config.is_image_guest:  # a file that cannot boot fails before the socket exists
            from vmig.vmm.images import plan_boot
            plan_boot(config)
    if restore_dir is not None:
        restore_dir = os.path.abspath(restore_dir)
        if not os.path.isdir(restore_dir):
            raise SnapshotError(f"snapshot directory {restore_dir} does not exist")
    elif not boots and memory_file:
        raise click.UsageError("--memory-file needs --memory or --restore")

    # The log file stays open until the process exits: records come until the very end.
    log_stream = None if log_file is None else open_log_file(os.path.abspath(log_file))
    ready_log = _configure_logging(log_level, log_format, log_stream)
    _run_vmm(api_socket, config, restore_dir, memory_file=memory_file, serial_log=serial_log,
             log_level=log_level, ready_log=ready_log, event_monitor=_abspath(event_monitor))


def _configure_logging(level: str, fmt: str, stream: IO[str] | None) -> logging.Logger:
    """One log format for vmig and uvicorn (vmig.logs); return the logger of the ready line,
    which is always shown, and always on stderr (VmmProcess and scripts wait for it)."""
    handler = configure_logging(level, fmt, stream)
    ready_log = logging.getLogger(__name__)
    ready_log.setLevel(logging.INFO)
    if stream is not None:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(handler.formatter)
        ready_log.addHandler(console)
    return ready_log


def _run_vmm(api_socket: str, config: VmConfig | None, restore_dir: str | None, *,
             memory_file: str | None, serial_log: str | None, log_level: str,
             ready_log: logging.Logger, event_monitor: str | None) -> None:
    """Bind the socket, build the VM (if asked), serve; unwind everything on the way out."""
    from vmig.api.controller import Vmm
    from vmig.api.events import EventBus, EventFile
    from vmig.api.server import ApiServer

    events = EventBus()
    if event_monitor is not None:
        events.add_listener(EventFile(event_monitor))
    events.publish("vmm", "starting", {"pid": os.getpid(), "version": __version__})
    # Until the server installs its own handlers, SIGTERM unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    vmm = Vmm(serial_log=serial_log, events=events)
    vmm.prepare_process()
    server = ApiServer.bind(api_socket)  # "in use" is found before a VM is built
    try:
        if config is not None:
            vmm.create(config)
        elif restore_dir is not None:
            vmm.restore(restore_dir, serial_log=serial_log, memory_file=memory_file)
    except BaseException:
        vmm.close()
        server.close()
        raise

    def ready() -> None:
        ready_log.info(READY_MESSAGE.format(socket_path=api_socket, pid=os.getpid()),
                       extra={"api_socket": api_socket, "pid": os.getpid()})
        events.publish("vmm", "ready", {"api_socket": api_socket, "pid": os.getpid()})

    server.serve(vmm, log_level=log_level, on_ready=ready)


# --- vmig remote ------------------------------------------------------------------------------


class _Remote:
    """The `remote` group's state: the client is made on first use, so `--help` needs no socket."""

    def __init__(self, ctx: click.Context, api_socket: str | None, timeout: float) -> None:
        self._ctx = ctx
        self._api_socket = api_socket
        self._timeout = timeout
        self._client: ApiClient | None = None

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            if self._api_socket is None:
                raise click.UsageError("Missing option '--api-socket'.", self._ctx)
            self._client = self._ctx.with_resource(ApiClient(self._api_socket, self._timeout))
        return self._client

    def wait(self, seconds: float) -> dict[str, Any]:
        """Ping until the VMM answers (its ping); VmmUnreachableError after `seconds`."""
        client = self.client
        deadline = time.monotonic() + seconds
        unreachable = f"cannot reach VMM at {client.socket_path}: "
        while True:
            try:  # a VMM still booting has bound its socket but answers only once it serves
                return client.ping(timeout=max(deadline - time.monotonic(), WAIT_POLL_S))
            except VmmUnreachableError as exc:
                reason = str(exc).removeprefix(unreachable) if str(exc).startswith(
                    unreachable) else "no answer"
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmmUnreachableError(f"VMM at {client.socket_path} did not answer "
                                              f"within {seconds:g} s: {reason}") from None
                time.sleep(min(WAIT_POLL_S, left))


@cli.group(cls=_Group)
@click.option("--api-socket", type=click.Path(dir_okay=False), metavar="PATH",
              help="The VMM's API socket.  [required]")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds to wait for a quick request's answer.")
@click.pass_context
def remote(ctx: click.Context, api_socket: str | None, timeout: float) -> None:
    """Drive a running VMM through its API socket."""
    ctx.obj = _Remote(ctx, api_socket, timeout)


@remote.command()
@click.option("--timeout", "wait_s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds to wait for the VMM to answer.")
@json_option("Print the VMM's answer (version, pid) as one JSON object.")
@click.pass_obj
def wait(target: _Remote, wait_s: float, as_json: bool) -> None:
    """Wait until the VMM answers on --api-socket (it is ready); exit 1 after --timeout.

    A VMM started in the background needs a moment (a guest to boot, the socket
    to appear): run this before the first request. Prints nothing unless --json.
    """
    reply = target.wait(wait_s)
    if as_json:
        _print_json(reply, one_line=True)


@remote.command()
@json_option()
@click.pass_obj
def ping(target: _Remote, as_json: bool) -> None:
    """Print the VMM's version and pid (JSON)."""
    _print_json(target.client.ping(), as_json)


@remote.command()
@json_option()
@click.pass_obj
def info(target: _Remote, as_json: bool) -> None:
    """Print the VM's state and counters (JSON)."""
    _print_json(target.client.info(), as_json)


@remote.command()
@vm_options
@json_option()
@click.pass_obj
def create(target: _Remote, memory_file: str | None, serial_log: str | None,
           boot_image: str | None, as_json: bool, **fields: Any) -> None:
    """Build and boot a VM in an empty VMM; print its info (JSON)."""
    _print_json(target.client.create(memory_file=_abspath(memory_file),
                                     serial_log=_abspath(serial_log),
                                     boot_image=_abspath(boot_image), **fields), as_json)


_VM_AFTER = "Print the VM's info afterwards as one JSON object (otherwise nothing)."


@remote.command()
@json_option(_VM_AFTER)
@click.pass_obj
def pause(target: _Remote, as_json: bool) -> None:
    """Pause the running VM."""
    target.client.pause()
    if as_json:
        _print_json(target.client.info(), one_line=True)


@remote.command()
@json_option(_VM_AFTER)
@click.pass_obj
def resume(target: _Remote, as_json: bool) -> None:
    """Resume the paused VM."""
    target.client.resume()
    if as_json:
        _print_json(target.client.info(), one_line=True)


@remote.command()
@json_option(_VM_AFTER)
@click.pass_obj
def shutdown(target: _Remote, as_json: bool) -> None:
    """Shut the VM down (the VMM keeps running, empty of a live VM)."""
    target.client.shutdown()
    if as_json:
        _print_json(target.client.info(), one_line=True)


@remote.command("shutdown-vmm")
@json_option('Print {"api_socket": ..., "stopping": true} (otherwise nothing).')
@click.pass_obj
def shutdown_vmm(target: _Remote, as_json: bool) -> None:
    """Stop the VMM process; its VM is shut down with it and the socket removed."""
    target.client.shutdown_vmm()
    if as_json:
        _print_json({"api_socket": target.client.socket_path, "stopping": True},
                    one_line=True)


@remote.command()
@click.argument("destination", metavar="DIR")
@json_option('Print {"destination": DIR} once written (otherwise nothing).')
@click.pass_obj
def snapshot(target: _Remote, destination: str, as_json: bool) -> None:
    """Write the paused VM's state and memory to DIR (a path or file:///DIR)."""
    location = _location(destination)
    target.client.snapshot(location)
    if as_json:
        _print_json({"destination": location}, one_line=True)


@remote.command()
@click.argument("source", metavar="DIR")
@click.option("--paused", is_flag=True, help="Leave the restored VM paused.")
@click.option("--memory-file", type=click.Path(dir_okay=False), metavar="PATH",
              help="Back the restored RAM with this file.")
@click.option("--serial-log", type=click.Path(dir_okay=False), metavar="PATH",
              help="Append the guest's serial output to this file.")
@json_option()
@click.pass_obj
def restore(target: _Remote, source: str, paused: bool, memory_file: str | None,
            serial_log: str | None, as_json: bool) -> None:
    """Start a VM from the snapshot in DIR (a path or file:///DIR); print its info (JSON)."""
    _print_json(target.client.restore(_location(source), resume=not paused,
                                      memory_file=_abspath(memory_file),
                                      serial_log=_abspath(serial_log)), as_json)


@remote.command("check-guest")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds the guest gets to check its pages.")
@json_option()
@click.pass_obj
def check_guest(target: _Remote, timeout: float, as_json: bool) -> None:
    """Have the guest verify its working set; print the result (JSON); exit 1 if not ok."""
    result = target.client.check_guest(timeout)
    _print_json(result, as_json)
    if not result.get("ok"):
        sys.exit(1)


def _click_type(param: Param) -> Any:
    """The click type for a parameter: its limits become click's own range checks, so an
    out-of-range value is a usage error naming the flag (exit status 2)."""
    low, high = param.minimum, param.maximum
    if param.kind == "int":
        return click.IntRange(None if low is None else int(low),
                              None if high is None else int(high), min_open=param.minimum_open)
    if param.kind == "float":
        return click.FloatRange(low, high, min_open=param.minimum_open)
    if param.kind == "choice":
        return click.Choice(param.choices)
    if param.kind == "path":
        return click.Path()
    return str


def _option_help(param: Param) -> str:
    shown = param.default
    if isinstance(shown, bool) or shown is None:
        return param.help
    return f"{param.help}  [default: {shown}]"


def parameter_options(table: tuple[Param, ...], changes: bool = False) -> Callable[[F], F]:
    """One click option per migration parameter (vmig.migration.params is the source);
    an option not given is None and is not sent, so the VMM's default applies. With
    `changes` (migration-set) no default is shown and a flag has a --no- form."""
    def decorate(command: F) -> F:
        for param in reversed(table):
            help_text = param.help if changes else _option_help(param)
            if param.kind == "bool":
                flag = f"{param.flag}/--no-{param.flag[2:]}" if changes else param.flag
                option = click.option(flag, param.name, is_flag=True, default=None,
                                      help=help_text)
            else:
                option = click.option(param.flag, param.name, type=_click_type(param),
                                      metavar=param.metavar or None, help=help_text)
            command = option(command)
        return command
    return decorate


def _absolute_paths(table: tuple[Param, ...], values: dict[str, Any]) -> dict[str, Any]:
    """Path parameters made absolute: the VMM's working directory is not ours."""
    return {name: _abspath(value) if value is not None and parameter(table, name).kind == "path"
            else value for name, value in values.items()}


@remote.command("receive-migration")
@click.argument("url")
@parameter_options(RECEIVE_PARAMETERS)
@json_option()
@click.pass_obj
def receive_migration(target: _Remote, url: str, as_json: bool, **params: Any) -> None:
    """Have an empty VMM listen for one incoming migration on URL; print where to send it.

    URL is tcp:HOST:PORT (port 0: any free port; IPv6 hosts in brackets) or
    unix:PATH (mode 0600; each of the source's --connections is a new connection
    to it, so a proxy may carry each over TCP). Over tcp: every connection is
    authenticated: with --tls-dir (mutual TLS), or with a token. Without
    --token/--token-file (and without --tls-dir) the VMM makes a random token and
    prints it: give it to send-migration. The command returns once the VMM
    listens; the VM appears there when the migration completes (`vmig remote
    info` shows state "receiving" until then).
    """
    reply = target.client.receive_migration(url, **_absolute_paths(RECEIVE_PARAMETERS, params))
    if as_json:
        click.echo(json.dumps(reply))
        return
    click.echo(f"receiver_url: {reply['receiver_url']}")
    if reply.get("token"):
        click.echo(f"token: {reply['token']}")
    if reply.get("listening_on"):
        click.echo(f"listening on: {', '.join(reply['listening_on'])}")
    click.echo(f"security: {reply.get('security', '')}")
    for warning in reply.get("warnings") or ():
        click.echo(f"warning: {warning}", err=True)


@remote.command("send-migration")
@click.argument("url")
@parameter_options(SEND_PARAMETERS)
@click.option("--detach", is_flag=True,
              help="Return once the migration has started: print the VMM's answer (its id "
                   "and migration-info) and exit 0. Follow it with migration-info.")
@json_option("Print only the summary, as one JSON object on one line (no progress bar).")
@click.pass_obj
def send_migration(target: _Remote, url: str, detach: bool, as_json: bool,
                   **params: Any) -> None:
    """Live-migrate the VM to the VMM receiving at URL (tcp:HOST:PORT or unix:PATH).

    Over tcp: pass the destination's token (--token/--token-file) or a TLS
    directory (--tls-dir). The migration runs in the VMM: this command follows it
    (a progress bar on a terminal), then prints a summary; stopping the command any
    other way than Ctrl-C leaves the migration running. Ctrl-C cancels the migration
    (until its point of no return). If it fails or is cancelled the VM keeps running
    here and the reason is printed (exit status 1).
    """
    from rich.console import Console

    from vmig.watch import send_and_watch, summary_table

    client = target.client
    request = {"destination_url": url, **_absolute_paths(SEND_PARAMETERS, params)}
    if detach:
        _print_json(client.send_migration(wait=False, **request), as_json)
        return
    console = None if as_json or not sys.stdout.isatty() else Console()
    summary = send_and_watch(client, request, console=console)  # Ctrl-C cancels it
    if as_json:
        click.echo(json.dumps(summary))
    else:
        Console().print(summary_table(summary, title=f"migration to {url}"))
    if summary.get("status") != "completed":
        raise CliError(f"{summary.get('error') or 'migration ' + str(summary.get('status'))}; "
                       "the VM keeps running here")


@remote.command("cancel-migration")
@json_option()
@click.pass_obj
def cancel_migration(target: _Remote, as_json: bool) -> None:
    """Cancel the migration running on this VMM (either side); print its figures (JSON).

    Before the switch-over's point of no return the source keeps its VM running
    and the destination discards what it received and can receive again; after
    it, the cancel is refused and says why.
    """
    _print_json(target.client.cancel_migration(), as_json)


@remote.command("recover-migration")
@click.argument("url", required=False)
@json_option()
@click.pass_obj
def recover_migration(target: _Remote, url: str | None, as_json: bool) -> None:
    """At the source: re-dial a post-copy migration stuck in postcopy-paused now.

    URL is another address of the same destination (default: the one it used). Both
    sides then go on where they were; nothing is rolled back.
    """
    _print_json(target.client.recover_migration(url), as_json)


@remote.command("migration-set")
@parameter_options(CHANGEABLE_PARAMETERS, changes=True)
@json_option()
@click.pass_obj
def migration_set(target: _Remote, as_json: bool, **params: Any) -> None:
    """At the source: change parameters of the running migration; print its figures (JSON).

    Each value applies from the next chunk (--max-bandwidth; 0 lifts the cap) or the
    next pre-copy iteration (the others), and is reported as a "parameters-changed"
    event. Any other send-migration parameter cannot change while it runs.
    """
    changes = {name: value for name, value in params.items() if value is not None}
    if not changes:
        raise click.UsageError("give at least one parameter to change, e.g. --downtime-ms 500")
    _print_json(target.client.migration_set_parameters(**changes), as_json)


@remote.command("migration-start-postcopy")
@json_option()
@click.pass_obj
def migration_start_postcopy(target: _Remote, as_json: bool) -> None:
    """At the source: switch a migration that allows post-copy to it now (JSON figures).

    The switch comes at the end of the pre-copy pass under way; send-migration then
    returns as for any post-copy. Refused, with the reason, without --postcopy.
    """
    _print_json(target.client.migration_start_postcopy(), as_json)


@remote.command("migration-force-complete")
@json_option()
@click.pass_obj
def migration_force_complete(target: _Remote, as_json: bool) -> None:
    """At the source: pause the guest and switch over now, whatever the downtime (JSON).

    The switch comes at the end of the pre-copy pass under way: the guest is paused
    while the pages left go, which may take long on a slow link.
    """
    _print_json(target.client.migration_force_complete(), as_json)


@remote.command("migration-info")
@json_option()
@click.pass_obj
def migration_info(target: _Remote, as_json: bool) -> None:
    """Print the progress of the running (or last) migration (JSON)."""
    _print_json(target.client.migration_info(), as_json)


# --- vmig demo --------------------------------------------------------------------------------


@cli.command()
@click.option("--memory", default="256M", show_default=True, metavar="SIZE", help="Guest RAM.")
@click.option("--cpus", type=click.IntRange(1, MAX_CPUS), default=2, show_default=True,
              metavar="N", help="Number of vCPUs.")
@click.option("--working-set", default="64M", show_default=True, metavar="SIZE",
              help="Memory the guest keeps rewriting (and checks at the destination).")
@click.option("--dirty-rate", type=click.IntRange(min=0), default=20_000, show_default=True,
              metavar="PAGES/S", help="Pages per second the guest rewrites; 0 = flat out.")
@click.option("--connections", type=click.IntRange(1, 128), default=4, show_default=True,
              metavar="N", help="TCP connections to migrate over.")
@click.option("--downtime-ms", type=click.IntRange(min=0), default=300, show_default=True,
              metavar="MS", help="Pause budget for the switch-over.")
@click.option("--seconds", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long to let the guest work before migrating it.")
@json_option("Print only what the demo saw and its verdict, as one JSON object.")
def demo(memory: str, cpus: int, working_set: str, dirty_rate: int, connections: int,
         downtime_ms: int, seconds: float, as_json: bool) -> None:
    """Live-migrate a guest that keeps dirtying its memory between two VMMs, and check it.

    Starts an empty destination VMM and a source VMM with a dirtying guest,
    migrates over loopback TCP with several connections and memory
    verification, then checks that the guest goes on at the destination.
    Exit status 1 if anything is wrong. Needs no arguments.
    """
    from rich.console import Console

    from vmig.demo import run_demo

    report = run_demo(memory=memory, cpus=cpus, working_set=working_set, dirty_rate=dirty_rate,
                      connections=connections, downtime_ms=downtime_ms, seconds=seconds,
                      console=Console(quiet=True) if as_json else None)
    if as_json:
        _print_json(report.to_dict(), one_line=True)
    if not report.ok:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="vmig")


if __name__ == "__main__":
    main()
