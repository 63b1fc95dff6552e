"""Integrity: the guards that keep guest data off metadata and metadata counted.

QEMU's overlap checks (qcow2_check_metadata_overlap) and qcow2_signal_corruption,
the healing of metadata clusters with refcount 0 (OpenBSD vmd's damage) before the
first write, the rebuild of a dirty (lazy refcounts) image, and the dirty/corrupt
header bits.  A mixin of Image (qcowfuse/image.py): it uses the image's header,
tables, refcounts (rc), snapshots and bitmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

import struct

from ..errors import CorruptError, UnsupportedError
from .format import L1E_OFFSET_MASK
from .header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_INCOMPATIBLE_FEATURES
from .state import ImageState


def _log() -> logging.Logger:
    import logging  # the daemon has it loaded; the offline commands seldom log

    return logging.getLogger("qcowfuse")


class Integrity(ImageState):
    def repair_dirty(self) -> None:
        """A writer with lazy refcounts (compatible bit 0) died: its refcounts may be
        too low.  Rebuild them before allocating anything, as QEMU does on open."""
        from .check import Checker  # check walks an Image: import at call time

        report = Checker(self).run("all")
        if report.corruptions or report.check_errors:
            raise CorruptError("image was not closed cleanly and its refcounts could not be "
                               "repaired: run 'qcowfuse check --repair all'")
        _log().warning("image was not closed cleanly (lazy refcounts): refcounts repaired "
                       "(%d corruptions, %d leaks fixed)", report.corruptions_fixed, report.leaks_fixed)

    def metadata_clusters(self) -> list[tuple[str, int]]:
        """(what, host cluster index) of every metadata cluster reachable without reading L2s."""
        h, cb, cs = self.header, self.cluster_bits, self.cluster_size
        out = [("header", 0)]
        out += [("refcount table", (h.refcount_table_offset >> cb) + i)
                for i in range(h.refcount_table_clusters)]
        out += [("refcount block", off >> cb) for off in self.rc.table if off]
        if h.l1_size:
            first = h.l1_table_offset >> cb
            out += [("L1 table", first + i) for i in range(-(-h.l1_size * 8 // cs))]
        out += [("L2 table", (e & L1E_OFFSET_MASK) >> cb) for e in self.l1 if e & L1E_OFFSET_MASK]
        if self.snapshot_table_bytes:
            first = h.snapshots_offset >> cb
            out += [("snapshot table", first + i) for i in range(-(-self.snapshot_table_bytes // cs))]
        for snap in self.snapshots:
            first = snap.l1_table_offset >> cb
            out += [("snapshot L1 table", first + i) for i in range(-(-snap.l1_size * 8 // cs))]
        if self.bitmaps is not None:
            out += list(self.bitmaps.clusters())
        return out

    def metadata_set(self) -> frozenset[int]:
        """Host clusters that guest data must never be written to (QEMU's overlap check),
        rebuilt only when the metadata layout changed (refcount blocks and table here,
        other tables by metadata_layout_changed)."""
        key = (self.rc.generation, self.header.refcount_table_offset)
        if self._meta_key != key:
            self._meta = frozenset(c for _, c in self.metadata_clusters())
            self._meta_key = key
        return self._meta

    def metadata_layout_changed(self) -> None:
        """An L1 or L2 table moved or was added: metadata_set is rebuilt on next use."""
        self._meta_key = None

    def data_target_ok(self, first: int, last: int) -> bool:
        """Guest data may go to host clusters first..last: none is metadata (QEMU's overlap
        check) and none lies past the end of the file.  Per request: one C call.  Always
        so in an external data file, which holds no metadata."""
        if self.data_file:
            return True
        meta = self.metadata_set()
        return (last + 1) << self.cluster_bits <= self.f.end() and (
            first not in meta if first == last else meta.isdisjoint(range(first, last + 1)))

    def check_data_target(self, first: int, count: int) -> None:
        """Refuse guest data headed for metadata or for a cluster past the end of the file."""
        if self.data_target_ok(first, first + count - 1):
            return
        overlap = self.metadata_set().intersection(range(first, first + count))
        if overlap:
            raise CorruptError(f"data cluster {min(overlap)} overlaps metadata; refusing to overwrite it")
        raise CorruptError(f"data cluster {first + count - 1} lies past the end of the image file")

    def check_metadata_refcounts(self) -> None:
        """Metadata with refcount 0 (OpenBSD vmd's bug) would be handed out as free space
        and overwritten; count each such cluster once, which is what it should have had."""
        healed = []
        end = self.f.end()
        for what, c in self.metadata_clusters():
            if c and c << self.cluster_bits >= end:
                raise CorruptError(f"{what} at cluster {c} lies past the end of the image file")
            if self.rc.get(c) == 0:
                if self.rc.block(c // self.rc.entries_per_block) is None:
                    raise UnsupportedError(
                        f"{what} at cluster {c} has no refcount block: repair the image "
                        f"with 'qcowfuse check --repair all' first")
                self.rc.add(c, 1)
                healed.append(f"{what} {c}")
        if healed:
            self.rc.flush()
            _log().warning("healed refcount 0 of in-use metadata clusters: %s", ", ".join(healed))

    def check_fresh(self, first: int, count: int) -> None:
        """A newly allocated run must not be metadata (a refcount of 0 on a table)."""
        meta = self.metadata_set()
        if count == 1 and first not in meta:  # one cluster per fresh write: no range built
            return
        if not meta.isdisjoint(range(first, first + count)):
            c = min(meta.intersection(range(first, first + count)))
            raise CorruptError(f"cluster {c} is in use as metadata but has refcount 0")

    def mark_clean(self) -> None:
        """Clear the dirty and corrupt bits (after a successful repair)."""
        bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
        if not self.writable or not self.header.incompatible_features & bits:
            return
        self.flush()
        self.header.incompatible_features &= ~bits
        self.f.pwrite(OFF_INCOMPATIBLE_FEATURES, struct.pack(">Q", self.header.incompatible_features))
        self.f.sync()

    def mark_corrupt(self, reason: str) -> None:
        """Refuse further writes and set the header's corrupt bit (v3), as QEMU's
        qcow2_signal_corruption does, rather than risk overwriting metadata."""
        if not self.writable or self.marked_corrupt:
            return
        self.marked_corrupt = True
        _log().error("marking image corrupt: %s", reason)
        if self.version < 3:
            return
        self.header.incompatible_features |= INCOMPAT_CORRUPT
        self.f.pwrite(OFF_INCOMPATIBLE_FEATURES, struct.pack(">Q", self.header.incompatible_features))
        self.f.sync()
