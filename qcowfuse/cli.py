"""Command line: `qcowfuse IMAGE MOUNTPOINT [-f] [-o OPTIONS]`.

Every failure is one line on stderr prefixed `qcowfuse:` and a non-zero exit
code; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from . import __version__
from .errors import QcowError

if TYPE_CHECKING:
    from .daemon import MountOptions

EPILOG = """\
other commands:
  qcowfuse info IMAGE [--output=json]                 describe an image
  qcowfuse check IMAGE [-r leaks|all] [--output=json]  recount refcounts, repair
  qcowfuse map IMAGE [--output=json]                  allocated / zero / unallocated extents

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


def parse_size(text: str) -> int:
    """'32M', '512k', '1G' or plain bytes, as QEMU's size options take them."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower()
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "bkmgt" else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"not a size: '{text}' (use e.g. 32M)") from None
    if value <= 0:
        raise UsageError(f"size must be positive: '{text}'")
    return value


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
            elif name in ("detect-zeroes", "detect_zeroes") and arg in ("off", "on", "unmap"):
                opts.detect_zeroes = arg
            elif name in ("l2-cache-size", "l2_cache_size") and arg:
                opts.l2_cache_size = parse_size(arg)
            elif name in ("refcount-cache-size", "refcount_cache_size") and arg:
                opts.refcount_cache_size = parse_size(arg)
            elif name in GENERIC_MOUNT_OPTIONS or name.startswith("x-") or name == "comment":
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
                        "snapshot=NAME (an internal snapshot, read-only), "
                        "detect-zeroes=off|on|unmap (whole zero clusters become zero clusters; "
                        "unmap also frees their space), l2-cache-size=SIZE (default 16M), "
                        "refcount-cache-size=SIZE (default 8M); "
                        "generic mount(8) options are ignored")
    p.add_argument("--pidfile", metavar="FILE", help="write the daemon's pid here once mounted")
    p.add_argument("-V", "--version", action="version", version=f"qcowfuse {__version__}")
    return p


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _progress(output: str, label: str):
    """A progress bar for human output on a terminal (shown after a second), else None."""
    from .progress import TerminalProgress
    return TerminalProgress.for_stderr(label) if output == "human" else None


def info_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qcowfuse info", description="Describe a qcow2 image.")
    p.add_argument("image")
    p.add_argument("--output", choices=("human", "json"), default="human")
    args = p.parse_args(argv)
    from .info import image_info
    progress = _progress(args.output, "reading tables")
    try:
        info = image_info(args.image, progress)
    except QcowError as e:
        print(f"qcowfuse: {e}", file=sys.stderr)
        return 1
    finally:
        if progress:
            progress.done()
    if args.output == "json":
        print(json.dumps(info, indent=2))
        return 0
    print(f"image: {info['filename']}")
    print(f"format: qcow2 version {info['version']} (compat {info['compat']})")
    print(f"virtual size: {_human(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"cluster size: {info['cluster-size']}, refcount bits: {info['refcount-bits']}, "
          f"compression: {info['compression-type']}")
    print(f"host file size: {_human(info['host-file-size'])}, disk usage: {_human(info['disk-usage'])}, "
          f"allocated: {_human(info['allocated-bytes'])}")
    for i, layer in enumerate(info["backing-chain"]):
        print(f"backing file {i + 1}: {layer['filename']} ({layer['format']})")
    for s in info["snapshots"]:
        print(f"snapshot {s['id']}: {s['name']} disk {_human(s['disk-size'])} "
              f"vm state {_human(s['vm-state-size'])} {s['date']}")
    for kind, names in info["features"].items():
        if names:
            print(f"{kind} features: {', '.join(names)}")
    print(f"dirty: {'yes' if info['dirty'] else 'no'}, corrupt: {'yes' if info['corrupt'] else 'no'}")
    return 0


def check_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qcowfuse check",
        description="Recount every reference and compare with the stored refcounts "
                    "(exit 0 clean, 1 could not check, 2 corruption, 3 leaks only).")
    p.add_argument("image")
    p.add_argument("-r", "--repair", choices=("leaks", "all"),
                   help="leaks: lower over-counts; all: also raise under-counts (rebuilding the "
                        "refcount structures) and fix COPIED flags")
    p.add_argument("--output", choices=("human", "json"), default="human")
    args = p.parse_args(argv)
    from .image import Image
    from .qcow2.check import Checker
    progress = _progress(args.output, "checking" if args.repair is None else "repairing")
    try:
        img = Image.open(args.image, writable=args.repair is not None, repair=True)
        try:
            report = Checker(img, progress).run(args.repair)
        finally:
            if progress:
                progress.done()
            img.close()
    except QcowError as e:
        print(f"qcowfuse: {e}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=4))
        return report.exit_code
    for line in report.messages:
        print(line, file=sys.stderr if args.output == "json" else sys.stdout)
    if report.corruptions:
        print(f"\n{report.corruptions} errors were found on the image.")
    if report.leaks:
        print(f"\n{report.leaks} leaked clusters were found on the image.")
    if report.leaks_fixed or report.corruptions_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {report.leaks_fixed} leaked clusters\n    {report.corruptions_fixed} corruptions")
    if not (report.corruptions or report.leaks or report.check_errors):
        print("No errors were found on the image.")
    print(f"{report.allocated_clusters}/{report.total_clusters} = "
          f"{100 * report.allocated_clusters / max(1, report.total_clusters):.2f}% allocated, "
          f"{100 * report.fragmented_clusters / max(1, report.allocated_clusters):.2f}% fragmented, "
          f"{100 * report.compressed_clusters / max(1, report.allocated_clusters):.2f}% compressed clusters")
    print(f"Image end offset: {report.image_end_offset}")
    return report.exit_code


def map_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qcowfuse map",
                                description="Show where the guest disk's data is (like qemu-img map).")
    p.add_argument("image")
    p.add_argument("--output", choices=("human", "json"), default="human")
    args = p.parse_args(argv)
    from .image import Image
    from .mapping import image_map
    progress = _progress(args.output, "mapping")
    try:
        with Image.open(args.image, writable=False, lock=False) as img:
            extents = image_map(img, progress)
            names = []
            layer = img
            while layer is not None:
                names.append(getattr(layer, "path", None) or layer.f.path)
                layer = getattr(layer, "backing", None)
    except QcowError as e:
        print(f"qcowfuse: {e}", file=sys.stderr)
        return 1
    finally:
        if progress:
            progress.done()
    if args.output == "json":
        print("[" + ",\n".join(json.dumps(e.to_json()) for e in extents) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in extents:
        if e.data and e.offset is not None:
            print(f"{e.start:<#16x}{e.length:<#16x}{e.offset:<#16x}{names[e.depth]}")
    return 0


SUBCOMMANDS = {"info": info_main, "check": check_main, "map": map_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        # numpy's BLAS is unused here: don't pay for starting its thread pool
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and argv[0] == "mount":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    from .daemon import MountOptions, mount  # not needed by info, check, map: keep them quick
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
