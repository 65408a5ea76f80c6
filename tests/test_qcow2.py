"""Tests for hkpod.qcow2 against images made and read by qemu-img and qemu-io."""

from __future__ import annotations

import filecmp
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_tool

from hkpod import qcow2
from hkpod.errors import HkpodError
from hkpod.qcow2 import CompressionType, ImageFormat

MiB = 1024 * 1024
INCOMPATIBLE_FEATURES_OFFSET = 72
HAS_ZSTANDARD = importlib.util.find_spec("zstandard") is not None


@pytest.fixture(autouse=True)
def qemu_utils() -> None:
    """Make every test here need qemu-img and qemu-io, which make and check the images."""
    require_tool("qemu-img")
    require_tool("qemu-io")


def qemu_img(*args: str | Path) -> str:
    result = subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, text=True
    )
    return result.stdout


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True, text=True)


def create(path: Path, size: int, *options: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, path, str(size))
    return path


def reference_raw(image: Path, tmp_path: Path) -> Path:
    """Convert IMAGE with qemu-img itself, the output ours must match byte for byte."""
    reference = tmp_path / "reference.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, reference)
    return reference


def compressed_clusters(image: Path) -> int:
    report = json.loads(qemu_img("check", "--output=json", image))
    return int(report.get("compressed-clusters", 0))


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as image:
        image.seek(offset)
        image.write(data)


def set_incompatible_bits(path: Path, bits: int) -> None:
    with path.open("r+b") as image:
        image.seek(INCOMPATIBLE_FEATURES_OFFSET)
        value = int.from_bytes(image.read(8), "big")
        image.seek(INCOMPATIBLE_FEATURES_OFFSET)
        image.write((value | bits).to_bytes(8, "big"))


def mixed_raw(path: Path) -> Path:
    """Write a raw disk of random, compressible and zero runs, its size no multiple of 512."""
    rng = random.Random(20240101)
    pattern = bytes(range(256)) * 4096 + b"hkpod" * 100_000
    with path.open("wb") as raw:
        raw.write(rng.randbytes(MiB))
        raw.write(pattern)
        raw.write(bytes(16 * MiB))
        raw.write(rng.randbytes(300_000))
        raw.write(pattern[:700_001])
    return path


def zstd_image(tmp_path: Path) -> Path:
    image = tmp_path / "zstd.qcow2"
    try:
        create(image, MiB, "-o", "compression_type=zstd")
    except subprocess.CalledProcessError:
        pytest.skip("this qemu-img cannot create zstd images")
    return image


def assert_converts_like_qemu(image: Path, tmp_path: Path) -> Path:
    output = tmp_path / "out.raw"
    qcow2.convert_to_raw(image, output)
    reference = reference_raw(image, tmp_path)
    assert output.stat().st_size == reference.stat().st_size
    assert filecmp.cmp(output, reference, shallow=False)
    return output


# Data at the start, in the middle and in the last cluster, and zero clusters over data.
MIXED_WRITES = [
    "write -P 0xab 0 1M",
    "write -P 0xcd 5M 100k",
    "write -z 512k 256k",
    "write -P 0x11 31M 4097",
]

