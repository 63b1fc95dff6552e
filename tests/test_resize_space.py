"""A shrink gives the host space back as QEMU's does (issue 13): the freed clusters are
punched out and the file is cut after the last cluster in use.  Judged against
`qemu-img resize --shrink` of an identical copy (st_size and st_blocks no larger),
with qemu-img check (clean, no leaks) and qemu-img compare against a model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import qemu
from conftest import run_cli
from test_resize import Model

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
    ref = tmp_path / "qemu.qcow2"
    subprocess.run(["cp", "--sparse=always", str(path), str(ref)], check=True)
    qemu.run("qemu-img", "resize", "-q", "--shrink", str(ref), str(NEW))
    return path, ref


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


def test_shrink_never_cuts_off_mapped_data_whose_refcount_is_zero(tmp_path):
    """An image already damaged so that the last data cluster of the file has refcount 0
    while an L2 entry maps it (qemu-img check: corrupt): the cut after a shrink
    must stop after the last cluster anything maps, not only the last one counted, or
    the guest data there is gone for good (`qemu-img check -r all` could still rebuild
    its refcount).  Judged by qemu-io read -P and qemu-img check before and after."""
    from rawqcow2 import RefcountView

    path = qemu.create(tmp_path / "z.qcow2", OLD, CS)
    qemu.qemu_io(path, "write -P 0x51 0 64k", "write -P 0x52 1M 64k", "write -P 0x53 12M 4k",
                 "write -z 12M 4k")
    extents = json.loads(qemu.run("qemu-img", "map", "--output=json", str(path)).stdout)
    host = max(e["offset"] + e["length"] for e in extents if e.get("data") and "offset" in e) - CS
    RefcountView(path).set_refcount(host // CS, 0)  # the mapped cluster at the end of the file
    before = qemu.check(path)
    assert before["corruptions"] >= 1, before["text"]  # refcount 0 (and COPIED on it)
    r = run_cli("resize", "--shrink", str(path), f"-{OLD - NEW}")
    assert r.returncode == 0, r.stderr
    qemu.qemu_io(path, "read -P 0x51 0 64k", "read -P 0x52 1M 64k", read_only=True)
    after = qemu.check(path)
    assert after["corruptions"] <= before["corruptions"], after["text"]
