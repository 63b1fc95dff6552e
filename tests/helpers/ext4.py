"""Loop devices and ext4 over a raw file, and ext4 judged on QEMU's reading of an image."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path

from helpers import qemu


def sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_device(raw: Path, read_only: bool = False):
    dev = sh("losetup", "-f", "--show", *(["-r"] if read_only else []), str(raw))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def fs_mounted(dev: str, where: Path, read_only: bool = False):
    where.mkdir(exist_ok=True)
    sh("mount", *(["-o", "ro"] if read_only else []), dev, str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "lost+found" not in p.parts}


def assert_ext4_as_qemu_reads_it(image: Path, tmp_path: Path, written: dict[str, str]) -> None:
    """Judge a guest ext4 on QEMU's reading of the image, never through qcowfuse:
    e2fsck -fn on `qemu-img convert` output, and the files' hashes from a read-only
    loop mount of it equal to what was written."""
    converted = qemu.convert_to_raw(image, tmp_path / "converted.raw")
    fsck = subprocess.run(["e2fsck", "-fn", str(converted)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with loop_device(converted, read_only=True) as dev:
        with fs_mounted(dev, tmp_path / "qemu-view", read_only=True) as root:
            assert tree_hashes(root) == written
