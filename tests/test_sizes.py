from __future__ import annotations

import pytest

from hkpod.errors import HkpodError
from hkpod.sizes import GIB, MIB, format_size, parse_disk_bytes, parse_memory_mib


@pytest.mark.parametrize(
    ("text", "expected_mib"),
    [("512M", 512), ("2G", 2048), ("2GiB", 2048), ("2gib", 2048), ("1536", 1536), ("1024MiB", 1024), ("1T", 1024 * 1024), ("2 G", 2048)],
)
def test_memory_valid(text: str, expected_mib: int) -> None:
    assert parse_memory_mib(text) == expected_mib


@pytest.mark.parametrize("text", ["2X", "", "G", "-1G", "1.5G", "2GB2", "0", "0G", "100"])
def test_memory_invalid(text: str) -> None:
    with pytest.raises(HkpodError) as raised:
        parse_memory_mib(text)
    assert "--memory" in raised.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10", 10 * GIB), ("10G", 10 * GIB), ("10GiB", 10 * GIB), ("512M", 512 * MIB), ("1T", 1024 * GIB)],
)
def test_disk_valid(text: str, expected: int) -> None:
    assert parse_disk_bytes(text) == expected


@pytest.mark.parametrize("text", ["10X", "ten", "0", "1K", "10.5G"])
def test_disk_invalid(text: str) -> None:
    with pytest.raises(HkpodError) as raised:
        parse_disk_bytes(text)
    assert repr(text) in raised.value.message or text in raised.value.message


def test_memory_error_names_value() -> None:
    with pytest.raises(HkpodError) as raised:
        parse_memory_mib("2X")
    assert "'2X'" in raised.value.message


@pytest.mark.parametrize(("size", "text"), [(2 * GIB, "2G"), (1536 * MIB, "1536M"), (10 * GIB, "10G"), (4097, "4097B")])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (1354777088, "1.3 GiB")])
def test_human_size(size: int, text: str) -> None:
    from hkpod.sizes import human_size

    assert human_size(size) == text
