"""Image locking compatible with QEMU (block/file-posix.c, "raw_apply_lock_bytes").

QEMU takes open-file-description (OFD) read locks on single bytes of the image
file: byte 100+i while it holds permission i, byte 200+i while it does *not*
share permission i with others.  Another opener conflicts when it wants a
permission somebody refuses to share (200+i held) or refuses to share one that
somebody holds (100+i held).  Taking the same bytes makes qemu-img, qemu-io and
VMs respect our mounts, and makes us respect theirs.
"""

from __future__ import annotations

import fcntl
import os
import struct

from .errors import ImageInUseError

LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
ALL_PERMS = tuple(PERM_NAMES)

# struct flock: l_type, l_whence, l_start, l_len, l_pid (native layout, padded to 32 bytes)
_FLOCK = "@hhqqi"
_FLOCK_SIZE = 32


def _flock(fd: int, cmd: int, lock_type: int, byte: int) -> int:
    buf = struct.pack(_FLOCK, lock_type, os.SEEK_SET, byte, 1, 0).ljust(_FLOCK_SIZE, b"\0")
    out = fcntl.fcntl(fd, cmd, buf)
    lock: int = struct.unpack_from(_FLOCK, out)[0]
    return lock


def _held_by_others(fd: int, byte: int) -> bool:
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_image(fd: int, writable: bool, path: str) -> None:
    """Take QEMU's lock bytes for a reader (writable=False) or the sole writer.

    A reader holds consistent-read and refuses to share write (like qemu-img
    without -U); a writer also holds write/resize and shares neither.
    """
    perms = {PERM_CONSISTENT_READ}
    unshared = {PERM_WRITE}
    if writable:
        perms |= {PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE}
        unshared |= {PERM_RESIZE}
    try:
        for i in sorted(perms):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_PERM + i)
        for i in sorted(unshared):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_SHARED + i)
        for i in sorted(perms):
            if _held_by_others(fd, LOCK_BASE_SHARED + i):
                raise ImageInUseError(f"{path}: image is in use by another process "
                                      f"(failed to get \"{PERM_NAMES[i]}\" lock)")
        for i in sorted(unshared):
            if _held_by_others(fd, LOCK_BASE_PERM + i):
                raise ImageInUseError(f"{path}: image is in use by another process "
                                      f"(failed to get shared \"{PERM_NAMES[i]}\" lock)")
    except OSError as e:  # a write lock held by someone makes SETLK fail outright
        unlock_image(fd)
        raise ImageInUseError(f"{path}: image is in use by another process ({e.strerror})") from None
    except ImageInUseError:
        unlock_image(fd)
        raise


def unlock_image(fd: int) -> None:
    for base in (LOCK_BASE_PERM, LOCK_BASE_SHARED):
        for i in ALL_PERMS:
            try:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + i)
            except OSError:
                pass
