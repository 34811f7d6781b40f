"""The transition table: shape, reachability, and every invalid (state, command) pair."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from proto_helpers import VERSIONS, ConnectionPair, default_request, drain

from vmig.proto import (
    INITIAL_STATES,
    RESUMABLE_VERSION,
    TERMINAL_STATES,
    TRANSITIONS,
    Command,
    ConnectionRole,
    Error,
    LocalProtocolError,
    Ok,
    ReceiverState,
    RemoteProtocolError,
    Response,
    Status,
    allowed_commands,
    render_mermaid,
)
from vmig.proto.errors import _STATUS_ERROR
from vmig.proto.state import expected_text, shortest_paths

ROLES = (ConnectionRole.MAIN, ConnectionRole.MEMORY)
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
UNKNOWN_COMMAND = 99


def _reachable() -> list[tuple[ConnectionRole, ReceiverState, tuple[Command, ...]]]:
    return [(role, state, path) for role in ROLES for state, path in shortest_paths(role).items()]


def test_every_state_is_reachable():
    reached = {state for _, state, _ in _reachable()}
    assert reached == set(ReceiverState)


def test_table_shape():
    for (state, command), target in TRANSITIONS.items():
        assert state not in TERMINAL_STATES, "final states accept nothing"
        assert command is not Command.INVALID
        assert isinstance(target, ReceiverState)
    for state in ReceiverState:
        if state not in TERMINAL_STATES:
            assert TRANSITIONS[(state, Command.ABANDON)] is ReceiverState.ABORTED
    assert INITIAL_STATES[ConnectionRole.MAIN] is ReceiverState.ESTABLISHED
    assert allowed_commands(ReceiverState.STREAMING) == (Command.MEMORY, Command.ABANDON)
    assert expected_text(ReceiverState.ESTABLISHED) == "START or ABANDON"
    assert expected_text(ReceiverState.COMPLETED) == "nothing (COMPLETED is final)"


def test_main_sequence_follows_the_table():
    state = ReceiverState.ESTABLISHED
    for command in (Command.START, Command.CONFIG, Command.MEMORY, Command.STATE):
        state = TRANSITIONS[(state, command)]
    assert TRANSITIONS[(state, Command.COMPLETE)] is ReceiverState.COMPLETED


def _allowed(state: ReceiverState, command: Command, version: int) -> bool:
    """Whether `state` takes `command` at `version` (PING, the heartbeat, from version 3)."""
    if command is Command.PING and version < RESUMABLE_VERSION:
        return False
    return (state, command) in TRANSITIONS


def _invalid_cases(*, raw: bool = True):
    """(version, role, path, command) for every version, reachable state and command it
    refuses. With `raw`, also the values no event type can produce (INVALID, unknown).
    """
    # AUTH belongs to the handshake, before any of these states (test_proto_handshake.py),
    # FAULT to the FAULT connection (test_proto_postcopy.py);
    # after it, it is refused like any other command out of place.
    commands = [*Command, UNKNOWN_COMMAND] if raw else [
        c for c in Command if c not in (Command.INVALID, Command.AUTH, Command.FAULT)]
    cases = []
    for version in VERSIONS:
        for role, state, path in _reachable():
            for command in commands:
                if not (isinstance(command, Command) and _allowed(state, command, version)):
                    name = getattr(command, "name", str(command))
                    cases.append(pytest.param(version, role, path, command,
                                              id=f"v{version}-{role.name}-{state.name}-{name}"))
    return cases


def _valid_cases():
    return [
        pytest.param(version, role, path, command,
                     id=f"v{version}-{role.name}-{state.name}-{command.name}")
        for version in VERSIONS
        for role, state, path in _reachable()
        for command in allowed_commands(state)
        if _allowed(state, command, version)
    ]


@pytest.mark.parametrize(("version", "role", "path", "command"), _invalid_cases())
def test_receiver_rejects_every_invalid_pair(version, role, path, command):
    pair = ConnectionPair(role, version=version)
    pair.advance(path)
    state = pair.receiver.state
    pair.receiver.receive_data(pair.raw_request(command))
    with pytest.raises(RemoteProtocolError) as info:
        drain(pair.receiver)
    message = info.value.message
    if command in (Command.INVALID, UNKNOWN_COMMAND):
        assert ("INVALID" in message) or ("unknown command" in message)
    elif command is Command.PING and version < RESUMABLE_VERSION:
        assert message == "sender sent PING, which protocol version 2 does not have"
    else:
        assert f"sender sent {command.name} in state {state.name}" in message
        assert f"expected {expected_text(state)}" in message
    assert pair.receiver.state is ReceiverState.ABORTED
    # The Error response can still be produced and keeps the two sides in step.
    pair.sender.receive_data(pair.receiver.send(Error(message)))
    if pair.sender.outstanding:
        response = pair.sender.next_event()
        assert response == Response(Status.ERROR, message, response.command)
    with pytest.raises(RemoteProtocolError):
        pair.receiver.next_event()


@pytest.mark.parametrize(("version", "role", "path", "command"), _invalid_cases(raw=False))
def test_sender_refuses_every_invalid_pair(version, role, path, command):
    pair = ConnectionPair(role, version=version)
    pair.advance(path)
    event, _ = default_request(command, version)
    with pytest.raises(LocalProtocolError, match=command.name):
        pair.sender.send(event)
    assert pair.sender.outstanding == ()


@pytest.mark.parametrize(("version", "role", "path", "command"), _valid_cases())
def test_every_valid_pair_is_accepted(version, role, path, command):
    pair = ConnectionPair(role, version=version)
    pair.advance(path)
    before = pair.receiver.state
    event, payload = default_request(command, version)
    _, response = pair.exchange(event, payload)
    assert response.ok
    assert pair.receiver.state is TRANSITIONS[(before, command)] is pair.sender.state


@pytest.mark.parametrize(("version", "role", "path", "command"), _valid_cases())
def test_error_answer_always_aborts(version, role, path, command):
    pair = ConnectionPair(role, version=version)
    pair.advance(path)
    event, payload = default_request(command, version)
    _, response = pair.exchange(event, payload, answer=Error("refused"))
    assert response == Response(Status.ERROR, "refused", command)
    assert pair.receiver.state is ReceiverState.ABORTED is pair.sender.state


def test_ping_changes_nothing_and_only_where_the_table_says():
    assert {state for (state, command) in TRANSITIONS if command is Command.PING} == {
        ReceiverState.STARTED, ReceiverState.MEMORY_FDS_RECEIVED, ReceiverState.CONFIGURED,
        ReceiverState.STATE_RECEIVED, ReceiverState.POSTCOPY_ACTIVE}
    for (state, command), target in TRANSITIONS.items():
        if command is Command.PING:
            assert target is state


@pytest.mark.parametrize("version", VERSIONS)
def test_ok_leaves_the_receiver_in_step(version):
    pair = ConnectionPair(version=version)
    pair.receiver.receive_data(pair.raw_request(Command.START))
    drain(pair.receiver)
    assert pair.receiver.send(Ok()) == struct.pack("<H6sQ", Status.OK, bytes(6), 0)


def test_error_status_matches_wire_enum():
    assert _STATUS_ERROR == Status.ERROR
    assert RemoteProtocolError("x").status == Status.ERROR == LocalProtocolError("x").status


def test_docs_contain_the_rendered_state_diagram():
    diagram = render_mermaid()
    assert diagram.startswith("stateDiagram-v2\n")
    for (state, command), target in TRANSITIONS.items():
        assert f"{state.name} --> {target.name}" in diagram
        assert command.name in diagram
    text = DOC.read_text(encoding="utf-8")
    assert f"```mermaid\n{diagram}```" in text, (
        "docs/protocol.md is out of date: paste vmig.proto.render_mermaid() into it"
    )
