"""Consistency check and repair, counted the way `qemu-img check` counts.

Every reference is recounted from the metadata (header, active and snapshot
L1 tables, their L2 tables and data or compressed clusters, the snapshot
table, the refcount table and blocks) and compared with the stored refcount:
stored > used is a leak (harmless), stored < used is corruption (the next
allocation may overwrite live data; OpenBSD vmd left such images).

The walk itself (references.py) reads each table once, as numpy arrays; the
compare goes block by block, one array comparison per refcount block.

Repairs are crash safe: leaks are lowered in place; under-counts are repaired
by building a complete new refcount table and blocks past the end of the file
and switching the header to them in one write once they are on disk, so the
old structures stay valid until that moment.  COPIED flags are fixed last.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..progress import Progress, TerminalProgress, scaled
from .format import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, decode_refblock,
    encode_refblock)
from .header import CRYPT_LUKS, EXT_CRYPTO, MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE
from .references import (
    COPIED_REF, REFCOUNT_ONE, REFCOUNT_UNKNOWN, UNCOPIED_REF, References)
from .scan import BE64, U64, TableReader, u64

if TYPE_CHECKING:
    from .state import ImageState

__all__ = ["Checker", "CheckReport", "TerminalProgress", "REPAIR_MODES"]

REPAIR_MODES = ("leaks", "all")


@dataclass
class CheckReport:
    filename: str
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    leaks: int = 0
    corruptions: int = 0
    check_errors: int = 0
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    rebuilt: bool = False
    messages: list[str] = field(default_factory=list)
    leaked_clusters: list[int] = field(default_factory=list)
    corrupt_clusters: list[int] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """As qemu-img check: 1 could not check, 2 corruption, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """The keys of `qemu-img check --output=json`."""
        out = {"image-end-offset": self.image_end_offset, "total-clusters": self.total_clusters,
               "check-errors": self.check_errors, "allocated-clusters": self.allocated_clusters,
               "filename": self.filename, "format": "qcow2"}
        for key, value in (("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters),
                           ("leaks", self.leaks), ("corruptions", self.corruptions),
                           ("leaks-fixed", self.leaks_fixed),
                           ("corruptions-fixed", self.corruptions_fixed)):
            if value:
                out[key] = value
        return out


class Checker:
    def __init__(self, img: ImageState, progress: Progress | None = None,
                 extra_ranges: list[tuple[int, int]] | None = None) -> None:
        """extra_ranges: (offset, length) of host ranges other structures use (counted once
        each, like any metadata), e.g. persistent bitmaps."""
        self.img = img
        self.f = img.f
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.progress = progress
        self.extra_ranges = list(extra_ranges or [])
        self._structure_errors: list[str] = []
        # structures whose clusters could not all be counted: a repair would guess
        self.unaccounted: list[str] = []
        self._add_bitmaps()
        self._add_crypto_header()

    def _add_crypto_header(self) -> None:
        """The LUKS header area (encryption header pointer extension: offset u64, length
        u64), counted like any metadata (QEMU's qcow2_check_refcounts)."""
        h = self.img.header
        if h.crypt_method != CRYPT_LUKS:
            return
        data = h.extension(EXT_CRYPTO)
        if data is None or len(data) != 16:
            self._structure_errors.append("ERROR LUKS image without a valid encryption header extension")
            self.unaccounted.append("the LUKS header")
            return
        offset, length = struct.unpack(">QQ", data)
        self.extra_ranges.append((offset, length))

    def _add_bitmaps(self) -> None:
        """Directory, tables and data clusters of persistent bitmaps (QEMU's
        qcow2_check_bitmaps_refcounts).  A directory or table that cannot be read is a
        corruption no repair may touch: its clusters cannot be accounted for."""
        img = self.img
        if img.bitmap_error is not None:
            self._structure_errors.append(f"ERROR bitmaps: {img.bitmap_error}")
            self.unaccounted.append(f"persistent bitmaps ({img.bitmap_error})")
        elif img.bitmaps is not None:
            self.extra_ranges += [(r.offset, r.length) for r in img.bitmaps.references(self._structure_errors)]
            if self._structure_errors:
                self.unaccounted.append("persistent bitmap tables with invalid entries")

    # -- counting references ----------------------------------------------------

    def count_references(self, report: CheckReport, fix_errors: bool = False) -> References:
        """The one walk: every reference recounted, with the walk's findings in `report`."""
        if self.f.size() > (1 << 31) * self.cs:
            raise UnsupportedError("image file too large to check (more than 2^31 clusters)")
        refs = References(self.img, fix_errors, scaled(self.progress, 0.0, 0.9), self.extra_ranges)
        report.messages += self._structure_errors
        report.corruptions += len(self._structure_errors)
        refs.count()
        self._add_walk(report, refs)
        return refs

    @staticmethod
    def _add_walk(report: CheckReport, refs: References) -> None:
        s = refs.stats
        report.corruptions += s.corruptions
        report.corruptions_fixed += s.fixed
        report.allocated_clusters += s.allocated
        report.fragmented_clusters += s.fragmented
        report.compressed_clusters += s.compressed
        report.messages += s.messages

    # -- comparing ------------------------------------------------------------------

    def _stored_block(self, b: int) -> np.ndarray | str:
        """Stored refcounts of block b (all its entries), or why they can't be read."""
        rc = self.img.rc
        if b in rc.dirty_blocks:
            return np.array(rc.blocks[b], dtype=np.uint64)
        if b >= len(rc.table) or not rc.table[b]:
            return np.zeros(rc.entries_per_block, np.uint8)
        off = rc.table[b]
        if off % self.cs:
            return f"refcount block {b} at unaligned offset {off:#x}"
        data = self.f.pread_upto(off, self.cs)
        return decode_refblock(data.ljust(self.cs, b"\0"), self.img.header.refcount_order)

    def compare(self, refs: References, report: CheckReport, fix_leaks: bool) -> bool:
        """Count leaks and corruptions; lower leaks if asked.  True if any stored
        refcount is below its use (needs the refcount structures rebuilt).  Also notes,
        per cluster, whether its (final) refcount is 1, for check_copied.

        Block by block: a block whose stored refcounts equal the counted ones is
        settled by one array comparison; only differing entries are looked at."""
        rc = self.img.rc
        order = self.img.header.refcount_order
        epb = rc.entries_per_block
        n = refs.compare_clusters
        counts, flags = refs.counts, refs.flags
        flags &= COPIED_REF | UNCOPIED_REF
        under = False
        highest = -1
        wrote = False
        nblocks = -(-n // epb)
        progress = scaled(self.progress, 0.9, 1.0)
        for b in range(nblocks):
            if progress and b % 256 == 0:
                progress(b / nblocks)
            lo, hi = b * epb, min(n, (b + 1) * epb)
            used = counts[lo:hi]
            block = self._stored_block(b)
            if isinstance(block, str):
                report.messages.append(f"Can't get refcount for clusters {lo}-{hi - 1}: {block}")
                report.check_errors += hi - lo
                flags[lo:hi] |= REFCOUNT_UNKNOWN
                continue
            stored = block[:hi - lo]
            live = np.flatnonzero((stored != 0) | (used != 0))
            if len(live):
                highest = lo + int(live[-1])
            diff = np.flatnonzero(stored != used)
            final = stored
            if len(diff):
                leaks = []
                for i, s_, u in zip(diff.tolist(), stored[diff].tolist(), used[diff].tolist()):
                    c = lo + i
                    if s_ < u:
                        under = True
                        report.corruptions += 1
                        report.corrupt_clusters.append(c)
                        report.messages.append(f"ERROR cluster {c} refcount={s_} reference={u}")
                    elif fix_leaks:
                        leaks.append(i)
                        report.leaks_fixed += 1
                        report.messages.append(f"Repairing cluster {c} refcount={s_} reference={u}")
                    else:
                        report.leaks += 1
                        report.leaked_clusters.append(c)
                        report.messages.append(f"Leaked cluster {c} refcount={s_} reference={u}")
                if leaks:  # lowering a refcount to its use is safe in any order
                    full = block.copy()
                    full[leaks] = used[leaks]
                    self.f.pwrite(rc.table[b], encode_refblock(full, order))
                    rc.blocks.pop(b, None)  # the file has it now: reloaded when needed
                    rc.dirty_blocks.discard(b)
                    freed = [lo + i for i in leaks if used[i] == 0]
                    if freed:
                        rc.free_hint = min(rc.free_hint, freed[0])
                    wrote = True
                    final = full[:hi - lo]
            flags[lo:hi][final == 1] |= REFCOUNT_ONE
        report.image_end_offset = (highest + 1) * self.cs
        if wrote:
            self.f.sync()
        return under

    # -- COPIED flags ---------------------------------------------------------------------

    def _refcount(self, refs: References, cluster: int) -> int | None:
        """Final stored refcount of a cluster (None if it can't be read)."""
        if cluster < len(refs.flags) and refs.flags[cluster] & REFCOUNT_UNKNOWN:
            return None
        try:
            return int(self.img.rc.get(cluster))
        except Exception:  # a broken refcount block: QEMU skips it silently too
            return None

    def check_copied(self, refs: References, report: CheckReport, fix: bool) -> None:
        """COPIED must be set exactly when the refcount is 1 (active L1 and L2 only).
        The walk noted which clusters active entries point at with and without COPIED;
        the L2 tables are read again only if that shows a mismatch."""
        img = self.img
        flags = refs.flags
        l1 = np.array(img.l1, dtype=U64)
        present = np.flatnonzero(l1 & u64(L1E_OFFSET_MASK))
        l2_offsets = (l1[present] & u64(L1E_OFFSET_MASK)).astype(np.int64)
        clusters = l2_offsets >> self.cb
        inside = clusters < len(flags)
        one = np.zeros(len(present), bool)
        one[inside] = (flags[clusters[inside]] & REFCOUNT_ONE) != 0
        copied = (l1[present] & u64(QCOW_OFLAG_COPIED)) != 0
        suspects = np.flatnonzero((one != copied) | ~inside)
        for k in suspects.tolist():
            i, c = int(present[k]), int(clusters[k])
            rc = self._refcount(refs, c)
            l1e = int(l1[present[k]])
            if rc is None or (rc == 1) == bool(l1e & QCOW_OFLAG_COPIED):
                continue
            report.messages.append(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED L2 cluster: "
                                   f"l1_index={i} l1_entry={l1e:x} refcount={rc}")
            if fix:
                img.l1[i] = l1e | QCOW_OFLAG_COPIED if rc == 1 else l1e & ~QCOW_OFLAG_COPIED
                img.l1_dirty.add(i)
                report.corruptions_fixed += 1
            else:
                report.corruptions += 1
        if refs.copied_outside or self._copied_wrong(flags):
            self._copied_l2(refs, report, fix, l2_offsets.tolist())
        if fix:
            img.flush()

    @staticmethod
    def _copied_wrong(flags: np.ndarray, chunk: int = 1 << 20) -> bool:
        """Does any cluster have an active reference whose COPIED flag disagrees with
        its refcount (a lookup table over the flag bits, a chunk at a time)?"""
        lut = np.zeros(16, bool)
        for v in range(16):
            if not v & REFCOUNT_UNKNOWN:
                lut[v] = bool(v & COPIED_REF and not v & REFCOUNT_ONE) or \
                    bool(v & UNCOPIED_REF and v & REFCOUNT_ONE)
        return any(lut[flags[i:i + chunk]].any() for i in range(0, len(flags), chunk))

    def _copied_l2(self, refs: References, report: CheckReport, fix: bool, l2_offsets: list[int]) -> None:
        """The exact per-entry COPIED check, table by table (only on damaged images)."""
        img, cs, cb = self.img, self.cs, self.cb
        ext = img.header.extended_l2
        step = 2 if ext else 1
        reader = TableReader(self.f, cs, cs)
        for l2_offset in l2_offsets:
            words = reader.read([l2_offset])[0].astype(U64)
            entries = words[::step]
            normal = np.flatnonzero(((entries & u64(QCOW_OFLAG_COMPRESSED)) == 0) &
                                    ((entries & u64(L2E_OFFSET_MASK)) != 0))
            dirty = False
            for j in normal.tolist():
                l2e = int(entries[j])
                rc = self._refcount(refs, (l2e & L2E_OFFSET_MASK) >> cb)
                if rc is None or (rc == 1) == bool(l2e & QCOW_OFLAG_COPIED):
                    continue
                report.messages.append(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED data cluster: "
                                       f"l2_entry={l2e:x} refcount={rc}")
                if fix:
                    words[j * step] = u64(l2e | QCOW_OFLAG_COPIED if rc == 1 else l2e & ~QCOW_OFLAG_COPIED)
                    dirty = True
                    report.corruptions_fixed += 1
                else:
                    report.corruptions += 1
            if dirty and refs.is_only_a_table(l2_offset):
                self.f.pwrite(l2_offset, words.astype(BE64).tobytes())
                img.l2.forget(l2_offset)
            elif dirty:  # the "table" is also something else (guest data?): leave it alone
                report.messages.append(f"ERROR L2 table at {l2_offset:#x} is in use as something "
                                       f"else too; its COPIED flags are left as they are")
                report.check_errors += 1

    # -- rebuilding ---------------------------------------------------------------------

    def rebuild_refcounts(self, counts: np.ndarray) -> None:
        """Write a complete refcount table and blocks for `counts` (which must not count
        the old refcount structures) past the end of the file, then switch to them."""
        img, cs = self.img, self.cs
        order = img.header.refcount_order
        epb = img.rc.entries_per_block
        used = np.flatnonzero(counts)
        end = int(used[-1]) + 1 if len(used) else 0
        data_blocks = np.unique(used // epb)
        start = max(end, -(-self.f.size() // cs))
        table_clusters = nblocks = 1
        while True:
            total = start + table_clusters + nblocks
            area_blocks = np.arange(start // epb, (total - 1) // epb + 1)
            used_blocks = np.union1d(data_blocks, area_blocks)
            need_table = -(-(int(used_blocks[-1]) + 1) * 8 // cs)
            if len(used_blocks) == nblocks and need_table == table_clusters:
                break
            nblocks, table_clusters = len(used_blocks), need_table
        if table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError("the image is too large for a refcount table")
        table = np.zeros(table_clusters * cs // 8, U64)
        area = (start, start + table_clusters + nblocks)
        for j, b in enumerate(used_blocks.tolist()):
            lo = b * epb
            values = np.zeros(epb, np.uint64)
            have = counts[lo:min(lo + epb, len(counts))]
            values[:len(have)] = have
            a, z = max(area[0], lo), min(area[1], lo + epb)
            if a < z:
                values[a - lo:z - lo] += np.uint64(1)
            cluster = start + table_clusters + j
            self.f.pwrite(cluster * cs, encode_refblock(values, order))
            table[b] = cluster * cs
        self.f.pwrite(start * cs, table.astype(BE64).tobytes())
        self.f.sync()
        self.f.pwrite(OFF_REFCOUNT_TABLE, struct.pack(">QI", start * cs, table_clusters))
        self.f.sync()
        img.header.refcount_table_offset = start * cs
        img.header.refcount_table_clusters = table_clusters
        img.replace_refcount_structures()

    # -- the whole check -------------------------------------------------------------------

    def run(self, repair: str | None = None) -> CheckReport:
        if repair is not None and repair not in REPAIR_MODES:
            raise ValueError(f"repair mode must be one of {REPAIR_MODES}")
        img = self.img
        # The walk reads the tables from the file: an image open read-write (the library,
        # the dirty rebuild) first puts there what memory holds, or clusters counted in
        # memory but not yet mapped on disk would look leaked, and be freed.
        img.flush()  # before the walk
        report = CheckReport(img.f.path, total_clusters=-(-img.size // self.cs))
        if repair is not None and self.unaccounted:
            raise UnsupportedError(
                f"refusing to repair: cannot account for the clusters of {self.unaccounted[0]}; "
                f"'qcowfuse check' without --repair reports what it found")
        refs = self.count_references(report, fix_errors=repair == "all")
        pre_compare = (report.corruptions, report.messages[:])
        under = self.compare(refs, report, fix_leaks=False)
        if repair == "all" and (under or refs.rebuild):
            report.messages.append("Rebuilding refcount structure")
            before_corruptions, before_leaks = report.corruptions, report.leaks
            refs.drop_refcount_structures()
            self.rebuild_refcounts(refs.counts)
            report.rebuilt = True
            # the data references are unchanged: count only the new refcount structures
            after = CheckReport(report.filename, total_clusters=report.total_clusters)
            refs.rebuild = False
            mark, before = len(refs.stats.messages), refs.stats.corruptions
            refs.count_refcount_structures(img.header.refcount_table_offset,
                                           img.header.refcount_table_clusters)
            after.corruptions = refs.walk_corruptions + refs.stats.corruptions - before
            after.messages += refs.stats.messages[mark:]
            self.compare(refs, after, fix_leaks=True)  # old structures are free now
            report.corruptions_fixed += before_corruptions - after.corruptions
            report.leaks_fixed += before_leaks - after.leaks
            report.corruptions, report.leaks = after.corruptions, after.leaks
            report.leaked_clusters, report.corrupt_clusters = after.leaked_clusters, after.corrupt_clusters
            report.image_end_offset = after.image_end_offset
            report.messages += after.messages
        elif repair is not None and (under or refs.rebuild):
            # QEMU's qcow2_check_refcounts: only a rebuild may fix these, and lowering
            # leaks counted against broken refcount structures could free one of them
            report.messages.append("ERROR need to rebuild refcount structures")
            report.check_errors += 1
            return report
        elif repair is not None and report.leaks:
            report.corruptions, report.messages = pre_compare[0], pre_compare[1]
            report.leaks = 0
            report.leaked_clusters, report.corrupt_clusters = [], []
            self.compare(refs, report, fix_leaks=True)
        self.check_copied(refs, report, fix=repair == "all")
        if repair is not None and not (report.corruptions or report.check_errors):
            img.mark_clean()
        return report
