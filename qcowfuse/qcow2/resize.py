"""Growing and shrinking the guest disk (QEMU's qcow2_co_truncate, block/qcow2.c).

Growing, in QEMU's order: flush; grow the L1 table if the new size needs more
entries (qcow2/l1.py: new table counted, written and synced before the header
switches to it, old table freed after); make the new range read as zeros; flush;
then write the header's size field and sync.  A crash at any point leaves either
the old size or the new one, never a reference to an uncounted cluster.

"Reads as zeros" is QEMU's rule: where a backing file larger than the old size
would show through, the new clusters become zero clusters (v3; QEMU refuses v2,
which has no zero flag, and so do we).  Unlike QEMU, only the clusters the backing
file actually covers get zero flags (past its end it reads as zeros anyway), so a
large growth over a small backing file allocates no L2 tables for the rest; and
unlike QEMU the zero flags are on disk before the size is.  The tail of a partial
last cluster is zeroed whenever it holds anything but zeros.

Shrinking is done only over space that holds no guest data (QEMU's --shrink
discards whatever is there; a mounted disk must never lose data to a truncate):
zero clusters past the new end are dropped, L2 tables wholly past it are freed
after their L1 entries are zero on disk, and the L1 table keeps its size (as
QEMU's qcow2_shrink_l1_table does).  The host space comes back as with QEMU: the
freed clusters are punched out once their refcount 0 is on disk, refcount blocks
left counting nothing are dropped, then the file is cut after the last cluster
still in use.  Snapshots keep their own L1 tables and
sizes; QEMU refuses to resize a v2 image with snapshots (their size is optional
there), and so do we.
"""

from __future__ import annotations

import array
import errno
import struct
from typing import TYPE_CHECKING

from ..errors import CorruptError, ReadOnlyError, ResizeError
from ..hostfile import DataFile
from .header import MAX_HOST_OFFSET, MAX_L1_BYTES
from .l1 import grow_l1_table, l1_entries_for
from .format import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO,
                      SUBCLUSTER_ALLOC_MASK, SUBCLUSTER_ZERO_MASK, SUBCLUSTER_ZERO_SHIFT, ClusterType,
                      classify, decode_table)
from .tables import last_mapped_cluster

if TYPE_CHECKING:
    from .state import ImageState

# docs/interop/qcow2.rst, "Header": size (u64, virtual disk size in bytes) at 24.
OFF_SIZE = 24
# QEMU resizes in whole sectors (BDRV_SECTOR_SIZE).
SECTOR_SIZE = 512


def resize_image(img: ImageState, new_size: int) -> None:
    """Make the guest disk new_size bytes; refuses (ResizeError) before changing
    anything when it cannot be done safely."""
    if not img.writable:
        raise ReadOnlyError("image is open read-only")
    with img.lock:
        if img.marked_corrupt:
            raise CorruptError("image was marked corrupt; writes are refused until it is repaired")
        _refuse(img, new_size)
        if new_size == img.size:
            return
        try:
            img.prepare_for_write()
            img.flush()  # dirty L1 entries and L2 tables reach disk before anything moves
            if new_size > img.size:
                _grow(img, new_size)
            else:
                _shrink(img, new_size)
            if img.bitmaps is not None:
                img.bitmaps.resize(new_size)  # in memory; stored at close with the new size
            img.flush()  # everything the new size relies on, before the size itself
            if new_size < img.size:
                _drop_unused_refcount_blocks(img)
                _give_back_tail(img)
            if isinstance(img.data, DataFile):  # as QEMU truncates it with the image
                img.data.truncate(new_size)
            img.f.pwrite(OFF_SIZE, struct.pack(">Q", new_size))
            img.f.sync()
            img.header.size = img.size = new_size
        except CorruptError as e:
            img.mark_corrupt(str(e))
            raise


