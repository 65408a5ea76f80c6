"""SSH keys and OpenSSH invocations with a pinned host key; host-key checking is never turned off."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hkpod.errors import HkpodError
from hkpod.run import require_executable, run

SSH_HINT = "install OpenSSH (macOS ships it; on Debian or Ubuntu: apt-get install openssh-client)"


def generate_key(path: Path, comment: str) -> None:
    """Create an ed25519 key pair at PATH and PATH.pub; the private key is 0600."""
    keygen = require_executable("ssh-keygen", SSH_HINT)
    run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)


def read_public_key(path: Path) -> tuple[str, str]:
    """Return (key type, base64 blob) of the public key file PATH."""
    fields = path.read_text().split()
    if len(fields) < 2:
        raise HkpodError(f"{path} is not an OpenSSH public key", "recreate the machine")
    return fields[0], fields[1]


def host_key_alias(machine: str) -> str:
    """Return the name the per-machine known_hosts pins the host key under, whatever the address or port."""
    return f"hkpod-{machine}"


def known_hosts_line(machine: str, host_public_key: Path) -> str:
    key_type, blob = read_public_key(host_public_key)
    return f"{host_key_alias(machine)} {key_type} {blob}\n"


@dataclass(frozen=True)
class SshTarget:
    """Address, user and host-key settings for reaching a machine's sshd."""

    machine: str
    user: str
    host: str
    port: int
    identity: Path
    known_hosts: Path

    def options(self, *, batch: bool, connect_timeout: int = 10) -> list[str]:
        options = [
            "-F", "/dev/null",
            "-i", str(self.identity),
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes",
            # ssh splits an option's value at white space unless it is in double quotes, and
            # macOS's default data directory ("Application Support") contains a space.
            "-o", f'UserKnownHostsFile="{self.known_hosts}"',
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"HostKeyAlias={host_key_alias(self.machine)}",
            "-o", "UpdateHostKeys=no",
            "-o", "PasswordAuthentication=no",
            "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "LogLevel=ERROR",
            "-p", str(self.port),
        ]
        if batch:
            options += ["-o", "BatchMode=yes"]
        return options

    def argv(self, command: Sequence[str] = (), *, batch: bool = False, tty: bool = False) -> list[str]:
        """Return the ssh argv; COMMAND's words are quoted so the guest's shell receives them unchanged."""
        ssh = require_executable("ssh", SSH_HINT)
        argv = [ssh, *self.options(batch=batch)]
        if tty:
            argv.append("-t")
        argv.append(f"{self.user}@{self.host}")
        if command:
            argv += ["--", shlex.join(command)]
        return argv


def run_remote(
    target: SshTarget, command: Sequence[str], *, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND in the guest without a terminal and return the result."""
    return run(target.argv(command, batch=True), check=check, timeout=timeout)


def exec_ssh(target: SshTarget, command: Sequence[str]) -> None:
    """Replace this process with an interactive ssh, so its exit status is the remote command's."""
    argv = target.argv(command, tty=not command and os.isatty(0))
    os.execv(argv[0], argv)
