from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from hkpod.ssh import SshTarget


@pytest.mark.parametrize("directory", ["plain", "Application Support", "odd, dir"])
def test_ssh_config_paths(tmp_path: Path, directory: str) -> None:
    # `ssh -G` prints the configuration it would use without connecting anywhere.
    require_tool("ssh")
    machine_dir = tmp_path / directory
    machine_dir.mkdir()
    (machine_dir / "id_ed25519").write_text("")
    target = SshTarget(machine="podman", user="hkpod", host="127.0.0.1", port=40022,
                       identity=machine_dir / "id_ed25519", known_hosts=machine_dir / "known_hosts")
    argv = target.argv(["true"], batch=True)
    argv.insert(1, "-G")
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    settings = [line.split(" ", 1) for line in result.stdout.splitlines()]
    assert ["identityfile", str(machine_dir / "id_ed25519")] in settings
    assert ["userknownhostsfile", str(machine_dir / "known_hosts")] in settings
    assert ["stricthostkeychecking", "true"] in settings
    assert ["hostkeyalias", "hkpod-podman"] in settings
