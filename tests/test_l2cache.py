"""The L2 table cache resists scans: tables read once cost a few tables of memory, not
the whole budget, while tables in real use are admitted and stay; data stays right."""

from __future__ import annotations

import random

from helpers import qemu
from qcowfuse import Image
from qcowfuse.qcow2.tables import L2Cache

KiB, MiB = 1 << 10, 1 << 20
CS = 4 * KiB
TABLE_SPAN = CS // 8 * CS  # guest bytes one L2 table maps: 2 MiB at 4 KiB clusters
TABLES = 200


def image_with_tables(tmp_path):
    img = qemu.create(tmp_path / "t.qcow2", TABLES * TABLE_SPAN, cluster_size=CS)
    qemu.qemu_io(img, *(f"write -P {1 + i % 200} {i * TABLE_SPAN} 4k" for i in range(TABLES)))
    return img


def test_scan_does_not_fill_the_cache(tmp_path):
    img = image_with_tables(tmp_path)
    with Image.open(str(img), writable=True) as im:  # default budget: 4096 tables here
        for i in range(TABLES):
            assert im.read(i * TABLE_SPAN, 4096) == bytes([1 + i % 200]) * 4096
        assert len(im.l2.tables) <= L2Cache.PROBATION + 1
        # tables in use (each touched again while still remembered) are admitted
        hot = range(0, 100)
        for _ in range(2):
            for i in hot:
                assert im.read(i * TABLE_SPAN + 4096, 4096) == bytes(4096)
        assert {im.l1[i] & ~((1 << 63) | 0x1FF) for i in hot} <= set(im.l2.tables)
        # and a write into a table that was only scanned lands where it should
        im.write(150 * TABLE_SPAN + 8192, b"\xee" * 4096)
    qemu.assert_clean(img)
    qemu.qemu_io(img, f"read -P 151 {150 * TABLE_SPAN} 4096", f"read -P 0xee {150 * TABLE_SPAN + 8192} 4096",
                 read_only=True)


def test_small_cache_random_io_agrees_with_qemu(tmp_path):
    """Random reads and writes over many tables with a cache smaller than the image: probation,
    ghosts and eviction of clean tables never lose a dirty one."""
    img = image_with_tables(tmp_path)
    size = TABLES * TABLE_SPAN
    model = bytearray(size)
    for i in range(TABLES):
        model[i * TABLE_SPAN:i * TABLE_SPAN + 4096] = bytes([1 + i % 200]) * 4096
    rnd = random.Random(3)
    with Image.open(str(img), writable=True, l2_cache_bytes=48 * CS) as im:
        for _ in range(1500):
            t = rnd.randrange(TABLES) if rnd.random() < 0.5 else rnd.randrange(8)  # some hot tables
            off = t * TABLE_SPAN + rnd.randrange(0, TABLE_SPAN - 8192) // 512 * 512
            n = rnd.choice((512, 4096, 8192))
            if rnd.random() < 0.4:
                data = rnd.randbytes(n)
                im.write(off, data)
                model[off:off + n] = data
            else:
                assert im.read(off, n) == model[off:off + n]
            if rnd.random() < 0.02:
                im.flush()
    qemu.assert_clean(img)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.compare_raw(img, tmp_path / "model.raw")