# Each case: virtual size, qemu-img create options, qemu-io commands.
WRITTEN_IMAGES = [
    pytest.param(
        32 * MiB,
        [],
        MIXED_WRITES,
        id="v3-64k",
    ),
    pytest.param(
        32 * MiB,
        ["-o", "compat=0.10"],
        MIXED_WRITES,
        id="v2",
    ),
    pytest.param(
        32 * MiB,
        ["-o", "cluster_size=4k"],
        MIXED_WRITES,
        id="4k-clusters",
    ),
    pytest.param(
        64 * MiB,
        ["-o", "cluster_size=2M"],
        ["write -P 0xab 0 1M", "write -P 0xcd 5M 100k", "write -P 0x11 61M 4097"],
        id="2m-clusters",
    ),
    pytest.param(
        16 * MiB,
        ["-o", "cluster_size=512"],
        ["write -P 0xab 0 300k", "write -P 0xcd 15M 1000"],
        id="512-byte-clusters",
    ),
    pytest.param(
        10 * MiB + 4097,
        [],
        ["write -P 0xab 1M 64k", "write -P 0xee 10M 4608"],
        id="odd-size",
    ),
    pytest.param(
        32 * MiB,
        [],
        ["write -P 0xab 0 8M", "write -z 0 4M", "write -z 6M 1M"],
        id="zero-flag-over-data",
    ),
    pytest.param(
        32 * MiB,
        [],
        ["write -P 0xab 0 8M", "discard 0 6M"],
        id="discarded",
    ),
    pytest.param(
        32 * MiB,
        ["-o", "extended_l2=on"],
        [
            "write -P 0xab 0 4k",
            "write -P 0xcd 66k 3k",
            "write -P 0x77 1M 256k",
            "write -z 1088k 8k",
            "write -P 0x11 31M 4097",
        ],
        id="extended-l2",
    ),
    pytest.param(
        64 * MiB,
        ["-o", "extended_l2=on,cluster_size=2M"],
        ["write -P 0xab 0 100k", "write -P 0xcd 3M 64k", "write -z 3M 64k", "write -P 0x11 63M 1M"],
        id="extended-l2-2m-clusters",
    ),
]


@pytest.mark.parametrize(("size", "options", "commands"), WRITTEN_IMAGES)
def test_written_image_matches_qemu(
    tmp_path: Path, size: int, options: list[str], commands: list[str]
) -> None:
    image = create(tmp_path / "disk.qcow2", size, *options)
    qemu_io(image, *commands)

    output = assert_converts_like_qemu(image, tmp_path)

    assert allocated_bytes(output) < output.stat().st_size // 4


# Each case: qemu-img convert options for a compressed image of mixed_raw().
COMPRESSED_IMAGES = [
    pytest.param([], id="v3-64k"),
    pytest.param(["-o", "compat=0.10"], id="v2"),
    pytest.param(["-o", "cluster_size=4k"], id="4k-clusters"),
    pytest.param(["-o", "cluster_size=2M"], id="2m-clusters"),
    pytest.param(["-o", "cluster_size=512"], id="512-byte-clusters"),
    pytest.param(["-o", "extended_l2=on"], id="extended-l2"),
    pytest.param(
        ["-o", "compression_type=zstd"],
        id="zstd",
        marks=pytest.mark.skipif(not HAS_ZSTANDARD, reason="needs the zstandard module"),
    ),
]


@pytest.mark.parametrize("options", COMPRESSED_IMAGES)
def test_compressed_image_matches_qemu(tmp_path: Path, options: list[str]) -> None:
    raw = mixed_raw(tmp_path / "source.raw")
    image = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *options, raw, image)
    assert compressed_clusters(image) > 0

    output = assert_converts_like_qemu(image, tmp_path)

    assert allocated_bytes(output) < output.stat().st_size // 2


def test_zero_data_becomes_holes(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 8 * MiB)
    qemu_io(image, "write -P 0 0 4M")
    data_extents = [e for e in json.loads(qemu_img("map", "--output=json", image)) if e["data"]]
    assert sum(extent["length"] for extent in data_extents) == 4 * MiB

    output = assert_converts_like_qemu(image, tmp_path)

    assert allocated_bytes(output) < 64 * 1024


def test_zero_tail_of_cluster_becomes_hole(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 8 * MiB)
    # 16 allocated 64 KiB clusters, each with 4 KiB of data and 60 KiB of zeros.
    qemu_io(image, *(f"write -P 0xab {index * 64}k 4k" for index in range(16)))

    output = assert_converts_like_qemu(image, tmp_path)

    assert allocated_bytes(output) < 512 * 1024


def test_zstd_image_matches_qemu(tmp_path: Path) -> None:
    if not HAS_ZSTANDARD:
        pytest.skip("needs the zstandard module")
    image = zstd_image(tmp_path)
    qemu_io(image, "write -c -P 0xab 0 64k", "write -P 0xcd 128k 64k")
    assert compressed_clusters(image) > 0

    assert_converts_like_qemu(image, tmp_path)


def test_dirty_image_converts(tmp_path: Path) -> None:
    image = create(tmp_path / "dirty.qcow2", 8 * MiB)
    qemu_io(image, "write -P 0xab 1M 1M")
    reference = reference_raw(image, tmp_path)
    set_incompatible_bits(image, 1 << 0)
    output = tmp_path / "out.raw"

    qcow2.convert_to_raw(image, output)

    assert filecmp.cmp(output, reference, shallow=False)


