"""The read path: a guest range becomes a read plan (host extents, zeros, backing
file, compressed clusters), then one pread per host extent.

A mixin of Image (qcowfuse/image.py), as QEMU's block/qcow2-cluster.c works on the
one BDRVQcow2State: it uses the image's f, header, version, geometry (cluster_bits,
cluster_size, l2_bits, l2_entries, size), l1, l2 cache, backing layer and lock.
It changes nothing on disk.
"""

from __future__ import annotations

import array

from ..errors import CorruptError, NeedsPassphrase
from .compressed import decompress
from .format import (
    SECTOR, L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, SUBCLUSTER_ZERO_SHIFT,
    SUBCLUSTERS, ClusterType, CompressedDescriptor, classify, offset_zero_flag, plain_data_flags)
from .state import ImageState


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


class ReadPath(ImageState):
    def l2_table(self, l1_index: int) -> array.array[int] | None:
        entry = self.l1[l1_index]
        off = entry & L1E_OFFSET_MASK
        if not off:
            return None
        return self.l2.get(off)

    def host_check(self, off: int, what: str) -> None:
        if off % self.cluster_size:
            raise CorruptError(f"{what} at unaligned host offset {off:#x}")

    def data_pread(self, host: int, length: int) -> bytes:
        """Guest data at a host offset: the one place encrypted data is decrypted (whole
        512-byte sectors, as LUKS encrypts them, the IV from the host sector number)."""
        crypto = self.crypto
        if crypto is None:
            if self.header.crypt_method:
                raise NeedsPassphrase("the image is encrypted and was opened without its passphrase")
            return self.data.pread(host, length)
        first = host // SECTOR
        end = -(-(host + length) // SECTOR)
        plain = crypto.decrypt(self.data.pread(first * SECTOR, (end - first) * SECTOR), first)
        skip = host - first * SECTOR
        return plain[skip:skip + length]

    def cluster_content(self, entry: int, guest_cluster: int) -> bytes | bytearray:
        """A guest cluster's whole content given its L2 entry (for copy-on-write)."""
        kind = classify(entry, self.version, self.data_file)
        if kind is ClusterType.NORMAL:
            off = entry & L2E_OFFSET_MASK
            self.host_check(off, "data cluster")
            return self.data_pread(off, self.cluster_size)
        if kind is ClusterType.COMPRESSED:
            return self._compressed(entry)
        if kind is ClusterType.UNALLOCATED and self.backing is not None:
            return self._backing_read(guest_cluster << self.cluster_bits, self.cluster_size)
        return bytes(self.cluster_size)

    def _backing_read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes from the layer below; zeros past its end."""
        assert self.backing is not None
        avail = max(0, min(length, self.backing.size - offset))
        data = self.backing.read(offset, avail) if avail else b""
        return data if avail == length else data.ljust(length, b"\0")

    def _compressed(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        if self.data_file:
            raise CorruptError("compressed cluster in an image with an external data file")
        d = CompressedDescriptor.decode(entry, self.cluster_bits)
        data = self.f.pread_upto(d.offset, d.length)  # may end at EOF
        out = decompress(data, self.cluster_size, self.header.compression_type)
        self._compressed_cache = (entry, out)
        return out

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes [offset, offset+length), clipped at the virtual size (a bytearray
        when assembled from several extents: returned as is, without a copy)."""
        data = self.fast.read(offset, length)
        if data is not None:
            return data
        return self._read_general(offset, length)

    def _read_general(self, offset: int, length: int) -> bytes | bytearray:
        """read, where the fast path declined (or was not asked: FastPath.unlocked)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self.lock:  # the size too: a resize in another thread may shrink it meanwhile
            length = max(0, min(length, self.size - offset))
            plan = self._read_plan(offset, length)
            if not plan:
                return bytes(length)  # zeros
            if len(plan) == 1 and plan[0][0] is ClusterType.NORMAL and plan[0][3] == length:
                return self.data_pread(plan[0][1], length)  # one host extent: no extra copy
            out = bytearray(length)
            view = memoryview(out)
            for kind, src, pos, n in plan:
                if kind is ClusterType.NORMAL and not self.header.crypt_method:
                    self.data.pread_into(src, view[pos:pos + n])
                elif kind is ClusterType.NORMAL:
                    view[pos:pos + n] = self.data_pread(src, n)
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
        special = plain_data_flags(self.version)
        mapped = L2E_OFFSET_MASK | offset_zero_flag(self.data_file)  # plain data at host 0 too
        backing = self.backing is not None
        plan: list[tuple[ClusterType, int, int, int]] = []
        pos = 0
        while pos < length:
            g = (offset + pos) >> cb
            l2i = g & (self.l2_entries - 1)
            table = self.l2_table(g >> self.l2_bits)
            n_cl = min(self.l2_entries - l2i, ((offset + length - 1) >> cb) - g + 1)
            for i in range(l2i, l2i + n_cl):
                voff = offset + pos
                n = min(cs - (voff & (cs - 1)), length - pos)
                entry = table[i] if table is not None else 0
                if entry & mapped and not entry & special:
                    host = entry & L2E_OFFSET_MASK
                    self.host_check(host, "data cluster")
                    _add_extent(plan, ClusterType.NORMAL, host + (voff & (cs - 1)), pos, n)
                elif entry & QCOW_OFLAG_COMPRESSED:
                    _add_extent(plan, ClusterType.COMPRESSED, entry, pos, n)
                elif backing and not entry & (mapped | special):
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
            table = self.l2_table(g >> self.l2_bits)
            i = 2 * (g & (self.l2_entries - 1))
            entry, bitmap = (table[i], table[i + 1]) if table is not None else (0, 0)
            if entry & QCOW_OFLAG_COMPRESSED:
                n = min(cs - (voff & (cs - 1)), length - pos)
                _add_extent(plan, ClusterType.COMPRESSED, entry, pos, n)
                pos += n
                continue
            sub = (voff >> sc_bits) & (SUBCLUSTERS - 1)
            n = min(sc - (voff & (sc - 1)), length - pos)
            if bitmap >> sub & 1:
                host = entry & L2E_OFFSET_MASK
                self.host_check(host, "data cluster")
                _add_extent(plan, ClusterType.NORMAL, host + (voff & (cs - 1)), pos, n)
            elif not bitmap >> (SUBCLUSTER_ZERO_SHIFT + sub) & 1 and backing:
                _add_extent(plan, ClusterType.UNALLOCATED, voff, pos, n)
            pos += n
        return plan

    def subcluster_content(self, entry: int, bitmap: int, guest_cluster: int, start: int, end: int) -> bytes:
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
                out[a - start:b - start] = self.data_pread(host + a, b - a)
            elif not bitmap >> (SUBCLUSTER_ZERO_SHIFT + sub) & 1 and self.backing is not None:
                out[a - start:b - start] = self._backing_read(base + a, b - a)
        return bytes(out)
