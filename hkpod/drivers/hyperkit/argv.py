"""Build hyperkit command lines. These functions are pure and touch no file.

The grammar comes from moby/hyperkit v0.20210107: the getopt loop in
src/hyperkit.c, `-s` in src/lib/pci_emul.c (pci_parse_slot), `-l` in
src/lib/pci_lpc.c and src/lib/uart_emul.c, disk options in src/lib/block_if.c
and `-f kexec` in src/hyperkit.c (firmware_parse). hyperkit has no quoting:
every value is split at commas, so a path with a comma cannot be passed. Spaces
are fine because hkpod passes an argv list and no shell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from uuid import RESERVED_FUTURE, UUID, uuid5

from hkpod.errors import HkpodError

# VM_MAXCPU in src/include/xhyve/vmm/vmm_common.h; hyperkit rejects more at start.
MAX_CPUS = 64

# Fixed forever: changing it changes every machine's UUID, so vmnet gives each
# machine a new MAC address and bootpd a new lease.
UUID_NAMESPACE = UUID("29b5dc6c-ddc1-4021-85d0-433ed1d21b18")

# PCI slots as bus-less "slot:function". hyperkit initializes devices in slot
# order whatever the argv order. The disk and the seed ISO share slot 1 as
# functions 0 and 1 (hyperkit sets the multi-function bit), so the disk is the
# guest's first virtio disk, /dev/vda.
HOSTBRIDGE_SLOT = "0:0"
DISK_SLOT = "1:0"
SEED_SLOT = "1:1"
NET_SLOT = "2:0"
RNG_SLOT = "5:0"
LPC_SLOT = "31:0"

DEFAULT_ROOT = "LABEL=cloudimg-rootfs"

# hyperkit requires -f even for the MAC query. The query exits while devices are
# set up, before the kernel is read, so any path will do.
UNUSED_KERNEL = "/dev/null"


@dataclass(frozen=True)
class HyperkitSpec:
    """Everything hyperkit needs to run one machine. All paths must be absolute."""

    cpus: int
    memory_mib: int
    uuid: str
    pid_file: Path
    disk: Path
    seed_iso: Path
    # File into which hyperkit writes the name of the serial console's pty.
    console_pty: Path
    # hyperkit's 64 KiB ring buffer of serial console output.
    console_log: Path
    kernel: Path
    initrd: Path
    cmdline: str


def stable_uuid(name: str) -> str:
    """Return the UUID for machine NAME, the same on every start.

    vmnet derives the guest's MAC address from the -U UUID, so a stable UUID
    keeps the MAC and the DHCP lease across starts.
    """
    return str(uuid5(UUID_NAMESPACE, name))


def kernel_cmdline(root: str = DEFAULT_ROOT, extra: str = "") -> str:
    """Return the guest kernel command line: serial console, NoCloud seed, then EXTRA."""
    if not root or any(character.isspace() for character in root):
        raise HkpodError(f"invalid root device {root!r}: it must be one word, such as {DEFAULT_ROOT}")

    # ds=nocloud makes cloud-init read the seed ISO without probing other datasources.
    words = [f"root={root}", "console=ttyS0", "panic=1", "no_timer_check", "ds=nocloud"]
    if extra.strip():
        words.append(extra.strip())
    return " ".join(words)


def _check_uuid(value: str) -> None:
    try:
        parsed: UUID | None = UUID(value)
    except ValueError:
        parsed = None

    # hyperkit's uuid_from_string (src/include/xhyve/support/uuid.h) takes only
    # the 36-character hyphenated form, and rejects the reserved variant 111.
    if parsed is None or str(parsed) != value.lower() or parsed.variant == RESERVED_FUTURE:
        raise HkpodError(f"invalid machine UUID {value!r}: expected the form 01234567-89ab-cdef-0123-456789abcdef")


def _check_path(field: str, path: Path, *, comma_allowed: bool = False) -> str:
    text = str(path)
    if not path.is_absolute():
        raise HkpodError(
            f"the {field} path {text} must be absolute, because hyperkit resolves it from its own working directory"
        )
    if "\0" in text:
        raise HkpodError(f"the {field} path {text!r} contains a NUL byte")
    if "," in text and not comma_allowed:
        raise HkpodError(
            f"the {field} path {text} contains a comma, which hyperkit reads as an option separator",
            "use a machine directory and image paths without commas",
        )
    return text


def _check_spec(spec: HyperkitSpec) -> None:
    if not 1 <= spec.cpus <= MAX_CPUS:
        raise HkpodError(f"invalid CPU count {spec.cpus}: hyperkit supports 1 to {MAX_CPUS}")
    if spec.memory_mib < 1:
        raise HkpodError(f"invalid memory size {spec.memory_mib} MiB: it must be positive")
    _check_uuid(spec.uuid)
    if not spec.cmdline:
        # hyperkit would silently boot with the command line "auto".
        raise HkpodError("the kernel command line is empty")
    if "\0" in spec.cmdline:
        raise HkpodError("the kernel command line contains a NUL byte")


def _pci_devices(spec: HyperkitSpec) -> list[str]:
    disk = _check_path("disk", spec.disk)
    seed = _check_path("seed ISO", spec.seed_iso)
    devices = [
        f"{HOSTBRIDGE_SLOT},hostbridge",
        f"{DISK_SLOT},virtio-blk,{disk}",
        # ahci-cd is read-only by itself (block_if.c opens ATAPI devices read-only).
        f"{SEED_SLOT},ahci-cd,{seed}",
        # vmnet shared mode (NAT); the guest gets its address from macOS bootpd.
        f"{NET_SLOT},virtio-net",
        f"{RNG_SLOT},virtio-rnd",
        # The LPC bridge carries the COM ports: without it -l com1 is ignored.
        f"{LPC_SLOT},lpc",
    ]
    return [argument for device in devices for argument in ("-s", device)]


def _serial_console(spec: HyperkitSpec) -> list[str]:
    pty = _check_path("console pty", spec.console_pty)
    log = _check_path("console log", spec.console_log)
    # log= only records output: uart_emul.c rejects a port that has no I/O backend such as autopty.
    return ["-l", f"com1,autopty={pty},log={log}"]


def _firmware(spec: HyperkitSpec) -> list[str]:
    kernel = _check_path("kernel", spec.kernel)
    initrd = _check_path("initrd", spec.initrd)
    # firmware_parse splits at the first three commas only, so the command line
    # may contain commas. It strips no quotes, so none are added.
    return ["-f", f"kexec,{kernel},{initrd},{spec.cmdline}"]


def hyperkit_argv(binary: str, spec: HyperkitSpec) -> list[str]:
    """Return the argv that runs SPEC's machine with the hyperkit at BINARY."""
    _check_spec(spec)
    pid_file = _check_path("pid file", spec.pid_file, comma_allowed=True)

    # -A: ACPI tables. Once the guest enables ACPI, hyperkit turns SIGTERM into a
    #     power-button press (src/lib/pm.c); without -A, SIGTERM kills it at once.
    # -u: the RTC keeps UTC (hyperkit's default is local time).
    # -H: each guest HLT also returns to hyperkit's run loop, which yields to the
    #     host scheduler (vmexit_hlt in src/hyperkit.c). Multipass passes it too.
    argv = [binary, "-A", "-u", "-H"]
    argv += ["-c", str(spec.cpus), "-m", f"{spec.memory_mib}M", "-U", spec.uuid]
    # hyperkit creates the pid file with O_EXCL: a stale one blocks the start.
    argv += ["-F", pid_file]
    argv += _pci_devices(spec)
    argv += _serial_console(spec)
    argv += _firmware(spec)
    return argv


def mac_query_argv(binary: str, uuid: str) -> list[str]:
    """Return the argv that prints, without booting, the MAC vmnet gives machine UUID.

    With -M, hyperkit prints `MAC: xx:xx:xx:xx:xx:xx` and exits 0 while it sets
    up the virtio-net device. That opens vmnet, so it needs root like a real start.
    """
    _check_uuid(uuid)
    return [
        binary,
        "-M",
        "-U",
        uuid,
        "-s",
        f"{HOSTBRIDGE_SLOT},hostbridge",
        "-s",
        f"{NET_SLOT},virtio-net",
        "-f",
        f"kexec,{UNUSED_KERNEL}",
    ]
