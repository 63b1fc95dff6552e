"""pyfuse3 operations for one raw file backed by an `Image`-like object.

Two shapes: mounted over a regular file, the root inode *is* the raw file;
mounted on a directory, the root holds the disk file `<stem>.raw` and, unless turned
off, one file per partition of the guest disk, `<stem>-p<N>.raw` (partitions.py):
a window on the disk at the partition's offset, as long as the partition.  The table
is read again when a handle of the disk file that wrote is flushed or closed (as
BLKRRPART after a partitioner closes the device), but not while a partition file is
open (the kernel refuses to re-read a table in use): then once the last one closes.
Partition files drop their cached pages at each open; after one that wrote is closed,
the disk file's cached pages are dropped too.

Handlers call the engine inline (no thread hop: measured ~60x the cost of a
page-cached pread here), so requests run one at a time and the engine's
metadata updates never interleave; reads and writes use the image's unlocked
pair (`unlocked_io`), which that single thread allows.  Engine errors become
errnos; a corrupt table costs EIO for that request only.

Access: the view shows the image file's owner, group and permission bits, never
more (no write bits on a read-only mount), and the kernel checks them
(`default_permissions`), so `allow_other` lets in exactly whom the image file
lets in.  chmod and chown change what the view shows, never the image file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable, Protocol

import pyfuse3
import trio

from .errors import CorruptError, QcowError, ReadOnlyError, ResizeError

log = logging.getLogger("qcowfuse")

FILE_INODE_IN_DIR = pyfuse3.ROOT_INODE + 1

_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
_READ_BITS = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def file_permissions(image_mode: int, writable: bool) -> int:
    """The raw file's permission bits: the image file's read and write bits, without
    the write bits on a read-only mount (never execute, set-id or sticky)."""
    perm = image_mode & (_READ_BITS | _WRITE_BITS)
    return perm if writable else perm & ~_WRITE_BITS


def directory_permissions(file_perm: int) -> int:
    """The mount directory's bits: read and search for whoever may read the file."""
    readers = file_perm & _READ_BITS
    return readers | readers >> 2


@dataclass(frozen=True)
class Window:
    """What a partition file shows of the disk."""
    start: int
    length: int


@dataclass
class _Shown:
    """What chmod/chown set on one inode of the view (None: follow the image file)."""
    perm: int | None = None
    uid: int | None = None
    gid: int | None = None


class BlockImage(Protocol):
    size: int
    writable: bool

    def read(self, offset: int, length: int) -> bytes | bytearray: ...
    def write(self, offset: int, data: memoryview | bytes) -> int: ...
    def flush(self) -> None: ...
    def unlocked_io(self) -> tuple[Callable[[int, int], bytes | bytearray],
                                   Callable[[int, memoryview | bytes], int]]: ...
    def resize(self, new_size: int) -> None: ...


