"""Check a kernel and initrd against the rules of hyperkit's kexec loader before launch.

hyperkit reads the kernel only when the first vCPU starts, and reacts to a
kernel it cannot load by printing `kexec: failed to load kernel` and calling
abort(). These checks repeat the loader's rules (moby/hyperkit:
src/lib/firmware/kexec.c, v0.20210107) so that hkpod can name the file and the
field before anything runs. Offsets are those of the Linux x86 boot protocol
setup header (Documentation/arch/x86/boot.rst in the kernel source).
"""

from __future__ import annotations

import logging
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from hkpod.errors import HkpodError

LOG = logging.getLogger(__name__)

MIB = 1 << 20
# hyperkit maps guest memory up to 3 GiB below the 4 GiB boundary ("lowmem") and
# the rest above it. The kernel and the initrd must both fit in lowmem.
LOWMEM_LIMIT = 3 << 30
# kexec.c: kernel_start must not be below 1 MiB, and the command line is copied to 0x4000.
MIN_KERNEL_START = 0x100000
CMDLINE_ADDRESS = 0x4000
PAGE_SIZE = 0x1000

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
# Boot protocol 2.10 arrived with Linux 2.6.31.
MIN_PROTOCOL = 0x020A
LOADED_HIGH = 0x01

# The setup header runs from 0x1F1 up to the end of handover_offset at 0x268.
SETUP_HEADER_END = 0x268

# (field, offset in the file, struct format): the fields hyperkit's loader reads.
_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("setup_sects", 0x1F1, "<B"),
    ("syssize", 0x1F4, "<I"),
    ("boot_flag", 0x1FE, "<H"),
    ("header", 0x202, "4s"),
    ("version", 0x206, "<H"),
    ("loadflags", 0x211, "<B"),
    ("initrd_addr_max", 0x22C, "<I"),
    ("kernel_alignment", 0x230, "<I"),
    ("relocatable_kernel", 0x234, "<B"),
    ("cmdline_size", 0x238, "<I"),
    ("pref_address", 0x258, "<Q"),
    ("init_size", 0x260, "<I"),
)


@dataclass(frozen=True)
class SetupHeader:
    """The setup header fields that hyperkit's kexec loader uses."""

    setup_sects: int
    syssize: int
    boot_flag: int
    header: bytes
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    cmdline_size: int
    pref_address: int
    init_size: int


