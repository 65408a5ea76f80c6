"""Machine life cycle shared by every driver: create, start, stop, remove, list and inspect."""

from __future__ import annotations

import datetime
import enum
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import uuid as uuid_module
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hkpod import __version__, podman, seed, ssh
from hkpod.config import MachineConfig, load_config, save_config, validate_name
from hkpod.disk import make_disk
from hkpod.drivers import get_driver
from hkpod.drivers.base import CreateOptions, Driver
from hkpod.errors import HkpodError
from hkpod.lock import machine_lock
from hkpod.paths import MachinePaths, machines_root
from hkpod.process import command_line, is_alive, read_pid_file
from hkpod.readiness import Guest, wait_until_ready
from hkpod.sizes import format_size

LOG = logging.getLogger(__name__)

LOGIN_USER = "hkpod"
PODMAN_USER = "root"
DEFAULT_ROOT = "LABEL=cloudimg-rootfs"
STOP_TIMEOUT = 60.0
FAILED_START_STOP_TIMEOUT = 20.0
# A stable namespace, so a machine recreated under the same name gets the same UUID, hence the same MAC and DHCP lease.
UUID_NAMESPACE = uuid_module.UUID("5d8f1c2e-7b7a-4c36-9a51-2f2d0f6b8a41")


class MachineState(enum.Enum):
    RUNNING = "running"
    STARTING = "starting"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class CreateRequest:
    name: str
    driver: str
    cpus: int
    memory_mib: int
    disk_bytes: int
    image: Path
    kernel: Path
    initrd: Path
    image_description: str
    image_digests: tuple[str, ...]
    insecure_skip_verify: bool
    cmdline_extra: str
    accel: str
    network: str
    timeout: float
    dry_run: bool
    hyperkit: str | None = None


def machine_uuid(name: str) -> str:
    return str(uuid_module.uuid5(UUID_NAMESPACE, name))


def kernel_cmdline(extra: str) -> str:
    """Return the guest kernel's command line; a `root=` in EXTRA wins because the kernel takes the last one."""
    base = f"root={DEFAULT_ROOT} ro console=ttyS0 panic=1 no_timer_check ds=nocloud"
    return f"{base} {extra}".strip()


def existing_paths(name: str) -> MachinePaths:
    validate_name(name)
    paths = MachinePaths.for_name(name)
    if not paths.dir.is_dir():
        raise HkpodError(f"machine {name!r} does not exist", "see `hkpod list` for the machines there are")
    return paths


@contextmanager
def machine_log(paths: MachinePaths) -> Iterator[None]:
    """Append everything hkpod logs while acting on a machine to that machine's debug log."""
    handler = logging.FileHandler(paths.debug_log)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("hkpod")
    logger.addHandler(handler)
    LOG.debug("hkpod %s: %s", __version__, shlex.join(sys.argv))
    try:
        yield
    except BaseException as error:
        LOG.debug("failed: %r", error)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def state_of(driver: Driver, config: MachineConfig, paths: MachinePaths) -> MachineState:
    """Derive the state from the live process, never from a saved flag."""
    if driver.running_pid(config, paths) is not None:
        starter = read_pid_file(paths.starting_marker)
        return MachineState.STARTING if starter is not None and is_alive(starter) else MachineState.RUNNING
    if paths.last_error.exists() or driver.failed(config, paths):
        return MachineState.ERROR
    return MachineState.STOPPED


def check_cpus(cpus: int) -> None:
    host_cpus = os.cpu_count() or 1
    if cpus < 1:
        raise HkpodError(f"invalid --cpus {cpus}", "give at least 1")
    if cpus > host_cpus:
        raise HkpodError(f"--cpus {cpus} is more than this host's {host_cpus} CPUs", f"use --cpus {host_cpus} or fewer")


def host_memory_mib() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError):
        return None


def check_memory(memory_mib: int) -> None:
    total = host_memory_mib()
    if total is not None and memory_mib > total:
        raise HkpodError(f"--memory {memory_mib}M is more than this host's {total}M of memory",
                         f"use --memory {max(total // 2, 256)}M or less")


