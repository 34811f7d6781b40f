"""The fault proxy itself (tests/faultproxy.py), on real loopback sockets: it carries bytes
both ways, and its stalls, outages, cuts and lost COMPLETE answers do what the e2e tests
rely on (a reset is an RST on both sides, not a FIN; a refused re-dial fails at once)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import HEADER, HELLO, CutProxy
from helpers import wait_for

MAIN, MEMORY = 1, 2
AUTH, CONFIG, COMPLETE = 8, 2, 5
OK = 1


def hello(role: int, index: int = 0, resume: int = 0) -> bytes:
    return HELLO.pack(b"VMIGCONN", role, 3, index, resume, b"m" * 16)


def request(command: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(command, bytes(6), len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += more
    return data


class Destination:
    """Answers as a receiver frames them: the hello with OK + 24 bytes, every request with
    OK + 0 bytes; records each connection's (role, commands) and how it ended."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address: tuple[str, int] | str = self.listener.getsockname()
        else:  # a UNIX socket file: `address` is the proxy target "unix:PATH"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.listener.listen()
            self.address = f"unix:{path}"
        self.seen: list[dict[str, object]] = []
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            record: dict[str, object] = {"commands": [], "end": None}
            self.seen.append(record)
            self.sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, record), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, record: dict[str, object]) -> None:
        commands: list[int] = record["commands"]  # type: ignore[assignment]
        try:
            record["role"] = HELLO.unpack(recv_exact(sock, HELLO.size))[1]
            sock.sendall(HEADER.pack(OK, bytes(6), 24) + bytes(24))
            while True:
                command, _, length = HEADER.unpack(recv_exact(sock, HEADER.size))
                recv_exact(sock, length)
                commands.append(command)
                if command == 0xEC:  # echo: answer with the payload
                    continue
                sock.sendall(HEADER.pack(OK, bytes(6), 0))
        except EOFError:
            record["end"] = "eof"
        except ConnectionResetError:
            record["end"] = "reset"
        except OSError as exc:
            record["end"] = repr(exc)
        finally:
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes a blocked accept() (a UNIX one too)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = Destination()
    yield dest
    dest.close()


def dial(proxy: CutProxy, role: int, index: int = 0) -> socket.socket:
    if proxy.listen_path is None:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(proxy.listen_path)
    sock.sendall(hello(role, index))
    status, _, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    assert status == OK
    recv_exact(sock, length)
    return sock


def ask(sock: socket.socket, command: int, payload: bytes = b"") -> int:
    sock.sendall(request(command, payload))
    return HEADER.unpack(recv_exact(sock, HEADER.size))[0]


def assert_reset(sock: socket.socket) -> None:
    """The peer reset the connection (an RST: never a clean EOF first)."""
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while True:  # sends fail once the RST is in; a read sees it at once
            sock.sendall(request(CONFIG))
            data = sock.recv(4096)
            assert data, "a clean EOF instead of a reset"


def test_it_carries_requests_and_answers(destination: Destination) -> None:
    with CutProxy(destination.address) as proxy:
        main = dial(proxy, MAIN)
        assert ask(main, AUTH, bytes(48)) == OK and ask(main, CONFIG, b"x" * 100_000) == OK
        memory = dial(proxy, MEMORY, index=1)
        assert ask(memory, 4, b"y" * 1_000_000) == OK
        assert [c.role for c in proxy.live()] == [MAIN, MEMORY]
        assert [c.hello_index for c in proxy.live()] == [0, 1]
        main.close()
        memory.close()
        wait_for(lambda: not proxy.live(), "the proxy to let both go")
    assert destination.seen[0]["commands"] == [AUTH, CONFIG]
    assert proxy.cuts == 0


def test_a_stall_holds_every_connection_open_then_goes_on(destination: Destination) -> None:
    with CutProxy(destination.address) as proxy:
        main, memory = dial(proxy, MAIN), dial(proxy, MEMORY, index=1)
        began = time.monotonic()
        proxy.stall(0.6)
        main.sendall(request(CONFIG))
        memory.sendall(request(4, b"z" * 300_000))
        main.settimeout(0.3)
        with pytest.raises(TimeoutError):
            main.recv(1)  # nothing comes back while stalled
        assert destination.seen[0]["commands"] == []  # and nothing went
        main.settimeout(5)
        memory.settimeout(5)
        assert HEADER.unpack(recv_exact(main, HEADER.size))[0] == OK
        assert HEADER.unpack(recv_exact(memory, HEADER.size))[0] == OK
        assert time.monotonic() - began >= 0.55
        assert ask(main, CONFIG) == OK  # the same connections, still open
        assert proxy.cuts == 0 and proxy.stalls == 1


def test_an_outage_resets_everything_and_refuses_redials_for_a_while(
        destination: Destination) -> None:
    with CutProxy(destination.address) as proxy:
        main, memory = dial(proxy, MAIN), dial(proxy, MEMORY, index=1)
        assert proxy.outage(0.8) == 2
        assert_reset(main)
        assert_reset(memory)
        wait_for(lambda: [r["end"] for r in destination.seen] == ["reset", "reset"],
                 "the destination to see both reset")
        began = time.monotonic()
        with (pytest.raises(ConnectionResetError),  # in connect() or just after it
              socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as redial):
            redial.sendall(hello(MAIN, resume=1))
            redial.recv(1)
        assert time.monotonic() - began < 0.3, "a refused re-dial must fail at once"
        assert proxy.refused >= 1 and len(destination.seen) == 2
        time.sleep(max(0.0, 0.85 - (time.monotonic() - began)))
        again = dial(proxy, MAIN)
        assert ask(again, CONFIG) == OK
        assert proxy.cuts == 2 and proxy.outages == 1
        assert proxy.live()[0].resume_count == 0


