from __future__ import annotations

from pathlib import Path

import pytest

from hkpod.drivers.qemu import QemuSpec, accel_arguments, mac_from_uuid, qemu_argv
from hkpod.errors import HkpodError

GOLDEN = Path(__file__).parent / "golden"


def spec(**changes: object) -> QemuSpec:
    base = dict(
        binary="/usr/bin/qemu-system-x86_64", name="podman", uuid="3f1c59a4-2b1e-5d7c-9a0e-6c2d4b8e1f00",
        accel="tcg", cpus=2, memory_mib=2048, kernel=Path("/m/podman/vmlinuz"), initrd=Path("/m/podman/initrd.img"),
        cmdline="root=LABEL=cloudimg-rootfs ro console=ttyS0 panic=1 no_timer_check ds=nocloud",
        disk=Path("/m/podman/disk.raw"), seed=Path("/m/podman/seed.iso"), console_log=Path("/m/podman/console.log"),
        pid_file=Path("/m/podman/vm.pid"), qmp_socket="qmp.sock", mac="52:54:00:8e:1f:00", ssh_port=40022, isolated=True,
    )
    base.update(changes)
    return QemuSpec(**base)  # type: ignore[arg-type]


def golden(name: str) -> list[str]:
    path = GOLDEN / name
    assert path.is_file(), f"golden file {path} is missing; write it by hand and check it against QEMU's documentation"
    return path.read_text().splitlines()


@pytest.mark.parametrize(
    ("golden_name", "changes"),
    [
        ("qemu-isolated-tcg.argv", {}),
        ("qemu-nat-kvm.argv", {"isolated": False, "accel": "kvm", "cpus": 4, "memory_mib": 4096}),
        ("qemu-spaces-commas.argv", {"disk": Path("/Users/a b/m,1/disk.raw"), "seed": Path("/Users/a b/m,1/seed.iso")}),
    ],
)
def test_qemu_argv_golden(golden_name: str, changes: dict[str, object]) -> None:
    assert qemu_argv(spec(**changes)) == golden(golden_name)


def test_qemu_argv_port_placeholder() -> None:
    assert "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:<ssh-port>-:22" in qemu_argv(spec(ssh_port=0))


def test_qemu_argv_has_no_quotes() -> None:
    assert not any('"' in argument or "'" in argument for argument in qemu_argv(spec()))


def test_accel_invalid() -> None:
    with pytest.raises(HkpodError):
        accel_arguments("whpx")


def test_mac_from_uuid() -> None:
    assert mac_from_uuid("3f1c59a4-2b1e-5d7c-9a0e-6c2d4b8e1f00") == "52:54:00:8e:1f:00"
