#!/usr/bin/env python3
"""A strict stand-in for hyperkit, for tests on hosts where hyperkit cannot run.

It reads its argv with the grammar of moby/hyperkit v0.20210107 and fails where
hyperkit fails, in hyperkit's order, with hyperkit's text and exit status:

- src/hyperkit.c: the getopt loop (BSD getopt, which stops at the first
  non-option), -c/-m/-f/-F handling, the vCPU limit, the pid file;
- src/lib/pci_emul.c: `-s [bus:]slot[:func],emulation[,config]` and device
  set-up in bus/slot/function order;
- src/lib/pci_lpc.c and src/lib/uart_emul.c: `-l comN,backend,...`;
- src/lib/block_if.c, pci_virtio_block.c, pci_ahci.c: disk options, open, flock;
- src/lib/pci_virtio_net_vmnet.c: vmnet needs root, and -M prints the MAC;
- src/lib/firmware/kexec.c: the bzImage loader, which aborts on a bad kernel.

It is stricter than hyperkit where hyperkit would run a machine that cannot
work; those messages start with "fake-hyperkit:". It models a build without
OCaml qcow support and does not model the fbsd, bootrom and multiboot
firmware or the virtio-sock, virtio-9p, virtio-tap, virtio-vpnkit, uart and
dummy devices: it rejects them.

For a valid argv it writes the pid file, sets up the serial console files and
then runs boot(). Without a settings file there is no guest, and SIGTERM
exits 0 and removes the pid file, as hyperkit does after a clean ACPI poweroff.
With a settings file (fake_hyperkit.json next to the script, see
load_settings), QEMU boots the guest. A poweroff exits 0, a reboot exits 2,
and SIGTERM presses the power button. The guest's lease goes into the lease
file in bootpd's format, with an address in 127.0.0.0/8 whose port 22 is
forwarded to the guest's.

Environment: FAKE_HYPERKIT_VERSION sets the version that -v prints.

This script imports nothing from hkpod, so it checks hkpod from outside.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

VERSION_ENV = "FAKE_HYPERKIT_VERSION"
DEFAULT_VERSION = "v0.20210107-fake"

# src/hyperkit.c: `Y` takes an argument there although -Y is documented as a flag.
OPTSTRING = "behvuwxMACHPWY:f:F:g:c:s:m:l:U:"
EX_USAGE = 64  # sysexits.h, used by errx() for bad -l and -m values
MB = 1 << 20
DEFAULT_MEMSIZE = 256 * MB
MAX_VCPUS = 64  # VM_MAXCPU

MAX_BUSES = 256
MAX_SLOTS = 32
MAX_FUNCS = 8

MODELLED_DEVICES = frozenset(
    {"hostbridge", "amd_hostbridge", "lpc", "virtio-blk", "ahci-hd", "ahci-cd", "virtio-net", "virtio-rnd"}
)
UNMODELLED_DEVICES = frozenset({"virtio-sock", "virtio-9p", "virtio-tap", "virtio-vpnkit", "uart", "dummy"})
KNOWN_DEVICES = MODELLED_DEVICES | UNMODELLED_DEVICES

FIRMWARE_KINDS = ("kexec", "fbsd", "bootrom", "multiboot")
LPC_UART_NAMES = ("COM1", "COM2")
CONSOLE_RING_BYTES = 65536

VMNET_FAILURE = "virtio_net: Could not create vmnet interface, permission denied or no entitlement?\n"

# kexec.c
LOWMEM_LIMIT = 3 << 30
BASE_CMDLINE = 0x4000
BASE_KERNEL = 0x100000
SETUP_HEADER_END = 0x268

_C_INT = re.compile(r"\s*([+-]?\d+)")
_C_ULONG = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class HyperkitExit(Exception):
    """hyperkit stops with STATUS (after printing its message), or by abort()."""

    def __init__(self, status: int, *, abort: bool = False) -> None:
        super().__init__(status)
        self.status = status
        self.abort = abort


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def perror(prefix: str, error_number: int | None) -> None:
    # macOS's strerror(0) text, for a perror() after a failure that set no errno.
    reason = os.strerror(error_number) if error_number else "Undefined error: 0"
    err(f"{prefix}: {reason}\n")


@dataclass
class Slot:
    bus: int
    slot: int
    func: int
    emulation: str
    config: str | None


@dataclass
class Firmware:
    kind: str
    kernel: str | None
    initrd: str | None
    cmdline: str | None


@dataclass
class Config:
    progname: str
    ncpus: int = 1
    memsize: int = DEFAULT_MEMSIZE
    acpi: bool = False
    rtc_utc: bool = False
    exit_on_hlt: bool = False
    uuid: str | None = None
    pidfile: str | None = None
    print_mac: bool = False
    slots: dict[tuple[int, int, int], Slot] = field(default_factory=dict)
    # COM port index -> its backend string (None for a bare `-l com1`).
    com: dict[int, str | None] = field(default_factory=dict)
    firmware: Firmware | None = None


@dataclass
class BlockDevice:
    path: str
    emulation: str
    read_only: bool
    fd: int


@dataclass
class Runtime:
    """What device set-up produced, for boot()."""

    lpc_present: bool = False
    uart_stdio: bool = False
    disks: list[BlockDevice] = field(default_factory=list)
    console_ptys: list[str] = field(default_factory=list)
    console_logs: list[str] = field(default_factory=list)
    pty_fds: list[int] = field(default_factory=list)
    mac: bytes | None = None


# ---- C library behaviour ---------------------------------------------------


def c_int(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def c_atoi(text: str) -> int:
    match = _C_INT.match(text)
    return c_int(int(match.group(1))) if match else 0


def c_scan_ints(text: str, count: int) -> list[int]:
    """Return the values sscanf(TEXT, "%d:%d:...") converts, COUNT conversions at most."""
    values: list[int] = []
    position = 0
    for index in range(count):
        if index > 0:
            if not text.startswith(":", position):
                break
            position += 1
        match = _C_INT.match(text, position)
        if match is None:
            break
        values.append(c_int(int(match.group(1))))
        position = match.end()
    return values


def c_strtoul(text: str) -> tuple[int, str] | None:
    """strtoul(TEXT, &end, 0): the value and the unparsed rest, or None when nothing converts."""
    match = _C_ULONG.match(text)
    if match is None:
        return None
    digits = match.group(2)
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8) if digits.startswith("0") else int(digits)
    if match.group(1) == "-":
        value = -value
    return value % (1 << 64), text[match.end() :]


# ---- argv parsing (src/hyperkit.c, pci_emul.c, pci_lpc.c) --------------------


def usage_text(progname: str) -> str:
    pad = " " * len(progname)
    return (
        f"Usage: {progname} [-behuwxMACHPWY] [-c vcpus] [-F <pidfile>] [-g <gdb port>] [-l <lpc>]\n"
        f"       {pad} [-m mem] [-p vcpu:hostcpu] [-s <pci>] [-U uuid] -f <fw>\n"
    )


def usage(progname: str, status: int) -> HyperkitExit:
    err(usage_text(progname))
    return HyperkitExit(status)


def getopt(progname: str, args: list[str]) -> Iterator[tuple[str, str | None]]:
    """Yield (letter, argument) pairs as BSD getopt(3) returns them to hyperkit's loop."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            return
        position = 1
        while position < len(arg):
            letter = arg[position]
            position += 1
            spec = OPTSTRING.find(letter)
            if letter == ":" or spec < 0:
                err(f"{progname}: illegal option -- {letter}\n")
                raise usage(progname, 1)
            if OPTSTRING[spec + 1 : spec + 2] != ":":
                yield letter, None
                continue
            if position < len(arg):
                value = arg[position:]
            elif index + 1 < len(args):
                index += 1
                value = args[index]
            else:
                err(f"{progname}: option requires an argument -- {letter}\n")
                raise usage(progname, 1)
            yield letter, value
            break
        index += 1


