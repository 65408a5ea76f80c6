"""Read qcow2 images and convert them to sparse raw disks, the one format every HyperKit reads.

The layout follows QEMU's "Qcow2 Image File Format" specification
(docs/interop/qcow2.rst in the QEMU sources). All numbers in the format are
big-endian. The converter streams, so its memory use does not grow with the
image: it keeps one cluster of the L1 table, one L2 table and one data
cluster at a time.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hkpod.errors import HkpodError
from hkpod.fsutil import fsync_directory

LOG = logging.getLogger(__name__)

MAGIC = b"QFI\xfb"

# Version 2 headers end at byte 72. Version 3 headers are at least 104 bytes
# long, and byte 104 contains compression_type when header_length covers it.
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
V3_FIELDS = struct.Struct(">QQQII")
V3_MIN_HEADER_LENGTH = 104
COMPRESSION_TYPE_OFFSET = 104

# The specification sets the lower bound (512-byte clusters). The upper bound
# of 2 MiB is QEMU's, which the specification notes: QEMU opens nothing larger.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
# Extended L2 entries split a cluster into 32 subclusters of at least 512 bytes.
MIN_EXTENDED_L2_CLUSTER_BITS = 14
SUBCLUSTERS_PER_CLUSTER = 32

# QEMU's implementation limit for the L1 table, given in the specification.
# A larger l1_size is taken as a damaged header.
MAX_L1_TABLE_BYTES = 32 * 1024 * 1024
# The specification caps backing file names at 1023 bytes.
MAX_BACKING_FILE_NAME = 1023

# L1 entries and standard L2 entries keep a host offset in bits 9-55.
HOST_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_COMPRESSED = 1 << 62
L2_ZERO = 1
SECTOR_SIZE = 512

# Runs of zeros at least this long become holes in the output, the same
# granularity as the default of "qemu-img convert -S".
SPARSE_BLOCK_SIZE = 4096
ZERO_BLOCK = bytes(SPARSE_BLOCK_SIZE)

# Guest bytes between two calls of the progress callback.
PROGRESS_INTERVAL = 16 * 1024 * 1024

FLATTEN_HINT = "flatten it with qemu-img convert -O qcow2 first"
CHECK_HINT = "check it with qemu-img check, or download it again"

ProgressCallback = Callable[[int, int], None]


class ImageFormat(enum.Enum):
    """The disk image formats that hkpod distinguishes."""

    RAW = "raw"
    QCOW2 = "qcow2"


class CompressionType(enum.Enum):
    """The compression_type header field: how compressed clusters are encoded."""

    DEFLATE = 0
    ZSTD = 1


class IncompatibleFeature(enum.IntFlag):
    """The incompatible_features header bits (version 3) that the specification defines."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    EXTERNAL_DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


# A plain int: inverting an IntFlag keeps only its defined bits, which would
# hide the unknown ones.
KNOWN_INCOMPATIBLE_FEATURES = int(
    IncompatibleFeature.DIRTY
    | IncompatibleFeature.CORRUPT
    | IncompatibleFeature.EXTERNAL_DATA_FILE
    | IncompatibleFeature.COMPRESSION_TYPE
    | IncompatibleFeature.EXTENDED_L2
)


