"""Ctrl-C while `hkpod create` waits for the guest: the VM and the machine directory are gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, GuestImage, require_tool
from hkpod.process import command_line, read_pid_file

pytestmark = pytest.mark.e2e


def test_interrupted_create_leaves_nothing(isolated_home: Path, test_image: GuestImage) -> None:
    require_tool("qemu-system-x86_64")
    machine_dir = isolated_home / "hkpod" / "machines" / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "hkpod", "create", "interrupted", "--image", str(test_image.raw), "--disk", "3G",
         "--memory", "1G", "--accel", "tcg", "--network", "isolated"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    qemu_pid = None
    try:
        deadline = time.monotonic() + 300
        while qemu_pid is None and time.monotonic() < deadline and process.poll() is None:
            qemu_pid = read_pid_file(machine_dir / "vm.pid")
            time.sleep(0.2)
        assert qemu_pid is not None, "QEMU never started"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if qemu_pid is not None and (argv := command_line(qemu_pid)) and "qemu-system" in argv[0]:
            os.kill(qemu_pid, signal.SIGKILL)

    assert process.returncode == 130
    assert "Interrupted" in stderr
    assert command_line(qemu_pid) is None
    assert not machine_dir.exists()
