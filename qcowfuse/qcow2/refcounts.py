"""Refcount table and refcount blocks (docs/interop/qcow2.rst, "Host cluster management").

The refcount of host cluster `c` lives in refcount block `c // entries_per_block`,
at index `c % entries_per_block`; the refcount table holds the block offsets.

Invariant this module exists to keep (OpenBSD vmd broke it): every cluster that
metadata points at, including each refcount block and the refcount table
itself, has a refcount of at least 1.  New blocks are allocated lazily; a block
that lands inside the range it describes records its own refcount, otherwise the
block covering it is incremented first (allocated itself if needed).  When the
table is full it moves to a larger place at the end of the file together with
the blocks needed to describe it (QEMU's qcow2_refcount_area).

Changes are kept in memory until `flush()`, which writes blocks, syncs, then
writes table entries and syncs: a reference never reaches disk before the
refcount that accounts for it (callers flush this before their own tables).
"""

from __future__ import annotations

import array
import struct
from collections import OrderedDict

from ..errors import CorruptError, FormatError
from ..hostfile import HostFile
from .format import REFT_OFFSET_MASK, RefblockCodec
from .header import MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE, Header
from .lru import evict_clean

class RefcountStore:
    """Reads and changes refcounts, allocating blocks and growing the table as needed."""

    def __init__(self, f: HostFile, header: Header, block_cache_bytes: int = 16 << 20) -> None:
        self.f = f
        self.header = header
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.codec = RefblockCodec(header.cluster_size, header.refcount_order)
        self.entries_per_block = self.codec.entries
        raw = f.pread(header.refcount_table_offset, header.refcount_table_clusters * self.cluster_size)
        n = len(raw) // 8
        self.table: list[int] = [e & REFT_OFFSET_MASK for e in struct.unpack(f">{n}Q", raw)]
        self.dirty_table: set[int] = set()
        self.blocks: OrderedDict[int, array.array[int]] = OrderedDict()  # block index -> values
        self.dirty_blocks: set[int] = set()
        self.max_cached_blocks = max(8, block_cache_bytes // self.cluster_size)
        # Lowest cluster index that may be free; nothing below it has refcount 0.
        self.free_hint = 0
        # Bumped whenever this module allocates a cluster for its own metadata, so an
        # allocator can tell its candidate range may have been taken meanwhile.
        self.generation = 0

    # -- reading ------------------------------------------------------------

    def block(self, b: int) -> array.array[int] | None:
        """Values of refcount block `b`, or None if the table has no block for it."""
        values = self.blocks.get(b)
        if values is not None:
            self.blocks.move_to_end(b)
            return values
        if b >= len(self.table) or not self.table[b]:
            return None
        off = self.table[b]
        if off % self.cluster_size:
            raise CorruptError(f"refcount block {b} at unaligned offset {off:#x}")
        values = self.codec.decode(self.f.pread(off, self.cluster_size))
        self.blocks[b] = values
        self._evict()
        return values

    def _evict(self) -> None:
        evict_clean(self.blocks, self.dirty_blocks, self.max_cached_blocks)

    def get(self, cluster: int) -> int:
        b, i = divmod(cluster, self.entries_per_block)
        values = self.block(b)
        return values[i] if values is not None else 0

    def next_free(self, start: int) -> int:
        """First cluster index >= start whose refcount is 0."""
        epb = self.entries_per_block
        c = start
        while True:
            b, i = divmod(c, epb)
            values = self.block(b)
            if values is None:
                return c
            try:
                return b * epb + values.index(0, i)
            except ValueError:
                c = (b + 1) * epb

    def last_used(self, below: int) -> int:
        """Index of the last cluster below `below` with a non-zero refcount, or -1
        (QEMU's qcow2_get_last_cluster); block-wise, from the end."""
        epb = self.entries_per_block
        for b in range(min(len(self.table), -(-below // epb)) - 1, -1, -1):
            values = self.block(b)
            if values is None:
                continue
            used = values[:min(epb, below - b * epb)].tobytes().rstrip(b"\0")
            if used:
                return b * epb + (len(used) - 1) // values.itemsize
        return -1

    def drop_unused_blocks(self) -> list[tuple[int, bool]]:
        """Forget every refcount block that counts nothing but perhaps its own cluster
        (QEMU's qcow2_shrink_reftable).  Their table entries become zero (dirty); each
        returns as (cluster, counted elsewhere): free once its entry is zero on disk,
        by a refcount drop in the block that counts it if that is another one."""
        epb, cb = self.entries_per_block, self.cluster_bits
        dropped = []
        for b, off in enumerate(self.table):
            if not off:
                continue
            values = self.block(b)
            assert values is not None  # the table names a block for b
            c = off >> cb
            own = c // epb == b
            used = len(values) - values.count(0)
            if used > (1 if own and values[c % epb] else 0):
                continue
            self.table[b] = 0
            self.dirty_table.add(b)
            self.blocks.pop(b, None)
            self.dirty_blocks.discard(b)
            self.generation += 1
            if own:
                self.free_hint = min(self.free_hint, c)
            dropped.append((c, not own))
        return dropped

    def free_run(self, count: int, start: int | None = None) -> int:
        """First cluster index of `count` consecutive free clusters (block-wise scan,
        so even hostile refcounts cost one pass over the blocks, not one per cluster)."""
        epb = self.entries_per_block
        c = self.next_free(self.free_hint if start is None else start)
        while True:
            k, end = c, c + count
            while k < end:
                b, i = divmod(k, epb)
                values = self.block(b)
                if values is None:  # no block: all free
                    k = (b + 1) * epb
                    continue
                j = min(epb, i + end - k)
                used = values[i:j].tobytes().rstrip(b"\0")
                if used:  # restart after the last used cluster of this stretch
                    c = self.next_free(b * epb + i + (len(used) - 1) // values.itemsize + 1)
                    break
                k = b * epb + j
            else:
                return c

    # -- changing -----------------------------------------------------------

    def add(self, cluster: int, delta: int) -> int:
        """Change a refcount by delta; allocates the covering block if needed."""
        b, i = divmod(cluster, self.entries_per_block)
        values = self.ensure_block(b)
        new = values[i] + delta
        if new < 0 or new > self.codec.max_value:
            raise CorruptError(
                f"refcount of cluster {cluster} would become {new} "
                f"(allowed 0..{self.codec.max_value})")
        values[i] = new
        self.dirty_blocks.add(b)
        if new == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return new

    def free_count(self, start: int, want: int) -> int:
        """How many consecutive clusters from `start` (free itself) are free, at most
        `want`: a block-wise look instead of one get() per cluster."""
        epb = self.entries_per_block
        c, end = start + 1, start + want
        while c < end:
            b, i = divmod(c, epb)
            values = self.block(b)
            j = min(epb, i + end - c)
            if values is not None:
                segment = values[i:j]
                if any(segment):
                    return c - start + next(k for k, v in enumerate(segment) if v)
            c += j - i
        return want

    def count_new(self, first: int, count: int) -> None:
        """add(c, 1) for `count` clusters from `first`, all free (refcount 0) and with
        their blocks in place: one block lookup per block, not per cluster."""
        epb = self.entries_per_block
        c, end = first, first + count
        while c < end:
            b, i = divmod(c, epb)
            values = self.ensure_block(b)
            j = min(epb, i + end - c)
            for k in range(i, j):
                if values[k]:
                    raise CorruptError(f"cluster {b * epb + k} is not free (refcount {values[k]})")
                values[k] = 1
            self.dirty_blocks.add(b)
            c += j - i

    def take_free_hint(self) -> int:
        """Count the cluster at free_hint when it is free and its block is cached (the
        usual allocation, at the end of the used space): what `add(next_free(hint), 1)`
        does then, without the scan; its index, or -1 to take the general way."""
        c = self.free_hint
        b, i = divmod(c, self.entries_per_block)
        values = self.blocks.get(b)
        if values is None or values[i]:
            return -1
        values[i] = 1
        self.dirty_blocks.add(b)
        self.free_hint = c + 1
        return c

    def ensure_block(self, b: int) -> array.array[int]:
        """Values of block `b`, allocating it (and growing the table) if it does not exist."""
        while True:
            values = self.block(b)
            if values is not None:
                return values
            if b >= len(self.table):
                self._grow_table(b + 1)
            else:
                self._new_block(b)

    def _new_block(self, b: int) -> None:
        """Try once to allocate a cluster for block `b`; the caller loops until it exists."""
        x = self.next_free(self.free_hint)
        bx = x // self.entries_per_block
        values = self.codec.zeros()
        if bx == b:
            values[x % self.entries_per_block] = 1  # the block describes itself
        elif self.block(bx) is None:
            # x is described by a block that does not exist yet: create that one first
            # (it may well take x itself), then let the caller try again.
            self.ensure_block(bx)
            return
        else:
            self.add(x, 1)
        self._install_block(b, x, values)

    def _install_block(self, b: int, cluster: int, values: array.array[int]) -> None:
        self.table[b] = cluster * self.cluster_size
        self.dirty_table.add(b)
        self.blocks[b] = values
        self.dirty_blocks.add(b)
        self.generation += 1
        if cluster == self.free_hint:
            self.free_hint = cluster + 1

    def _blocks_missing(self, first: int, count: int, table_len: int) -> list[int]:
        epb = self.entries_per_block
        return [b for b in range(first // epb, (first + count - 1) // epb + 1)
                if b >= table_len or not self.table[b]]

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger, self-describing area (crash safe).

        Layout of the new area: [new table][refcount blocks for the area].  Every
        cluster of the area is counted before the header switches to it; the old
        table's clusters are released only once the switch is on disk.
        """
        cs = self.cluster_size
        per_cluster = cs // 8
        entries = max(min_entries, len(self.table) * 3 // 2 + 1)
        nblocks = 0
        while True:
            table_clusters = -(-entries // per_cluster)
            if table_clusters * cs > MAX_REFTABLE_BYTES:
                raise FormatError("refcount table would exceed its maximum size (image too large)")
            start = self.free_run(table_clusters + nblocks)
            missing = self._blocks_missing(start, table_clusters + nblocks, len(self.table))
            if missing and missing[-1] >= table_clusters * per_cluster:
                entries = missing[-1] + 1
                continue
            if len(missing) > nblocks:
                nblocks = len(missing)
                continue
            # Fewer blocks needed than reserved: shrink the area in place.  The smaller
            # area needs a subset of the blocks, so this settles with none left over.
            while len(missing) < nblocks:
                nblocks = len(missing)
                missing = self._blocks_missing(start, table_clusters + nblocks, len(self.table))
            break
        epb = self.entries_per_block
        new_table = self.table + [0] * (table_clusters * per_cluster - len(self.table))
        new_blocks = {b: self.codec.zeros() for b in missing}
        for j, b in enumerate(missing):
            new_table[b] = (start + table_clusters + j) * cs
        for c in range(start, start + table_clusters + nblocks):
            b, i = divmod(c, epb)
            if b in new_blocks:
                new_blocks[b][i] += 1
            else:
                self.add(c, 1)  # an existing block; if the switch fails this is only a leak
        # Blocks first, then the table, then the header: each durable before the next.
        # Nothing in memory refers to the new area until the header switch is on disk,
        # so an I/O error (ENOSPC) on the way leaves the old table fully in charge.
        for b, values in new_blocks.items():
            self.f.pwrite(new_table[b], self.codec.encode(values))
        self._write_blocks()
        self.f.sync()
        self.f.pwrite(start * cs, struct.pack(f">{len(new_table)}Q", *new_table))
        self.f.sync()
        self.f.pwrite(OFF_REFCOUNT_TABLE, struct.pack(">QI", start * cs, table_clusters))
        self.f.sync()
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.header.refcount_table_offset = start * cs
        self.header.refcount_table_clusters = table_clusters
        self.table = new_table
        self.dirty_table.clear()
        for b, values in new_blocks.items():
            self.blocks[b] = values
        self.generation += 1
        if self.free_hint >= start:
            self.free_hint = start + table_clusters + nblocks
        for c in range(old_offset // cs, old_offset // cs + old_clusters):
            self.add(c, -1)

    # -- persistence --------------------------------------------------------

    def _write_blocks(self) -> bool:
        for b in sorted(self.dirty_blocks):
            self.f.pwrite(self.table[b], self.codec.encode(self.blocks[b]))
        wrote = bool(self.dirty_blocks)
        self.dirty_blocks.clear()
        return wrote

    def flush(self) -> None:
        """Blocks, sync, table entries, sync: only what changed, nothing when clean."""
        if self._write_blocks():
            self.f.sync()
        # A new block's own refcount may live in another new block; its table entry
        # must not reach disk first (a torn or reordered crash would leave a reachable
        # block with refcount 0).  Write entries in waves, covering blocks first.
        base = self.header.refcount_table_offset
        assert len(self.table) * 8 == self.header.refcount_table_clusters * self.cluster_size
        while self.dirty_table:
            wave = [b for b in sorted(self.dirty_table)
                    if self._covering_block(b) == b or self._covering_block(b) not in self.dirty_table]
            for b in wave:
                self.f.pwrite(base + 8 * b, struct.pack(">Q", self.table[b]))
            self.dirty_table.difference_update(wave)
            self.f.sync()
        self._evict()

    def _covering_block(self, b: int) -> int:
        """Index of the block holding the refcount of block b's own cluster."""
        return (self.table[b] >> self.cluster_bits) // self.entries_per_block

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks or self.dirty_table)
