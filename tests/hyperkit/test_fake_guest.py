"""The stand-in's guest under QEMU, without booting it: the QEMU argv, the address, the exit statuses."""

from __future__ import annotations

import ipaddress

import pytest

from . import fake_hyperkit
from .fake_hyperkit import BlockDevice, Config, Firmware, Runtime, Slot

UUID = "6ba7b810-9dad-51d1-80b4-00c04fd430c8"
SETTINGS = {"leases": "/tmp/leases", "qemu": "/usr/bin/qemu-system-x86_64"}


def machine() -> tuple[Config, Runtime]:
    config = Config(progname="hyperkit", ncpus=2, memsize=1 << 30, uuid=UUID,
                    firmware=Firmware("kexec", "/m/vmlinuz", "/m/initrd.img", "root=/dev/vda console=ttyS0"))
    config.slots[(0, 5, 0)] = Slot(0, 5, 0, "virtio-rnd", None)
    runtime = Runtime(mac=fake_hyperkit.mac_from_uuid(UUID), console_logs=["/m/console.log"])
    runtime.disks = [BlockDevice("/m/disk,1.raw", "virtio-blk", False, -1), BlockDevice("/m/seed.iso", "ahci-cd", True, -1)]
    return config, runtime


def qemu_argv() -> list[str]:
    config, runtime = machine()
    return fake_hyperkit.qemu_argv(config, runtime, SETTINGS, "/tmp/q/qmp.sock", "127.9.8.7")


def option_values(argv: list[str], option: str) -> list[str]:
    return [value for name, value in zip(argv, argv[1:]) if name == option]


@pytest.mark.parametrize(("option", "value"), [
    ("-m", "1024M"),
    ("-smp", "2"),
    ("-kernel", "/m/vmlinuz"),
    ("-initrd", "/m/initrd.img"),
    ("-append", "root=/dev/vda console=ttyS0"),
    ("-serial", "file:/m/console.log"),
    ("-accel", "tcg,thread=multi,tb-size=256"),
    ("-cpu", "max"),
])
def test_qemu_option(option: str, value: str) -> None:
    assert option_values(qemu_argv(), option) == [value]


def test_qemu_exits_on_reboot() -> None:
    assert "-no-reboot" in qemu_argv()


def test_network_restricted_to_forward() -> None:
    assert option_values(qemu_argv(), "-netdev") == ["user,id=net0,restrict=on,hostfwd=tcp:127.9.8.7:22-:22"]


def test_nic_has_mac_of_query() -> None:
    mac = fake_hyperkit.format_mac(fake_hyperkit.mac_from_uuid(UUID))

    assert f"virtio-net-pci,netdev=net0,mac={mac}" in option_values(qemu_argv(), "-device")


def test_disk_comma_doubled() -> None:
    assert "if=none,id=drive0,format=raw,file=/m/disk,,1.raw,cache=writeback" in option_values(qemu_argv(), "-drive")


def test_seed_is_cdrom() -> None:
    assert "ide-cd,drive=drive1,bus=ide.1" in option_values(qemu_argv(), "-device")


@pytest.mark.parametrize("uuid", [UUID, "7bed8094-b2b6-5196-aafe-f9830e7cebff", "00000000-0000-0000-0000-000000000000"])
def test_address_is_loopback(uuid: str) -> None:
    address = ipaddress.IPv4Address(fake_hyperkit.loopback_address(uuid))

    assert address.is_loopback
    assert str(address) != "127.0.0.1"


def test_address_is_stable() -> None:
    assert fake_hyperkit.loopback_address(UUID) == fake_hyperkit.loopback_address(UUID.upper())


@pytest.mark.parametrize(("returncode", "reason", "status"), [
    (0, "guest-shutdown", 0),
    (0, "guest-reset", 2),
    (0, "guest-panic", 2),
    (0, None, 0),
    (1, None, 1),
    (-9, "guest-reset", 1),
])
def test_guest_status(returncode: int, reason: str | None, status: int) -> None:
    assert fake_hyperkit.guest_status(returncode, reason) == status