def parse_memsize(text: str) -> int | None:
    parsed = c_strtoul(text)
    if text and parsed is not None and parsed[1] == "":
        # Bare numbers below 1 MiB are megabytes, for backward compatibility.
        return parsed[0] * MB if parsed[0] < MB else parsed[0]
    return expand_number(text)


def expand_number(text: str) -> int | None:
    parsed = c_strtoul(text)
    if parsed is None:
        return None
    number, rest = parsed
    shifts = {"e": 60, "p": 50, "t": 40, "g": 30, "m": 20, "k": 10, "b": 0, "": 0}
    unit = rest[:1].lower()
    if unit not in shifts:
        return None
    value = number << shifts[unit]
    return value if value < 1 << 64 else None


def parse_slot(config: Config, opt: str) -> None:
    if "," not in opt:
        err(f'Invalid PCI slot info field "{opt}"\n')
        raise HyperkitExit(1)
    address, rest = opt.split(",", 1)
    emulation, comma, device_config = rest.partition(",")

    values = c_scan_ints(address, 3)
    if len(values) == 3:
        bus, slot, func = values
    else:
        bus = 0
        values = c_scan_ints(address, 2)
        if len(values) == 2:
            slot, func = values
        else:
            func = 0
            values = c_scan_ints(address, 1)
            slot = values[0] if values else -1

    if not (0 <= bus < MAX_BUSES and 0 <= slot < MAX_SLOTS and 0 <= func < MAX_FUNCS):
        err(f'Invalid PCI slot info field "{opt}"\n')
        raise HyperkitExit(1)
    if (bus, slot, func) in config.slots:
        err(f"pci slot {slot}:{func} already occupied!\n")
        raise HyperkitExit(1)
    if emulation not in KNOWN_DEVICES:
        err(f'pci slot {slot}:{func}: unknown device "{emulation}"\n')
        raise HyperkitExit(1)
    config.slots[(bus, slot, func)] = Slot(bus, slot, func, emulation, device_config if comma else None)


