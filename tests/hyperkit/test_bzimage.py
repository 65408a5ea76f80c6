from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hkpod.drivers.hyperkit.argv import kernel_cmdline
from hkpod.bzimage import check_kernel
from hkpod.errors import HkpodError

from . import fake_hyperkit
from .kernels import KERNEL_END, write_bzimage, write_html_page

MIB = 1 << 20
CMDLINE = "console=ttyS0"


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.img"
    path.write_bytes(b"\x1f\x8b" + bytes(4094))
    return path


def test_html_page_not_bzimage(tmp_path: Path, initrd: Path) -> None:
    kernel = write_html_page(tmp_path / "vmlinuz")
    assert kernel.stat().st_size == 707

    with pytest.raises(HkpodError) as raised:
        check_kernel(kernel, cmdline=CMDLINE, initrd=initrd, memory_mib=2048)

    assert "not a bzImage" in raised.value.message
    assert str(kernel) in raised.value.message
    assert "HTML" in (raised.value.hint or "")


def test_minimal_kernel_passes(tmp_path: Path, initrd: Path) -> None:
    kernel = write_bzimage(tmp_path / "vmlinuz")

    check_kernel(kernel, cmdline=CMDLINE, initrd=initrd, memory_mib=2048)


@dataclass(frozen=True)
class Case:
    name: str
    fields: dict[str, int | bytes] = field(default_factory=dict)
    size: int = 2048
    cmdline: str = CMDLINE
    memory_mib: int = 2048
    initrd_size: int = 4096
    # Words the error must contain; empty for a case that must pass.
    expected: tuple[str, ...] = ()


CASES = [
    Case("short-file", size=600, expected=("not a bzImage", "600 bytes")),
    Case("no-boot-flag", {"boot_flag": 0x0000}, expected=("not a bzImage", "boot_flag", "0x1FE")),
    Case("no-hdrs", {"header": b"HdrT"}, expected=("not a bzImage", "0x202")),
    Case("no-setup-sects", {"setup_sects": 0}, expected=("not a bzImage", "setup_sects")),
    Case("protocol-2.09", {"version": 0x0209}, expected=("boot protocol 2.09", "0x206", "2.10")),
    Case("protocol-2.10", {"version": 0x020A}),
    Case("no-loaded-high", {"loadflags": 0x80}, expected=("not a bzImage", "LOADED_HIGH", "0x211")),
    Case("truncated", {"syssize": 200}, expected=("truncated",)),
    Case("load-below-1mib", {"relocatable_kernel": 0, "pref_address": 0x80000}, expected=("0x80000", "1 MiB")),
    Case("alignment-zero", {"kernel_alignment": 0}, expected=("below the 1 MiB",)),
    Case("fixed-address", {"relocatable_kernel": 0, "pref_address": 0x1000000}),
    Case("code-exceeds-init-size", size=8192, expected=("init_size", "0x260")),
    Case("no-protected-mode-code", size=1024, fields={"syssize": 0}, expected=("no protected-mode code",)),
    Case("init-size-zero", {"init_size": 0}, expected=("init_size", "up to 4098 MiB", "at most 3 GiB")),
    Case("memory-too-small", memory_mib=2, expected=("up to 2.004 MiB", "init_size", "more memory")),
    Case("cmdline-at-limit", {"cmdline_size": 14}, cmdline="c" * 13),
    Case("cmdline-too-long", {"cmdline_size": 14}, cmdline="c" * 14, expected=("14 bytes", "cmdline_size", "0x238")),
    Case("cmdline-empty-means-auto", {"cmdline_size": 4}, cmdline="", expected=("4 bytes",)),
    Case("initrd-empty", initrd_size=0, expected=("empty",)),
    Case("initrd-above-addr-max", {"initrd_addr_max": 0x1000}, initrd_size=8192, expected=("initrd_addr_max", "0x22C")),
    # With 4 MiB the initrd ends at 4 MiB - 1 and must start at or above KERNEL_END.
    Case("initrd-just-fits", memory_mib=4, initrd_size=(4 * MIB - 1) - KERNEL_END),
    Case("initrd-overlaps-kernel", memory_mib=4, initrd_size=(4 * MIB - 1) - KERNEL_END + 1, expected=("do not fit",)),
    Case("initrd-large-memory", memory_mib=8192, initrd_size=64 * MIB),
]


def make_files(tmp_path: Path, case: Case) -> tuple[Path, Path]:
    kernel = write_bzimage(tmp_path / "vmlinuz", size=case.size, **case.fields)
    initrd = tmp_path / "initrd.img"
    with initrd.open("wb") as initrd_file:
        initrd_file.truncate(case.initrd_size)
    return kernel, initrd


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_kernel_rules(tmp_path: Path, case: Case) -> None:
    kernel, initrd = make_files(tmp_path, case)

    if not case.expected:
        check_kernel(kernel, cmdline=case.cmdline, initrd=initrd, memory_mib=case.memory_mib)
        return

    with pytest.raises(HkpodError) as raised:
        check_kernel(kernel, cmdline=case.cmdline, initrd=initrd, memory_mib=case.memory_mib)
    for word in case.expected:
        assert word in str(raised.value)
    named = str(initrd) if case.name.startswith("initrd") else str(kernel)
    assert named in raised.value.message


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_agrees_with_stand_in(tmp_path: Path, case: Case) -> None:
    """hkpod rejects exactly the kernels that the stand-in's copy of kexec.c rejects."""
    kernel, initrd = make_files(tmp_path, case)
    firmware = fake_hyperkit.Firmware("kexec", str(kernel), str(initrd), case.cmdline or None)

    stand_in_rejects = fake_hyperkit.kexec_failure(firmware, case.memory_mib * MIB) is not None
    try:
        check_kernel(kernel, cmdline=case.cmdline, initrd=initrd, memory_mib=case.memory_mib)
        hkpod_rejects = False
    except HkpodError:
        hkpod_rejects = True

    assert hkpod_rejects == stand_in_rejects


def test_missing_kernel(tmp_path: Path, initrd: Path) -> None:
    with pytest.raises(HkpodError, match=r"kernel .*vmlinuz not found"):
        check_kernel(tmp_path / "vmlinuz", cmdline=CMDLINE, initrd=initrd, memory_mib=2048)


def test_missing_initrd(tmp_path: Path) -> None:
    kernel = write_bzimage(tmp_path / "vmlinuz")

    with pytest.raises(HkpodError, match=r"initrd .*initrd.img not found"):
        check_kernel(kernel, cmdline=CMDLINE, initrd=tmp_path / "initrd.img", memory_mib=2048)


def test_kernel_directory(tmp_path: Path, initrd: Path) -> None:
    with pytest.raises(HkpodError, match="not a regular file"):
        check_kernel(tmp_path, cmdline=CMDLINE, initrd=initrd, memory_mib=2048)


def test_boot_kernels(initrd: Path) -> None:
    kernels = [path for path in sorted(Path("/boot").glob("vmlinuz-*")) if os.access(path, os.R_OK)]
    if not kernels:
        pytest.skip("no readable kernel in /boot")

    for kernel in kernels:
        check_kernel(kernel, cmdline=kernel_cmdline(), initrd=initrd, memory_mib=2048)


def test_test_image_kernel(test_image: Any) -> None:
    # The Debian kernel and initrd of the QEMU test guest, from tests/conftest.py.
    check_kernel(test_image.kernel, cmdline=kernel_cmdline("/dev/vda"), initrd=test_image.initrd, memory_mib=2048)
