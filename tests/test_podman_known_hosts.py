from __future__ import annotations

from pathlib import Path

import pytest

from hkpod.podman import add_known_host, connection_uri, remove_known_host

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1example0host0key0for0tests0only0000000 host\n"
OTHER_LINE = "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"


@pytest.fixture
def host_key(tmp_path: Path) -> Path:
    path = tmp_path / "host.pub"
    path.write_text(HOST_KEY)
    return path


def test_known_host_added_with_port(tmp_path: Path, host_key: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"
    add_known_host("podman", "127.0.0.1", 40022, host_key, known)
    assert known.read_text().splitlines() == [
        "[127.0.0.1]:40022 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1example0host0key0for0tests0only0000000 hkpod:podman"
    ]


def test_known_host_port_22_plain(tmp_path: Path, host_key: Path) -> None:
    known = tmp_path / "known_hosts"
    add_known_host("podman", "192.168.64.7", 22, host_key, known)
    assert known.read_text().startswith("192.168.64.7 ssh-ed25519 ")


def test_known_host_keeps_other_lines(tmp_path: Path, host_key: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(OTHER_LINE.rstrip("\n"))
    add_known_host("podman", "127.0.0.1", 40022, host_key, known)
    remove_known_host("podman", known)
    assert known.read_text() == OTHER_LINE


def test_known_host_readd_replaces(tmp_path: Path, host_key: Path) -> None:
    known = tmp_path / "known_hosts"
    add_known_host("podman", "127.0.0.1", 40022, host_key, known)
    add_known_host("podman", "127.0.0.1", 40023, host_key, known)
    assert [line.split()[0] for line in known.read_text().splitlines()] == ["[127.0.0.1]:40023"]


def test_known_host_remove_only_named(tmp_path: Path, host_key: Path) -> None:
    known = tmp_path / "known_hosts"
    add_known_host("podman", "127.0.0.1", 40022, host_key, known)
    add_known_host("podman2", "127.0.0.1", 40024, host_key, known)
    remove_known_host("podman", known)
    assert [line.split()[-1] for line in known.read_text().splitlines()] == ["hkpod:podman2"]


def test_known_host_new_file_private(tmp_path: Path, host_key: Path) -> None:
    known = tmp_path / "known_hosts"
    add_known_host("podman", "127.0.0.1", 40022, host_key, known)
    assert known.stat().st_mode & 0o777 == 0o600


def test_known_host_remove_missing_file(tmp_path: Path) -> None:
    remove_known_host("podman", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    ("host", "port", "uri"),
    [("127.0.0.1", 40022, "ssh://root@127.0.0.1:40022/run/podman/podman.sock"),
     ("192.168.64.7", 22, "ssh://root@192.168.64.7:22/run/podman/podman.sock"),
     ("fe80::1", 22, "ssh://root@[fe80::1]:22/run/podman/podman.sock")],
)
def test_connection_uri(host: str, port: int, uri: str) -> None:
    assert connection_uri("root", host, port) == uri