def _new_config(request: CreateRequest) -> MachineConfig:
    return MachineConfig(
        name=request.name,
        driver=request.driver,
        cpus=request.cpus,
        memory_mib=request.memory_mib,
        disk_bytes=request.disk_bytes,
        image=request.image_description,
        image_digests=request.image_digests,
        insecure_skip_verify=request.insecure_skip_verify,
        kernel_cmdline=kernel_cmdline(request.cmdline_extra),
        uuid=machine_uuid(request.name),
        mac="",
        instance_id=f"hkpod-{request.name}-{secrets.token_hex(4)}",
        ready_marker=f"hkpod-ready-{secrets.token_hex(8)}",
        ssh_user=LOGIN_USER,
        ssh_port=0,
        network=request.network,
        accel=None,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _seed_spec(config: MachineConfig, paths: MachinePaths) -> seed.SeedSpec:
    return seed.SeedSpec(
        hostname=config.name,
        instance_id=config.instance_id,
        user=config.ssh_user,
        authorized_key=paths.client_public_key.read_text().strip(),
        host_key_private=paths.host_key.read_text(),
        host_key_public=paths.host_public_key.read_text().strip(),
        mac=config.mac,
        ready_marker=config.ready_marker,
    )


PLACEHOLDER_MAC = "52:54:00:00:00:00"


def dry_run(request: CreateRequest) -> str:
    """Return the argv and seed files `create` would use, with placeholders for keys, MAC and port.

    The seed is rendered with throwaway keys (the renderer checks real keys), which are then
    replaced by placeholders, so the output never contains a usable private key.
    """
    driver = get_driver(request.driver)
    config = _new_config(request)
    paths = MachinePaths.for_name(request.name)
    config = driver.prepare(config, paths, CreateOptions(accel=request.accel, network=request.network, dry_run=True,
                                                                  hyperkit=request.hyperkit))
    with tempfile.TemporaryDirectory(prefix="hkpod-dry-run-") as scratch:
        keys = MachinePaths(Path(scratch))
        ssh.generate_key(keys.client_key, "placeholder")
        ssh.generate_key(keys.host_key, "placeholder")
        files = seed.redact_seed_files(seed.render_seed_files(_seed_spec(config.replace(mac=PLACEHOLDER_MAC), keys)))
        replacements = {
            keys.client_public_key.read_text().split()[1]: "<client public key, generated at create>",
            keys.host_public_key.read_text().split()[1]: "<host public key, generated at create>",
            PLACEHOLDER_MAC: "<mac>",
        }
    lines = [f"# {request.driver} command line", shlex.join(driver.argv(config, paths)), ""]
    for file_name, content in files.items():
        text = content.decode()
        for value, placeholder in replacements.items():
            text = text.replace(value, placeholder)
        lines += [f"# seed file {file_name}", text.rstrip("\n"), ""]
    return "\n".join(lines)


def create(request: CreateRequest) -> MachineConfig:
    """Make the machine directory, boot the guest until podman responds, and register the connection.

    A failure, Ctrl-C, SIGTERM or SIGHUP removes everything made so far (tests cover Ctrl-C and bad input).
    """
    driver = get_driver(request.driver)
    driver.check_host()
    driver.check_boot_files(request.kernel, request.initrd, cmdline=kernel_cmdline(request.cmdline_extra),
                            memory_mib=request.memory_mib)
    paths = MachinePaths.for_name(request.name)
    machines_root().mkdir(parents=True, exist_ok=True)
    try:
        paths.dir.mkdir(mode=0o700)
    except FileExistsError as error:
        raise HkpodError(f"machine {request.name!r} already exists", "choose another name, or remove it with `hkpod rm`") from error

    config: MachineConfig | None = None
    try:
        with machine_lock(paths.lock, request.name), machine_log(paths):
            config = _build(request, driver, paths)
            config = _start(driver, config, paths, request.timeout)
            return config
    except BaseException:
        LOG.warning("create of machine %r failed; removing what was made", request.name)
        _discard(driver, config, paths)
        raise


def _build(request: CreateRequest, driver: Driver, paths: MachinePaths) -> MachineConfig:
    config = _new_config(request)
    LOG.info("Creating machine %r (%s, %d CPUs, %s memory, %s disk)", config.name, config.driver,
             config.cpus, format_size(config.memory_mib << 20), format_size(config.disk_bytes))
    shutil.copyfile(request.kernel, paths.kernel)
    shutil.copyfile(request.initrd, paths.initrd)
    make_disk(request.image, paths.disk, request.disk_bytes)

    ssh.generate_key(paths.client_key, f"hkpod-{config.name}")
    ssh.generate_key(paths.host_key, f"hkpod-{config.name}-host")
    paths.known_hosts.write_text(ssh.known_hosts_line(config.name, paths.host_public_key))

    config = driver.prepare(config, paths, CreateOptions(accel=request.accel, network=request.network,
                                                                 hyperkit=request.hyperkit))
    seed.write_seed_iso(seed.render_seed_files(_seed_spec(config, paths)), paths.seed)
    save_config(config, paths.config)
    return config


def _discard(driver: Driver, config: MachineConfig | None, paths: MachinePaths) -> None:
    # A second Ctrl-C must not interrupt the clean-up and leave a half-made machine behind.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _discard_now(driver, config, paths)
    finally:
        signal.signal(signal.SIGINT, previous)


def _discard_now(driver: Driver, config: MachineConfig | None, paths: MachinePaths) -> None:
    if config is not None:
        try:
            driver.stop(config, paths, force=True, timeout=0)
        except HkpodError as error:
            LOG.warning("could not stop machine %r: %s", config.name, error)
        _unregister_podman(config.name)
    shutil.rmtree(paths.dir, ignore_errors=True)


def ssh_target(config: MachineConfig, paths: MachinePaths, driver: Driver, *, user: str | None = None) -> ssh.SshTarget | None:
    address = driver.ssh_address(config, paths)
    if address is None:
        return None
    return ssh.SshTarget(
        machine=config.name,
        user=user or config.ssh_user,
        host=address[0],
        port=address[1],
        identity=paths.client_key,
        known_hosts=paths.known_hosts,
    )


def _start(driver: Driver, config: MachineConfig, paths: MachinePaths, timeout: float) -> MachineConfig:
    if paths.console_log.exists():
        os.replace(paths.console_log, paths.previous_console_log)
    paths.last_error.unlink(missing_ok=True)
    paths.starting_marker.write_text(f"{os.getpid()}\n")
    try:
        LOG.info("Starting machine %r", config.name)
        started = driver.start(config, paths)
        if started != config:
            save_config(started, paths.config)
            config = started

        def exit_reason() -> str | None:
            return None if driver.running_pid(config, paths) is not None else driver.exit_reason(config, paths)

        guest = Guest(
            name=config.name,
            console_log=paths.console_log,
            ready_marker=config.ready_marker,
            exit_reason=exit_reason,
            ssh_target=lambda: ssh_target(config, paths, driver),
        )
        wait_until_ready(guest, timeout)
        return _connect_podman(driver, config, paths)
    except HkpodError as error:
        paths.last_error.write_text(f"{error}\n")
        _stop_after_failed_start(driver, config, paths)
        raise
    finally:
        paths.starting_marker.unlink(missing_ok=True)


def _stop_after_failed_start(driver: Driver, config: MachineConfig, paths: MachinePaths) -> None:
    """Power off a guest that did not become ready, so a failed start never leaves a VM running."""
    if driver.running_pid(config, paths) is None:
        return
    LOG.warning("stopping machine %r because it did not become ready", config.name)
    try:
        driver.stop(config, paths, force=False, timeout=FAILED_START_STOP_TIMEOUT)
    except HkpodError as error:
        LOG.warning("could not stop machine %r: %s", config.name, error)


def _connect_podman(driver: Driver, config: MachineConfig, paths: MachinePaths) -> MachineConfig:
    client = podman.find_client()
    if client is None:
        LOG.info("No podman client on PATH: skipping the podman connection (use `hkpod ssh %s`)", config.name)
        return config
    address = driver.ssh_address(config, paths)
    assert address is not None, "readiness returned without an SSH address"
    host, port = address
    podman.add_known_host(config.name, host, port, paths.host_public_key)
    made_default = podman.add_connection(client, config.name, podman.connection_uri(PODMAN_USER, host, port), paths.client_key)
    if config.podman_connection != config.name:
        config = config.replace(podman_connection=config.name)
        save_config(config, paths.config)

    root_target = ssh_target(config, paths, driver, user=PODMAN_USER)
    assert root_target is not None
    server_version = ssh.run_remote(root_target, ["podman", "--version"], check=False).stdout.strip().split()[-1:] or [None]
    info = podman.query_server(client, config.name, server_version[0])
    LOG.info("podman connection %r%s: podman %s on %s (kernel %s)", config.name,
             " (default)" if made_default else "", info.version, info.hostname, info.kernel)
    return config


def _unregister_podman(name: str) -> None:
    podman.remove_known_host(name)
    client = podman.find_client()
    if client is not None:
        try:
            podman.remove_connection(client, name)
        except HkpodError as error:
            LOG.warning("could not remove podman connection %r: %s", name, error)


def load(name: str) -> tuple[MachineConfig, MachinePaths, Driver]:
    paths = existing_paths(name)
    config = load_config(paths.config)
    return config, paths, get_driver(config.driver)


def start(name: str, timeout: float) -> MachineConfig:
    config, paths, driver = load(name)
    with machine_lock(paths.lock, name), machine_log(paths):
        if driver.running_pid(config, paths) is not None:
            raise HkpodError(f"machine {name!r} is already running", f"stop it first with `hkpod stop {name}`")
        driver.check_host()
        return _start(driver, config, paths, timeout)


def stop(name: str, *, force: bool, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the machine; return False when it was not running."""
    config, paths, driver = load(name)
    with machine_lock(paths.lock, name), machine_log(paths):
        if driver.running_pid(config, paths) is None:
            return False
        LOG.info("Stopping machine %r%s", name, " (force)" if force else "")
        driver.stop(config, paths, force=force, timeout=timeout)
        return True


def remove(name: str, *, force: bool) -> None:
    """Remove the machine, its disk and its podman connection; a running one only with FORCE."""
    paths = existing_paths(name)
    try:
        config: MachineConfig | None = load_config(paths.config)
    except HkpodError:
        if not force:
            raise
        config = None
    driver = get_driver(config.driver) if config else None
    with machine_lock(paths.lock, name), machine_log(paths):
        if config is not None and driver is not None and driver.running_pid(config, paths) is not None:
            if not force:
                raise HkpodError(f"machine {name!r} is running", f"stop it with `hkpod stop {name}`, or use `hkpod rm --force {name}`")
            driver.stop(config, paths, force=True, timeout=0)
        if config is None:
            _kill_unconfigured(paths)
        _unregister_podman(name)
    shutil.rmtree(paths.dir)


def _kill_unconfigured(paths: MachinePaths) -> None:
    """Kill the VM of a machine whose config is unreadable, if its pid file names a process using its disk."""
    pid = read_pid_file(paths.pid_file)
    argv = command_line(pid) if pid is not None else None
    if pid is None or argv is None or not any(str(paths.disk) in argument for argument in argv):
        return
    LOG.warning("killing pid %d, which runs this machine's disk, before removing the machine", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except PermissionError as error:
        raise HkpodError(f"cannot kill pid {pid}, which runs the disk {paths.disk}", "kill it as root, then run rm again") from error
    except ProcessLookupError:
        pass


def describe(config: MachineConfig, paths: MachinePaths, driver: Driver) -> dict[str, Any]:
    """Return the facts `inspect` and `list --format json` print about a machine."""
    address = driver.ssh_address(config, paths)
    host, port = address if address else (None, None)
    return {
        "name": config.name,
        "state": state_of(driver, config, paths).value,
        "driver": config.driver,
        "cpus": config.cpus,
        "memory_mib": config.memory_mib,
        "disk_bytes": config.disk_bytes,
        "image": config.image,
        "accel": config.accel,
        "network": config.network,
        "created_at": config.created_at,
        "ssh": {"host": host, "port": port, "user": config.ssh_user, "identity": str(paths.client_key),
                "known_hosts": str(paths.known_hosts), "host_key_alias": ssh.host_key_alias(config.name)},
        "podman": {
            "connection": config.podman_connection,
            "uri": podman.connection_uri(PODMAN_USER, host, port) if host else None,
            "identity": str(paths.client_key),
        },
        "paths": {
            "dir": str(paths.dir), "config": str(paths.config), "disk": str(paths.disk), "seed": str(paths.seed),
            "kernel": str(paths.kernel), "initrd": str(paths.initrd), "console_log": str(paths.console_log),
            "debug_log": str(paths.debug_log), "pid_file": str(paths.pid_file),
        },
        "last_error": paths.last_error.read_text().strip() if paths.last_error.exists() else None,
    }


def all_machines() -> list[tuple[MachineConfig, MachinePaths, Driver]]:
    root = machines_root()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if not (entry / "config.json").is_file():
            LOG.warning("machine directory %s has no config.json; remove it with `hkpod rm --force %s`", entry, entry.name)
            continue
        try:
            found.append(load(entry.name))
        except HkpodError as error:
            LOG.warning("skipping %s: %s", entry, error)
    return found
