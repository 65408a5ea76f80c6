"""`--image URL`: files fetched by URL, checked against the signed SHA256SUMS beside them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from hkpod.errors import HkpodError
from hkpod.sources import resolve_boot_files

from .helpers import CloudTree, GpgKeys, MirrorServer


@pytest.fixture
def served(make_tree: Callable[..., CloudTree], start_server: Callable[[Path], MirrorServer],
           trust_test_key: GpgKeys, isolated_home: Path) -> tuple[CloudTree, MirrorServer]:
    tree = make_tree(layout="parent")
    return tree, start_server(tree.root)


def url_of(server: MirrorServer, tree: CloudTree, name: str) -> str:
    return server.url.rstrip("/") + tree.url_path(name)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_url_image_and_boot_files_beside(served: tuple[CloudTree, MirrorServer]) -> None:
    tree, server = served
    # The tree lists a lowlatency kernel too, so the one beside the image must be named.
    with pytest.raises(HkpodError) as raised:
        resolve_boot_files(url_of(server, tree, tree.image_name), None, None, driver="qemu", mirror=None, verify=True)
    assert "vmlinuz" in raised.value.message


def test_url_image_with_kernel_urls(served: tuple[CloudTree, MirrorServer]) -> None:
    tree, server = served
    files = resolve_boot_files(url_of(server, tree, tree.image_name), url_of(server, tree, tree.kernel_name),
                               url_of(server, tree, tree.initrd_name), driver="qemu", mirror=None, verify=True)
    assert digest(files.image) == tree.digest(tree.image_name)
    assert digest(files.kernel) == tree.digest(tree.kernel_name)
    assert digest(files.initrd) == tree.digest(tree.initrd_name)
    assert sorted(files.digests) == sorted(tree.digest(name) for name in (tree.image_name, tree.kernel_name, tree.initrd_name))


def test_url_image_bad_signature(served: tuple[CloudTree, MirrorServer], isolated_home: Path) -> None:
    tree, server = served
    tree.write_sums(sign_with="other")
    with pytest.raises(HkpodError):
        resolve_boot_files(url_of(server, tree, tree.image_name), url_of(server, tree, tree.kernel_name),
                           url_of(server, tree, tree.initrd_name), driver="qemu", mirror=None, verify=True)
    blobs = isolated_home / "cache" / "images" / "blobs"
    assert not blobs.exists() or not any(path.is_file() for path in blobs.rglob("*"))


def test_url_kernel_own_sums(make_tree: Callable[..., CloudTree], start_server: Callable[[Path], MirrorServer],
                             trust_test_key: GpgKeys, isolated_home: Path) -> None:
    tree = make_tree(layout="separate")
    server = start_server(tree.root)
    files = resolve_boot_files(url_of(server, tree, tree.image_name), url_of(server, tree, tree.kernel_name),
                               url_of(server, tree, tree.initrd_name), driver="qemu", mirror=None, verify=True)
    assert digest(files.kernel) == tree.digest(tree.kernel_name)


def test_url_image_not_listed(served: tuple[CloudTree, MirrorServer]) -> None:
    tree, server = served
    with pytest.raises(HkpodError) as raised:
        resolve_boot_files(url_of(server, tree, "missing.img"), None, None, driver="qemu", mirror=None, verify=True)
    assert "missing.img is not listed" in raised.value.message


def test_url_kernel_with_local_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"raw")
    with pytest.raises(HkpodError) as raised:
        resolve_boot_files(str(image), "http://127.0.0.1:9/vmlinuz", None, driver="qemu", mirror=None, verify=True)
    assert "--kernel" in raised.value.message
