"""Command line: `qcowfuse IMAGE MOUNTPOINT [-f] [-o OPTIONS]`.

Every failure is one line on stderr prefixed `qcowfuse:` and a non-zero exit
code; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Iterator

from . import __version__
from .errors import QcowError

if TYPE_CHECKING:
    from .progress import TerminalProgress
    from .daemon import MountOptions

EPILOG = """\
other commands:
  qcowfuse info IMAGE [--allocated] [--output=json]   describe an image
  qcowfuse check IMAGE [-r leaks|all] [--output=json]  recount refcounts, repair
  qcowfuse map IMAGE [--output=json]                  allocated / zero / unallocated extents
  qcowfuse map IMAGE --bitmap NAME [--output=json]    what a persistent dirty bitmap marks changed
  qcowfuse resize [--shrink] IMAGE [+|-]SIZE           grow (or shrink) the guest disk, offline

examples:
  qcowfuse disk.qcow2 /mnt/raw            mount the guest disk as the file /mnt/raw
  qcowfuse -o ro disk.qcow2 /mnt/dir      read-only, as /mnt/dir/disk.raw
  qcowfuse -o snapshot=s1 disk.qcow2 /mnt/s1.raw   an internal snapshot (read-only)
  losetup -f --show /mnt/raw              then use the loop device as a disk
  truncate -s 20G /mnt/raw                grow the mounted disk (then losetup -c, resize2fs)
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


# QEMU's size syntax (util/cutils.c qemu_strtosz): decimal or 0x number, optional suffix
# b/k/M/G/T/P/E (powers of 1024, any case); a fraction only with a suffix above b.
_SIZE_RE = re.compile(r"\s*\+?(?:0x([0-9a-f]+)|(\d+)(?:\.(\d*))?)([bkmgtpe]?)\Z", re.IGNORECASE)
_SIZE_SHIFTS = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def strtosz(text: str) -> int:
    """Bytes in a QEMU size ('32M', '1.5G', '4096'); ValueError if it is not one,
    OverflowError if it is 2^64 or more."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    hexdigits, whole, frac, suffix = m.groups()
    shift = _SIZE_SHIFTS[suffix.lower()]
    if hexdigits is not None:
        value = int(hexdigits, 16) << shift
    elif frac is not None and shift == 0 and frac.strip("0"):
        raise ValueError(text)  # bytes come whole ("512." and "512.0" are 512)
    elif not frac or not frac.strip("0"):
        value = int(whole) << shift
    else:
        from fractions import Fraction  # only for sizes with a fraction: keeps startup quick
        value = int(Fraction(f"{whole}.{frac}") * (1 << shift))
    if value >= 1 << 64:
        raise OverflowError(text)
    return value


def parse_size(text: str) -> int:
    """'32M', '512k', '1G' or plain bytes, as QEMU's size options take them."""
    try:
        value = strtosz(text)
    except (ValueError, OverflowError):
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
            elif name == "backing" and arg:
                opts.backing = arg
            elif name in ("detect-zeroes", "detect_zeroes") and arg in ("off", "on", "unmap"):
                opts.detect_zeroes = arg
            elif name in ("l2-cache-size", "l2_cache_size") and arg:
                opts.l2_cache_size = parse_size(arg)
            elif name in ("refcount-cache-size", "refcount_cache_size") and arg:
                opts.refcount_cache_size = parse_size(arg)
            elif name == "partitions" and arg in ("on", "off"):
                opts.partitions = arg == "on"
            elif name in ("key-file", "key_file") and arg:
                opts.key_file = arg
            elif name in ("data-file", "data_file") and arg:
                opts.data_file = arg
            elif name == "overlay":
                opts.overlay, opts.overlay_path = True, arg or None
            elif name in ("io_uring", "io-uring"):
                raise UsageError(f"-o {item}: not supported: FUSE-over-io_uring calls handlers from "
                                 f"libfuse's threads, and qcowfuse serves from one")
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
                        "overlay (writes go to a throwaway overlay in $TMPDIR; the image is only "
                        "read), overlay=PATH (the overlay kept at PATH), "
                        "partitions=off (a directory mount shows only the disk file, no "
                        "<name>-pN.raw per partition), "
                        "key-file=PATH (the passphrase of a LUKS-encrypted image: the file's "
                        "bytes exactly; on a terminal it is asked for otherwise), "
                        "snapshot=NAME (an internal snapshot, read-only), "
                        "backing=off (open no backing file: what the image lacks reads as zeros; "
                        "with ro) or backing=PATH (use PATH, which may be a block device, instead of "
                        "the backing file the image names), "
                        "data-file=PATH (the external data file of an image that has one, a "
                        "regular file or a block device: needed to mount it read-write; read-only "
                        "mounts follow the name in the image to a regular file), "
                        "detect-zeroes=off|on|unmap (whole zero clusters become zero clusters; "
                        "unmap also frees their space), l2-cache-size=SIZE (default 16M), "
                        "refcount-cache-size=SIZE (default 8M); "
                        "generic mount(8) options are ignored")
    p.add_argument("--pidfile", metavar="FILE", help="write the daemon's pid here once mounted")
    p.add_argument("-V", "--version", action="version", version=f"qcowfuse {__version__}")
    return p


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.4g} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return str(n)


