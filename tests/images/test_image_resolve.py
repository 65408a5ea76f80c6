from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from hkpod.images.catalog import Arch, lookup_release
from hkpod.images.download import DownloadOptions, Fetcher, UnavailableError
from hkpod.images.resolve import Resolver, Role, parse_sha256sums, pick, release_directory
from hkpod.images.signature import SignatureError, TrustedKeys

from .helpers import CloudTree, GpgKeys, MirrorServer

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{HEX} *disk.img\n", {"disk.img": HEX}),
        (f"{HEX}  disk.img\n", {"disk.img": HEX}),
        (f"{HEX.upper()} *unpacked/k\r\n", {"unpacked/k": HEX}),
        (f"\n{HEX} *a b.img\n\n", {"a b.img": HEX}),
        (f"garbage\n{HEX} *x\n-----BEGIN PGP SIGNATURE-----\n", {"x": HEX}),
    ],
)
def test_parse_sha256sums(text: str, expected: dict[str, str]) -> None:
    assert parse_sha256sums(text, "SUMS") == expected


@pytest.mark.parametrize("text", ["", "<html><body>Not Found</body></html>", f"{HEX[:-1]} *short\n"])
def test_parse_sha256sums_rejects(text: str) -> None:
    with pytest.raises(UnavailableError, match="contains no checksum lines"):
        parse_sha256sums(text, "SUMS")


NAMES = {
    "ubuntu-24.04-server-cloudimg-amd64.img": HEX,
    "ubuntu-24.04-server-cloudimg-arm64.img": HEX,
    "ubuntu-24.04-server-cloudimg-amd64-disk-kvm.img": HEX,
    "ubuntu-24.04-server-cloudimg-amd64.img.manifest": HEX,
    "unpacked/ubuntu-24.04-server-cloudimg-amd64-vmlinuz-generic": HEX,
    "unpacked/ubuntu-24.04-server-cloudimg-amd64-vmlinuz-lowlatency": HEX,
    "unpacked/ubuntu-24.04-server-cloudimg-arm64-initrd-generic": HEX,
}


@pytest.mark.parametrize(
    ("pattern", "prefix", "expected"),
    [
        (r"[^/]*-server-cloudimg-amd64\.img", "", "ubuntu-24.04-server-cloudimg-amd64.img"),
        (r"[^/]*-server-cloudimg-arm64\.img", "", "ubuntu-24.04-server-cloudimg-arm64.img"),
        (
            r"[^/]*-amd64-vmlinuz-generic",
            "unpacked/",
            "unpacked/ubuntu-24.04-server-cloudimg-amd64-vmlinuz-generic",
        ),
        (r"[^/]*-amd64-vmlinuz-generic", "", None),
        (r"[^/]*-amd64-initrd-generic", "unpacked/", None),
    ],
)
def test_pick(pattern: str, prefix: str, expected: str | None) -> None:
    assert pick(NAMES, re.compile(pattern), prefix) == expected


def test_release_directory() -> None:
    release = lookup_release("ubuntu:24.04")
    assert release_directory("http://m/x/", release) == "http://m/x/releases/noble/release/"


def _resolver(options: DownloadOptions, keys: TrustedKeys | None) -> Resolver:
    return Resolver(Fetcher(options), keys)


@pytest.mark.parametrize("layout", ["parent", "separate"])
@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_resolve_layouts(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    fast_options: DownloadOptions,
    gpg_keys: GpgKeys,
    layout: str,
    arch: str,
) -> None:
    tree = make_tree(layout=layout, arch=arch)
    server = start_server(tree.root)
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    resolved = _resolver(fast_options, keys).resolve(lookup_release("ubuntu:24.04"), Arch(arch), server.url)

    assert resolved.file(Role.IMAGE).name == tree.image_name
    assert resolved.file(Role.KERNEL).name == tree.kernel_name
    assert resolved.file(Role.INITRD).name == tree.initrd_name
    assert resolved.file(Role.KERNEL).url == server.url + tree.url_path(tree.kernel_name).lstrip("/")
    assert resolved.file(Role.INITRD).sha256 == tree.digest(tree.initrd_name)
    assert resolved.signed_by == gpg_keys.trusted_fpr


def test_separate_layout_reads_signed_unpacked_list(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    fast_options: DownloadOptions,
    gpg_keys: GpgKeys,
) -> None:
    tree = make_tree(layout="separate")
    server = start_server(tree.root)
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    _resolver(fast_options, keys).resolve(lookup_release("ubuntu:24.04"), Arch.AMD64, server.url)
    assert tree.url_path("unpacked/SHA256SUMS.gpg") in server.paths()


def test_unpacked_list_signed_by_other_key(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    fast_options: DownloadOptions,
    gpg_keys: GpgKeys,
) -> None:
    tree = make_tree(layout="separate")
    gpg_keys.sign(tree.directory / "unpacked" / "SHA256SUMS", key="other")
    server = start_server(tree.root)
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    with pytest.raises(SignatureError):
        _resolver(fast_options, keys).resolve(lookup_release("ubuntu:24.04"), Arch.AMD64, server.url)


def test_missing_release_names_pointer_directory(
    tmp_path: Path, start_server: Callable[[Path], MirrorServer], fast_options: DownloadOptions
) -> None:
    server = start_server(tmp_path)
    with pytest.raises(UnavailableError) as caught:
        _resolver(fast_options, None).resolve(lookup_release("ubuntu:24.04"), Arch.AMD64, server.url)
    assert caught.value.status == 404
    assert f"{server.url}releases/noble/release/SHA256SUMS" in caught.value.message
    assert "releases/noble/release/" in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("layout", "detail"),
    [("parent", "unpacked/SHA256SUMS was not found"), ("separate", "nor in")],
)
def test_missing_kernel_in_both_layouts(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    fast_options: DownloadOptions,
    layout: str,
    detail: str,
) -> None:
    tree = make_tree(layout=layout)
    (tree.directory / tree.kernel_name).unlink()
    tree.write_sums()
    server = start_server(tree.root)
    with pytest.raises(UnavailableError) as caught:
        _resolver(fast_options, None).resolve(lookup_release("ubuntu:24.04"), Arch.AMD64, server.url)
    assert "no *-amd64-vmlinuz-generic" in caught.value.message
    assert detail in caught.value.message


def test_missing_signature_file(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    fast_options: DownloadOptions,
    gpg_keys: GpgKeys,
) -> None:
    tree = make_tree()
    tree.write_sums(sign_with=None)
    server = start_server(tree.root)
    keys = TrustedKeys(path=gpg_keys.trusted_pub, fingerprints=None)
    with pytest.raises(UnavailableError, match="cannot fetch the signature"):
        _resolver(fast_options, keys).resolve(lookup_release("ubuntu:24.04"), Arch.AMD64, server.url)


def test_skip_verify_reads_no_signature(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    fast_options: DownloadOptions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tree = make_tree()
    tree.write_sums(sign_with=None)
    server = start_server(tree.root)
    resolved = _resolver(fast_options, None).resolve(lookup_release("ubuntu:24.04"), Arch.AMD64, server.url)
    assert resolved.signed_by is None
    assert tree.url_path("SHA256SUMS.gpg") not in server.paths()
    assert "NOT verifying the OpenPGP signature" in caplog.text
