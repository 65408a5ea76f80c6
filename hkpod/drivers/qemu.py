"""The QEMU driver: the same machine as HyperKit runs, with direct kernel boot, on Linux or macOS."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hkpod.bzimage import check_bzimage
from hkpod.config import MachineConfig, write_atomic
from hkpod.drivers.base import CreateOptions, Driver
from hkpod.errors import HkpodError
from hkpod.fsutil import connect_unix
from hkpod.paths import MachinePaths, cache_root
from hkpod.process import command_line, read_pid_file

LOG = logging.getLogger(__name__)

ACCELERATORS = ("auto", "kvm", "hvf", "tcg")
QEMU_HINT = "install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86; macOS: brew install qemu)"
LOOPBACK = "127.0.0.1"
# A working KVM brings a stock kernel to its root-mount panic within a second or two. A /dev/kvm
# that cannot run a stock kernel (such as the paravirtual kvm-pvm) aborts at once or hangs early.
ACCEL_PROBE_TIMEOUT = 20.0
PROBE_SUCCESS_TEXT = ("Kernel panic", "VFS: Unable to mount root")
QMP_TIMEOUT = 5.0


def host_arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("arm64", "aarch64"):
        return "aarch64"
    raise HkpodError(f"unsupported host architecture {machine!r}", "hkpod runs on x86_64 and arm64 hosts")


def qemu_binary() -> str:
    name = f"qemu-system-{host_arch()}"
    path = shutil.which(name)
    if path is None:
        raise HkpodError(f"{name} not found on PATH", QEMU_HINT)
    return path


def accel_arguments(accel: str) -> list[str]:
    if accel.startswith("<"):
        # A dry run before the accelerator probe has run prints the choice as a placeholder.
        return ["-accel", accel, "-cpu", "<cpu model for that accelerator>"]
    if accel == "tcg":
        # tb-size=256 halves QEMU's resident memory against the default translation cache, at the same speed.
        return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]
    if accel in ("kvm", "hvf"):
        return ["-accel", accel, "-cpu", "host"]
    raise HkpodError(f"invalid accelerator {accel!r}", f"choose one of: {', '.join(ACCELERATORS)}")


def machine_type() -> str:
    return "q35" if host_arch() == "x86_64" else "virt"


def mac_from_uuid(uuid: str) -> str:
    """Derive a MAC in QEMU's 52:54:00 range from the machine UUID, so it never changes."""
    tail = bytes.fromhex(uuid.replace("-", ""))[-3:]
    return "52:54:00:" + ":".join(f"{octet:02x}" for octet in tail)


@dataclass(frozen=True)
class QemuSpec:
    """Inputs of the QEMU command line; an SSH port of 0 prints as a placeholder."""

    binary: str
    name: str
    uuid: str
    accel: str
    cpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    seed: Path
    console_log: Path
    pid_file: Path
    qmp_socket: str
    mac: str
    ssh_port: int
    isolated: bool


def qemu_argv(spec: QemuSpec) -> list[str]:
    """Build the full QEMU argv: one device per line group, nothing left to QEMU's defaults."""
    port = str(spec.ssh_port) if spec.ssh_port else "<ssh-port>"
    restrict = "on" if spec.isolated else "off"
    return [
        spec.binary,
        "-name", f"hkpod-{spec.name}",
        "-uuid", spec.uuid,
        "-machine", machine_type(),
        *accel_arguments(spec.accel),
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults",
        "-display", "none",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
        "-drive", f"if=none,id=disk0,format=raw,file={_drive_path(spec.disk)},cache=writeback,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0",
        "-drive", f"if=none,id=seed0,format=raw,readonly=on,file={_drive_path(spec.seed)}",
        "-device", "virtio-blk-pci,drive=seed0",
        "-netdev", f"user,id=net0,restrict={restrict},hostfwd=tcp:{LOOPBACK}:{port}-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{spec.console_log}",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-pidfile", str(spec.pid_file),
        "-daemonize",
    ]


def _drive_path(path: Path) -> str:
    # QEMU's option parser reads a doubled comma as a literal comma inside a value.
    return str(path).replace(",", ",,")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _accel_cache_key(binary: str, kernel: Path) -> str:
    stat = Path(binary).stat()
    return f"{binary}:{stat.st_mtime_ns}:{os.uname().release}:{kernel.stat().st_size}"


