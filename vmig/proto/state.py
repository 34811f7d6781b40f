"""The receiver's state machine as data: one table, used by both sides.

Rules (as in h11's _state.py): everything that decides which request may come
next lives in this file, and this file knows nothing about bytes or I/O.

`TRANSITIONS[(state, command)]` is the state the receiver moves to when it
answers that request OK. A missing key means the command is not allowed in that
state: the receiver rejects it (RemoteProtocolError, ABORTED) and the sender
refuses to send it (LocalProtocolError). Answering ERROR always moves to ABORTED.
The sender mirrors the receiver's state from the responses it gets, so both
sides check the same table. `render_mermaid()` draws it for docs/protocol.md.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from vmig.proto.wire import Command, ConnectionRole

__all__ = [
    "INITIAL_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "ReceiverState",
    "allowed_commands",
    "expected_text",
    "render_mermaid",
    "shortest_paths",
]


class ReceiverState(Enum):
    """Where the receiver is in a migration (mirrored by the sender)."""

    #: MAIN connection open and hello read; waiting for START.
    ESTABLISHED = "established"
    #: START accepted; waiting for MEMORY_FD (LOCAL mode) or CONFIG.
    STARTED = "started"
    #: One or more MEMORY_FD accepted; more MEMORY_FD or CONFIG.
    MEMORY_FDS_RECEIVED = "memory_fds_received"
    #: CONFIG applied, the VM is built; MEMORY requests until STATE.
    CONFIGURED = "configured"
    #: STATE applied (vCPUs and devices restored); waiting for COMPLETE (or POSTCOPY).
    STATE_RECEIVED = "state_received"
    #: POSTCOPY accepted: the guest runs here while its last pages come; until COMPLETE.
    POSTCOPY_ACTIVE = "postcopy_active"
    #: COMPLETE accepted: the VM runs on the receiver. Final.
    COMPLETED = "completed"
    #: Abandoned by the sender or failed on either side. Final.
    ABORTED = "aborted"
    #: A MEMORY connection: MEMORY requests (and ABANDON) only.
    STREAMING = "streaming"


_S = ReceiverState
_C = Command

#: The state each role's connection starts in once its hello is read.
INITIAL_STATES: dict[ConnectionRole, ReceiverState] = {
    ConnectionRole.MAIN: _S.ESTABLISHED,
    ConnectionRole.MEMORY: _S.STREAMING,
}

#: States no request leads out of (EOF is the only thing left to happen).
TERMINAL_STATES = frozenset({_S.COMPLETED, _S.ABORTED})

#: (state, command) -> state after the receiver answers OK. The one copy of the rules.
TRANSITIONS: dict[tuple[ReceiverState, Command], ReceiverState] = {
    (_S.ESTABLISHED, _C.START): _S.STARTED,
    (_S.STARTED, _C.MEMORY_FD): _S.MEMORY_FDS_RECEIVED,
    (_S.MEMORY_FDS_RECEIVED, _C.MEMORY_FD): _S.MEMORY_FDS_RECEIVED,
    (_S.STARTED, _C.CONFIG): _S.CONFIGURED,
    (_S.MEMORY_FDS_RECEIVED, _C.CONFIG): _S.CONFIGURED,
    (_S.CONFIGURED, _C.MEMORY): _S.CONFIGURED,
    (_S.CONFIGURED, _C.STATE): _S.STATE_RECEIVED,
    (_S.STATE_RECEIVED, _C.COMPLETE): _S.COMPLETED,
    (_S.STATE_RECEIVED, _C.POSTCOPY): _S.POSTCOPY_ACTIVE,
    (_S.POSTCOPY_ACTIVE, _C.MEMORY): _S.POSTCOPY_ACTIVE,
    (_S.POSTCOPY_ACTIVE, _C.COMPLETE): _S.COMPLETED,
    (_S.STREAMING, _C.MEMORY): _S.STREAMING,
    # ABANDON is accepted in every state that is not final.
    **{(state, _C.ABANDON): _S.ABORTED for state in _S if state not in TERMINAL_STATES},
    # PING (version 3), the heartbeat on MAIN, changes nothing.
    **{(state, _C.PING): state for state in (_S.STARTED, _S.MEMORY_FDS_RECEIVED,
                                             _S.CONFIGURED, _S.STATE_RECEIVED,
                                             _S.POSTCOPY_ACTIVE)},
}


def allowed_commands(state: ReceiverState) -> tuple[Command, ...]:
    """The commands `state` accepts, in Command order."""
    return tuple(c for c in Command if (state, c) in TRANSITIONS)


def expected_text(state: ReceiverState) -> str:
    """Human list of what `state` accepts, for error messages ("START or ABANDON")."""
    names = [c.name for c in allowed_commands(state)]
    if not names:
        return f"nothing ({state.name} is final)"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def shortest_paths(role: ConnectionRole) -> dict[ReceiverState, tuple[Command, ...]]:
    """For every state reachable on a `role` connection, a shortest command sequence to it."""
    start = INITIAL_STATES[role]
    paths: dict[ReceiverState, tuple[Command, ...]] = {start: ()}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for command in allowed_commands(state):
            target = TRANSITIONS[(state, command)]
            if target not in paths:
                paths[target] = (*paths[state], command)
                queue.append(target)
    return paths


def render_mermaid() -> str:
    """TRANSITIONS as a mermaid ``stateDiagram-v2`` (docs/protocol.md embeds it verbatim)."""
    lines = ["stateDiagram-v2"]
    for role, state in INITIAL_STATES.items():
        lines.append(f"    [*] --> {state.name}: hello {role.name}")
    edges: dict[tuple[ReceiverState, ReceiverState], list[str]] = {}
    for (source, command), target in TRANSITIONS.items():
        edges.setdefault((source, target), []).append(command.name)
    for (source, target), commands in edges.items():
        lines.append(f"    {source.name} --> {target.name}: {', '.join(commands)}")
    for state in _S:
        if state in TERMINAL_STATES:
            lines.append(f"    {state.name} --> [*]")
    lines.append("    %% Answering ERROR to any request also leads to ABORTED.")
    return "\n".join(lines) + "\n"
