#!/usr/bin/env python3
"""A bare pyfuse3 + trio passthrough of one file: the ceiling of qcowfuse's own stack.

  bench_passthrough.py BACKING_FILE MOUNTPOINT_FILE

Serves BACKING_FILE at MOUNTPOINT_FILE (an existing regular file) with read = os.pread,
write = os.pwrite, fsync = os.fsync and nothing else: no format, no mapping.  Handlers
run inline on the trio thread, open() keeps the page cache and the times shown are the
backing file's at start (as qcowfuse does), so the two differ only by qcowfuse's own
work.  Runs in the foreground until unmounted (fusermount3 -u) or sent SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        st = os.fstat(fd)
        self.size = st.st_size
        self.times = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFREG | 0o644
        a.st_nlink = 1
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_size = self.size
        a.st_blksize = 4096
        a.st_blocks = -(-self.size // 512)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self.times
        a.entry_timeout = a.attr_timeout = 300.0
        return a

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        return await self.getattr(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fsync(self.fd)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    backing, mountpoint = argv
    fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"}
    pyfuse3.init(Passthrough(fd), mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
        os.fsync(fd)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
