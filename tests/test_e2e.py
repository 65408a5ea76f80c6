"""A real guest under QEMU, isolated: create, ssh, podman from the host, stop, start, host key, rm.

The tests in this module share one machine and run in file order, which is the machine's life.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GuestImage, require_tool, run_hkpod
from hkpod.process import command_line, read_pid_file

pytestmark = pytest.mark.e2e

NAME = "e2e"
DISK = "4G"


class Machine:
    """One hkpod machine under test with its own home, known_hosts and podman connection list."""

    def __init__(self, home: Path, image: GuestImage) -> None:
        self.home = home
        self.image = image
        self.env = dict(os.environ)
        self.env.update(
            HOME=str(home), HKPOD_HOME=str(home / "hkpod"), HKPOD_CACHE=str(home / "cache"),
            CONTAINERS_CONF=str(home / "containers.conf"), XDG_CONFIG_HOME=str(home / ".config"),
        )
        self.dir = home / "hkpod" / "machines" / NAME
        (home / "containers.conf").touch()

    def hkpod(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run_hkpod(list(args), env=self.env, check=check, timeout=timeout)

    def ssh(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.hkpod("ssh", NAME, "--", *command, check=check, timeout=300)

    def podman(self, *args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", "--connection", NAME, *args], env=self.env, capture_output=True,
                                text=input is None, input=input, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {result.stderr}")
        return result

    def inspect(self) -> dict[str, object]:
        return json.loads(self.hkpod("inspect", NAME).stdout)

    def pid(self) -> int | None:
        return read_pid_file(self.dir / "vm.pid")

    def kill_leftovers(self) -> None:
        """Kill this machine's QEMU by pid when hkpod could not, so a failed test leaves no VM."""
        pid = self.pid()
        if pid is None:
            return
        argv = command_line(pid)
        if argv and any(NAME in argument for argument in argv) and "qemu-system" in argv[0]:
            os.kill(pid, signal.SIGKILL)


def keyscan(port: int) -> list[str]:
    """Return the host keys the guest's sshd offers of every type a stock sshd has, as `type base64` strings."""
    result = subprocess.run(["ssh-keyscan", "-T", "30", "-t", "rsa,ecdsa,ed25519", "-p", str(port), "127.0.0.1"], capture_output=True, text=True, timeout=60)
    return sorted(" ".join(line.split()[1:3]) for line in result.stdout.splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, test_image: GuestImage) -> Iterator[Machine]:
    require_tool("qemu-system-x86_64")
    require_tool("podman")
    require_tool("ssh")
    subject = Machine(tmp_path_factory.mktemp("e2e-home"), test_image)
    try:
        result = subject.hkpod(
            "create", NAME, "--image", str(test_image.qcow2), "--kernel", str(test_image.kernel),
            "--initrd", str(test_image.initrd), "--disk", DISK, "--memory", "1G", "--cpus", "2",
            "--accel", "tcg", "--network", "isolated", "--timeout", "900", check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"hkpod create failed:\n{result.stdout}\n{result.stderr}")
        subject.create_output = result.stderr  # type: ignore[attr-defined]
        yield subject
    finally:
        subject.hkpod("rm", "--force", NAME, check=False)
        subject.kill_leftovers()


def test_create_reports_phases(machine: Machine) -> None:
    output = machine.create_output  # type: ignore[attr-defined]
    for phase in ("cloud-init finished", "SSH is up", "podman.socket is active"):
        assert phase in output


def test_state_running(machine: Machine) -> None:
    assert machine.inspect()["state"] == "running"


def test_logs_show_ready_marker(machine: Machine) -> None:
    marker = json.loads((machine.dir / "config.json").read_text())["ready_marker"]
    assert marker in machine.hkpod("logs", NAME).stdout


def test_list_table_row(machine: Machine) -> None:
    rows = machine.hkpod("list").stdout.splitlines()
    assert rows[1].split()[:3] == [NAME, "qemu", "running"]


def test_podman_socket_active(machine: Machine) -> None:
    assert machine.ssh("systemctl", "is-active", "podman.socket").stdout.strip() == "active"


def test_ssh_exit_status(machine: Machine) -> None:
    assert machine.ssh("sh", "-c", "exit 7", check=False).returncode == 7


def test_ssh_keeps_arguments(machine: Machine) -> None:
    assert machine.ssh("printf", "%s|", "a b", "$HOME", "'q'").stdout == "a b|$HOME|'q'|"


