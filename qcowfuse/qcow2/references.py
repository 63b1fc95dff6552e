"""Recount every reference to every host cluster (QEMU's in-memory refcount table).

One walk over the metadata, in QEMU's order (block/qcow2-refcount.c,
calculate_refcounts): header, active L1 and its L2 tables, snapshot L1 tables
and theirs, the snapshot table, extra ranges (other structures, e.g. bitmaps),
the refcount table, and last the refcount blocks.  Every rule of
docs/interop/qcow2.rst that `qemu-img check` enforces on the way is checked
here, with its wording: reserved bits of L1, L2 and refcount table entries,
alignment of tables and clusters, subcluster bitmaps of extended L2 entries,
references past the end of the file.

Each distinct L2 table is read once however many L1 entries (active and
snapshots) point at it; its references count once per such entry.  Memory:
counts take 4 bytes per host cluster (8 if more than 2^32 references are
counted), COPIED bookkeeping 1 byte, plus one batch of tables (`batch_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .format import (
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
    QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, REFT_OFFSET_MASK,
    REFT_RESERVED_MASK, SUBCLUSTER_ALLOC_MASK, compressed_ranges, data_at_offset_zero,
    subclusters_zeroed)
from .scan import U64, L2Entries, Progress, TableReader, l2_entries, read_words, u64

if TYPE_CHECKING:
    from .state import ImageState

# bits of References.flags, per host cluster
COPIED_REF = 1      # an active L2 entry with COPIED points here
UNCOPIED_REF = 2    # an active L2 entry without COPIED points here
REFCOUNT_ONE = 4    # (set by the compare) the stored refcount is 1
REFCOUNT_UNKNOWN = 8  # (set by the compare) the stored refcount could not be read

BATCH_BYTES = 1 << 20


@dataclass
class WalkStats:
    """What the walk adds to a check report."""
    corruptions: int = 0
    fixed: int = 0
    allocated: int = 0
    fragmented: int = 0
    compressed: int = 0
    messages: list[str] = field(default_factory=list)


@dataclass
class Fix:
    """A repair of one table entry, made only once the walk shows the table is nothing
    but a table (a damaged L1 entry may point an "L2 table" at guest data)."""
    table: int          # host offset of the L1 or L2 table
    table_bytes: int
    pos: int            # host offset of the entry
    data: bytes         # its new value
    message: str        # said when made
    error: str          # said (and counted `times`) when not made
    times: int = 1
    refs: tuple[int, int, int] | None = None  # (offset, size, weight) to count if not made
    l1_index: int | None = None  # active L1 entry to update in memory
    value: int = 0
    in_l2: bool = True


class References:
    """counts[c]: references to host cluster c found in the metadata."""

    def __init__(self, img: ImageState, fix_errors: bool = False, progress: Progress | None = None,
                 extra_ranges: list[tuple[int, int]] | None = None,
                 batch_bytes: int = BATCH_BYTES) -> None:
        self.img = img
        self.f = img.f
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.fix_errors = fix_errors
        self.progress = progress
        self.extra_ranges = extra_ranges or []
        self.batch_bytes = batch_bytes
        self.file_size = self.f.size()
        self.nb_clusters = -(-self.file_size // self.cs)
        self.max_refcount = img.rc.codec.max_value
        # one more slot: a reference may end less than a cluster past the end of the file
        self.counts = np.zeros(self.nb_clusters + 1, np.uint32)
        self.flags = np.zeros(self.nb_clusters + 1, np.uint8)
        self.total = 0  # references counted, to widen counts before they could wrap
        self.copied_outside = False  # an active data reference beyond the counted clusters
        self.stats = WalkStats()
        self.refcount_clusters: list[int] = []  # counted for the refcount table and blocks
        self.rebuild = False
        self.walk_corruptions = 0
        self.fixes: list[Fix] = []
        self.tables = np.zeros(0, np.int64)  # distinct L2 tables, and how many L1 entries name each
        self.table_refs = np.zeros(0, np.int64)

    # -- counting -----------------------------------------------------------------------

    def _error(self, message: str, times: int = 1) -> None:
        self.stats.corruptions += times
        self.stats.messages.append(message)

    def _widen(self, more: int) -> None:
        self.total += more
        if self.total > 0xFFFFFFFF and self.counts.dtype != U64:
            self.counts = self.counts.astype(U64)

    def add_ranges(self, offset: np.ndarray, size: np.ndarray | int,
                   weight: np.ndarray | int | None = None) -> None:
        """Count the clusters of each byte range [offset, offset+size) `weight` times
        (QEMU's qcow2_inc_refcounts_imrt, for many ranges at once)."""
        offset = offset.astype(np.int64)
        size = np.broadcast_to(np.asarray(size, np.int64), offset.shape)
        w = np.ones(len(offset), np.int64) if weight is None else np.broadcast_to(
            np.asarray(weight, np.int64), offset.shape)
        keep = size > 0
        past = keep & (offset + size - self.file_size >= self.cs)
        if past.any():
            for o, s, k in zip(offset[past].tolist(), size[past].tolist(), w[past].tolist()):
                # one line for all the L1 entries that lead here (QEMU prints one for each)
                self._error(f"ERROR: counting reference for region exceeding the end of the file "
                            f"by one cluster or more: offset {o:#x} size {s:#x}"
                            + (f" ({k} times)" if k > 1 else ""), k)
            keep &= ~past
        offset, size, w = offset[keep], size[keep], w[keep]
        if not len(offset):
            return
        first = offset >> self.cb
        span = ((offset + size - 1) >> self.cb) - first
        idx, ws = [first], [w]
        k = 1
        while True:
            more = span >= k
            if not more.any():
                break
            idx.append(first[more] + k)
            ws.append(w[more])
            k += 1
        index = np.concatenate(idx) if len(idx) > 1 else first
        wt = np.concatenate(ws) if len(ws) > 1 else w
        self._widen(int(wt.sum()))
        if wt.min() == wt.max():
            np.add.at(self.counts, index, self.counts.dtype.type(wt[0]))
        else:
            np.add.at(self.counts, index, wt.astype(self.counts.dtype))

    def add_range(self, offset: int, size: int) -> None:
        if size > 0:
            self.add_ranges(np.array([offset], np.int64), np.array([size], np.int64))

    # -- the walk -----------------------------------------------------------------------

    def count(self, include_refcount_structures: bool = True) -> "References":
        img, h = self.img, self.img.header
        self.add_range(0, self.cs)
        l1s = [(h.l1_table_offset, h.l1_size, True)]
        l1s += [(s.l1_table_offset, s.l1_size, False) for s in img.snapshots]
        self._count_tables(l1s)
        self.add_range(h.snapshots_offset, img.snapshot_table_bytes)
        for offset, length in self.extra_ranges:  # other structures (bitmaps): plugged in here
            self.add_range(offset, length)
        self._saturate()
        self.walk_corruptions = self.stats.corruptions  # those a rebuild of refcounts can't fix
        if include_refcount_structures:
            self.count_refcount_structures(h.refcount_table_offset, h.refcount_table_clusters)
        self._apply_fixes()
        return self

    def _exclusive(self, offset: int, length: int, expected: int) -> bool:
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        return last < len(self.counts) and bool((self.counts[first:last + 1] == expected).all())

    def is_only_a_table(self, offset: int) -> bool:
        """Is the L2 table at offset referenced by nothing but L1 entries?"""
        k = int(np.searchsorted(self.tables, offset))
        return k < len(self.tables) and self.tables[k] == offset and \
            self._exclusive(offset, self.cs, int(self.table_refs[k]))

    def _apply_fixes(self) -> None:
        """Make the entry repairs found by the walk, in tables that nothing else uses."""
        if not self.fixes:
            return
        before = self.stats.corruptions
        ok: dict[int, bool] = {}
        for fix in self.fixes:
            if fix.table not in ok:
                ok[fix.table] = self.is_only_a_table(fix.table) if fix.in_l2 else \
                    self._exclusive(fix.table, fix.table_bytes, 1)
            if ok[fix.table]:
                self.f.pwrite(fix.pos, fix.data)
                self.stats.messages.append(fix.message)
                self.stats.fixed += 1
                if fix.l1_index is not None:
                    self.img.l1[fix.l1_index] = fix.value
            else:
                self._error(fix.error, fix.times)
                if fix.refs is not None:
                    self.add_range_weighted(*fix.refs)
        self.f.sync()
        for table in ok:
            self.img.l2.forget(table)
        self._saturate()
        self.walk_corruptions += self.stats.corruptions - before
        self.fixes = []

    def add_range_weighted(self, offset: int, size: int, weight: int) -> None:
        self.add_ranges(np.array([offset], np.int64), np.array([size], np.int64),
                        np.array([weight], np.int64))

    def _saturate(self) -> None:
        """References beyond the refcount width: one overflow error each, as QEMU does."""
        over = np.flatnonzero(self.counts > self.max_refcount)
        for c in over.tolist():
            extra = int(self.counts[c]) - self.max_refcount
            self._error(f"ERROR: overflow cluster offset={c << self.cb:#x}", extra)
            self.counts[c] = self.max_refcount

    def _count_tables(self, l1s: list[tuple[int, int, bool]]) -> None:
        """L1 tables, then each distinct L2 table once, weighted by how many L1 entries
        (all, and active ones) point at it."""
        offsets, actives = [], []
        for l1_offset, l1_size, active in l1s:
            if not l1_size:
                continue
            self.add_range(l1_offset, l1_size * 8)
            l1 = read_words(self.f, l1_offset, l1_size)
            index = np.flatnonzero(l1)
            present = l1[index]
            for k in np.flatnonzero((present & u64(L1E_RESERVED_MASK)) != 0).tolist():
                e = int(present[k])
                if not self.fix_errors:
                    self._error(f"ERROR found L1 entry with reserved bits set: {e:x}")
                    continue
                # the reader ignores these bits: clearing them changes nothing it reads
                present[k] = e & ~L1E_RESERVED_MASK
                self._fix_l1(l1_offset, l1_size, int(index[k]), int(present[k]), active,
                             f"Repairing L1 entry with reserved bits set: {e:x}",
                             f"ERROR found L1 entry with reserved bits set: {e:x}")
            if self.fix_errors:  # an L2 table past the end of the file reads as zeros: no table
                gone = ((present & u64(L1E_OFFSET_MASK)) >= u64(self.file_size)) & \
                    (((present & u64(L1E_OFFSET_MASK)) & u64(self.cs - 1)) == 0)
                for k in np.flatnonzero(gone).tolist():
                    off = int(present[k]) & L1E_OFFSET_MASK
                    self._fix_l1(l1_offset, l1_size, int(index[k]), 0, active,
                                 f"Repairing l2_offset={off:x}: L2 table lies past the end of the "
                                 f"file; L1 entry cleared",
                                 f"ERROR: counting reference for region exceeding the end of the file "
                                 f"by one cluster or more: offset {off:#x} size {self.cs:#x}")
                present = present[~gone]
            present = present[present != 0]
            l2 = (present & u64(L1E_OFFSET_MASK)).astype(np.int64)
            self.add_ranges(l2, self.cs)
            for off in l2[(l2 & (self.cs - 1)) != 0].tolist():
                self._error(f"ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted")
            offsets.append(l2)
            actives.append(np.full(len(l2), active))
        if not offsets:
            return
        allof = np.concatenate(offsets)
        tables, inverse = np.unique(allof, return_inverse=True)
        w_all = np.bincount(inverse, minlength=len(tables))
        self.tables, self.table_refs = tables, w_all
        w_active = np.bincount(inverse[np.concatenate(actives)], minlength=len(tables))
        ext = self.img.header.extended_l2
        reader = TableReader(self.f, self.cs, self.batch_bytes)
        for start, batch in reader.batches(tables.tolist(), self.progress):
            n = batch.shape[0]
            self._count_batch(tables[start:start + n], l2_entries(batch, ext),
                              w_all[start:start + n], w_active[start:start + n], ext)

    def _count_batch(self, table_offsets: np.ndarray, t: L2Entries, w_all: np.ndarray, w_active: np.ndarray,
                     ext: bool) -> None:
        """QEMU's check_refcounts_l2 for the non-zero entries `t` of a batch of tables.
        Entries with nothing special (a cluster-aligned offset, COPIED and the zero flag
        at most, a consistent bitmap) take a short path; the rest get every rule."""
        cs, cb = self.cs, self.cb
        e = t.entry
        plain = (e & u64(~((L2E_OFFSET_MASK & ~(cs - 1)) | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO) & 0xFFFFFFFFFFFFFFFF)) == 0
        external = self.img.data_file  # data clusters live in the data file, uncounted
        if not external:
            plain &= (e & u64(L2E_OFFSET_MASK)) < u64(self.file_size)
        if ext:
            bm = t.bitmap
            alloc = bm & u64(SUBCLUSTER_ALLOC_MASK)
            plain &= ((bm >> u64(32)) & alloc) == 0
            plain &= ((e & u64(L2E_OFFSET_MASK)) != 0) | (alloc == 0)
        uniform = w_all.min() == w_all.max()
        if not plain.all():
            # compressed clusters without COPIED (or a bitmap): their byte ranges, counted
            comp = ~plain & ((e & u64(QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_COPIED)) == u64(QCOW_OFLAG_COMPRESSED))
            if external:  # an error there, reported with every rule below
                comp[:] = False
            if ext:
                comp &= t.bitmap == 0
            if comp.any():
                rows = t.row[comp]
                coff, csize = compressed_ranges(e[comp], cb)
                self.add_ranges(coff.astype(np.int64), csize.astype(np.int64),
                                int(w_all[0]) if uniform else w_all[rows])
                n_active = int(w_active[rows].sum())
                self.stats.allocated += n_active
                self.stats.compressed += n_active
                self.stats.fragmented += n_active
            special = t.take(~plain & ~comp)
            rest: L2Entries | None = special
            rest_normal: np.ndarray | None = self._count_special(table_offsets, special, w_all, w_active,
                                                                 ext)
            t = t.take(plain)
        else:
            rest, rest_normal = None, None
        offs = t.entry & u64(L2E_OFFSET_MASK)
        normal = offs != 0
        if external:  # guest cluster 0 at offset 0 of the data file: COPIED tells it
            normal |= data_at_offset_zero(t.entry)
        if normal.all():  # fully allocated tables: no gather
            rows, cols, entries = t.row, t.col, t.entry
        else:
            rows, cols, entries, offs = t.row[normal], t.col[normal], t.entry[normal], offs[normal]
        clusters = offs.view(np.int64) >> cb  # offsets are below 2^56: the sign bit is clear
        if not external:
            self.add_clusters(clusters, int(w_all[0]) if uniform else w_all[rows])
        if rest is not None and rest_normal is not None and rest_normal.any():  # back in table order
            rows = np.concatenate([rows, rest.row[rest_normal]])
            cols = np.concatenate([cols, rest.col[rest_normal]])
            entries = np.concatenate([entries, rest.entry[rest_normal]])
            order = np.lexsort((cols, rows))
            rows, entries = rows[order], entries[order]
            offs = entries & u64(L2E_OFFSET_MASK)
            clusters = offs.view(np.int64) >> cb
        self._active_layer(rows, entries, offs, clusters, w_active)

    def _active_layer(self, rows: np.ndarray, entries: np.ndarray, offs: np.ndarray,
                      clusters: np.ndarray, w_active: np.ndarray) -> None:
        """Allocation and fragmentation counts, and COPIED notes, for the data clusters
        of active tables (rows: table of each entry, in table order; offs, clusters: its
        host offset and cluster index)."""
        if not w_active.any() or not len(rows):
            return
        cs = self.cs
        if w_active.min() == w_active.max():  # the usual case: no sharing within the batch
            w = int(w_active[0])
            self.stats.allocated += w * len(rows)
            if len(offs) > 1:
                jump = (rows[1:] == rows[:-1]) & (offs[1:] != offs[:-1] + u64(cs))
                self.stats.fragmented += w * int(np.count_nonzero(jump))
            cl = clusters
            copied = (entries >> u64(63)).astype(bool)
        else:
            active = w_active[rows]
            self.stats.allocated += int(active.sum())
            if len(offs) > 1:
                jump = (rows[1:] == rows[:-1]) & (offs[1:] != offs[:-1] + u64(cs))
                self.stats.fragmented += int(active[1:][jump].sum())
            act = active > 0
            cl = clusters[act]
            copied = (entries[act] >> u64(63)).astype(bool)
        if self.img.data_file:  # not clusters of this file: no refcount to agree with COPIED
            return
        inside = cl < len(self.flags)
        if not inside.all():
            self.copied_outside = True
            cl, copied = cl[inside], copied[inside]
        self.flags[cl[copied]] |= COPIED_REF
        self.flags[cl[~copied]] |= UNCOPIED_REF

    def add_clusters(self, clusters: np.ndarray, weight: np.ndarray | int) -> None:
        """Count whole clusters (aligned data clusters): past the end of the file is an error."""
        past = clusters >= self.nb_clusters
        if past.any():
            w = np.broadcast_to(np.asarray(weight, np.int64), clusters.shape)
            self.add_ranges(clusters[past] << self.cb, self.cs, w[past])  # reports them
            clusters = clusters[~past]
            weight = weight if isinstance(weight, (int, np.integer)) else np.asarray(weight)[~past]
        if not len(clusters):
            return
        if isinstance(weight, (int, np.integer)):
            self._widen(len(clusters) * int(weight))
            np.add.at(self.counts, clusters, self.counts.dtype.type(weight))
        else:
            w = np.asarray(weight, np.int64)
            self._widen(int(w.sum()))
            np.add.at(self.counts, clusters, w.astype(self.counts.dtype))

    def _count_special(self, table_offsets: np.ndarray, t: L2Entries, w_all: np.ndarray, w_active: np.ndarray,
                       ext: bool) -> np.ndarray:
        """Every rule, for entries off the short path; returns which of them are data
        clusters still counted (for the active layer's numbers)."""
        cs, cb = self.cs, self.cb
        e, bm = t.entry, t.bitmap
        weight = w_all[t.row]
        active = w_active[t.row]
        compressed = (e & u64(QCOW_OFLAG_COMPRESSED)) != 0
        std = ~compressed
        offs = e & u64(L2E_OFFSET_MASK)
        bad: list[tuple[int, int, str, int]] = []  # (row, col, message, times)

        def report(mask: np.ndarray, fmt: Callable[[int], str]) -> None:
            for i in np.flatnonzero(mask).tolist():
                bad.append((int(t.row[i]), int(t.col[i]), fmt(i), int(weight[i])))

        reserved = std & ((e & u64(L2E_STD_RESERVED_MASK)) != 0)
        if self.fix_errors:  # the reader ignores these bits: clearing them changes nothing it reads
            for i in np.flatnonzero(reserved).tolist():
                old = int(e[i])
                e[i] = u64(old & ~L2E_STD_RESERVED_MASK)
                self._write_entry(int(table_offsets[t.row[i]]), int(t.col[i]), int(e[i]),
                                  int(bm[i]) if ext else None,
                                  f"Repairing l2 entry with reserved bits set: {old:x}",
                                  f"ERROR found l2 entry with reserved bits set: {old:x}", int(weight[i]))
            offs = e & u64(L2E_OFFSET_MASK)
        else:
            report(reserved, lambda i: f"ERROR found l2 entry with reserved bits set: {int(e[i]):x}")
        # compressed clusters (never COPIED; with extended L2, no subcluster bitmap)
        comp_copied = compressed & ((e & u64(QCOW_OFLAG_COPIED)) != 0)
        if self.fix_errors:  # the reader ignores COPIED on compressed clusters: drop it
            for i in np.flatnonzero(comp_copied).tolist():
                coffset = int(compressed_ranges(e[i:i + 1], cb)[0][0])
                e[i] = e[i] & ~u64(QCOW_OFLAG_COPIED)
                what = f"coffset={coffset:#x}: copied flag must never be set for compressed clusters"
                self._write_entry(int(table_offsets[t.row[i]]), int(t.col[i]), int(e[i]),
                                  int(bm[i]) if ext else None, f"Repairing {what}", f"ERROR: {what}",
                                  int(weight[i]))
        else:
            report(comp_copied, lambda i: f"ERROR: coffset={int(compressed_ranges(e[i:i + 1], cb)[0][0]):#x}: "
                                          f"copied flag must never be set for compressed clusters")
        counted_comp = compressed
        if ext:
            comp_bitmap = compressed & (bm != 0)
            report(comp_bitmap, lambda i: f"ERROR compressed cluster {int(t.col[i])} with non-zero "
                                          f"subcluster allocation bitmap, entry={int(e[i]):#x}")
            counted_comp = compressed & ~comp_bitmap
        # data clusters (preallocated zero clusters included)
        normal = std & (offs != 0)
        alloc_bits = bm & u64(SUBCLUSTER_ALLOC_MASK)
        if ext:
            report(normal & (((bm >> u64(32)) & alloc_bits) != 0),
                   lambda i: f"ERROR offset={int(offs[i]):x}: Allocated cluster has corrupted "
                             f"subcluster allocation bitmap")
            report(std & (offs == 0) & (alloc_bits != 0),
                   lambda i: "ERROR: Unallocated cluster has non-zero subcluster allocation map")
            has_data = alloc_bits != 0
        else:
            has_data = (e & u64(QCOW_OFLAG_ZERO)) == 0
        unaligned = normal & ((offs & u64(cs - 1)) != 0)
        report(unaligned & has_data, lambda i: f"ERROR offset={int(offs[i]):x}: Data cluster is not "
                                               f"properly aligned; L2 entry corrupted.")
        prealloc = unaligned & ~has_data
        if prealloc.any():
            if self.fix_errors:  # QEMU's fix_l2_entry_by_zero: the entry becomes a zero cluster
                for i in np.flatnonzero(prealloc).tolist():
                    b = int(bm[i])
                    what = f"offset={int(offs[i]):x}: Preallocated cluster is not properly aligned; " \
                           f"L2 entry corrupted."
                    self._write_entry(int(table_offsets[t.row[i]]), int(t.col[i]), 0 if ext else QCOW_OFLAG_ZERO,
                                      subclusters_zeroed(b) if ext else None,
                                      f"Repairing {what}", f"ERROR {what}", int(weight[i]),
                                      (int(offs[i]), cs, int(weight[i])))
                normal &= ~prealloc
            else:
                report(prealloc, lambda i: f"ERROR offset={int(offs[i]):x}: Preallocated cluster is not "
                                           f"properly aligned; L2 entry corrupted.")
        external = self.img.data_file
        if external:  # QEMU's check_refcounts_l2: no compressed clusters with a data file
            report(counted_comp, lambda i: f"ERROR compressed cluster {int(t.col[i])} with data file, "
                                           f"entry={int(e[i]):#x}")
            counted_comp = np.zeros_like(counted_comp)
            normal |= data_at_offset_zero(e)
        past = normal & (offs >= u64(self.file_size)) & ((offs & u64(cs - 1)) == 0)
        if external:
            past = np.zeros_like(past)
        if self.fix_errors and past.any() and (ext or self.img.version >= 3 or self.img.backing is None):
            # QEMU reads zeros past the end of the file: make it a zero cluster, which reads the same
            for i in np.flatnonzero(past).tolist():
                if ext:
                    b = int(bm[i])
                    entry, bitmap = 0, subclusters_zeroed(b)
                else:
                    entry, bitmap = (QCOW_OFLAG_ZERO if self.img.version >= 3 else 0), None
                off = int(offs[i])
                self._write_entry(int(table_offsets[t.row[i]]), int(t.col[i]), entry, bitmap,
                                  f"Repairing offset={off:x}: data cluster lies past the end of the "
                                  f"file; L2 entry made a zero cluster",
                                  f"ERROR: counting reference for region exceeding the end of the file "
                                  f"by one cluster or more: offset {off:#x} size {cs:#x}", int(weight[i]))
            normal &= ~past
        for row, col, message, times in sorted(bad):
            self.stats.messages.append(message)
            self.stats.corruptions += times
        # compressed clusters count as allocated and fragmented (active layer)
        comp_active = active[counted_comp]
        self.stats.compressed += int(comp_active.sum())
        self.stats.fragmented += int(comp_active.sum())
        self.stats.allocated += int(comp_active.sum())
        if not external:
            self.add_ranges(offs[normal].astype(np.int64), cs, weight[normal])
        if counted_comp.any():
            coff, csize = compressed_ranges(e[counted_comp] & ~u64(QCOW_OFLAG_COPIED), cb)
            self.add_ranges(coff.astype(np.int64), csize.astype(np.int64), weight[counted_comp])
        return np.asarray(normal)

    def _fix_l1(self, l1_offset: int, l1_size: int, index: int, value: int, active: bool,
                message: str, error: str) -> None:
        self.fixes.append(Fix(l1_offset, l1_size * 8, l1_offset + 8 * index, value.to_bytes(8, "big"),
                              message, error, l1_index=index if active else None, value=value,
                              in_l2=False))

    def _write_entry(self, table_offset: int, col: int, entry: int, bitmap: int | None,
                     message: str, error: str, times: int = 1,
                     refs: tuple[int, int, int] | None = None) -> None:
        if bitmap is None:
            pos, data = table_offset + 8 * col, entry.to_bytes(8, "big")
        else:
            pos, data = table_offset + 16 * col, entry.to_bytes(8, "big") + bitmap.to_bytes(8, "big")
        self.fixes.append(Fix(table_offset, self.cs, pos, data, message, error, times, refs))

    # -- refcount structures -------------------------------------------------------------

    def count_refcount_structures(self, table_offset: int, table_clusters: int) -> None:
        """The refcount table, then each block (QEMU's check_refblocks)."""
        cs, cb = self.cs, self.cb
        self._follow_file_size()
        first = table_offset >> cb
        self.add_range(table_offset, table_clusters * cs)
        if (table_offset + table_clusters * cs) - self.file_size < cs:
            self.refcount_clusters += list(range(first, (table_offset + table_clusters * cs - 1 >> cb) + 1))
        self._saturate()
        raw = read_words(self.f, table_offset, table_clusters * cs // 8)
        for i in np.flatnonzero(raw).tolist():
            e = int(raw[i])
            if e & REFT_RESERVED_MASK:
                self._ref_error(f"ERROR refcount table entry {i} has reserved bits set")
                continue
            off = e & REFT_OFFSET_MASK
            if off % cs:
                self._ref_error(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                                f"entry corrupted")
                continue
            c = off >> cb
            if c >= self.nb_clusters:
                self._ref_error(f"ERROR refcount block {i} is outside image")
                continue
            if self.counts[c] >= self.max_refcount:
                self._error(f"ERROR: overflow cluster offset={off:#x}")
            else:
                self.counts[c] += 1
                self.refcount_clusters.append(c)
            if self.counts[c] != 1:
                self._ref_error(f"ERROR refcount block {i} refcount={int(self.counts[c])}")

    def _follow_file_size(self) -> None:
        """The file may have grown since the walk (a rebuild writes past its end)."""
        self.file_size = self.f.size()
        nb = -(-self.file_size // self.cs)
        if nb > self.nb_clusters:
            grow = nb - self.nb_clusters
            self.counts = np.concatenate([self.counts, np.zeros(grow, self.counts.dtype)])
            self.flags = np.concatenate([self.flags, np.zeros(grow, self.flags.dtype)])
            self.nb_clusters = nb

    def _ref_error(self, message: str) -> None:
        self._error(message)
        self.rebuild = True

    def drop_refcount_structures(self) -> None:
        """Forget the references of the refcount table and blocks (before a rebuild)."""
        if self.refcount_clusters:
            np.subtract.at(self.counts, np.array(self.refcount_clusters, np.int64),
                           self.counts.dtype.type(1))
        self.refcount_clusters = []

    @property
    def compare_clusters(self) -> int:
        """How many clusters the compare covers (the file, and one more if referenced)."""
        return int(self.nb_clusters) + (1 if self.counts[self.nb_clusters] else 0)
