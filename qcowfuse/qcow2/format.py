"""The qcow2 on-disk format, spelled once (docs/interop/qcow2.rst).

Every mask, flag and entry kind of the cluster mapping and the refcount
structures, and their codecs, scalar (one entry, `array` tables) and numpy (whole
tables, for scans) side by side.  Header fields live in header.py, bitmap
structures in bitmaps.py.  numpy is imported by the numpy forms only, so a
process that never scans (the daemon's request path) never loads it.
"""

from __future__ import annotations

import array
import enum
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# -- "Cluster mapping": L1 entries ------------------------------------------------------
# bits 9-55 L2 table offset, bit 63 COPIED (refcount exactly 1); 0-8 and 56-62 reserved.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF

# -- "Cluster mapping": standard L2 entries (cluster descriptors) ------------------------
# bit 63 COPIED, bit 62 compressed, bits 9-55 host offset, bit 0 "reads as zeros" (v3);
# bits 1-8 and 56-61 reserved.
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

# -- "Extended L2 Entries": the subcluster bitmap after each descriptor ------------------
# bits 0-31: subcluster allocated; bits 32-63: subcluster reads as zeros.
SUBCLUSTERS = 32
SUBCLUSTER_ZERO_SHIFT = 32
SUBCLUSTER_ALLOC_MASK = (1 << SUBCLUSTERS) - 1
SUBCLUSTER_ZERO_MASK = SUBCLUSTER_ALLOC_MASK << SUBCLUSTER_ZERO_SHIFT

# -- "Host cluster management": refcount table entries -----------------------------------
# bits 9-63 refcount block offset; bits 0-8 reserved.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

SECTOR = 512  # compressed data is counted in 512-byte sectors, LUKS encrypts them


class ClusterType(enum.IntEnum):
    """What a standard L2 entry says of its guest cluster (the numbers are the numpy
    form's, `standard_kinds`)."""
    UNALLOCATED = 0  # read from the backing file, or zeros
    ZERO_PLAIN = 1  # zero flag, no host cluster
    ZERO_ALLOC = 2  # zero flag with a preallocated host cluster
    NORMAL = 3
    COMPRESSED = 4


def plain_data_flags(version: int) -> int:
    """The descriptor bits that make an entry anything but plain data (compressed, and
    from version 3 the zero flag)."""
    return QCOW_OFLAG_COMPRESSED | (QCOW_OFLAG_ZERO if version >= 3 else 0)


def offset_zero_flag(data_file: bool) -> int:
    """The bit that makes host offset 0 a data cluster: with an external data file,
    guest cluster 0 lives at offset 0 there, and COPIED (every data cluster of a data
    file has refcount 1) tells it from "unallocated" (spec, "Standard Cluster
    Descriptor"; QEMU's qcow2_get_cluster_type).  0 without a data file."""
    return QCOW_OFLAG_COPIED if data_file else 0


def classify(entry: int, version: int, data_file: bool) -> ClusterType:
    if entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if version >= 3 and entry & QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if entry & L2E_OFFSET_MASK or entry & offset_zero_flag(data_file):
        return ClusterType.NORMAL
    return ClusterType.UNALLOCATED


def data_at_offset_zero(entry: np.ndarray) -> np.ndarray:
    """numpy form, for an image with a data file: the descriptors of plain data at host
    offset 0 (COPIED alone: see offset_zero_flag)."""
    import numpy as np
    mask = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | L2E_OFFSET_MASK
    return np.asarray((entry & np.uint64(mask)) == np.uint64(QCOW_OFLAG_COPIED))


