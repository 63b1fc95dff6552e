"""Compressed cluster descriptors and decompression (docs/interop/qcow2.rst, "Compressed Clusters Descriptor").

With x = 62 - (cluster_bits - 8): bits 0..x-1 hold the host byte offset of the
compressed data, bits x..61 the number of additional 512-byte sectors it spans.
Deflate data is a raw stream (no zlib header); zstd data is plain zstd frames.
Either may be followed by padding, so decompression stops at one cluster.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..errors import CorruptError
from .header import COMPRESSION_ZSTD

SECTOR = 512


@dataclass(frozen=True)
class CompressedDescriptor:
    offset: int  # host byte offset of the compressed data (not aligned)
    sectors: int  # number of 512-byte sectors the data may span, counted from offset & ~511

    @classmethod
    def decode(cls, entry: int, cluster_bits: int) -> "CompressedDescriptor":
        x = 62 - (cluster_bits - 8)
        offset = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
        return cls(offset, sectors)

    @property
    def length(self) -> int:
        """Bytes to read from `offset`."""
        return self.sectors * SECTOR - (self.offset % SECTOR)

    def host_clusters(self, cluster_bits: int) -> range:
        """Host clusters this data occupies; each holds one reference for it."""
        first = self.offset & ~(SECTOR - 1)
        last = first + self.sectors * SECTOR - 1
        return range(first >> cluster_bits, (last >> cluster_bits) + 1)


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    try:
        if compression_type == COMPRESSION_ZSTD:
            import zstandard  # imported by the first zstd cluster read, not by every command

            try:
                out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            except zstandard.ZstdError as e:
                raise ValueError(str(e)) from None
        else:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except (zlib.error, ValueError) as e:
        raise CorruptError(f"compressed cluster does not decompress: {e}") from None
    if len(out) < cluster_size:
        raise CorruptError("compressed cluster decompresses to less than a cluster")
    return out[:cluster_size]
