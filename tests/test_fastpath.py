"""The fast path (one run of plain data clusters in one cached L2 table) keeps every
check of the general path: a cached table whose entry points into metadata or past
the end of the file is still refused, also for the second cluster of a run, and reads
and writes agree with QEMU, across clusters and L2 tables too."""

from __future__ import annotations

import os
import random
import struct

import pytest

from helpers import qemu
from helpers.rawqcow2 import COPIED, L2_OFFSET_MASK, RawImage
from qcowfuse import Image
from qcowfuse.errors import CorruptError

MiB = 1 << 20
CS = 65536


@pytest.mark.parametrize("target", ["refcount table", "L1 table", "L2 table", "past EOF"])
def test_cached_entry_into_metadata_is_refused(tmp_path, target, image_calls):
    img = qemu.create(tmp_path / "h.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    raw = RawImage(img)
    host = {"refcount table": raw.reftable, "L1 table": raw.l1, "L2 table": raw.l2_offset(),
            "past EOF": 1 << 40}[target]
    raw.set_l2_entry(4, COPIED | host)
    before = img.read_bytes()
    with Image.open(str(img), writable=True) as im:
        read, write = image_calls(im)
        assert read(0, 4096) == b"\x11" * 4096  # the L2 table is now cached
        write(0, b"\x11" * 4096)  # the first write (its preparation): later ones may go fast
        with pytest.raises(CorruptError):
            write(4 * CS + 4096, b"\xff" * 4096)
        with pytest.raises(CorruptError):  # refused from now on, as the general path does
            write(0, b"\xff" * 4096)
    after = img.read_bytes()
    assert after[:72] + after[80:] == before[:72] + before[80:], "only the corrupt bit may change"


def test_run_into_past_eof_is_refused(tmp_path, image_calls):
    """Two L2 entries that look like one host run, the second cluster past the end of
    the file: a write over both is refused for the second one."""
    img = qemu.create(tmp_path / "r.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    end = img.stat().st_size
    raw = RawImage(img)
    raw.set_l2_entry(4, COPIED | (end - CS))
    raw.set_l2_entry(5, COPIED | end)
    before = img.read_bytes()
    with Image.open(str(img), writable=True) as im:
        read, write = image_calls(im)
        assert read(0, 4096) == b"\x11" * 4096  # the L2 table is now cached
        write(0, b"\x11" * 4096)  # the first write (its preparation): later ones may go fast
        with pytest.raises(CorruptError):
            write(5 * CS - 4096, b"\xff" * 8192)
    after = img.read_bytes()
    assert len(after) == end
    assert after[:72] + after[80:] == before[:72] + before[80:], "only the corrupt bit may change"


def test_quick_allocation_never_lands_on_metadata(tmp_path, image_calls):
    """The next free cluster the fast path takes is overlap-checked too: an L2 table
    whose refcount dropped to 0 while the image is open is refused, not written over."""
    img = qemu.create(tmp_path / "m.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    with Image.open(str(img), writable=True) as im:
        im.write(36 * CS, b"\x12" * 4096)  # allocates: the free hint is past the used space
        im.flush()
        l2 = im.l1[0] & L2_OFFSET_MASK
        im.rc.add(l2 >> 16, -1)  # the L2 table now looks free, right at the hint
        assert im.rc.free_hint == l2 >> 16
        before = img.read_bytes()[l2:l2 + CS]
        with pytest.raises(CorruptError):
            image_calls(im)[1](40 * CS, b"\x13" * 4096)
    assert img.read_bytes()[l2:l2 + CS] == before
    assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 2, "the corrupt bit must be set"


def test_quick_allocation_takes_only_a_free_cluster(tmp_path, image_calls):
    """Right after opening, the free hint is cluster 0 (the header, in use, its refcount
    block cached by the first write's preparation): the first quick allocation must
    look at the refcount, not take the cluster at the hint."""
    img = qemu.create(tmp_path / "h.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 64k")
    with Image.open(str(img), writable=True) as im:
        read, write = image_calls(im)
        assert read(0, 4096) == b"\x11" * 4096  # the L2 table is now cached
        write(0, b"\x12" * 4096)  # the first write (its preparation), in place
        write(5 * CS, b"\x13" * 4096)  # a fresh cluster: the quick allocation
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x12 0 4k", "read -P 0x11 4k 60k", "read -P 0x13 320k 4k",
                 "read -P 0 324k 60k", read_only=True)


@pytest.mark.parametrize("cluster_size", [CS, 4096])
def test_small_requests_agree_with_qemu(tmp_path, cluster_size, image_calls):
    """Random 512 B..64 KiB reads and writes, most inside one allocated cluster, some
    across clusters, into unallocated space and a snapshot-shared table; with 4 KiB
    clusters most cross clusters, and some L2 tables (2 MiB of guest each)."""
    size = 8 * MiB
    img = qemu.create(tmp_path / "f.qcow2", size, cluster_size=cluster_size)
    qemu.qemu_io(img, f"write -P 0x21 0 {4 * MiB}")
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(img))
    model = bytearray(b"\x21" * (4 * MiB) + bytes(size - 4 * MiB))
    rnd = random.Random(7)
    with Image.open(str(img), writable=True) as im:
        read, write = image_calls(im)
        for i in range(3000):
            n = rnd.choice((512, 4096, 4096, 8192, CS))
            off = rnd.randrange(0, size - n) // 512 * 512
            if rnd.random() < 0.5:
                data = rnd.randbytes(n)
                assert write(off, data) == n
                model[off:off + n] = data
            else:
                assert read(off, n) == model[off:off + n], f"request {i}"
    qemu.assert_clean(img)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.compare_raw(img, tmp_path / "model.raw")
    snap = tmp_path / "s1.raw"  # the snapshot still has what it had
    qemu.run("qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", str(img), str(snap))
    assert snap.read_bytes() == b"\x21" * (4 * MiB) + bytes(size - 4 * MiB)


def test_a_fast_write_in_place_is_synced_by_the_next_flush(tmp_path, monkeypatch, image_calls):
    """A write the fast path makes in place (no metadata changes) still makes the next
    flush fdatasync the file: a guest fsync after it must not return before the data is
    durable."""
    img = qemu.create(tmp_path / "s.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    with Image.open(str(img), writable=True) as im:
        read, write = image_calls(im)
        write(0, b"\x12" * 4096)  # the first write (its preparation), then all durable
        im.flush()
        syncs = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
        write(CS + 4096, b"\x13" * 4096)  # in place, inside one allocated cluster
        im.flush()
        assert syncs, "the flush after an in-place write did not sync the image file"
    qemu.qemu_io(img, f"read -P 0x13 {CS + 4096} 4096")
