"""A shrink gives the host space back as QEMU's does (issue 13): the freed clusters are
punched out and the file is cut after the last cluster in use.  Judged against
`qemu-img resize --shrink` of an identical copy (st_size and st_blocks no larger),
with qemu-img check (clean, no leaks) and qemu-img compare against a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import qemu
from helpers.procs import run_cli
from helpers.resize import Model

KiB, MiB = 1 << 10, 1 << 20
CS = 4096  # one L2 table maps 2 MiB: the shrink frees tables as well as data clusters
OLD, NEW = 16 * MiB, 4 * MiB + 512


def _image_and_qemu_copy(tmp_path: Path) -> tuple[Path, Path]:
    """Data past NEW that was then zeroed keeping its clusters (what a shrink accepts),
    placed so that the freed clusters lie both inside the file (to punch) and at its
    end (to cut off); and a copy of it, shrunk by qemu-img."""
    path = qemu.create(tmp_path / "t.qcow2", OLD, CS)
    qemu.qemu_io(path, "write -P 0x41 12M 2M", "write -P 0x42 0 1M", "write -P 0x43 14M 1M",
                 "write -z 12M 4M")
    return path, _qemu_shrunk_copy(tmp_path, path)


def _qemu_shrunk_copy(tmp_path: Path, path: Path) -> Path:
    """A sparse copy of the image, shrunk to NEW by qemu-img: what to compare space with."""
    ref = tmp_path / "qemu.qcow2"
    subprocess.run(["cp", "--sparse=always", str(path), str(ref)], check=True)
    qemu.run("qemu-img", "resize", "-q", "--shrink", str(ref), str(NEW))
    return ref


def _assert_space_no_worse_than_qemu(path: Path, ref: Path) -> None:
    ours, theirs = os.stat(path), os.stat(ref)
    assert ours.st_size <= theirs.st_size, (ours.st_size, theirs.st_size)
    assert ours.st_blocks <= theirs.st_blocks, (ours.st_blocks, theirs.st_blocks)


def test_offline_shrink_gives_space_back(tmp_path):
    path, ref = _image_and_qemu_copy(tmp_path)
    model = Model(path, tmp_path / "model.raw")
    before = os.stat(path)
    r = run_cli("resize", "--shrink", str(path), f"-{OLD - NEW}")
    assert r.returncode == 0, r.stderr
    model.resize(NEW)
    model.judge(path, NEW)  # clean (nothing leaked), same guest as the model
    _assert_space_no_worse_than_qemu(path, ref)
    after = os.stat(path)
    assert before.st_blocks - after.st_blocks >= 3 * MiB // 512  # 2 MiB punched, 1 MiB cut off
    assert after.st_size == qemu.check(path)["image-end-offset"]


@pytest.mark.root
def test_truncate_through_mount_gives_space_back_and_grows_again(tmp_path, mount):
    """Data written through the mount past the new end and zeroed again (detect-zeroes=on
    keeps the clusters), so that the file grew ahead as a hole; truncate(2) shrinks, then
    writes fill the punched space and extend the cut file again."""
    path, ref = _image_and_qemu_copy(tmp_path)
    model = Model(path, tmp_path / "model.raw")
    with mount(path, tmp_path / "raw", "-o", "detect-zeroes=on") as (raw, _):
        fd = os.open(raw, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x51" * (64 * KiB + 100), 15 * MiB)  # new clusters at the file's end
            os.fsync(fd)
            os.pwrite(fd, bytes(68 * KiB), 15 * MiB)  # zero clusters, still allocated
            os.ftruncate(fd, NEW)
            assert os.fstat(fd).st_size == NEW
            _assert_space_no_worse_than_qemu(path, ref)
            writes = [(1 * MiB, b"\x52" * (3 * MiB)),  # the punched clusters, then past the cut
                      (NEW - 300, b"\x53" * 300)]  # a partial cluster at the new end
            for off, data in writes:
                assert os.pwrite(fd, data, off) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    model.resize(NEW)
    with open(model.raw, "r+b") as fh:
        for off, data in writes:
            fh.seek(off)
            fh.write(data)
    model.judge(path, NEW)
    # the file ends where its last cluster does: growth after the cut kept count of it
    assert os.stat(path).st_size == qemu.check(path)["image-end-offset"]


@pytest.mark.parametrize("kind", ["data", "compressed"])
def test_shrink_never_cuts_off_mapped_data_whose_refcount_is_zero(tmp_path, kind):
    """An image already damaged so that the last data cluster of the file has refcount 0
    while an L2 entry maps it (qemu-img check: corrupt): the cut after a shrink must stop
    after the last cluster anything maps, not only the last one counted, or the guest
    data there is gone for good (`qemu-img check -r all` could still rebuild its
    refcount).  Judged by qemu-io read -P and qemu-img check before and after.  The shrink
    runs in a fresh process, which must not have loaded numpy (the daemon's RSS)."""
    from helpers.rawqcow2 import RefcountView

    path = qemu.create(tmp_path / "z.qcow2", OLD, CS)
    qemu.qemu_io(path, "write -P 0x51 0 64k", "write -P 0x53 12M 4k", "write -z 12M 4k",
                 "write -c -P 0x52 1M 64k" if kind == "compressed" else "write -P 0x52 1M 64k")
    last = (path.stat().st_size - 1) // CS  # the 1M write went last: the end of the file
    RefcountView(path).set_refcount(last, 0)
    before = qemu.check(path)
    assert before["corruptions"] >= 1 and f"cluster {last} refcount=0" in before["text"], before["text"]
    code = ("import sys; from qcowfuse import Image\n"
            f"with Image.open({str(path)!r}, writable=True) as img: img.resize({NEW})\n"
            "assert 'numpy' not in sys.modules, 'a shrink loaded numpy'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    qemu.qemu_io(path, "read -P 0x51 0 64k", "read -P 0x52 1M 64k", read_only=True)
    after = qemu.check(path)
    assert after["corruptions"] <= before["corruptions"], after["text"]


def test_shrink_of_a_compressed_image_still_gives_the_tail_back(tmp_path):
    """Compressed data below the new end, preallocated zeros past it at the end of the
    file: the cut (bounded by every cluster an L2 table maps, compressed spans read from
    their descriptors) leaves a file no larger than `qemu-img resize --shrink` does.
    64 KiB clusters and data that compresses to ~half: a descriptor's sector count then
    reaches below bit 56, where a misread descriptor would look like a far offset."""
    import random

    rnd = random.Random(7)
    raw = tmp_path / "m.raw"
    model = bytearray(OLD)
    model[0:65536] = b"\x51" * 65536
    model[MiB:MiB + 4 * 65536] = bytes(rnd.choice(b"0123456789abcdef") for _ in range(4 * 65536))
    raw.write_bytes(model)
    path = tmp_path / "c.qcow2"
    qemu.run("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    qemu.qemu_io(path, "write -P 0x53 12M 64k", "write -z 12M 64k")
    subprocess.run(["fallocate", "--dig-holes", str(path)], check=True)  # as sparse as the copy
    ref = _qemu_shrunk_copy(tmp_path, path)
    r = run_cli("resize", "--shrink", str(path), f"-{OLD - NEW}")
    assert r.returncode == 0, r.stderr
    qemu.assert_clean(path)
    raw.write_bytes(model[:NEW])
    qemu.compare_raw(path, raw)
    _assert_space_no_worse_than_qemu(path, ref)
