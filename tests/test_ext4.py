"""Real use: a loop device over the raw view, ext4, files; e2fsck and hashes on QEMU's reading."""

from __future__ import annotations

import random

import pytest

from helpers import qemu
from helpers.ext4 import assert_ext4_as_qemu_reads_it, fs_mounted, loop_device, sh, tree_hashes

pytestmark = pytest.mark.root  # every test here mounts (see the markers in pyproject.toml)


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
