"""The write path, top to bottom: first-write preparation, then per request split
per L2 table; inside a table, runs of clusters that can be written in place, or
that all need new host clusters, are handled with one pwrite each.  Metadata
changes stay in memory until `flush()`, which orders them as QEMU does
(block/qcow2-cache.c dependencies):

    refcount blocks -> sync -> refcount table -> sync -> (guest data is now durable)
    -> L2 tables -> sync -> L1 table -> sync -> release freed clusters

so a reference never reaches disk before the refcount that counts it, and
guest data never after the L2 entry that maps it.  A crash may leak clusters;
it cannot corrupt the image or lose anything written before a flush.

Every written guest range is committed to the persistent bitmaps before its data is
written: by the fast path for what it serves (fastpath.py), else in `write_locked`.
A mixin of Image (qcowfuse/image.py), using its read path for copy-on-write content
and its integrity guards before every data write.
"""

from __future__ import annotations

import array
import struct

from ..errors import CorruptError, NeedsPassphrase, ReadOnlyError
from .allocator import cluster_runs
from .format import (
    SECTOR, L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
    SUBCLUSTER_ALLOC_MASK, SUBCLUSTER_ZERO_MASK, SUBCLUSTER_ZERO_SHIFT, ClusterType,
    CompressedDescriptor, classify)
from .header import AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DIRTY, OFF_AUTOCLEAR_FEATURES
from .state import ImageState
from .zeroes import write_zero_piece