@contextlib.contextmanager
def _progress(output: str, label: str, wanted: bool = True) -> Iterator[TerminalProgress | None]:
    """A progress bar for human output on a terminal (shown after a second), else None;
    cleared when the work ends, also by an error."""
    from .progress import TerminalProgress
    progress = TerminalProgress.for_stderr(label) if output == "human" and wanted else None
    try:
        yield progress
    finally:
        if progress:
            progress.done()


def info_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qcowfuse info", description="Describe a qcow2 image.")
    p.add_argument("image")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--allocated", action="store_true",
                   help="also count the guest clusters that hold data (reads every L2 table)")
    args = p.parse_args(argv)
    from .info import image_info
    with _progress(args.output, "reading tables", wanted=args.allocated) as progress:
        info = image_info(args.image, progress, allocated=args.allocated)
    if args.output == "json":
        print(json.dumps(info, indent=2))
        return 0
    print(f"image: {info['filename']}")
    print(f"format: qcow2 version {info['version']} (compat {info['compat']})")
    print(f"virtual size: {_human(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"cluster size: {info['cluster-size']}, refcount bits: {info['refcount-bits']}, "
          f"compression: {info['compression-type']}")
    allocated = f", allocated: {_human(info['allocated-bytes'])}" if args.allocated else ""
    print(f"host file size: {_human(info['host-file-size'])}, disk usage: "
          f"{_human(info['disk-usage'])}{allocated}")
    if "data-file" in info:
        print(f"data file: {info['data-file']}, data file raw: "
              f"{'yes' if info['data-file-raw'] else 'no'}")
    for i, layer in enumerate(info["backing-chain"]):
        print(f"backing file {i + 1}: {layer['filename']} ({layer['format']})")
    for s in info["snapshots"]:
        print(f"snapshot {s['id']}: {s['name']} disk {_human(s['disk-size'])} "
              f"vm state {_human(s['vm-state-size'])} {s['date']}")
    for kind, names in info["features"].items():
        if names:
            print(f"{kind} features: {', '.join(names)}")
    for b in info["bitmaps"]:
        print(f"bitmap: {b['name']} granularity {b['granularity']} flags {','.join(b['flags']) or '-'}")
    print(f"dirty: {'yes' if info['dirty'] else 'no'}, corrupt: {'yes' if info['corrupt'] else 'no'}")
    if info["encrypted"]:
        enc = info.get("encrypt", {})
        print("encrypted: yes" + (f" ({enc['format']}, {enc['cipher-alg']}-{enc['cipher-mode']}-"
                                    f"{enc['ivgen-alg']}, hash {enc['hash-alg']}, "
                                    f"{sum(s['active'] for s in enc['slots'])} active key slots)"
                                    if enc else ""))
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
    with _progress(args.output, "checking" if args.repair is None else "repairing") as progress:
        img = Image.open(args.image, writable=args.repair is not None, repair=True)
        try:
            report = Checker(img, progress).run(args.repair)
        finally:
            img.close()
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
    p.add_argument("--bitmap", metavar="NAME",
                   help="show the dirty extents of persistent bitmap NAME instead")
    args = p.parse_args(argv)
    if args.bitmap is not None:
        return _bitmap_map(args.image, args.bitmap, args.output)
    from .image import Image
    from .mapping import image_map
    with _progress(args.output, "mapping") as progress, \
            Image.open(args.image, writable=False, lock=False, metadata_only=True) as img:
        extents = image_map(img, progress)
        names = []
        layer: Any = img  # an Image or a raw backing layer
        while layer is not None:  # the file each depth's data is in (qemu-img's names)
            names.append(getattr(layer, "path", None) or getattr(layer.header, "data_file", None)
                         or layer.f.path)
            layer = getattr(layer, "backing", None)
    if args.output == "json":
        print("[" + ",\n".join(json.dumps(e.to_json()) for e in extents) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for ext in extents:
        if ext.data and ext.offset is not None:
            print(f"{_c_hex(ext.start):<16}{_c_hex(ext.length):<16}{_c_hex(ext.offset):<16}"
                  f"{names[ext.depth]}")
    return 0


def _c_hex(n: int) -> str:
    """C's %#x, as qemu-img prints: 0 without the 0x."""
    return f"{n:#x}" if n else "0"


def _bitmap_map(path: str, name: str, output: str) -> int:
    """Changed-block tracking for backup tools: which guest ranges a bitmap marks dirty."""
    from .image import Image
    with Image.open(path, writable=False, lock=False, metadata_only=True) as img:
        if img.bitmaps is None:
            raise QcowError(f"{path} has no persistent bitmaps")
        bm = img.bitmaps.find(name)
        if bm.in_use:
            raise QcowError(f"bitmap '{name}' is in use (the image is open read-write, or its "
                            f"writer died): its content is not consistent")
        extents = img.bitmaps.extents(name)
    if output == "json":
        print("[" + ",\n".join(json.dumps({"start": s, "length": n, "dirty": d})
                               for s, n, d in extents) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}State")
    for s, n, d in extents:
        print(f"{s:<#16x}{n:<#16x}{'dirty' if d else 'clean'}")
    return 0


def resize_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qcowfuse resize", usage="qcowfuse resize [-h] [--shrink] [-q] [--data-file PATH] IMAGE [+|-]SIZE",
        description="Change the guest disk's size, as qemu-img resize does (the image must not "
                    "be in use; a mounted disk grows with truncate -s on its raw file).",
        epilog="SIZE: bytes, or a number with suffix k, M, G, T, P or E (powers of 1024); "
               "+SIZE / -SIZE are relative to the current size.  Shrinking needs --shrink and "
               "is refused where it would cut off guest data.")
    p.add_argument("--shrink", action="store_true", help="allow making the disk smaller")
    p.add_argument("-q", "--quiet", action="store_true", help="no message on success")
    p.add_argument("-f", dest="format", choices=["qcow2"], help="image format (qcow2 only)")
    p.add_argument("--data-file", metavar="PATH",
                   help="the image's external data file (resized with it), if it has one")
    p.add_argument("image")
    # As qemu-img: the size is the last word, taken off before the options are parsed, so a
    # relative shrink such as -1G is not mistaken for an option.
    if len(argv) < 2 or argv[-1] in ("-h", "--help"):
        p.parse_args(argv)  # help, or argparse's message for what is missing
        p.error("Expecting image file name and size")
    size_text, rest = argv[-1], argv[:-1]
    args = p.parse_args(rest[:-1] if rest[-1:] == ["--"] else rest)
    sign = {"+": 1, "-": -1}.get(size_text[:1], 0)
    from .image import Image
    try:
        n = strtosz(size_text[1:] if sign else size_text)
    except OverflowError:
        raise UsageError(f"Value '{size_text}' is out of range for parameter 'size'") from None
    except ValueError:
        raise UsageError("Parameter 'size' expects a non-negative number below 2^64 "
                         "(optional suffix k, M, G, T, P or E)") from None
    with Image.open(args.image, writable=True, metadata_only=True,  # no guest data
                    data_file=args.data_file) as img:
        total = img.size + sign * n if sign else n
        if total <= 0:
            raise UsageError("New image size must be positive")
        if total < img.size and not args.shrink:
            raise UsageError("Use the --shrink option to perform a shrink operation.")
        img.resize(total)
    if not args.quiet:
        print("Image resized.")
    return 0


SUBCOMMANDS = {"info": info_main, "check": check_main, "map": map_main, "resize": resize_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
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
        parse_mount_options(args.options, opts)
        return mount(opts)
    except QcowError as e:
        print(f"qcowfuse: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    if not (sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS):
        sys.exit(main())
    # An offline command.  Its output may go to a pipe that closes early (| head) or a
    # full disk, its image may sit on a failing one: a line, not a traceback.
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader is gone: nothing to tell it
        code = 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"qcowfuse: {e.strerror or e}{where}", file=sys.stderr)
        code = 1
    try:
        sys.stderr.flush()
    except OSError:
        pass
    # The image is closed and every byte of it went through os.pwrite (no user-space
    # buffer holds image data): leave without the interpreter's teardown of numpy and
    # the engine (~11 ms, a quarter of what `qemu-img map` takes in all).
    os._exit(code)


if __name__ == "__main__":
    entry()
