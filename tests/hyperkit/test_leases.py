from __future__ import annotations

import random
from pathlib import Path

import pytest

from hkpod.drivers.hyperkit.leases import (
    DEFAULT_LEASES_PATH,
    LEASES_PATH_ENV,
    Lease,
    find_ip,
    find_ip_by_name,
    leases_path,
    parse_leases,
    parse_mac,
    read_leases,
)
from hkpod.errors import HkpodError

from . import fake_hyperkit

NOW = 0x65D80000
LATER = 0x65D8A000


def record(ip: str, hw: str, lease: int = LATER, name: str | None = None) -> str:
    """Return one record as bootpd writes it: braces on their own lines, tab-indented properties."""
    lines = ["{"]
    if name is not None:
        lines.append(f"\tname={name}")
    lines += [f"\tip_address={ip}", f"\thw_address={hw}", f"\tidentifier={hw}", f"\tlease={lease:#x}", "}"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0e:3a:ab:fb:02:d8", bytes([0x0E, 0x3A, 0xAB, 0xFB, 0x02, 0xD8])),
        ("e:3a:ab:fb:2:d8", bytes([0x0E, 0x3A, 0xAB, 0xFB, 0x02, 0xD8])),
        ("52:54:00:AA:BB:CC", bytes([0x52, 0x54, 0x00, 0xAA, 0xBB, 0xCC])),
        ("0:0:0:0:0:0", bytes(6)),
        (" 1:2:3:4:5:6\n", bytes([1, 2, 3, 4, 5, 6])),
    ],
)
def test_parse_mac_valid(text: str, expected: bytes) -> None:
    assert parse_mac(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1:2:3:4:5",
        "1:2:3:4:5:6:7",
        "g:0:0:0:0:0",
        "001:2:3:4:5:6",
        "1-2-3-4-5-6",
        "1::3:4:5:6",
        "52:54:00:aa:bb:cc,",
    ],
)
def test_parse_mac_invalid(text: str) -> None:
    with pytest.raises(HkpodError, match="invalid MAC address"):
        parse_mac(text)


def test_mac_without_leading_zeros() -> None:
    leases = parse_leases(record("192.168.64.7", "1,e:3a:ab:fb:2:d8"))

    assert find_ip(leases, "0e:3a:ab:fb:02:d8", now=NOW) == "192.168.64.7"


def test_latest_expiry_wins() -> None:
    text = (
        record("192.168.64.5", "1,52:54:0:aa:bb:cc", lease=0x65D8A000)
        + record("192.168.64.9", "1,52:54:0:aa:bb:cc", lease=0x65D8B000)
        + record("192.168.64.4", "1,52:54:0:aa:bb:cc", lease=0x5F0DC7E9)
    )

    assert find_ip(parse_leases(text), "52:54:00:aa:bb:cc", now=0x65D80000) == "192.168.64.9"


DUID = "ff,f1:f5:dd:7f:0:2:0:0:ab:11:b5:58:a4:8e:38:af:82:b9"


@pytest.mark.parametrize("mac", ["f1:f5:dd:7f:00:02", "a4:8e:38:af:82:b9", "00:02:00:00:ab:11"])
def test_duid_matches_no_mac(mac: str) -> None:
    leases = parse_leases(record("192.168.64.3", DUID))

    assert find_ip(leases, mac, now=NOW) is None


def test_duid_has_no_hw_address() -> None:
    (lease,) = parse_leases(record("192.168.64.3", DUID))

    assert lease.hw_address is None
    assert lease.identifier == DUID


def test_unclosed_record_dropped() -> None:
    text = (
        record("192.168.64.2", "1,52:54:0:12:34:56", name="good")
        + "\n"
        + "{\n\tname=broken\n\tip_address=192.168.64.3\n\thw_address=1,52:54:0:12:34:57\n"
    )

    leases = parse_leases(text)

    assert [lease.ip_address for lease in leases] == ["192.168.64.2"]


def test_record_fields() -> None:
    (lease,) = parse_leases(record("192.168.64.5", "1,a:b:c:1:2:3", lease=0x68A1B2C3, name="podman"))

    assert lease == Lease(
        ip_address="192.168.64.5",
        hw_address=bytes([0x0A, 0x0B, 0x0C, 0x01, 0x02, 0x03]),
        identifier="1,a:b:c:1:2:3",
        name="podman",
        expiry=0x68A1B2C3,
    )


def test_name_is_optional() -> None:
    (lease,) = parse_leases(record("192.168.64.5", "1,a:b:c:1:2:3"))

    assert lease.name is None


def test_new_brace_drops_open_record() -> None:
    text = "{\n\tip_address=192.168.64.8\n\thw_address=1,1:2:3:4:5:6\n" + record("192.168.64.9", "1,1:2:3:4:5:6")

    assert [lease.ip_address for lease in parse_leases(text)] == ["192.168.64.9"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("\thw_address=1,1:2:3:4:5:6\n\tlease=0x65d8a000\n", "no ip_address"),
        ("\tip_address=192.168.64.9\n\tlease=0x65d8a000\n", "no hw_address"),
        ("\tip_address=192.168.64.999\n\thw_address=1,1:2:3:4:5:6\n", "invalid ip_address"),
    ],
)
def test_incomplete_record_skipped(body: str, reason: str) -> None:
    assert parse_leases("{\n" + body + "}\n") == [], reason


