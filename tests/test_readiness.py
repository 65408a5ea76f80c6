from __future__ import annotations

from pathlib import Path

import pytest

from hkpod import readiness
from hkpod.readiness import Guest, ReadinessError, console_tail, wait_until_ready


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness, "POLL_INTERVAL", 0.01)


def guest(console: Path, *, exit_reason: str | None = None) -> Guest:
    return Guest(name="podman", console_log=console, ready_marker="hkpod-ready-abc",
                 exit_reason=lambda: exit_reason, ssh_target=lambda: None)


def test_ready_vm_exit_fails_at_once(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("booting\npowering off\n")
    with pytest.raises(ReadinessError) as raised:
        wait_until_ready(guest(console, exit_reason="QEMU exited"), timeout=3600)
    assert "QEMU exited" in raised.value.message


def test_ready_exit_carries_console(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("booting\nreboot: Power down\n")
    with pytest.raises(ReadinessError) as raised:
        wait_until_ready(guest(console, exit_reason="QEMU exited"), timeout=3600)
    assert "reboot: Power down" in raised.value.console


def test_ready_timeout_names_phase(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("still booting\n")
    with pytest.raises(ReadinessError) as raised:
        wait_until_ready(guest(console), timeout=0.05)
    assert "cloud-init to finish" in raised.value.message


def test_ready_stalls_at_ssh(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("hkpod-ready-abc cloud-init finished\n")
    with pytest.raises(ReadinessError) as raised:
        wait_until_ready(guest(console), timeout=0.05)
    assert "SSH" in raised.value.message


def test_console_tail_last_lines(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"".join(f"line {number}\r\n".encode() for number in range(100)))
    assert console_tail(console, 3).splitlines() == ["line 97", "line 98", "line 99"]


def test_console_tail_missing(tmp_path: Path) -> None:
    assert console_tail(tmp_path / "absent") == "(no console output)"


@pytest.mark.parametrize(
    "line",
    [
        "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
        "Gave up waiting for root file system device.  Common problems:",
        "ALERT!  LABEL=cloudimg-rootfs does not exist.  Dropping to a shell!",
    ],
)
def test_ready_fatal_console_fails_at_once(tmp_path: Path, line: str) -> None:
    console = tmp_path / "console.log"
    console.write_text(f"booting\r\n{line}\r\nrebooting\r\n")
    with pytest.raises(ReadinessError) as raised:
        wait_until_ready(guest(console), timeout=3600)
    assert line.strip() in raised.value.message
