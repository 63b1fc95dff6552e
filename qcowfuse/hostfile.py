"""The host file under an image: positioned I/O and durability, nothing else.

Kept as a small class so tests can substitute a recording layer that logs
every write and sync (power-loss simulation) without touching the engine.
"""

from __future__ import annotations

import os

from .errors import CorruptError


_libc = None  # the C library, for fallocate(2) (see punch_hole)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


# Offsets a file can have (off_t); table entries from a hostile image may say more.
MAX_FILE_OFFSET = (1 << 62) - 1


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or offset + length > MAX_FILE_OFFSET:
        raise CorruptError(f"offset {offset:#x} is outside any possible image file")


class HostFile:
    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = fd
        self.path = path
        self.unsynced = False  # a write happened since the last sync
        self._end = -1  # file size as of our own last write (-1: not known yet)

    @classmethod
    def open(cls, path: str, writable: bool) -> "HostFile":
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        return cls(fd, path)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def end(self) -> int:
        """The file size without a syscall per call (we are its only writer)."""
        if self._end < 0:
            self._end = self.size()
        return self._end

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes; a short read means metadata points past EOF."""
        _check_range(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise CorruptError(f"read of {length} bytes at {offset:#x} runs past the end of the image file")
        return data

    def pread_upto(self, offset: int, length: int) -> bytes:
        """Read up to `length` bytes; shorter only at the end of the file."""
        _check_range(offset, length)
        return os.pread(self.fd, length, offset)

    def pread_into(self, offset: int, buf: memoryview) -> None:
        _check_range(offset, len(buf))
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            raise CorruptError(f"read of {len(buf)} bytes at {offset:#x} runs past the end of the image file")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        _check_range(offset, len(view))
        self.unsynced = True
        if self._end >= 0:
            self._end = max(self._end, offset + len(view))
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def extend_to(self, size: int) -> None:
        """Grow the file to `size` bytes (a hole) if it is shorter."""
        if self.end() < size:
            os.ftruncate(self.fd, size)
            self._end = size

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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
