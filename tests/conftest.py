"""Shared fixtures: images, and mounts that are torn down in every path."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "qcowfuse", deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("qcowfuse")

QCOWFUSE = [sys.executable, "-m", "qcowfuse"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(QCOWFUSE + list(args), capture_output=True, text=True, timeout=timeout)


def fuse_mounts() -> set[str]:
    with open("/proc/self/mounts") as fh:
        return {line.split()[1] for line in fh if line.split()[2].startswith("fuse")}


def _fuse_mount_sources() -> dict[str, str]:
    """mount point -> source (qcowfuse's fsname is the image path)."""
    with open("/proc/self/mounts") as fh:
        return {f[1]: f[0] for f in (line.split() for line in fh) if f[2].startswith("fuse")}


# Directories outside pytest's temporary tree that tests mount in (scratch_dir).
SCRATCH_DIRS: list[str] = []


def scratch_dir(prefix: str, dir: str | None = None) -> Path:
    """A new directory outside tmp_path (short socket paths, a place another user can
    reach); mounts in it count as this session's in the end-of-session check."""
    import tempfile
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    SCRATCH_DIRS.append(path + "/")
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


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
    while _pid_alive(pid):
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


@pytest.fixture(params=["locked", "unlocked"])
def image_calls(request):
    """calls(im) -> (read, write) of an open Image: its own (with the image lock), or the
    unlocked pair the FUSE daemon serves requests with (Image.unlocked_io)."""
    def calls(im):
        return (im.read, im.write) if request.param == "locked" else im.unlocked_io()
    return calls


@pytest.fixture
def mount():
    """mount(image, mountpoint, *options) -> context manager yielding (raw path, pid)."""
    return mounted


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_mounts(tmp_path_factory):
    """Every mount this session made must be gone at its end.  Ours: the mount point or
    the image (the mount's source) lies in this session's temporary tree or a
    scratch_dir; anything else (a second suite beside this one, a benchmark) is not."""
    before = fuse_mounts()
    ours = str(tmp_path_factory.getbasetemp()) + "/"
    yield

    def mine(mp: str, source: str) -> bool:
        return any(p.startswith(d) for p in (mp, source) for d in (ours, *SCRATCH_DIRS))
    sources = _fuse_mount_sources()
    left = {mp for mp in fuse_mounts() - before if mine(mp, sources.get(mp, ""))}
    for mp in left:
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    assert not left, f"tests left FUSE mounts behind: {left}"
