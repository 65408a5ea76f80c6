from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from hkpod.errors import HkpodError
from hkpod.images.cache import (
    blob_path,
    disk_usage,
    ensure_image,
    get_image,
    list_images,
    prune,
    pull_image,
    remove_image,
)
from hkpod.images.catalog import Arch, lookup_release
from hkpod.images.download import ChecksumError, DownloadOptions, UnavailableError
from hkpod.images.resolve import Role
from hkpod.images.signature import SignatureError

from .helpers import IMAGE_SIZE, CloudTree, GpgKeys, MirrorServer

NAME = "ubuntu:24.04"


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def mirror(
    make_tree: Callable[..., CloudTree], start_server: Callable[[Path], MirrorServer], trust_test_key: GpgKeys
) -> tuple[CloudTree, MirrorServer]:
    tree = make_tree()
    return tree, start_server(tree.root)


def blobs(cache_root: Path) -> list[str]:
    directory = cache_root / "blobs" / "sha256"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def assert_nothing_cached(cache_root: Path) -> None:
    assert blobs(cache_root) == []
    assert list_images(cache_root) == []


def assert_not_cached(cache_root: Path, digest: str) -> None:
    """Check that DIGEST is absent, no image is listed, and every blob left matches its own digest."""
    assert digest not in blobs(cache_root)
    assert list_images(cache_root) == []
    for name in blobs(cache_root):
        assert hashlib.sha256(blob_path(cache_root, name).read_bytes()).hexdigest() == name


@pytest.mark.parametrize("layout", ["parent", "separate"])
def test_full_pull(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
    layout: str,
) -> None:
    tree = make_tree(layout=layout)
    server = start_server(tree.root)
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)

    assert image.key == "ubuntu:24.04/amd64"
    assert image.signed_by == trust_test_key.trusted_fpr
    for role, name in [
        (Role.IMAGE, tree.image_name),
        (Role.KERNEL, tree.kernel_name),
        (Role.INITRD, tree.initrd_name),
    ]:
        path = blob_path(cache_root, image.file(role).sha256)
        assert path.read_bytes() == tree.data(name), role
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, role
        assert image.file(role).name == name, role
    assert len(blobs(cache_root)) == 3
    assert list(cache_root.joinpath("partial").iterdir()) == []


