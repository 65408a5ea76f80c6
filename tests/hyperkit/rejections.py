"""Command lines that hyperkit rejects, with the text it prints and its exit status.

Each row is taken from moby/hyperkit v0.20210107's source (the file is named
in the row). The stand-in fake_hyperkit.py must reproduce every row;
test_fake_hyperkit.py runs them all.

In an argv, `{name}` is replaced by a test file:
  kernel, initrd   a minimal valid bzImage and initrd
  html_kernel      a 707-byte HTML page saved in place of a kernel
  disk, seed       existing raw files
  existing         an existing file (as a stale pid file)
  locked           a disk that another process holds an exclusive flock on
  missing          a path that does not exist
  pidfile, pty, log   fresh paths in the test directory
  long_cmdline     2048 characters, one more than the test kernel's cmdline_size allows
  big_initrd       a 3 MiB initrd
An exit status of -6 means the process ended by SIGABRT (hyperkit calls abort()).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Privilege(Enum):
    """Who must run the row: vmnet needs root, so some rows depend on it."""

    ANY = "any"
    ROOT = "root"
    USER = "user"


@dataclass(frozen=True)
class Rejection:
    name: str
    argv: tuple[str, ...]
    status: int
    stream: str
    # A line hyperkit prints; "" means it prints nothing at all.
    text: str
    source: str
    privilege: Privilege = Privilege.ANY


ABORTED = -6

# A firmware argument that hyperkit accepts, for rows that fail after option parsing.
FIRMWARE = ("-f", "kexec,{kernel},{initrd},console=ttyS0")
CONSOLE = ("-s", "31,lpc", "-l", "com1,autopty={pty},log={log}")
UUID = "6ba7b810-9dad-51d1-80b4-00c04fd430c8"

HYPERKIT_REJECTIONS: tuple[Rejection, ...] = (
    # Options (src/hyperkit.c main(): BSD getopt with "behvuwxMACHPWY:f:F:g:c:s:m:l:U:").
    Rejection("illegal-option", ("-z", *FIRMWARE), 1, "stderr", "hyperkit: illegal option -- z", "hyperkit.c"),
    Rejection(
        "p-not-in-optstring", ("-p", "0:1", *FIRMWARE), 1, "stderr", "hyperkit: illegal option -- p", "hyperkit.c"
    ),
    Rejection(
        "missing-argument", (*FIRMWARE, "-c"), 1, "stderr", "hyperkit: option requires an argument -- c", "hyperkit.c"
    ),
    Rejection(
        "y-takes-argument", (*FIRMWARE, "-Y"), 1, "stderr", "hyperkit: option requires an argument -- Y", "hyperkit.c"
    ),
    Rejection(
        "no-firmware", ("-A", "-s", "0:0,hostbridge"), 1, "stderr", "Usage: hyperkit [-behuwxMACHPWY]", "hyperkit.c"
    ),
    Rejection(
        "firmware-after-operand",
        ("-A", "extra", *FIRMWARE),
        1,
        "stderr",
        "Usage: hyperkit [-behuwxMACHPWY]",
        "hyperkit.c",
    ),
    Rejection("memsize-unit", ("-m", "2X", *FIRMWARE), 64, "stderr", "hyperkit: invalid memsize '2X'", "hyperkit.c"),
    Rejection("cpus-zero", ("-c", "0", *FIRMWARE), 1, "stderr", "Invalid guest vCPUs (0)", "hyperkit.c"),
    Rejection("cpus-word", ("-c", "two", *FIRMWARE), 1, "stderr", "Invalid guest vCPUs (0)", "hyperkit.c"),
    Rejection(
        "cpus-65", ("-c", "65", *FIRMWARE), 1, "stderr", "65 vCPUs requested but only 64 available", "hyperkit.c"
    ),
    Rejection("pidfile-exists", ("-F", "{existing}", *FIRMWARE), 1, "stderr", "Failed to set up pidfile", "hyperkit.c"),
    # -f (src/hyperkit.c firmware_parse, src/lib/firmware/kexec.c kexec_init).
    Rejection("kexec-without-kernel", ("-f", "kexec"), 1, "stderr", "Invalid firmware argument", "hyperkit.c"),
    Rejection("kexec-empty-kernel", ("-f", "kexec,,{initrd}"), 1, "stderr", "Invalid firmware argument", "hyperkit.c"),
    Rejection("unknown-firmware", ("-f", "uefi,{kernel}"), 1, "stderr", "Invalid firmware argument", "hyperkit.c"),
    # -s (src/lib/pci_emul.c pci_parse_slot).
    Rejection(
        "slot-without-device", ("-s", "2:0", *FIRMWARE), 1, "stderr", 'Invalid PCI slot info field "2:0"', "pci_emul.c"
    ),
    Rejection(
        "slot-32",
        ("-s", "32,virtio-rnd", *FIRMWARE),
        1,
        "stderr",
        'Invalid PCI slot info field "32,virtio-rnd"',
        "pci_emul.c",
    ),
    Rejection(
        "function-8",
        ("-s", "2:8,virtio-rnd", *FIRMWARE),
        1,
        "stderr",
        'Invalid PCI slot info field "2:8,virtio-rnd"',
        "pci_emul.c",
    ),
    Rejection(
        "bus-256",
        ("-s", "256:2:0,virtio-rnd", *FIRMWARE),
        1,
        "stderr",
        'Invalid PCI slot info field "256:2:0,virtio-rnd"',
        "pci_emul.c",
    ),
    Rejection(
        "slot-not-number",
        ("-s", "x,virtio-rnd", *FIRMWARE),
        1,
        "stderr",
        'Invalid PCI slot info field "x,virtio-rnd"',
        "pci_emul.c",
    ),
    Rejection(
        "unknown-device",
        ("-s", "2:0,virtio-rng", *FIRMWARE),
        1,
        "stderr",
        'pci slot 2:0: unknown device "virtio-rng"',
        "pci_emul.c",
    ),
    Rejection(
        "slot-occupied",
        ("-s", "5,virtio-rnd", "-s", "5:0,virtio-rnd", *FIRMWARE),
        1,
        "stderr",
        "pci slot 5:0 already occupied!",
        "pci_emul.c",
    ),
    # Disks (src/lib/block_if.c blockif_open, pci_virtio_block.c, pci_ahci.c).
    Rejection(
        "disk-bad-option",
        ("-s", "1:0,virtio-blk,{disk},bogus", *FIRMWARE),
        1,
        "stderr",
        'Invalid device option "bogus"',
        "block_if.c",
    ),
    Rejection(
        "disk-qcow-without-ocaml",
        ("-s", "1:0,virtio-blk,{disk},format=qcow", *FIRMWARE),
        1,
        "stderr",
        'Invalid device option "format=qcow"',
        "block_if.c (a build without HAVE_OCAML_QCOW)",
    ),
    Rejection(
        "disk-nocache",
        ("-s", "1:0,virtio-blk,{disk},nocache", *FIRMWARE),
        1,
        "stderr",
        "xhyve: nocache support unimplemented",
        "block_if.c",
    ),
    Rejection(
        "disk-sector-size",
        ("-s", "1:0,virtio-blk,{disk},sectorsize=100", *FIRMWARE),
        1,
        "stderr",
        "Invalid sector size 100/100",
        "block_if.c",
    ),
    Rejection(
        "disk-without-path",
        ("-s", "1:0,virtio-blk", *FIRMWARE),
        1,
        "stdout",
        "virtio-block: backing device required",
        "pci_virtio_block.c",
    ),
    Rejection(
        "cd-without-path",
        ("-s", "1:1,ahci-cd", *FIRMWARE),
        1,
        "stderr",
        "pci_ahci: backing device required",
        "pci_ahci.c",
    ),
    Rejection(
        "disk-not-found",
        ("-s", "1:0,virtio-blk,{missing}", *FIRMWARE),
        1,
        "stderr",
        "Could not open backing file: No such file or directory",
        "block_if.c",
    ),
    Rejection(
        "disk-locked",
        ("-s", "1:0,virtio-blk,{locked}", *FIRMWARE),
        1,
        "stderr",
        "Could not lock backing file: Resource temporarily unavailable",
        "block_if.c",
    ),
    # Serial ports (src/hyperkit.c, src/lib/pci_lpc.c, src/lib/uart_emul.c).
    Rejection(
        "lpc-com3",
        ("-l", "com3,autopty", *FIRMWARE),
        64,
        "stderr",
        "hyperkit: invalid lpc device configuration 'com3,autopty'",
        "pci_lpc.c",
    ),
    Rejection(
        "com-log-only",
        ("-s", "31,lpc", "-l", "com1,log={log}", *FIRMWARE),
        1,
        "stderr",
        "Unable to initialize backend 'log={log}' for LPC device COM1",
        "uart_emul.c",
    ),
    Rejection(
        "com-bad-backend",
        ("-s", "31,lpc", "-l", "com1,bogus,log={log}", *FIRMWARE),
        1,
        "stderr",
        "Unable to initialize backend 'bogus' for LPC device COM1",
        "uart_emul.c",
    ),
    Rejection(
        "lpc-twice", ("-s", "30,lpc", *CONSOLE, *FIRMWARE), 1, "stderr", "Only one LPC bridge is allowed.", "pci_lpc.c"
    ),
    Rejection(
        "lpc-bus-1",
        ("-s", "1:31:0,lpc", *FIRMWARE),
        1,
        "stderr",
        "LPC bridge can be present only on bus 0.",
        "pci_lpc.c",
    ),
    # vmnet (src/lib/pci_virtio_net_vmnet.c): creating the interface needs root.
    Rejection(
        "vmnet-as-user",
        ("-s", "0:0,hostbridge", "-s", "2:0,virtio-net", *FIRMWARE),
        1,
        "stdout",
        "virtio_net: Could not create vmnet interface, permission denied or no entitlement?",
        "pci_virtio_net_vmnet.c",
        Privilege.USER,
    ),
    Rejection(
        "mac-query-as-user",
        ("-M", "-U", UUID, "-s", "0:0,hostbridge", "-s", "2:0,virtio-net", "-f", "kexec,/dev/null"),
        1,
        "stdout",
        "virtio_net: Could not create vmnet interface, permission denied or no entitlement?",
        "pci_virtio_net_vmnet.c",
        Privilege.USER,
    ),
    Rejection(
        "net-bad-uuid",
        ("-U", "not-a-uuid", "-s", "2:0,virtio-net", *FIRMWARE),
        1,
        "stdout",
        "",
        "pci_virtio_net_vmnet.c (vmn_create returns -1 without a message)",
        Privilege.ROOT,
    ),
    # A bad -U without virtio-net fails an assert() when the SMBIOS tables are built.
    Rejection(
        "smbios-bad-uuid",
        ("-U", "not-a-uuid", *FIRMWARE),
        ABORTED,
        "stderr",
        "Assertion failed: (error == 0)",
        "hyperkit.c, smbiostbl.c",
    ),
    # The kernel is read only when the first vCPU starts (src/lib/firmware/kexec.c).
    Rejection(
        "kernel-html",
        ("-f", "kexec,{html_kernel},{initrd},console=ttyS0"),
        ABORTED,
        "stderr",
        "kexec: failed to load kernel {html_kernel}",
        "kexec.c",
    ),
    Rejection(
        "kernel-missing",
        ("-f", "kexec,{missing},{initrd},console=ttyS0"),
        ABORTED,
        "stderr",
        "kexec: failed to load kernel {missing}",
        "kexec.c",
    ),
    Rejection(
        "cmdline-too-long",
        ("-f", "kexec,{kernel},{initrd},{long_cmdline}"),
        ABORTED,
        "stderr",
        "kexec: failed to load kernel {kernel}",
        "kexec.c",
    ),
    Rejection(
        "kernel-above-memory",
        ("-m", "2M", *FIRMWARE),
        ABORTED,
        "stderr",
        "kexec: failed to load kernel {kernel}",
        "kexec.c",
    ),
    Rejection(
        "initrd-missing",
        ("-f", "kexec,{kernel},{missing},console=ttyS0"),
        ABORTED,
        "stderr",
        "kexec: failed to load initrd {missing}",
        "kexec.c",
    ),
)

# Where hyperkit would run a machine that cannot work, the stand-in rejects it.
STAND_IN_REJECTIONS: tuple[Rejection, ...] = (
    Rejection(
        "com-without-lpc",
        ("-l", "com1,autopty={pty},log={log}", *FIRMWARE),
        1,
        "stderr",
        "fake-hyperkit: -l com1 has no effect without an lpc device",
        "hyperkit ignores -l without an lpc slot and runs without a serial port",
    ),
    Rejection(
        "unmodelled-device",
        ("-s", "3,virtio-9p,tag=share", *FIRMWARE),
        1,
        "stderr",
        'fake-hyperkit: device emulation "virtio-9p" is not modelled',
        "pci_virtio_9p.c exists in hyperkit; hkpod does not use it",
    ),
    Rejection(
        "unmodelled-firmware",
        ("-f", "bootrom,{kernel}"),
        1,
        "stderr",
        "fake-hyperkit: firmware 'bootrom' is not modelled",
        "firmware/bootrom.c exists in hyperkit; hkpod does not use it",
    ),
    Rejection(
        "initrd-overlaps-kernel",
        ("-m", "4M", "-f", "kexec,{kernel},{big_initrd},console=ttyS0"),
        ABORTED,
        "stderr",
        "fake-hyperkit: initrd {big_initrd} would start at",
        "kexec.c copies the initrd over the kernel without a check",
    ),
)
