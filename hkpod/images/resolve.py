"""Find the disk image, kernel and initrd of an Ubuntu release on a mirror, with their sha256.

File names differ between trees and have changed over the years
(`ubuntu-24.04-server-cloudimg-amd64.img` in releases/, `noble-server-...` in
the daily tree), so they are matched by pattern in the signed SHA256SUMS and
never built by hand. The kernel and initrd sit in `unpacked/`, listed either in
the parent's SHA256SUMS as `unpacked/NAME` or in `unpacked/SHA256SUMS`.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from hkpod.images.catalog import Arch, UbuntuRelease
from hkpod.images.download import Fetcher, UnavailableError
from hkpod.images.signature import TrustedKeys, verify_signature

LOG = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
SIGNATURE_NAME = "SHA256SUMS.gpg"
UNPACKED_DIR = "unpacked/"

# "<64 hex digits> *<name>" (binary mode) or "<hex>  <name>" (text mode), as sha256sum writes.
_SUMS_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](\S.*)")


class Role(enum.Enum):
    """Purpose of a downloaded file when the guest boots."""

    IMAGE = "image"
    KERNEL = "kernel"
    INITRD = "initrd"


@dataclass(frozen=True)
class RemoteFile:
    """One file on the mirror: its role, name as listed in SHA256SUMS, URL and digest."""

    role: Role
    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class ResolvedImage:
    """A release's image, kernel and initrd on one mirror. `signed_by` is None when not verified."""

    release: UbuntuRelease
    arch: Arch
    mirror: str
    directory: str
    files: tuple[RemoteFile, ...]
    signed_by: str | None

    def file(self, role: Role) -> RemoteFile:
        return next(item for item in self.files if item.role is role)


def release_directory(mirror: str, release: UbuntuRelease) -> str:
    """Return the URL of the `release/` pointer directory, which points to the newest released build."""
    return f"{mirror}releases/{release.codename}/release/"