def test_main_is_cut_when_told_and_the_others_carry_on(destination: Destination) -> None:
    with CutProxy(destination.address) as proxy:
        memory = dial(proxy, MEMORY, index=1)  # accepted first: MAIN is known by its hello
        main = dial(proxy, MAIN)
        assert proxy.cut_main()
        assert_reset(main)
        assert ask(memory, 4, b"a" * 1000) == OK
        assert proxy.cuts == 1 and not proxy.cut_main()


def test_a_cut_after_some_bytes(destination: Destination) -> None:
    with CutProxy(destination.address, cut_index=0, cut_after=HELLO.size + 20) as proxy:
        main = dial(proxy, MAIN)
        main.sendall(request(CONFIG, b"q" * 1000))
        assert_reset(main)
        assert proxy.connections[0].sent == HELLO.size + 20 and proxy.cuts == 1


def test_completes_answer_is_lost_once(destination: Destination) -> None:
    with CutProxy(destination.address, lose_complete_answer=True) as proxy:
        main = dial(proxy, MAIN)
        assert ask(main, AUTH, bytes(48)) == OK
        assert ask(main, CONFIG, b"c" * 70_000) == OK
        main.sendall(request(COMPLETE, b'{"run": true}'))
        assert_reset(main)
        # The destination got all of COMPLETE and answered; the answer went nowhere.
        assert destination.seen[0]["commands"] == [AUTH, CONFIG, COMPLETE]
        assert proxy.answers_lost == 1 and proxy.cuts == 1
        again = dial(proxy, MAIN)  # a re-dialled MAIN re-sends it: this one goes through
        assert ask(again, AUTH, bytes(48)) == OK and ask(again, COMPLETE) == OK
        assert proxy.answers_lost == 1


def test_completes_answer_is_lost_when_requests_come_in_pieces(
        destination: Destination) -> None:
    """The parse does not depend on how the stream is split."""
    with CutProxy(destination.address, lose_complete_answer=True) as proxy:
        main = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        stream = hello(MAIN) + request(AUTH, bytes(48)) + request(COMPLETE, b"xyz")
        for at in range(0, len(stream), 7):
            main.sendall(stream[at:at + 7])
            time.sleep(0.002)
        # hello's and AUTH's answers come; COMPLETE's does not
        answers = recv_exact(main, 2 * HEADER.size + 24)
        assert HEADER.unpack(answers[:HEADER.size])[2] == 24
        assert_reset(main)
        assert destination.seen[0]["commands"] == [AUTH, COMPLETE]


def test_unix_to_tcp_to_unix_as_kubevirts_proxies_do(tmp_path: Path) -> None:
    """A socket file in, TCP between two proxies, a socket file out: every connection is
    carried on its own, and a cut on the first proxy ends the same connection at the
    destination (an end of stream there: a UNIX socket has no RST) while the others go on."""
    destination = Destination(str(tmp_path / "dst.sock"))
    try:
        with (CutProxy(destination.address) as inbound,
              CutProxy(("127.0.0.1", inbound.port), listen_path=str(tmp_path / "src.sock"),
                       cut_index=2, cut_after=HELLO.size + 100) as outbound):
            assert outbound.url == f"unix:{tmp_path}/src.sock"
            socks = [dial(outbound, MAIN), *(dial(outbound, MEMORY, index=i) for i in (1, 2, 3))]
            for sock in socks[:2]:
                assert ask(sock, 4, b"m" * 500_000) == OK
            socks[2].sendall(request(4, b"c" * 1000))
            wait_for(lambda: len(destination.seen) == 4
                     and destination.seen[2]["end"] == "eof", "the cut to reach the destination")
            assert ask(socks[3], 4, b"n" * 1000) == OK
            assert [c.hello_index for c in outbound.connections] == [0, 1, 2, 3]
            assert [c.role for c in inbound.connections] == [MAIN, MEMORY, MEMORY, MEMORY]
            assert outbound.cuts == 1 and inbound.cuts == 0
            assert [r["end"] for r in destination.seen] == [None, None, "eof", None]
            for sock in socks:
                sock.close()
        assert not (tmp_path / "src.sock").exists()  # close() removes its socket file
    finally:
        destination.close()


def test_a_string_target_must_be_unix() -> None:
    with pytest.raises(ValueError, match="unix:PATH"):
        CutProxy("tcp:127.0.0.1:1")


def test_close_joins_everything(destination: Destination) -> None:
    before = threading.active_count()
    proxy = CutProxy(destination.address)
    socks = [dial(proxy, MAIN), dial(proxy, MEMORY, index=1)]
    proxy.stall(5)
    proxy.close()
    assert threading.active_count() <= before
    for sock in socks:
        sock.close()


def test_a_linger_zero_close_is_what_the_peer_sees() -> None:
    """The premise of every reset above, checked on plain sockets."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()
    server.close()