def test_source_is_unchanged(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 8 * MiB)
    qemu_io(image, "write -P 0xab 0 1M")
    before = sha256(image)

    qcow2.convert_to_raw(image, tmp_path / "out.raw")

    assert sha256(image) == before


def test_output_is_private(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    output = tmp_path / "out.raw"

    qcow2.convert_to_raw(image, output)

    assert output.stat().st_mode & 0o777 == 0o600


def test_replaces_existing_output(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0xab 0 64k")
    output = tmp_path / "out.raw"
    output.write_bytes(b"\xff" * (8 * MiB))

    qcow2.convert_to_raw(image, output)

    assert filecmp.cmp(output, reference_raw(image, tmp_path), shallow=False)


def test_larger_size_pads_with_zeros(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0xab 3M 1M")
    reference = reference_raw(image, tmp_path)
    os.truncate(reference, 20 * MiB)
    output = tmp_path / "out.raw"

    qcow2.convert_to_raw(image, output, size=20 * MiB)

    assert output.stat().st_size == 20 * MiB
    assert filecmp.cmp(output, reference, shallow=False)
    assert allocated_bytes(output) < 4 * MiB


def test_smaller_size_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB)
    output = tmp_path / "out.raw"

    with pytest.raises(HkpodError) as caught:
        qcow2.convert_to_raw(image, output, size=MiB)

    assert str(MiB) in caught.value.message
    assert str(4 * MiB) in caught.value.message
    assert not output.exists()


def test_progress_reports_guest_bytes(tmp_path: Path) -> None:
    size = 40 * MiB
    image = create(tmp_path / "disk.qcow2", size)
    qemu_io(image, "write -P 0xab 0 1M", "write -P 0xcd 39M 1M")
    calls: list[tuple[int, int]] = []

    def record(done: int, total: int) -> None:
        calls.append((done, total))

    qcow2.convert_to_raw(image, tmp_path / "out.raw", progress=record)

    assert len(calls) >= 2
    assert calls[-1] == (size, size)
    assert all(total == size for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_output_onto_source_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0xab 0 64k")
    before = sha256(image)

    with pytest.raises(HkpodError, match="onto itself"):
        qcow2.convert_to_raw(image, image)

    assert sha256(image) == before


# detect_format and read_header


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"QFI\xfb\x00\x00\x00\x03", ImageFormat.QCOW2, id="qcow2-magic"),
        pytest.param(b"\x00" * 1024, ImageFormat.RAW, id="zeros"),
        pytest.param(b"QFI", ImageFormat.RAW, id="short"),
        pytest.param(b"", ImageFormat.RAW, id="empty"),
    ],
)
def test_detect_format(tmp_path: Path, content: bytes, expected: ImageFormat) -> None:
    path = tmp_path / "disk"
    path.write_bytes(content)

    assert qcow2.detect_format(path) is expected


def test_detect_format_of_qemu_image(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)

    assert qcow2.detect_format(image) is ImageFormat.QCOW2


# Each case: qemu-img create options, then the expected header fields.
HEADERS = [
    pytest.param([], 3, 16, False, id="v3-default"),
    pytest.param(["-o", "compat=0.10"], 2, 16, False, id="v2"),
    pytest.param(["-o", "cluster_size=2M"], 3, 21, False, id="2m-clusters"),
    pytest.param(["-o", "cluster_size=512"], 3, 9, False, id="512-byte-clusters"),
    pytest.param(["-o", "extended_l2=on"], 3, 16, True, id="extended-l2"),
]


@pytest.mark.parametrize(("options", "version", "cluster_bits", "extended_l2"), HEADERS)
def test_read_header(
    tmp_path: Path, options: list[str], version: int, cluster_bits: int, extended_l2: bool
) -> None:
    image = create(tmp_path / "disk.qcow2", 10 * MiB + 4097, *options)

    header = qcow2.read_header(image)

    assert header.version == version
    assert header.cluster_bits == cluster_bits
    assert header.extended_l2 is extended_l2
    assert header.compression_type is CompressionType.DEFLATE
    # qcow2 sizes are whole 512-byte sectors, so qemu-img rounds 4097 up.
    assert header.virtual_size == 10 * MiB + 4608
    assert header.l1_size >= header.l1_entries_needed


