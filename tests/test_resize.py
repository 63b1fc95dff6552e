"""Growing and shrinking the guest disk (issue 13), judged by QEMU: qemu-img info for the
size, qemu-img check, qemu-img compare against a model written below and above the old end."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from helpers import qemu
from helpers.cli import assert_one_line_error
from helpers.ext4 import assert_ext4_as_qemu_reads_it, fs_mounted, loop_device, sh, tree_hashes
from helpers.procs import run_cli
from helpers.resize import Model, info
from qcowfuse import Image, ReadOnlyError
from qcowfuse.errors import ResizeError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# cluster size -> (old size, new size): the old L1 table fits in one cluster, the new one
# needs several where that stays cheap (one cluster of L1 maps cs**3 / 64 bytes)
GROWTH = {512: (1 * MiB, 8 * MiB), 1024: (4 * MiB, 48 * MiB), 4096: (4 * MiB, 3 * GiB),
          65536: (4 * MiB, 1536 * MiB), 2 * MiB: (32 * MiB, 513 * GiB)}
VARIANTS = ["plain", "snapshot", "backing", "short-backing"]


def l1_clusters(path: Path) -> int:
    h = path.read_bytes()[:48]
    l1_size = int.from_bytes(h[36:40], "big")
    cs = 1 << int.from_bytes(h[20:24], "big")
    return -(-l1_size * 8 // cs)


def make_image(tmp_path: Path, cs: int, compat: str, variant: str, old: int, new: int,
               extra: str = "") -> Path:
    path = tmp_path / "t.qcow2"
    if variant in ("backing", "short-backing"):
        base_size = new if variant == "backing" else old // 2
        base = qemu.create(tmp_path / "base.qcow2", base_size, 65536)
        qemu.qemu_io(base, f"write -P 0x33 0 {min(base_size, old + 8 * cs)}",
                     f"write -P 0x34 {base_size - 3 * cs} {3 * cs}")
        extra = ",".join(filter(None, [extra, f"backing_file={base},backing_fmt=qcow2"]))
    qemu.create(path, old, cs, 16, compat, extra)
    qemu.qemu_io(path, f"write -P 0x11 0 {4 * cs}", f"write -P 0x12 {old - 2 * cs - 512} {cs}")
    if variant == "snapshot":
        qemu.run("qemu-img", "snapshot", "-c", "s1", str(path))
        qemu.qemu_io(path, f"write -P 0x13 {cs} {cs}")
    return path


def grow_and_write(path: Path, model: Model, old: int, new: int, cs: int, **open_opts) -> None:
    base = Image.open(str(path), writable=True, **open_opts)
    try:
        # dirty metadata when the resize starts: it must reach disk before the L1 moves
        model.write(base, 100, b"\x21" * 50)
        model.write(base, 6 * cs, b"\x22" * cs)
        base.resize(new)
        model.resize(new)
        assert base.size == new
        model.write(base, old - 100, b"\x23" * 300)  # across the old end
        model.write(base, old + 3 * cs + 7, b"\x24" * 1000)
        model.write(base, new // 2 + 5, b"\x25" * (2 * cs + 9))
        model.write(base, new - 1500, b"\x26" * 1500)
        assert base.read(old + 3 * cs, 7) == bytes(7)  # the new space reads as zeros
    finally:
        base.close()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("cs", sorted(GROWTH))
def test_grow_matches_qemu(tmp_path, cs, compat, variant):
    old, new = GROWTH[cs]
    if variant == "backing" and cs > 512:
        old += 512  # the old end inside a cluster: its tail must not show the backing file
    path = make_image(tmp_path, cs, compat, variant, old, new)
    model = Model(path, tmp_path / "model.raw")
    if compat == "0.10" and variant in ("snapshot", "backing"):
        before = path.read_bytes()
        with Image.open(str(path), writable=True) as img:
            with pytest.raises(ResizeError) as e:
                img.resize(new)
        assert e.value.errno == errno.EOPNOTSUPP
        assert ("v2 image which has snapshots" if variant == "snapshot" else "backing file") in str(e.value)
        assert path.read_bytes() == before
        return
    l1_before = l1_clusters(path)
    grow_and_write(path, model, old, new, cs)
    model.judge(path, new)
    if cs <= 4096:
        assert l1_before == 1 and l1_clusters(path) > 1
    if variant == "snapshot":  # the snapshot keeps its size and content: QEMU reverts to it
        with Image.open(str(path), snapshot="s1") as view:
            assert view.size == old
        reverted = tmp_path / "reverted.qcow2"
        reverted.write_bytes(path.read_bytes())
        qemu.run("qemu-img", "snapshot", "-a", "s1", str(reverted))
        expect = qemu.create(tmp_path / "s1-expect.qcow2", old, cs)
        qemu.qemu_io(expect, f"write -P 0x11 0 {4 * cs}", f"write -P 0x12 {old - 2 * cs - 512} {cs}")
        assert info(reverted)["virtual-size"] == old
        qemu.assert_clean(reverted)
        qemu.compare_raw(reverted, qemu.convert_to_raw(expect, tmp_path / "s1-model.raw"))


@pytest.mark.parametrize("cs", [16384, 65536])
def test_grow_extended_l2_over_backing(tmp_path, cs):
    old, new = 4 * MiB + 512, 40 * MiB
    path = make_image(tmp_path, cs, "1.1", "backing", old, new, extra="extended_l2=on")
    model = Model(path, tmp_path / "model.raw")
    grow_and_write(path, model, old, new, cs)
    model.judge(path, new)


def test_grow_zeroes_the_tail_qemu_shrink_left(tmp_path):
    """qemu-img resize --shrink keeps the cluster cut in two, data and all: growing again
    must not bring that data back."""
    cs = 65536
    path = qemu.create(tmp_path / "t.qcow2", 4 * MiB, cs)
    qemu.qemu_io(path, "write -P 0x41 0 4M")
    qemu.run("qemu-img", "resize", "-q", "--shrink", str(path), str(2 * MiB + 4096))
    model = Model(path, tmp_path / "model.raw")
    with Image.open(str(path), writable=True) as img:
        img.resize(3 * MiB)
    model.resize(3 * MiB)
    model.judge(path, 3 * MiB)


def test_grow_many_times_through_l1_growth(tmp_path):
    """512 B clusters: every step moves the L1 table; writes in each new range."""
    cs = 512
    path = qemu.create(tmp_path / "t.qcow2", 256 * KiB, cs, 64)
    model = Model(path, tmp_path / "model.raw")
    size = 256 * KiB
    offsets = set()
    with Image.open(str(path), writable=True) as img:
        for step in range(12):
            new = size + (step + 1) * 384 * KiB + 512 * (step % 3)
            img.resize(new)
            model.resize(new)
            model.write(img, size - 10, bytes([step + 1]) * 700)
            offsets.add(img.header.l1_table_offset)
            size = new
    model.judge(path, size)
    assert len(offsets) >= 5


# -- shrinking ----------------------------------------------------------------------------

def test_shrink_over_unallocated_space(tmp_path):
    cs = 512
    path = qemu.create(tmp_path / "t.qcow2", 8 * MiB, cs)
    # data below the new end, zero clusters (one preallocated) and whole L2 tables past it
    qemu.qemu_io(path, "write -P 0x51 0 64k", "write -P 0x52 1000k 24k", "write -P 0x53 3M 64k",
                 "write -z 3M 64k", "write -z 6M 1k", "write -z -u 7M 4k")
    model = Model(path, tmp_path / "model.raw")
    with Image.open(str(path), writable=True) as img:
        img.resize(1 * MiB + 512)
        assert img.read(MiB, 512) == bytes(512)
    model.resize(1 * MiB + 512)
    model.judge(path, 1 * MiB + 512)  # clean: the freed L2 tables and zero clusters are not leaked
    # as qemu-img resize --shrink: the L1 table keeps its size
    assert int.from_bytes(path.read_bytes()[36:40], "big") == 8 * MiB // (512 * 64)
    with Image.open(str(path), writable=True) as img:  # and grows again, reading zeros
        img.resize(4 * MiB)
    model.resize(4 * MiB)
    model.judge(path, 4 * MiB)


def test_shrink_with_snapshot_sharing_the_tables(tmp_path):
    cs = 512
    path = qemu.create(tmp_path / "t.qcow2", 4 * MiB, cs)
    qemu.qemu_io(path, "write -P 0x61 0 256k", "write -P 0x62 2M 64k", "write -z 2M 64k")
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(path))
    model = Model(path, tmp_path / "model.raw")
    with Image.open(str(path), writable=True) as img:
        img.resize(1 * MiB)
    model.resize(1 * MiB)
    model.judge(path, 1 * MiB)
    with Image.open(str(path), snapshot="s1") as view:
        assert view.size == 4 * MiB


@pytest.mark.parametrize("where", ["cluster past the end", "tail of the cut cluster", "compressed"])
def test_shrink_over_data_is_refused_and_changes_nothing(tmp_path, where):
    cs = 4096
    path = qemu.create(tmp_path / "t.qcow2", 8 * MiB, cs)
    cmd, new = {"cluster past the end": ("write -P 0x71 7M 1", 4 * MiB),
                "tail of the cut cluster": ("write -P 0x72 4100 1", 4096 + 512),
                "compressed": (f"write -c -P 0x73 {6 * MiB} {cs}", 4 * MiB)}[where]
    qemu.qemu_io(path, "write -P 0x70 0 8k", cmd)
    before = path.read_bytes()
    with Image.open(str(path), writable=True) as img:
        img.write(0, b"\x74" * 10)  # dirty tables stay as they are
        with pytest.raises(ResizeError) as e:
            img.resize(new)
        assert e.value.errno == errno.EPERM and "guest data" in str(e.value)
        assert img.size == 8 * MiB
    qemu.assert_clean(path)
    assert info(path)["virtual-size"] == 8 * MiB
    assert len(path.read_bytes()) == len(before)


# -- refusals -----------------------------------------------------------------------------

def test_refusals_change_nothing(tmp_path):
    path = qemu.create(tmp_path / "t.qcow2", 4 * MiB, 65536)
    qemu.qemu_io(path, "write -P 0x7a 0 64k")
    before = path.read_bytes()
    with Image.open(str(path), writable=True) as img:
        for size, code, text in [(4 * MiB + 1, errno.EINVAL, "multiple of 512"),
                                 (1 << 56, errno.EFBIG, "File too large"),
                                 (1 << 52, errno.EFBIG, "File too large")]:
            with pytest.raises(ResizeError) as e:
                img.resize(size)
            assert e.value.errno == code and text in str(e.value)
        img.resize(4 * MiB)  # the same size: nothing to do
    assert path.read_bytes() == before
    with Image.open(str(path)) as img:
        with pytest.raises(ReadOnlyError):
            img.resize(8 * MiB)
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(path))
    with Image.open(str(path), snapshot="s1") as view:
        with pytest.raises(ReadOnlyError):
            view.resize(8 * MiB)


def test_inconsistent_bitmaps_are_refused(tmp_path):
    """QEMU cannot resize bitmaps it does not trust (in use: their writer died); nor do we."""
    path = qemu.create(tmp_path / "t.qcow2", 4 * MiB)
    qemu.run("qemu-img", "bitmap", "--add", str(path), "b1")
    subprocess.run(["qemu-io", "-c", "write 0 64k", "-c", "abort", str(path)], capture_output=True)
    before = path.read_bytes()
    with Image.open(str(path), writable=True) as img:
        with pytest.raises(ResizeError) as e:
            img.resize(8 * MiB)
    assert e.value.errno == errno.EOPNOTSUPP and "bitmap 'b1' is inconsistent" in str(e.value)
    assert path.read_bytes() == before


# -- through the mount ----------------------------------------------------------------------

@pytest.mark.root
def test_truncate_through_mount(tmp_path, mount):
    cs = 512
    path = qemu.create(tmp_path / "t.qcow2", 1 * MiB, cs)
    qemu.qemu_io(path, "write -P 0x81 0 1M")
    model = Model(path, tmp_path / "model.raw")
    with mount(path, tmp_path / "raw") as (raw, _):
        fd = os.open(raw, os.O_RDWR)
        try:
            os.ftruncate(fd, 8 * MiB)  # the L1 table moves
            assert os.fstat(fd).st_size == 8 * MiB and raw.stat().st_size == 8 * MiB
            assert os.pread(fd, 4096, 1 * MiB) == bytes(4096)
            for off, data in [(MiB - 5, b"\x82" * 10), (5 * MiB, b"\x83" * 70000), (8 * MiB - 9, b"\x84" * 9)]:
                assert os.pwrite(fd, data, off) == len(data)
                with open(model.raw, "r+b") as fh:
                    os.truncate(model.raw, 8 * MiB)
                    fh.seek(off)
                    fh.write(data)
            os.truncate(raw, 10 * MiB)  # by path, without an open file
            assert raw.stat().st_size == 10 * MiB
            for size, code in [(2 * MiB, errno.EPERM), (10 * MiB + 1, errno.EINVAL), (1 << 60, errno.EFBIG)]:
                with pytest.raises(OSError) as e:
                    os.ftruncate(fd, size)
                assert e.value.errno == code, (size, e.value)
                assert os.fstat(fd).st_size == 10 * MiB
            os.ftruncate(fd, 9 * MiB)  # nothing there: shrinks
            assert os.fstat(fd).st_size == 9 * MiB
            os.fsync(fd)
        finally:
            os.close(fd)
    model.resize(9 * MiB)
    model.judge(path, 9 * MiB)
    with mount(path, tmp_path / "ro.raw", "-o", "ro") as (raw, _):
        with pytest.raises(OSError) as e:
            os.truncate(raw, 16 * MiB)
        assert e.value.errno == errno.EROFS
        assert raw.stat().st_size == 9 * MiB
    (tmp_path / "dir").mkdir()
    with mount(path, tmp_path / "dir") as (raw, _):  # the file inside a directory mount
        os.truncate(raw, 12 * MiB)
        assert raw.stat().st_size == 12 * MiB and os.listdir(tmp_path / "dir") == [raw.name]
    assert info(path)["virtual-size"] == 12 * MiB
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(path))
    with mount(path, tmp_path / "snap.raw", "-o", "snapshot=s1") as (raw, _):
        with pytest.raises(OSError) as e:
            os.truncate(raw, 16 * MiB)
        assert e.value.errno == errno.EROFS


@pytest.mark.root
def test_loop_device_and_resize2fs_in_the_grown_view(tmp_path, mount):
    path = qemu.create(tmp_path / "guest.qcow2", 64 * MiB, 4096)
    rnd = random.Random(13)
    with mount(path, tmp_path / "raw") as (raw, _):
        with loop_device(raw) as dev:
            sh("mkfs.ext4", "-q", "-F", dev)
            with fs_mounted(dev, tmp_path / "guest") as root:
                for i in range(40):
                    (root / f"a{i}").write_bytes(rnd.randbytes(rnd.choice([100, 70000, 1 << 20])))
            os.truncate(raw, 640 * MiB)
            sh("losetup", "-c", dev)
            assert int(sh("blockdev", "--getsize64", dev)) == 640 * MiB
            sh("e2fsck", "-fy", dev)  # resize2fs wants a checked file system (offline: online
            sh("resize2fs", dev)      # resizing needs privileges a container may lack)
            with fs_mounted(dev, tmp_path / "guest") as root:
                big = rnd.randbytes(1 << 20)
                for i in range(300):  # more than the old disk held
                    (root / f"b{i}").write_bytes(big[i:] + big[:i])
                written = tree_hashes(root)
                sh("sync")
    assert info(path)["virtual-size"] == 640 * MiB
    qemu.assert_clean(path)
    assert_ext4_as_qemu_reads_it(path, tmp_path, written)


# -- qcowfuse resize ------------------------------------------------------------------------

def test_cli_resize_speaks_qemu_img(tmp_path):
    path = qemu.create(tmp_path / "t.qcow2", 1 * MiB, 512)
    qemu.qemu_io(path, "write -P 0x91 0 512k")
    for args, size in [(["1.5M"], 1536 * KiB), (["+1k"], 1537 * KiB), (["--shrink", "-1k"], 1536 * KiB),
                       (["--shrink", "--", "-512k"], 1 * MiB), (["0x800000"], 8 * MiB), (["-q", "+8M"], 16 * MiB),
                       (["--shrink", "1048576."], 1 * MiB), (["+512.0"], 1 * MiB + 512), (["+512.00b"], 1 * MiB + 1024),
                       (["--shrink", "512.k"], 512 * KiB), (["16M"], 16 * MiB)]:
        r = run_cli("resize", *args[:-1], str(path), args[-1])
        assert r.returncode == 0 and r.stdout == ("" if "-q" in args else "Image resized.\n"), r
        assert info(path)["virtual-size"] == size
    qemu.assert_clean(path)
    qemu.qemu_io(path, "read -P 0x91 0 512k", f"read -P 0 512k {16 * MiB - 512 * KiB}", read_only=True)
    before = path.read_bytes()
    for args, fragment in [(["8M"], "Use the --shrink option"), (["-10"], "Use the --shrink option"),
                           (["+513"], "multiple of 512"), (["1.5"], "expects a non-negative number"),
                           (["3MiB"], "expects a non-negative number"), (["16E"], "out of range"),
                           (["--shrink", "0"], "must be positive"), (["3P"], "File too large"),
                           (["--shrink", "256k"], "guest data is allocated at offset 262144")]:
        r = run_cli("resize", *args[:-1], str(path), args[-1])
        assert_one_line_error(r.returncode, r.stderr, fragment)
        assert path.read_bytes() == before
    r = run_cli("resize", str(tmp_path / "missing.qcow2"), "1G")
    assert_one_line_error(r.returncode, r.stderr, "No such file")


@pytest.mark.root
def test_cli_resize_refuses_an_image_in_use(tmp_path, mount):
    path = qemu.create(tmp_path / "t.qcow2", 1 * MiB)
    with mount(path, tmp_path / "raw") as (raw, _):
        r = run_cli("resize", str(path), "2M")
        assert_one_line_error(r.returncode, r.stderr, "lock")
        assert raw.stat().st_size == 1 * MiB
    assert info(path)["virtual-size"] == 1 * MiB


def test_grow_over_a_large_backing_file_is_quick(tmp_path):
    """Zero clusters over 8 GiB of backing file: whole new L2 tables are filled at once."""
    base = qemu.create(tmp_path / "base.qcow2", 8 * GiB)
    qemu.qemu_io(base, "write -P 0x35 0 4M", f"write -P 0x36 {8 * GiB - MiB} 1M")
    path = qemu.create(tmp_path / "t.qcow2", 1 * MiB, extra=f"backing_file={base},backing_fmt=qcow2")
    model = Model(path, tmp_path / "model.raw")
    t = time.monotonic()
    with Image.open(str(path), writable=True) as img:
        img.resize(16 * GiB)
    elapsed = time.monotonic() - t
    model.resize(16 * GiB)
    model.judge(path, 16 * GiB)
    print(f"\ngrow 1 MiB -> 16 GiB over an 8 GiB backing file (131072 zero clusters): {elapsed:.2f} s")


def test_shrink_extended_l2(tmp_path):
    cs = 16384
    path = qemu.create(tmp_path / "t.qcow2", 8 * MiB, cs, extra="extended_l2=on")
    qemu.qemu_io(path, "write -P 0x55 0 1M", "write -P 0x56 5M 4k", f"write -P 0x57 {2 * MiB + 4096} 512")
    with Image.open(str(path), writable=True) as img:
        for new in (4 * MiB, 2 * MiB + 2048):  # an allocated subcluster past the end
            with pytest.raises(ResizeError) as e:
                img.resize(new)
            assert e.value.errno == errno.EPERM
    qemu.qemu_io(path, "write -z 5M 16k", f"write -z {2 * MiB} 16k")  # zero subclusters now
    model = Model(path, tmp_path / "model.raw")
    with Image.open(str(path), writable=True) as img:
        img.resize(2 * MiB + 2048)
        img.resize(6 * MiB)
    model.resize(2 * MiB + 2048)
    model.resize(6 * MiB)
    model.judge(path, 6 * MiB)
