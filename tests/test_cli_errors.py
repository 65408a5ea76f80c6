"""Bad input through the real CLI: one line naming the value, exit 1, nothing left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import run_hkpod
from hyperkit.kernels import write_bzimage
from hkpod.config import save_config
from hkpod.lock import machine_lock
from hkpod.paths import MachinePaths
from test_config import sample_config


@pytest.fixture
def fake_image(tmp_path: Path) -> Path:
    """A 2 GiB sparse raw image with a kernel and initrd beside it; enough to reach every check before boot."""
    directory = tmp_path / "image"
    directory.mkdir()
    image = directory / "disk.raw"
    with image.open("wb") as handle:
        handle.truncate(2 << 30)
    write_bzimage(directory / "vmlinuz")
    (directory / "initrd.img").write_bytes(b"initrd")
    return image


def machines(home: Path) -> list[str]:
    root = home / "hkpod" / "machines"
    return sorted(os.listdir(root)) if root.is_dir() else []


def assert_one_line_error(result: object, *needles: str) -> None:
    assert result.returncode == 1, result.stderr  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["create", "Bad_Name"], ["'Bad_Name'", "lowercase"]),
        (["create", "x" * 64], ["invalid machine name"]),
        (["create", "--memory", "2X"], ["'2X'", "--memory"]),
        (["create", "--disk", "ten"], ["'ten'", "--disk"]),
        (["create", "--cpus", "0"], ["--cpus 0"]),
        (["create", "--cpus", "100000"], ["--cpus 100000", "CPUs"]),
        (["create", "--image", "/nonexistent/disk.raw"], ["/nonexistent/disk.raw", "no such file"]),
        (["start", "nosuch"], ["'nosuch'", "does not exist"]),
        (["stop", "nosuch"], ["'nosuch'", "does not exist"]),
        (["rm", "nosuch"], ["'nosuch'", "does not exist"]),
        (["inspect", "nosuch"], ["'nosuch'", "does not exist"]),
        (["logs", "nosuch"], ["'nosuch'", "does not exist"]),
        (["ssh", "nosuch"], ["'nosuch'", "does not exist"]),
    ],
)
def test_cli_rejects(isolated_home: Path, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(run_hkpod(args), *needles)


@pytest.mark.parametrize(
    ("image", "needles"),
    [("ubuntu:22.04", ["22.04", "3.4"]), ("ubuntu:focal", ["20.04"]), ("ubuntu:99.04", ["99.04"]),
     ("http://127.0.0.1:9/images/", ["names a directory"])],
)
def test_create_image_rejected(isolated_home: Path, image: str, needles: list[str]) -> None:
    assert_one_line_error(run_hkpod(["create", "--image", image]), *needles)


def test_create_catalog_with_kernel(isolated_home: Path, tmp_path: Path) -> None:
    result = run_hkpod(["create", "--image", "ubuntu:lts", "--kernel", str(tmp_path)])
    assert_one_line_error(result, "--kernel")


def test_dry_run_default_image_downloads_nothing(isolated_home: Path) -> None:
    result = run_hkpod(["create", "--accel", "tcg", "--dry-run"], check=True)
    assert "qemu-system" in result.stdout
    assert not (isolated_home / "cache" / "images").exists()


def test_create_image_directory(isolated_home: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_hkpod(["create", "--image", str(tmp_path)]), str(tmp_path), "is a directory")


def test_create_memory_over_host(isolated_home: Path) -> None:
    assert_one_line_error(run_hkpod(["create", "--memory", "100000G"]), "--memory 102400000M", "host")


def test_create_cmdline_control_characters(isolated_home: Path) -> None:
    assert_one_line_error(run_hkpod(["create", "--cmdline-extra", "quiet\nsplash"]), "--cmdline-extra", "control characters")


def test_logs_previous_missing(isolated_home: Path) -> None:
    paths = MachinePaths.for_name("podman")
    paths.dir.mkdir(parents=True)
    save_config(sample_config(), paths.config)
    assert_one_line_error(run_hkpod(["logs", "--previous", "podman"]), "earlier boot")


def test_image_convert_keeps_existing(isolated_home: Path, tmp_path: Path) -> None:
    existing = tmp_path / "disk.raw"
    existing.write_bytes(b"precious data")
    source = tmp_path / "source.qcow2"
    source.write_bytes(b"QFI\xfb")
    assert_one_line_error(run_hkpod(["image", "convert", str(source), str(existing)]), "already exists")
    assert existing.read_bytes() == b"precious data"


def test_rm_force_unreadable_config(isolated_home: Path) -> None:
    paths = MachinePaths.for_name("podman")
    paths.dir.mkdir(parents=True)
    paths.config.write_text("{broken")
    result = run_hkpod(["rm", "--force", "podman"])
    assert result.returncode == 0
    assert not paths.dir.exists()


def test_create_disk_smaller_than_image(isolated_home: Path, fake_image: Path) -> None:
    result = run_hkpod(["create", "small", "--image", str(fake_image), "--disk", "1G", "--accel", "tcg"])
    assert result.returncode == 1
    assert "--disk 1G is smaller than the image" in result.stderr


def test_create_failure_leaves_nothing(isolated_home: Path, fake_image: Path) -> None:
    run_hkpod(["create", "small", "--image", str(fake_image), "--disk", "1G", "--accel", "tcg"])
    assert machines(isolated_home) == []


def test_create_without_qemu(isolated_home: Path, fake_image: Path) -> None:
    env = dict(os.environ, PATH="/nonexistent")
    result = run_hkpod(["create", "--image", str(fake_image), "--driver", "qemu"], env=env)
    assert_one_line_error(result, "qemu-system-", "not found", "install QEMU")


def test_create_existing_keeps_machine(isolated_home: Path, fake_image: Path) -> None:
    paths = MachinePaths.for_name("podman")
    paths.dir.mkdir(parents=True)
    save_config(sample_config(), paths.config)
    paths.disk.write_bytes(b"precious data")
    result = run_hkpod(["create", "podman", "--image", str(fake_image)])
    assert_one_line_error(result, "'podman'", "already exists")
    assert paths.disk.read_bytes() == b"precious data"


def test_start_while_locked(isolated_home: Path) -> None:
    paths = MachinePaths.for_name("podman")
    paths.dir.mkdir(parents=True)
    save_config(sample_config(), paths.config)
    with machine_lock(paths.lock, "podman"):
        result = run_hkpod(["start", "podman"])
    assert_one_line_error(result, "'podman' is busy", f"pid {os.getpid()}")


def test_stop_not_running(isolated_home: Path) -> None:
    paths = MachinePaths.for_name("podman")
    paths.dir.mkdir(parents=True)
    save_config(sample_config(), paths.config)
    result = run_hkpod(["stop", "podman"])
    assert result.returncode == 0
    assert "not running" in result.stdout


def test_list_json_state_stopped(isolated_home: Path) -> None:
    paths = MachinePaths.for_name("podman")
    paths.dir.mkdir(parents=True)
    save_config(sample_config(), paths.config)
    paths.pid_file.write_text(f"{os.getpid()}\n")  # a live pid that is not this machine's QEMU
    result = run_hkpod(["list", "--format", "json"], check=True)
    import json

    assert json.loads(result.stdout)[0]["state"] == "stopped"


def test_dry_run_creates_nothing(isolated_home: Path, fake_image: Path) -> None:
    result = run_hkpod(["create", "demo", "--image", str(fake_image), "--accel", "tcg", "--network", "isolated", "--dry-run"], check=True)
    assert machines(isolated_home) == []
    assert "restrict=on,hostfwd=tcp:127.0.0.1:<ssh-port>-:22" in result.stdout


def test_dry_run_prints_seed_without_private_key(isolated_home: Path, fake_image: Path) -> None:
    result = run_hkpod(["create", "demo", "--image", str(fake_image), "--accel", "tcg", "--dry-run"], check=True)
    assert "#cloud-config" in result.stdout
    assert "PRIVATE KEY" not in result.stdout


def test_dry_run_auto_accel_unprobed(isolated_home: Path, fake_image: Path) -> None:
    result = run_hkpod(["create", "demo", "--image", str(fake_image), "--dry-run"], check=True)
    assert "-accel '<accel: probed at create>'" in result.stdout


def test_create_kernel_not_bzimage(isolated_home: Path, fake_image: Path) -> None:
    kernel = fake_image.parent / "vmlinuz"
    kernel.write_bytes(b"<!DOCTYPE HTML>" + bytes(700))
    result = run_hkpod(["create", "html", "--image", str(fake_image), "--disk", "3G", "--accel", "tcg"])
    assert_one_line_error(result, "not a bzImage", str(kernel))
    assert machines(isolated_home) == []


def test_create_ftp_image_rejected(isolated_home: Path) -> None:
    assert_one_line_error(run_hkpod(["create", "--image", "ftp://127.0.0.1/x.img"]), "only http:// and https://")


def test_dry_run_url_downloads_nothing(isolated_home: Path) -> None:
    result = run_hkpod(["create", "--accel", "tcg", "--image", "http://127.0.0.1:9/x.img", "--kernel", "http://127.0.0.1:9/k",
                        "--initrd", "http://127.0.0.1:9/i", "--dry-run"], check=True)
    assert "qemu-system" in result.stdout
    assert not (isolated_home / "cache" / "images").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="HyperKit cannot run on Linux, so create must stop at the host check")
def test_hyperkit_on_linux_fails_before_download(isolated_home: Path) -> None:
    # The default image is ubuntu:lts; the host check must come before any download from the mirror.
    result = run_hkpod(["create", "--driver", "hyperkit"])
    assert_one_line_error(result, "--driver qemu")
    assert not (isolated_home / "cache" / "images").exists()
