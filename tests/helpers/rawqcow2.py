"""A deliberately separate, minimal qcow2 refcount reader for tests.

It shares no code with the engine, so a test that uses it does not trust the
writer's own reader to judge the writer.
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
