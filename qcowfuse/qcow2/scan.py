"""Whole-table scans at C speed: L1/L2 tables and refcount blocks as numpy arrays.

`check`, its repairs, `map`, `info` and the dirty-image rebuild all read the
metadata through this module, so an image's tables are walked one way, once:

- `TableReader` reads many tables into one buffer per batch (one pread each,
  bytes past the end of the file read as zeros, as QEMU's block layer does);
- `l2_entries` keeps only the non-zero entries of a batch (an empty or sparse
  table costs one comparison per entry, in C), decoded to host order; extended
  L2 entries (docs/interop/qcow2.rst, "Extended L2 Entries") come with their
  subcluster bitmap.

What the entries mean, and the numpy codecs for them (entry kinds, compressed
descriptors, refcount blocks), is format.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CorruptError
from ..hostfile import HostFile

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
