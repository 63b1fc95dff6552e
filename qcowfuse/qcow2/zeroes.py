"""detect-zeroes: guest writes of zeros become zero clusters, whatever the request split.

QEMU's detect-zeroes turns a write of zeros into a write-zeroes request, and its qcow2
driver makes a cluster a zero cluster when the request, together with what the rest of
the cluster already reads as, leaves the whole cluster zero (qcow2_co_pwrite_zeroes:
is_zero over the head and tail of the cluster).  The kernel splits FUSE requests at its
own boundaries (page boundaries of the user's buffer, max_write), so a zero write that
covers a cluster only in parts must count: when a zero piece covers part of a cluster,
the rest of the cluster is checked, from the mapping alone when it says "zeros" (zero
flag, or unallocated with nothing below), else by reading the cluster.  A run of zero
pieces therefore turns each cluster it leaves all zero into a zero cluster (freed with
`unmap`), the last piece doing it.

Zero clusters in the format (docs/interop/qcow2.rst, "Standard Cluster Descriptor"):
version 3 has the zero flag (bit 0), with or without a preallocated host cluster;
version 2 has none, so there only "unallocated" can stand for zeros, and only without
a backing file.
"""

from __future__ import annotations

import array
from typing import TYPE_CHECKING

from .format import L2E_OFFSET_MASK, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, ClusterType, classify

if TYPE_CHECKING:
    from .state import ImageState


def can_express_zeros(img: "ImageState") -> bool:
    """Whether the format lets this image say "zeros" without data (see the module doc)."""
    return img.version >= 3 or (img.backing is None and img.detect_zeroes == "unmap")


def write_zero_piece(img: "ImageState", table: array.array[int], l1i: int, l2i: int, guest_cluster: int,
                     in_cl: int, piece: memoryview, zeros: memoryview) -> bool:
    """`piece` is the part of one write that falls in guest cluster `guest_cluster` at
    `in_cl`; `zeros` is a cluster of zero bytes.  When the piece is all zeros and the
    cluster reads as zeros around it, make the cluster a zero cluster and return True
    (nothing left to write); else False (write the piece as data)."""
    n = len(piece)
    if piece != zeros[:n] or not can_express_zeros(img):
        return False
    if n < img.cluster_size:
        entry = table[l2i]
        if not img.reads_as_zeros(entry):
            content = memoryview(img.cluster_content(entry, guest_cluster))
            end = in_cl + n
            if content[:in_cl] != zeros[:in_cl] or content[end:] != zeros[end:]:
                return False
    return make_zero_cluster(img, table, l1i, l2i)


def make_zero_cluster(img: "ImageState", table: array.array[int], l1i: int, l2i: int) -> bool:
    """Make the L2 entry say "zeros": `on` keeps a host cluster this layer owns (zero
    flag over it, as QEMU's detect-zeroes=on), `unmap` frees it (after the table reaches
    disk; see Allocator).  False when the format can't say "zeros" here."""
    if not can_express_zeros(img):
        return False
    old = table[l2i]
    kind = classify(old, img.version, img.data_file)
    if img.version < 3:
        new = 0  # v2 without backing file: unallocated reads as zeros
    elif img.detect_zeroes == "on" and kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) \
            and (img.in_place(old) or img.reusable_zero_alloc(old)):
        new = (old & L2E_OFFSET_MASK) | QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED  # keep the allocation
    else:
        new = QCOW_OFLAG_ZERO
    if new != old:
        table[l2i] = new
        if not new & L2E_OFFSET_MASK:
            img.release_entry(old)
        img.l2.mark_dirty(img.active_l2_offset(l1i))
    return True
