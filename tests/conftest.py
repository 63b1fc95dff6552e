"""Shared fixtures: images, and mounts that are torn down in every path.  The code
behind them is in helpers/ (helpers.procs: the CLI, mounts, daemons)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

from helpers.procs import SCRATCH_DIRS, fuse_mount_sources, fuse_mounts, mounted
from helpers.services import QCOWFUSE_BIN, NotifySocket

settings.register_profile(
    "qcowfuse", deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("qcowfuse")


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


@pytest.fixture
def qcowfuse_bin() -> Path:
    """The installed `qcowfuse` program next to sys.executable (what systemd, mount(8)
    and users run), never `python -m qcowfuse`."""
    if not QCOWFUSE_BIN.exists():
        pytest.skip(f"{QCOWFUSE_BIN} not installed (scripts/test installs the package into .venv)")
    return QCOWFUSE_BIN


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    """A bound $NOTIFY_SOCKET, as systemd provides it, removed afterwards."""
    n = NotifySocket()
    try:
        yield n
    finally:
        n.close()


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
    sources = fuse_mount_sources()
    left = {mp for mp in fuse_mounts() - before if mine(mp, sources.get(mp, ""))}
    for mp in left:
        subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    assert not left, f"tests left FUSE mounts behind: {left}"
