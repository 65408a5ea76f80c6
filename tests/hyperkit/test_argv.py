from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hkpod.drivers.hyperkit.argv import (
    HyperkitSpec,
    hyperkit_argv,
    kernel_cmdline,
    mac_query_argv,
    stable_uuid,
)
from hkpod.errors import HkpodError

from . import fake_hyperkit

GOLDEN = Path(__file__).parent / "golden"

DOCKER_HYPERKIT = "/Applications/Docker.app/Contents/Resources/bin/com.docker.hyperkit"
SUPPORT = Path("/Users/jane/Library/Application Support/hkpod")
PLAIN = Path("/Users/jane/hkpod")


def machine_spec(data: Path, *, name: str = "podman", **changes: Any) -> HyperkitSpec:
    """Return the spec of machine NAME, laid out as hkpod.paths.MachinePaths names its files."""
    machine = data / "machines" / name
    spec = HyperkitSpec(
        cpus=2,
        memory_mib=2048,
        uuid=stable_uuid(name),
        pid_file=machine / "vm.pid",
        disk=machine / "disk.raw",
        seed_iso=machine / "seed.iso",
        console_pty=machine / "console.pty",
        console_log=machine / "console.log",
        kernel=machine / "vmlinuz",
        initrd=machine / "initrd.img",
        cmdline=kernel_cmdline(),
    )
    return dataclasses.replace(spec, **changes)


GOLDEN_CASES: dict[str, Callable[[], list[str]]] = {
    "plain-paths": lambda: hyperkit_argv("/usr/local/bin/hyperkit", machine_spec(PLAIN)),
    "spaces-in-paths": lambda: hyperkit_argv(DOCKER_HYPERKIT, machine_spec(SUPPORT)),
    "cmdline-extra": lambda: hyperkit_argv(
        DOCKER_HYPERKIT,
        machine_spec(
            SUPPORT,
            name="big",
            cpus=4,
            memory_mib=8192,
            cmdline=kernel_cmdline(extra="systemd.log_level=debug earlyprintk=serial,ttyS0,115200 rw"),
        ),
    ),
    "mac-query": lambda: mac_query_argv(DOCKER_HYPERKIT, stable_uuid("podman")),
}


def render(argv: list[str]) -> str:
    return "".join(f"{argument}\n" for argument in argv)


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name: str) -> None:
    argv = GOLDEN_CASES[name]()
    path = GOLDEN / f"{name}.argv"
    if not path.exists():
        pytest.fail(f"missing golden file {path}; after checking it by hand, create it with:\n{render(argv)}")

    assert render(argv) == path.read_text()


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_one_argument_per_line(name: str) -> None:
    for argument in GOLDEN_CASES[name]():
        assert "\n" not in argument


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_has_no_quotes(name: str) -> None:
    for argument in GOLDEN_CASES[name]():
        assert '"' not in argument
        assert "'" not in argument


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_stand_in_parses_golden(name: str) -> None:
    argv = GOLDEN_CASES[name]()

    config = fake_hyperkit.parse_args("hyperkit", argv[1:])

    assert config.firmware is not None
    assert config.uuid is not None
    assert fake_hyperkit.valid_uuid(config.uuid)


def test_stand_in_reads_devices() -> None:
    spec = machine_spec(SUPPORT)

    config = fake_hyperkit.parse_args("hyperkit", hyperkit_argv(DOCKER_HYPERKIT, spec)[1:])

    devices = {(slot.emulation, slot.config) for slot in config.slots.values()}
    assert ("virtio-blk", str(spec.disk)) in devices
    assert ("ahci-cd", str(spec.seed_iso)) in devices
    assert ("virtio-net", None) in devices
    assert ("lpc", None) in devices
    assert config.com == {0: f"autopty={spec.console_pty},log={spec.console_log}"}
    assert config.ncpus == 2
    assert config.memsize == 2048 << 20
    assert config.pidfile == str(spec.pid_file)
    assert config.acpi
    assert config.rtc_utc
    assert config.exit_on_hlt


def test_stand_in_keeps_cmdline_commas() -> None:
    cmdline = kernel_cmdline(extra="console=ttyS0,115200n8 foo=a,b,c")
    spec = machine_spec(PLAIN, cmdline=cmdline)

    config = fake_hyperkit.parse_args("hyperkit", hyperkit_argv("hyperkit", spec)[1:])

    assert config.firmware == fake_hyperkit.Firmware("kexec", str(spec.kernel), str(spec.initrd), cmdline)


def test_path_with_spaces_is_one_argument() -> None:
    spec = machine_spec(SUPPORT)

    argv = hyperkit_argv(DOCKER_HYPERKIT, spec)

    assert f"1:0,virtio-blk,{spec.disk}" in argv
    assert argv[argv.index(f"1:0,virtio-blk,{spec.disk}") - 1] == "-s"


