"""Image: the one API the layers above use (open / read / write / flush / close).

A request is split per L2 table; inside a table, runs of clusters that can be
written in place, or that all need new host clusters, are handled with one
pwrite each.  Metadata changes stay in memory until `flush()`, which orders
them as QEMU does (block/qcow2-cache.c dependencies):

    refcount blocks -> sync -> refcount table -> sync -> (guest data is now durable)
    -> L2 tables -> sync -> L1 table -> sync -> release freed clusters

so a reference never reaches disk before the refcount that counts it, and
guest data never after the L2 entry that maps it.  A crash may leak clusters;
it cannot corrupt the image or lose anything written before a flush.
"""

from __future__ import annotations

import array
import logging
import struct
import threading

from .errors import CorruptError, FormatError, QcowError, ReadOnlyError, UnsupportedError
from .backing import Layer, file_identity, open_backing
from .fastpath import FastPath
from .hostfile import HostFile
from .locking import lock_image
from .qcow2.allocator import Allocator
from .qcow2.compressed import CompressedDescriptor, decompress
from .qcow2.header import (
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_CLUSTER_BITS,
    OFF_AUTOCLEAR_FEATURES, OFF_INCOMPATIBLE_FEATURES, Header)
from .qcow2.refcounts import RefcountStore
from .qcow2.snapshots import find_snapshot, read_snapshot_table
from .qcow2.tables import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
    ClusterType, L2Cache, classify, decode_table)
from .qcow2.zeroes import write_zero_piece

log = logging.getLogger("qcowfuse")

DEFAULT_L2_CACHE_BYTES = 16 << 20  # maps 128 GiB of guest at 64 KiB clusters
# QEMU's detect-zeroes: off; on (whole zero clusters become zero clusters, keeping their
# host cluster); unmap (zero clusters, host cluster freed and its space punched out).
DETECT_ZEROES_MODES = ("off", "on", "unmap")
DEFAULT_REFCOUNT_CACHE_BYTES = 8 << 20


def _add_extent(plan: list[tuple[ClusterType, int, int, int]], kind: ClusterType, src: int,
                pos: int, n: int) -> None:
    """Append to a read plan, extending the last extent when source and request both
    continue it (compressed clusters are decompressed one by one)."""
    if plan and kind is not ClusterType.COMPRESSED:
        k, s, p, m = plan[-1]
        if k is kind and s + m == src and p + m == pos:
            plan[-1] = (k, s, p, m + n)
            return
    plan.append((kind, src, pos, n))