@dataclass(frozen=True)
class Qcow2Header:
    """The header fields of a qcow2 image that reading its active (non-snapshot) data uses."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    nb_snapshots: int
    incompatible_features: IncompatibleFeature
    header_length: int
    compression_type: CompressionType

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return IncompatibleFeature.EXTENDED_L2 in self.incompatible_features

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 16 with extended L2 entries (entry and subcluster bitmap), else 8."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_entries_needed(self) -> int:
        """Number of L1 entries that cover the virtual size."""
        bytes_per_l2_table = self.l2_entries * self.cluster_size
        return -(-self.virtual_size // bytes_per_l2_table)


def detect_format(path: Path) -> ImageFormat:
    """Return QCOW2 if PATH starts with the qcow2 magic, else RAW."""
    try:
        with path.open("rb") as image:
            magic = image.read(len(MAGIC))
    except OSError as error:
        raise HkpodError(f"failed to read disk image {path}: {error.strerror}") from error
    return ImageFormat.QCOW2 if magic == MAGIC else ImageFormat.RAW


def read_header(path: Path) -> Qcow2Header:
    """Parse and validate the header of the qcow2 image at PATH.

    Raises HkpodError for a file that is missing, not qcow2, truncated or
    damaged, and for every feature that convert_to_raw cannot handle.
    """
    try:
        with path.open("rb") as image:
            return _read_header(image.fileno(), path)
    except OSError as error:
        raise HkpodError(f"failed to read disk image {path}: {error.strerror}") from error


def convert_to_raw(
    src: Path,
    dest: Path,
    *,
    size: int | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Write the guest-visible contents of the qcow2 image SRC to DEST as a sparse raw disk.

    DEST gets the image's virtual size, or SIZE bytes when SIZE is larger;
    a SIZE below the virtual size raises HkpodError. The output is the
    active state: internal snapshots are left out, as qemu-img convert does.
    PROGRESS, when given, is called with (guest bytes done, virtual size)
    whenever at least PROGRESS_INTERVAL more bytes are done, and once at the
    end. DEST appears only when the conversion succeeded, with mode 0600
    because a VM disk holds private data; SRC is only read.
    """
    try:
        source_file = src.open("rb")
    except OSError as error:
        raise HkpodError(f"failed to read disk image {src}: {error.strerror}") from error

    with source_file:
        header = _read_header(source_file.fileno(), src)
        output_size = _output_size(header, size, src)
        _check_distinct(src, dest)
        source = _Source(source_file.fileno(), src, header)
        LOG.debug(
            "converting %s (qcow2 v%d, %d-byte clusters, %d bytes) to %s",
            src, header.version, header.cluster_size, header.virtual_size, dest,
        )
        _write_atomically(dest, output_size, lambda fd: _copy_extents(source, fd, progress))


def _read_header(fd: int, path: Path) -> Qcow2Header:
    file_size = os.fstat(fd).st_size
    data = _pread_exact(fd, 0, V3_MIN_HEADER_LENGTH + 1, path)
    if data[: len(MAGIC)] != MAGIC:
        raise HkpodError(
            f"{path} is not a qcow2 image (it does not start with the qcow2 magic QFI\\xfb)"
        )

    header = _parse_header(data, path)
    _check_header(header, path, file_size)
    _check_features(header, fd, path)
    return header


def _parse_header(data: bytes, path: Path) -> Qcow2Header:
    if len(data) < V2_HEADER.size:
        raise _truncated(path, "the header", 0, V2_HEADER.size, len(data))
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        virtual_size,
        crypt_method,
        l1_size,
        l1_table_offset,
        _refcount_table_offset,
        _refcount_table_clusters,
        nb_snapshots,
        _snapshots_offset,
    ) = V2_HEADER.unpack_from(data)

    if version not in (2, 3):
        raise HkpodError(
            f"{path} is qcow2 version {version}, but only versions 2 and 3 are supported",
            "convert it with qemu-img convert -O qcow2 first",
        )

    # Version 2 has no feature bits and always deflate, with a fixed 72-byte header.
    incompatible = 0
    header_length = V2_HEADER.size
    compression_code = CompressionType.DEFLATE.value
    if version == 3:
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise _truncated(path, "the header", 0, V3_MIN_HEADER_LENGTH, len(data))
        incompatible, _compatible, _autoclear, _refcount_order, header_length = (
            V3_FIELDS.unpack_from(data, V2_HEADER.size)
        )
        if header_length < V3_MIN_HEADER_LENGTH or header_length % 8:
            raise _invalid(
                path, f"header_length {header_length} is not a multiple of 8 of at least 104"
            )
        # A field beyond header_length is absent, which means zero.
        if header_length > COMPRESSION_TYPE_OFFSET:
            if len(data) <= COMPRESSION_TYPE_OFFSET:
                raise _truncated(path, "the header", 0, header_length, len(data))
            compression_code = data[COMPRESSION_TYPE_OFFSET]

    unknown = incompatible & ~KNOWN_INCOMPATIBLE_FEATURES
    if unknown:
        bits = ", ".join(str(bit) for bit in range(64) if unknown >> bit & 1)
        raise HkpodError(
            f"{path} uses unknown qcow2 incompatible feature bits ({bits})",
            "convert it with qemu-img convert -O qcow2 first",
        )
    try:
        compression_type = CompressionType(compression_code)
    except ValueError:
        raise HkpodError(
            f"{path} uses unknown qcow2 compression type {compression_code}",
            "convert it with qemu-img convert -O qcow2 first",
        ) from None

    return Qcow2Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        virtual_size=virtual_size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        nb_snapshots=nb_snapshots,
        incompatible_features=IncompatibleFeature(incompatible),
        header_length=header_length,
        compression_type=compression_type,
    )