class RawFileOperations(pyfuse3.Operations):
    def __init__(self, image: BlockImage, host_fd: int, file_name: str | None,
                 direct_io: bool = False, partitions: bool = True) -> None:
        """file_name None: the mount point is a file and the root inode is the raw file;
        partitions: show partition files beside it (in a directory only)."""
        super().__init__()
        self.image = image
        # read and write without the image's lock: this daemon's handlers run on one thread
        self._read, self._write = image.unlocked_io()
        self.host_fd = host_fd  # the image file, for timestamps and allocated blocks
        self.file_name = os.fsencode(file_name) if file_name is not None else None
        self.file_inode = pyfuse3.ROOT_INODE if file_name is None else FILE_INODE_IN_DIR
        self.direct_io = direct_io
        self.shown: dict[int, _Shown] = {self.file_inode: _Shown(), pyfuse3.ROOT_INODE: _Shown()}
        # open file handles -> opened for writing (close() of one flushes the image)
        self.handles: dict[int, bool] = {}
        self.next_handle = 1
        # partition files: inode -> window, name -> inode; open handles -> their window
        self.partitions = partitions and file_name is not None
        self.windows: dict[int, Window] = {}
        self.partition_names: dict[bytes, int] = {}
        self.handle_windows: dict[int, Window] = {}
        self.table_stale = False
        # byte ranges of the disk the last table read looked at, and whether a write
        # through the disk file has touched one since (only then is it read again)
        self.table_ranges: list[tuple[int, int]] = []
        self.table_written = False
        if self.partitions:
            self._read_table()
        # Times of the raw file (see _times).  FUSE's auto_inval_data drops every cached
        # page of a file whose mtime (or size) it sees change in getattr: an mtime that
        # followed the image file would cost the whole page cache on each small write.
        host = os.fstat(host_fd)
        self.mount_times = (host.st_atime_ns, host.st_mtime_ns)

    # -- attributes ---------------------------------------------------------

    def _times(self, host: os.stat_result) -> tuple[int, int, int]:
        """(atime, mtime, ctime) in ns.  Writable mount (we hold the write lock, so we are
        the only writer): atime and mtime stay the image file's at mount, so our own
        writes keep the kernel's page cache (it already holds what was written); ctime
        follows the image file, which every write changes, so tools that look at ctime
        (tar --newer, borg, restic) see the change; after unmount the image file's own
        mtime shows it.  Read-only mount: follow the image file, whose mtime changes only
        under another writer (force-share), and then dropping the cache is right."""
        if self.image.writable:
            return (*self.mount_times, host.st_ctime_ns)
        return host.st_atime_ns, host.st_mtime_ns, host.st_ctime_ns

    # -- partitions --------------------------------------------------------------

    def _read_table(self) -> None:
        from .partitions import read_partitions
        ranges: list[tuple[int, int]] = []

        def read(offset: int, length: int) -> bytes | bytearray:
            ranges.append((offset, offset + length))
            return self.image.read(offset, length)
        try:
            found = read_partitions(read, self.image.size)
        except (QcowError, OSError) as e:
            log.error("the partition table cannot be read: %s", e)
            found = []
        assert self.file_name is not None
        stem = self.file_name.removesuffix(b".raw")
        self.windows = {FILE_INODE_IN_DIR + p.number: Window(p.start, p.length) for p in found}
        self.partition_names = {stem + b"-p%d.raw" % p.number: FILE_INODE_IN_DIR + p.number
                                for p in found}
        for inode in self.windows:
            self.shown.setdefault(inode, _Shown())
        self.table_stale = False
        self.table_ranges, self.table_written = ranges, False

    def _table_changed(self) -> None:
        """The disk's table was written through its own file: read it again, now or once
        no partition file is open."""
        if self.partitions:
            self.table_stale = True
            if not self.handle_windows:
                self._read_table()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        host = os.fstat(self.host_fd)
        shown = self.shown.get(inode)
        if shown is None or inode > FILE_INODE_IN_DIR and inode not in self.windows:
            raise pyfuse3.FUSEError(errno.ENOENT)
        window = self.windows.get(inode)
        if window is not None:  # a partition file: as the disk file shows, unless changed
            disk = self.shown[self.file_inode]
            shown = _Shown(*(mine if mine is not None else theirs for mine, theirs in
                             ((shown.perm, disk.perm), (shown.uid, disk.uid), (shown.gid, disk.gid))))
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid = host.st_uid if shown.uid is None else shown.uid
        a.st_gid = host.st_gid if shown.gid is None else shown.gid
        perm = file_permissions(host.st_mode, self.image.writable)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self._times(host)
        a.generation = 0
        a.entry_timeout = a.attr_timeout = 300.0
        a.st_blksize = 4096
        if inode == self.file_inode:
            a.st_mode = stat.S_IFREG | (perm if shown.perm is None else shown.perm)
            a.st_nlink = 1
            a.st_size = self.image.size
            a.st_blocks = host.st_blocks
        elif window is not None:
            a.st_mode = stat.S_IFREG | (perm if shown.perm is None else shown.perm)
            a.st_nlink = 1
            a.st_size = window.length
            a.st_blocks = 0
            a.entry_timeout = a.attr_timeout = 1.0  # the table may change under it
        else:
            a.st_mode = stat.S_IFDIR | (directory_permissions(perm) if shown.perm is None else shown.perm)
            a.st_nlink = 2
            a.st_size = 0
            a.st_blocks = 0
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size and inode == self.file_inode and attr.st_size != self.image.size:
            self._resize(attr.st_size)
            self._table_changed()
        elif fields.update_size and inode in self.windows and attr.st_size != self.windows[inode].length:
            raise pyfuse3.FUSEError(errno.EPERM)  # a partition's size is the table's
        shown = self.shown.get(inode)
        if shown is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The kernel has checked that the caller may (default_permissions); the change
        # is the view's, for the life of the mount: the image file keeps its own.
        if fields.update_mode:
            shown.perm = stat.S_IMODE(attr.st_mode) & 0o777
        if fields.update_uid:
            shown.uid = attr.st_uid
        if fields.update_gid:
            shown.gid = attr.st_gid
        return self._attrs(inode)  # times follow the image file (see _times)

    def _resize(self, new_size: int) -> None:
        """truncate(2) grows or shrinks the guest disk; the reply's attributes carry the new
        size, so stat and the loop driver (losetup -c) see it at once.  Errnos: EROFS on a
        read-only image; EPERM for a shrink that would cut off guest data; EINVAL for a size
        that is not a multiple of 512, or 0 while the image has bitmaps; EFBIG past the
        format's limit; EOPNOTSUPP for images QEMU cannot resize either (bitmaps in use,
        v2 with snapshots)."""
        try:
            self.image.resize(new_size)
        except ReadOnlyError:
            raise pyfuse3.FUSEError(errno.EROFS) from None
        except ResizeError as e:
            log.error("truncate to %d bytes refused: %s", new_size, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except (QcowError, OSError) as e:
            raise _errno_for(e, "resize", 0, new_size) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and self.file_name is not None:
            if name == self.file_name:
                return self._attrs(self.file_inode)
            inode = self.partition_names.get(name)
            if inode is not None:
                return self._attrs(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE or self.file_name is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if self.file_name is None:
            return
        entries = [(self.file_name, self.file_inode)] + sorted(
            self.partition_names.items(), key=lambda item: item[1])
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = -(-self.image.size // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files, s.f_ffree, s.f_favail = 1, 0, 0
        s.f_namemax = 255
        return s

    # -- data ---------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        window = self.windows.get(inode)
        if inode != self.file_inode and window is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and not self.image.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh, self.next_handle = self.next_handle, self.next_handle + 1
        self.handles[fh] = writing
        if window is not None:
            self.handle_windows[fh] = window
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=window is None)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        # (pyfuse3's stub says bytes; any buffer is sent as it is)
        window = self.handle_windows.get(fh)
        if window is not None:  # a partition file: its part of the disk, nothing past it
            if off >= window.length:
                return b""
            size = min(size, window.length - off)
            off += window.start
        try:
            return self._read(off, size)
        except (QcowError, OSError) as e:
            raise _errno_for(e, "read", off, size) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        window = self.handle_windows.get(fh)
        start, end = (0, self.image.size) if window is None else (window.start, window.length)
        if off + len(buf) > end:
            if off >= end:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            data: memoryview | bytes = memoryview(buf)[: end - off]  # short write up to the end
        else:
            data = buf
        off += start
        if window is None and self.partitions and not self.table_written:
            end = off + len(data)
            self.table_written = any(a < end and off < b for a, b in self.table_ranges)
        try:
            return self._write(off, data)
        except (QcowError, OSError) as e:
            raise _errno_for(e, "write", off, len(data)) from None

    async def _flush(self) -> None:
        try:
            self.image.flush()
        except (QcowError, OSError) as e:
            raise _errno_for(e, "flush", 0, 0) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush()
        if self.table_written and fh not in self.handle_windows:
            self._table_changed()

    async def flush(self, fh: int) -> None:
        """close(2): what was written through this handle is flushed; closing a handle
        opened for reading has nothing to make durable (and cannot fail)."""
        if self.handles.get(fh, True):
            await self._flush()
            if self.table_written and fh not in self.handle_windows:
                self._table_changed()

    async def release(self, fh: int) -> None:
        writing = self.handles.pop(fh, False)
        if self.handle_windows.pop(fh, None) is not None:
            if writing:  # the disk file's cached pages may hold what this one changed
                await trio.to_thread.run_sync(_drop_cached_pages, self.file_inode)
            if self.table_stale and not self.handle_windows:
                self._read_table()


def _drop_cached_pages(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=False)
    except OSError:
        pass  # nothing cached


def _errno_for(e: QcowError | OSError, op: str, off: int, size: int) -> pyfuse3.FUSEError:
    """One log line and the errno for the kernel: host errors (ENOSPC...) pass through,
    engine errors are EIO (EROFS for a read-only image)."""
    if isinstance(e, OSError):
        log.error("%s of %d bytes at %d failed: %s", op, size, off, e.strerror)
        return pyfuse3.FUSEError(e.errno or errno.EIO)
    if isinstance(e, ReadOnlyError):
        return pyfuse3.FUSEError(errno.EROFS)
    if isinstance(e, CorruptError):
        log.error("%s of %d bytes at %d: corrupt image metadata: %s", op, size, off, e)
    else:
        log.error("%s of %d bytes at %d failed: %s", op, size, off, e)
    return pyfuse3.FUSEError(errno.EIO)