def parse_lpc(config: Config, opt: str) -> None:
    name, comma, backend = opt.partition(",")
    for unit, uart_name in enumerate(LPC_UART_NAMES):
        if name.lower() == uart_name.lower():
            config.com[unit] = backend if comma else None
            return
    err(f"{config.progname}: invalid lpc device configuration '{opt}'\n")
    raise HyperkitExit(EX_USAGE)


def parse_firmware(config: Config, opt: str) -> None:
    kind = next((name for name in FIRMWARE_KINDS if opt.startswith(name)), None)
    # Split at the first three commas only: the kexec command line may contain commas.
    parts = opt.split(",", 3)[1:] + [""] * 3
    kernel, initrd, cmdline = (part or None for part in parts[:3])

    if kind is not None and kind != "kexec":
        err(f"fake-hyperkit: firmware {kind!r} is not modelled by this stand-in\n")
        raise HyperkitExit(1)
    if kind is None or kernel is None:
        err(
            "Invalid firmware argument\n"
            "    -f kexec,'kernel'[,'initrd'][,'\"cmdline\"']\n"
            "    -f fbsd,'userboot','boot volume'[,'\"kernel env\"']\n"
            "    -f bootrom,'ROM'\n"
            "    -f multiboot,'kernel'[,module[;cmdline][:module[;cmdline]]...][,cmdline]\n"
        )
        raise HyperkitExit(1)
    config.firmware = Firmware(kind, kernel, initrd, cmdline)


def show_version(progname: str) -> HyperkitExit:
    version = os.environ.get(VERSION_ENV, DEFAULT_VERSION)
    err(f"{progname}: {version}\n\nHomepage: https://github.com/docker/hyperkit\nLicense: BSD\n\n")
    return HyperkitExit(0)


def parse_args(progname: str, args: list[str]) -> Config:
    """Parse hyperkit's options in order, failing at the first bad one as hyperkit does."""
    config = Config(progname=progname)
    flags = {"A": "acpi", "u": "rtc_utc", "H": "exit_on_hlt", "M": "print_mac"}

    for letter, value in getopt(progname, args):
        if letter in flags:
            setattr(config, flags[letter], True)
        elif letter == "c":
            config.ncpus = c_atoi(value or "")
        elif letter == "f":
            parse_firmware(config, value or "")
        elif letter == "F":
            config.pidfile = value
        elif letter == "l":
            parse_lpc(config, value or "")
        elif letter == "s":
            parse_slot(config, value or "")
        elif letter == "m":
            memsize = parse_memsize(value or "")
            if memsize is None:
                err(f"{progname}: invalid memsize '{value}'\n")
                raise HyperkitExit(EX_USAGE)
            config.memsize = memsize
        elif letter == "U":
            config.uuid = value
        elif letter == "v":
            raise show_version(progname)
        elif letter == "h":
            raise usage(progname, 0)
        # b C e g P w W x Y change nothing that this stand-in models.

    if config.firmware is None:
        raise usage(progname, 1)
    return config


# ---- start-up in main()'s order (src/hyperkit.c) -----------------------------


def check_vcpus(config: Config) -> None:
    if config.ncpus < 1:
        err(f"Invalid guest vCPUs ({config.ncpus})\n")
        raise HyperkitExit(1)
    if config.ncpus > MAX_VCPUS:
        err(f"{config.ncpus} vCPUs requested but only {MAX_VCPUS} available\n")
        raise HyperkitExit(1)


def setup_pidfile(path: str | None) -> None:
    if path is None:
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:
        err("Failed to set up pidfile\npidfile error -1\n")
        raise HyperkitExit(1) from None

    def remove_pidfile() -> None:
        try:
            os.unlink(path)
        except OSError:
            err("Failed to remove pidfile\n")

    # hyperkit removes the file with atexit(): after exit(), not after abort() or SIGKILL.
    atexit.register(remove_pidfile)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)