def test_root_filesystem_grown(machine: Machine) -> None:
    size = int(machine.ssh("df", "--block-size=1", "--output=size", "/").stdout.split()[-1])
    assert size > 3.5 * (1 << 30)


def test_podman_info_is_guest(machine: Machine) -> None:
    info = json.loads(machine.podman("info", "--format", "json").stdout)
    assert info["host"]["hostname"] == NAME


def test_podman_info_guest_kernel(machine: Machine) -> None:
    info = json.loads(machine.podman("info", "--format", "json").stdout)
    assert info["host"]["kernel"] == machine.ssh("uname", "-r").stdout.strip()


def test_container_sees_guest_machine_id(machine: Machine) -> None:
    machine.podman("import", str(machine.image.rootfs_tar), "localhost/hkpod-test:latest")
    machine_id = machine.ssh("cat", "/etc/machine-id").stdout.strip()
    result = machine.podman("run", "--rm", "--network", "none", "-v", "/etc/machine-id:/guest-machine-id:ro",
                            "localhost/hkpod-test:latest", "cat", "/guest-machine-id")
    assert len(machine_id) == 32
    assert result.stdout.strip() == machine_id


def test_host_key_is_pinned_one(machine: Machine) -> None:
    port = machine.inspect()["ssh"]["port"]  # type: ignore[index]
    pinned = " ".join((machine.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    assert keyscan(port) == [pinned]


def test_rm_running_needs_force(machine: Machine) -> None:
    result = machine.hkpod("rm", NAME, check=False)
    assert result.returncode == 1
    assert "is running" in result.stderr


def test_stop(machine: Machine) -> None:
    pid = machine.pid()
    machine.hkpod("stop", NAME)
    assert pid is not None
    assert command_line(pid) is None


def test_state_stopped(machine: Machine) -> None:
    assert machine.inspect()["state"] == "stopped"


def test_start_port_taken(machine: Machine) -> None:
    # Something else now listens on the machine's SSH port: start must move to another port.
    old_port = machine.inspect()["ssh"]["port"]  # type: ignore[index]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        machine.hkpod("start", NAME)
    assert machine.inspect()["ssh"]["port"] != old_port  # type: ignore[index]


def test_start_again_socket_active(machine: Machine) -> None:
    assert machine.ssh("systemctl", "is-active", "podman.socket").stdout.strip() == "active"


def test_known_hosts_follows_port(machine: Machine) -> None:
    port = machine.inspect()["ssh"]["port"]  # type: ignore[index]
    entries = [line.split()[0] for line in (machine.home / ".ssh" / "known_hosts").read_text().splitlines()]
    assert entries == [f"[127.0.0.1]:{port}"]


def test_host_key_kept_after_restart(machine: Machine) -> None:
    port = machine.inspect()["ssh"]["port"]  # type: ignore[index]
    pinned = " ".join((machine.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    assert keyscan(port) == [pinned]


def test_podman_after_restart(machine: Machine) -> None:
    info = json.loads(machine.podman("info", "--format", "json").stdout)
    assert info["host"]["hostname"] == NAME


def test_other_host_key_rejected(machine: Machine) -> None:
    # Give the guest a new host key; both hkpod's ssh and podman must refuse it.
    machine.ssh("sudo", "sh", "-c",
                "rm -f /etc/ssh/ssh_host_ed25519_key* && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key"
                " && systemctl restart ssh")
    deadline = time.monotonic() + 60
    while True:
        result = machine.ssh("true", check=False)
        if result.returncode != 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr


def test_other_host_key_podman_fails(machine: Machine) -> None:
    result = machine.podman("info", check=False)
    assert result.returncode != 0


def test_rm_leaves_nothing(machine: Machine) -> None:
    pid = machine.pid()
    machine.hkpod("rm", "--force", NAME)
    known_hosts = machine.home / ".ssh" / "known_hosts"
    connections = subprocess.run(["podman", "system", "connection", "list", "--format", "json"], env=machine.env,
                                 capture_output=True, text=True, check=True).stdout
    assert pid is not None
    assert command_line(pid) is None
    assert not machine.dir.exists()
    assert "hkpod:" not in (known_hosts.read_text() if known_hosts.exists() else "")
    assert NAME not in [entry["Name"] for entry in json.loads(connections or "[]") or []]
