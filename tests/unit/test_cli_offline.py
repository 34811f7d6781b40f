"""CLI behaviour that needs no VMM: argument checks, error format, unreachable sockets."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vmig.cli import cli


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(stderr: str, text: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmig: error: ") and text in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("args", "text"), [
    (["--memory", "1Q"], "bad memory size '1Q'"),
    (["--memory", "3M"], "must be a multiple of 2 MiB"),
    (["--memory", "64M", "--working-set", "1G"], "does not fit"),
    (["--memory", "256M", "--working-set", "x"], "bad working set size 'x'"),
    (["--boot-image", "/nonexistent.img"], "boot_image: cannot read /nonexistent.img"),
    (["--boot-image", "/dev/null"], "neither a Multiboot kernel"),
    (["--boot-image", "/dev/null", "--workload", "dirty"], "workload does not apply to a "
                                                             "boot image"),
    (["--boot-image", "/dev/null", "--cpus", "2"], "a boot image runs on 1 vCPU"),
])
def test_vmm_rejects_bad_sizes_before_touching_anything(tmp_path: Path, args: list[str],
                                                        text: str) -> None:
    socket_path = tmp_path / "api.sock"
    code, _, stderr = run("vmm", "--api-socket", str(socket_path), *args)
    assert code == 1
    assert_one_line_error(stderr, text)
    assert not socket_path.exists()


def test_vmm_restore_of_a_missing_directory(tmp_path: Path) -> None:
    code, _, stderr = run("vmm", "--api-socket", str(tmp_path / "a.sock"), "--restore",
                          str(tmp_path / "nothing"))
    assert code == 1
    assert_one_line_error(stderr, "does not exist")


@pytest.mark.parametrize(("args", "text"), [
    (["--memory", "256M", "--restore", "/x"], "mutually exclusive"),
    (["--boot-image", "/x.img", "--restore", "/x"], "--restore and --boot-image are mutually"),
    (["--boot-cmdline", "quiet"], "--boot-cmdline needs --boot-image"),
    (["--cpus", "2"], "--cpus needs --memory"),
    (["--restore", "/x", "--workload", "dirty"], "--workload cannot be used with --restore"),
    (["--memory-file", "/dev/shm/x"], "--memory-file needs --memory or --restore"),
    (["--memory", "256M", "--cpus", "17"], "--cpus"),
])
def test_vmm_usage_errors_exit_2(tmp_path: Path, args: list[str], text: str) -> None:
    code, _, stderr = run("vmm", "--api-socket", str(tmp_path / "a.sock"), *args)
    assert code == 2
    assert text in stderr and "Traceback" not in stderr


def test_vmm_needs_an_api_socket() -> None:
    code, _, stderr = run("vmm", "--memory", "256M")
    assert code == 2 and "--api-socket" in stderr


@pytest.mark.parametrize("command", [["ping"], ["info"], ["pause"], ["check-guest"],
                                     ["snapshot", "/tmp/s"], ["create", "--memory", "1G"],
                                     ["receive-migration", "tcp:0.0.0.0:0"],
                                     ["send-migration", "tcp:h:1", "--json"],
                                     ["send-migration", "tcp:h:1"], ["migration-info"]])
def test_remote_without_a_vmm(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "none.sock"
    code, stdout, stderr = run("remote", "--api-socket", str(path), *command)
    assert code == 1 and stdout == ""
    assert_one_line_error(stderr, f"cannot reach VMM at {path}: No such file or directory")


def test_version_and_help() -> None:
    code, stdout, _ = run("--version")
    assert code == 0 and "vmig, version" in stdout
    code, stdout, _ = run("remote", "--help")
    assert code == 0
    for command in ("wait", "ping", "info", "pause", "resume", "shutdown", "shutdown-vmm",
                    "snapshot", "restore", "create", "check-guest", "receive-migration",
                    "send-migration", "cancel-migration", "migration-info"):
        assert command in stdout


def test_remote_needs_an_api_socket_but_not_for_help() -> None:
    code, _, stderr = run("remote", "ping")
    assert code == 2 and "Missing option '--api-socket'" in stderr
    code, stdout, _ = run("remote", "restore", "--help")
    assert code == 0 and "--paused" in stdout


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix}{name} ")
        else:
            found.append((prefix + name, command))
    return found


def test_every_command_has_json_output() -> None:
    commands = dict(_commands(cli))
    assert {"remote wait", "remote info", "remote pause", "demo"} <= commands.keys()
    # `vmig vmm` prints nothing but its log, which --log-format json makes JSON lines
    del commands["vmm"]
    for name, command in commands.items():
        flags = {opt for param in command.params for opt in getattr(param, "opts", ())}
        assert "--json" in flags, f"vmig {name} has no --json"
    vmm_options = {opt for param in cli.commands["vmm"].params for opt in param.opts}
    assert "--log-format" in vmm_options


def test_wait_for_a_vmm_that_never_comes(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    code, stdout, stderr = run("remote", "--api-socket", str(path), "wait", "--timeout", "0.2")
    assert code == 1 and stdout == ""
    assert_one_line_error(stderr, f"VMM at {path} did not answer within 0.2 s: No such file "
                                  "or directory")


@pytest.mark.parametrize(("option", "text"), [("--log-file", "cannot open log file"),
                                              ("--event-monitor",
                                               "cannot open event monitor file")])
def test_vmm_names_an_unusable_log_or_event_file(tmp_path: Path, option: str, text: str,
                                                 restored_logging: None) -> None:
    socket_path = tmp_path / "api.sock"
    target = tmp_path / "missing" / "file"
    code, _, stderr = run("vmm", "--api-socket", str(socket_path), option, str(target))
    assert code == 1
    assert_one_line_error(stderr, f"{text} {target}: No such file or directory")
    assert not socket_path.exists()


def test_migration_set_has_an_option_per_changeable_parameter() -> None:
    from vmig.migration.params import CHANGEABLE_PARAMETERS

    command = cli.commands["remote"].commands["migration-set"]  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    assert {p.flag for p in CHANGEABLE_PARAMETERS} <= flags
    assert "--no-auto-converge" in command.params[
        [p.name for p in command.params].index("auto_converge")].secondary_opts
    assert "--connections" not in flags
    code, _, stderr = run("remote", "--api-socket", "/nonexistent.sock", "migration-set")
    assert code == 2 and "give at least one parameter to change" in stderr