def valid_uuid(text: str) -> bool:
    """Apply uuid_from_string's rules (src/include/xhyve/support/uuid.h)."""
    if text == "":
        return True  # the nil UUID
    if len(text) != 36 or not _UUID.fullmatch(text):
        return False
    # Variant 111 (reserved) is rejected.
    return (int(text[19:21], 16) & 0xE0) != 0xE0


def mac_from_uuid(text: str) -> bytes:
    """Derive a locally administered unicast MAC from the UUID, the same on every call.

    vmnet derives the MAC from the -U UUID by a rule that Apple does not
    publish. The stand-in keeps only the property that hkpod relies on: the
    same UUID gives the same MAC.
    """
    return unicast_local_mac(hashlib.sha256(str(uuid.UUID(text)).encode()).digest())


def unicast_local_mac(octets: bytes) -> bytes:
    """Clear the multicast bit and set the locally administered bit of the first octet."""
    return bytes([(octets[0] & 0xFC) | 0x02]) + octets[1:6]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in mac)


def _device_unmodelled(config: Config, slot: Slot, runtime: Runtime) -> None:
    err(f'fake-hyperkit: device emulation "{slot.emulation}" is not modelled by this stand-in\n')
    raise HyperkitExit(1)


def _device_nothing(config: Config, slot: Slot, runtime: Runtime) -> None:
    return


def _open_block(optstr: str, read_only: bool, emulation: str) -> BlockDevice | int:
    """Follow blockif_open: return the device, or the errno left behind by the failure."""
    path, *options = optstr.split(",")
    nocache = sync = False
    sector_size = physical_sector_size = 0

    for option in options:
        sizes = c_scan_sizes(option) if option.startswith("sectorsize=") else None
        if option == "nocache":
            nocache = True
        elif option in ("sync", "direct"):
            sync = True
        elif option == "ro":
            read_only = True
        elif sizes is not None:
            sector_size, physical_sector_size = sizes
        else:
            err(f'Invalid device option "{option}"\n')
            return 0

    if nocache:
        perror("xhyve: nocache support unimplemented", 0)
        return 0

    extra = os.O_SYNC if sync else 0
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | extra)
    except OSError as error:
        if read_only:
            perror("Could not open backing file", error.errno)
            return error.errno or 0
        # A file that cannot be opened for writing is used read-only.
        try:
            fd = os.open(path, os.O_RDONLY | extra)
            read_only = True
        except OSError as second:
            perror("Could not open backing file", second.errno)
            return second.errno or 0

    try:
        # Two machines on one disk would corrupt it: hyperkit takes a non-blocking flock.
        fcntl.flock(fd, fcntl.LOCK_NB | (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX))
    except OSError as error:
        perror("Could not lock backing file", error.errno)
        os.close(fd)
        return error.errno or 0

    if sector_size != 0:

        def power_of_two(value: int) -> bool:
            return value & (value - 1) == 0

        if (
            not power_of_two(sector_size)
            or not power_of_two(physical_sector_size)
            or sector_size < 512
            or sector_size > physical_sector_size
        ):
            err(f"Invalid sector size {sector_size}/{physical_sector_size}\n")
            os.close(fd)
            return 0
    return BlockDevice(path=path, emulation=emulation, read_only=read_only, fd=fd)


def c_scan_sizes(option: str) -> tuple[int, int] | None:
    """sscanf(OPTION, "sectorsize=%d/%d"), falling back to "sectorsize=%d" (logical = physical)."""
    rest = option[len("sectorsize=") :]
    first = _C_INT.match(rest)
    if first is None:
        return None
    logical = c_int(int(first.group(1)))
    if rest.startswith("/", first.end()):
        second = _C_INT.match(rest, first.end() + 1)
        if second is not None:
            return logical, c_int(int(second.group(1)))
    return logical, logical


def _device_virtio_blk(config: Config, slot: Slot, runtime: Runtime) -> None:
    if slot.config is None:
        out("virtio-block: backing device required\n")
        raise HyperkitExit(1)
    result = _open_block(slot.config, False, slot.emulation)
    if isinstance(result, int):
        perror("Could not open backing file", result)
        raise HyperkitExit(1)
    runtime.disks.append(result)


