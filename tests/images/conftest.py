"""Fixtures for the image tests: a local mirror server, a cloud-images-like tree and real gpg keys.

Everything runs against 127.0.0.1. A guard makes any other network address
fail the test, so no test can reach a real mirror.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hkpod.images.download import DownloadOptions

from .helpers import CloudTree, GpgKeys, MirrorHandler, MirrorHTTPServer, MirrorServer, new_key, run_gpg

# Network guard


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any name lookup or connection outside 127.0.0.0/8 and ::1, and drop proxy settings."""
    original = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = str(address[0])  # type: ignore[index]
            if not (host.startswith("127.") or host == "::1"):
                raise AssertionError(f"test tried to connect to {address!r}")
        return original(self, address)  # type: ignore[arg-type]

    def resolve_loopback(host: object, *args: object, **kwargs: object) -> object:
        if not (str(host).startswith("127.") or host in ("localhost", "::1", None)):
            raise AssertionError(f"test tried to resolve {host!r}")
        return original_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    original_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve_loopback)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HKPOD_MIRROR", raising=False)
    monkeypatch.delenv("HKPOD_TRUSTED_KEYS", raising=False)


# Local mirror server


@pytest.fixture
def start_server() -> Iterator[Callable[[Path], MirrorServer]]:
    """Return a function that starts a mirror server for a directory on 127.0.0.1, port 0."""
    started: list[tuple[MirrorHTTPServer, threading.Thread, MirrorServer]] = []

    def start(root: Path) -> MirrorServer:
        server = MirrorHTTPServer(("127.0.0.1", 0), MirrorHandler)
        mirror = MirrorServer(root=root, port=server.server_address[1])
        server.mirror = mirror
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread, mirror))
        return mirror

    yield start

    for server, thread, mirror in started:
        mirror.released.set()
        server.shutdown()
        server.server_close()
        thread.join()


# OpenPGP keys


@pytest.fixture(scope="session")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgKeys]:
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.fail("gpg and gpgv are required (apt-get install gnupg gpgv)")
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    trusted = new_key(home, "hkpod test <trusted@example.invalid>")
    other = new_key(home, "hkpod other <other@example.invalid>")
    trusted_pub = home / "trusted.asc"
    other_pub = home / "other.asc"
    trusted_pub.write_text(run_gpg(home, "--armor", "--export", trusted))
    other_pub.write_text(run_gpg(home, "--armor", "--export", other))

    yield GpgKeys(home, trusted, other, trusted_pub, other_pub)

    # Ends the gpg-agent that key generation started for this GNUPGHOME only.
    subprocess.run(
        ["gpgconf", "--kill", "gpg-agent"],
        env={**os.environ, "GNUPGHOME": str(home)},
        check=False,
        capture_output=True,
    )


@pytest.fixture
def trust_test_key(monkeypatch: pytest.MonkeyPatch, gpg_keys: GpgKeys) -> GpgKeys:
    monkeypatch.setenv("HKPOD_TRUSTED_KEYS", str(gpg_keys.trusted_pub))
    return gpg_keys


# A cloud-images-like tree


@pytest.fixture
def make_tree(tmp_path: Path, gpg_keys: GpgKeys) -> Callable[..., CloudTree]:
    counter = iter(range(1000))

    def make(**kwargs: object) -> CloudTree:
        root = tmp_path / f"mirror{next(counter)}"
        return CloudTree(root=root, keys=gpg_keys, **kwargs).build()  # type: ignore[arg-type]

    return make


@pytest.fixture
def fast_options() -> DownloadOptions:
    """Options for tests: no backoff sleeps, no progress bar, generous but bounded timeouts."""
    return DownloadOptions(
        connect_timeout=5.0, read_timeout=10.0, attempts=3, backoff=0.0, progress_bar=False
    )
