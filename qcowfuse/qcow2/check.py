"""Consistency check and repair, counted the way `qemu-img check` counts.

Every reference is recounted from the metadata (header, active and snapshot
L1 tables, their L2 tables and data or compressed clusters, the snapshot
table, the refcount table and blocks) and compared with the stored refcount:
stored > used is a leak (harmless), stored < used is corruption (the next
allocation may overwrite live data; OpenBSD vmd left such images).

Repairs are crash safe: leaks are lowered in place; under-counts are repaired
by building a complete new refcount table and blocks past the end of the file
and switching the header to them in one write once they are on disk, so the
old structures stay valid until that moment.  COPIED flags are fixed last.
"""

from __future__ import annotations

import array
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import FormatError, QcowError, UnsupportedError
from .allocator import Allocator
from .compressed import CompressedDescriptor
from .header import MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE
from .refcounts import RefcountStore
from .tables import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COPIED, ClusterType, classify, decode_table,
    encode_table)

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

    def to_json(self) -> dict:
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
    def __init__(self, img, progress: Callable[[float], None] | None = None) -> None:
        self.img = img
        self.f = img.f
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.progress = progress or (lambda fraction: None)
        # references may point past the end of the file (counted, as qemu-img does), but
        # not so far that counting them would need unbounded memory
        self.max_clusters = (self.f.size() >> self.cb) + (1 << 20)
        # structures whose clusters could not all be counted: repair would guess
        self.unaccounted: list[str] = []

    # -- counting references ----------------------------------------------------

    def _inc(self, counts: array.array, report: CheckReport, offset: int, size: int) -> None:
        if size <= 0:
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        if last >= len(counts):
            if last >= self.max_clusters:
                report.messages.append(f"ERROR: reference to offset {offset:#x}, far past the end of "
                                       f"the image file")
                report.corruptions += 1
                return
            counts.extend(bytes(8 * (last + 1 - len(counts))))
        limit = self.img.rc.codec.max_value
        for k in range(first, last + 1):
            if counts[k] >= limit:
                report.messages.append(f"ERROR: overflow cluster offset={k << self.cb:#x}")
                report.corruptions += 1
                continue
            counts[k] += 1

    def _read_table(self, offset: int, size: int) -> array.array:
        data = self.f.pread_upto(offset, size)
        return decode_table(data.ljust(size, b"\0"))

    def _count_l1(self, counts, report, l1_offset: int, l1_size: int, active: bool) -> None:
        self._inc(counts, report, l1_offset, l1_size * 8)
        l1 = self._read_table(l1_offset, l1_size * 8) if l1_size else array.array("Q")
        version = self.img.version
        for i, l1e in enumerate(l1):
            if active:
                self.progress(i / max(1, len(l1)))
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            self._inc(counts, report, l2_offset, self.cs)
            if l2_offset % self.cs:
                report.messages.append(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                                       f"L1 entry corrupted")
                report.corruptions += 1
            next_contiguous = 0
            for l2e in self._read_table(l2_offset, self.cs):
                kind = classify(l2e, version)
                if kind is ClusterType.COMPRESSED:
                    if l2e & QCOW_OFLAG_COPIED:
                        report.messages.append("ERROR: copied flag must never be set for compressed clusters")
                        report.corruptions += 1
                    d = CompressedDescriptor.decode(l2e & ~QCOW_OFLAG_COPIED, self.cb)
                    self._inc(counts, report, d.offset & ~511, d.sectors * 512)
                    if active:
                        report.allocated_clusters += 1
                        report.compressed_clusters += 1
                        report.fragmented_clusters += 1
                elif kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    off = l2e & L2E_OFFSET_MASK
                    if active:
                        report.allocated_clusters += 1
                        if next_contiguous and off != next_contiguous:
                            report.fragmented_clusters += 1
                        next_contiguous = off + self.cs
                    self._inc(counts, report, off, self.cs)
                    if off % self.cs:
                        report.messages.append(f"ERROR offset={off:x}: Cluster is not properly aligned; "
                                               f"L2 entry corrupted.")
                        report.corruptions += 1

    def _count_bitmaps(self, counts: array.array, report: CheckReport) -> None:
        """Directory, tables and data clusters of persistent bitmaps (QEMU's
        qcow2_check_bitmaps_refcounts).  A directory that cannot be read is a
        corruption that no repair may touch: its clusters cannot be accounted for."""
        img = self.img
        if img.bitmap_error is not None:
            report.messages.append(f"ERROR bitmaps: {img.bitmap_error}")
            report.corruptions += 1
            self.unaccounted.append(f"persistent bitmaps ({img.bitmap_error})")
            return
        if img.bitmaps is None:
            return
        errors: list[str] = []
        for ref in img.bitmaps.references(errors):
            self._inc(counts, report, ref.offset, ref.length)
        report.messages += errors
        report.corruptions += len(errors)
        if errors:
            self.unaccounted.append("persistent bitmap tables with invalid entries")

    def count_references(self, report: CheckReport, include_refcount_structures: bool = True
                         ) -> tuple[array.array, bool]:
        """Used count of every host cluster, and whether the refcount structures are
        beyond patching (a block unaligned, outside the file or referenced twice)."""
        img, h = self.img, self.img.header
        nb_clusters = -(-self.f.size() // self.cs)
        if nb_clusters > 1 << 31:
            raise UnsupportedError("image file too large to check (more than 2^31 clusters)")
        counts = array.array("Q", bytes(8 * nb_clusters))
        self._inc(counts, report, 0, self.cs)
        self._count_l1(counts, report, h.l1_table_offset, h.l1_size, active=True)
        for snap in img.snapshots:
            self._count_l1(counts, report, snap.l1_table_offset, snap.l1_size, active=False)
        self._inc(counts, report, h.snapshots_offset, img.snapshot_table_bytes)
        self._count_bitmaps(counts, report)
        rebuild = False
        if not include_refcount_structures:
            return counts, rebuild
        self._inc(counts, report, h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        for i, off in enumerate(img.rc.table):
            if not off:
                continue
            if off % self.cs:
                report.messages.append(f"ERROR refcount block {i} is not cluster aligned; "
                                       f"refcount table entry corrupted")
                report.corruptions += 1
                rebuild = True
                continue
            if off >> self.cb >= nb_clusters:
                report.messages.append(f"ERROR refcount block {i} is outside image")
                report.corruptions += 1
                rebuild = True
                continue
            self._inc(counts, report, off, self.cs)
            if counts[off >> self.cb] != 1:
                report.messages.append(f"ERROR refcount block {i} refcount={counts[off >> self.cb]}")
                report.corruptions += 1
                rebuild = True
        return counts, rebuild

    # -- comparing ------------------------------------------------------------------

    def _stored(self, cluster: int, report: CheckReport) -> int | None:
        try:
            return self.img.rc.get(cluster)
        except QcowError as e:
            report.messages.append(f"Can't get refcount for cluster {cluster}: {e}")
            report.check_errors += 1
            return None

    def compare(self, counts: array.array, report: CheckReport, fix_leaks: bool) -> bool:
        """Count leaks and corruptions; lower leaks if asked.  True if any stored
        refcount is below its use (needs the refcount structures rebuilt).

        Block by block: a block whose stored refcounts equal the counted ones is
        settled by one array comparison; only differing blocks are walked."""
        under = False
        highest = 0
        rc = self.img.rc
        epb = rc.entries_per_block
        n = len(counts)
        for b in range(-(-n // epb)):
            lo, hi = b * epb, min(n, (b + 1) * epb)
            used = counts[lo:hi]
            try:
                block = rc.block(b)
            except QcowError as e:
                report.messages.append(f"Can't get refcounts of clusters {lo}-{hi - 1}: {e}")
                report.check_errors += 1
                continue
            stored = array.array("Q", block[:hi - lo]) if block is not None else \
                array.array("Q", bytes(8 * (hi - lo)))
            for values in (stored, used):
                tail = values.tobytes().rstrip(b"\0")
                if tail:
                    highest = max(highest, lo + (len(tail) - 1) // 8)
            if stored == used:
                continue
            for i in range(hi - lo):
                s_, u = stored[i], used[i]
                if s_ == u:
                    continue
                c = lo + i
                if s_ < u:
                    under = True
                    report.corruptions += 1
                    report.corrupt_clusters.append(c)
                    report.messages.append(f"ERROR cluster {c} refcount={s_} reference={u}")
                elif fix_leaks:
                    rc.add(c, u - s_)
                    report.leaks_fixed += 1
                    report.messages.append(f"Repairing cluster {c} refcount={s_} reference={u}")
                else:
                    report.leaks += 1
                    report.leaked_clusters.append(c)
                    report.messages.append(f"Leaked cluster {c} refcount={s_} reference={u}")
        report.image_end_offset = (highest + 1) * self.cs
        if fix_leaks and rc.dirty:
            rc.flush()
        return under

    def check_copied(self, report: CheckReport, fix: bool) -> None:
        """COPIED must be set exactly when the refcount is 1 (active L1 and L2 only)."""
        img = self.img
        for i, l1e in enumerate(img.l1):
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            rc = self._stored(l2_offset >> self.cb, report)
            if rc is not None and (rc == 1) != bool(l1e & QCOW_OFLAG_COPIED):
                report.messages.append(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED L2 cluster: "
                                       f"l1_index={i} l1_entry={l1e:x} refcount={rc}")
                if fix:
                    img.l1[i] = l1e | QCOW_OFLAG_COPIED if rc == 1 else l1e & ~QCOW_OFLAG_COPIED
                    img.l1_dirty.add(i)
                    report.corruptions_fixed += 1
                else:
                    report.corruptions += 1
            table = self._read_table(l2_offset, self.cs)
            dirty = False
            for j, l2e in enumerate(table):
                if classify(l2e, img.version) not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    continue
                rc = self._stored((l2e & L2E_OFFSET_MASK) >> self.cb, report)
                if rc is None or (rc == 1) == bool(l2e & QCOW_OFLAG_COPIED):
                    continue
                report.messages.append(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED data cluster: "
                                       f"l2_entry={l2e:x} refcount={rc}")
                if fix:
                    table[j] = l2e | QCOW_OFLAG_COPIED if rc == 1 else l2e & ~QCOW_OFLAG_COPIED
                    dirty = True
                    report.corruptions_fixed += 1
                else:
                    report.corruptions += 1
            if dirty:
                self.f.pwrite(l2_offset, encode_table(table))
                img.l2.forget(l2_offset)
        if fix:
            img.flush()

    # -- rebuilding ---------------------------------------------------------------------

    def rebuild_refcounts(self, counts: array.array) -> None:
        """Write a complete refcount table and blocks for `counts` (which must not count
        the old refcount structures) past the end of the file, then switch to them."""
        img, cs = self.img, self.cs
        codec = img.rc.codec
        epb = codec.entries
        end = len(counts)
        while end and not counts[end - 1]:
            end -= 1
        start = max(end, -(-self.f.size() // cs))
        table_clusters = nblocks = 1
        while True:
            total = start + table_clusters + nblocks
            used_blocks = sorted({c // epb for c in range(end) if counts[c]} |
                                 set(range(start // epb, (total - 1) // epb + 1)))
            need_table = -(-(used_blocks[-1] + 1) * 8 // cs)
            if len(used_blocks) == nblocks and need_table == table_clusters:
                break
            nblocks, table_clusters = len(used_blocks), need_table
        if table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError("the image is too large for a refcount table")
        table = [0] * (table_clusters * cs // 8)
        block_at = {b: start + table_clusters + j for j, b in enumerate(used_blocks)}
        new_area = range(start, start + table_clusters + nblocks)
        for b, cluster in block_at.items():
            values = codec.zeros()
            lo = b * epb
            for i in range(epb):
                c = lo + i
                v = counts[c] if c < end else 0
                values[i] = v + (1 if c in new_area else 0)
            self.f.pwrite(cluster * cs, codec.encode(values))
            table[b] = cluster * cs
        self.f.pwrite(start * cs, struct.pack(f">{len(table)}Q", *table))
        self.f.sync()
        self.f.pwrite(OFF_REFCOUNT_TABLE, struct.pack(">QI", start * cs, table_clusters))
        self.f.sync()
        img.header.refcount_table_offset = start * cs
        img.header.refcount_table_clusters = table_clusters
        img.rc = RefcountStore(self.f, img.header)
        img.alloc = Allocator(img.rc)

    # -- the whole check -------------------------------------------------------------------

    def run(self, repair: str | None = None) -> CheckReport:
        if repair is not None and repair not in REPAIR_MODES:
            raise ValueError(f"repair mode must be one of {REPAIR_MODES}")
        img = self.img
        if img.header.extended_l2:
            raise UnsupportedError("checking images with extended L2 entries is not supported "
                                   "(use qemu-img check)")
        report = CheckReport(img.f.path, total_clusters=-(-img.size // self.cs))
        counts, rebuild = self.count_references(report)
        if repair is not None and self.unaccounted:
            raise UnsupportedError(
                f"refusing to repair: cannot account for the clusters of {self.unaccounted[0]}; "
                f"'qcowfuse check' without --repair reports what it found")
        pre_compare = (report.corruptions, report.messages[:])
        under = self.compare(counts, report, fix_leaks=False)
        if repair == "all" and (under or rebuild):
            report.messages.append("Rebuilding refcount structure")
            before_corruptions, before_leaks = report.corruptions, report.leaks
            fresh = CheckReport(report.filename)
            data_counts, _ = self.count_references(fresh, include_refcount_structures=False)
            self.rebuild_refcounts(data_counts)
            report.rebuilt = True
            after = CheckReport(report.filename, total_clusters=report.total_clusters)
            counts, _ = self.count_references(after)
            self.compare(counts, after, fix_leaks=True)  # old structures are free now
            report.corruptions_fixed += before_corruptions - after.corruptions
            report.leaks_fixed += before_leaks - after.leaks
            report.corruptions, report.leaks = after.corruptions, after.leaks
            report.leaked_clusters, report.corrupt_clusters = after.leaked_clusters, after.corrupt_clusters
            report.image_end_offset = after.image_end_offset
            report.messages += after.messages
        elif repair is not None and report.leaks:
            report.corruptions, report.messages = pre_compare[0], pre_compare[1]
            report.leaks = 0
            report.leaked_clusters, report.corrupt_clusters = [], []
            self.compare(counts, report, fix_leaks=True)
        self.check_copied(report, fix=repair == "all")
        if repair is not None and not (report.corruptions or report.check_errors):
            img.mark_clean()
        return report


class TerminalProgress:
    """A one-line progress indicator on stderr, shown only after a second of work."""

    def __init__(self, stream, label: str = "checking") -> None:
        self.stream = stream
        self.label = label
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, fraction: float) -> None:
        if time.monotonic() - self.start < 1.0:
            return
        self.shown = True
        self.stream.write(f"\r{self.label}: {fraction * 100:5.1f}%")
        self.stream.flush()

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (len(self.label) + 10) + "\r")
            self.stream.flush()
