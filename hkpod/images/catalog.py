"""The Ubuntu releases in hkpod's catalog, and the `ubuntu:` image names that select them."""

from __future__ import annotations

import enum
import logging
import platform
from dataclasses import dataclass
from typing import Final

from hkpod.errors import HkpodError

LOG = logging.getLogger(__name__)

IMAGE_PREFIX: Final = "ubuntu:"
LTS_ALIAS: Final = "lts"
DEFAULT_IMAGE: Final = IMAGE_PREFIX + LTS_ALIAS

# A podman 4 or 5 remote client rejects a service whose API is older than 4.0
# ("server API version is too old"), so the guest must ship podman >= 4.0.
MIN_PODMAN: Final = (4, 0)


class Arch(enum.Enum):
    """CPU architecture, spelled as Ubuntu spells it in image names."""

    AMD64 = "amd64"
    ARM64 = "arm64"


@dataclass(frozen=True)
class UbuntuRelease:
    """One Ubuntu release and the podman version its archive ships."""

    version: str
    codename: str
    lts: bool
    podman: tuple[int, int] | None

    @property
    def name(self) -> str:
        """Canonical image name, e.g. `ubuntu:24.04`."""
        return IMAGE_PREFIX + self.version

    @property
    def podman_text(self) -> str:
        if self.podman is None:
            return "none"
        major, minor = self.podman
        return f"{major}.{minor}"


# Oldest first. `podman` is the version in the release's own archive (universe).
# 20.04 has none because its podman came only from the unmaintained Kubic repository.
RELEASES: Final[tuple[UbuntuRelease, ...]] = (
    UbuntuRelease("20.04", "focal", lts=True, podman=None),
    UbuntuRelease("22.04", "jammy", lts=True, podman=(3, 4)),
    UbuntuRelease("24.04", "noble", lts=True, podman=(4, 9)),
    # NOTE: the podman versions of 24.10 (5.0), 25.04 (5.4) and 25.10 (5.4) are
    # unconfirmed, but all of them are above MIN_PODMAN either way. 26.10 is left
    # out until its codename and podman version are confirmed.
    # Interim releases leave the mirrors' releases/ tree some months after
    # their end of life, and a request for them then fails with 404.
    UbuntuRelease("24.10", "oracular", lts=False, podman=(5, 0)),
    UbuntuRelease("25.04", "plucky", lts=False, podman=(5, 4)),
    UbuntuRelease("25.10", "questing", lts=False, podman=(5, 4)),
    UbuntuRelease("26.04", "resolute", lts=True, podman=(5, 7)),
)


def is_catalog_name(text: str) -> bool:
    """Return whether TEXT names a catalog image. Anything else is a path or URL for the caller."""
    return text.strip().lower().startswith(IMAGE_PREFIX)


def newest_lts() -> UbuntuRelease:
    return [release for release in RELEASES if release.lts][-1]


def resolve_image_name(text: str) -> UbuntuRelease:
    """Map `ubuntu:24.04`, `ubuntu:noble` or `ubuntu:lts` to a release podman can drive.

    Raise HkpodError for an unknown name and for a release whose podman is
    missing or older than the 4.0 API.
    """
    release = lookup_release(text)
    _check_podman(release)
    LOG.debug("image %s is Ubuntu %s (%s)", text, release.version, release.codename)
    return release


def lookup_release(text: str) -> UbuntuRelease:
    """Map a catalog name to its release without checking podman, e.g. to remove a cached image."""
    cleaned = text.strip().lower()
    if not cleaned.startswith(IMAGE_PREFIX):
        raise HkpodError(
            f"invalid image name {text!r}: catalog names start with {IMAGE_PREFIX!r}",
            "use a catalog name such as ubuntu:lts or ubuntu:24.04",
        )

    key = cleaned[len(IMAGE_PREFIX) :]
    if key == LTS_ALIAS:
        return newest_lts()
    for release in RELEASES:
        if key in (release.version, release.codename):
            return release

    known = ", ".join(f"{r.version} ({r.codename})" for r in RELEASES)
    raise HkpodError(
        f"unknown Ubuntu release in image name {text!r}",
        f"known releases: {known}; or ubuntu:{LTS_ALIAS} for the newest LTS",
    )


def _check_podman(release: UbuntuRelease) -> None:
    if release.podman is None:
        raise HkpodError(
            f"Ubuntu {release.version} ({release.codename}) has no podman in its archive",
            f"choose a newer release, e.g. {DEFAULT_IMAGE}",
        )
    if release.podman < MIN_PODMAN:
        raise HkpodError(
            f"Ubuntu {release.version} ({release.codename}) ships podman {release.podman_text}, "
            f"older than API {MIN_PODMAN[0]}.{MIN_PODMAN[1]}, which podman 4 and 5 clients reject",
            f"choose a newer release, e.g. {DEFAULT_IMAGE}",
        )


def host_arch(machine: str | None = None) -> Arch:
    """Return the Ubuntu architecture of this host (or of MACHINE, as platform.machine() spells it)."""
    name = (machine or platform.machine()).lower()
    if name in ("x86_64", "amd64"):
        return Arch.AMD64
    if name in ("arm64", "aarch64"):
        return Arch.ARM64
    raise HkpodError(f"unsupported CPU architecture {name!r}", "hkpod runs on amd64 and arm64 hosts")


def parse_arch(text: str) -> Arch:
    try:
        return Arch(text.strip().lower())
    except ValueError:
        choices = ", ".join(arch.value for arch in Arch)
        raise HkpodError(f"invalid architecture {text!r}", f"use one of: {choices}") from None
