"""Whole-table scans at C speed: L1/L2 tables and refcount blocks as numpy arrays.

`check`, its repairs, `map`, `info` and the dirty-image rebuild all read the
metadata through this module, so an image's tables are walked one way, once:

- `TableReader` reads many tables into one buffer per batch (one pread each,
  bytes past the end of the file read as zeros, as QEMU's block layer does);
- `l2_entries` keeps only the non-zero entries of a batch (an empty or sparse
  table costs one comparison per entry, in C), decoded to host order; extended
  L2 entries (docs/interop/qcow2.rst, "Extended L2 Entries") come with their
  subcluster bitmap;
- `decode_refblock` / `encode_refblock` convert a refcount block for every
  refcount width 1..64 (sub-byte widths: entry 0 in the least significant bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CorruptError
from ..hostfile import HostFile

# docs/interop/qcow2.rst: L1 entry bits 0-8 and 56-62 are reserved (must be 0).
L1E_RESERVED_MASK = 0x7F000000000001FF
# Standard cluster descriptor: bits 1-8 and 56-61 reserved (bit 0 is the zero flag).
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
# Refcount table entry: bits 0-8 reserved.
REFT_RESERVED_MASK = 0x1FF
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK == L2E_OFFSET_MASK
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
# Extended L2 bitmap: bits 0-31 "allocated", bits 32-63 "reads as zeros", one per subcluster.
BITMAP_ALL_ALLOC = 0xFFFFFFFF
SUBCLUSTERS = 32

U64 = np.uint64
BE64 = np.dtype(">u8")

Progress = Callable[[float], None]


def u64(value: int) -> np.uint64:
    return np.uint64(value)


class TableReader:
    """Reads tables of `table_bytes` each at arbitrary host offsets, a batch at a time,
    into one reused buffer (bounded memory: `batch_bytes`)."""

    def __init__(self, f: HostFile, table_bytes: int, batch_bytes: int = 1 << 20) -> None:
        self.f = f
        self.table_bytes = table_bytes
        self.per_batch = max(1, batch_bytes // table_bytes)
        self._buf = bytearray(self.per_batch * table_bytes)

    def read(self, offsets: Sequence[int]) -> np.ndarray:
        """(len(offsets), table_bytes // 8) big-endian words; valid until the next call."""
        n, tb = len(offsets), self.table_bytes
        assert n <= self.per_batch
        view = memoryview(self._buf)
        for i, off in enumerate(offsets):
            dest = view[i * tb:(i + 1) * tb]
            try:
                self.f.pread_into(int(off), dest)
            except CorruptError:  # runs past the end of the file: the rest reads as zeros
                data = self.f.pread_upto(int(off), tb)
                dest[:len(data)] = data
                dest[len(data):] = bytes(tb - len(data))
        return np.frombuffer(self._buf, dtype=BE64, count=n * tb // 8).reshape(n, tb // 8)

    def batches(self, offsets: Sequence[int], progress: Progress | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first table, its batch) for all tables, in order."""
        total = len(offsets)
        for start in range(0, total, self.per_batch):
            if progress:
                progress(start / max(1, total))
            yield start, self.read(offsets[start:start + self.per_batch])


def read_words(f: HostFile, offset: int, count: int) -> np.ndarray:
    """`count` big-endian u64 words at offset, in host order (zeros past the end of the file)."""
    if count <= 0:
        return np.zeros(0, U64)
    data = f.pread_upto(offset, count * 8)
    out = np.zeros(count, U64)
    out[:len(data) // 8] = np.frombuffer(data, dtype=BE64, count=len(data) // 8)
    return out


@dataclass
class L2Entries:
    """The non-zero entries of a batch of L2 tables (zero entries are unallocated)."""
    row: np.ndarray     # which table of the batch
    col: np.ndarray     # entry index inside its table
    entry: np.ndarray   # the cluster descriptor (u64, host order)
    bitmap: np.ndarray  # extended L2: the subcluster bitmap; standard L2: zeros

    def __len__(self) -> int:
        return len(self.entry)

    def take(self, mask: np.ndarray) -> "L2Entries":
        return L2Entries(self.row[mask], self.col[mask], self.entry[mask], self.bitmap[mask])


def l2_entries(batch: np.ndarray, extended: bool) -> L2Entries:
    """Decode only what is there: zero is zero in either byte order."""
    per_row = batch.shape[1] // (2 if extended else 1)  # a power of two
    shift = per_row.bit_length() - 1
    if extended:
        pairs = batch.reshape(-1, 2)
        native = pairs.view(U64)
        at = np.flatnonzero((native[:, 0] != 0) | (native[:, 1] != 0))
        row, col = at >> shift, at & (per_row - 1)
        if len(at) == len(pairs):  # fully allocated tables: a strided copy, no gather
            return L2Entries(row, col, pairs[:, 0].astype(U64), pairs[:, 1].astype(U64))
        return L2Entries(row, col, pairs[at, 0].astype(U64), pairs[at, 1].astype(U64))
    flat = batch.reshape(-1)
    at = np.flatnonzero(flat.view(U64) != 0)
    row, col = at >> shift, at & (per_row - 1)
    entry = (flat if len(at) == len(flat) else flat[at]).astype(U64)
    return L2Entries(row, col, entry, np.zeros(len(entry), U64))


# -- L2 entry kinds, as the reader and `map` see them --------------------------------

KIND_UNALLOCATED = 0
KIND_ZERO = 1        # zero flag, no host cluster
KIND_ZERO_ALLOC = 2  # zero flag with a preallocated host cluster
KIND_NORMAL = 3
KIND_COMPRESSED = 4


def standard_kinds(entry: np.ndarray, version: int) -> np.ndarray:
    """tables.classify for a whole array of standard descriptors."""
    kinds = np.full(len(entry), KIND_UNALLOCATED, np.uint8)
    has_offset = (entry & u64(OFFSET_MASK)) != 0
    kinds[has_offset] = KIND_NORMAL
    if version >= 3:
        zero = (entry & u64(OFLAG_ZERO)) != 0
        kinds[zero] = np.where(has_offset[zero], KIND_ZERO_ALLOC, KIND_ZERO)
    kinds[(entry & u64(OFLAG_COMPRESSED)) != 0] = KIND_COMPRESSED
    return kinds


def compressed_ranges(entry: np.ndarray, cluster_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(host byte offset, byte length) of compressed descriptors (spec: "Compressed
    Clusters Descriptor"; the length counts from the offset to the end of its last sector)."""
    x = 62 - (cluster_bits - 8)
    offset = entry & u64((1 << x) - 1)
    sectors = ((entry >> u64(x)) & u64((1 << (cluster_bits - 8)) - 1)) + u64(1)
    return offset, sectors * u64(512) - (offset & u64(511))


# -- refcount blocks ------------------------------------------------------------------

_WIDE = {8: np.dtype(">u1"), 16: np.dtype(">u2"), 32: np.dtype(">u4"), 64: np.dtype(">u8")}


def decode_refblock(data: bytes, refcount_order: int) -> np.ndarray:
    """Refcounts of one block, host order (uint8 for widths up to 8 bits)."""
    bits = 1 << refcount_order
    if bits >= 8:
        return np.frombuffer(data, dtype=_WIDE[bits]).astype(_WIDE[bits].newbyteorder("="))
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 1:
        return np.unpackbits(raw, bitorder="little")
    per = 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(len(raw) * per)


def encode_refblock(values: np.ndarray, refcount_order: int) -> bytes:
    bits = 1 << refcount_order
    if bits >= 8:
        return np.asarray(values).astype(_WIDE[bits]).tobytes()
    v = np.asarray(values, dtype=np.uint8)
    if bits == 1:
        return np.packbits(v, bitorder="little").tobytes()
    per = 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return np.bitwise_or.reduce(v.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes()
