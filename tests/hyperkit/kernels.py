"""Minimal bzImage files for tests, built from the Linux x86 boot protocol.

The header layout is written out here on its own, not taken from
hkpod.bzimage, so that the tests check that module against
an independent reading of the boot protocol.
"""

from __future__ import annotations

import struct
from pathlib import Path

# A relocatable kernel aligned to 2 MiB loads at 0x200000 and reserves init_size
# (one page), so it ends at 0x201000.
VALID_FIELDS: dict[str, int | bytes] = {
    "setup_sects": 1,
    "syssize": 1,
    "boot_flag": 0xAA55,
    "header": b"HdrS",
    "version": 0x020F,
    "loadflags": 0x01,
    "initrd_addr_max": 0x7FFFFFFF,
    "kernel_alignment": 0x200000,
    "relocatable_kernel": 1,
    "cmdline_size": 2048,
    "pref_address": 0x1000000,
    "init_size": 0x1000,
}
KERNEL_END = 0x201000

_LAYOUT = {
    "setup_sects": (0x1F1, "<B"),
    "syssize": (0x1F4, "<I"),
    "boot_flag": (0x1FE, "<H"),
    "header": (0x202, "4s"),
    "version": (0x206, "<H"),
    "loadflags": (0x211, "<B"),
    "initrd_addr_max": (0x22C, "<I"),
    "kernel_alignment": (0x230, "<I"),
    "relocatable_kernel": (0x234, "<B"),
    "cmdline_size": (0x238, "<I"),
    "pref_address": (0x258, "<Q"),
    "init_size": (0x260, "<I"),
}

HTML_PAGE_SIZE = 707


def bzimage_bytes(size: int = 2048, **fields: int | bytes) -> bytes:
    """Return a SIZE-byte image with VALID_FIELDS, overridden by FIELDS, in its setup header."""
    data = bytearray(max(size, 0x268))
    for name, value in {**VALID_FIELDS, **fields}.items():
        offset, fmt = _LAYOUT[name]
        struct.pack_into(fmt, data, offset, value)
    return bytes(data[:size])


def write_bzimage(path: Path, size: int = 2048, **fields: int | bytes) -> Path:
    path.write_bytes(bzimage_bytes(size, **fields))
    return path


def write_html_page(path: Path) -> Path:
    """Write the 707-byte error page that a failed kernel download can leave behind."""
    page = (
        b'<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n'
        b"<title>404 Not Found</title>\n</head><body>\n<h1>Not Found</h1>\n"
        b"<p>The requested URL was not found on this server.</p>\n"
    )
    page += b"<!-- padding -->\n" * ((HTML_PAGE_SIZE - len(page) - len(b"</body></html>\n")) // 17)
    page += b"</body></html>\n"
    page = page.ljust(HTML_PAGE_SIZE, b"\n")
    assert len(page) == HTML_PAGE_SIZE
    path.write_bytes(page)
    return path
