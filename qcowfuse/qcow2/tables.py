"""The L2 table cache, and the last host cluster an L2 table maps.

Tables are kept decoded as host-endian `array('Q')` (format.decode_table); they
are byte-swapped only when read from or written to the image.
"""

from __future__ import annotations

import array
import struct
from collections import OrderedDict

from ..errors import CorruptError
from ..hostfile import HostFile
from .format import (
    L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, SECTOR, compressed_fields, decode_table, encode_table)
from .lru import evict_clean

# bytes.translate table: 1 where an entry's top byte (bits 56-63) has the compressed flag
_COMPRESSED_TOP = bytes(1 if b & (QCOW_OFLAG_COMPRESSED >> 56) else 0 for b in range(256))


def last_mapped_cluster(raw: bytes, cluster_bits: int, extended: bool) -> int:
    """Highest host cluster the L2 table `raw` (big-endian, as on disk) maps: data,
    preallocated zeros, or the last sector of compressed data; -1 if none.  Without
    numpy: a table without compressed entries costs bytes slicing and max, in C."""
    stride = 16 if extended else 8  # extended: descriptor, then the subcluster bitmap
    if 1 not in raw[0::stride].translate(_COMPRESSED_TOP):
        plain = bytearray(raw)
        plain[0::8] = bytes(len(raw) // 8)  # without bits 56-63 (flags) what is left is the offset
        t = decode_table(plain)
        top = max(t[0::2] if extended else t, default=0) & L2E_OFFSET_MASK
        return top >> cluster_bits if top else -1
    entries = struct.unpack(f">{len(raw) // 8}Q", raw)[0::stride // 8]
    top = max((e & L2E_OFFSET_MASK for e in entries if not e & QCOW_OFLAG_COMPRESSED), default=0)
    # compressed data ends in the last sector its descriptor counts, from the offset's own
    x, omask, smask = compressed_fields(cluster_bits)
    end = max(((e & omask) // SECTOR) + ((e >> x) & smask) + 1 for e in entries if e & QCOW_OFLAG_COMPRESSED)
    last: int = max(top >> cluster_bits if top else -1, (end * SECTOR - 1) >> cluster_bits)
    return last


class L2Cache:
    """LRU cache of L2 tables keyed by host offset; dirty tables stay until written.

    Scan resistant (a simplified 2Q): a table read for the first time waits on a short
    probation list and takes a place in the cache proper only when it is used again,
    while on probation or soon after (its offset is remembered a while, "ghost").  A
    pass over a big image that touches each table once (a backup, a read of every GiB)
    then costs a few tables of memory instead of the whole budget, and evicts nothing
    that is in real use; a table in use is admitted on its second touch.

    The most recently used table is remembered apart: a hit on it (most requests, as
    they come in runs) needs no LRU bookkeeping, since it is already last in the order."""

    PROBATION = 8  # tables read once, kept until PROBATION newer first reads push them out

    def __init__(self, f: HostFile, cluster_size: int, max_bytes: int) -> None:
        self.f = f
        self.cluster_size = cluster_size
        self.max_tables = max(4, max_bytes // cluster_size)
        self.tables: OrderedDict[int, array.array[int]] = OrderedDict()
        self.dirty: set[int] = set()
        self._probation: OrderedDict[int, None] = OrderedDict()  # in tables, read once so far
        self._ghosts: OrderedDict[int, None] = OrderedDict()  # offsets pushed out of probation
        # the most recently used table, public so that a hot path can test it inline
        self.mru_offset = 0  # 0: none (no L2 table lives at offset 0, the header does)
        self.mru: array.array[int] | None = None

    def peek(self, offset: int) -> array.array[int] | None:
        """The table at offset if cached (counts as a use), else None; never reads."""
        if offset == self.mru_offset:
            return self.mru
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
            self._probation.pop(offset, None)  # used again: a table in real use
            self.mru_offset, self.mru = offset, t
        return t

    def get(self, offset: int) -> array.array[int]:
        t = self.peek(offset) if offset else None
        if t is not None:
            return t
        if offset % self.cluster_size:
            raise CorruptError(f"L2 table at unaligned offset {offset:#x}")
        t = decode_table(self.f.pread(offset, self.cluster_size))
        self.tables[offset] = t
        self.mru_offset, self.mru = offset, t
        if offset in self._ghosts:  # read again soon after probation: into the cache proper
            del self._ghosts[offset]
        else:
            self._probation[offset] = None
        self._evict()
        return t

    def install(self, offset: int, table: array.array[int]) -> None:
        """A table that exists only in memory so far (new or copied on write)."""
        self.tables[offset] = table
        self.dirty.add(offset)
        self.mru_offset, self.mru = offset, table
        self._evict()  # clean tables beyond the budget make room, as for a table read

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)
        self._probation.pop(offset, None)
        if offset == self.mru_offset:
            self.mru_offset, self.mru = 0, None

    @property
    def over_budget(self) -> bool:
        return len(self.tables) > self.max_tables and len(self.dirty) > self.max_tables // 2

    def _evict(self) -> None:
        probation = self._probation
        if len(probation) > self.PROBATION:
            for off in list(probation)[:-1]:  # oldest first; dirty ones wait for a flush
                if len(probation) <= self.PROBATION:
                    break
                if off not in self.dirty:
                    del probation[off], self.tables[off]
                    self._ghosts[off] = None
            while len(self._ghosts) > self.max_tables:
                self._ghosts.popitem(last=False)
        evict_clean(self.tables, self.dirty, self.max_tables)
        for off in [o for o in probation if o not in self.tables]:
            del probation[off]
        if self.mru_offset and self.mru_offset not in self.tables:
            self.mru_offset, self.mru = 0, None

    def write_dirty(self) -> bool:
        for off in sorted(self.dirty):
            self.f.pwrite(off, encode_table(self.tables[off]))
        wrote = bool(self.dirty)
        self.dirty.clear()
        self._evict()
        return wrote
