"""Mount lifecycle: checks, fork before trio, readiness pipe, signals, unmount.

The parent validates everything it can (image header, mount point) before it
forks, so most errors never reach a daemon.  The daemon (double fork, setsid)
mounts, serves, and reports "ready" through a pipe only once a stat() of the
mount point has been answered by its own FUSE loop; the parent exits 0 then,
or prints the daemon's error and exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import NeedsPassphrase, QcowError
from .image import DEFAULT_L2_CACHE_BYTES, DEFAULT_REFCOUNT_CACHE_BYTES, Image
from .notify import sd_notify

log = logging.getLogger("qcowfuse")


@dataclass
class MountOptions:
    image: str
    mountpoint: str
    foreground: bool = False
    read_only: bool = False
    allow_other: bool = False
    debug: bool = False
    direct_io: bool = False
    force_share: bool = False
    snapshot: str | None = None
    detect_zeroes: str = "off"
    l2_cache_size: int = DEFAULT_L2_CACHE_BYTES
    refcount_cache_size: int = DEFAULT_REFCOUNT_CACHE_BYTES
    pidfile: str | None = None
    backing: str | None = None  # "off", or a path overriding the header's backing file
    overlay: bool = False  # writes go to an overlay; the image is opened read-only
    overlay_path: str | None = None  # keep the overlay here (None: throwaway)
    partitions: bool = True  # a directory mount shows a file per partition too
    key_file: str | None = None  # the passphrase of an encrypted image, as its bytes
    data_file: str | None = None  # the image's external data file, instead of the name it gives
    extra_fuse_options: list[str] = field(default_factory=list)


@dataclass
class MountTarget:
    path: str  # absolute mount point
    file_name: str | None  # None: mounted over a file; else the one file in the directory
    created: bool  # we created the mount point file and remove it if mounting fails


class MountError(QcowError):
    pass


def mounted_paths() -> set[str]:
    out = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            mp = line.split()[4]
            out.add(mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                    .replace("\\134", "\\"))
    return out


def prepare_mountpoint(mountpoint: str, image_path: str) -> MountTarget:
    path = os.path.abspath(mountpoint)
    if path in mounted_paths():
        raise MountError(f"{mountpoint}: already mounted")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise MountError(f"{mountpoint}: no such file or directory (and its parent does not exist)") from None
        try:  # mode 0644 less the caller's umask; the view shows the image's own
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except OSError as e:
            raise MountError(f"{mountpoint}: cannot create mount point: {e.strerror}") from None
        return MountTarget(path, None, True)
    except OSError as e:
        raise MountError(f"{mountpoint}: {e.strerror}") from None
    if os.path.samefile(path, image_path):
        raise MountError(f"{mountpoint}: the mount point is the image itself")
    if stat.S_ISDIR(st.st_mode):
        return MountTarget(path, Path(image_path).stem + ".raw", False)
    if stat.S_ISREG(st.st_mode):
        return MountTarget(path, None, False)
    raise MountError(f"{mountpoint}: not a regular file or directory")


def check_allow_other(opts: MountOptions) -> None:
    """fusermount3 refuses allow_other for non-root users unless /etc/fuse.conf allows it."""
    if not opts.allow_other or os.geteuid() == 0:
        return
    try:
        with open("/etc/fuse.conf", encoding="utf-8", errors="replace") as fh:
            if any(line.strip() == "user_allow_other" for line in fh):
                return
    except OSError:
        return  # unreadable here: let fusermount3 decide
    raise MountError("-o allow_other: non-root users need a line 'user_allow_other' in /etc/fuse.conf")


# libfuse (3.18 on) turns FUSE-over-io_uring on from this variable, then calls handlers
# from threads of its own, which pyfuse3's single trio thread cannot take.
URING_ENVIRONMENT = "FUSE_URING_ENABLE"


def keep_io_uring_off() -> None:
    """No environment may switch the mount to io_uring (see URING_ENVIRONMENT)."""
    os.environ.pop(URING_ENVIRONMENT, None)


def write_pidfile(path: str, pid: int) -> None:
    """The pid file, created with the caller's umask honoured (0644 at the widest); an
    existing link is not followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{pid}\n")


