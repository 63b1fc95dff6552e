"""The bug that started the project, at full size.

OpenBSD vmd allocated each new refcount block without counting the block's own
cluster: `qemu-img check` then reports `refcount=0 reference=1` at cluster
N*32768+1 for every 2 GiB the *image file* grows.  Only dense data makes the
file cross those boundaries, so this writes ~4.5 GiB through a real mount.
"""

from __future__ import annotations

import os

import pytest

from helpers import qemu
from helpers.rawqcow2 import RefcountView

pytestmark = [pytest.mark.root, pytest.mark.slow]  # mounts; ~40 s (4.5 GiB through a mount)

GiB = 1 << 30
MiB = 1 << 20
CHUNK = 64 * MiB


def pattern(i: int) -> int:
    return i % 250 + 1


def test_dense_data_across_refcount_block_boundaries(tmp_path, mount):
    img = qemu.create(tmp_path / "seed.qcow2", 40 * GiB, cluster_size=65536, refcount_bits=16)
    dense = 4 * GiB + 512 * MiB
    sparse = [(k * GiB + 12345, 0xE0 + k % 16) for k in range(5, 40, 3)]
    end = 40 * GiB - 4096
    with mount(img, tmp_path / "raw") as (raw, _):
        fd = os.open(raw, os.O_WRONLY)
        try:
            for i in range(dense // CHUNK):
                block = bytes([pattern(i)]) * (4 * MiB)
                for j in range(CHUNK // len(block)):
                    os.pwrite(fd, block, i * CHUNK + j * len(block))
            for off, p in sparse:
                os.pwrite(fd, bytes([p]) * 4096, off)
            os.pwrite(fd, b"\xee" * 4096, end)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert img.stat().st_size > 4 * GiB  # the host file crossed two 2 GiB block ranges

    info = qemu.assert_clean(img)
    assert info.get("check-errors", 0) == 0

    view = RefcountView(img)
    blocks = view.refblock_clusters()
    print(f"\nseed: image file {img.stat().st_size} bytes, {len(blocks)} refcount blocks at clusters "
          f"{blocks}, qemu-img check: {info.get('allocated-clusters')} allocated clusters, "
          f"{info.get('leaks', 0)} leaks, {info.get('corruptions', 0)} corruptions")
    assert len(blocks) >= 3
    for c in blocks + list(view.table_cluster_range()):
        assert view.refcount(c) == 1, f"metadata cluster {c} has refcount {view.refcount(c)}"
    # the clusters vmd left at refcount 0
    for n in range(1, len(blocks)):
        c = n * 32768 + 1
        assert view.refcount(c) >= 1 or c * 65536 >= img.stat().st_size

    cmds = [f"read -P {pattern(i)} {i * CHUNK} {CHUNK}" for i in range(dense // CHUNK)]
    cmds += [f"read -P {p} {off} 4096" for off, p in sparse]
    cmds += [f"read -P 0xee {end} 4096", f"read -P 0 {dense} {5 * GiB - dense}"]
    qemu.qemu_io(img, *cmds, read_only=True)