class WritePath(ImageState):
    def prepare_for_write(self) -> None:
        """First write only: clear autoclear bits we do not maintain (spec: a writer
        that does not know a bit must clear it), after checking the metadata's own
        refcounts so that no allocation can ever land on a cluster in use."""
        if self.prepared:
            return
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            self.repair_dirty()
        self.check_metadata_refcounts()
        h = self.header
        # the bits we maintain: bitmaps, and a raw data file (data clusters at their guest
        # offsets, zeros written as data)
        keep = (AUTOCLEAR_BITMAPS if self.bitmaps is not None else 0) | \
            (AUTOCLEAR_DATA_FILE_RAW if self.data_file else 0)
        if h.version >= 3 and h.autoclear_features & ~keep:
            h.autoclear_features &= keep
            self.f.pwrite(OFF_AUTOCLEAR_FEATURES, struct.pack(">Q", h.autoclear_features))
            self.f.sync()
        if self.bitmaps is not None:
            self.bitmaps.begin_writing(self.alloc.alloc_contiguous)
        self.prepared = True

    def l2_for_write(self, l1_index: int) -> array.array[int]:
        """The active L2 table for l1_index, allocated or copied on write if needed."""
        entry = self.l1[l1_index]
        off = entry & L1E_OFFSET_MASK
        if off and entry & QCOW_OFLAG_COPIED:
            return self.l2.get(off)
        if off:
            self.host_check(off, "L2 table")
            if self.rc.get(off >> self.cluster_bits) == 1:
                # refcount 1 without COPIED (older writers): ours to change in place
                self.l1[l1_index] = off | QCOW_OFLAG_COPIED
                self.l1_dirty.add(l1_index)
                return self.l2.get(off)
            table = array.array("Q", self.l2.get(off))  # shared with a snapshot
        else:
            table = array.array("Q", bytes(self.cluster_size))
        new = self.alloc.alloc() << self.cluster_bits
        self.check_fresh(new >> self.cluster_bits, 1)
        self.l2.install(new, table)
        self.l1[l1_index] = new | QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        self.metadata_layout_changed()
        if off:
            self.alloc.free_later(off >> self.cluster_bits)
        return table

    def in_place(self, entry: int) -> bool:
        """Normal cluster this layer owns alone."""
        return classify(entry, self.version, self.data_file) is ClusterType.NORMAL and \
            self._owned_alone(entry)

    def reusable_zero_alloc(self, entry: int) -> bool:
        """Zero flag over a host cluster this layer owns alone (rewritten in place)."""
        return classify(entry, self.version, self.data_file) is ClusterType.ZERO_ALLOC and \
            self._owned_alone(entry)

    def _owned_alone(self, entry: int) -> bool:
        """The entry's host cluster is this layer's alone: COPIED, or refcount 1; every
        cluster of an external data file (no refcounts there)."""
        return bool(entry & QCOW_OFLAG_COPIED) or self.data_file or \
            self.rc.get((entry & L2E_OFFSET_MASK) >> self.cluster_bits) == 1

    def release_entry(self, entry: int, discard: bool = False) -> None:
        """Drop (after the next table sync) the reference an overwritten L2 entry held;
        discard: punch the host clusters out once they are free.  Data clusters in an
        external data file have no refcount: nothing to drop (and a compressed entry
        there is corruption, never a reason to touch this file's refcounts)."""
        if self.data_file:
            return
        kind = classify(entry, self.version, self.data_file)
        if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            self.alloc.free_later((entry & L2E_OFFSET_MASK) >> self.cluster_bits, discard)
        elif kind is ClusterType.COMPRESSED:
            for c in CompressedDescriptor.decode(entry, self.cluster_bits).host_clusters(self.cluster_bits):
                self.alloc.free_later(c, discard)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write guest bytes at offset; returns the number written (all of them)."""
        view = data if type(data) is bytes else memoryview(data).cast("B")
        length = len(view)
        if not self.writable:
            raise ReadOnlyError("image is open read-only")
        with self.lock:  # the size too: a resize in another thread may shrink it meanwhile
            if offset < 0 or offset + length > self.size:
                raise ValueError(f"write of {length} bytes at {offset} is beyond the virtual size {self.size}")
            self.write_checked(offset, view)
        return length

    def write_checked(self, offset: int, view: bytes | memoryview) -> None:
        """Guest bytes inside the virtual size, on a writable image, under the image lock
        or from the one thread that uses the image (fastpath.py's unlocked pair): the
        fast path where it serves, else the general path.  The one place that refuses
        writes to an image marked corrupt and marks it where a write meets corruption."""
        if self.marked_corrupt:
            raise CorruptError("image was marked corrupt; writes are refused until it is repaired")
        try:
            if not self.fast.write(offset, view):  # the common case, whole (fastpath.py)
                self.write_locked(offset, memoryview(view))
        except CorruptError as e:
            self.mark_corrupt(str(e))
            raise

    def commit_range(self, offset: int, length: int) -> None:
        """A guest range is about to be written: the one place that records it in the
        persistent bitmaps (called before its data reaches the file, by each path)."""
        if self.bitmaps is not None:
            self.bitmaps.mark(offset, length)

    def write_locked(self, offset: int, view: memoryview) -> None:
        length = len(view)
        if not self.prepared:
            self.prepare_for_write()
        self.commit_range(offset, length)
        cb, cs = self.cluster_bits, self.cluster_size
        if self.header.extended_l2:
            self._write_subclusters(offset, view)
            return
        pos = 0
        while pos < length:
            voff = offset + pos
            g = voff >> cb
            in_cl = voff & (cs - 1)
            l1i, l2i = g >> self.l2_bits, g & (self.l2_entries - 1)
            table = self.l2_for_write(l1i)
            stop = min(self.l2_entries, l2i + ((offset + length - 1) >> cb) - g + 1)
            if self._zero_cluster:
                n = min(length - pos, cs - in_cl)
                if write_zero_piece(self, table, l1i, l2i, g, in_cl, view[pos:pos + n], self._zero_cluster):
                    pos += n
                    continue
                stop = l2i + 1  # look at every cluster on its own
            entry = table[l2i]
            if self.reusable_zero_alloc(entry):
                # zero flag over a cluster we own: reuse it, as QEMU does
                host = entry & L2E_OFFSET_MASK
                n = min(length - pos, cs - in_cl)
                self.host_check(host, "data cluster")
                self.check_data_target(host >> cb, 1)
                buf = bytearray(cs)
                buf[in_cl:in_cl + n] = view[pos:pos + n]
                self.data_pwrite(host, buf)
                table[l2i] = host | QCOW_OFLAG_COPIED
                self.l2.mark_dirty(self.active_l2_offset(l1i))
            elif self.in_place(entry):
                host = entry & L2E_OFFSET_MASK
                self.host_check(host, "data cluster")
                j = l2i + 1
                while j < stop and (table[j] & L2E_OFFSET_MASK) == host + (j - l2i) * cs \
                        and self.in_place(table[j]):
                    j += 1
                for i in range(l2i, j):
                    if not table[i] & QCOW_OFLAG_COPIED:
                        table[i] |= QCOW_OFLAG_COPIED
                        self.l2.mark_dirty(self.active_l2_offset(l1i))
                n = min(length - pos, (j - l2i) * cs - in_cl)
                self.check_data_target(host >> cb, -(-(in_cl + n) // cs))
                self.data_pwrite(host + in_cl, view[pos:pos + n])
            else:
                j = l2i + 1
                while j < stop and not self.in_place(table[j]):
                    j += 1
                if self.data_file:  # a data file holds each cluster at its guest offset
                    first, count = g, j - l2i
                else:
                    first, count = self.alloc.alloc_run(j - l2i)
                    self.check_fresh(first, count)
                n = min(length - pos, count * cs - in_cl)
                self._write_new(first << cb, table, l2i, g, count, in_cl, view[pos:pos + n])
                for k in range(count):
                    old = table[l2i + k]
                    table[l2i + k] = ((first + k) << cb) | QCOW_OFLAG_COPIED
                    if old:  # 0: unallocated, nothing to release
                        self.release_entry(old)
                self.l2.mark_dirty(self.active_l2_offset(l1i))
            pos += n
        if self.l2.over_budget:
            self.flush()

    def _write_subclusters(self, offset: int, view: memoryview) -> None:
        """Writes on an image with extended L2 entries, one cluster at a time.  A
        cluster this layer owns is written in place; otherwise a new host cluster is
        allocated, and only the subclusters written are marked allocated (the rest keep
        reading from below), except when replacing compressed or shared data, which is
        copied whole.  Partially written subclusters are filled from their old content."""
        cb, cs = self.cluster_bits, self.cluster_size
        sc_bits = cb - 5
        length = len(view)
        pos = 0
        while pos < length:
            voff = offset + pos
            g = voff >> cb
            in_cl = voff & (cs - 1)
            n = min(cs - in_cl, length - pos)
            l1i, idx = g >> self.l2_bits, 2 * (g & (self.l2_entries - 1))
            table = self.l2_for_write(l1i)
            entry, bitmap = table[idx], table[idx + 1]
            first_sc, last_sc = in_cl >> sc_bits, (in_cl + n - 1) >> sc_bits
            touched = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
            start, end = first_sc << sc_bits, (last_sc + 1) << sc_bits
            host = entry & L2E_OFFSET_MASK
            compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
            owned = bool(host) and not compressed and (
                bool(entry & QCOW_OFLAG_COPIED) or self.rc.get(host >> cb) == 1)
            if owned:
                self.host_check(host, "data cluster")
                self.check_data_target(host >> cb, 1)
                buf = bytearray(self.subcluster_content(entry, bitmap, g, start, end))
                buf[in_cl - start:in_cl - start + n] = view[pos:pos + n]
                self.data_pwrite(host + start, buf)
                new_bitmap = (bitmap | touched) & ~(touched << SUBCLUSTER_ZERO_SHIFT)
                new_host = host
            else:
                new_host = self.alloc.alloc() << cb
                self.check_fresh(new_host >> cb, 1)
                if compressed or host:  # replace compressed or shared data: copy it whole
                    buf = bytearray(self.subcluster_content(entry, bitmap, g, 0, cs))
                    buf[in_cl:in_cl + n] = view[pos:pos + n]
                    self.data_pwrite(new_host, buf)
                    new_bitmap = SUBCLUSTER_ALLOC_MASK
                    self.release_entry(entry)
                else:
                    buf = bytearray(self.subcluster_content(entry, bitmap, g, start, end))
                    buf[in_cl - start:in_cl - start + n] = view[pos:pos + n]
                    self.data_pwrite(new_host + start, buf)
                    self.f.extend_to(new_host + cs)
                    new_bitmap = (bitmap & ~(touched << SUBCLUSTER_ZERO_SHIFT) & SUBCLUSTER_ZERO_MASK) | touched
            table[idx] = new_host | QCOW_OFLAG_COPIED
            table[idx + 1] = new_bitmap
            self.l2.mark_dirty(self.active_l2_offset(l1i))
            pos += n
        if self.l2.over_budget:
            self.flush()

    def active_l2_offset(self, l1_index: int) -> int:
        return self.l1[l1_index] & L1E_OFFSET_MASK

    def _write_new(self, host: int, table: array.array[int], l2i: int, guest_cluster: int, count: int,
                   in_cl: int, data: memoryview) -> None:
        """Write `data` at in_cl into `count` fresh host clusters, filling partial
        head and tail clusters from the guest clusters' old content."""
        cs = self.cluster_size
        end = in_cl + len(data)
        total = count * cs
        if in_cl == 0 and end == total:
            self.data_pwrite(host, data)
            return
        last = (end - 1) // cs
        head_zero = in_cl == 0 or self.reads_as_zeros(table[l2i])
        tail_zero = end % cs == 0 or self.reads_as_zeros(table[l2i + last])
        if head_zero and tail_zero:
            self.write_new_in_zeros(host, total, in_cl, data)
            return
        buf = bytearray(total)
        if not head_zero:
            buf[:cs] = self.cluster_content(table[l2i], guest_cluster)
        if not tail_zero:
            buf[last * cs:(last + 1) * cs] = self.cluster_content(table[l2i + last], guest_cluster + last)
        buf[in_cl:end] = data
        self.data_pwrite(host, buf)

    def write_new_in_zeros(self, host: int, total: int, in_cl: int, data: bytes | memoryview) -> None:
        """Write `data` at in_cl into `total` bytes of fresh host clusters that must read
        as zeros around it."""
        if self.crypto is None and (len(data) == total or not self.data_file and host >= self.f.end()):
            # Past the end of the file the host reads zeros already (a hole): write only
            # the data and make the file cover the clusters, instead of 16x the bytes.
            # (Not when encrypted: zeros on disk are not zeros in the clear.)
            self.data.pwrite(host + in_cl, data)
            if not self.data_file:
                self.f.extend_to(host + total)
            return
        buf = bytearray(total)  # a reused cluster: zeros around the data
        buf[in_cl:in_cl + len(data)] = data
        self.data_pwrite(host, buf)

    def data_pwrite(self, host: int, data: bytes | bytearray | memoryview) -> None:
        """Guest data to a host offset: the one place data is encrypted (luks.py).  A
        partial sector is read, decrypted, patched and encrypted again; callers write
        whole clusters into new ones, so a partial sector is always one written before."""
        crypto = self.crypto
        if crypto is None:
            if self.header.crypt_method:  # never plaintext into an encrypted image
                raise NeedsPassphrase("the image is encrypted and was opened without its passphrase")
            self.data.pwrite(host, data)
            return
        first = host // SECTOR
        end = -(-(host + len(data)) // SECTOR)
        head = host - first * SECTOR
        if head or (host + len(data)) % SECTOR:
            # only the first and last sectors keep old bytes: read just those
            buf = bytearray((end - first) * SECTOR)
            buf[:SECTOR] = self.data_pread(first * SECTOR, SECTOR)
            if end - first > 1:
                buf[-SECTOR:] = self.data_pread((end - 1) * SECTOR, SECTOR)
            buf[head:head + len(data)] = data
            self.data.pwrite(first * SECTOR, crypto.encrypt(buf, first))
        else:
            self.data.pwrite(host, crypto.encrypt(data, first))

    def reads_as_zeros(self, entry: int) -> bool:
        """Known to read as zeros without any I/O (zero flag, or nothing below)."""
        kind = classify(entry, self.version, self.data_file)
        return kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) or (
            kind is ClusterType.UNALLOCATED and self.backing is None)

    def flush(self) -> None:
        """Make every earlier write durable, in crash-safe order."""
        if not self.writable:
            return
        with self.lock:
            f = self.f
            self.rc.flush()
            if self.data_file and self.data.unsynced:
                self.data.sync()  # an external data file: its guest data, likewise
            if f.unsynced:
                f.sync()  # guest data before the L2 entries that map it
            if self.l2.write_dirty():
                f.sync()
            if self.l1_dirty:
                base = self.header.l1_table_offset
                for i in sorted(self.l1_dirty):
                    f.pwrite(base + 8 * i, struct.pack(">Q", self.l1[i]))
                self.l1_dirty.clear()
                f.sync()
            if self.alloc.pending_free:
                # references are gone from disk now; punched once their refcount 0 is too
                freed = self.alloc.release_pending(self.detect_zeroes == "unmap")
                self.rc.flush()
                for c, n in cluster_runs(freed):  # nothing can reuse them before this returns
                    f.punch_hole(c << self.cluster_bits, n << self.cluster_bits)
            if f.unsynced:
                f.sync()
