"""The image cache: verified files stored by sha256, and an index naming which files make an image.

Layout under the cache root:

    blobs/sha256/<hex>     verified file, read-only (0444), shared by all machines
    partial/NAME.part      download in progress, with NAME.part.json (its ETag) beside it
    index.json             {"ubuntu:24.04/amd64": image, kernel and initrd digests and URLs}
    lock                   flock()ed while the cache changes

A blob is only ever created by renaming a file whose sha256 was checked, so a
blob's name is its content.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hkpod.errors import HkpodError
from hkpod.images.catalog import Arch, UbuntuRelease, lookup_release, resolve_image_name
from hkpod.images.download import DownloadOptions, Fetcher, UnavailableError, format_size
from hkpod.images.mirrors import mirror_label
from hkpod.images.resolve import RemoteFile, ResolvedImage, Resolver, Role
from hkpod.images.signature import TrustedKeys

LOG = logging.getLogger(__name__)

INDEX_VERSION: Final = 1
BLOB_MODE: Final = 0o444
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CachedFile:
    """One verified file of a cached image."""

    role: Role
    sha256: str
    name: str
    url: str
    size: int


@dataclass(frozen=True)
class CachedImage:
    """An index entry: the files of one release and architecture, and where they came from."""

    key: str
    version: str
    codename: str
    arch: Arch
    mirror: str
    signed_by: str | None
    pulled_at: str
    files: tuple[CachedFile, ...]

    def file(self, role: Role) -> CachedFile:
        return next(item for item in self.files if item.role is role)

    def digests(self) -> frozenset[str]:
        return frozenset(item.sha256 for item in self.files)


@dataclass(frozen=True)
class ImageListing:
    """A cached image with the space its blobs take: apparent (st_size) and allocated (st_blocks)."""

    image: CachedImage
    apparent_bytes: int
    allocated_bytes: int
    missing: tuple[str, ...]


@dataclass(frozen=True)
class RemovalResult:
    """Outcome of `remove_image` and `prune`: deleted entries and blobs, and blobs kept for machines."""

    images: tuple[str, ...]
    blobs: tuple[str, ...]
    freed_bytes: int
    kept_in_use: tuple[str, ...]


def cache_key(release: UbuntuRelease, arch: Arch) -> str:
    """Return the index key, e.g. `ubuntu:24.04/amd64`."""
    return f"{release.name}/{arch.value}"


def blob_path(cache_root: Path, digest: str) -> Path:
    if not _DIGEST.fullmatch(digest):
        raise HkpodError(f"invalid sha256 digest {digest!r}", "expected 64 lowercase hex digits")
    return cache_root / "blobs" / "sha256" / digest


def _partial_path(cache_root: Path, remote: RemoteFile) -> Path:
    # Keyed by file name, not digest. When a new build replaces the file on the mirror,
    # the old ETag in If-Range no longer matches, so the server sends the new file whole.
    basename = remote.name.rsplit("/", 1)[-1].lstrip(".")
    return cache_root / "partial" / f"{basename}.part"


def _index_path(cache_root: Path) -> Path:
    return cache_root / "index.json"


@contextmanager
def cache_lock(cache_root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache, so two hkpod processes never write it at once."""
    cache_root.mkdir(parents=True, exist_ok=True)
    with (cache_root / "lock").open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info("waiting for another hkpod process to finish with the image cache %s", cache_root)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# Index file


def _load_index(cache_root: Path) -> dict[str, CachedImage]:
    path = _index_path(cache_root)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise HkpodError(
            f"cannot read the image index {path}: {error}",
            "delete the file; cached images are then pulled again",
        ) from error

    if not isinstance(raw, dict) or raw.get("version") != INDEX_VERSION:
        raise HkpodError(
            f"unsupported image index {path}",
            "delete the file; cached images are then pulled again",
        )
    try:
        return {key: _image_from_json(key, value) for key, value in raw.get("images", {}).items()}
    except (KeyError, TypeError, ValueError) as error:
        raise HkpodError(f"corrupt image index {path}: {error}", "delete the file") from error