def test_unknown_and_odd_lines_ignored() -> None:
    text = (
        "garbage before any record\n"
        "{\n"
        "\tflag_without_value\n"
        "\tvendor_class=MSFT 5.0\n"
        "\tip_address=192.168.64.10\n"
        "\thw_address=1,1:2:3:4:5:6\n"
        "\tlease=0x65d8a000\n"
        "}\n"
        "ip_address=192.168.64.11\n"
    )

    (lease,) = parse_leases(text)

    assert lease.ip_address == "192.168.64.10"
    assert lease.expiry == 0x65D8A000


@pytest.mark.parametrize("value", ["", "65d8a000", "0x", "0xZZ", "-0x1"])
def test_invalid_expiry_is_zero(value: str) -> None:
    (lease,) = parse_leases(f"{{\n\tip_address=192.168.64.2\n\thw_address=1,1:2:3:4:5:6\n\tlease={value}\n}}\n")

    assert lease.expiry == 0


@pytest.mark.parametrize("hw", ["1", "1,", "1,1:2:3", "1,1:2:3:4:5:6:7", "zz,1:2:3:4:5:6", "6,1:2:3:4:5:6"])
def test_odd_hw_address_kept_unmatched(hw: str) -> None:
    (lease,) = parse_leases(record("192.168.64.2", hw))

    assert lease.hw_address is None


@pytest.mark.parametrize("expiry", [NOW - 1, NOW])
def test_expired_lease_ignored(expiry: int) -> None:
    leases = parse_leases(record("192.168.64.2", "1,1:2:3:4:5:6", lease=expiry))

    assert find_ip(leases, "01:02:03:04:05:06", now=NOW) is None


def test_equal_expiry_first_record_wins() -> None:
    text = record("192.168.64.20", "1,1:2:3:4:5:6") + record("192.168.64.21", "1,1:2:3:4:5:6")

    assert find_ip(parse_leases(text), "01:02:03:04:05:06", now=NOW) == "192.168.64.20"


def test_find_ip_rejects_bad_mac() -> None:
    with pytest.raises(HkpodError, match="invalid MAC address"):
        find_ip([], "not-a-mac", now=NOW)


def test_find_ip_by_name() -> None:
    text = (
        record("192.168.64.30", DUID, name="other")
        + record("192.168.64.31", DUID, name="Podman", lease=NOW - 5)
        + record("192.168.64.32", DUID, name="podman")
    )

    assert find_ip_by_name(parse_leases(text), "PODMAN", now=NOW) == "192.168.64.32"


def test_find_ip_by_name_none() -> None:
    leases = parse_leases(record("192.168.64.30", DUID))

    assert find_ip_by_name(leases, "podman", now=NOW) is None


JUNK = [
    "",
    "}",
    "{",
    "{\n}",
    "}\n{\n",
    "\x00\xff\ufffd",
    "ip_address=1.2.3.4\nhw_address=1,1:2:3:4:5:6\n",
    "{\nip_address\nhw_address\n}\n",
    "{\n=\n==\n}\n",
    "{{\n}}\n",
]


@pytest.mark.parametrize("text", JUNK)
def test_junk_never_raises(text: str) -> None:
    assert isinstance(parse_leases(text), list)


def test_random_junk_never_raises() -> None:
    generator = random.Random(0)
    alphabet = "{}=,:\t\n 0123456789abcdefx.ip_addresshw_lease"
    for _ in range(500):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randrange(200)))
        assert isinstance(parse_leases(text), list), text


def test_leases_path_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LEASES_PATH_ENV, raising=False)

    assert leases_path() == DEFAULT_LEASES_PATH


def test_leases_path_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(LEASES_PATH_ENV, str(tmp_path / "leases"))

    assert leases_path() == tmp_path / "leases"


def test_read_missing_file(tmp_path: Path) -> None:
    assert read_leases(tmp_path / "dhcpd_leases") == []


def test_read_uses_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "dhcpd_leases"
    path.write_text(record("192.168.64.40", "1,1:2:3:4:5:6"))
    monkeypatch.setenv(LEASES_PATH_ENV, str(path))

    assert [lease.ip_address for lease in read_leases()] == ["192.168.64.40"]


def test_read_sees_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "dhcpd_leases"
    path.write_text(record("192.168.64.40", "1,1:2:3:4:5:6"))
    first = read_leases(path)

    replacement = tmp_path / "dhcpd_leases-"
    replacement.write_text(record("192.168.64.41", "1,1:2:3:4:5:6") + path.read_text())
    replacement.replace(path)

    assert [lease.ip_address for lease in first] == ["192.168.64.40"]
    assert [lease.ip_address for lease in read_leases(path)] == ["192.168.64.41", "192.168.64.40"]


def test_read_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dhcpd_leases"
    path.write_bytes(record("192.168.64.42", "1,1:2:3:4:5:6", name="x").encode().replace(b"=x", b"=\xff\xfe"))

    (lease,) = read_leases(path)

    assert lease.ip_address == "192.168.64.42"


def test_read_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(HkpodError, match="DHCP lease file"):
        read_leases(tmp_path)


def test_stand_in_lease_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "dhcpd_leases"
    mac = bytes([0x0E, 0x00, 0xAB, 0x01, 0x02, 0xD8])
    fake_hyperkit.write_lease(
        str(path), fake_hyperkit.format_lease(name="old", ip_address="127.0.0.9", mac=mac, expiry=NOW + 1)
    )
    fake_hyperkit.write_lease(
        str(path), fake_hyperkit.format_lease(name=None, ip_address="127.0.0.10", mac=mac, expiry=LATER)
    )

    leases = read_leases(path)

    assert "hw_address=1,e:0:ab:1:2:d8" in path.read_text()
    assert [lease.ip_address for lease in leases] == ["127.0.0.10", "127.0.0.9"]
    assert find_ip(leases, "0e:00:ab:01:02:d8", now=NOW) == "127.0.0.10"