def test_kernel_cmdline_default() -> None:
    assert kernel_cmdline() == "root=LABEL=cloudimg-rootfs console=ttyS0 panic=1 no_timer_check ds=nocloud"


def test_kernel_cmdline_extra() -> None:
    assert (
        kernel_cmdline("/dev/vda", "  quiet rw ")
        == "root=/dev/vda console=ttyS0 panic=1 no_timer_check ds=nocloud quiet rw"
    )


@pytest.mark.parametrize("root", ["", "LABEL=a b", "/dev/vda\n"])
def test_kernel_cmdline_bad_root(root: str) -> None:
    with pytest.raises(HkpodError, match="invalid root device"):
        kernel_cmdline(root)


def test_stable_uuid_pinned() -> None:
    # Changing this value changes every machine's MAC address and DHCP lease.
    assert stable_uuid("podman") == "26743038-ca77-5b94-9f70-2a6839e23baa"


def test_stable_uuid_per_name() -> None:
    assert stable_uuid("podman") == stable_uuid("podman")
    assert stable_uuid("podman") != stable_uuid("podman2")


def test_stable_uuid_accepted_by_hyperkit() -> None:
    assert fake_hyperkit.valid_uuid(stable_uuid("any name at all"))


@pytest.mark.parametrize("cpus", [1, 64])
def test_cpus_in_range(cpus: int) -> None:
    argv = hyperkit_argv("hyperkit", machine_spec(PLAIN, cpus=cpus))

    assert argv[argv.index("-c") + 1] == str(cpus)


@pytest.mark.parametrize("cpus", [0, -1, 65])
def test_cpus_out_of_range(cpus: int) -> None:
    with pytest.raises(HkpodError, match=f"invalid CPU count {cpus}"):
        hyperkit_argv("hyperkit", machine_spec(PLAIN, cpus=cpus))


def test_memory_must_be_positive() -> None:
    with pytest.raises(HkpodError, match="invalid memory size 0 MiB"):
        hyperkit_argv("hyperkit", machine_spec(PLAIN, memory_mib=0))


@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        "{9a12b4c0-2d7b-5d7f-8f7e-5a5b7c4c3c1b}",
        "9a12b4c02d7b5d7f8f7e5a5b7c4c3c1b",
        "urn:uuid:9a12b4c0-2d7b-5d7f-8f7e-5a5b7c4c3c1b",
        "9a12b4c0-2d7b-5d7f-ef7e-5a5b7c4c3c1b",
    ],
)
def test_uuid_rejected(value: str) -> None:
    with pytest.raises(HkpodError, match="invalid machine UUID"):
        hyperkit_argv("hyperkit", machine_spec(PLAIN, uuid=value))
    with pytest.raises(HkpodError, match="invalid machine UUID"):
        mac_query_argv("hyperkit", value)


def test_uuid_uppercase_accepted() -> None:
    value = stable_uuid("podman").upper()

    argv = hyperkit_argv("hyperkit", machine_spec(PLAIN, uuid=value))

    assert argv[argv.index("-U") + 1] == value


@pytest.mark.parametrize(
    ("field", "label"),
    [
        ("disk", "disk"),
        ("seed_iso", "seed ISO"),
        ("console_pty", "console pty"),
        ("console_log", "console log"),
        ("kernel", "kernel"),
        ("initrd", "initrd"),
    ],
)
def test_comma_in_path_rejected(field: str, label: str) -> None:
    changes: dict[str, Any] = {field: Path("/Users/jane/a,b/file")}
    spec = machine_spec(PLAIN, **changes)

    with pytest.raises(HkpodError, match=f"the {label} path /Users/jane/a,b/file contains a comma"):
        hyperkit_argv("hyperkit", spec)


def test_comma_in_pid_file_allowed() -> None:
    spec = machine_spec(PLAIN, pid_file=Path("/Users/jane/a,b/hyperkit.pid"))

    argv = hyperkit_argv("hyperkit", spec)

    assert argv[argv.index("-F") + 1] == "/Users/jane/a,b/hyperkit.pid"


@pytest.mark.parametrize("field", ["pid_file", "disk", "seed_iso", "console_pty", "console_log", "kernel", "initrd"])
def test_relative_path_rejected(field: str) -> None:
    changes: dict[str, Any] = {field: Path("machines/podman/file")}
    spec = machine_spec(PLAIN, **changes)

    with pytest.raises(HkpodError, match="must be absolute"):
        hyperkit_argv("hyperkit", spec)


def test_nul_in_path_rejected() -> None:
    with pytest.raises(HkpodError, match="NUL byte"):
        hyperkit_argv("hyperkit", machine_spec(PLAIN, disk=Path("/Users/jane/disk\0.img")))


@pytest.mark.parametrize("cmdline", ["", "console=ttyS0\0"])
def test_bad_cmdline_rejected(cmdline: str) -> None:
    with pytest.raises(HkpodError, match="kernel command line"):
        hyperkit_argv("hyperkit", machine_spec(PLAIN, cmdline=cmdline))