def _device_ahci(config: Config, slot: Slot, runtime: Runtime) -> None:
    if slot.config is None:
        err("pci_ahci: backing device required\n")
        raise HyperkitExit(1)
    # ATAPI (ahci-cd) devices are opened read-only.
    result = _open_block(slot.config, slot.emulation == "ahci-cd", slot.emulation)
    if isinstance(result, int):
        raise HyperkitExit(1)
    runtime.disks.append(result)


def _device_virtio_net(config: Config, slot: Slot, runtime: Runtime) -> None:
    if slot.config is not None:
        err("fake-hyperkit: virtio-net options are not modelled by this stand-in\n")
        raise HyperkitExit(1)
    if config.uuid is not None and not valid_uuid(config.uuid):
        # vmn_create returns -1 without a message.
        raise HyperkitExit(1)
    if os.geteuid() != 0:
        out(VMNET_FAILURE)
        raise HyperkitExit(1)

    # Without -U (or with the nil UUID) vmnet picks a new MAC on every start.
    mac = mac_from_uuid(config.uuid) if config.uuid else unicast_local_mac(os.urandom(6))
    if config.print_mac:
        out(f"MAC: {format_mac(mac)}\n")
        raise HyperkitExit(0)
    runtime.mac = mac


def _open_autopty(linkname: str | None, devname: str, runtime: Runtime) -> bool:
    out(f"linkname {linkname if linkname is not None else '(null)'}\n")
    master, replica = os.openpty()
    ptyname = os.ttyname(replica)
    # hyperkit opens only the master side; the user's terminal opens the other.
    os.close(replica)
    out(f"{devname} connected to {ptyname}\n")

    if linkname:
        try:
            os.unlink(linkname)
        except FileNotFoundError:
            pass
        except OSError as error:
            perror("unlinking autopty file", error.errno)
            return False
        try:
            fd = os.open(linkname, os.O_CREAT | os.O_WRONLY, 0o644)
        except OSError as error:
            perror("creating autopty file", error.errno)
            return False
        # Since v0.20200908 the file contains the pty's name (before, it was a symlink).
        os.write(fd, ptyname.encode())
        os.close(fd)

    runtime.pty_fds.append(master)
    runtime.console_ptys.append(ptyname)
    return True


def _open_console_ring(path: str, runtime: Runtime) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    except OSError as error:
        perror("open console-ring", error.errno)
        return False
    os.ftruncate(fd, CONSOLE_RING_BYTES)
    os.close(fd)
    runtime.console_logs.append(path)
    return True


