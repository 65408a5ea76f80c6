"""Images given by URL: `--image https://host/dir/disk.img`, verified like catalog images.

The directory of each URL must carry a SHA256SUMS that lists the file, signed in
SHA256SUMS.gpg by a trusted key (the Ubuntu key, or HKPOD_TRUSTED_KEYS), as
cloud-images.ubuntu.com and its mirrors lay out every release directory. The
kernel and initrd come from --kernel and --initrd (URLs or local paths), or else
from the same SHA256SUMS, where exactly one `*vmlinuz*` and one `*initrd*` entry
must be listed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from hkpod.errors import HkpodError
from hkpod.images.cache import fetch_blob, cache_lock, blob_path
from hkpod.images.download import Fetcher, UnavailableError
from hkpod.images.resolve import SIGNATURE_NAME, SUMS_NAME, RemoteFile, Role, parse_sha256sums
from hkpod.images.signature import TrustedKeys, verify_signature

LOG = logging.getLogger(__name__)

_BESIDE_PATTERNS = {Role.KERNEL: re.compile(r"(.*/)?[^/]*vmlinuz[^/]*"), Role.INITRD: re.compile(r"(.*/)?[^/]*initrd[^/]*")}


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


@dataclass(frozen=True)
class UrlFiles:
    """Cached blobs for a URL image; kernel and initrd are None where they were given as local paths."""

    image: Path
    kernel: Path | None
    initrd: Path | None
    digests: tuple[str, ...]


def _split(url: str) -> tuple[str, str]:
    directory, _, name = url.rpartition("/")
    if not name:
        raise HkpodError(f"--image {url} names a directory, not a file", "give the URL of the image file itself")
    return directory + "/", name


def _signed_sums(fetcher: Fetcher, directory: str, keys: TrustedKeys | None) -> dict[str, str]:
    sums_url = directory + SUMS_NAME
    try:
        data = fetcher.fetch_bytes(sums_url)
    except UnavailableError as error:
        hint = ("an image URL needs a SHA256SUMS listing it in the same directory" if error.status == 404
                else "check the URL and that the server is reachable")
        raise HkpodError(f"cannot fetch {sums_url}: {error.message}", hint) from error
    if keys is None:
        LOG.warning("NOT verifying the OpenPGP signature of %s (--insecure-skip-verify)", sums_url)
    else:
        signature = fetcher.fetch_bytes(directory + SIGNATURE_NAME, max_size=1 << 20)
        verify_signature(data, signature, keys=keys, origin=sums_url)
    return parse_sha256sums(data.decode("utf-8", errors="replace"), sums_url)


def _listed(sums: dict[str, str], directory: str, name: str, role: Role) -> RemoteFile:
    if name not in sums:
        raise HkpodError(f"{name} is not listed in {directory}{SUMS_NAME}", f"check the {role.value} URL")
    return RemoteFile(role, name, directory + name, sums[name])


def _beside(sums: dict[str, str], directory: str, role: Role) -> RemoteFile:
    matches = sorted(name for name in sums if _BESIDE_PATTERNS[role].fullmatch(name))
    if len(matches) != 1:
        found = ", ".join(matches) or "none"
        raise HkpodError(f"{directory}{SUMS_NAME} lists {len(matches)} {role.value} files ({found})",
                         f"pass --{role.value} URL or PATH")
    return _listed(sums, directory, matches[0], role)


def fetch_url_image(cache_root: Path, image_url: str, kernel: str | None, initrd: str | None, *,
                    verify: bool, fetcher: Fetcher | None = None) -> UrlFiles:
    """Download IMAGE_URL (and a kernel and initrd given as URLs or found beside it) into the cache."""
    keys = TrustedKeys.from_environ() if verify else None
    owned = fetcher is None
    active = fetcher or Fetcher()
    try:
        directory, name = _split(image_url)
        sums = _signed_sums(active, directory, keys)
        remotes = [_listed(sums, directory, name, Role.IMAGE)]
        for role, given in ((Role.KERNEL, kernel), (Role.INITRD, initrd)):
            if given is None:
                remotes.append(_beside(sums, directory, role))
            elif is_url(given) and given.startswith(directory) and given[len(directory):] in sums:
                # Ubuntu lists unpacked/ files in the release directory's SHA256SUMS too.
                remotes.append(_listed(sums, directory, given[len(directory):], role))
            elif is_url(given):
                other_directory, other_name = _split(given)
                remotes.append(_listed(_signed_sums(active, other_directory, keys), other_directory, other_name, role))
        with cache_lock(cache_root):
            cached = {remote.role: fetch_blob(cache_root, active, remote) for remote in remotes}
    finally:
        if owned:
            active.close()
    return UrlFiles(
        image=blob_path(cache_root, cached[Role.IMAGE].sha256),
        kernel=blob_path(cache_root, cached[Role.KERNEL].sha256) if Role.KERNEL in cached else None,
        initrd=blob_path(cache_root, cached[Role.INITRD].sha256) if Role.INITRD in cached else None,
        digests=tuple(sorted(item.sha256 for item in cached.values())),
    )
