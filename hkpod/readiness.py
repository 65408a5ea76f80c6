"""Waiting for a booting guest, phase by phase, until podman is reachable through its socket."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hkpod.errors import HkpodError
from hkpod.ssh import SshTarget, run_remote

LOG = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
CONSOLE_TAIL_LINES = 20
# ssh exits 255 for its own failures (refused, reset, timeout). cloud-init restarts sshd a few
# seconds after it first accepts connections, so 255 is retried until the deadline.
SSH_ERROR_STATUS = 255
# Console lines after which the guest cannot come up. With panic=1 on the kernel command line, the
# kernel and the initramfs of Debian and Ubuntu reboot instead of halting. Without this check the
# boot would loop until the timeout.
FATAL_CONSOLE_TEXT = (
    "Kernel panic - not syncing",
    "Gave up waiting for root file system device",
    "Dropping to a shell",
)


@dataclass
class Guest:
    """A booting guest, as far as readiness needs it."""

    name: str
    console_log: Path
    ready_marker: str
    # Returns None while the VM process lives, else why it is gone.
    exit_reason: Callable[[], str | None]
    # Returns the SSH target once the guest's address is known (HyperKit learns it from DHCP).
    ssh_target: Callable[[], SshTarget | None]
    # The last line ssh printed while the guest did not accept connections, for the timeout message.
    last_ssh_error: str = ""


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        text = path.read_bytes().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return "(no console output)"
    return "\n".join(text.rstrip("\n\0").splitlines()[-lines:])


class ReadinessError(HkpodError):
    """A start that did not reach ready; carries the console tail for the user."""

    def __init__(self, message: str, hint: str, console: str) -> None:
        super().__init__(message, hint)
        self.console = console


class _Clock:
    def __init__(self, timeout: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeout = timeout

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


def wait_until_ready(guest: Guest, timeout: float) -> SshTarget:
    """Return once SSH answers with the pinned host key and podman.socket is active.

    Each phase is logged with the elapsed time. A VM process that exits fails the wait at once;
    a deadline that passes names the phase that stalled. Both include the console's last lines.
    """
    clock = _Clock(timeout)

    _wait_for(guest, clock, "cloud-init to finish (console marker)", lambda: _marker_seen(guest))
    LOG.info("cloud-init finished (%.1f s)", clock.elapsed())

    holder: list[SshTarget] = []
    _wait_for(guest, clock, "SSH with the pinned host key", lambda: _ssh_answers(guest, holder))
    LOG.info("SSH is up (%.1f s)", clock.elapsed())
    target = holder[0]

    _wait_for(guest, clock, "podman.socket to be active", lambda: _socket_active(target, clock))
    LOG.info("podman.socket is active (%.1f s)", clock.elapsed())
    return target


def _fatal_console_line(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return None
    for line in text.replace("\r", "").splitlines():
        if any(fatal in line for fatal in FATAL_CONSOLE_TEXT):
            return line.strip()
    return None


def _wait_for(guest: Guest, clock: _Clock, phase: str, ready: Callable[[], bool]) -> None:
    while True:
        fatal = _fatal_console_line(guest.console_log)
        if fatal is not None:
            raise ReadinessError(
                f"machine {guest.name!r} failed to boot after {clock.elapsed():.0f} s: {fatal}",
                "check the kernel, initrd and --cmdline-extra (root=) against the image",
                console_tail(guest.console_log),
            )
        reason = guest.exit_reason()
        if reason is not None:
            raise ReadinessError(
                f"machine {guest.name!r} stopped while waiting for {phase} after {clock.elapsed():.0f} s: {reason}",
                f"see `hkpod logs {guest.name}`",
                console_tail(guest.console_log),
            )
        if ready():
            return
        if clock.expired():
            tail = console_tail(guest.console_log)
            detail = f" (last ssh error: {guest.last_ssh_error})" if guest.last_ssh_error else ""
            hint = f"see `hkpod logs {guest.name}`, or raise --timeout"
            if tail == "(no console output)" or not tail.strip():
                hint = "the guest printed nothing: check --kernel, and try --accel tcg if a hardware accelerator is in use"
            raise ReadinessError(
                f"timed out after {clock.timeout:.0f} s waiting for {phase} on machine {guest.name!r}{detail}",
                hint,
                tail,
            )
        time.sleep(POLL_INTERVAL)


def _marker_seen(guest: Guest) -> bool:
    try:
        return guest.ready_marker.encode() in guest.console_log.read_bytes()
    except FileNotFoundError:
        return False


def _ssh_answers(guest: Guest, holder: list[SshTarget]) -> bool:
    target = guest.ssh_target()
    if target is None:
        return False
    result = run_remote(target, ["true"], timeout=30, check=False)
    if result.returncode == 0:
        holder.append(target)
        return True
    if result.returncode != SSH_ERROR_STATUS:
        raise HkpodError(f"ssh to machine {guest.name!r} ran `true` with exit status {result.returncode}")
    stderr = (result.stderr or "").strip()
    if "host key verification failed" in stderr.lower():
        raise HkpodError(
            f"machine {guest.name!r} presented a host key other than the one hkpod pinned",
            "something else answers on its address, or the guest regenerated its keys; recreate the machine",
        )
    guest.last_ssh_error = stderr.splitlines()[-1] if stderr else f"exit status {SSH_ERROR_STATUS}"
    LOG.debug("ssh not ready yet: %s", guest.last_ssh_error)
    return False


def _socket_active(target: SshTarget, clock: _Clock) -> bool:
    remaining = max(5.0, clock.deadline - time.monotonic())
    try:
        result = run_remote(
            target,
            ["sh", "-c", "cloud-init status --wait >/dev/null 2>&1; systemctl is-active podman.socket"],
            timeout=remaining,
            check=False,
        )
    except HkpodError as error:
        LOG.debug("podman.socket check failed: %s", error)
        return False
    return result.stdout.strip() == "active"
