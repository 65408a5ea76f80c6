"""Read macOS bootpd's lease file to learn which address vmnet's DHCP gave a guest.

bootpd (apple-oss-distributions/bootp: bootplib/NICache.c, bootpd.tproj/dhcpd.c)
writes /var/db/dhcpd_leases as a list of records, newest first:

    {
        name=podman
        ip_address=192.168.64.5
        hw_address=1,a:b:c:1:2:3
        identifier=1,a:b:c:1:2:3
        lease=0x68a1b2c3
    }

Each property line is a tab (shown as spaces above), then `key=value` (a property without a value is
written as the bare key). `hw_address` and `identifier` are "TYPE,OCTETS" with
TYPE and every octet in hex without leading zeros. When a client sends a client
identifier that is not its MAC (a DUID, type `ff`), `hw_address` is that
identifier and the MAC appears nowhere. `lease` is the absolute expiry time in
epoch seconds, in hex. `name` appears only when the client sent a hostname.
bootpd writes the file to `dhcpd_leases-` and renames it into place.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hkpod.errors import HkpodError

LOG = logging.getLogger(__name__)

LEASES_PATH_ENV = "HKPOD_DHCPD_LEASES"
DEFAULT_LEASES_PATH = Path("/var/db/dhcpd_leases")

# ARP hardware type 1 (Ethernet): the only type whose octets are a MAC address.
ETHERNET_HW_TYPE = 1

_OCTET = re.compile(r"[0-9A-Fa-f]{1,2}")
_HEX_EXPIRY = re.compile(r"0[xX][0-9A-Fa-f]+")


@dataclass(frozen=True)
class Lease:
    """One record of the lease file."""

    ip_address: str
    # The MAC when `hw_address` has type 1, else None (a DUID or other client identifier).
    hw_address: bytes | None
    # The raw `identifier` value, such as "1,e:3a:ab:fb:2:d8", or "" when absent.
    identifier: str
    name: str | None
    # Absolute expiry in epoch seconds; 0 when the record has no valid `lease` value.
    expiry: int


def parse_mac(text: str) -> bytes:
    """Parse a colon-separated MAC address into 6 bytes.

    Octets may omit leading zeros ("e:3a:ab:fb:2:d8"), as bootpd writes them.
    """
    octets = text.strip().split(":")
    if len(octets) != 6 or not all(_OCTET.fullmatch(octet) for octet in octets):
        raise HkpodError(
            f"invalid MAC address {text!r}",
            "expected six hex octets separated by colons, such as 52:54:00:12:34:56",
        )
    return bytes(int(octet, 16) for octet in octets)


def _parse_hw_address(value: str) -> bytes | None:
    hw_type, separator, octets = value.partition(",")
    if not separator:
        return None
    try:
        if int(hw_type, 16) != ETHERNET_HW_TYPE:
            return None
        return parse_mac(octets)
    except (ValueError, HkpodError):
        return None


def _parse_expiry(value: str) -> int:
    if not _HEX_EXPIRY.fullmatch(value):
        return 0
    return int(value, 16)


def _lease_from_properties(properties: dict[str, str]) -> Lease | None:
    ip_text = properties.get("ip_address")
    hw_text = properties.get("hw_address")
    if ip_text is None or hw_text is None:
        return None

    try:
        ipaddress.IPv4Address(ip_text)
    except ValueError:
        return None

    return Lease(
        ip_address=ip_text,
        hw_address=_parse_hw_address(hw_text),
        identifier=properties.get("identifier", ""),
        name=properties.get("name"),
        expiry=_parse_expiry(properties.get("lease", "")),
    )


def parse_leases(text: str) -> list[Lease]:
    """Parse the text of a lease file into records, in file order (newest first).

    Never raises: blank lines, unknown keys, lines outside a record, records
    that are not closed by `}` and records without `ip_address` or
    `hw_address` are skipped.
    """
    leases: list[Lease] = []
    properties: dict[str, str] | None = None

    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line == "{":
            # A new record before the previous one was closed drops the open one.
            properties = {}
        elif line == "}":
            if properties is not None:
                lease = _lease_from_properties(properties)
                if lease is not None:
                    leases.append(lease)
            properties = None
        elif properties is not None and "=" in line:
            key, _, value = line.partition("=")
            properties.setdefault(key, value)

    return leases


def _newest_valid(leases: Iterable[Lease], now: float) -> str | None:
    best: Lease | None = None
    for lease in leases:
        if lease.expiry <= now:
            continue
        # Strictly greater keeps the earlier record on a tie, and the file lists newest first.
        if best is None or lease.expiry > best.expiry:
            best = lease
    return best.ip_address if best else None


def find_ip(leases: Iterable[Lease], mac: str, *, now: float) -> str | None:
    """Return the address of the unexpired lease for MAC with the latest expiry, or None.

    MACs are compared as bytes, so "0e:3a:..." matches bootpd's "e:3a:...".
    Records whose `hw_address` is not of type 1 (such as DUIDs) never match.
    """
    expected = parse_mac(mac)
    return _newest_valid((lease for lease in leases if lease.hw_address == expected), now)


def find_ip_by_name(leases: Iterable[Lease], name: str, *, now: float) -> str | None:
    """Return the address of the unexpired lease whose hostname is NAME, or None.

    A fallback for guests that send a DUID, so that their MAC is not in the file.
    Hostnames compare case-insensitively, as DNS names do.
    """
    expected = name.casefold()
    matching = (lease for lease in leases if lease.name is not None and lease.name.casefold() == expected)
    return _newest_valid(matching, now)


def leases_path() -> Path:
    """Return the lease file path: $HKPOD_DHCPD_LEASES, or /var/db/dhcpd_leases."""
    override = os.environ.get(LEASES_PATH_ENV)
    return Path(override) if override else DEFAULT_LEASES_PATH


def read_leases(path: Path | None = None) -> list[Lease]:
    """Read and parse the lease file; a missing file means no lease yet and returns [].

    The file is opened anew on every call because bootpd replaces it by rename.
    """
    path = path if path is not None else leases_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        LOG.debug("no lease file at %s yet", path)
        return []
    except OSError as error:
        raise HkpodError(
            f"failed to read the DHCP lease file {path}: {error.strerror}",
            f"check its permissions, or point {LEASES_PATH_ENV} at a readable copy",
        ) from error

    # Hostnames are client-supplied bytes; a broken one must not hide the other records.
    return parse_leases(data.decode("utf-8", errors="replace"))
