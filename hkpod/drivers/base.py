"""The small interface every hypervisor driver implements; shared code uses only this."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from hkpod.config import MachineConfig
from hkpod.paths import MachinePaths


@dataclass(frozen=True)
class CreateOptions:
    """Driver-specific choices made at create time."""

    accel: str = "auto"
    network: str = "nat"
    dry_run: bool = False
    # HyperKit: the binary named with --hyperkit (None: search the usual places).
    hyperkit: str | None = None


class Driver(abc.ABC):
    """Starts, finds and stops one kind of VM process for a machine directory."""

    name: ClassVar[str]
    # The guest's sshd is reached on a loopback port forward (QEMU) or on its own address (HyperKit).
    default_ssh_port: ClassVar[int] = 22

    @abc.abstractmethod
    def check_host(self) -> None:
        """Raise HkpodError when this host cannot run the driver, saying what to use instead."""

    def check_boot_files(self, kernel: Path, initrd: Path, *, cmdline: str, memory_mib: int) -> None:
        """Raise HkpodError when the hypervisor could not boot KERNEL and INITRD; called before anything is made."""

    @abc.abstractmethod
    def prepare(self, config: MachineConfig, paths: MachinePaths, options: CreateOptions) -> MachineConfig:
        """Return CONFIG completed with what the driver decides at create (accelerator, port, MAC)."""

    @abc.abstractmethod
    def argv(self, config: MachineConfig, paths: MachinePaths) -> list[str]:
        """Return the exact hypervisor argv; pure, so `--dry-run` can print it."""

    @abc.abstractmethod
    def start(self, config: MachineConfig, paths: MachinePaths) -> MachineConfig:
        """Start the VM detached; return CONFIG with anything that had to change (such as a taken port)."""

    @abc.abstractmethod
    def running_pid(self, config: MachineConfig, paths: MachinePaths) -> int | None:
        """Return the pid of this machine's live VM process, checked against its command line."""

    @abc.abstractmethod
    def stop(self, config: MachineConfig, paths: MachinePaths, *, force: bool, timeout: float) -> None:
        """Power the guest off (or kill it when FORCE), escalating to a kill after TIMEOUT seconds."""

    @abc.abstractmethod
    def ssh_address(self, config: MachineConfig, paths: MachinePaths) -> tuple[str, int] | None:
        """Return (host, port) of the guest's sshd, or None while it is not known yet."""

    def failed(self, config: MachineConfig, paths: MachinePaths) -> bool:
        """Return whether the VM process ended in an error that a plain stop would not explain."""
        return False

    def exit_reason(self, config: MachineConfig, paths: MachinePaths) -> str:
        """Describe why the VM process is gone, for readiness errors."""
        return "the VM process exited"