def _refuse(img: ImageState, new_size: int) -> None:
    if new_size < 0 or new_size % SECTOR_SIZE:
        raise ResizeError(f"The new size must be a multiple of {SECTOR_SIZE}", errno.EINVAL)
    if new_size >= MAX_HOST_OFFSET:
        raise ResizeError("Failed to grow the L1 table: File too large", errno.EFBIG)
    if new_size == img.size:
        return
    if img.data_file:  # resized with the image, as QEMU does
        data = img.data
        if not isinstance(data, DataFile) or not data.opened:
            raise ResizeError("the image keeps its guest data in an external data file, which is "
                              "resized with it: name it with --data-file PATH", errno.EINVAL)
        if new_size > img.size and not data.growable and (end := data.size()) < new_size:
            raise ResizeError(f"cannot grow the guest disk past the end of its data file "
                              f"{data.path} (a device of {end} bytes)", errno.ENOSPC)
    if img.bitmaps is not None:
        stale = [bm.name for bm in img.bitmaps.list if bm.in_use and bm not in img.bitmaps.tracked]
        if stale:  # as QEMU's qcow2_truncate_bitmaps_check: it cannot resize what it can't trust
            raise ResizeError(f"cannot resize: bitmap '{stale[0]}' is inconsistent (in use); remove "
                              f"it first (qemu-img bitmap --remove)", errno.EOPNOTSUPP)
        if new_size == 0 and img.bitmaps.list:  # QEMU's check_dir_entry refuses table size 0
            raise ResizeError("cannot resize to 0 bytes: the image has persistent bitmaps",
                              errno.EINVAL)
    if img.snapshots and img.version < 3:
        raise ResizeError("Can't resize a v2 image which has snapshots", errno.EOPNOTSUPP)
    for s in img.snapshots:
        if s.disk_size is None:
            raise ResizeError(f"cannot resize: snapshot '{s.name}' does not record its disk size",
                              errno.EOPNOTSUPP)
    if new_size > img.size:
        if l1_entries_for(new_size, img.cluster_size, img.l2_bits) * 8 > MAX_L1_BYTES:
            raise ResizeError("Failed to grow the L1 table: File too large", errno.EFBIG)
        if img.version < 3 and img.backing is not None and img.backing.size > img.size:
            raise ResizeError(
                "cannot grow a version 2 image over a larger backing file: the backing file "
                "would show through (v2 has no zero clusters; 'qemu-img amend -o compat=1.1' "
                "first)", errno.EOPNOTSUPP)
    else:
        where = _first_data_past(img, new_size)
        if where is not None:
            raise ResizeError(f"cannot shrink to {new_size} bytes: guest data is allocated at "
                              f"offset {where} (only space without data can be cut off)", errno.EPERM)


# -- entries ------------------------------------------------------------------------

def _entry(img: ImageState, table: array.array[int] | None, i: int) -> tuple[int, int]:
    """(entry, subcluster bitmap) of index i in an L2 table (bitmap 0 without extended L2)."""
    if table is None:
        return 0, 0
    if img.header.extended_l2:
        return table[2 * i], table[2 * i + 1]
    return table[i], 0


def _set_entry(img: ImageState, table: array.array[int], i: int, entry: int, bitmap: int) -> None:
    if img.header.extended_l2:
        table[2 * i], table[2 * i + 1] = entry, bitmap
    else:
        table[i] = entry


def _holds_data(img: ImageState, entry: int, bitmap: int) -> bool:
    """Guest data of this layer (not zeros, not 'read from below')."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return True
    if img.header.extended_l2:
        return bool(bitmap & SUBCLUSTER_ALLOC_MASK)
    return classify(entry, img.version, img.data_file) is ClusterType.NORMAL


def _reads_zero_here(img: ImageState, entry: int, bitmap: int) -> bool:
    """Zeros whatever lies below (zero flag on every part of the cluster)."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return False
    if img.header.extended_l2:
        return not bitmap & SUBCLUSTER_ALLOC_MASK and bitmap >> SUBCLUSTER_ZERO_SHIFT == SUBCLUSTER_ALLOC_MASK
    return classify(entry, img.version, img.data_file) in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)


def _cluster_bytes(img: ImageState, g: int, start: int, end: int) -> bytes | bytearray:
    """Bytes [start, end) of guest cluster g as this layer (and those below) read them,
    also past the virtual size."""
    entry, bitmap = _entry(img, img.l2_table(g >> img.l2_bits), g & (img.l2_entries - 1))
    if img.header.extended_l2:
        return img.subcluster_content(entry, bitmap, g, start, end)
    return img.cluster_content(entry, g)[start:end]


