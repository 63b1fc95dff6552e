"""Decompressing compressed clusters (docs/interop/qcow2.rst, "Compressed Clusters
Descriptor"; the descriptor itself is format.CompressedDescriptor).

Deflate data is a raw stream (no zlib header); zstd data is plain zstd frames.
Either may be followed by padding, so decompression stops at one cluster.
"""

from __future__ import annotations

import zlib

from ..errors import CorruptError
from .header import COMPRESSION_ZSTD


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