def _check_header(header: Qcow2Header, path: Path, file_size: int) -> None:
    """Reject header values that no valid image has, before any of them is used as an offset."""
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise _invalid(
            path,
            f"cluster_bits {header.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}",
        )
    if header.header_length > header.cluster_size:
        raise _invalid(path, f"header_length {header.header_length} is larger than a cluster")
    if header.extended_l2 and header.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise _invalid(
            path,
            f"extended L2 entries need clusters of at least 16 KiB, "
            f"not {header.cluster_size} bytes",
        )
    if header.l1_table_offset % header.cluster_size:
        raise _invalid(path, f"the L1 table offset {header.l1_table_offset} is not cluster-aligned")
    if header.l1_size * 8 > MAX_L1_TABLE_BYTES:
        limit = MAX_L1_TABLE_BYTES // 8
        raise _invalid(path, f"l1_size {header.l1_size} exceeds QEMU's limit of {limit} entries")
    if header.l1_size < header.l1_entries_needed:
        raise _invalid(
            path,
            f"its L1 table has {header.l1_size} entries, but virtual size "
            f"{header.virtual_size} needs {header.l1_entries_needed}",
        )

    l1_end = header.l1_table_offset + header.l1_entries_needed * 8
    if l1_end > file_size:
        raise _truncated(path, "the L1 table", header.l1_table_offset, l1_end, file_size)


def _check_features(header: Qcow2Header, fd: int, path: Path) -> None:
    """Reject images whose data convert_to_raw cannot read alone and correctly."""
    if header.backing_file_offset:
        name = _backing_file_name(header, fd, path)
        raise HkpodError(f"{path} has a backing file ({name})", FLATTEN_HINT)

    if header.crypt_method:
        method = {1: "AES", 2: "LUKS"}.get(header.crypt_method, f"method {header.crypt_method}")
        raise HkpodError(
            f"{path} is encrypted ({method})",
            "decrypt it with qemu-img convert -O qcow2 first",
        )

    features = header.incompatible_features
    if IncompatibleFeature.CORRUPT in features:
        raise HkpodError(
            f"{path} is marked corrupt by the program that last wrote it",
            "repair it with qemu-img check -r all, or download it again",
        )
    if IncompatibleFeature.EXTERNAL_DATA_FILE in features:
        raise HkpodError(f"{path} keeps its data in an external data file", FLATTEN_HINT)
    if IncompatibleFeature.DIRTY in features:
        # The dirty bit means only that refcounts may be stale (QEMU sets it
        # while an image with lazy_refcounts=on is open). This reader never
        # uses refcounts, because the L1 and L2 tables alone map guest data.
        LOG.debug("%s has the dirty bit set; refcounts are not needed to read it", path)

    flagged = IncompatibleFeature.COMPRESSION_TYPE in features
    if flagged != (header.compression_type is not CompressionType.DEFLATE):
        # The specification ties the two: the bit is set exactly when the
        # compression_type field is non-zero (not deflate).
        raise _invalid(
            path,
            f"the compression type bit is {'set' if flagged else 'clear'} but "
            f"compression_type is {header.compression_type.name.lower()}",
        )
    if header.compression_type is CompressionType.ZSTD:
        _import_zstandard(path)


