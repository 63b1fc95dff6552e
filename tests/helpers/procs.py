"""Processes and mounts: the qcowfuse CLI as a subprocess, FUSE mounts, daemons.

Used by conftest.py (the mount fixture, the end-of-session leftover check), by the
tests, and by scripts/bench.py (pid_alive, unescape_mount), so keep it free of pytest.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

QCOWFUSE = [sys.executable, "-m", "qcowfuse"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(QCOWFUSE + list(args), capture_output=True, text=True, timeout=timeout)


def fuse_mounts() -> set[str]:
    with open("/proc/self/mounts") as fh:
        return {line.split()[1] for line in fh if line.split()[2].startswith("fuse")}


def fuse_mount_sources() -> dict[str, str]:
    """mount point -> source (qcowfuse's fsname is the image path)."""
    with open("/proc/self/mounts") as fh:
        return {f[1]: f[0] for f in (line.split() for line in fh) if f[2].startswith("fuse")}


# Directories outside pytest's temporary tree that tests mount in (scratch_dir).
SCRATCH_DIRS: list[str] = []


def scratch_dir(prefix: str, dir: str | None = None) -> Path:
    """A new directory outside tmp_path (short socket paths, a place another user can
    reach); mounts in it count as this session's in the end-of-session check."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    SCRATCH_DIRS.append(path + "/")
    return Path(path)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a daemon that exited but was not reaped
    by its parent yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[-1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def unescape_mount(field: str) -> str:
    """A path field of /proc/self/mounts as it is (spaces etc. are octal escapes there)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def unmount(mountpoint: Path, pid: int | None, timeout: float = 60) -> None:
    """fusermount3 -u (retrying while busy), then wait for the daemon to exit."""
    deadline = time.monotonic() + timeout
    while str(mountpoint) in fuse_mounts():
        r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
        if r.returncode == 0:
            break
        if time.monotonic() > deadline:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
            break
        time.sleep(0.2)
    if pid is None:
        return
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"daemon {pid} did not exit after unmount")
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, *options: str) -> Iterator[tuple[Path, int]]:
    """Mount through the real CLI (daemon mode); yields (raw file path, daemon pid)."""
    pidfile = mountpoint.parent / (mountpoint.name + ".pid")
    r = run_cli(str(image), str(mountpoint), "--pidfile", str(pidfile), *options)
    pid = None
    try:
        assert r.returncode == 0, f"mount failed: {r.stderr}"
        pid = int(pidfile.read_text())
        raw = mountpoint / (image.stem + ".raw") if mountpoint.is_dir() else mountpoint
        yield raw, pid
    finally:
        unmount(mountpoint, pid)