def _first_data_past(img: ImageState, new_size: int) -> int | None:
    """Guest offset of the first data at or past new_size (the whole L1 table is
    scanned: entries past the old size count too), or None."""
    cs, cb = img.cluster_size, img.cluster_bits
    tail = new_size % cs
    if tail:  # the cluster cut in two: its data past the end must be zeros
        g = new_size >> cb
        if _holds_data(img, *_entry(img, img.l2_table(g >> img.l2_bits), g & (img.l2_entries - 1))) \
                and any(_cluster_bytes(img, g, tail, cs)):
            return new_size
    c_end = -(-new_size // cs)
    for l1i in range(c_end >> img.l2_bits, len(img.l1)):
        table = img.l2_table(l1i)
        if table is None:
            continue
        base = l1i << img.l2_bits
        for i in range(max(0, c_end - base), img.l2_entries):
            if _holds_data(img, *_entry(img, table, i)):
                return (base + i) << cb
    return None


# -- growing ------------------------------------------------------------------------

def _grow(img: ImageState, new_size: int) -> None:
    need = l1_entries_for(new_size, img.cluster_size, img.l2_bits)
    if need > len(img.l1):
        img.l1, old_l1 = grow_l1_table(img.f, img.header, img.rc, img.l1, need, img.check_fresh)
        img.metadata_layout_changed()
        # Sync the switch before the old table is even queued for freeing: if that sync
        # fails, the header on disk may still name the old table, so its clusters stay
        # counted (a leak) rather than being reused while something may point at them.
        img.flush()
        for c in old_l1:
            img.alloc.free_later(c)
        img.flush()
    _zero_new_range(img, img.size, new_size)


def _zero_new_range(img: ImageState, old: int, new: int) -> None:
    """Make guest bytes [old, new) read as zeros."""
    cs, cb = img.cluster_size, img.cluster_bits
    tail = old % cs
    if tail:
        head_end = min(new, old - tail + cs)
        if any(_cluster_bytes(img, old >> cb, tail, head_end - (old - tail))):
            img.write_locked(old, memoryview(bytes(head_end - old)))
    c0, c1 = -(-old // cs), -(-new // cs)
    # clusters the backing file would show through need the zero flag (v3 only:
    # refused earlier for v2); everywhere else unallocated reads as zeros already
    cz = c0
    if img.backing is not None:
        cz = max(c0, min(c1, -(-img.backing.size // cs)))
    bits = img.l2_bits
    for l1i in range(c0 >> bits, ((c1 - 1) >> bits) + 1 if c1 > c0 else c0 >> bits):
        base = l1i << bits
        lo, hi = max(c0, base), min(c1, base + img.l2_entries)
        if not img.l1[l1i] & L1E_OFFSET_MASK:
            if lo < cz:  # a new table, zero flags over all that the backing file covers
                _fill_zero_flags(img, img.l2_for_write(l1i), lo - base, min(hi, cz) - base)
                img.l2.mark_dirty(img.active_l2_offset(l1i))
                if img.l2.over_budget:
                    img.flush()
            continue
        table = img.l2_table(l1i)
        changes = []
        for g in range(lo, hi):
            entry, bitmap = _entry(img, table, g - base)
            if g < cz:
                if not _reads_zero_here(img, entry, bitmap):
                    changes.append((g - base, entry, 0 if img.header.extended_l2 else QCOW_OFLAG_ZERO,
                                    SUBCLUSTER_ZERO_MASK))
            elif _holds_data(img, entry, bitmap):
                changes.append((g - base, entry, 0, 0))
        if not changes:
            continue
        table = img.l2_for_write(l1i)
        for i, old_entry, entry, bitmap in changes:
            _set_entry(img, table, i, entry, bitmap)
            img.release_entry(old_entry)
        img.l2.mark_dirty(img.active_l2_offset(l1i))
        if img.l2.over_budget:
            img.flush()


def _fill_zero_flags(img: ImageState, table: array.array[int], start: int, end: int) -> None:
    """Entries [start, end) of an empty L2 table become zero clusters (no host cluster)."""
    if img.header.extended_l2:
        table[2 * start:2 * end] = array.array("Q", [0, SUBCLUSTER_ZERO_MASK]) * (end - start)
    else:
        table[start:end] = array.array("Q", [QCOW_OFLAG_ZERO]) * (end - start)


# -- shrinking ----------------------------------------------------------------------

def _shrink(img: ImageState, new_size: int) -> None:
    """Drop what lies past new_size (zero clusters only: _refuse checked) and the L2
    tables wholly past it; the L1 entries are zero on disk before the tables are freed
    (the caller's flush), and the freed host clusters are punched out after that
    (QEMU discards them with QCOW2_DISCARD_ALWAYS)."""
    cb = img.cluster_bits
    c_end = -(-new_size // img.cluster_size)
    bits, n = img.l2_bits, img.l2_entries
    if c_end & (n - 1):
        l1i = c_end >> bits
        table = img.l2_table(l1i)
        drop = [i for i in range(c_end & (n - 1), n) if any(_entry(img, table, i))]
        if drop:
            table = img.l2_for_write(l1i)
            for i in drop:
                img.release_entry(_entry(img, table, i)[0], discard=True)
                _set_entry(img, table, i, 0, 0)
            img.l2.mark_dirty(img.active_l2_offset(l1i))
    for l1i in range(-(-c_end // n), len(img.l1)):
        off = img.l1[l1i] & L1E_OFFSET_MASK
        if not off:
            continue
        # A cluster's refcount counts each L1 table it is reachable from (QEMU's
        # qcow2_update_snapshot_refcount), shared L2 table or not: our path to the
        # entries' preallocated zero clusters goes with the table.
        table = img.l2_table(l1i)
        for i in range(n):
            entry = _entry(img, table, i)[0]
            if entry & L2E_OFFSET_MASK:
                img.release_entry(entry, discard=True)
        img.l2.forget(off)
        img.l1[l1i] = 0
        img.l1_dirty.add(l1i)
        img.alloc.free_later(off >> cb, discard=True)
    img.metadata_layout_changed()


def _drop_unused_refcount_blocks(img: ImageState) -> None:
    """Refcount blocks that count nothing any more go, as QEMU's shrink drops them
    (qcow2_shrink_reftable), so the file can be cut before them: their table entries
    are zero on disk before any of them is freed or punched out."""
    dropped = img.rc.drop_unused_blocks()
    if not dropped:
        return
    for c, counted_elsewhere in dropped:
        if counted_elsewhere:
            img.alloc.free_later(c, discard=True)  # punched by the flush, once free
    img.flush()  # the table entries on disk before the blocks are free
    for c, counted_elsewhere in dropped:
        if not counted_elsewhere:  # free as soon as no table entry names it
            img.f.punch_hole(c << img.cluster_bits, img.cluster_size)


def _last_mapped(img: ImageState) -> int:
    """Highest host cluster an L2 table of the image maps (active and snapshot tables, as
    on disk: after a flush); -1 if none.  Without numpy: a shrink through the mount must
    not load it into the daemon (16 MiB of RSS)."""
    f, cb = img.f, img.cluster_bits
    l1s = [img.l1]
    for snap in img.snapshots:
        raw = f.pread_upto(snap.l1_table_offset, 8 * snap.l1_size)
        l1s.append(decode_table(raw[:len(raw) // 8 * 8]))
    tables = {e & L1E_OFFSET_MASK for l1 in l1s for e in l1} - {0}
    last = -1
    for off in sorted(tables):
        raw = f.pread_upto(off, img.cluster_size)
        raw += bytes(img.cluster_size - len(raw))  # past the end of the file: zeros, as QEMU reads
        last = max(last, last_mapped_cluster(raw, cb, img.header.extended_l2))
    return last


def _give_back_tail(img: ImageState) -> None:
    """Cut the host file after the last cluster in use, as QEMU's shrink does
    (qcow2_get_last_cluster, then a truncate whose failure only leaves a longer file).

    Only after a flush: every reference the shrink dropped is gone from disk and the
    refcounts that free those clusters are synced, so nothing on disk still uses a
    cluster past the cut; a crash before the cut leaks, never corrupts.  Unlike QEMU,
    the cut also stops after the metadata the image knows of and after every cluster
    an L2 table maps, whatever refcounts say: on a damaged image (mapped data with
    refcount 0) a cut by refcounts alone would lose what a repair could still save."""
    f, cb = img.f, img.cluster_bits
    size = f.size()  # with the hole the file grows ahead (hostfile.PREALLOCATE_BYTES)
    mapped = _last_mapped(img) if not img.data_file else -1  # a data file's clusters are not here
    last = max(img.rc.last_used(-(-size >> cb)), max(img.metadata_set()), mapped)
    if (last + 1) << cb < size:
        f.truncate((last + 1) << cb)