@dataclass(frozen=True)
class Placement:
    """The guest memory range that hyperkit reserves for the kernel, in bytes."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def _align_up(value: int, alignment: int, bits: int) -> int:
    # kexec.c's ALIGNUP, ((x - 1) & ~(a - 1)) + a, evaluated in BITS-wide unsigned
    # arithmetic so that odd inputs (an alignment or size of 0) give the same result.
    mask = (1 << bits) - 1
    return (((value - 1) & mask) & (~(alignment - 1) & mask)) + alignment


def _align_down(value: int, alignment: int) -> int:
    return value & -alignment


def _regular_file_size(path: Path, role: str) -> int:
    try:
        status = path.stat()
    except FileNotFoundError as error:
        raise HkpodError(f"{role} {path} not found") from error
    except OSError as error:
        raise HkpodError(f"failed to read {role} {path}: {error.strerror}") from error
    if not stat.S_ISREG(status.st_mode):
        raise HkpodError(f"{role} {path} is not a regular file")
    return status.st_size


def _mib(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size / MIB:.3f} MiB"


def read_setup_header(data: bytes) -> SetupHeader:
    """Unpack the setup header from the first SETUP_HEADER_END bytes of a kernel image."""
    values = {name: struct.unpack_from(fmt, data, offset)[0] for name, offset, fmt in _FIELDS}
    return SetupHeader(**values)


def _not_a_bzimage(path: Path, reason: str, data: bytes) -> HkpodError:
    hint = "use the vmlinuz that belongs to the disk image (a bzImage)"
    if data.lstrip()[:1] == b"<":
        hint = "the file looks like an HTML page, probably an error page saved by a download: download it again"
    return HkpodError(f"kernel {path} is not a bzImage: {reason}", hint)


def _check_signatures(path: Path, data: bytes, size: int) -> SetupHeader:
    if size < SETUP_HEADER_END:
        raise _not_a_bzimage(path, f"only {size} bytes, less than a boot sector and setup header", data)

    header = read_setup_header(data)
    if header.boot_flag != BOOT_FLAG:
        raise _not_a_bzimage(path, f"boot_flag at 0x1FE is {header.boot_flag:#06x}, not 0xaa55", data)
    if header.header != HEADER_MAGIC:
        raise _not_a_bzimage(path, f"header at 0x202 is {header.header!r}, not b'HdrS'", data)
    if header.setup_sects == 0:
        raise _not_a_bzimage(path, "setup_sects at 0x1F1 is 0", data)
    if header.version < MIN_PROTOCOL:
        raise HkpodError(
            f"kernel {path} uses boot protocol {header.version >> 8}.{header.version & 0xFF:02d}"
            " (version at 0x206), older than the 2.10 that hyperkit needs",
            "use a Linux 2.6.31 or newer kernel",
        )
    if not header.loadflags & LOADED_HIGH:
        raise _not_a_bzimage(path, "LOADED_HIGH (bit 0 of loadflags at 0x211) is not set", data)

    setup_bytes = (header.setup_sects + 1) * 512
    expected = setup_bytes + header.syssize * 16
    if size < expected:
        raise HkpodError(
            f"kernel {path} is truncated: its setup_sects and syssize need {expected} bytes, the file has {size}",
            "download the kernel again",
        )
    return header


def place_kernel(path: Path, header: SetupHeader, size: int, lowmem: int) -> Placement:
    """Return where hyperkit loads the kernel, or raise if its loader would refuse it."""
    payload = size - (header.setup_sects + 1) * 512
    # init_size is the memory the kernel needs from its load address before it
    # reads the memory map; hyperkit rounds it up to whole pages.
    init_size = _align_up(header.init_size, PAGE_SIZE, 32)
    if header.relocatable_kernel:
        start = _align_up(MIN_KERNEL_START, header.kernel_alignment, 32)
    else:
        start = header.pref_address

    if start < MIN_KERNEL_START:
        raise HkpodError(
            f"kernel {path} asks to be loaded at {start:#x} (kernel_alignment at 0x230 or pref_address at 0x258),"
            " below the 1 MiB that hyperkit requires"
        )
    if payload > init_size:
        raise HkpodError(
            f"kernel {path} has {payload} bytes of protected-mode code but init_size at 0x260 is only {init_size}"
        )
    if payload == 0:
        raise HkpodError(f"kernel {path} has no protected-mode code after its {header.setup_sects} setup sectors")
    if start + init_size > LOWMEM_LIMIT:
        raise HkpodError(
            f"kernel {path} needs guest memory up to {_mib(start + init_size)} (init_size at 0x260),"
            " but hyperkit maps at most 3 GiB below the 4 GiB boundary"
        )
    if start + init_size > lowmem:
        raise HkpodError(
            f"kernel {path} needs guest memory up to {_mib(start + init_size)} (init_size at 0x260),"
            f" more than the {_mib(lowmem)} the machine has",
            "give the machine more memory",
        )
    return Placement(start=start, size=init_size)


def _check_cmdline_size(path: Path, header: SetupHeader, length: int) -> None:
    if length + 1 > header.cmdline_size:
        raise HkpodError(
            f"the kernel command line is {length} bytes, but kernel {path} accepts at most"
            f" {max(header.cmdline_size - 1, 0)} (cmdline_size at 0x238)",
            "shorten --cmdline-extra",
        )


def _check_cmdline(path: Path, header: SetupHeader, cmdline: str, kernel: Placement) -> None:
    # hyperkit passes "auto" when the -f kexec argument has no command line.
    length = len((cmdline or "auto").encode())
    _check_cmdline_size(path, header, length)
    if CMDLINE_ADDRESS + length + 1 > kernel.start:
        raise HkpodError(f"the kernel command line is {length} bytes, too long to fit below kernel {path}")


def _check_initrd(initrd: Path, header: SetupHeader, lowmem: int, kernel: Placement) -> None:
    size = _regular_file_size(initrd, "initrd")
    if size == 0:
        # kexec.c treats a read of 0 bytes as a failure and aborts.
        raise HkpodError(f"initrd {initrd} is empty", "download the initrd again")

    # kexec.c puts the initrd as high as it may go: it ends at the lower of
    # initrd_addr_max and the top of lowmem, with its start rounded down to a page.
    initrd_max = min(header.initrd_addr_max, lowmem - 1)
    if size > initrd_max:
        raise HkpodError(
            f"initrd {initrd} is {_mib(size)}, larger than the {_mib(initrd_max)} below"
            " the kernel's initrd_addr_max (at 0x22C) and the top of guest memory"
        )
    start = _align_down(initrd_max - size, PAGE_SIZE)

    # hyperkit copies the initrd after the kernel and does not check that they are
    # apart: an overlap overwrites the kernel and the guest dies without a message.
    if start < kernel.end:
        raise HkpodError(
            f"kernel and initrd do not fit in {_mib(lowmem)} of guest memory: the kernel needs up to"
            f" {_mib(kernel.end)} and initrd {initrd} ({_mib(size)}) would start at {_mib(start)}",
            "give the machine more memory",
        )


def _read_checked_header(path: Path) -> tuple[SetupHeader, int]:
    """Return the setup header of kernel PATH and its size, after checking the bzImage signatures."""
    size = _regular_file_size(path, "kernel")
    try:
        with path.open("rb") as kernel_file:
            data = kernel_file.read(SETUP_HEADER_END)
    except OSError as error:
        raise HkpodError(f"failed to read kernel {path}: {error.strerror}") from error
    return _check_signatures(path, data, size), size


def check_bzimage(path: Path, *, cmdline: str) -> None:
    """Raise HkpodError unless PATH is an x86 bzImage whose cmdline_size takes CMDLINE.

    This is the part of check_kernel that holds for any loader, QEMU's direct kernel boot among them.
    """
    header, _ = _read_checked_header(path)
    _check_cmdline_size(path, header, len(cmdline.encode()))


def check_kernel(path: Path, *, cmdline: str, initrd: Path, memory_mib: int) -> None:
    """Raise HkpodError unless hyperkit's kexec loader would boot PATH with INITRD and CMDLINE.

    MEMORY_MIB is the guest memory given with -m. hyperkit puts a relocatable
    kernel at 1 MiB rounded up to kernel_alignment (others at pref_address) and
    reserves init_size bytes there. It puts the initrd at the top of the memory
    below min(3 GiB, memory, initrd_addr_max). The kernel must fit in that memory, the initrd must start
    above the kernel's end, and the command line must be shorter than cmdline_size.
    """
    header, size = _read_checked_header(path)
    lowmem = min(memory_mib * MIB, LOWMEM_LIMIT)
    kernel = place_kernel(path, header, size, lowmem)
    _check_cmdline(path, header, cmdline, kernel)
    _check_initrd(initrd, header, lowmem, kernel)
    LOG.debug(
        "kernel %s: boot protocol %#x, loads at %#x, needs %d bytes; initrd %s fits below %d MiB",
        path,
        header.version,
        kernel.start,
        kernel.size,
        initrd,
        lowmem // MIB,
    )