def _backing_file_name(header: Qcow2Header, fd: int, path: Path) -> str:
    length = min(header.backing_file_size, MAX_BACKING_FILE_NAME)
    name = _pread_exact(fd, header.backing_file_offset, length, path)
    return name.decode("utf-8", errors="replace") or "name unreadable"


def _import_zstandard(path: Path) -> ModuleType:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise HkpodError(
            f"{path} uses zstd compression, and the zstandard Python module is not installed",
            "pip install zstandard",
        ) from None


def _output_size(header: Qcow2Header, size: int | None, src: Path) -> int:
    if size is None:
        return header.virtual_size
    if size < header.virtual_size:
        raise HkpodError(
            f"the requested disk size {size} bytes is smaller than the virtual size "
            f"{header.virtual_size} bytes of {src}",
            "request a size at least as large as the image",
        )
    return size


def _check_distinct(src: Path, dest: Path) -> None:
    """Reject a DEST that is SRC itself, because the rename at the end would replace the source."""
    try:
        same = dest.exists() and os.path.samefile(src, dest)
    except OSError:
        same = False
    if same:
        raise HkpodError(f"cannot convert {src} onto itself", "choose another output path")


class _Source:
    """Random access to the clusters of an open qcow2 image, checked against the file size."""

    def __init__(self, fd: int, path: Path, header: Qcow2Header) -> None:
        self.fd = fd
        self.path = path
        self.header = header
        self.file_size = os.fstat(fd).st_size
        self.zstd: ModuleType | None = None
        if header.compression_type is CompressionType.ZSTD:
            self.zstd = _import_zstandard(path)

    def read(self, offset: int, length: int, what: str) -> bytes:
        """Read exactly LENGTH bytes at OFFSET, or raise for a truncated file."""
        data = _pread_exact(self.fd, offset, length, self.path)
        if len(data) < length:
            raise _truncated(self.path, what, offset, offset + length, self.file_size)
        return data

    def l1_entries(self) -> Iterator[int]:
        """Yield the L1 entries that cover the virtual size, one cluster of them at a time."""
        header = self.header
        per_chunk = header.cluster_size // 8
        remaining = header.l1_entries_needed
        offset = header.l1_table_offset
        while remaining:
            count = min(per_chunk, remaining)
            yield from struct.unpack(f">{count}Q", self.read(offset, count * 8, "the L1 table"))
            remaining -= count
            offset += count * 8

    def l2_table(self, l1_entry: int) -> tuple[int, ...]:
        offset = l1_entry & HOST_OFFSET_MASK
        self._check_aligned(offset, "an L2 table")
        count = self.header.cluster_size // 8
        table = self.read(offset, self.header.cluster_size, "an L2 table")
        return struct.unpack(f">{count}Q", table)

    def standard_data(self, entry: int, start: int, length: int) -> bytes:
        """Read LENGTH bytes from START within the host cluster of standard descriptor ENTRY."""
        offset = entry & HOST_OFFSET_MASK
        self._check_aligned(offset, "a data cluster")
        # NOTE: QEMU reads the part of a data cluster past the end of the file
        # as zeros. This raises instead, because a cut-off download is the
        # likelier cause; loosen it if a real image ever ends inside a cluster.
        return self.read(offset + start, length, "a data cluster")

    def compressed_data(self, entry: int) -> bytes:
        """Decompress the cluster that compressed descriptor ENTRY points to."""
        cluster_bits = self.header.cluster_bits
        # Compressed cluster descriptor, x = 62 - (cluster_bits - 8): bits
        # 0..x-1 hold the host offset, bits x..61 the number of 512-byte
        # sectors used beyond the one that contains the offset.
        x = 62 - (cluster_bits - 8)
        offset = entry & ((1 << x) - 1)
        extra_sectors = (entry >> x) & ((1 << (62 - x)) - 1)
        length = (extra_sectors + 1) * SECTOR_SIZE - offset % SECTOR_SIZE

        # The length is an upper bound: the data of the last compressed
        # cluster may end before its last sector does, and so may the file.
        available = self.file_size - offset
        if available <= 0:
            raise _truncated(
                self.path, "a compressed cluster", offset, offset + length, self.file_size
            )
        data = self.read(offset, min(length, available), "a compressed cluster")

        cluster = self._decompress(data)
        if len(cluster) != self.header.cluster_size:
            if length > available:
                raise _truncated(
                    self.path, "a compressed cluster", offset, offset + length, self.file_size
                )
            raise _invalid(
                self.path,
                f"the compressed cluster at offset {offset} decodes to {len(cluster)} "
                f"bytes instead of {self.header.cluster_size}",
            )
        return cluster

    def _decompress(self, data: bytes) -> bytes:
        """Decode one cluster from DATA, ignoring whatever follows it (the next cluster's data)."""
        size = self.header.cluster_size
        if self.zstd is None:
            # Raw deflate (RFC 1951) without a zlib header. QEMU compresses
            # with 4 KiB windows (wbits -12), and decoding with the largest
            # window reads those and any other deflate stream.
            try:
                return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, size)
            except zlib.error as error:
                raise self._undecodable(error) from error

        # QEMU decodes zstd frames one after another until a cluster is complete.
        reader = self.zstd.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        chunks: list[bytes] = []
        remaining = size
        try:
            while remaining:
                chunk = reader.read(remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        except self.zstd.ZstdError as error:
            raise self._undecodable(error) from error
        return b"".join(chunks)

    def _undecodable(self, error: Exception) -> HkpodError:
        return _invalid(self.path, f"a compressed cluster cannot be decoded ({error})")

    def _check_aligned(self, offset: int, what: str) -> None:
        if offset % self.header.cluster_size:
            raise _invalid(self.path, f"{what} at offset {offset} is not cluster-aligned")


def _iter_guest_data(source: _Source) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield (guest offset, length, data) in guest order, where None data means zeros."""
    header = source.header
    span = header.l2_entries * header.cluster_size

    for l1_index, l1_entry in enumerate(source.l1_entries()):
        start = l1_index * span
        if not l1_entry & HOST_OFFSET_MASK:
            yield start, min(span, header.virtual_size - start), None
            continue

        table = source.l2_table(l1_entry)
        for l2_index in range(header.l2_entries):
            offset = start + l2_index * header.cluster_size
            if offset >= header.virtual_size:
                return
            length = min(header.cluster_size, header.virtual_size - offset)
            if header.extended_l2:
                entry, bitmap = table[2 * l2_index], table[2 * l2_index + 1]
                yield from _extended_cluster(source, offset, length, entry, bitmap)
            else:
                yield offset, length, _cluster(source, offset, length, table[l2_index])


def _cluster(source: _Source, offset: int, length: int, entry: int) -> bytes | None:
    """Return the guest data of one cluster with a standard L2 entry, or None for zeros."""
    if entry & L2_COMPRESSED:
        return source.compressed_data(entry)[:length]
    if entry & L2_ZERO:
        # Version 2 has no zero flag, and QEMU reports the bit there as corruption.
        if source.header.version < 3:
            raise _invalid(
                source.path,
                f"the L2 entry for guest offset {offset} sets the zero flag, which version 2 lacks",
            )
        return None
    if not entry & HOST_OFFSET_MASK:
        return None
    return source.standard_data(entry, 0, length)


def _extended_cluster(
    source: _Source, offset: int, length: int, entry: int, bitmap: int
) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield the subclusters of one guest cluster described by an extended L2 entry."""
    if entry & L2_COMPRESSED:
        # Compressed clusters have no subclusters, and their bitmap is reserved.
        yield offset, length, source.compressed_data(entry)[:length]
        return

    allocated = bitmap & 0xFFFF_FFFF
    zero = bitmap >> 32
    if allocated & zero:
        raise _invalid(
            source.path,
            f"the L2 entry for guest offset {offset} marks subclusters both allocated and zero",
        )
    if not allocated:
        yield offset, length, None
        return
    if not entry & HOST_OFFSET_MASK:
        raise _invalid(
            source.path,
            f"the L2 entry for guest offset {offset} has allocated subclusters but no host offset",
        )

    # Read each run of allocated subclusters on its own: QEMU leaves the
    # unallocated tail of the last cluster out of the file.
    subcluster_size = source.header.cluster_size // SUBCLUSTERS_PER_CLUSTER
    run_start = 0
    while run_start < length:
        is_allocated = allocated >> (run_start // subcluster_size) & 1
        run_end = run_start + subcluster_size
        while run_end < length and allocated >> (run_end // subcluster_size) & 1 == is_allocated:
            run_end += subcluster_size
        run_end = min(run_end, length)

        # Unallocated subclusters read as zeros, because hkpod rejects backing files.
        data = None
        if is_allocated:
            data = source.standard_data(entry, run_start, run_end - run_start)
        yield offset + run_start, run_end - run_start, data
        run_start = run_end


def _copy_extents(source: _Source, fd: int, progress: ProgressCallback | None) -> None:
    total = source.header.virtual_size
    reported = 0
    done = 0
    written = 0
    for offset, length, data in _iter_guest_data(source):
        if data is not None:
            written += _write_sparse(fd, offset, data)
        done = offset + length
        if progress is not None and done - reported >= PROGRESS_INTERVAL:
            progress(done, total)
            reported = done

    if progress is not None:
        progress(total, total)
    LOG.debug("wrote %d of %d guest bytes; the rest are holes", written, total)


def _write_sparse(fd: int, offset: int, data: bytes) -> int:
    """Write the parts of DATA that are not zero at OFFSET, leaving holes for zero blocks.

    Blocks are aligned to guest offsets, so holes line up with the output
    file's blocks. Returns the number of bytes written.
    """
    written = 0
    run_start: int | None = None
    position = 0
    end = len(data)
    while position < end:
        absolute = offset + position
        next_boundary = absolute - absolute % SPARSE_BLOCK_SIZE + SPARSE_BLOCK_SIZE
        block_end = min(end, next_boundary - offset)
        is_zero = data[position:block_end] == ZERO_BLOCK[: block_end - position]
        if is_zero and run_start is not None:
            written += _pwrite_all(fd, data[run_start:position], offset + run_start)
            run_start = None
        elif not is_zero and run_start is None:
            run_start = position
        position = block_end

    if run_start is not None:
        written += _pwrite_all(fd, data[run_start:end], offset + run_start)
    return written


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count
    return len(data)


def _pread_exact(fd: int, offset: int, length: int, path: Path) -> bytes:
    """Read LENGTH bytes at OFFSET, or fewer only where the file ends first."""
    chunks: list[bytes] = []
    try:
        while length:
            chunk = os.pread(fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
    except OSError as error:
        raise HkpodError(f"failed to read disk image {path}: {error.strerror}") from error
    return b"".join(chunks)


def _write_atomically(dest: Path, size: int, fill: Callable[[int], None]) -> None:
    """Create DEST with SIZE bytes through FILL(fd), via a temporary file renamed into place.

    On any failure the temporary file is removed and DEST is left as it was.
    """
    try:
        fd, temporary = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as error:
        raise HkpodError(f"failed to create {dest}: {error.strerror}") from error

    try:
        try:
            fill(fd)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, dest)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise HkpodError(f"failed to write {dest}: {error.strerror}") from error
        raise

    fsync_directory(dest.parent)


def _truncated(path: Path, what: str, start: int, end: int, file_size: int) -> HkpodError:
    return HkpodError(
        f"{path} is truncated: {what} at bytes {start}..{end} lies beyond "
        f"its end at {file_size} bytes",
        "download or copy it again",
    )


def _invalid(path: Path, detail: str) -> HkpodError:
    return HkpodError(f"{path} is not a valid qcow2 image: {detail}", CHECK_HINT)
