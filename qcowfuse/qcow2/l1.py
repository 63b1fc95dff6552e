"""Moving the active L1 table to a larger place (QEMU's qcow2_grow_l1_table).

The L1 table is one contiguous run of clusters named by the header's l1_size
(offset 36, u32) and l1_table_offset (offset 40, u64).  The two fields are
adjacent, so one 12-byte write switches both.  Growing is crash safe in this
order:

    count the new clusters -> refcounts on disk -> write the new table -> sync
    -> header switch (one write) -> [caller] sync (its flush) -> old table released

A crash before the switch leaves the old table in charge (the new clusters are
only leaked); after it, the new table is complete on disk.  Memory follows the
header as soon as the switch is written: should the sync after it fail (EIO), the
file (its page cache at least) already names the new table, so later L1 updates
must go there, not to the old table a later sync would orphan.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Callable

from ..errors import FormatError
from ..hostfile import HostFile
from .header import MAX_L1_BYTES, Header
from .allocator import alloc_contiguous
from .refcounts import RefcountStore
from .format import encode_table

# docs/interop/qcow2.rst, "Header": l1_size (u32) at 36, l1_table_offset (u64) at 40.
OFF_L1_SIZE = 36
L1E_SIZE = 8


def l1_entries_for(size: int, cluster_size: int, l2_bits: int) -> int:
    """L1 entries a virtual size needs: one per L2 table's span of guest bytes."""
    return -(-size // (cluster_size << l2_bits))


def grow_l1_table(f: HostFile, header: Header, rc: RefcountStore, l1: array.array[int],
                  new_l1_size: int, check_fresh: Callable[[int, int], None]) -> tuple[array.array[int], list[int]]:
    """Write a copy of `l1` grown to `new_l1_size` entries in new clusters and switch
    the header to it.  The caller must have flushed every dirty table first (the
    copy is taken from memory and must not point at L2 tables not yet on disk).

    Returns the new table, which the caller installs at once, and the old table's
    clusters, which it frees deferred (as any dropped reference) and then flushes:
    that flush syncs the switch before the old clusters are released.
    check_fresh(first, count) refuses clusters that are in use as metadata."""
    if new_l1_size * L1E_SIZE > MAX_L1_BYTES:
        raise FormatError("Failed to grow the L1 table: File too large")
    assert new_l1_size > len(l1) == header.l1_size
    cs, cb = header.cluster_size, header.cluster_bits
    nbytes = new_l1_size * L1E_SIZE
    nclusters = -(-nbytes // cs)
    first = alloc_contiguous(rc, nclusters)
    offset = first << cb
    try:
        check_fresh(first, nclusters)
        rc.flush()  # the new clusters are counted on disk before anything names them
        new = array.array("Q", l1)
        new.extend(array.array("Q", bytes(nbytes - len(l1) * L1E_SIZE)))
        f.pwrite(offset, encode_table(new).ljust(nclusters * cs, b"\0"))
        f.sync()
    except BaseException:
        for c in range(first, first + nclusters):
            rc.add(c, -1)  # nothing refers to them: give them back
        raise
    old_first = header.l1_table_offset >> cb
    old = list(range(old_first, old_first + -(-header.l1_size * L1E_SIZE // cs))) if header.l1_size else []
    f.pwrite(OFF_L1_SIZE, struct.pack(">IQ", new_l1_size, offset))
    header.l1_size, header.l1_table_offset = new_l1_size, offset  # the file names it now
    return new, old
