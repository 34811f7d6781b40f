"""Test certificates made with the `openssl` command, as the README's walkthrough makes them.

`make_tls_dirs(root, name)` makes a CA and a destination and a source directory in
Cloud Hypervisor's layout::

    root/name/ca/      ca-cert.pem ca-key.pem
    root/name/dst/     ca-cert.pem server-cert.pem server-key.pem   (names 127.0.0.1, localhost)
    root/name/src/     ca-cert.pem client-cert.pem client-key.pem
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class TlsDirs:
    ca: Path
    dst: Path  # the receiver's --tls-dir
    src: Path  # the sender's --tls-dir


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _signed(ca: Path, directory: Path, side: str, subject: str, san: str | None) -> None:
    key, csr, cert = (directory / f"{side}-key.pem", directory / f"{side}.csr",
                      directory / f"{side}-cert.pem")
    request = ["req", "-new", *EC, "-subj", subject, "-keyout", str(key), "-out", str(csr)]
    if san:
        request += ["-addext", f"subjectAltName={san}"]
    _openssl(*request)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"),
             "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-copy_extensions", "copy",
             "-days", "30", "-out", str(cert))
    csr.unlink()
    shutil.copy(ca / "ca-cert.pem", directory / "ca-cert.pem")


def make_tls_dirs(root: Path, name: str = "tls",
                  server_san: str = "IP:127.0.0.1,DNS:localhost") -> TlsDirs:
    base = root / name
    dirs = TlsDirs(base / "ca", base / "dst", base / "src")
    for path in (dirs.ca, dirs.dst, dirs.src):
        path.mkdir(parents=True)
    _openssl("req", "-x509", *EC, "-days", "30", "-subj", f"/CN={name} test CA",
             "-keyout", str(dirs.ca / "ca-key.pem"), "-out", str(dirs.ca / "ca-cert.pem"))
    _signed(dirs.ca, dirs.dst, "server", "/CN=vmig destination", server_san)
    _signed(dirs.ca, dirs.src, "client", "/CN=vmig source", None)
    return dirs