def probe_accel(binary: str, accel: str, kernel: Path) -> bool:
    """Boot KERNEL with ACCEL and no root disk; True when it reaches its root-mount panic in time."""
    with tempfile.TemporaryDirectory(prefix="hkpod-probe-") as scratch:
        console = Path(scratch) / "console.log"
        argv = [
            binary, "-machine", machine_type(), *accel_arguments(accel), "-m", "256M", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/null",
            "-serial", f"file:{console}",
        ]
        LOG.debug("probing accelerator %s: %s", accel, " ".join(argv))
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + ACCEL_PROBE_TIMEOUT
        try:
            while time.monotonic() < deadline:
                output = console.read_text(errors="replace") if console.exists() else ""
                if any(text in output for text in PROBE_SUCCESS_TEXT):
                    return True
                if process.poll() is not None:
                    LOG.debug("accelerator %s probe exited with %s: %s", accel, process.returncode,
                              (process.stderr.read() if process.stderr else b"").decode(errors="replace")[-300:])
                    return False
                time.sleep(0.2)
            LOG.debug("accelerator %s probe: no root-mount panic after %.0f s", accel, ACCEL_PROBE_TIMEOUT)
            return False
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


def resolve_accel(requested: str, binary: str, kernel: Path) -> str:
    """Return the accelerator to use: REQUESTED itself, or for `auto` the fastest one that boots here.

    The result of `auto` is cached per QEMU binary, host kernel and guest kernel, because the probe
    takes up to ACCEL_PROBE_TIMEOUT seconds when the hardware accelerator hangs.
    """
    if requested not in ACCELERATORS:
        raise HkpodError(f"invalid accelerator {requested!r}", f"choose one of: {', '.join(ACCELERATORS)}")
    if requested != "auto":
        return requested

    cache_file = cache_root() / "accel.json"
    key = _accel_cache_key(binary, kernel)
    try:
        cached = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cached = {}
    if key in cached:
        LOG.debug("accelerator from cache: %s", cached[key])
        return str(cached[key])

    candidate = "hvf" if platform.system() == "Darwin" else "kvm"
    usable = candidate == "hvf" or os.access("/dev/kvm", os.R_OK | os.W_OK)
    chosen = candidate if usable and probe_accel(binary, candidate, kernel) else "tcg"
    if chosen == "tcg":
        LOG.warning("hardware acceleration (%s) does not boot a kernel on this host; using TCG software emulation, which is slower", candidate)
    cached[key] = chosen
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_file, json.dumps(cached, indent=2).encode())
    return chosen


