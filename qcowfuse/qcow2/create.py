"""Making a new, empty qcow2 image (what `qemu-img create -f qcow2` writes).

Version 3, 16-bit refcounts, deflate, standard L2 entries; optionally a backing
file (by name, with the backing-format extension).  The layout is QEMU's: the
header in cluster 0 (backing file name after the extensions), then the refcount
table, the refcount blocks that count every one of these clusters (themselves
included), then the L1 table, all zero.  Nothing refers to a cluster whose
refcount is not on disk first: the file is written whole and synced before
anyone opens it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import QcowError
from ..hostfile import HostFile
from .format import RefblockCodec
from .header import (
    EXT_BACKING_FORMAT, EXT_END, MAX_BACKING_FILE_SIZE, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS,
    V3_HEADER_LENGTH, Header)
from .l1 import l1_entries_for

REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
# header_length of a version 3 header with the compression_type field, padded to 8
HEADER_LENGTH = V3_HEADER_LENGTH + 8


@dataclass(frozen=True)
class Layout:
    """Where the metadata of a new image goes, in clusters."""
    reftable: int  # first cluster of the refcount table
    reftable_clusters: int
    refblocks: int  # first refcount block
    refblock_count: int
    l1: int  # first cluster of the L1 table
    l1_entries: int
    l1_clusters: int

    @property
    def clusters(self) -> int:
        """Clusters in use: all of the above and the header."""
        return self.l1 + self.l1_clusters


def plan(size: int, cluster_bits: int) -> Layout:
    cs = 1 << cluster_bits
    l1_entries = l1_entries_for(size, cs, cluster_bits - 3)
    l1_clusters = -(-l1_entries * 8 // cs)
    per_block = cs * 8 >> REFCOUNT_ORDER
    blocks, table = 1, 1
    while True:  # the refcount structures count themselves: grow them until they fit
        total = 1 + table + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = max(blocks, need_blocks), max(table, need_table)
    return Layout(1, table, 1 + table, blocks, 1 + table + blocks, l1_entries, l1_clusters)


def header_cluster(size: int, cluster_bits: int, layout: Layout, backing_file: str | None,
                   backing_format: str | None) -> bytes:
    cs = 1 << cluster_bits
    ext = b""
    if backing_format is not None:
        name = backing_format.encode()
        ext += struct.pack(">II", EXT_BACKING_FORMAT, len(name)) + name + bytes(-len(name) % 8)
    ext += struct.pack(">II", EXT_END, 0)
    backing = backing_file.encode("utf-8", "surrogateescape") if backing_file is not None else b""
    if len(backing) > MAX_BACKING_FILE_SIZE:
        raise QcowError(f"backing file name too long ({len(backing)} bytes)")
    backing_offset = HEADER_LENGTH + len(ext) if backing_file is not None else 0
    if backing_offset + len(backing) > cs:
        raise QcowError("backing file name does not fit in the first cluster")
    h = Header(version=3, backing_file_offset=backing_offset, backing_file_size=len(backing),
               cluster_bits=cluster_bits, size=size, crypt_method=0, l1_size=layout.l1_entries,
               l1_table_offset=layout.l1 * cs, refcount_table_offset=layout.reftable * cs,
               refcount_table_clusters=layout.reftable_clusters, nb_snapshots=0,
               snapshots_offset=0, refcount_order=REFCOUNT_ORDER, header_length=HEADER_LENGTH)
    fixed = h.pack_fixed()
    fixed += bytes(HEADER_LENGTH - len(fixed))  # compression_type 0 (deflate) and padding
    return (fixed + ext + backing).ljust(cs, b"\0")


def write_new_image(f: HostFile, size: int, cluster_bits: int, backing_file: str | None = None,
                    backing_format: str | None = None) -> None:
    """Write an empty image into the empty file `f` and sync it."""
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise QcowError(f"cluster size {1 << cluster_bits} is outside 512 B..2 MiB")
    cs = 1 << cluster_bits
    layout = plan(size, cluster_bits)
    if layout.l1_entries * 8 > MAX_L1_BYTES:
        raise QcowError(f"a {size}-byte disk needs an L1 table larger than QEMU's limit at "
                        f"{cs}-byte clusters")
    codec = RefblockCodec(cs, REFCOUNT_ORDER)
    f.pwrite(0, header_cluster(size, cluster_bits, layout, backing_file, backing_format))
    table = [(layout.refblocks + b) * cs for b in range(layout.refblock_count)]
    f.pwrite(layout.reftable * cs, struct.pack(f">{len(table)}Q", *table)
             .ljust(layout.reftable_clusters * cs, b"\0"))
    for b in range(layout.refblock_count):
        values = codec.zeros()
        first = b * codec.entries
        for c in range(first, min(first + codec.entries, layout.clusters)):
            values[c - first] = 1
        f.pwrite((layout.refblocks + b) * cs, codec.encode(values))
    os.ftruncate(f.fd, layout.clusters * cs)  # the L1 table: zeros
    f.sync()


def create_image_file(path: str, size: int, cluster_bits: int, backing_file: str | None = None,
                      backing_format: str | None = None) -> None:
    """A new image file at `path`, which must not exist; it appears whole or not at all
    (written under a temporary name beside it, synced, then renamed)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.new")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise QcowError(f"{path}: cannot create: {e.strerror}") from None
    f = HostFile(fd, tmp)
    try:
        write_new_image(f, size, cluster_bits, backing_file, backing_format)
        f.close()
        os.link(tmp, path)  # fails if path appeared meanwhile: never replaces a file
    except FileExistsError:
        raise QcowError(f"{path}: already exists") from None
    except OSError as e:
        raise QcowError(f"{path}: cannot create: {e.strerror}") from None
    finally:
        f.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