def test_read_header_zstd(tmp_path: Path) -> None:
    if not HAS_ZSTANDARD:
        pytest.skip("needs the zstandard module")
    image = zstd_image(tmp_path)

    assert qcow2.read_header(image).compression_type is CompressionType.ZSTD


# Rejections


def test_backing_file_is_rejected(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", MiB)
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)

    with pytest.raises(HkpodError) as caught:
        qcow2.read_header(overlay)

    assert "has a backing file" in caught.value.message
    assert str(base) in caught.value.message
    assert "qemu-img convert" in (caught.value.hint or "")


def test_aes_encrypted_image_is_rejected(tmp_path: Path) -> None:
    image = tmp_path / "encrypted.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hkpod-test",
        "-o", "encrypt.format=aes,encrypt.key-secret=sec0", image, str(MiB),
    )

    with pytest.raises(HkpodError, match=r"is encrypted \(AES\)"):
        qcow2.read_header(image)


# LUKS images are made by patching crypt_method, because qemu-img's key
# derivation benchmark fails at random on a busy machine with a short iter-time.
@pytest.mark.parametrize(
    ("crypt_method", "name"),
    [pytest.param(2, "LUKS", id="luks"), pytest.param(3, "method 3", id="unknown")],
)
def test_crypt_method_is_rejected(tmp_path: Path, crypt_method: int, name: str) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    patch_bytes(image, 32, crypt_method.to_bytes(4, "big"))

    with pytest.raises(HkpodError) as caught:
        qcow2.read_header(image)

    assert f"is encrypted ({name})" in caught.value.message


def test_external_data_file_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB, "-o", f"data_file={tmp_path / 'data.raw'}")

    with pytest.raises(HkpodError, match="external data file"):
        qcow2.read_header(image)


@pytest.mark.parametrize("bit", [5, 17, 63])
def test_unknown_incompatible_bit_is_rejected(tmp_path: Path, bit: int) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    set_incompatible_bits(image, 1 << bit)

    with pytest.raises(HkpodError) as caught:
        qcow2.read_header(image)

    assert f"unknown qcow2 incompatible feature bits ({bit})" in caught.value.message


def test_corrupt_bit_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    set_incompatible_bits(image, 1 << 1)

    with pytest.raises(HkpodError) as caught:
        qcow2.read_header(image)

    assert "corrupt" in caught.value.message
    assert "qemu-img check -r all" in (caught.value.hint or "")


def test_compression_bit_without_type_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    set_incompatible_bits(image, 1 << 3)

    with pytest.raises(HkpodError, match="compression type bit is set"):
        qcow2.read_header(image)


def test_unknown_compression_type_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    assert qcow2.read_header(image).header_length > 104
    set_incompatible_bits(image, 1 << 3)
    patch_bytes(image, 104, b"\x07")

    with pytest.raises(HkpodError, match="unknown qcow2 compression type 7"):
        qcow2.read_header(image)


def test_zstd_without_module_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = zstd_image(tmp_path)
    # A None entry in sys.modules makes "import zstandard" raise ImportError.
    monkeypatch.setitem(sys.modules, "zstandard", None)

    with pytest.raises(HkpodError) as caught:
        qcow2.read_header(image)

    assert "zstandard" in caught.value.message
    assert caught.value.hint == "pip install zstandard"


# Each case: byte offset and bytes to write into a fresh 1 MiB image, and the expected message.
BAD_HEADERS = [
    pytest.param(4, (4).to_bytes(4, "big"), "version 4", id="version-4"),
    pytest.param(4, (1).to_bytes(4, "big"), "version 1", id="version-1"),
    pytest.param(20, (8).to_bytes(4, "big"), "cluster_bits 8", id="cluster-bits-8"),
    pytest.param(20, (22).to_bytes(4, "big"), "cluster_bits 22", id="cluster-bits-22"),
    pytest.param(36, (0).to_bytes(4, "big"), "L1 table has 0 entries", id="l1-too-small"),
    pytest.param(40, (4096).to_bytes(8, "big"), "not cluster-aligned", id="l1-unaligned"),
    pytest.param(100, (100).to_bytes(4, "big"), "header_length 100", id="header-length-short"),
]