def mount(opts: MountOptions) -> int:
    """Open the image, prepare the mount point, then serve (foreground) or daemonize."""
    check_allow_other(opts)
    image_path = os.path.abspath(opts.image)
    if not os.path.exists(image_path):
        raise MountError(f"{opts.image}: no such file")
    if not os.path.isfile(image_path):
        raise MountError(f"{opts.image}: not a regular file")
    if opts.overlay and opts.read_only:
        raise MountError("-o overlay takes writes (into the overlay): drop -o ro")
    if opts.force_share and not opts.read_only and opts.snapshot is None and not opts.overlay:
        raise MountError("force-share needs a read-only mount (-o ro,force-share)")
    if opts.snapshot is not None and not opts.overlay:
        opts.read_only = True  # a snapshot is never changed
    if opts.pidfile:
        opts.pidfile = os.path.abspath(opts.pidfile)  # the daemon chdirs to / before writing it
    passphrase = read_passphrase(opts.key_file) if opts.key_file else None
    try:
        image = _open(image_path, opts, passphrase)
    except NeedsPassphrase as e:
        if os.path.abspath(e.path) != image_path:
            raise MountError(f"backing file {e.path} is encrypted: encrypted backing files are "
                             f"not supported") from None
        if opts.overlay:  # refused before asking for a passphrase it could not use
            raise MountError(OVERLAY_ENCRYPTED) from None
        if opts.key_file or not sys.stdin.isatty():
            raise MountError(f"{opts.image} is LUKS-encrypted: give its passphrase with "
                             f"-o key-file=PATH (or run on a terminal to be asked)") from None
        import getpass
        passphrase = getpass.getpass(f"Passphrase for {opts.image}: ").encode()
        image = _open(image_path, opts, passphrase)
    del passphrase
    target = None
    try:
        target = prepare_mountpoint(opts.mountpoint, image_path)
        if opts.foreground:
            _setup_logging(opts, detached=False)
            return serve(image, opts, target, ready_fd=None)
        return _daemonize(image, opts, target)
    except BaseException:
        if target is not None and target.created:
            _remove_quietly(target.path)
        raise


OVERLAY_ENCRYPTED = "-o overlay over an encrypted image would write its plaintext to $TMPDIR: not supported"


