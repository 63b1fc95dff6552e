"""A deliberately separate, minimal qcow2 reader and poker for tests.

It shares no code with the engine, so a test that uses it does not trust the
writer's own reader to judge the writer, and a test that damages an image on
purpose does not depend on the code it is testing.

RefcountView reads and sets refcounts; RawImage reads and patches header fields,
L1 entries and the L2 entries of the first L2 table.
"""

from __future__ import annotations

import struct
from pathlib import Path


class RefcountView:
    def __init__(self, path: Path) -> None:
        self.fh = open(path, "rb")
        d = self._read(0, 104)
        self.cluster_bits = struct.unpack_from(">I", d, 20)[0]
        self.cluster_size = 1 << self.cluster_bits
        self.version = struct.unpack_from(">I", d, 4)[0]
        self.refcount_order = struct.unpack_from(">I", d, 96)[0] if self.version == 3 else 4
        self.bits = 1 << self.refcount_order
        self.table_offset, self.table_clusters = struct.unpack_from(">QI", d, 48)
        n = self.table_clusters * self.cluster_size // 8
        raw = self._read(self.table_offset, n * 8)
        self.table = [e & ~0x1FF for e in struct.unpack(f">{n}Q", raw)]
        self.per_block = self.cluster_size * 8 // self.bits

    def refcount(self, cluster: int) -> int:
        block, index = divmod(cluster, self.per_block)
        if block >= len(self.table) or not self.table[block]:
            return 0
        base = self.table[block]
        bit = index * self.bits
        if self.bits >= 8:
            return int.from_bytes(self._read(base + bit // 8, self.bits // 8), "big")
        byte = self._read(base + bit // 8, 1)[0]
        return (byte >> (bit % 8)) & ((1 << self.bits) - 1)

    def _read(self, offset: int, length: int) -> bytes:
        self.fh.seek(offset)
        data = self.fh.read(length)
        assert len(data) == length, f"read past the end of the image at {offset:#x}"
        return data

    def set_refcount(self, cluster: int, value: int) -> None:
        """Damage an image on purpose: overwrite one stored refcount."""
        block, index = divmod(cluster, self.per_block)
        base = self.table[block]
        assert base, f"no refcount block covers cluster {cluster}"
        bit = index * self.bits
        with open(self.fh.name, "r+b") as out:
            if self.bits >= 8:
                out.seek(base + bit // 8)
                out.write(value.to_bytes(self.bits // 8, "big"))
            else:
                byte = self._read(base + bit // 8, 1)[0]
                mask = ((1 << self.bits) - 1) << (bit % 8)
                out.seek(base + bit // 8)
                out.write(bytes([(byte & ~mask) | (value << (bit % 8))]))

    def refblock_clusters(self) -> list[int]:
        return [off >> self.cluster_bits for off in self.table if off]

    def table_cluster_range(self) -> range:
        first = self.table_offset >> self.cluster_bits
        return range(first, first + self.table_clusters)


COPIED = 1 << 63  # L1 / L2 entry flag: refcount is exactly one
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # host offset bits of an L1 entry


class RawImage:
    """Just enough of the format to damage an image on purpose (no engine code): 64-bit
    words anywhere, and the entries of the first L2 table (the one L1[0] points to)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            d = fh.read(104)
        self.cluster_bits = struct.unpack_from(">I", d, 20)[0]
        self.l1 = struct.unpack_from(">Q", d, 40)[0]  # L1 table offset
        self.reftable = struct.unpack_from(">Q", d, 48)[0]  # refcount table offset
        version = struct.unpack_from(">I", d, 4)[0]
        self.extended = version >= 3 and struct.unpack_from(">Q", d, 72)[0] & 16 != 0

    def u64(self, pos: int) -> int:
        with open(self.path, "rb") as fh:
            fh.seek(pos)
            return struct.unpack(">Q", fh.read(8))[0]

    def put(self, pos: int, value: int) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(pos)
            fh.write(struct.pack(">Q", value))

    def l2_offset(self) -> int:
        """File offset of the first L2 table."""
        return self.u64(self.l1) & L2_OFFSET_MASK

    def l2_entry_pos(self, guest_cluster: int, word: int = 0) -> int:
        """File offset of a guest cluster's L2 entry in the first L2 table (word 1: the
        subcluster bitmap of an extended L2 entry)."""
        return self.l2_offset() + (16 if self.extended else 8) * guest_cluster + 8 * word

    def set_l2_entry(self, guest_cluster: int, value: int) -> None:
        self.put(self.l2_entry_pos(guest_cluster), value)
