"""Every path hkpod reads or writes: the state root, the cache, and each file of a machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "hkpod"


def state_root() -> Path:
    """Return the directory that contains all machines: `$HKPOD_HOME`, else the platform's data dir."""
    override = os.environ.get("HKPOD_HOME")
    if override:
        return Path(override).expanduser().absolute()
    return platformdirs.user_data_path(APP_NAME)


def machines_root() -> Path:
    return state_root() / "machines"


def cache_root() -> Path:
    """Return the download and probe cache: `$HKPOD_CACHE`, else under `$HKPOD_HOME`, else the platform's cache dir."""
    override = os.environ.get("HKPOD_CACHE")
    if override:
        return Path(override).expanduser().absolute()
    if os.environ.get("HKPOD_HOME"):
        return state_root() / "cache"
    return platformdirs.user_cache_path(APP_NAME)


@dataclass(frozen=True)
class MachinePaths:
    """The files of one machine directory; nothing else in hkpod spells these names."""

    dir: Path

    @classmethod
    def for_name(cls, name: str) -> MachinePaths:
        return cls(machines_root() / name)

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def debug_log(self) -> Path:
        return self.dir / "hkpod.log"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.raw"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.iso"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def previous_console_log(self) -> Path:
        return self.dir / "console.previous.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "vm.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console_pty(self) -> Path:
        """HyperKit writes the name of the serial console's pty into this file."""
        return self.dir / "console.pty"

    @property
    def supervisor_socket(self) -> Path:
        """The HyperKit supervisor's control socket (mode 0600, owned by the machine's owner)."""
        return self.dir / "supervisor.sock"

    @property
    def supervisor_state(self) -> Path:
        """The HyperKit supervisor's record of hyperkit's starts and exit statuses."""
        return self.dir / "supervisor.json"

    @property
    def hypervisor_log(self) -> Path:
        """hyperkit's own stdout and stderr, and the supervisor's messages."""
        return self.dir / "hyperkit.log"

    @property
    def starting_marker(self) -> Path:
        """Exists while a start is in progress, so `list` can show "starting"."""
        return self.dir / "starting"

    @property
    def last_error(self) -> Path:
        """The last start failure, kept for `list` and `inspect` until the next successful start."""
        return self.dir / "last-error"

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def client_public_key(self) -> Path:
        return self.dir / "id_ed25519.pub"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def host_public_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key.pub"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"