@pytest.mark.parametrize(("offset", "data", "message"), BAD_HEADERS)
def test_bad_header_is_rejected(tmp_path: Path, offset: int, data: bytes, message: str) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    patch_bytes(image, offset, data)

    with pytest.raises(HkpodError, match=message):
        qcow2.read_header(image)


def test_raw_file_is_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x00" * 4096)

    with pytest.raises(HkpodError, match="is not a qcow2 image"):
        qcow2.read_header(raw)


def convert_next_to(path: Path) -> None:
    qcow2.convert_to_raw(path, path.with_name("out.raw"))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(qcow2.detect_format, id="detect_format"),
        pytest.param(qcow2.read_header, id="read_header"),
        pytest.param(convert_next_to, id="convert_to_raw"),
    ],
)
def test_missing_file_is_rejected(tmp_path: Path, call: Callable[[Path], object]) -> None:
    missing = tmp_path / "missing.qcow2"

    with pytest.raises(HkpodError) as caught:
        call(missing)

    assert str(missing) in caught.value.message
    assert "No such file" in caught.value.message


def test_truncated_header_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    os.truncate(image, 80)

    with pytest.raises(HkpodError, match="is truncated"):
        qcow2.read_header(image)


def test_truncated_l1_table_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    os.truncate(image, qcow2.read_header(image).l1_table_offset + 4)

    with pytest.raises(HkpodError, match="is truncated: the L1 table"):
        qcow2.read_header(image)


# Each case: qemu-img create options and qemu-io commands for an image whose
# last cluster contains data, so cutting its end loses data.
TRUNCATED_IMAGES = [
    pytest.param([], ["write -P 0xab 0 1M"], id="data-cluster"),
    pytest.param(
        [], ["write -c -P 0xab 0 64k", "write -c -P 0xcd 64k 64k"], id="compressed-cluster"
    ),
    pytest.param(["-o", "extended_l2=on"], ["write -P 0xab 0 8k"], id="subcluster"),
]


@pytest.mark.parametrize(("options", "commands"), TRUNCATED_IMAGES)
def test_truncated_data_fails_cleanly(
    tmp_path: Path, options: list[str], commands: list[str]
) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB, *options)
    qemu_io(image, *commands)
    os.truncate(image, image.stat().st_size - 1024)
    output = tmp_path / "out.raw"
    before = set(tmp_path.iterdir())

    with pytest.raises(HkpodError, match="is truncated"):
        qcow2.convert_to_raw(image, output)

    assert not output.exists()
    assert set(tmp_path.iterdir()) == before


def test_failure_keeps_existing_output(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB)
    qemu_io(image, "write -P 0xab 0 1M")
    os.truncate(image, image.stat().st_size - 1024)
    output = tmp_path / "out.raw"
    output.write_bytes(b"previous disk")

    with pytest.raises(HkpodError):
        qcow2.convert_to_raw(image, output)

    assert output.read_bytes() == b"previous disk"


def test_missing_output_directory_is_rejected(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    output = tmp_path / "no-such-dir" / "out.raw"

    with pytest.raises(HkpodError, match="failed to create"):
        qcow2.convert_to_raw(image, output)


def test_corrupt_compressed_cluster_fails_cleanly(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", MiB)
    qemu_io(image, "write -P 0xcd 64k 64k", "write -c -P 0xab 0 64k")
    # QEMU appends compressed data at the end of the file. Here it starts a
    # new host cluster, because the previous one is the uncompressed data.
    compressed_offset = image.stat().st_size // (64 * 1024) * (64 * 1024)
    assert compressed_offset < image.stat().st_size
    # 0xff starts a deflate block of the reserved type 3, which every decoder rejects.
    patch_bytes(image, compressed_offset, b"\xff" * 16)
    output = tmp_path / "out.raw"
    before = set(tmp_path.iterdir())

    with pytest.raises(HkpodError, match="cannot be decoded"):
        qcow2.convert_to_raw(image, output)

    assert set(tmp_path.iterdir()) == before