def _save_index(cache_root: Path, images: dict[str, CachedImage]) -> None:
    data = {
        "version": INDEX_VERSION,
        "images": {key: _image_to_json(images[key]) for key in sorted(images)},
    }
    path = _index_path(cache_root)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as out:
        out.write(json.dumps(data, indent=2) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _image_to_json(image: CachedImage) -> dict[str, Any]:
    return {
        "version": image.version,
        "codename": image.codename,
        "arch": image.arch.value,
        "mirror": image.mirror,
        "signed_by": image.signed_by,
        "pulled_at": image.pulled_at,
        "files": {
            item.role.value: {"sha256": item.sha256, "name": item.name, "url": item.url, "size": item.size}
            for item in image.files
        },
    }


def _image_from_json(key: str, value: dict[str, Any]) -> CachedImage:
    files = tuple(
        CachedFile(
            role=Role(role),
            sha256=str(entry["sha256"]),
            name=str(entry["name"]),
            url=str(entry["url"]),
            size=int(entry["size"]),
        )
        for role, entry in value["files"].items()
    )
    return CachedImage(
        key=key,
        version=str(value["version"]),
        codename=str(value["codename"]),
        arch=Arch(value["arch"]),
        mirror=str(value["mirror"]),
        signed_by=value.get("signed_by"),
        pulled_at=str(value["pulled_at"]),
        files=files,
    )


# Queries


def get_image(cache_root: Path, release: UbuntuRelease, arch: Arch) -> CachedImage | None:
    """Return the cached image of RELEASE for ARCH when its index entry and all its blobs exist."""
    image = _load_index(cache_root).get(cache_key(release, arch))
    if image is None:
        return None
    if any(not blob_path(cache_root, digest).is_file() for digest in image.digests()):
        LOG.info("cached %s is incomplete; pulling it again", image.key)
        return None
    return image


def list_images(cache_root: Path) -> list[ImageListing]:
    """Return every cached image with its sizes, for `hkpod image ls`."""
    listings = []
    for _, image in sorted(_load_index(cache_root).items()):
        apparent = allocated = 0
        missing = []
        for digest in sorted(image.digests()):
            try:
                info = blob_path(cache_root, digest).stat()
            except FileNotFoundError:
                missing.append(digest)
                continue
            apparent += info.st_size
            allocated += info.st_blocks * 512
        listings.append(ImageListing(image, apparent, allocated, tuple(missing)))
    return listings


def disk_usage(cache_root: Path) -> tuple[int, int]:
    """Return (apparent, allocated) bytes of all blobs and partial downloads, each file counted once."""
    apparent = allocated = 0
    for directory in (cache_root / "blobs" / "sha256", cache_root / "partial"):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            info = path.stat()
            apparent += info.st_size
            allocated += info.st_blocks * 512
    return apparent, allocated


# Pull


def ensure_image(
    cache_root: Path,
    name: str,
    arch: Arch,
    mirrors: Sequence[str],
    *,
    verify: bool = True,
    options: DownloadOptions | None = None,
    fetcher: Fetcher | None = None,
) -> CachedImage:
    """Return the cached image NAME for ARCH, pulling it first when it is not in the cache.

    This is what `hkpod create` calls: with the image cached it needs no network.
    """
    release = resolve_image_name(name)
    cached = get_image(cache_root, release, arch)
    if cached is not None:
        LOG.debug("using cached %s (pulled %s)", cached.key, cached.pulled_at)
        return cached
    return pull_image(cache_root, name, arch, mirrors, verify=verify, options=options, fetcher=fetcher)


def pull_image(
    cache_root: Path,
    name: str,
    arch: Arch,
    mirrors: Sequence[str],
    *,
    verify: bool = True,
    options: DownloadOptions | None = None,
    fetcher: Fetcher | None = None,
) -> CachedImage:
    """Fetch the newest build of NAME for ARCH from the first mirror that has it, and cache it.

    Mirrors are tried in order when one is unavailable (HTTP error, timeout,
    stalled transfer). A bad signature or checksum stops at once. VERIFY False
    skips the OpenPGP check (--insecure-skip-verify) but never the sha256.
    """
    if not mirrors:
        raise HkpodError("no mirror to pull from", "pass --mirror NAME or URL")
    release = resolve_image_name(name)
    keys = TrustedKeys.from_environ() if verify else None
    owned = fetcher is None
    active = fetcher or Fetcher(options)

    try:
        with cache_lock(cache_root):
            return _pull_from_mirrors(cache_root, release, arch, mirrors, Resolver(active, keys))
    finally:
        if owned:
            active.close()


def _pull_from_mirrors(
    cache_root: Path,
    release: UbuntuRelease,
    arch: Arch,
    mirrors: Sequence[str],
    resolver: Resolver,
) -> CachedImage:
    failures: list[tuple[str, UnavailableError]] = []
    for number, mirror in enumerate(mirrors, start=1):
        LOG.info("looking up %s for %s on %s", release.name, arch.value, mirror_label(mirror))
        try:
            resolved = resolver.resolve(release, arch, mirror)
            # The small kernel and initrd first, so a mirror without them fails before the image.
            order = (Role.KERNEL, Role.INITRD, Role.IMAGE)
            fetched = {role: fetch_blob(cache_root, resolver.fetcher, resolved.file(role)) for role in order}
            files = tuple(fetched[remote.role] for remote in resolved.files)
        except UnavailableError as error:
            failures.append((mirror, error))
            if number < len(mirrors):
                LOG.warning("mirror %s failed: %s; trying the next mirror", mirror_label(mirror), error)
            continue
        return _record(cache_root, resolved, files)

    if len(failures) == 1:
        raise failures[0][1]
    # Each message names its URL, and so its mirror.
    summary = "; ".join(error.message for _, error in failures)
    raise HkpodError(
        f"no mirror could provide {release.name} for {arch.value}: {summary}",
        "check the network, or name other mirrors with --mirror",
    )


def fetch_blob(cache_root: Path, fetcher: Fetcher, remote: RemoteFile) -> CachedFile:
    """Download REMOTE into the content-addressed cache unless it is there already; call with cache_lock held."""
    target = blob_path(cache_root, remote.sha256)
    if target.is_file():
        LOG.info("%s %s is already cached", remote.role.value, remote.name)
    else:
        LOG.info("downloading %s %s", remote.role.value, remote.url)
        fetcher.download(
            remote.url,
            target,
            sha256=remote.sha256,
            part=_partial_path(cache_root, remote),
            mode=BLOB_MODE,
            label=remote.name.rsplit("/", 1)[-1],
        )
    size = target.stat().st_size
    return CachedFile(remote.role, remote.sha256, remote.name, remote.url, size)


def _record(cache_root: Path, resolved: ResolvedImage, files: tuple[CachedFile, ...]) -> CachedImage:
    image = CachedImage(
        key=cache_key(resolved.release, resolved.arch),
        version=resolved.release.version,
        codename=resolved.release.codename,
        arch=resolved.arch,
        mirror=resolved.mirror,
        signed_by=resolved.signed_by,
        pulled_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        files=files,
    )
    images = _load_index(cache_root)
    previous = images.get(image.key)
    images[image.key] = image
    _save_index(cache_root, images)

    total = sum(item.size for item in files)
    LOG.info("cached %s (%s)", image.key, format_size(total))
    if previous is not None and previous.digests() != image.digests():
        LOG.info("the previous build of %s stays cached until `hkpod image prune`", image.key)
    return image


# Removal


def remove_image(
    cache_root: Path,
    name: str,
    in_use: set[str] | frozenset[str],
    arch: Arch | None = None,
) -> RemovalResult:
    """Drop NAME (for ARCH, or every architecture) from the index and delete its unused blobs.

    IN_USE contains the digests that machines use. Those blobs are kept.
    """
    release = lookup_release(name)
    with cache_lock(cache_root):
        images = _load_index(cache_root)
        doomed = [
            key
            for key, image in images.items()
            if image.version == release.version and (arch is None or image.arch is arch)
        ]
        if not doomed:
            suffix = f" for {arch.value}" if arch else ""
            raise HkpodError(f"{release.name}{suffix} is not in the image cache", "see `hkpod image ls`")

        candidates = frozenset().union(*(images.pop(key).digests() for key in doomed))
        still_listed = frozenset().union(*(image.digests() for image in images.values()))
        _save_index(cache_root, images)
        return _delete_blobs(cache_root, candidates - still_listed, in_use, tuple(sorted(doomed)))


def prune(cache_root: Path, in_use: set[str] | frozenset[str]) -> RemovalResult:
    """Delete every blob no machine uses, the index entries that needed them, and partial downloads."""
    with cache_lock(cache_root):
        blob_dir = cache_root / "blobs" / "sha256"
        present = (
            frozenset(path.name for path in blob_dir.iterdir() if _DIGEST.fullmatch(path.name))
            if blob_dir.is_dir()
            else frozenset()
        )

        images = _load_index(cache_root)
        doomed = tuple(sorted(key for key, image in images.items() if not image.digests() <= in_use))
        for key in doomed:
            del images[key]
        _save_index(cache_root, images)

        result = _delete_blobs(cache_root, present, in_use, doomed)
        freed = result.freed_bytes + _clear_partial(cache_root)
        return RemovalResult(result.images, result.blobs, freed, result.kept_in_use)


def _delete_blobs(
    cache_root: Path,
    candidates: frozenset[str],
    in_use: set[str] | frozenset[str],
    images: tuple[str, ...],
) -> RemovalResult:
    deleted = []
    freed = 0
    for digest in sorted(candidates - in_use):
        path = blob_path(cache_root, digest)
        try:
            info = path.stat()
            path.unlink()
        except FileNotFoundError:
            continue
        deleted.append(digest)
        freed += info.st_blocks * 512
    kept = tuple(sorted(candidates & in_use))
    for digest in kept:
        LOG.info("keeping blob %s: a machine uses it", digest)
    return RemovalResult(images=images, blobs=tuple(deleted), freed_bytes=freed, kept_in_use=kept)


def _clear_partial(cache_root: Path) -> int:
    directory = cache_root / "partial"
    freed = 0
    if not directory.is_dir():
        return freed
    for path in directory.iterdir():
        freed += path.stat().st_blocks * 512
        path.unlink()
    return freed
