from __future__ import annotations

import filecmp
import os
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from hkpod.disk import make_disk
from hkpod.errors import HkpodError

MIB = 1 << 20


@pytest.fixture
def qcow2_image(tmp_path: Path) -> Path:
    qemu_img = require_tool("qemu-img")
    raw = tmp_path / "source.raw"
    with raw.open("wb") as handle:
        handle.truncate(64 * MIB)
        handle.seek(5 * MIB)
        handle.write(os.urandom(MIB))
        handle.seek(40 * MIB)
        handle.write(b"hkpod" * 100000)
    image = tmp_path / "image.qcow2"
    subprocess.run([qemu_img, "convert", "-c", "-O", "qcow2", str(raw), str(image)], check=True)
    return image


@pytest.fixture
def failing_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A qemu-img first on PATH that records each call and fails, so any use of it shows."""
    directory = tmp_path / "bin"
    directory.mkdir()
    marker = tmp_path / "qemu-img-ran"
    script = directory / "qemu-img"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return marker


def test_builtin_forced_skips_qemu_img(tmp_path: Path, qcow2_image: Path, failing_qemu_img: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HKPOD_QCOW2_CONVERTER", "builtin")
    make_disk(qcow2_image, tmp_path / "disk.raw", 128 * MIB)
    assert not failing_qemu_img.exists()


def test_builtin_matches_qemu_img(tmp_path: Path, qcow2_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HKPOD_QCOW2_CONVERTER", "builtin")
    make_disk(qcow2_image, tmp_path / "builtin.raw", 64 * MIB)
    monkeypatch.setenv("HKPOD_QCOW2_CONVERTER", "qemu-img")
    make_disk(qcow2_image, tmp_path / "qemu-img.raw", 64 * MIB)
    assert filecmp.cmp(tmp_path / "builtin.raw", tmp_path / "qemu-img.raw", shallow=False)


def test_auto_uses_qemu_img(tmp_path: Path, qcow2_image: Path, failing_qemu_img: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HKPOD_QCOW2_CONVERTER", raising=False)
    make_disk(qcow2_image, tmp_path / "disk.raw", 128 * MIB)
    assert failing_qemu_img.exists()


def test_auto_falls_back_to_builtin(tmp_path: Path, qcow2_image: Path, failing_qemu_img: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in qemu-img fails, so a correct disk can only come from the built-in converter.
    monkeypatch.delenv("HKPOD_QCOW2_CONVERTER", raising=False)
    make_disk(qcow2_image, tmp_path / "auto.raw", 64 * MIB)
    monkeypatch.setenv("HKPOD_QCOW2_CONVERTER", "builtin")
    make_disk(qcow2_image, tmp_path / "builtin.raw", 64 * MIB)
    assert filecmp.cmp(tmp_path / "auto.raw", tmp_path / "builtin.raw", shallow=False)


def test_failed_conversion_leaves_nothing(tmp_path: Path, qcow2_image: Path, failing_qemu_img: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HKPOD_QCOW2_CONVERTER", "qemu-img")
    (tmp_path / "out").mkdir()
    with pytest.raises(HkpodError):
        make_disk(qcow2_image, tmp_path / "out" / "disk.raw", 128 * MIB)
    assert os.listdir(tmp_path / "out") == []


def test_grown_to_size_sparse(tmp_path: Path, qcow2_image: Path) -> None:
    make_disk(qcow2_image, tmp_path / "disk.raw", 1024 * MIB)
    stat = (tmp_path / "disk.raw").stat()
    assert stat.st_size == 1024 * MIB
    assert stat.st_blocks * 512 < 16 * MIB


def test_disk_smaller_than_image(tmp_path: Path, qcow2_image: Path) -> None:
    with pytest.raises(HkpodError) as raised:
        make_disk(qcow2_image, tmp_path / "disk.raw", 32 * MIB)
    assert "smaller than the image" in raised.value.message


def test_invalid_converter_choice(tmp_path: Path, qcow2_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HKPOD_QCOW2_CONVERTER", "fast")
    with pytest.raises(HkpodError) as raised:
        make_disk(qcow2_image, tmp_path / "disk.raw", 128 * MIB)
    assert "'fast'" in raised.value.message


def test_raw_copy_identical(tmp_path: Path) -> None:
    source = tmp_path / "source.raw"
    with source.open("wb") as handle:
        handle.truncate(8 * MIB)
        handle.seek(3 * MIB)
        handle.write(b"data" * 1000)
    make_disk(source, tmp_path / "disk.raw", 8 * MIB)
    assert filecmp.cmp(source, tmp_path / "disk.raw", shallow=False)
