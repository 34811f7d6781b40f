"""TLS directories and tokens are checked, and named, before anything listens or connects."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tlsfiles import TlsDirs

from vmig.errors import ConfigError
from vmig.migration.params import ReceiveParams, SendParams
from vmig.transport.security import (
    TlsSide,
    generate_token,
    load_tls,
    read_token_file,
    token_bytes,
)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_good_directory_loads_for_its_side(tls: TlsDirs) -> None:
    server = load_tls(str(tls.dst), TlsSide.SERVER)
    assert server.warnings == () and server.context.minimum_version.name == "TLSv1_3"
    assert load_tls(str(tls.src), TlsSide.CLIENT).warnings == ()
    with pytest.raises(ConfigError, match=r"server-cert.pem is missing"):
        load_tls(str(tls.src), TlsSide.SERVER)  # a client directory is no server's


@pytest.mark.parametrize("name", ["ca-cert.pem", "server-cert.pem", "server-key.pem"])
def test_each_missing_file_is_named(tls: TlsDirs, tmp_path: Path, name: str) -> None:
    directory = _copy(tls.dst, tmp_path / "dst")
    (directory / name).unlink()
    with pytest.raises(ConfigError) as info:
        load_tls(str(directory), TlsSide.SERVER)
    assert str(info.value) == f"tls_dir: {directory / name} is missing"


@pytest.mark.parametrize(("name", "words"), [
    ("ca-cert.pem", "is not a usable CA certificate"),
    ("server-cert.pem", "is not a usable certificate"),
    ("server-key.pem", "is not a usable private key"),
])
def test_each_unusable_file_is_named(tls: TlsDirs, tmp_path: Path, name: str, words: str):
    directory = _copy(tls.dst, tmp_path / "dst")
    (directory / name).write_text("-----BEGIN GARBAGE-----\nxx\n-----END GARBAGE-----\n")
    with pytest.raises(ConfigError) as info:
        load_tls(str(directory), TlsSide.SERVER)
    message = str(info.value)
    assert message.startswith(f"tls_dir: {directory / name} {words}") and "\n" not in message


def test_a_key_from_another_pair_is_named(tls: TlsDirs, other_tls: TlsDirs, tmp_path: Path):
    directory = _copy(tls.dst, tmp_path / "dst")
    shutil.copy(other_tls.dst / "server-key.pem", directory / "server-key.pem")
    with pytest.raises(ConfigError, match=r"server-key\.pem is not a usable private key for"):
        load_tls(str(directory), TlsSide.SERVER)


def test_a_key_others_may_read_is_a_warning(tls: TlsDirs, tmp_path: Path) -> None:
    directory = _copy(tls.dst, tmp_path / "dst")
    (directory / "server-key.pem").chmod(0o644)
    loaded = load_tls(str(directory), TlsSide.SERVER)
    assert loaded.warnings == (f"tls_dir: the private key {directory}/server-key.pem may be "
                               "read by others (mode 0644); chmod 600 it",)
    resolved = ReceiveParams("tcp:127.0.0.1:0", tls_dir=str(directory)).resolve()
    assert resolved.warnings == loaded.warnings and resolved.generated_token is None


def test_not_a_directory_and_relative_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        load_tls(str(tmp_path / "none"), TlsSide.CLIENT)
    with pytest.raises(ConfigError, match="is not absolute"):
        load_tls("relative/dir", TlsSide.CLIENT)


def test_tokens(tmp_path: Path) -> None:
    token = generate_token()
    assert len(token) == 32 and int(token, 16) >= 0 and generate_token() != token
    assert token_bytes(f"  {token}\n") == token.encode()
    with pytest.raises(ConfigError, match="at least 16 characters"):
        token_bytes("guessable")
    path = tmp_path / "token"
    path.write_text(f"{token}\nignored\n")
    path.chmod(0o600)
    assert read_token_file(str(path)) == (token, [])
    path.chmod(0o640)
    assert "may be read by others (mode 0640)" in read_token_file(str(path))[1][0]
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(str(path))


def test_tcp_always_authenticates() -> None:
    made = ReceiveParams("tcp:127.0.0.1:0").resolve()
    assert made.generated_token and made.security.token == made.generated_token.encode()
    given = ReceiveParams("tcp:127.0.0.1:0", token="x" * 20).resolve()
    assert given.generated_token is None and given.security.token == b"x" * 20
    unix = ReceiveParams("unix:/tmp/m.sock").resolve()
    assert unix.security.token is None and unix.security.tls is None
    with pytest.raises(ConfigError, match="token: a tcp: destination needs the token"):
        SendParams("tcp:127.0.0.1:1").resolve()
    with pytest.raises(ConfigError, match="give token or token_file, not both"):
        SendParams("tcp:127.0.0.1:1", token="x" * 20, token_file="/x").resolve()
