"""Command line: `qcowfuse IMAGE MOUNTPOINT [-f] [-o OPTIONS]`.

Every failure is one line on stderr prefixed `qcowfuse:` and a non-zero exit
code; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .daemon import MountOptions, mount
from .errors import QcowError

EPILOG = """\
examples:
  qcowfuse disk.qcow2 /mnt/raw            mount the guest disk as the file /mnt/raw
  qcowfuse -o ro disk.qcow2 /mnt/dir      read-only, as /mnt/dir/disk.raw
  qcowfuse -o snapshot=s1 disk.qcow2 /mnt/s1.raw   an internal snapshot (read-only)
  losetup -f --show /mnt/raw              then use the loop device as a disk
  fusermount3 -u /mnt/raw                 unmount: flushes and closes the image

The mount point may be a regular file (the raw view is mounted over it), a
missing path whose parent exists (created as an empty file, removed again at
unmount), or a directory (it then holds one file, <image name>.raw).
"""

# Options mount(8) and mount.fuse3 may pass that mean nothing to a FUSE daemon.
GENERIC_MOUNT_OPTIONS = {
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail",
    "_netdev", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "diratime", "nodiratime", "lazytime", "sync",
    "async", "dirsync", "silent", "loud", "nosymfollow",
}


class UsageError(QcowError):
    pass


def parse_mount_options(values: list[str], opts: MountOptions) -> None:
    for value in values:
        for item in filter(None, value.split(",")):
            name, _, arg = item.partition("=")
            if name == "ro":
                opts.read_only = True
            elif name == "rw":
                opts.read_only = False
            elif name == "allow_other":
                opts.allow_other = True
            elif name == "debug":
                opts.debug = True
                opts.foreground = True
            elif name == "direct_io":
                opts.direct_io = True
            elif name in ("force-share", "force_share"):
                opts.force_share = True
            elif name == "snapshot" and arg:
                opts.snapshot = arg
            elif name in GENERIC_MOUNT_OPTIONS or name.startswith(("x-", "comment=")):
                continue
            else:
                raise UsageError(f"unknown mount option '{item}'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcowfuse",
        description="Show the guest disk of a qcow2 image as one raw file (read-write).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="qcow2 image file")
    p.add_argument("mountpoint", help="file or directory to mount the raw view on")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr (default: daemonize once mounted)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: ro, rw (default), allow_other, debug (implies -f), "
                        "direct_io, force-share (with ro: no image locks, like qemu-img -U), "
                        "snapshot=NAME (an internal snapshot, read-only); "
                        "generic mount(8) options are ignored")
    p.add_argument("--pidfile", metavar="FILE", help="write the daemon's pid here once mounted")
    p.add_argument("-V", "--version", action="version", version=f"qcowfuse {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = MountOptions(image=args.image, mountpoint=args.mountpoint,
                        foreground=args.foreground, pidfile=args.pidfile)
    try:
        parse_mount_options(args.options, opts)
        return mount(opts)
    except QcowError as e:
        print(f"qcowfuse: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
