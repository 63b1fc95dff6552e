"""Real use: a loop device over the raw view, ext4, files; e2fsck and hashes on QEMU's reading."""

from __future__ import annotations

import contextlib
import hashlib
import random
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


def test_ext4_on_loop_device(tmp_path, mount):
    """ext4 made and filled through the mount; judged on QEMU's reading of the image
    (qemu-img convert to raw), never through qcowfuse: e2fsck -fn on the converted
    file, and the files' hashes from a read-only loop mount of it."""
    img = qemu.create(tmp_path / "guest.qcow2", 1 << 30)
    rnd = random.Random(3)
    with mount(img, tmp_path / "raw") as (raw, _):
        with loop_device(raw) as dev:
            sh("mkfs.ext4", "-q", "-F", dev)
            with fs_mounted(dev, tmp_path / "guest") as root:
                for i in range(300):
                    d = root / f"d{i % 17}"
                    d.mkdir(exist_ok=True)
                    (d / f"f{i}").write_bytes(rnd.randbytes(rnd.choice([0, 100, 4096, 70000, 1 << 20])))
                written = tree_hashes(root)
                sh("sync")
    qemu.assert_clean(img)
    assert_ext4_as_qemu_reads_it(img, tmp_path, written)
    assert len(written) == 300
