"""The machine's disk: a sparse raw file derived from a raw or qcow2 image, grown to the requested size."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from hkpod.errors import HkpodError
from hkpod.run import run
from hkpod.sizes import format_size, human_size

LOG = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024
_ZERO_CHUNK = bytes(COPY_CHUNK)


def image_virtual_size(path: Path) -> int:
    """Return the disk size in the guest: the file size of a raw image, the header's size of a qcow2."""
    from hkpod import qcow2

    if qcow2.detect_format(path) is qcow2.ImageFormat.QCOW2:
        return qcow2.read_header(path).virtual_size
    return path.stat().st_size


def allocated_size(path: Path) -> int:
    return path.stat().st_blocks * 512


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise HkpodError(
            f"not enough free space in {directory}: {human_size(free)} free, the disk needs about {human_size(needed)}",
            "free some space or choose another HKPOD_HOME",
        )


def make_disk(image: Path, dest: Path, size: int) -> None:
    """Write a sparse raw copy of IMAGE to DEST and grow it to SIZE bytes; IMAGE is never modified."""
    from hkpod import qcow2

    image_format = qcow2.detect_format(image)
    virtual = image_virtual_size(image)
    if size < virtual:
        raise HkpodError(
            f"--disk {format_size(size)} is smaller than the image {image} ({human_size(virtual)})",
            f"use --disk {format_size(-(-virtual // (1 << 30)) << 30)} or larger",
        )
    # A raw copy allocates what the image allocates. A compressed qcow2 expands, so three times
    # its file size is the estimate (an estimate: the Debian test guest's image expands 2.8 times).
    estimate = allocated_size(image) * (3 if image_format is qcow2.ImageFormat.QCOW2 else 1)
    check_free_space(dest.parent, min(estimate, virtual))

    if image_format is qcow2.ImageFormat.QCOW2:
        convert_qcow2(image, dest, size=size, virtual_size=virtual)
        return
    LOG.info("Copying raw image %s", image)
    _sparse_copy(image, dest)
    os.truncate(dest, size)


CONVERTER_ENV = "HKPOD_QCOW2_CONVERTER"
CONVERTERS = ("auto", "builtin", "qemu-img")


def convert_qcow2(image: Path, dest: Path, *, size: int, virtual_size: int) -> None:
    """Convert IMAGE to a sparse raw DEST of SIZE bytes, with qemu-img when it is installed.

    qemu-img converted the test guest's image 1.2 to 1.5 times faster than the built-in converter
    (scripts/bench on 2 cores), so it is preferred when present. The built-in converter makes hkpod
    work without it. HKPOD_QCOW2_CONVERTER=builtin or qemu-img forces one of them.
    """
    from hkpod import qcow2

    choice = os.environ.get(CONVERTER_ENV, "auto")
    if choice not in CONVERTERS:
        raise HkpodError(f"invalid {CONVERTER_ENV} {choice!r}", f"use one of: {', '.join(CONVERTERS)}")
    qemu_img = shutil.which("qemu-img") if choice != "builtin" else None
    if choice == "qemu-img" and qemu_img is None:
        raise HkpodError(f"{CONVERTER_ENV}=qemu-img but qemu-img is not installed", "install qemu-utils, or unset it")
    qcow2.read_header(image)  # rejects what neither converter should take (backing files, encryption)

    if qemu_img is None:
        LOG.info("Converting qcow2 image %s to a raw disk", image)
        with progress_bar(virtual_size, "convert") as update:
            qcow2.convert_to_raw(image, dest, size=size, progress=update)
        return
    LOG.info("Converting qcow2 image %s to a raw disk with qemu-img", image)
    temporary = dest.with_name(f".{dest.name}.converting")
    try:
        run([qemu_img, "convert", "-O", "raw", str(image), str(temporary)])
        os.truncate(temporary, size)
        os.replace(temporary, dest)
    except HkpodError as error:
        if choice == "qemu-img":
            raise
        # The built-in converter names what is wrong with the file (truncated, corrupt) in its error.
        LOG.warning("qemu-img could not convert %s (%s); trying the built-in converter", image, error)
        qcow2.convert_to_raw(image, dest, size=size)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int, int], None]]:
    """Yield a progress callback: a tqdm bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False) as bar:

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        yield update


def _sparse_copy(source: Path, dest: Path) -> None:
    # Chunks of zeros become holes, so a mostly empty cloud image costs only its data on disk.
    with source.open("rb") as reader, dest.open("wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            if chunk == _ZERO_CHUNK[: len(chunk)]:
                writer.seek(len(chunk), os.SEEK_CUR)
            else:
                writer.write(chunk)
        writer.truncate()
        writer.flush()
        os.fsync(writer.fileno())
