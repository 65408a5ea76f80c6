"""The accelerator probe boots the test guest's kernel for real; `auto` must not trust /dev/kvm alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import GuestImage, require_tool
from hkpod.drivers import qemu


@pytest.mark.e2e
def test_probe_tcg_boots(test_image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = require_tool("qemu-system-x86_64")
    monkeypatch.setattr(qemu, "ACCEL_PROBE_TIMEOUT", 180.0)
    assert qemu.probe_accel(binary, "tcg", test_image.kernel)


@pytest.mark.e2e
def test_probe_rejects_non_kernel(tmp_path: Path) -> None:
    binary = require_tool("qemu-system-x86_64")
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"<!DOCTYPE HTML>" + bytes(4096))
    assert not qemu.probe_accel(binary, "tcg", not_a_kernel)


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="only hosts whose /dev/kvm is kvm-pvm")
def test_auto_avoids_pvm_kvm(test_image: GuestImage, isolated_home: Path) -> None:
    binary = require_tool("qemu-system-x86_64")
    assert qemu.resolve_accel("auto", binary, test_image.kernel) == "tcg"


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="only hosts whose /dev/kvm is kvm-pvm")
def test_auto_result_remembered(test_image: GuestImage, isolated_home: Path) -> None:
    binary = require_tool("qemu-system-x86_64")
    qemu.resolve_accel("auto", binary, test_image.kernel)
    cache = json.loads((isolated_home / "cache" / "accel.json").read_text())
    assert list(cache.values()) == ["tcg"]
