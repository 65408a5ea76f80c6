"""The HyperKit driver: hyperkit runs under a small root supervisor, the guest's address comes from bootpd.

hkpod itself runs as the user. Only the supervisor (supervisor.py) is started
through sudo, because vmnet needs root; see that module for why and how.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hkpod.config import MachineConfig
from hkpod.drivers.base import CreateOptions, Driver
from hkpod.drivers.hyperkit.argv import HyperkitSpec, hyperkit_argv
from hkpod.bzimage import check_kernel
from hkpod.drivers.hyperkit.leases import find_ip, find_ip_by_name, parse_mac, read_leases
from hkpod.drivers.hyperkit.locate import find_hyperkit, host_supports_hyperkit, hyperkit_candidates
from hkpod.drivers.hyperkit.lifecycle import FINAL_STATES, State, is_hyperkit_process, read_state
from hkpod.errors import HkpodError
from hkpod.fsutil import connect_unix
from hkpod.paths import MachinePaths
from hkpod.process import command_line, read_pid_file
from hkpod.run import run

LOG = logging.getLogger(__name__)

# For tests only: lets the HyperKit driver run on any host, so that a hyperkit stand-in can be driven on Linux.
ANY_HOST_ENV = "HKPOD_HYPERKIT_ANY_HOST"
SUPERVISOR = Path(__file__).resolve().with_name("supervisor.py")
SSH_PORT = 22
SUPERVISOR_START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 10.0
POLL_INTERVAL = 0.25
# Beyond the stop timeout: the supervisor's SIGKILL and its own exit.
STOP_GRACE = 20.0
_MAC_LINE = re.compile(r"^MAC:\s*(\S+)\s*$", re.MULTILINE)


def supervisor_argv(*args: str) -> list[str]:
    """Return the supervisor command line; -I keeps the environment and the working directory off sys.path."""
    return [sys.executable, "-I", str(SUPERVISOR), *args]


def sudoers_escape(text: str) -> str:
    """Escape the characters sudoers treats specially in a command or its arguments."""
    return re.sub(r"([\\,:= ])", r"\\\1", text)


def sudoers_rule(user: str) -> str:
    """Return the narrowest sudoers line that lets USER start the supervisor without a password."""
    command = " ".join(sudoers_escape(word) for word in supervisor_argv())
    return f"{user} ALL=(root) NOPASSWD: {command} *"


def _sudo_refused(stderr: str) -> bool:
    # sudo's own complaints start with "sudo:"; the supervisor never prints such a line.
    return any(line.startswith("sudo:") for line in stderr.splitlines())


def run_as_root(argv: list[str], *, timeout: float | None) -> subprocess.CompletedProcess[str]:
    """Run ARGV as root: directly when hkpod is root, else `sudo -n`, else (on a terminal) sudo with a prompt."""
    if os.geteuid() == 0:
        return run(argv, check=False, timeout=timeout)
    result = run(["sudo", "-n", *argv], check=False, timeout=timeout)
    if result.returncode != 0 and _sudo_refused(result.stderr) and sys.stdin.isatty():
        LOG.info("HyperKit's network (vmnet) needs root: sudo may ask for your password")
        result = run(["sudo", *argv], check=False, timeout=None)
    if result.returncode != 0 and _sudo_refused(result.stderr):
        raise HkpodError(
            f"sudo refused to start the HyperKit supervisor: {result.stderr.strip().splitlines()[0]}",
            "run hkpod from a terminal to enter your password, or see `hkpod doctor` for a sudoers rule",
        )
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def query_mac(binary: str, uuid: str) -> str:
    """Ask hyperkit (-M, as root) which MAC vmnet gives UUID; return it as lowercase xx:xx:... text."""
    result = run_as_root(supervisor_argv("query-mac", "--hyperkit", binary, "--uuid", uuid), timeout=120)
    match = _MAC_LINE.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise HkpodError(
            f"`{binary} -M` did not print the machine's MAC address (exit status {result.returncode}):"
            f" {_last_line(result.stdout + result.stderr)}",
            "see `hkpod doctor`",
        )
    return ":".join(f"{octet:02x}" for octet in parse_mac(match.group(1)))


def request(paths: MachinePaths, operation: str, **fields: Any) -> dict[str, Any]:
    """Send one request to the machine's supervisor and return its response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(REQUEST_TIMEOUT)
        connect_unix(connection, paths.supervisor_socket)
        connection.sendall(json.dumps({"op": operation, **fields}).encode())
        response = json.loads(connection.makefile("rb").readline() or b"{}")
    return dict(response)