def read_passphrase(path: str) -> bytes:
    """The bytes of a key file, exactly (as QEMU's --object secret,file= reads them)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise MountError(f"key-file {path}: {e.strerror}") from None


def _open(image_path: str, opts: MountOptions, passphrase: bytes | None) -> Image:
    if opts.overlay:
        if passphrase is not None:
            raise MountError(OVERLAY_ENCRYPTED)
        from .overlay import open_overlay
        return open_overlay(image_path, opts.overlay_path, lock=not opts.force_share,
                            snapshot=opts.snapshot, backing=opts.backing, data_file=opts.data_file,
                            detect_zeroes=opts.detect_zeroes, l2_cache_bytes=opts.l2_cache_size,
                            refcount_cache_bytes=opts.refcount_cache_size)
    return Image.open(image_path, writable=not opts.read_only, lock=not opts.force_share,
                      backing=opts.backing, snapshot=opts.snapshot, data_file=opts.data_file,
                      detect_zeroes=opts.detect_zeroes, l2_cache_bytes=opts.l2_cache_size,
                      refcount_cache_bytes=opts.refcount_cache_size, passphrase=passphrase)


def _remove_quietly(path: str) -> None:
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass


def _daemonize(image: Image, opts: MountOptions, target: MountTarget) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: new session, fork again so the daemon is no session leader
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        code = 1
        try:
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            _setup_logging(opts, detached=True)
            code = serve(image, opts, target, ready_fd=w)
        except BaseException as e:  # report, never a traceback on a terminal
            _report(w, f"error: {e}")
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as pipe:
        msg = pipe.read().decode("utf-8", "replace").strip()
    if msg == "ready":
        return 0
    if target.created:
        _remove_quietly(target.path)
    raise MountError(msg.removeprefix("error: ") or "the daemon exited before the mount was ready")


def _report(fd: int | None, msg: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, msg.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _setup_logging(opts: MountOptions, detached: bool) -> None:
    root = logging.getLogger("qcowfuse")
    root.setLevel(logging.DEBUG if opts.debug else logging.INFO)
    if detached and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter(f"qcowfuse[{os.getpid()}]: %(message)s"))
    elif detached:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qcowfuse: %(message)s"))
    root.handlers[:] = [handler]


@contextlib.contextmanager
def _fd2_into(lines: list[str]) -> Iterator[None]:
    """Collect what is written to fd 2 meanwhile (a detached daemon's fd 2 is /dev/null)."""
    sys.stderr.flush()
    saved = os.dup(2)
    buf = os.memfd_create("qcowfuse-stderr")
    os.dup2(buf, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        text = os.pread(buf, 65536, 0).decode("utf-8", "replace")
        os.close(buf)
        lines.extend(line.strip() for line in text.splitlines() if line.strip())


def serve(image: Image, opts: MountOptions, target: MountTarget, ready_fd: int | None) -> int:
    """Mount and run the FUSE loop until unmounted or signalled; flush and close the image."""
    import pyfuse3  # imported only here: after the fork, never before
    import trio

    from .fuse_ops import RawFileOperations

    shown_fd = image.f.fd  # the image file: its owner, mode and times are the view's
    if opts.overlay:
        from .overlay import image_file_fd
        shown_fd = image_file_fd(image)
    ops = RawFileOperations(image, shown_fd, target.file_name, direct_io=opts.direct_io,
                            partitions=opts.partitions)
    fuse_options = set(pyfuse3.default_options)
    # The kernel checks the owner and mode the view shows (the image file's): without
    # this, allow_other would open the raw file to every user.
    fuse_options |= {"default_permissions", "fsname=" + os.path.abspath(opts.image).replace(",", "_"),
                     "subtype=qcowfuse"}
    if opts.read_only:
        fuse_options.add("ro")
    if opts.allow_other:
        fuse_options.add("allow_other")
    if opts.debug:
        fuse_options.add("debug")
    fuse_options.update(opts.extra_fuse_options)
    said: list[str] = []
    keep_io_uring_off()
    try:
        with _fd2_into(said):  # libfuse and fusermount3 explain failures only on fd 2
            pyfuse3.init(ops, target.path, fuse_options)
    except RuntimeError as e:
        image.close()
        reason = said[-1] if said else str(e)
        raise MountError(f"{target.path}: mount failed: {reason}") from None
    for line in said:
        log.warning("%s", line)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signals, nursery)

            async def loop() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()  # unmounted from outside

            nursery.start_soon(loop)
            await trio.to_thread.run_sync(os.stat, target.path)
            if opts.pidfile:
                write_pidfile(opts.pidfile, os.getpid())
            log.info("serving %s on %s%s", opts.image, target.path,
                     " (read-only)" if opts.read_only else " (writes to an overlay)" if opts.overlay
                     else "")
            if opts.force_share:
                log.warning("force-share: %s is not locked; another process may change it "
                            "while it is mounted", opts.image)
            _report(ready_fd, "ready")
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    async def _on_signals(nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                sd_notify("STOPPING=1")
                pyfuse3.terminate()
                return

    code = 0
    try:
        trio.run(run)
    except BaseException as e:
        log.error("FUSE loop failed: %s", e)
        code = 1
    finally:
        pyfuse3.close(unmount=True)
        try:
            image.close()
        except (QcowError, OSError) as e:
            log.error("closing the image failed: %s", e)
            code = 1
        if opts.pidfile:
            try:
                os.unlink(opts.pidfile)
            except OSError:
                pass
        if target.created:
            _remove_quietly(target.path)
    log.info("unmounted %s", target.path)
    return code