def _is_tty_device(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return False
    return os.isatty(fd)


def set_uart_backend(backend: str | None, devname: str, runtime: Runtime) -> bool:
    """Follow uart_set_backend: a port needs one I/O backend; log= alone is not one."""
    if backend is None:
        return True
    has_io = False
    for token in backend.split(","):
        if token == "null":
            os.open(os.devnull, os.O_RDWR | os.O_NONBLOCK)
            has_io = True
        elif token == "stdio" and not runtime.uart_stdio:
            runtime.uart_stdio = True
            has_io = True
        elif token == "autopty" or token.startswith("autopty="):
            linkname = token[len("autopty=") :] if token.startswith("autopty=") else None
            if not _open_autopty(linkname, devname, runtime):
                return False
            has_io = True
        elif token.startswith("log="):
            if not _open_console_ring(token[len("log=") :], runtime):
                return False
        elif token == "asl" or _is_tty_device(token):
            has_io = True
        else:
            return False
    return has_io


def _device_lpc(config: Config, slot: Slot, runtime: Runtime) -> None:
    if runtime.lpc_present:
        err("Only one LPC bridge is allowed.\n")
        raise HyperkitExit(1)
    if slot.bus != 0:
        err("LPC bridge can be present only on bus 0.\n")
        raise HyperkitExit(1)

    for unit, uart_name in enumerate(LPC_UART_NAMES):
        backend = config.com.get(unit)
        if not set_uart_backend(backend, uart_name, runtime):
            # hyperkit cut the backend string at its commas, so only the first part shows.
            first = (backend or "").split(",")[0]
            err(f"Unable to initialize backend '{first}' for LPC device {uart_name}\n")
            raise HyperkitExit(1)
    runtime.lpc_present = True


DEVICE_SETUP = {
    "hostbridge": _device_nothing,
    "amd_hostbridge": _device_nothing,
    "virtio-rnd": _device_nothing,
    "lpc": _device_lpc,
    "virtio-blk": _device_virtio_blk,
    "ahci-hd": _device_ahci,
    "ahci-cd": _device_ahci,
    "virtio-net": _device_virtio_net,
    **{name: _device_unmodelled for name in UNMODELLED_DEVICES},
}


def init_pci(config: Config, runtime: Runtime) -> None:
    # Devices are set up by bus, slot and function, whatever the argv order.
    for address in sorted(config.slots):
        slot = config.slots[address]
        DEVICE_SETUP[slot.emulation](config, slot, runtime)


def check_console_wiring(config: Config, runtime: Runtime) -> None:
    """Reject -l without an lpc slot: hyperkit ignores it and runs without a serial port."""
    if config.com and not runtime.lpc_present:
        ports = ", ".join(LPC_UART_NAMES[unit].lower() for unit in sorted(config.com))
        err(
            f"fake-hyperkit: -l {ports} has no effect without an lpc device (-s 31,lpc):"
            " hyperkit would run without a serial port\n"
        )
        raise HyperkitExit(1)


def build_smbios(config: Config) -> None:
    if config.uuid is not None and not valid_uuid(config.uuid):
        err("Assertion failed: (error == 0), function main, file src/hyperkit.c, line 1039.\n")
        raise HyperkitExit(134, abort=True)


# ---- kexec (src/lib/firmware/kexec.c) ----------------------------------------


def _align_up(value: int, alignment: int) -> int:
    mask = 0xFFFFFFFF
    return (((value - 1) & mask) & (~(alignment - 1) & mask)) + alignment


def kexec_failure(firmware: Firmware, memsize: int) -> str | None:
    """Return the message hyperkit prints before abort() for this kernel and initrd, or None."""
    lowmem = min(memsize, LOWMEM_LIMIT)
    kernel = firmware.kernel or ""
    failed_kernel = f"kexec: failed to load kernel {kernel}\n"
    try:
        size = os.stat(kernel).st_size
        with open(kernel, "rb") as kernel_file:
            data = kernel_file.read(SETUP_HEADER_END)
    except OSError:
        return failed_kernel
    if size < SETUP_HEADER_END:
        return failed_kernel

    (setup_sects,) = struct.unpack_from("<B", data, 0x1F1)
    (syssize,) = struct.unpack_from("<I", data, 0x1F4)
    (boot_flag,) = struct.unpack_from("<H", data, 0x1FE)
    magic = data[0x202:0x206]
    (version,) = struct.unpack_from("<H", data, 0x206)
    (loadflags,) = struct.unpack_from("<B", data, 0x211)
    (initrd_addr_max, kernel_alignment) = struct.unpack_from("<II", data, 0x22C)
    (relocatable,) = struct.unpack_from("<B", data, 0x234)
    (cmdline_size,) = struct.unpack_from("<I", data, 0x238)
    (pref_address, init_size) = struct.unpack_from("<QI", data, 0x258)

    if (
        setup_sects == 0
        or boot_flag != 0xAA55
        or magic != b"HdrS"
        or version < 0x020A
        or not loadflags & 1
        or size < (setup_sects + 1) * 512 + syssize * 16
    ):
        return failed_kernel

    payload = size - (setup_sects + 1) * 512
    reserved = _align_up(init_size, 0x1000)
    start = _align_up(BASE_KERNEL, kernel_alignment) if relocatable else pref_address
    if start < BASE_KERNEL or payload > reserved or start + reserved > lowmem or payload == 0:
        return failed_kernel

    cmdline = (firmware.cmdline or "auto").encode()
    if len(cmdline) + 1 > cmdline_size or BASE_CMDLINE + len(cmdline) + 1 > start:
        return failed_kernel

    if firmware.initrd is None:
        return None
    return _initrd_failure(firmware.initrd, initrd_addr_max, lowmem, start + reserved)


def _initrd_failure(initrd: str, initrd_addr_max: int, lowmem: int, kernel_end: int) -> str | None:
    failed_initrd = f"kexec: failed to load initrd {initrd}\n"
    try:
        size = os.stat(initrd).st_size
        with open(initrd, "rb"):
            pass
    except OSError:
        return failed_initrd
    if size == 0:
        return failed_initrd

    initrd_max = min(initrd_addr_max, lowmem - 1)
    if size > initrd_max:
        return (
            f"fake-hyperkit: initrd {initrd} is larger than initrd_addr_max or guest memory:"
            " hyperkit's address arithmetic would wrap and write outside guest memory\n"
        )
    start = (initrd_max - size) & -0x1000
    if start < kernel_end:
        return (
            f"fake-hyperkit: initrd {initrd} would start at {start:#x}, inside the kernel's memory"
            f" (up to {kernel_end:#x}): hyperkit would overwrite the kernel and the guest would crash\n"
        )
    return None


def load_firmware(config: Config) -> None:
    assert config.firmware is not None
    failure = kexec_failure(config.firmware, config.memsize)
    if failure is not None:
        err(failure)
        raise HyperkitExit(134, abort=True)


# ---- the guest -----------------------------------------------------------------


def boot(config: Config, runtime: Runtime) -> int:
    """Run the guest until it powers off, and return hyperkit's exit status.

    Without a settings file (see load_settings) there is no guest: the
    stand-in waits for SIGTERM (the power button, see main()), which ends it
    with status 0. With one, QEMU runs the guest (see run_guest).
    """
    settings = load_settings()
    if settings is None:
        while True:
            signal.pause()
    return run_guest(config, runtime, settings)


# ---- the guest under QEMU ------------------------------------------------------

SETTINGS_FILE = "fake_hyperkit.json"
DEFAULT_QEMU = "qemu-system-x86_64"
DEFAULT_ACCEL = "tcg,thread=multi,tb-size=256"
DEFAULT_CPU = "max"
LEASE_SECONDS = 86400
QMP_CONNECT_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1


def load_settings() -> dict[str, str] | None:
    """Read fake_hyperkit.json from the directory of the invoked path, else of this file.

    hyperkit runs under sudo, which strips the environment, so the stand-in
    takes its settings from a file that the test writes next to it:
      leases  the lease file to write the guest's record into (required)
      qemu    the QEMU binary (default qemu-system-x86_64 on PATH)
      accel   QEMU's -accel value (default tcg,thread=multi,tb-size=256)
      cpu     QEMU's -cpu value (default max)
    """
    directories = {os.path.dirname(os.path.abspath(sys.argv[0])), os.path.dirname(os.path.realpath(__file__))}
    for directory in sorted(directories):
        path = os.path.join(directory, SETTINGS_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as settings:
                loaded = json.load(settings)
            return {str(key): str(value) for key, value in loaded.items()}
    return None


def loopback_address(text: str) -> str:
    """An address in 127.0.0.0/8 derived from the UUID, standing in for the one bootpd would give.

    It is never 127.0.0.1, so the forwarded port 22 does not collide with a service of the host.
    """
    digest = hashlib.sha256(str(uuid.UUID(text)).encode()).digest()
    return f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"


def _qemu_path(path: str) -> str:
    # QEMU's option parser reads a doubled comma as a literal comma inside a value.
    return path.replace(",", ",,")


def _disk_arguments(disks: list[BlockDevice]) -> list[str]:
    arguments: list[str] = []
    for index, disk in enumerate(disks):
        drive = f"if=none,id=drive{index},format=raw,file={_qemu_path(disk.path)}"
        if disk.emulation == "ahci-cd":
            # q35's AHCI controller has one port per bus, ide.0 to ide.5.
            arguments += ["-drive", f"{drive},media=cdrom,readonly=on", "-device", f"ide-cd,drive=drive{index},bus=ide.{index}"]
            continue
        drive += ",readonly=on" if disk.read_only else ",cache=writeback"
        device = "ide-hd" if disk.emulation == "ahci-hd" else "virtio-blk-pci"
        arguments += ["-drive", drive, "-device", f"{device},drive=drive{index}"]
    return arguments


def qemu_argv(config: Config, runtime: Runtime, settings: dict[str, str], qmp: str, address: str) -> list[str]:
    """The QEMU argv that runs the machine hyperkit would run, as set up by init_pci."""
    assert config.firmware is not None
    assert config.uuid is not None
    assert runtime.mac is not None
    argv = [
        settings.get("qemu", DEFAULT_QEMU),
        "-name", "fake-hyperkit",
        "-uuid", config.uuid,
        "-machine", "q35",
        "-accel", settings.get("accel", DEFAULT_ACCEL),
        "-cpu", settings.get("cpu", DEFAULT_CPU),
        "-smp", str(config.ncpus),
        "-m", f"{config.memsize // MB}M",
        "-nodefaults",
        "-display", "none",
        # A guest reboot ends QEMU, as it ends hyperkit (exit status 2).
        "-no-reboot",
        "-kernel", config.firmware.kernel or "",
        "-append", config.firmware.cmdline or "auto",
    ]
    if config.firmware.initrd:
        argv += ["-initrd", config.firmware.initrd]
    argv += _disk_arguments(runtime.disks)
    # User networking replaces vmnet, and reaches nothing but the forwarded SSH port.
    argv += [
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:{address}:22-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={format_mac(runtime.mac)}",
    ]
    if any(slot.emulation == "virtio-rnd" for slot in config.slots.values()):
        argv += ["-device", "virtio-rng-pci"]
    console = f"file:{runtime.console_logs[0]}" if runtime.console_logs else "null"
    argv += ["-serial", console, "-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv


def _die_with_parent() -> None:
    # A SIGKILL to the stand-in cannot be caught, so the kernel takes QEMU down with it.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Qmp:
    """A QMP connection that collects events: the SHUTDOWN event's reason separates poweroff from reboot."""

    def __init__(self, path: str, qemu: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if qemu.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.buffer = b""
        self.shutdown_reason: str | None = None
        self.send("qmp_capabilities")

    def send(self, command: str) -> None:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")

    def read(self) -> bool:
        """Read what arrived; False once QEMU closed the connection."""
        data = self.sock.recv(65536)
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line or b"{}")
            if message.get("event") == "SHUTDOWN":
                self.shutdown_reason = message.get("data", {}).get("reason")
        return bool(data)


def guest_status(returncode: int, shutdown_reason: str | None) -> int:
    """hyperkit's exit status for how QEMU ended."""
    if returncode != 0:
        return 1
    if shutdown_reason in ("guest-reset", "guest-panic"):
        return 2
    return 0


def run_guest(config: Config, runtime: Runtime, settings: dict[str, str]) -> int:
    assert config.uuid is not None and runtime.mac is not None
    scratch = tempfile.mkdtemp(prefix="fake-hyperkit-")
    qmp_path = os.path.join(scratch, "qmp.sock")
    address = loopback_address(config.uuid)
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_write.setblocking(False)
    signal.set_wakeup_fd(wakeup_write.fileno())
    signal.signal(signal.SIGTERM, lambda *_: None)

    argv = qemu_argv(config, runtime, settings, qmp_path, address)
    err(f"fake-hyperkit: running {' '.join(argv)}\n")
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        qmp = Qmp(qmp_path, qemu)
        write_lease(settings["leases"], format_lease(name=None, ip_address=address, mac=runtime.mac,
                                                     expiry=int(time.time()) + LEASE_SECONDS))
        open_connection = True
        while qemu.poll() is None or open_connection:
            readable, _, _ = select.select([qmp.sock, wakeup_read] if open_connection else [wakeup_read], [], [], 0.5)
            if qmp.sock in readable:
                open_connection = qmp.read()
            if wakeup_read in readable and signal.SIGTERM in wakeup_read.recv(64) and open_connection:
                # hyperkit turns SIGTERM into an ACPI power-button press.
                qmp.send("system_powerdown")
            if qemu.poll() is not None and not readable:
                break
        returncode = qemu.wait()
        return guest_status(returncode, qmp.shutdown_reason)
    except OSError as error:
        err(f"fake-hyperkit: QEMU failed: {error}\n")
        return 1
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def format_lease(*, name: str | None, ip_address: str, mac: bytes, expiry: int) -> str:
    """Return one record in the format bootpd writes to /var/db/dhcpd_leases."""
    # bootpd writes the hardware type and every octet in hex without leading zeros.
    hw_address = "1," + ":".join(f"{octet:x}" for octet in mac)
    lines = ["{"]
    if name is not None:
        lines.append(f"\tname={name}")
    lines += [
        f"\tip_address={ip_address}",
        f"\thw_address={hw_address}",
        f"\tidentifier={hw_address}",
        f"\tlease=0x{expiry:x}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_lease(path: str, record: str) -> None:
    """Put RECORD at the head of the lease file, replacing the file by rename as bootpd does."""
    try:
        with open(path, encoding="utf-8") as leases:
            existing = leases.read()
    except FileNotFoundError:
        existing = ""
    temporary = f"{path}-"
    with open(temporary, "w", encoding="utf-8") as leases:
        leases.write(record + existing)
    os.replace(temporary, path)


def _power_button(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    # NOTE: real hyperkit dies at once on a SIGTERM that arrives before the guest
    # enabled ACPI. The stand-in always exits cleanly, so tests can stop it at any time.
    signal.signal(signal.SIGTERM, _power_button)
    progname = os.path.basename(argv[0])
    try:
        config = parse_args(progname, argv[1:])
        check_vcpus(config)
        setup_pidfile(config.pidfile)
        runtime = Runtime()
        init_pci(config, runtime)
        check_console_wiring(config, runtime)
        build_smbios(config)
        load_firmware(config)
        return boot(config, runtime)
    except HyperkitExit as stop:
        if stop.abort:
            # abort() skips atexit handlers, so the pid file stays, as with hyperkit.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.abort()
        return stop.status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
