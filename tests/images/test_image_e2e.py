"""`hkpod create --image ubuntu:lts` from a local mirror laid out like cloud-images.ubuntu.com, booted for real.

The mirror serves the Debian test guest under Ubuntu's file names, with SHA256SUMS signed by a test
key that HKPOD_TRUSTED_KEYS pins in place of Ubuntu's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import GuestImage, require_tool, run_hkpod
from hkpod.images.catalog import newest_lts

from .helpers import GpgKeys, MirrorServer

pytestmark = pytest.mark.e2e


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_mirror(root: Path, image: GuestImage, keys: GpgKeys) -> tuple[str, Path]:
    """Lay out releases/<codename>/release/ for the newest LTS with the test guest's files."""
    release = newest_lts()
    directory = root / "releases" / release.codename / "release"
    (directory / "unpacked").mkdir(parents=True)
    prefix = f"ubuntu-{release.version}-server-cloudimg-amd64"
    files = {
        f"{prefix}.img": image.qcow2,
        f"unpacked/{prefix}-vmlinuz-generic": image.kernel,
        f"unpacked/{prefix}-initrd-generic": image.initrd,
    }
    for name, source in files.items():
        (directory / name).symlink_to(source)
    sums = directory / "SHA256SUMS"
    sums.write_text("".join(f"{sha256_file(source)} *{name}\n" for name, source in files.items()))
    keys.sign(sums)
    return release.name, directory


def test_create_from_local_mirror(
    tmp_path: Path, test_image: GuestImage, gpg_keys: GpgKeys, start_server: Callable[[Path], MirrorServer]
) -> None:
    require_tool("qemu-system-x86_64")
    require_tool("podman")
    image_name, directory = build_mirror(tmp_path / "mirror", test_image, gpg_keys)
    server = start_server(tmp_path / "mirror")
    home = tmp_path / "home"
    home.mkdir()
    (home / "containers.conf").touch()
    env = dict(os.environ, HOME=str(home), HKPOD_HOME=str(home / "hkpod"), HKPOD_CACHE=str(home / "cache"),
               CONTAINERS_CONF=str(home / "containers.conf"), HKPOD_TRUSTED_KEYS=str(gpg_keys.trusted_pub))
    env.pop("HKPOD_MIRROR", None)
    try:
        result = run_hkpod(["create", "lts", "--image", "ubuntu:lts", "--mirror", server.url, "--disk", "4G",
                            "--memory", "1G", "--accel", "tcg", "--network", "isolated", "--timeout", "900"], env=env)
        assert result.returncode == 0, result.stderr
        info = subprocess.run(["podman", "--connection", "lts", "info", "--format", "json"], env=env,
                              capture_output=True, text=True, check=True, timeout=300)
        assert json.loads(info.stdout)["host"]["hostname"] == "lts"

        config = json.loads((home / "hkpod" / "machines" / "lts" / "config.json").read_text())
        assert config["image"].startswith(f"{image_name}/amd64")
        assert sorted(config["image_digests"]) == sorted(line.split()[0] for line in (directory / "SHA256SUMS").read_text().splitlines())

        listing = run_hkpod(["image", "ls"], env=env, check=True).stdout
        assert image_name in listing
        pruned = run_hkpod(["image", "prune"], env=env, check=True).stdout
        assert "Removed 0 images" in pruned
    finally:
        run_hkpod(["rm", "--force", "lts"], env=env)