def parse_sha256sums(text: str, origin: str) -> dict[str, str]:
    """Return {name: lowercase hex digest} from a SHA256SUMS body. ORIGIN names the file in errors."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUMS_LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            LOG.debug("%s line %d is not a checksum line: %r", origin, number, line[:80])
            continue
        sums[match.group(2)] = match.group(1).lower()

    if not sums:
        raise UnavailableError(
            f"{origin} contains no checksum lines",
            origin,
            hint="the mirror answered with something other than a SHA256SUMS file",
        )
    return sums


def _patterns(arch: Arch) -> dict[Role, re.Pattern[str]]:
    suffix = re.escape(arch.value)
    return {
        Role.IMAGE: re.compile(rf"[^/]*-server-cloudimg-{suffix}\.img"),
        Role.KERNEL: re.compile(rf"[^/]*-{suffix}-vmlinuz-generic"),
        Role.INITRD: re.compile(rf"[^/]*-{suffix}-initrd-generic"),
    }


def pick(sums: Mapping[str, str], pattern: re.Pattern[str], prefix: str = "") -> str | None:
    """Return the name in SUMS that is PREFIX followed by a match of PATTERN, or None."""
    matches = sorted(
        name for name in sums if name.startswith(prefix) and pattern.fullmatch(name[len(prefix) :])
    )
    if len(matches) > 1:
        LOG.debug("several files match %s: %s; using %s", pattern.pattern, matches, matches[0])
    return matches[0] if matches else None


class Resolver:
    """Reads a release directory on one mirror and verifies its checksum lists."""

    def __init__(self, fetcher: Fetcher, keys: TrustedKeys | None) -> None:
        """Use FETCHER for requests. KEYS None skips signature checks (--insecure-skip-verify)."""
        self.fetcher = fetcher
        self.keys = keys

    def resolve(self, release: UbuntuRelease, arch: Arch, mirror: str) -> ResolvedImage:
        directory = release_directory(mirror, release)
        sums, signer = self._read_sums(directory, release)
        patterns = _patterns(arch)

        image = pick(sums, patterns[Role.IMAGE])
        if image is None:
            raise UnavailableError(
                f"{directory}{SUMS_NAME} lists no *-server-cloudimg-{arch.value}.img",
                directory + SUMS_NAME,
                hint=f"the release may not be built for {arch.value}",
            )
        files = [RemoteFile(Role.IMAGE, image, directory + image, sums[image])]

        for role in (Role.KERNEL, Role.INITRD):
            name = pick(sums, patterns[role], prefix=UNPACKED_DIR)
            if name is not None:
                files.append(RemoteFile(role, name, directory + name, sums[name]))
        if len(files) < 3:
            files, signer = self._add_unpacked(files, directory, release, arch, signer)

        LOG.debug("resolved %s/%s on %s: %s", release.name, arch.value, mirror, [f.name for f in files])
        return ResolvedImage(release, arch, mirror, directory, tuple(files), signer)

    def _add_unpacked(
        self,
        files: list[RemoteFile],
        directory: str,
        release: UbuntuRelease,
        arch: Arch,
        signer: str | None,
    ) -> tuple[list[RemoteFile], str | None]:
        """Complete FILES from unpacked/SHA256SUMS, the layout where unpacked/ has its own list."""
        unpacked = directory + UNPACKED_DIR
        found = {item.role for item in files}
        missing = [role for role in (Role.KERNEL, Role.INITRD) if role not in found]
        try:
            sums, unpacked_signer = self._read_sums(unpacked, release)
        except UnavailableError as error:
            if error.status != 404:
                raise
            raise _no_boot_files(
                missing[0], arch, directory, f"{unpacked}{SUMS_NAME} was not found"
            ) from error

        patterns = _patterns(arch)
        for role in missing:
            name = pick(sums, patterns[role])
            if name is None:
                raise _no_boot_files(role, arch, directory, f"nor in {unpacked}{SUMS_NAME}")
            files.append(RemoteFile(role, UNPACKED_DIR + name, unpacked + name, sums[name]))
        return files, signer or unpacked_signer

    def _read_sums(self, directory: str, release: UbuntuRelease) -> tuple[dict[str, str], str | None]:
        """Fetch and verify SHA256SUMS and its signature, both from DIRECTORY itself."""
        sums_url = directory + SUMS_NAME
        try:
            data = self.fetcher.fetch_bytes(sums_url)
        except UnavailableError as error:
            if error.status == 404:
                raise UnavailableError(
                    f"not found (HTTP 404): {sums_url}",
                    sums_url,
                    status=404,
                    hint=f"the mirror must carry the pointer directory releases/{release.codename}/release/",
                ) from error
            raise

        signer = self._verify(data, directory)
        text = data.decode("utf-8", errors="replace")
        return parse_sha256sums(text, sums_url), signer

    def _verify(self, data: bytes, directory: str) -> str | None:
        sums_url = directory + SUMS_NAME
        if self.keys is None:
            LOG.warning(
                "NOT verifying the OpenPGP signature of %s (--insecure-skip-verify): "
                "a tampered mirror could serve any image",
                sums_url,
            )
            return None

        sig_url = directory + SIGNATURE_NAME
        try:
            signature = self.fetcher.fetch_bytes(sig_url, max_size=1 << 20)
        except UnavailableError as error:
            raise UnavailableError(
                f"cannot fetch the signature {sig_url}: {error.message}",
                sig_url,
                status=error.status,
                hint="hkpod needs SHA256SUMS.gpg to trust SHA256SUMS; another mirror may have it",
            ) from error
        return verify_signature(data, signature, keys=self.keys, origin=sums_url)


def _no_boot_files(role: Role, arch: Arch, directory: str, detail: str) -> UnavailableError:
    suffix = "vmlinuz-generic" if role is Role.KERNEL else "initrd-generic"
    return UnavailableError(
        f"no *-{arch.value}-{suffix} listed in {directory}{SUMS_NAME}, {detail}",
        directory + SUMS_NAME,
        hint="hkpod boots the kernel and initrd from unpacked/, and this mirror does not carry them",
    )


def describe_files(image: ResolvedImage) -> str:
    """Return `image NAME, kernel NAME, initrd NAME` for log lines."""
    return ", ".join(f"{item.role.value} {item.name}" for item in image.files)
