from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hkpod.config import SCHEMA_VERSION, MachineConfig, load_config, save_config, validate_name
from hkpod.errors import HkpodError
from hkpod.machine import kernel_cmdline, machine_uuid


def sample_config(**changes: object) -> MachineConfig:
    config = MachineConfig(
        name="podman", driver="qemu", cpus=2, memory_mib=2048, disk_bytes=10 << 30, image="/images/disk.raw",
        kernel_cmdline="root=LABEL=cloudimg-rootfs console=ttyS0", uuid="0b6d1c0e-0000-5000-8000-000000000000",
        mac="52:54:00:00:00:01", instance_id="hkpod-podman-1234", ready_marker="hkpod-ready-1", ssh_user="hkpod",
        ssh_port=2222, network="isolated", accel="tcg", created_at="2026-01-01T00:00:00+00:00",
    )
    return config.replace(**changes)


@pytest.mark.parametrize("name", ["podman", "a", "dev-1", "0", "x" * 63])
def test_name_valid(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "Podman", "a_b", "a.b", "x" * 64, "a b", "../etc", "é"])
def test_name_invalid(name: str) -> None:
    with pytest.raises(HkpodError) as raised:
        validate_name(name)
    assert repr(name) in raised.value.message


def test_config_round_trip(tmp_path: Path) -> None:
    config = sample_config()
    save_config(config, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == config


def test_config_records_schema_version(tmp_path: Path) -> None:
    save_config(sample_config(), tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_config_save_leaves_no_temporary(tmp_path: Path) -> None:
    save_config(sample_config(), tmp_path / "config.json")
    save_config(sample_config(cpus=4), tmp_path / "config.json")
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "does not hold a JSON object"),
        ('{"schema_version": 99}', "schema version 99"),
        (json.dumps({"schema_version": SCHEMA_VERSION, "name": "x"}), "lacks"),
    ],
)
def test_config_invalid(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(HkpodError) as raised:
        load_config(tmp_path / "config.json")
    assert expected in raised.value.message


def test_uuid_stable_per_name() -> None:
    assert machine_uuid("podman") == machine_uuid("podman")


def test_uuid_differs_between_names() -> None:
    assert machine_uuid("podman") != machine_uuid("podman2")


def test_cmdline_default_root() -> None:
    assert kernel_cmdline("").split()[0] == "root=LABEL=cloudimg-rootfs"


def test_cmdline_extra_last() -> None:
    assert kernel_cmdline("root=/dev/vda1 quiet").split()[-2:] == ["root=/dev/vda1", "quiet"]


@pytest.mark.parametrize("word", ["console=ttyS0", "ds=nocloud", "panic=1", "no_timer_check"])
def test_cmdline_has(word: str) -> None:
    assert word in kernel_cmdline("").split()


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_mib", None), ("memory_mib", "2048"), ("cpus", True), ("image_digests", 5), ("image_digests", [1]),
     ("ssh_port", "abc"), ("accel", 3), ("name", None), ("insecure_skip_verify", "no")],
)
def test_config_wrong_type(tmp_path: Path, field: str, value: object) -> None:
    save_config(sample_config(), tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(HkpodError) as raised:
        load_config(tmp_path / "config.json")
    assert field in raised.value.message


@pytest.mark.parametrize("name", ["a-", "podman-"])
def test_name_trailing_hyphen(name: str) -> None:
    with pytest.raises(HkpodError):
        validate_name(name)