def test_index_records_sources(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    entry = json.loads((cache_root / "index.json").read_text())["images"]["ubuntu:24.04/amd64"]
    assert entry["mirror"] == server.url
    assert entry["files"]["kernel"]["url"] == server.url + tree.url_path(tree.kernel_name).lstrip("/")
    assert entry["files"]["image"]["size"] == IMAGE_SIZE
    assert entry["pulled_at"].endswith("+00:00")


def test_checksum_lists_not_cached(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert server.paths().count(tree.url_path("SHA256SUMS")) == 2
    assert not list(cache_root.rglob("SHA256SUMS*"))


def test_second_pull_reuses_blobs(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert len(server.requests_for(tree.url_path(tree.image_name))) == 1


def test_ensure_uses_cache_offline(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    _, server = mirror
    first = ensure_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    before = len(server.log)
    again = ensure_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert again == first
    assert len(server.log) == before


def test_ensure_repulls_missing_blob(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    image = ensure_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    blob_path(cache_root, image.file(Role.KERNEL).sha256).unlink()
    ensure_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert len(server.requests_for(tree.url_path(tree.kernel_name))) == 2
    assert len(server.requests_for(tree.url_path(tree.image_name))) == 1


def test_lts_alias_pulls_newest_lts(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
) -> None:
    lts = lookup_release("ubuntu:lts")
    tree = make_tree(version=lts.version, codename=lts.codename)
    server = start_server(tree.root)
    image = pull_image(cache_root, "ubuntu:lts", Arch.AMD64, [server.url], options=fast_options)
    assert image.key == f"ubuntu:{lts.version}/amd64"
    assert image.file(Role.IMAGE).name == tree.image_name


def test_cut_download_resumes_next_run(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    path = tree.url_path(tree.image_name)
    cut = 1_500_000
    server.cut_after[path] = [cut]
    once = replace(fast_options, attempts=1)
    with pytest.raises(UnavailableError):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=once)
    assert_not_cached(cache_root, tree.digest(tree.image_name))

    pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=once)
    first, second = server.requests_for(path)
    assert first.sent == cut
    assert second.range == f"bytes={cut}-"
    assert second.sent == IMAGE_SIZE - cut
    assert get_image(cache_root, lookup_release(NAME), Arch.AMD64) is not None


def test_server_ignoring_range(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    path = tree.url_path(tree.image_name)
    server.ignore_range = True
    server.cut_after[path] = [1_000_000]
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)

    second = server.requests_for(path)[1]
    assert second.status == 200
    assert second.sent == IMAGE_SIZE
    assert blob_path(cache_root, image.file(Role.IMAGE).sha256).read_bytes() == tree.data(tree.image_name)


def test_new_build_fetched_whole(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    path = tree.url_path(tree.image_name)
    server.cut_after[path] = [1_000_000]
    once = replace(fast_options, attempts=1)
    with pytest.raises(UnavailableError):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=once)

    tree.seed = 2
    tree.build()
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=once)

    second = server.requests_for(path)[1]
    assert second.if_range is not None
    assert second.status == 200
    assert second.sent == IMAGE_SIZE
    assert image.file(Role.IMAGE).sha256 == tree.digest(tree.image_name)


def test_checksum_mismatch(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    (tree.directory / tree.image_name).write_bytes(b"tampered" * 1000)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert_not_cached(cache_root, hashlib.sha256(b"tampered" * 1000).hexdigest())
    assert list(cache_root.joinpath("partial").iterdir()) == []


def test_signature_by_other_key(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    tree.write_sums(sign_with="other")
    with pytest.raises(SignatureError, match="which is not the keys in"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert_nothing_cached(cache_root)
    assert tree.url_path(tree.image_name) not in server.paths()


def test_signature_over_other_bytes(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    sums = tree.directory / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64} *extra.img\n")
    with pytest.raises(SignatureError, match="does not match its signature"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert_nothing_cached(cache_root)


def test_pinned_key_by_default(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    cache_root: Path,
    fast_options: DownloadOptions,
) -> None:
    tree = make_tree()
    server = start_server(tree.root)
    with pytest.raises(SignatureError, match="D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert_nothing_cached(cache_root)


def test_skip_verify_still_checks_sha256(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    cache_root: Path,
    fast_options: DownloadOptions,
) -> None:
    tree = make_tree()
    tree.write_sums(sign_with=None)
    server = start_server(tree.root)
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options, verify=False)
    assert image.signed_by is None

    (tree.directory / tree.kernel_name).write_bytes(b"changed")
    remove_image(cache_root, NAME, set())
    with pytest.raises(ChecksumError):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options, verify=False)


def test_missing_kernel(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    (tree.directory / tree.kernel_name).unlink()
    with pytest.raises(UnavailableError) as caught:
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert caught.value.status == 404
    assert tree.url_path(tree.kernel_name) in caught.value.message
    assert_nothing_cached(cache_root)
    assert tree.url_path(tree.image_name) not in server.paths()


def test_html_error_body(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    server.html.add(tree.url_path(tree.initrd_name))
    with pytest.raises(UnavailableError, match="returned an HTML page"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert_not_cached(cache_root, tree.digest(tree.initrd_name))
    assert tree.url_path(tree.image_name) not in server.paths()


def test_html_instead_of_checksums(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    server.html.add(tree.url_path("SHA256SUMS"))
    with pytest.raises(UnavailableError, match="returned an HTML page"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    assert_nothing_cached(cache_root)


def test_stalled_server(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    server.stall_after[tree.url_path(tree.image_name)] = 100_000
    options = replace(fast_options, read_timeout=0.3, attempts=2)
    with pytest.raises(UnavailableError, match="read timeout"):
        pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=options)
    assert_not_cached(cache_root, tree.digest(tree.image_name))


def test_second_mirror_after_404(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
    tmp_path: Path,
) -> None:
    empty = start_server(tmp_path / "empty")
    tree = make_tree()
    good = start_server(tree.root)
    unnamed = start_server(tree.root)

    image = pull_image(cache_root, NAME, Arch.AMD64, [empty.url, good.url], options=fast_options)
    assert image.mirror == good.url
    assert [r.status for r in empty.log] == [404]
    assert tree.url_path(tree.image_name) in good.paths()
    assert unnamed.log == []


def test_second_mirror_after_stall(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
) -> None:
    tree = make_tree()
    stalled = start_server(tree.root)
    stalled.stall_after[tree.url_path(tree.image_name)] = 0
    good = start_server(tree.root)
    options = replace(fast_options, read_timeout=0.3, attempts=1)

    image = pull_image(cache_root, NAME, Arch.AMD64, [stalled.url, good.url], options=options)
    assert image.mirror == good.url
    assert blob_path(cache_root, image.file(Role.IMAGE).sha256).read_bytes() == tree.data(tree.image_name)


def test_all_mirrors_fail(
    start_server: Callable[[Path], MirrorServer],
    make_tree: Callable[..., CloudTree],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
    tmp_path: Path,
) -> None:
    first = start_server(tmp_path / "a")
    second = start_server(tmp_path / "b")
    unnamed = start_server(make_tree().root)
    with pytest.raises(HkpodError) as caught:
        pull_image(cache_root, NAME, Arch.AMD64, [first.url, second.url], options=fast_options)
    assert first.url in caught.value.message
    assert second.url in caught.value.message
    assert unnamed.log == []


def test_bad_signature_stops_mirror_list(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
) -> None:
    bad = make_tree()
    bad.write_sums(sign_with="other")
    bad_server = start_server(bad.root)
    good_server = start_server(make_tree().root)
    with pytest.raises(SignatureError):
        pull_image(cache_root, NAME, Arch.AMD64, [bad_server.url, good_server.url], options=fast_options)
    assert good_server.log == []


def test_list_sizes(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    tree, server = mirror
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    (listing,) = list_images(cache_root)
    expected = sum(len(tree.data(n)) for n in (tree.image_name, tree.kernel_name, tree.initrd_name))
    allocated = sum(blob_path(cache_root, d).stat().st_blocks * 512 for d in image.digests())
    assert listing.image == image
    assert listing.apparent_bytes == expected
    assert listing.allocated_bytes == allocated
    assert listing.missing == ()
    assert disk_usage(cache_root) == (expected, allocated)


def test_remove_keeps_blobs_in_use(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    _, server = mirror
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    kernel = image.file(Role.KERNEL).sha256
    result = remove_image(cache_root, "ubuntu:noble", {kernel})

    assert result.images == ("ubuntu:24.04/amd64",)
    assert result.kept_in_use == (kernel,)
    assert blobs(cache_root) == [kernel]
    assert list_images(cache_root) == []


def test_remove_unknown(cache_root: Path) -> None:
    with pytest.raises(HkpodError, match=r"ubuntu:24\.04 is not in the image cache"):
        remove_image(cache_root, NAME, set())


def test_prune(
    make_tree: Callable[..., CloudTree],
    start_server: Callable[[Path], MirrorServer],
    trust_test_key: GpgKeys,
    cache_root: Path,
    fast_options: DownloadOptions,
) -> None:
    noble = make_tree()
    lts = lookup_release("ubuntu:lts")
    newest = make_tree(version=lts.version, codename=lts.codename, seed=5)
    server_a = start_server(noble.root)
    server_b = start_server(newest.root)
    used = pull_image(cache_root, NAME, Arch.AMD64, [server_a.url], options=fast_options)
    unused = pull_image(cache_root, "ubuntu:lts", Arch.AMD64, [server_b.url], options=fast_options)
    leftover = cache_root / "partial" / "old.img.part"
    leftover.write_bytes(b"x" * 4096)

    result = prune(cache_root, set(used.digests()))
    assert result.images == (unused.key,)
    assert sorted(result.blobs) == sorted(unused.digests())
    assert blobs(cache_root) == sorted(used.digests())
    assert [entry.image.key for entry in list_images(cache_root)] == [used.key]
    assert not leftover.exists()


def test_prune_everything(
    mirror: tuple[CloudTree, MirrorServer], cache_root: Path, fast_options: DownloadOptions
) -> None:
    _, server = mirror
    image = pull_image(cache_root, NAME, Arch.AMD64, [server.url], options=fast_options)
    result = prune(cache_root, set())
    assert result.images == (image.key,)
    assert result.freed_bytes > IMAGE_SIZE
    assert_nothing_cached(cache_root)


def test_prune_empty_cache(cache_root: Path) -> None:
    assert prune(cache_root, set()).blobs == ()


def test_corrupt_index(cache_root: Path) -> None:
    cache_root.mkdir()
    (cache_root / "index.json").write_text("{not json")
    with pytest.raises(HkpodError, match="cannot read the image index"):
        list_images(cache_root)


def test_old_podman_not_pulled(
    cache_root: Path, tmp_path: Path, start_server: Callable[[Path], MirrorServer]
) -> None:
    server = start_server(tmp_path)
    with pytest.raises(HkpodError, match=r"older than API 4\.0"):
        pull_image(cache_root, "ubuntu:22.04", Arch.AMD64, [server.url])
    assert server.log == []