def standard_kinds(entry: np.ndarray, version: int, data_file: bool) -> np.ndarray:
    """`classify` for a whole array of standard descriptors (uint8 ClusterType values)."""
    import numpy as np
    kinds = np.full(len(entry), ClusterType.UNALLOCATED, np.uint8)
    has_offset = (entry & np.uint64(L2E_OFFSET_MASK)) != 0
    kinds[has_offset] = ClusterType.NORMAL
    if data_file:
        kinds[data_at_offset_zero(entry)] = ClusterType.NORMAL
    if version >= 3:
        zero = (entry & np.uint64(QCOW_OFLAG_ZERO)) != 0
        kinds[zero] = np.where(has_offset[zero], ClusterType.ZERO_ALLOC, ClusterType.ZERO_PLAIN)
    kinds[(entry & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0] = ClusterType.COMPRESSED
    return kinds


# -- subcluster bitmaps ------------------------------------------------------------------

def subclusters_zeroed(touched: int) -> int:
    """The bitmap that makes the subclusters in `touched` (an allocation mask) read as
    zeros and nothing else."""
    return (touched << SUBCLUSTER_ZERO_SHIFT) & SUBCLUSTER_ZERO_MASK


# -- "Compressed Clusters Descriptor" ----------------------------------------------------
# With x = 62 - (cluster_bits - 8): bits 0..x-1 hold the host byte offset of the data,
# bits x..61 the number of additional 512-byte sectors it spans.

def compressed_fields(cluster_bits: int) -> tuple[int, int, int]:
    """(x, offset mask, sector-count mask) of a compressed descriptor."""
    x = 62 - (cluster_bits - 8)
    return x, (1 << x) - 1, (1 << (cluster_bits - 8)) - 1


@dataclass(frozen=True)
class CompressedDescriptor:
    offset: int  # host byte offset of the compressed data (not aligned)
    sectors: int  # number of 512-byte sectors the data may span, counted from offset & ~511

    @classmethod
    def decode(cls, entry: int, cluster_bits: int) -> CompressedDescriptor:
        x, omask, smask = compressed_fields(cluster_bits)
        return cls(entry & omask, ((entry >> x) & smask) + 1)

    @property
    def length(self) -> int:
        """Bytes to read from `offset`."""
        return self.sectors * SECTOR - (self.offset % SECTOR)

    def host_clusters(self, cluster_bits: int) -> range:
        """Host clusters this data occupies; each holds one reference for it."""
        first = self.offset & ~(SECTOR - 1)
        last = first + self.sectors * SECTOR - 1
        return range(first >> cluster_bits, (last >> cluster_bits) + 1)


def compressed_ranges(entry: np.ndarray, cluster_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(host byte offset, byte length) of an array of compressed descriptors: the numpy
    form of CompressedDescriptor's offset and length."""
    import numpy as np
    x, omask, smask = compressed_fields(cluster_bits)
    offset = entry & np.uint64(omask)
    sectors = ((entry >> np.uint64(x)) & np.uint64(smask)) + np.uint64(1)
    return offset, sectors * np.uint64(SECTOR) - (offset & np.uint64(SECTOR - 1))


# -- tables of big-endian u64 entries (L1, L2, refcount table) ---------------------------

_SWAP = sys.byteorder == "little"


def decode_table(data: bytes | bytearray) -> array.array[int]:
    """Big-endian u64 entries -> host-order array('Q')."""
    t = array.array("Q", data)
    if _SWAP:
        t.byteswap()
    return t


def encode_table(t: array.array[int]) -> bytes:
    if not _SWAP:
        return t.tobytes()
    out = array.array("Q", t)
    out.byteswap()
    return out.tobytes()


# -- refcount blocks: 2^refcount_order bits per entry ------------------------------------
# Widths of 8 bits and more are big-endian integers; below 8, entry i sits in byte
# i // (8 / width), entry 0 in the least significant bits.

_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


class RefblockCodec:
    """One refcount block between its on-disk bytes and an array of ints."""

    def __init__(self, cluster_size: int, refcount_order: int) -> None:
        self.bits = 1 << refcount_order
        self.entries = cluster_size * 8 // self.bits
        self.cluster_size = cluster_size
        self.max_value = (1 << self.bits) - 1
        self.per_byte = 1
        self._unpack: list[bytes] = []
        self._pack: list[bytes] = []
        if self.bits >= 8:
            self.typecode = _TYPECODES[self.bits]
            assert array.array(self.typecode).itemsize * 8 == self.bits
        else:
            self.typecode = "B"
            self.per_byte = 8 // self.bits
            mask = self.max_value
            self._unpack = [bytes((b >> (k * self.bits)) & mask for b in range(256))
                            for k in range(self.per_byte)]
            self._pack = [bytes((v << (k * self.bits)) & 0xFF for v in range(256))
                          for k in range(self.per_byte)]

    def zeros(self) -> array.array[int]:
        return array.array(self.typecode, bytes(self.entries * array.array(self.typecode).itemsize))

    def decode(self, data: bytes) -> array.array[int]:
        if self.bits >= 8:
            values = array.array(self.typecode, data)
            if self.bits > 8 and _SWAP:
                values.byteswap()
            return values
        out = bytearray(self.entries)
        for k, table in enumerate(self._unpack):
            out[k::self.per_byte] = data.translate(table)
        return array.array("B", out)

    def encode(self, values: array.array[int]) -> bytes:
        if self.bits >= 8:
            if self.bits == 8 or not _SWAP:
                return values.tobytes()
            swapped = array.array(self.typecode, values)
            swapped.byteswap()
            return swapped.tobytes()
        raw = values.tobytes()
        acc = 0
        for k, table in enumerate(self._pack):
            acc |= int.from_bytes(raw[k::self.per_byte].translate(table), "little")
        return acc.to_bytes(self.cluster_size, "little")


def _wide_dtype(bits: int) -> np.dtype:
    import numpy as np
    return np.dtype(f">u{bits // 8}")


def decode_refblock(data: bytes, refcount_order: int) -> np.ndarray:
    """RefblockCodec.decode for scans: refcounts of one block or of many blocks back to
    back, host order (uint8 for widths up to 8 bits)."""
    import numpy as np
    bits = 1 << refcount_order
    if bits >= 8:
        wide = _wide_dtype(bits)
        return np.frombuffer(data, dtype=wide).astype(wide.newbyteorder("="))
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 1:
        return np.unpackbits(raw, bitorder="little")
    per = 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(len(raw) * per)


def encode_refblock(values: np.ndarray, refcount_order: int) -> bytes:
    """RefblockCodec.encode for scans (the inverse of decode_refblock)."""
    import numpy as np
    bits = 1 << refcount_order
    if bits >= 8:
        return bytes(np.asarray(values).astype(_wide_dtype(bits)).tobytes())
    v = np.asarray(values, dtype=np.uint8)
    if bits == 1:
        return bytes(np.packbits(v, bitorder="little").tobytes())
    per = 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return bytes(np.bitwise_or.reduce(v.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes())
