"""Boot file sources of a new machine: a catalog image name, or local image, kernel and initrd files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hkpod.errors import HkpodError
from hkpod.images.cache import blob_path, ensure_image
from hkpod.images.catalog import DEFAULT_IMAGE, Arch, host_arch, is_catalog_name
from hkpod.images.mirrors import select_mirrors
from hkpod.images.resolve import Role
from hkpod.images.urls import fetch_url_image, is_url
from hkpod.paths import cache_root


@dataclass(frozen=True)
class BootFiles:
    """The files a machine is created from, and the cached blobs it uses (for `image prune`)."""

    image: Path
    kernel: Path
    initrd: Path
    description: str
    digests: tuple[str, ...] = ()


def image_cache_root() -> Path:
    return cache_root() / "images"


def driver_arch(driver: str) -> Arch:
    """HyperKit runs only amd64 guests; QEMU runs guests of the host's architecture."""
    return Arch.AMD64 if driver == "hyperkit" else host_arch()


def check_readable(path: Path, option: str) -> Path:
    path = path.expanduser().absolute()
    if path.is_dir():
        raise HkpodError(f"{option} {path}: is a directory", f"give {option} the path of a file")
    if not path.is_file():
        raise HkpodError(f"{option} {path}: no such file", f"check the path given to {option}")
    if not os.access(path, os.R_OK):
        raise HkpodError(f"{option} {path}: not readable", "fix its permissions or run hkpod as its owner")
    return path


def find_beside(image: Path, kind: str) -> Path:
    """Find the one kernel or initrd file next to IMAGE, as the test guest and unpacked cloud images lay them out."""
    patterns = {"kernel": ("vmlinuz", "*vmlinuz*"), "initrd": ("initrd.img", "*initrd*")}[kind]
    for pattern in patterns:
        matches = sorted(path for path in image.parent.glob(pattern) if path.is_file())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(path.name for path in matches)
            raise HkpodError(f"several {kind} files next to {image}: {names}", f"choose one with --{kind}")
    raise HkpodError(f"no {kind} given and none found next to {image}", f"pass --{kind} PATH")


def resolve_boot_files(
    image: str | None, kernel: str | None, initrd: str | None, *, driver: str, mirror: str | None, verify: bool
) -> BootFiles:
    """Return the boot files for IMAGE, downloading a catalog image (such as `ubuntu:lts`) when it is not cached."""
    name = image or DEFAULT_IMAGE
    if is_catalog_name(name):
        if kernel is not None or initrd is not None:
            raise HkpodError(f"--kernel and --initrd cannot be combined with --image {name}",
                             "a catalog image brings its own kernel and initrd; pass a local --image to use yours")
        mirrors = select_mirrors(mirror)
        cached = ensure_image(image_cache_root(), name, driver_arch(driver), mirrors, verify=verify)
        root = image_cache_root()
        return BootFiles(
            image=blob_path(root, cached.file(Role.IMAGE).sha256),
            kernel=blob_path(root, cached.file(Role.KERNEL).sha256),
            initrd=blob_path(root, cached.file(Role.INITRD).sha256),
            description=f"{cached.key} ({cached.file(Role.IMAGE).name}, {cached.pulled_at})",
            digests=tuple(sorted(cached.digests())),
        )
    if mirror is not None:
        raise HkpodError(f"--mirror applies only to catalog images such as ubuntu:lts, not to --image {name}",
                         "leave out --mirror")
    if "://" in name and not is_url(name):
        raise HkpodError(f"--image {name}: only http:// and https:// URLs are supported", "download the file and pass its path")
    if is_url(name):
        fetched = fetch_url_image(image_cache_root(), name, kernel, initrd, verify=verify)
        return BootFiles(
            image=fetched.image,
            kernel=fetched.kernel or check_readable(Path(str(kernel)), "--kernel"),
            initrd=fetched.initrd or check_readable(Path(str(initrd)), "--initrd"),
            description=name,
            digests=fetched.digests,
        )
    for option, value in (("--kernel", kernel), ("--initrd", initrd)):
        if value is not None and is_url(value):
            raise HkpodError(f"{option} {value}: a URL needs an --image URL too", f"download it and pass its path to {option}")
    image_path = check_readable(Path(name), "--image")
    return BootFiles(
        image=image_path,
        kernel=check_readable(Path(kernel) if kernel else find_beside(image_path, "kernel"), "--kernel"),
        initrd=check_readable(Path(initrd) if initrd else find_beside(image_path, "initrd"), "--initrd"),
        description=str(image_path),
    )
