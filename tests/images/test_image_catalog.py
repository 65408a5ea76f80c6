from __future__ import annotations

import pytest

from hkpod.errors import HkpodError
from hkpod.images.catalog import (
    RELEASES,
    Arch,
    host_arch,
    is_catalog_name,
    lookup_release,
    newest_lts,
    parse_arch,
    resolve_image_name,
)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("ubuntu:24.04", "24.04"),
        ("ubuntu:noble", "24.04"),
        ("UBUNTU:Noble", "24.04"),
        ("  ubuntu:26.04 ", "26.04"),
        ("ubuntu:resolute", "26.04"),
        ("ubuntu:25.10", "25.10"),
    ],
)
def test_resolve_known_names(text: str, version: str) -> None:
    assert resolve_image_name(text).version == version


def test_lts_alias_is_newest_lts() -> None:
    newest = max((r for r in RELEASES if r.lts), key=lambda r: tuple(map(int, r.version.split("."))))
    assert resolve_image_name("ubuntu:lts") == newest


def test_newest_lts_is_lts() -> None:
    assert newest_lts().lts


def test_releases_sorted_oldest_first() -> None:
    versions = [tuple(map(int, r.version.split("."))) for r in RELEASES]
    assert versions == sorted(versions)


def test_codenames_unique() -> None:
    codenames = [r.codename for r in RELEASES]
    assert len(codenames) == len(set(codenames))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ubuntu:20.04", "has no podman"),
        ("ubuntu:focal", "has no podman"),
        ("ubuntu:22.04", "ships podman 3.4, older than API 4.0"),
        ("ubuntu:jammy", "ships podman 3.4, older than API 4.0"),
    ],
)
def test_old_podman_rejected(text: str, reason: str) -> None:
    with pytest.raises(HkpodError) as caught:
        resolve_image_name(text)
    assert reason in caught.value.message


def test_old_release_still_looked_up() -> None:
    assert lookup_release("ubuntu:jammy").version == "22.04"


def test_unknown_release_lists_known() -> None:
    with pytest.raises(HkpodError) as caught:
        resolve_image_name("ubuntu:18.04")
    assert "'ubuntu:18.04'" in caught.value.message
    assert "24.04 (noble)" in (caught.value.hint or "")


@pytest.mark.parametrize("text", ["debian:12", "noble", "./disk.img", "https://example.invalid/x.img"])
def test_non_catalog_name_rejected(text: str) -> None:
    with pytest.raises(HkpodError):
        resolve_image_name(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ubuntu:lts", True),
        ("Ubuntu:24.04", True),
        ("/tmp/disk.img", False),
        ("https://example.invalid/disk.img", False),
        ("ubuntu-24.04.img", False),
    ],
)
def test_is_catalog_name(text: str, expected: bool) -> None:
    assert is_catalog_name(text) is expected


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", Arch.AMD64), ("AMD64", Arch.AMD64), ("arm64", Arch.ARM64), ("aarch64", Arch.ARM64)],
)
def test_host_arch(machine: str, arch: Arch) -> None:
    assert host_arch(machine) is arch


def test_host_arch_unsupported() -> None:
    with pytest.raises(HkpodError, match="riscv64"):
        host_arch("riscv64")


def test_parse_arch_invalid() -> None:
    with pytest.raises(HkpodError, match="amd64, arm64"):
        parse_arch("x86")
