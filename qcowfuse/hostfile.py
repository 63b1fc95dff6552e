"""The host file under an image: positioned I/O and durability, nothing else.

Kept as a small class so tests can substitute a recording layer that logs
every write and sync (power-loss simulation) without touching the engine.
"""

from __future__ import annotations

import os
import stat

from .errors import CorruptError


_libc = None  # the C library, for fallocate(2) (see punch_hole)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


# Offsets a file can have (off_t); table entries from a hostile image may say more.
MAX_FILE_OFFSET = (1 << 62) - 1
# When new clusters make the file grow, it grows this much further as a hole (no space
# used), so most new clusters need no ftruncate of their own; close() trims it off.
PREALLOCATE_BYTES = 8 << 20


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or offset + length > MAX_FILE_OFFSET:
        raise CorruptError(f"offset {offset:#x} is outside any possible image file")


class HostFile:
    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = fd
        self.path = path
        self.unsynced = False  # a write happened since the last sync
        # The end of what the image uses: the file size at open, grown by our own writes
        # (-1: not known yet).  The file itself may be longer by a preallocated hole
        # (file_end), which reads treat as past the end.  Both public for the fast path,
        # which checks them inline (qcow2/fastpath.py); only this class changes them.
        self.data_end = -1
        self.file_end = -1

    @classmethod
    def open(cls, path: str, writable: bool) -> "HostFile":
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        return cls(fd, path)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def end(self) -> int:
        """The file size without a syscall per call (we are its only writer)."""
        if self.data_end < 0:
            self.data_end = self.file_end = self.size()
        return self.data_end

    def _past_end(self, offset: int, length: int) -> bool:
        """A read reaching into the preallocated hole: past the end of the image."""
        return self.file_end > self.data_end and offset + length > self.data_end

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes; a short read means metadata points past EOF."""
        if offset < 0 or offset + length > MAX_FILE_OFFSET:  # _check_range, inline: per request
            _check_range(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) != length or (self.file_end > self.data_end and offset + length > self.data_end):
            raise CorruptError(f"read of {length} bytes at {offset:#x} runs past the end of the image file")
        return data

    def pread_upto(self, offset: int, length: int) -> bytes:
        """Read up to `length` bytes; shorter only at the end of the file."""
        _check_range(offset, length)
        if self._past_end(offset, length):
            length = max(0, self.data_end - offset)
        return os.pread(self.fd, length, offset)

    def pread_into(self, offset: int, buf: memoryview) -> None:
        _check_range(offset, len(buf))
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf) or self._past_end(offset, n):
            raise CorruptError(f"read of {len(buf)} bytes at {offset:#x} runs past the end of the image file")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` (bytes, or a byte-format buffer)."""
        length = len(data)
        end = offset + length
        if offset < 0 or end > MAX_FILE_OFFSET:  # _check_range, inline: per request
            _check_range(offset, length)
        self.unsynced = True
        if end > self.data_end >= 0:
            self.data_end = end
            self.file_end = max(self.file_end, end)
        n = os.pwrite(self.fd, data, offset)
        if n == length:
            return
        view = memoryview(data)[n:]
        offset += n
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def extend_to(self, size: int) -> None:
        """Make the image cover `size` bytes (a hole) if it is shorter; the file grows
        PREALLOCATE_BYTES beyond, unless it is that long already."""
        if (self.data_end if self.data_end >= 0 else self.end()) < size:  # end(), inline: per new cluster
            if self.file_end < size:
                os.ftruncate(self.fd, size + PREALLOCATE_BYTES)
                self.file_end = size + PREALLOCATE_BYTES
            self.data_end = size

    def truncate(self, size: int) -> None:
        """Cut the file to `size` bytes, shorter than the image's end (best effort, as
        QEMU's shrink: a failure only leaves a longer file).  Later growth starts
        from there."""
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            return
        self.data_end = self.file_end = size

    def punch_hole(self, offset: int, length: int) -> None:
        """Give the space back to the host filesystem (best effort; size unchanged)."""
        global _libc
        import ctypes  # Python has no fallocate(2) with flags; loaded when space is first freed

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        try:
            if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                               ctypes.c_long(offset), ctypes.c_long(length)) != 0:
                pass  # not supported here: the cluster is free all the same
        except AttributeError:
            pass

    def sync(self) -> None:
        os.fdatasync(self.fd)
        self.unsynced = False

    def close(self) -> None:
        """Close, trimming the preallocated hole (a crash leaves it: a longer file, which
        QEMU reads as free space)."""
        if self.fd >= 0:
            if self.file_end > self.data_end >= 0:
                try:
                    os.ftruncate(self.fd, self.data_end)
                except OSError:
                    pass  # only a longer file
            os.close(self.fd)
            self.fd = -1


class DataFile(HostFile):
    """An open data file: the guest data only, at the host offsets the L2 tables give.
    Reads past its end are zeros, as QEMU's block layer makes them; it grows only by
    the data written to it."""

    opened = True

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)  # block devices too

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        data = os.pread(self.fd, length, offset)
        return data if len(data) == length else data.ljust(length, b"\0")

    def pread_into(self, offset: int, buf: memoryview) -> None:
        _check_range(offset, len(buf))
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    @property
    def growable(self) -> bool:
        """A regular file, which a resize may grow or cut (a block device keeps its size)."""
        return stat.S_ISREG(os.fstat(self.fd).st_mode)

    def truncate(self, size: int) -> None:
        """Make a regular data file `size` bytes, growing or cutting it, as QEMU resizes
        the data file with the image (best effort: a data file shorter than the disk
        reads as zeros past its end).  A block device keeps its size."""
        if self.growable:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass


class NoDataFile(DataFile):
    """Stands for a data file that was not opened (info, map, check: they read no guest
    data); any guest data I/O through it is a bug, refused."""

    opened = False

    def __init__(self) -> None:
        super().__init__(-1, "")

    @property
    def growable(self) -> bool:
        return False

    def _refuse(self, *args: object) -> bytes:
        raise CorruptError("internal: the image's external data file was not opened (metadata only)")

    pread = pread_upto = pread_into = pwrite = _refuse  # type: ignore[assignment]

    def close(self) -> None:
        pass