def supervisor_pid(paths: MachinePaths) -> int | None:
    """Return the pid of the machine's live supervisor, checked against its command line."""
    state = read_state(paths.supervisor_state)
    if state is None or not isinstance(state.get("supervisor_pid"), int):
        return None
    pid = int(state["supervisor_pid"])
    argv = command_line(pid)
    # Compared as one string: macOS ps splits paths with spaces, such as ~/Library/Application Support.
    joined = " ".join(argv or [])
    if str(SUPERVISOR) not in joined or f"--dir {paths.dir} " not in f"{joined} ":
        return None
    return pid


class HyperkitDriver(Driver):
    name = "hyperkit"
    default_ssh_port = SSH_PORT

    def __init__(self) -> None:
        self._warned_name_fallback = False

    def check_host(self) -> None:
        supported, reason = host_supports_hyperkit()
        if supported:
            return
        if os.environ.get(ANY_HOST_ENV) == "1":
            LOG.debug("%s=1: running the HyperKit driver on an unsupported host (%s)", ANY_HOST_ENV, reason)
            return
        raise HkpodError(reason)

    def _binary(self, config: MachineConfig) -> str:
        return str(find_hyperkit(config.hyperkit).path)

    def prepare(self, config: MachineConfig, paths: MachinePaths, options: CreateOptions) -> MachineConfig:
        if options.dry_run:
            # Run nothing, not even `hyperkit -v`: name the first candidate that exists.
            existing = [str(candidate.path) for candidate in hyperkit_candidates(options.hyperkit) if candidate.path.is_file()]
            binary = options.hyperkit or (existing[0] if existing else "hyperkit")
            return config.replace(mac="<mac>", ssh_port=SSH_PORT, hyperkit=binary)
        binary = str(find_hyperkit(options.hyperkit).path)
        self._check_kernel(config, paths)
        mac = query_mac(binary, config.uuid)
        LOG.debug("vmnet gives machine %s the MAC %s", config.name, mac)
        return config.replace(mac=mac, ssh_port=SSH_PORT, hyperkit=binary)

    def check_boot_files(self, kernel: Path, initrd: Path, *, cmdline: str, memory_mib: int) -> None:
        check_kernel(kernel, cmdline=cmdline, initrd=initrd, memory_mib=memory_mib)

    def _check_kernel(self, config: MachineConfig, paths: MachinePaths) -> None:
        check_kernel(paths.kernel, cmdline=config.kernel_cmdline, initrd=paths.initrd, memory_mib=config.memory_mib)

    def _spec(self, config: MachineConfig, paths: MachinePaths) -> HyperkitSpec:
        return HyperkitSpec(
            cpus=config.cpus,
            memory_mib=config.memory_mib,
            uuid=config.uuid,
            pid_file=paths.pid_file,
            disk=paths.disk,
            seed_iso=paths.seed,
            console_pty=paths.console_pty,
            console_log=paths.console_log,
            kernel=paths.kernel,
            initrd=paths.initrd,
            cmdline=config.kernel_cmdline,
        )

    def argv(self, config: MachineConfig, paths: MachinePaths) -> list[str]:
        return hyperkit_argv(config.hyperkit or "hyperkit", self._spec(config, paths))

    def start(self, config: MachineConfig, paths: MachinePaths) -> MachineConfig:
        binary = self._binary(config)
        self._check_kernel(config, paths)
        if supervisor_pid(paths) is not None:
            raise HkpodError(f"the supervisor of machine {config.name!r} is still running",
                             f"stop it with `hkpod stop {config.name}`")
        paths.supervisor_state.unlink(missing_ok=True)
        argv = hyperkit_argv(binary, self._spec(config, paths))
        LOG.debug("hyperkit argv: %s", shlex.join(argv))
        result = run_as_root(supervisor_argv("run", "--dir", str(paths.dir), "--hyperkit", binary, "--", *argv[1:]),
                             timeout=SUPERVISOR_START_TIMEOUT)
        if result.returncode != 0:
            raise HkpodError(f"hyperkit failed to start machine {config.name!r}: {_last_line(result.stderr)}",
                             f"see `hkpod logs --hypervisor {config.name}`")
        if binary != config.hyperkit:
            config = config.replace(hyperkit=binary)
        return config

    def running_pid(self, config: MachineConfig, paths: MachinePaths) -> int | None:
        pid = read_pid_file(paths.pid_file)
        if pid is not None:
            argv = command_line(pid)
            # A recycled pid belongs to some other process: trust it only if it is hyperkit with our UUID.
            if is_hyperkit_process(argv, config.uuid):
                return pid
            if argv is not None:
                LOG.debug("pid %d in %s is not this machine's hyperkit: %s", pid, paths.pid_file, " ".join(argv)[:200])
        # Between a guest reboot and hyperkit's next start, the supervisor stands for the machine.
        supervisor = supervisor_pid(paths)
        state = read_state(paths.supervisor_state) or {}
        if supervisor is not None and state.get("state") in (State.STARTING.value, State.RESTARTING.value):
            return supervisor
        return None

    def stop(self, config: MachineConfig, paths: MachinePaths, *, force: bool, timeout: float) -> None:
        supervisor = supervisor_pid(paths)
        if supervisor is None:
            self._stop_orphan(config, paths, force=force, timeout=timeout)
            return
        try:
            request(paths, "kill" if force else "stop", timeout=timeout)
        except (OSError, ValueError) as error:
            raise HkpodError(f"the supervisor of machine {config.name!r} (pid {supervisor}) does not respond: {error}",
                             f"see `hkpod logs --hypervisor {config.name}`") from error
        deadline = time.monotonic() + timeout + STOP_GRACE
        while supervisor_pid(paths) is not None or self._hyperkit_pid(config, paths) is not None:
            if supervisor_pid(paths) is None:
                # The supervisor died before its hyperkit did: nothing else will kill it.
                self._stop_orphan(config, paths, force=True, timeout=0)
                return
            if time.monotonic() >= deadline:
                raise HkpodError(f"machine {config.name!r} did not stop within {timeout + STOP_GRACE:.0f} s",
                                 f"see `hkpod logs --hypervisor {config.name}`")
            time.sleep(POLL_INTERVAL)

    def _hyperkit_pid(self, config: MachineConfig, paths: MachinePaths) -> int | None:
        pid = read_pid_file(paths.pid_file)
        return pid if pid is not None and is_hyperkit_process(command_line(pid), config.uuid) else None

    def _stop_orphan(self, config: MachineConfig, paths: MachinePaths, *, force: bool, timeout: float) -> None:
        """Stop a hyperkit whose supervisor is gone, through the supervisor's one-shot `signal` command."""
        if self._hyperkit_pid(config, paths) is None:
            return
        LOG.warning("machine %r has no supervisor: signalling its hyperkit directly", config.name)
        for signal_name, wait in (("TERM", timeout), ("KILL", STOP_GRACE)):
            if signal_name == "TERM" and force:
                continue
            run_as_root(supervisor_argv("signal", "--dir", str(paths.dir), "--uuid", config.uuid,
                                        "--signal", signal_name), timeout=60)
            deadline = time.monotonic() + wait
            while self._hyperkit_pid(config, paths) is not None and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL)
            if self._hyperkit_pid(config, paths) is None:
                return
        raise HkpodError(f"hyperkit of machine {config.name!r} did not exit after SIGKILL", "check the process with ps")

    def ssh_address(self, config: MachineConfig, paths: MachinePaths) -> tuple[str, int] | None:
        # Read anew on every call: bootpd rewrites the file, and a lease can move to another address.
        leases = read_leases()
        now = time.time()
        try:
            address = find_ip(leases, config.mac, now=now)
        except HkpodError:
            address = None
        if address is None:
            address = find_ip_by_name(leases, config.name, now=now)
            if address is not None and not self._warned_name_fallback:
                self._warned_name_fallback = True
                LOG.warning("no DHCP lease for machine %r's MAC %s; using the lease named %r (%s), which another"
                            " machine of that name could hold", config.name, config.mac, config.name, address)
        return (address, SSH_PORT) if address else None

    def failed(self, config: MachineConfig, paths: MachinePaths) -> bool:
        state = read_state(paths.supervisor_state)
        return state is not None and state.get("state") == State.ERROR.value

    def exit_reason(self, config: MachineConfig, paths: MachinePaths) -> str:
        state = read_state(paths.supervisor_state)
        if state is None:
            return "hyperkit is not running, and its supervisor left no record"
        exits = state.get("exits") or []
        if state.get("error"):
            reason = str(state["error"])
        elif exits:
            last = exits[-1]
            reason = f"hyperkit exited with status {last.get('status')} ({last.get('meaning')})"
        else:
            reason = f"hyperkit is not running (supervisor state: {state.get('state')})"
        if state.get("state") not in [final.value for final in FINAL_STATES] and supervisor_pid(paths) is None:
            reason += "; the supervisor is gone"
        return f"{reason}; see `hkpod logs --hypervisor {config.name}`"