class QemuDriver(Driver):
    name = "qemu"

    def check_host(self) -> None:
        qemu_binary()

    def check_boot_files(self, kernel: Path, initrd: Path, *, cmdline: str, memory_mib: int) -> None:
        # QEMU's x86 direct kernel boot loads a bzImage; other architectures take other formats.
        if host_arch() == "x86_64":
            check_bzimage(kernel, cmdline=cmdline)

    def _spec(self, config: MachineConfig, paths: MachinePaths, binary: str) -> QemuSpec:
        return QemuSpec(
            binary=binary,
            name=config.name,
            uuid=config.uuid,
            accel=config.accel or "tcg",
            cpus=config.cpus,
            memory_mib=config.memory_mib,
            kernel=paths.kernel,
            initrd=paths.initrd,
            cmdline=config.kernel_cmdline,
            disk=paths.disk,
            seed=paths.seed,
            console_log=paths.console_log,
            pid_file=paths.pid_file,
            # Relative to the machine directory (QEMU's working directory), because a unix
            # socket path is limited to about 100 bytes and machine directories can be deep.
            qmp_socket=paths.qmp_socket.name,
            mac=config.mac,
            ssh_port=config.ssh_port,
            isolated=config.network == "isolated",
        )

    def prepare(self, config: MachineConfig, paths: MachinePaths, options: CreateOptions) -> MachineConfig:
        binary = qemu_binary()
        if options.accel == "hvf" and platform.system() != "Darwin":
            raise HkpodError("--accel hvf needs macOS", "use --accel kvm, tcg or auto on this host")
        if options.dry_run:
            accel = options.accel if options.accel != "auto" else _cached_or_placeholder(binary, paths.kernel)
            return config.replace(accel=accel, mac="<mac>", ssh_port=0)
        accel = resolve_accel(options.accel, binary, paths.kernel)
        return config.replace(accel=accel, mac=mac_from_uuid(config.uuid), ssh_port=pick_free_port())

    def argv(self, config: MachineConfig, paths: MachinePaths) -> list[str]:
        binary = shutil.which(f"qemu-system-{host_arch()}") or f"qemu-system-{host_arch()}"
        return qemu_argv(self._spec(config, paths, binary))

    def start(self, config: MachineConfig, paths: MachinePaths) -> MachineConfig:
        binary = qemu_binary()
        if not port_is_free(config.ssh_port):
            new_port = pick_free_port()
            LOG.warning("SSH port %d on %s is taken; using %d", config.ssh_port, LOOPBACK, new_port)
            config = config.replace(ssh_port=new_port)
        paths.pid_file.unlink(missing_ok=True)
        paths.qmp_socket.unlink(missing_ok=True)

        argv = qemu_argv(self._spec(config, paths, binary))
        LOG.debug("+ %s", " ".join(argv))
        # With -daemonize the command returns once the VM is set up; errors before that go to stderr.
        result = subprocess.run(argv, cwd=paths.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise HkpodError(
                f"QEMU failed to start machine {config.name!r} (exit status {result.returncode}): {detail[-1] if detail else 'no output'}",
                f"see {paths.debug_log}",
            )
        if self.running_pid(config, paths) is None:
            raise HkpodError(f"QEMU exited right after starting machine {config.name!r}", f"see {paths.console_log}")
        return config

    def running_pid(self, config: MachineConfig, paths: MachinePaths) -> int | None:
        pid = read_pid_file(paths.pid_file)
        if pid is None:
            return None
        argv = command_line(pid)
        if argv is None:
            return None
        # A recycled pid belongs to some other process: trust it only if it is QEMU with our UUID.
        if config.uuid not in argv or not any("qemu-system" in os.path.basename(arg) for arg in argv[:1]):
            LOG.debug("pid %d in %s is not this machine's QEMU: %s", pid, paths.pid_file, " ".join(argv)[:200])
            return None
        return pid

    def stop(self, config: MachineConfig, paths: MachinePaths, *, force: bool, timeout: float) -> None:
        pid = self.running_pid(config, paths)
        if pid is None:
            return
        if not force:
            try:
                qmp_command(paths, "system_powerdown")
            except OSError as error:
                LOG.warning("could not ask the guest to power off over QMP (%s); killing it", error)
            else:
                if _wait_gone(lambda: self.running_pid(config, paths), timeout):
                    return
                LOG.warning("machine %s did not power off within %.0f s; killing it", config.name, timeout)
        _kill(pid, lambda: self.running_pid(config, paths))

    def ssh_address(self, config: MachineConfig, paths: MachinePaths) -> tuple[str, int] | None:
        return (LOOPBACK, config.ssh_port)

    def exit_reason(self, config: MachineConfig, paths: MachinePaths) -> str:
        return "QEMU exited (the guest powered off, panicked with panic=1, or QEMU was killed)"


def _cached_or_placeholder(binary: str, kernel: Path) -> str:
    try:
        cached = json.loads((cache_root() / "accel.json").read_text())
        return str(cached[_accel_cache_key(binary, kernel)])
    except (FileNotFoundError, KeyError, json.JSONDecodeError, OSError):
        return "<accel: probed at create>"


def qmp_command(paths: MachinePaths, command: str) -> dict[str, object]:
    """Send one QMP command over the machine's socket and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(QMP_TIMEOUT)
        connect_unix(connection, paths.qmp_socket)
        stream = connection.makefile("rwb")
        stream.readline()  # the greeting
        for request in ({"execute": "qmp_capabilities"}, {"execute": command}):
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline() or b"{}")
                if "event" not in reply:
                    break
        return dict(reply)


def _wait_gone(current_pid: Callable[[], int | None], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if current_pid() is None:
            return True
        time.sleep(0.25)
    return current_pid() is None


def _kill(pid: int, current_pid: Callable[[], int | None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(current_pid, 10):
            return
    raise HkpodError(f"QEMU (pid {pid}) did not exit after SIGKILL", "check the process with ps")


DRIVER = QemuDriver