class Image:
    """A qcow2 image seen as a flat guest disk of `size` bytes."""

    def __init__(self, f: HostFile, header: Header, writable: bool, backing: Layer | None = None,
                 snapshot: str | None = None, repair: bool = False, detect_zeroes: str = "off",
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
                 refcount_cache_bytes: int = DEFAULT_REFCOUNT_CACHE_BYTES) -> None:
        self._refuse_unsupported(header, writable and not repair)
        self.f = f
        self.header = header
        self.writable = writable
        self.backing = backing
        self.size = header.size
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_bits = header.l2_bits
        self.l2_entries = 1 << self.l2_bits
        self._lock = threading.RLock()
        self.snapshots, self.snapshot_table_bytes = read_snapshot_table(f, header)
        l1_offset, l1_size = header.l1_table_offset, header.l1_size
        if snapshot is not None:
            if writable:
                raise UnsupportedError("snapshots can only be opened read-only")
            snap = find_snapshot(self.snapshots, snapshot)
            l1_offset, l1_size = snap.l1_table_offset, snap.l1_size
            self.size = snap.disk_size if snap.disk_size is not None else header.size
            if -(-self.size // (self.cluster_size << self.l2_bits)) > l1_size:
                raise FormatError(f"snapshot '{snapshot}' has an L1 table too small for its size")
        raw = f.pread(l1_offset, l1_size * 8) if l1_size else b""
        self.l1: array.array = decode_table(raw)
        self.l1_dirty: set[int] = set()
        self.l2 = L2Cache(f, self.cluster_size, l2_cache_bytes)
        self.rc = RefcountStore(f, header, refcount_cache_bytes)
        self.alloc = Allocator(self.rc)
        self._prepared = False
        self._corrupt = False
        self._l1_generation = 0
        self._meta_key: tuple[int, int, int] | None = None
        self._meta: frozenset[int] = frozenset()
        if detect_zeroes not in DETECT_ZEROES_MODES:
            raise ValueError(f"detect_zeroes must be one of {DETECT_ZEROES_MODES}")
        self.detect_zeroes = detect_zeroes
        self._zero_cluster = memoryview(bytes(self.cluster_size) if detect_zeroes != "off" else b"")
        self._compressed_cache: tuple[int, bytes] | None = None
        self._fast = FastPath(self)

    # -- opening --------------------------------------------------------------

    @classmethod
    def open(cls, path: str, writable: bool = False, lock: bool = True,
             _seen: frozenset[tuple[int, int]] = frozenset(), **options) -> "Image":
        """Open and validate, with the backing chain; nothing is written to the file
        until the first write.

        lock: take QEMU's lock bytes (see locking.py); False is QEMU's force-share.
        options: snapshot, repair, detect_zeroes, l2_cache_bytes, refcount_cache_bytes.
        """
        try:
            f = HostFile.open(path, writable)
        except IsADirectoryError:
            raise QcowError(f"{path}: is a directory, not an image file") from None
        except OSError as e:
            raise QcowError(f"{path}: {e.strerror}") from None
        try:
            if lock:
                lock_image(f.fd, writable, path)
            header = cls._read_header(f)
            backing = None
            if header.backing_file is not None:
                seen = _seen | {file_identity(path)}
                backing = open_backing(header.backing_file, header.backing_format, path, seen, lock)
            try:
                return cls(f, header, writable, backing=backing, **options)
            except BaseException:
                if backing is not None:
                    backing.close()
                raise
        except BaseException:
            f.close()
            raise

    @classmethod
    def open_file(cls, f: HostFile, writable: bool = False, backing: Layer | None = None,
                  **options) -> "Image":
        """Open over an already open HostFile (or a substitute with the same methods,
        e.g. a recording layer in tests); an image with a backing file needs its
        `backing` layer given.  The caller keeps `f` if this raises."""
        header = cls._read_header(f)
        if header.backing_file is not None and backing is None:
            raise UnsupportedError(f"image names backing file {header.backing_file}: open it with Image.open")
        return cls(f, header, writable, backing=backing, **options)

    @classmethod
    def _read_header(cls, f: HostFile) -> Header:
        size = f.size()
        return Header.parse(f.pread(0, min(size, 1 << MAX_CLUSTER_BITS)), size)

    @staticmethod
    def _refuse_unsupported(h: Header, writable: bool) -> None:
        if writable and h.incompatible_features & INCOMPAT_CORRUPT:
            raise UnsupportedError("image is marked corrupt: mount it read-only (-o ro), or repair it "
                                   "with 'qcowfuse check --repair all' first")

    # -- mapping --------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> array.array | None:
        entry = self.l1[l1_index]
        off = entry & L1E_OFFSET_MASK
        if not off:
            return None
        return self.l2.get(off)

    def _host_check(self, off: int, what: str) -> None:
        if off % self.cluster_size:
            raise CorruptError(f"{what} at unaligned host offset {off:#x}")

    def cluster_content(self, entry: int, guest_cluster: int) -> bytes:
        """A guest cluster's whole content given its L2 entry (for copy-on-write)."""
        kind = classify(entry, self.version)
        if kind is ClusterType.NORMAL:
            off = entry & L2E_OFFSET_MASK
            self._host_check(off, "data cluster")
            return self.f.pread(off, self.cluster_size)
        if kind is ClusterType.COMPRESSED:
            return self._compressed(entry)
        if kind is ClusterType.UNALLOCATED and self.backing is not None:
            return self._backing_read(guest_cluster << self.cluster_bits, self.cluster_size)
        return bytes(self.cluster_size)

    def _backing_read(self, offset: int, length: int) -> bytes:
        """Guest bytes from the layer below; zeros past its end."""
        assert self.backing is not None
        avail = max(0, min(length, self.backing.size - offset))
        data = self.backing.read(offset, avail) if avail else b""
        return data if avail == length else data.ljust(length, b"\0")

    def _compressed(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        d = CompressedDescriptor.decode(entry, self.cluster_bits)
        data = self.f.pread_upto(d.offset, d.length)  # may end at EOF
        out = decompress(data, self.cluster_size, self.header.compression_type)
        self._compressed_cache = (entry, out)
        return out

    # -- reading ----------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes [offset, offset+length), clipped at the virtual size (a bytearray
        when assembled from several extents: returned as is, without a copy)."""
        data = self._fast.read(offset, length)
        if data is not None:
            return data
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        with self._lock:
            plan = self._read_plan(offset, length)
            if not plan:
                return bytes(length)  # zeros
            if len(plan) == 1 and plan[0][0] is ClusterType.NORMAL and plan[0][3] == length:
                return self.f.pread(plan[0][1], length)  # one host extent: no extra copy
            out = bytearray(length)
            view = memoryview(out)
            for kind, src, pos, n in plan:
                if kind is ClusterType.NORMAL:
                    self.f.pread_into(src, view[pos:pos + n])
                elif kind is ClusterType.UNALLOCATED:
                    view[pos:pos + n] = self._backing_read(src, n)
                else:  # compressed: src is the L2 entry, n bytes from offset pos-in-cluster
                    in_cl = (offset + pos) & (self.cluster_size - 1)
                    view[pos:pos + n] = self._compressed(src)[in_cl:in_cl + n]
        return out

    def _read_plan(self, offset: int, length: int) -> list[tuple[ClusterType, int, int, int]]:
        """(kind, source offset, position in request, length) extents, merged where both
        the source and the request are contiguous: one pread per host extent.  Zero
        clusters (and unallocated ones without a backing file) need no I/O at all."""
        if self.header.extended_l2:
            return self._read_plan_subclusters(offset, length)
        cb, cs = self.cluster_bits, self.cluster_size
        # entries with these bits are not plain data (the zero flag exists from v3)
        special = QCOW_OFLAG_COMPRESSED | (QCOW_OFLAG_ZERO if self.version >= 3 else 0)
        backing = self.backing is not None
        plan: list[tuple[ClusterType, int, int, int]] = []
        pos = 0
        while pos < length:
            g = (offset + pos) >> cb
            l2i = g & (self.l2_entries - 1)
            table = self._l2_table(g >> self.l2_bits)
            n_cl = min(self.l2_entries - l2i, ((offset + length - 1) >> cb) - g + 1)
            for i in range(l2i, l2i + n_cl):
                voff = offset + pos
                n = min(cs - (voff & (cs - 1)), length - pos)
                entry = table[i] if table is not None else 0
                if entry & L2E_OFFSET_MASK and not entry & special:
                    host = entry & L2E_OFFSET_MASK
                    self._host_check(host, "data cluster")
                    _add_extent(plan, ClusterType.NORMAL, host + (voff & (cs - 1)), pos, n)
                elif entry & QCOW_OFLAG_COMPRESSED:
                    _add_extent(plan, ClusterType.COMPRESSED, entry, pos, n)
                elif backing and not entry & (L2E_OFFSET_MASK | special):
                    _add_extent(plan, ClusterType.UNALLOCATED, voff, pos, n)
                pos += n
        return plan

    def _read_plan_subclusters(self, offset: int, length: int) -> list[tuple[ClusterType, int, int, int]]:
        """The same for extended L2 entries (incompatible bit 4): 128-bit entries whose
        second word holds, per subcluster (cluster/32), an "allocated" bit (low 32)
        and a "reads as zeros" bit (high 32); compressed clusters ignore the bitmap."""
        cb, cs = self.cluster_bits, self.cluster_size
        sc_bits = cb - 5
        sc = 1 << sc_bits
        backing = self.backing is not None
        plan: list[tuple[ClusterType, int, int, int]] = []
        pos = 0
        while pos < length:
            voff = offset + pos
            g = voff >> cb
            table = self._l2_table(g >> self.l2_bits)
            i = 2 * (g & (self.l2_entries - 1))
            entry, bitmap = (table[i], table[i + 1]) if table is not None else (0, 0)
            if entry & QCOW_OFLAG_COMPRESSED:
                n = min(cs - (voff & (cs - 1)), length - pos)
                _add_extent(plan, ClusterType.COMPRESSED, entry, pos, n)
                pos += n
                continue
            sub = (voff >> sc_bits) & 31
            n = min(sc - (voff & (sc - 1)), length - pos)
            if bitmap >> sub & 1:
                host = entry & L2E_OFFSET_MASK
                self._host_check(host, "data cluster")
                _add_extent(plan, ClusterType.NORMAL, host + (voff & (cs - 1)), pos, n)
            elif not bitmap >> (32 + sub) & 1 and backing:
                _add_extent(plan, ClusterType.UNALLOCATED, voff, pos, n)
            pos += n
        return plan

    # -- writing ------------------------------------------------------------------

    def _prepare_for_write(self) -> None:
        """First write only: clear autoclear bits we do not maintain (spec: a writer
        that does not know a bit must clear it), after checking the metadata's own
        refcounts so that no allocation can ever land on a cluster in use."""
        if self._prepared:
            return
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            self._repair_dirty()
        self._check_metadata_refcounts()
        h = self.header
        if h.version >= 3 and h.autoclear_features:
            h.autoclear_features = 0  # bitmaps (bit 0) become stale once we write
            self.f.pwrite(OFF_AUTOCLEAR_FEATURES, struct.pack(">Q", 0))
            self.f.sync()
        self._prepared = True

    def _repair_dirty(self) -> None:
        """A writer with lazy refcounts (compatible bit 0) died: its refcounts may be
        too low.  Rebuild them before allocating anything, as QEMU does on open."""
        from .qcow2.check import Checker  # check walks an Image: import at call time

        report = Checker(self).run("all")
        if report.corruptions or report.check_errors:
            raise CorruptError("image was not closed cleanly and its refcounts could not be "
                               "repaired: run 'qcowfuse check --repair all'")
        log.warning("image was not closed cleanly (lazy refcounts): refcounts repaired "
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
        return out

    def _metadata_set(self) -> frozenset[int]:
        """Host clusters that guest data must never be written to (QEMU's overlap check),
        rebuilt only when the metadata layout changed."""
        key = (self.rc.generation, self.header.refcount_table_offset, self._l1_generation)
        if self._meta_key != key:
            self._meta = frozenset(c for _, c in self.metadata_clusters())
            self._meta_key = key
        return self._meta

    def _check_data_target(self, first: int, count: int) -> None:
        """Refuse guest data headed for metadata or for a cluster past the end of the file."""
        meta = self._metadata_set()
        for c in range(first, first + count):
            if c in meta:
                raise CorruptError(f"data cluster {c} overlaps metadata; refusing to overwrite it")
        if (first + count) << self.cluster_bits > self.f.end():
            raise CorruptError(f"data cluster {first + count - 1} lies past the end of the image file")

    def _check_metadata_refcounts(self) -> None:
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
            log.warning("healed refcount 0 of in-use metadata clusters: %s", ", ".join(healed))

    def _l2_for_write(self, l1_index: int) -> array.array:
        """The active L2 table for l1_index, allocated or copied on write if needed."""
        entry = self.l1[l1_index]
        off = entry & L1E_OFFSET_MASK
        if off and entry & QCOW_OFLAG_COPIED:
            return self.l2.get(off)
        if off:
            self._host_check(off, "L2 table")
            if self.rc.get(off >> self.cluster_bits) == 1:
                # refcount 1 without COPIED (older writers): ours to change in place
                self.l1[l1_index] = off | QCOW_OFLAG_COPIED
                self.l1_dirty.add(l1_index)
                return self.l2.get(off)
            table = array.array("Q", self.l2.get(off))  # shared with a snapshot
        else:
            table = array.array("Q", bytes(self.cluster_size))
        new = self.alloc.alloc() << self.cluster_bits
        self._check_fresh(new >> self.cluster_bits, 1)
        self.l2.install(new, table)
        self.l1[l1_index] = new | QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        self._l1_generation += 1
        if off:
            self.alloc.free_later(off >> self.cluster_bits)
        return table

    def _in_place(self, entry: int) -> bool:
        """Normal cluster this layer owns alone (COPIED, or refcount 1)."""
        if classify(entry, self.version) is not ClusterType.NORMAL:
            return False
        if entry & QCOW_OFLAG_COPIED:
            return True
        return self.rc.get((entry & L2E_OFFSET_MASK) >> self.cluster_bits) == 1

    def _reusable_zero_alloc(self, entry: int) -> bool:
        if classify(entry, self.version) is not ClusterType.ZERO_ALLOC:
            return False
        return bool(entry & QCOW_OFLAG_COPIED) or \
            self.rc.get((entry & L2E_OFFSET_MASK) >> self.cluster_bits) == 1

    def _release(self, entry: int) -> None:
        """Drop (after the next table sync) the reference an overwritten L2 entry held."""
        kind = classify(entry, self.version)
        if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            self.alloc.free_later((entry & L2E_OFFSET_MASK) >> self.cluster_bits)
        elif kind is ClusterType.COMPRESSED:
            for c in CompressedDescriptor.decode(entry, self.cluster_bits).host_clusters(self.cluster_bits):
                self.alloc.free_later(c)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write guest bytes at offset; returns the number written (all of them)."""
        view = memoryview(data).cast("B")
        length = len(view)
        if not self.writable:
            raise ReadOnlyError("image is open read-only")
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"write of {length} bytes at {offset} is beyond the virtual size {self.size}")
        with self._lock:
            if self._corrupt:
                raise CorruptError("image was marked corrupt; writes are refused until it is repaired")
            try:
                self._write_locked(offset, view)
            except CorruptError as e:
                self.mark_corrupt(str(e))
                raise
        return length

    def _write_locked(self, offset: int, view: memoryview) -> None:
        length = len(view)
        cb, cs = self.cluster_bits, self.cluster_size
        self._prepare_for_write()
        if self._fast.write(offset, view):
            return
        if self.header.extended_l2:
            self._write_subclusters(offset, view)
            return
        pos = 0
        while pos < length:
            voff = offset + pos
            g = voff >> cb
            in_cl = voff & (cs - 1)
            l1i, l2i = g >> self.l2_bits, g & (self.l2_entries - 1)
            table = self._l2_for_write(l1i)
            stop = min(self.l2_entries, l2i + ((offset + length - 1) >> cb) - g + 1)
            if self._zero_cluster:
                n = min(length - pos, cs - in_cl)
                if write_zero_piece(self, table, l1i, l2i, g, in_cl, view[pos:pos + n], self._zero_cluster):
                    pos += n
                    continue
                stop = l2i + 1  # look at every cluster on its own
            entry = table[l2i]
            if self._reusable_zero_alloc(entry):
                # zero flag over a cluster we own: reuse it, as QEMU does
                host = entry & L2E_OFFSET_MASK
                n = min(length - pos, cs - in_cl)
                self._host_check(host, "data cluster")
                self._check_data_target(host >> cb, 1)
                buf = bytearray(cs)
                buf[in_cl:in_cl + n] = view[pos:pos + n]
                self.f.pwrite(host, buf)
                table[l2i] = host | QCOW_OFLAG_COPIED
                self.l2.mark_dirty(self._l2_offset(l1i))
            elif self._in_place(entry):
                host = entry & L2E_OFFSET_MASK
                self._host_check(host, "data cluster")
                j = l2i + 1
                while j < stop and (table[j] & L2E_OFFSET_MASK) == host + (j - l2i) * cs \
                        and self._in_place(table[j]):
                    j += 1
                for i in range(l2i, j):
                    if not table[i] & QCOW_OFLAG_COPIED:
                        table[i] |= QCOW_OFLAG_COPIED
                        self.l2.mark_dirty(self._l2_offset(l1i))
                n = min(length - pos, (j - l2i) * cs - in_cl)
                self._check_data_target(host >> cb, -(-(in_cl + n) // cs))
                self.f.pwrite(host + in_cl, view[pos:pos + n])
            else:
                j = l2i + 1
                while j < stop and not self._in_place(table[j]):
                    j += 1
                first, count = self.alloc.alloc_run(j - l2i)
                self._check_fresh(first, count)
                n = min(length - pos, count * cs - in_cl)
                self._write_new(first << cb, table, l2i, g, count, in_cl, view[pos:pos + n])
                for k in range(count):
                    old = table[l2i + k]
                    table[l2i + k] = ((first + k) << cb) | QCOW_OFLAG_COPIED
                    self._release(old)
                self.l2.mark_dirty(self._l2_offset(l1i))
            pos += n
        if self.l2.over_budget:
            self.flush()

    # -- extended L2: subclusters (docs/interop/qcow2.rst, "Extended L2 Entries") --------

    def _subcluster_content(self, entry: int, bitmap: int, guest_cluster: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of a guest cluster as an extended L2 entry describes them:
        allocated subclusters from the host cluster, zero ones as zeros, the rest from
        the backing file (or zeros)."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return self._compressed(entry)[start:end]
        sc_bits = self.cluster_bits - 5
        host = entry & L2E_OFFSET_MASK
        base = guest_cluster << self.cluster_bits
        out = bytearray(end - start)
        for sub in range(start >> sc_bits, ((end - 1) >> sc_bits) + 1):
            a, b = max(start, sub << sc_bits), min(end, (sub + 1) << sc_bits)
            if bitmap >> sub & 1:
                out[a - start:b - start] = self.f.pread(host + a, b - a)
            elif not bitmap >> (32 + sub) & 1 and self.backing is not None:
                out[a - start:b - start] = self._backing_read(base + a, b - a)
        return bytes(out)

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
            table = self._l2_for_write(l1i)
            entry, bitmap = table[idx], table[idx + 1]
            first_sc, last_sc = in_cl >> sc_bits, (in_cl + n - 1) >> sc_bits
            touched = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
            start, end = first_sc << sc_bits, (last_sc + 1) << sc_bits
            host = entry & L2E_OFFSET_MASK
            compressed = bool(entry & QCOW_OFLAG_COMPRESSED)
            owned = bool(host) and not compressed and (
                bool(entry & QCOW_OFLAG_COPIED) or self.rc.get(host >> cb) == 1)
            if owned:
                self._host_check(host, "data cluster")
                self._check_data_target(host >> cb, 1)
                buf = bytearray(self._subcluster_content(entry, bitmap, g, start, end))
                buf[in_cl - start:in_cl - start + n] = view[pos:pos + n]
                self.f.pwrite(host + start, buf)
                new_bitmap = (bitmap | touched) & ~(touched << 32)
                new_host = host
            else:
                new_host = self.alloc.alloc() << cb
                self._check_fresh(new_host >> cb, 1)
                if compressed or host:  # replace compressed or shared data: copy it whole
                    buf = bytearray(self._subcluster_content(entry, bitmap, g, 0, cs))
                    buf[in_cl:in_cl + n] = view[pos:pos + n]
                    self.f.pwrite(new_host, buf)
                    new_bitmap = 0xFFFFFFFF
                    self._release(entry)
                else:
                    buf = bytearray(self._subcluster_content(entry, bitmap, g, start, end))
                    buf[in_cl - start:in_cl - start + n] = view[pos:pos + n]
                    self.f.pwrite(new_host + start, buf)
                    self.f.extend_to(new_host + cs)
                    new_bitmap = (bitmap & ~(touched << 32) & 0xFFFFFFFF00000000) | touched
            table[idx] = new_host | QCOW_OFLAG_COPIED
            table[idx + 1] = new_bitmap
            self.l2.mark_dirty(self._l2_offset(l1i))
            pos += n
        if self.l2.over_budget:
            self.flush()

    def _check_fresh(self, first: int, count: int) -> None:
        """A newly allocated run must not be metadata (a refcount of 0 on a table)."""
        meta = self._metadata_set()
        for c in range(first, first + count):
            if c in meta:
                raise CorruptError(f"cluster {c} is in use as metadata but has refcount 0")

    def _l2_offset(self, l1_index: int) -> int:
        return self.l1[l1_index] & L1E_OFFSET_MASK

    def _write_new(self, host: int, table: array.array, l2i: int, guest_cluster: int, count: int,
                   in_cl: int, data: memoryview) -> None:
        """Write `data` at in_cl into `count` fresh host clusters, filling partial
        head and tail clusters from the guest clusters' old content."""
        cs = self.cluster_size
        end = in_cl + len(data)
        total = count * cs
        if in_cl == 0 and end == total:
            self.f.pwrite(host, data)
            return
        last = (end - 1) // cs
        head_zero = in_cl == 0 or self._reads_as_zeros(table[l2i])
        tail_zero = end % cs == 0 or self._reads_as_zeros(table[l2i + last])
        if head_zero and tail_zero and host >= self.f.end():
            # Past the end of the file the host reads zeros already (a hole): write only
            # the data and make the file cover the clusters, instead of 16x the bytes.
            self.f.pwrite(host + in_cl, data)
            self.f.extend_to(host + total)
            return
        buf = bytearray(total)
        if not head_zero:
            buf[:cs] = self.cluster_content(table[l2i], guest_cluster)
        if not tail_zero:
            buf[last * cs:(last + 1) * cs] = self.cluster_content(table[l2i + last], guest_cluster + last)
        buf[in_cl:end] = data
        self.f.pwrite(host, buf)

    def _reads_as_zeros(self, entry: int) -> bool:
        """Known to read as zeros without any I/O (zero flag, or nothing below)."""
        kind = classify(entry, self.version)
        return kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC) or (
            kind is ClusterType.UNALLOCATED and self.backing is None)

    # -- durability -----------------------------------------------------------------

    def flush(self) -> None:
        """Make every earlier write durable, in crash-safe order."""
        if not self.writable:
            return
        with self._lock:
            f = self.f
            self.rc.flush()
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
                freed = self.alloc.release_pending()  # references are gone from disk now
                self.rc.flush()
                if self.detect_zeroes == "unmap":
                    for c in freed:  # nothing can reuse them before this returns
                        f.punch_hole(c << self.cluster_bits, self.cluster_size)
            if f.unsynced:
                f.sync()

    def close(self) -> None:
        if self.f.fd < 0:
            return
        try:
            self.flush()
        finally:
            self.f.close()
            if self.backing is not None:
                self.backing.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- marking the image corrupt (QEMU's qcow2_signal_corruption) -------------------

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
        if not self.writable or self._corrupt:
            return
        self._corrupt = True
        log.error("marking image corrupt: %s", reason)
        if self.version < 3:
            return
        self.header.incompatible_features |= INCOMPAT_CORRUPT
        self.f.pwrite(OFF_INCOMPATIBLE_FEATURES, struct.pack(">Q", self.header.incompatible_features))
        self.f.sync()

