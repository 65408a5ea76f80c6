"""Binary size parsing for --memory and --disk."""

from __future__ import annotations

import re

from hkpod.errors import HkpodError

MIB = 1024 * 1024
GIB = 1024 * MIB

_UNITS = {"K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:I?B)?)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, bare_unit: int, option: str) -> int:
    """Parse TEXT such as `512M`, `2G` or `2GiB` into bytes; a bare number counts in BARE_UNIT.

    Every suffix is binary: `M` and `MiB` are both 2**20 bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise HkpodError(
            f"invalid size for {option}: {text!r}",
            "use a whole number with an optional K, M, G or T suffix, e.g. 2G or 512M",
        )
    number = int(match.group(1))
    unit = _UNITS[match.group(2).upper()] if match.group(2) else bare_unit
    size = number * unit
    if size <= 0:
        raise HkpodError(f"invalid size for {option}: {text!r}", "the size must be greater than zero")
    return size


def parse_memory_mib(text: str) -> int:
    """Return --memory in MiB; a bare number is MiB."""
    size = parse_size(text, bare_unit=MIB, option="--memory")
    if size % MIB:
        raise HkpodError(f"invalid size for --memory: {text!r}", "give a whole number of MiB, e.g. 1536M")
    if size < 256 * MIB:
        raise HkpodError(f"--memory {text} is too small", "a Podman guest needs at least 256M; 2G is a good start")
    return size // MIB


def parse_disk_bytes(text: str) -> int:
    """Return --disk in bytes; a bare number is GiB."""
    size = parse_size(text, bare_unit=GIB, option="--disk")
    if size % MIB:
        raise HkpodError(f"invalid size for --disk: {text!r}", "give a whole number of MiB or GiB, e.g. 10G")
    return size


def format_size(size: int) -> str:
    """Format SIZE bytes the way the parser reads it back (e.g. `2G`, `1536M`)."""
    for suffix, unit in (("T", 1024 * GIB), ("G", GIB), ("M", MIB), ("K", 1024)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size}B"


def human_size(size: int) -> str:
    """Format SIZE bytes for people, in binary units with one decimal (e.g. `1.3 GiB`)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
