"""The common request, without the general machinery: a read or an in-place write of
guest clusters that one cached L2 table maps to one run of host clusters, each entry
plain data (for a write: clusters this image owns, COPIED).  A request inside one
cluster, or a sequential one over data written sequentially, is one such run.  And the
first write into a cluster that reads as zeros without a host cluster (unallocated
without a backing file, or a plain zero cluster), when the next free cluster is plainly
free: the general path's allocation, done the same way in the same order (refcount in
memory, overlap check, data, then the L2 entry in memory).

Everything else, and anything unusual about these (an unaligned host offset, a table
not cached, a write that allocates more than that one cluster, the first write of a
session), returns "not handled" having done nothing, and takes the general path
(qcow2/reading.py, qcow2/writing.py), which owns every error.  The one check a fast
in-place write needs, that guest data never lands on metadata or past the end of the
file (QEMU's overlap check), is the general path's own predicate (data_target_ok); where
it fails the fast path declines, so the general path raises and marks the image corrupt.
A fast write records its range through the general path's commit_range (the one
place persistent bitmaps are marked), and runs inside WritePath.write_checked (the one
place corrupt images are refused and marked).  _host returns what it found (a host
offset, UNHANDLED, or FRESH_AT - the L2 index of a fresh cluster); nothing is stashed
between calls.  Extended L2 entries, detect-zeroes and encrypted images always take the
general path; so do writes to an image with an external data file (its reads are served,
from the data file).
Constants are derived once here, not per request.

Image.read and Image.write take the image lock around all this.  The FUSE daemon uses
the image from one thread only and takes `unlocked()`'s pair instead: the same fast
cases straight from the handler, without the lock and the layers between (what that
saves per request: docs/performance.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..hostfile import DataFile, HostFile
from .format import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, plain_data_flags)

from .state import ReadFn, WriteFn

if TYPE_CHECKING:
    from .state import ImageState


_PLAIN_FILES = (HostFile, DataFile)  # what read_unlocked preads from directly

UNHANDLED = -1  # _host: take the general path
BELOW = -2  # _host, for a read: nothing of the range is in this layer; the layer below has it all
# _host, for a write: FRESH_AT - i says entry i of the L2 table _host just used (the L2
# cache's most recent table, img.l2.mru) is a cluster in `fresh`
FRESH_AT = -3


class FastPath:
    def __init__(self, img: "ImageState") -> None:
        self.img = img
        self.cluster_bits = img.cluster_bits
        self.in_cluster = img.cluster_size - 1
        self.l2_bits = img.l2_bits
        self.l2_index = img.l2_entries - 1
        self.special = plain_data_flags(img.version)
        # plain host bytes, in the image file or its data file (a read of guest cluster 0
        # there, at host offset 0, takes the general path)
        self.reads = not img.header.extended_l2 and not img.header.crypt_method
        # writes: in the image file only (a data file's clusters have no refcounts)
        self.writes = self.reads and img.detect_zeroes == "off" and not img.data_file
        # L2 entries of clusters that read as zeros and hold no host cluster
        self.fresh = frozenset(([0] if img.backing is None else [])
                               + ([QCOW_OFLAG_ZERO] if img.version >= 3 else []))
        # reads of what this layer does not hold go straight below, inside its size
        self.below_size = img.backing.size if img.backing is not None else -1

    def _host(self, offset: int, length: int, for_write: bool) -> int:
        """Host offset of guest [offset, offset+length), or UNHANDLED when not a fast case: the
        range lies in one L2 table whose entries for it are plain data, each the one
        before plus a cluster with the same flags (one host extent, as a sequential
        writer leaves them), so one pread or pwrite serves it.  For a write into one
        cluster that reads as zeros without a host cluster: FRESH_AT - its L2 index
        (the table is then the L2 cache's most recently used one).  For a read of a
        range this layer holds nothing of (no L2 table, or unallocated entries) inside
        the layer below: BELOW."""
        img = self.img
        in_cl = offset & self.in_cluster
        if offset < 0 or length <= 0 or offset + length > img.size:
            return UNHANDLED
        g = offset >> self.cluster_bits
        i = g & self.l2_index
        more = (in_cl + length - 1) >> self.cluster_bits  # clusters after the first
        if i + more > self.l2_index:
            return UNHANDLED  # runs into the next L2 table
        l1e = img.l1[g >> self.l2_bits]
        if for_write and not l1e & QCOW_OFLAG_COPIED:
            return UNHANDLED  # the L2 table is shared: copy it first (general path)
        l2_offset = l1e & L1E_OFFSET_MASK
        if not l2_offset:  # no L2 table: the whole span reads from below (or as zeros)
            return BELOW if not for_write and offset + length <= self.below_size else UNHANDLED
        cache = img.l2
        table = cache.mru if l2_offset == cache.mru_offset else cache.peek(l2_offset)
        if table is None:
            return UNHANDLED
        entry = table[i]
        host = entry & L2E_OFFSET_MASK
        if not host or entry & self.special or host & self.in_cluster:
            if for_write:
                return FRESH_AT - i if not more and entry in self.fresh else UNHANDLED
            if entry == 0 and offset + length <= self.below_size and not any(table[i + 1:i + more + 1]):
                return BELOW
            return UNHANDLED
        if for_write and not entry & QCOW_OFLAG_COPIED:
            return UNHANDLED  # maybe shared with a snapshot: the general path decides
        if more:
            step = self.in_cluster + 1
            if host + more * step > L2E_OFFSET_MASK:
                return UNHANDLED  # the sum would carry into the flag bits
            for j in range(i + 1, i + more + 1):
                entry += step
                if table[j] != entry:
                    return UNHANDLED
        return host + in_cl

    def unlocked(self, read: ReadFn, write: WriteFn) -> tuple[ReadFn, WriteFn]:
        """Read and write for a caller that uses the image from one thread only, as the
        FUSE daemon does (its handlers run inline on trio's thread): the common request
        goes from the caller straight to _host and the pread or pwrite, without the image
        lock and the layers between.  Same results and errors: whatever is not the fast
        case, or looks wrong (a short read, a read into the preallocated hole), goes to
        `read` (the general path's read) or `write` (Image.write) untouched.  A library
        user with threads keeps Image.read / Image.write."""
        img = self.img
        host_of = self._host
        write_checked = img.write_checked
        reads = self.reads
        pread = os.pread
        below = img.backing.unlocked_read() if img.backing is not None else read

        def read_unlocked(offset: int, length: int) -> bytes | bytearray:
            f = img.data  # img.f, or the data file
            if reads and type(f) in _PLAIN_FILES:  # substitutes (test layers) keep f.pread
                host = host_of(offset, length, False)
                if host >= 0:
                    data = pread(f.fd, length, host)
                    # HostFile.pread's own checks, inline (a host offset from _host is in
                    # range): whole, and not reaching into the file's preallocated hole (a
                    # short read of a data file, zeros past its end, goes to `read`)
                    if len(data) == length and (f.file_end <= f.data_end or host + length <= f.data_end):
                        return data
                elif host == BELOW:
                    return below(offset, length)
            return read(offset, length)

        def write_unlocked(offset: int, data: bytes | memoryview) -> int:
            length = len(data)
            if type(data) is bytes and img.writable and 0 <= offset <= img.size - length:
                write_checked(offset, data)  # Image.write's own step, without the lock
                return length
            return write(offset, data)  # Image.write raises what it raises

        return read_unlocked, write_unlocked

    def read(self, offset: int, length: int) -> bytes | bytearray | None:
        if not self.reads:
            return None
        img = self.img
        with img.lock:
            host = self._host(offset, length, False)
            if host == BELOW and img.backing is not None:
                return img.backing.read(offset, length)
            return img.data.pread(host, length) if host >= 0 else None

    def write(self, offset: int, view: bytes | memoryview) -> bool:
        """The whole of a write (True), or nothing done (False: the general path).  Called
        on a writable image that is not marked corrupt, with the image lock held (or from
        the one thread that uses the image, see unlocked); `view` is
        bytes or a byte-format view.  Before the first write's preparation, and where a
        cluster would be metadata or past the end of the file, nothing is done: the general
        path then refuses with its own error."""
        img = self.img
        if not self.writes or not img.prepared:
            return False
        length = len(view)
        host = self._host(offset, length, True)
        if host < 0:
            return host <= FRESH_AT and self._write_fresh(offset, view, FRESH_AT - host)
        if not img.data_target_ok(host >> self.cluster_bits, (host + length - 1) >> self.cluster_bits):
            return False  # the general path's check_data_target refuses it
        img.commit_range(offset, length)
        f = img.f
        # HostFile.pwrite, inline (the range is inside the file, checked above); a
        # substitute (the power-cut harness's recording layer) keeps its own
        if type(f) is HostFile:
            f.unsynced = True
            if os.pwrite(f.fd, view, host) == length:
                return True
        f.pwrite(host, view)  # the rest of a short write (rewritten whole), or a substitute
        return True

    def _write_fresh(self, offset: int, view: bytes | memoryview, index: int) -> bool:
        """The first write into entry `index` of the L2 table _host just used."""
        img = self.img
        table, l2_offset = img.l2.mru, img.l2.mru_offset
        assert table is not None
        c = img.alloc.alloc_quick()
        if c < 0:
            return False
        img.check_fresh(c, 1)
        img.commit_range(offset, len(view))
        host = c << self.cluster_bits
        img.write_new_in_zeros(host, self.in_cluster + 1, offset & self.in_cluster, view)
        table[index] = host | QCOW_OFLAG_COPIED  # nothing to release: no host cluster
        img.l2.mark_dirty(l2_offset)
        if img.l2.over_budget:
            img.flush()
        return True
