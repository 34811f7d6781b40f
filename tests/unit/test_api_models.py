"""API request models and the one-line validation messages (pure: no socket, no VM)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from vmig.api.app import error_response, status_for, validation_message
from vmig.api.models import (
    CheckGuestRequest,
    MigrationSetParametersRequest,
    ReceiveMigrationRequest,
    RestoreRequest,
    SendMigrationRequest,
    SnapshotRequest,
    VmCreateRequest,
    VmInfo,
    url_to_path,
)
from vmig.config import DirtyOrder, Workload
from vmig.errors import (
    ConfigError,
    GuestError,
    GuestMemoryError,
    KvmError,
    KvmUnavailableError,
    MigrationError,
    SnapshotError,
    StateError,
    VmigError,
    one_line,
)
from vmig.migration.params import (
    CHANGEABLE_PARAMETERS,
    SEND_PARAMETERS,
    SendParams,
    check_changes,
)
from vmig.migration.policy import TimeoutStrategy
from vmig.units import MiB


def errors_of(model: type, **data: object) -> str:
    with pytest.raises(ValidationError) as info:
        model(**data)
    return validation_message(info.value.errors())


def test_create_defaults_build_a_valid_config() -> None:
    config = VmCreateRequest().to_config()
    assert config.memory_bytes == 256 * MiB
    assert config.cpus == 1
    assert config.workload is Workload.IDLE


def test_create_passes_every_field_to_the_config() -> None:
    request = VmCreateRequest(memory="512M", cpus=4, workload="dirty", working_set="32M",
                              dirty_rate=0, order="sequential", memory_file="/dev/shm/x",
                              serial_log="/tmp/serial")
    config = request.to_config()
    assert (config.memory_bytes, config.cpus, config.working_set_bytes) == (512 * MiB, 4, 32 * MiB)
    assert config.workload is Workload.DIRTY and config.order is DirtyOrder.SEQUENTIAL
    assert (config.dirty_rate, config.memory_file, config.serial_log) == (0, "/dev/shm/x",
                                                                          "/tmp/serial")


def test_bad_size_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="bad memory size '12Q'"):
        VmCreateRequest(memory="12Q").to_config()
    with pytest.raises(ConfigError, match="working set"):
        VmCreateRequest(memory="64M", working_set="1G").to_config()


@pytest.mark.parametrize(("data", "expected"), [
    ({"cpus": 0}, "cpus: input should be greater than or equal to 1"),
    ({"cpus": 17}, "cpus: input should be less than or equal to 16"),
    ({"dirty_rate": -1}, "dirty_rate: input should be greater than or equal to 0"),
    ({"workload": "busy"}, "workload: input should be 'idle' or 'dirty'"),
    ({"colour": "red"}, "colour: unknown field"),
    ({"serial_log": "relative.log"}, "serial_log: 'relative.log' is not absolute"),
])
def test_create_validation_messages_are_one_line_and_name_the_field(
        data: dict[str, object], expected: str) -> None:
    message = errors_of(VmCreateRequest, **data)
    assert message.startswith(expected)
    assert "\n" not in message


def test_several_errors_share_one_line() -> None:
    message = errors_of(VmCreateRequest, cpus=0, order="backwards")
    assert message.count(";") == 1 and "\n" not in message
    assert message.startswith("cpus: ") and "order: " in message


@pytest.mark.parametrize(("url", "path"), [
    ("file:///var/tmp/snap", "/var/tmp/snap"),
    ("file://localhost/var/tmp/snap", "/var/tmp/snap"),
    ("file:///with%20space", "/with space"),
    ("/plain/path", "/plain/path"),
])
def test_snapshot_urls_and_paths(url: str, path: str) -> None:
    assert url_to_path(url) == path
    assert SnapshotRequest(destination_url=url).directory == path
    assert RestoreRequest(source_url=url).directory == path


@pytest.mark.parametrize(("url", "reason"), [
    ("tcp://host:1234", "unsupported URL scheme 'tcp'"),
    ("file://otherhost/dir", "names host 'otherhost'"),
    ("relative/dir", "is not absolute"),
    ("", "must not be empty"),
])
def test_bad_snapshot_urls(url: str, reason: str) -> None:
    assert reason in errors_of(SnapshotRequest, destination_url=url)
    assert reason in errors_of(RestoreRequest, source_url=url)


def test_restore_resumes_by_default() -> None:
    assert RestoreRequest(source_url="/s").resume is True


def test_check_guest_timeout_must_be_positive() -> None:
    assert CheckGuestRequest().timeout == 60.0
    assert "timeout: input should be greater than 0" in errors_of(CheckGuestRequest, timeout=0)


def test_vm_info_passes_unknown_fields_through() -> None:
    info = VmInfo.model_validate({"state": "migrated", "migration": {"phase": "done"}})
    assert info.model_dump(exclude_unset=True) == {"state": "migrated",
                                                  "migration": {"phase": "done"}}


def test_invalid_json_and_missing_body_messages() -> None:
    assert validation_message([{"type": "json_invalid", "loc": ("body", 3),
                                "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}]
                              ) == "body: invalid JSON (Expecting value)"
    assert validation_message([{"type": "missing", "loc": ("body",),
                                "msg": "Field required"}]) == "body: field required"


@pytest.mark.parametrize(("error", "status"), [
    (StateError("x"), 409),
    (ConfigError("x"), 400),
    (SnapshotError("x"), 400),
    (KvmUnavailableError("x"), 400),
    (GuestMemoryError("x"), 400),
    (KvmError("KVM_RUN", 22), 500),
    (GuestError("x"), 500),
    (MigrationError("x"), 500),
    (VmigError("x"), 500),
])
def test_status_by_error_family(error: VmigError, status: int) -> None:
    assert status_for(error) == status


def test_one_line_collapses_whitespace() -> None:
    assert one_line("first\n  second\tthird ") == "first second third"
    assert json.loads(error_response(500, "").body) == {"error": "unknown error"}


def test_send_migration_defaults_are_the_engines() -> None:
    params = SendMigrationRequest(destination_url="tcp:h:1").to_params()
    assert params == SendParams("tcp:h:1")
    assert params.timeout_strategy is TimeoutStrategy.CANCEL
    params = SendMigrationRequest(destination_url="unix:/m.sock", local=True, downtime_ms=50,
                                  timeout_s=9.5, timeout_strategy="ignore",
                                  verify_memory=True).to_params()
    assert (params.local, params.downtime_ms, params.timeout_s) == (True, 50, 9.5)
    assert params.timeout_strategy is TimeoutStrategy.IGNORE and params.verify_memory


@pytest.mark.parametrize(("data", "expected"), [
    ({"connections": 0}, "connections: input should be greater than or equal to 1"),
    ({"connections": 129}, "connections: input should be less than or equal to 128"),
    ({"downtime_ms": -1}, "downtime_ms: input should be greater than or equal to 0"),
    ({"timeout_s": 0}, "timeout_s: input should be greater than 0"),
    ({"timeout_strategy": "soon"},
     "timeout_strategy: input should be 'cancel', 'ignore' or 'postcopy'"),
    ({"destination_url": "tcp:nohost"}, "destination_url: bad migration URL 'tcp:nohost'"),
    ({"destination_url": "unix:"}, "destination_url: bad migration URL 'unix:'"),
    ({"speed": "fast"}, "speed: unknown field"),
])
def test_send_migration_messages_name_the_field(data: dict[str, object], expected: str) -> None:
    message = errors_of(SendMigrationRequest, **{"destination_url": "tcp:h:1", **data})
    assert message.startswith(expected) and "\n" not in message


@pytest.mark.parametrize(("data", "expected"), [
    ({"connections": 2, "local": True}, "connections: must be 1 when local is true"),
    ({"local": True}, "local: needs a unix: destination_url"),
])
def test_send_migration_cross_field_rules_are_the_engines(data: dict[str, object],
                                                          expected: str) -> None:
    request = SendMigrationRequest(**{"destination_url": "tcp:h:1", **data})
    with pytest.raises(ConfigError, match=f"^{expected}"):
        request.to_params().validate()


def test_send_migration_takes_several_connections_over_unix() -> None:
    request = SendMigrationRequest(destination_url="unix:/m.sock", connections=4)
    assert request.to_params().validate().kind == "unix"


def test_receive_migration_request() -> None:
    request = ReceiveMigrationRequest(receiver_url="tcp:0.0.0.0:0")
    assert (request.max_connections, request.prealloc) == (128, None)
    assert errors_of(ReceiveMigrationRequest, receiver_url="tcp:h:1", max_connections=0) == (
        "max_connections: input should be greater than or equal to 1")
    assert errors_of(ReceiveMigrationRequest, receiver_url="h").startswith(
        "receiver_url: bad migration URL 'h'")


def test_set_parameters_fields_are_the_changeable_send_parameters() -> None:
    fields = set(MigrationSetParametersRequest.model_fields)
    assert fields == {p.name for p in SEND_PARAMETERS if p.changeable}
    assert {"downtime_ms", "max_bandwidth", "timeout_s", "auto_converge",
            "auto_converge_initial", "auto_converge_step", "auto_converge_max"} == fields
    assert all(field.default is None
               for field in MigrationSetParametersRequest.model_fields.values())
    changes = MigrationSetParametersRequest(downtime_ms=500, max_bandwidth=None).to_changes()
    assert changes == {"downtime_ms": 500, "max_bandwidth": None}  # null: lift the cap
    assert MigrationSetParametersRequest(max_bandwidth=1 << 20).to_changes() == {
        "max_bandwidth": 1 << 20}  # a size may be a byte count


@pytest.mark.parametrize(("data", "expected"), [
    ({"downtime_ms": -1}, "downtime_ms: input should be greater than or equal to 0"),
    ({"auto_converge_max": 100}, "auto_converge_max: input should be less than or equal "
                                 "to 99"),
    ({"max_bandwidth": "fast"}, "max_bandwidth: bad size 'fast'"),
])
def test_set_parameters_messages_name_the_field(data: dict[str, object], expected: str
                                                ) -> None:
    message = errors_of(MigrationSetParametersRequest, **data)
    assert message.startswith(expected), message


@pytest.mark.parametrize(("changes", "error", "expected"), [
    ({"connections": 4}, StateError, "connections cannot change while a migration runs"),
    ({"tls_dir": "/x", "downtime_ms": 5}, StateError, "tls_dir cannot change"),
    ({"speed": 1}, ConfigError, "speed: unknown field"),
    ({}, ConfigError, "no parameter to change"),
    ({"downtime_ms": None}, ConfigError, "downtime_ms: must have a value"),
    ({"downtime_ms": 10**9}, ConfigError, "downtime_ms: must be between 0 and 600000"),
    ({"timeout_s": 0}, ConfigError, "timeout_s: must be > 0"),
    ({"max_bandwidth": "1Q"}, ConfigError, "max_bandwidth: bad max_bandwidth '1Q'"),
])
def test_check_changes_refuses_with_the_right_status(changes: dict[str, object],
                                                     error: type[Exception], expected: str
                                                     ) -> None:
    with pytest.raises(error, match=f"^{expected}"):
        check_changes(changes)
    assert status_for(error("x")) == (409 if error is StateError else 400)


def test_check_changes_passes_what_may_change() -> None:
    changes = {p.name: p.default for p in CHANGEABLE_PARAMETERS}
    assert check_changes(changes) == changes
