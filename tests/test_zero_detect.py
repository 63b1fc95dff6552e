"""detect-zeroes does not depend on how a zero write is split into requests: a cluster
that a run of zero writes leaves entirely zero becomes a zero cluster (freed with
unmap).  Judged by qemu-img map, compare and check."""

from __future__ import annotations

import json
import os

import pytest

from helpers import qemu
from qcowfuse import Image

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB


def qemu_map(img) -> list[dict]:
    return json.loads(qemu.run("qemu-img", "map", "--output=json", str(img)).stdout)


def extents_in(img, start: int, end: int) -> list[dict]:
    return [e for e in qemu_map(img) if e["start"] < end and e["start"] + e["length"] > start]


def zero_and_not_data(img, start: int, end: int) -> bool:
    found = extents_in(img, start, end)
    return bool(found) and all(e["zero"] and not e["data"] for e in found)


def data(img, start: int, end: int) -> bool:
    return all(e["data"] for e in extents_in(img, start, end))


@pytest.mark.root
def test_split_zero_writes_through_mount(tmp_path, mount):
    size = 64 * MiB
    img = qemu.create(tmp_path / "z.qcow2", size)
    qemu.qemu_io(img, f"write -P 0x5a 0 {60 * MiB}")
    allocated = qemu.check(img)["allocated-clusters"]
    with mount(img, tmp_path / "raw", "-o", "detect-zeroes=unmap") as (raw, _):
        fd = os.open(raw, os.O_WRONLY)
        try:
            # 48 MiB of zeros from an ordinary (not page-aligned) bytes buffer, at an
            # offset that is not cluster aligned either
            assert os.pwrite(fd, bytes(48 * MiB), 4 * MiB + 512) == 48 * MiB
            # one cluster in explicit 4048 + 48 + rest pieces, tail first
            c = 54 * MiB
            os.pwrite(fd, bytes(CS - 4096), c + 4096)
            os.pwrite(fd, bytes(4048), c)
            os.pwrite(fd, bytes(48), c + 4048)
            # a cluster only partly zeroed keeps its data
            os.pwrite(fd, bytes(4048), 56 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    qemu.assert_clean(img)
    model = bytearray(size)
    model[:60 * MiB] = b"\x5a" * (60 * MiB)
    model[4 * MiB + 512:52 * MiB + 512] = bytes(48 * MiB)
    model[54 * MiB:54 * MiB + CS] = bytes(CS)
    model[56 * MiB:56 * MiB + 4048] = bytes(4048)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.compare_raw(img, tmp_path / "model.raw")
    # every cluster the 48 MiB leaves all zero (all but the partial first and last)
    assert zero_and_not_data(img, 4 * MiB + CS, 52 * MiB)
    assert data(img, 4 * MiB, 4 * MiB + CS) and data(img, 52 * MiB, 52 * MiB + CS)
    assert zero_and_not_data(img, 54 * MiB, 54 * MiB + CS)
    assert data(img, 56 * MiB, 56 * MiB + CS)
    freed = (48 * MiB - CS) // CS + 1  # the 48 MiB's whole clusters and the one at 54 MiB
    assert qemu.check(img)["allocated-clusters"] == allocated - freed


@pytest.mark.parametrize("compat, mode, backing, expect_zero", [
    ("1.1", "unmap", False, True),
    ("1.1", "on", False, True),       # zero flag over the kept host cluster
    ("1.1", "unmap", True, True),     # zero flag hides the backing file's data
    ("0.10", "unmap", False, True),   # v2: unallocated reads as zeros
    ("0.10", "unmap", True, False),   # v2 over a backing file can't say "zeros"
    ("0.10", "on", False, False),     # v2 has no zero flag to keep a cluster with
])
def test_split_zero_writes_engine(tmp_path, compat, mode, backing, expect_zero):
    size = 4 * MiB
    base = None
    if backing:
        base = qemu.create(tmp_path / "base.qcow2", size, compat=compat)
        qemu.qemu_io(base, f"write -P 0x33 0 {size}")
    img = tmp_path / "top.qcow2"
    extra = f"backing_file={base},backing_fmt=qcow2" if base else ""
    qemu.create(img, size, compat=compat, extra=extra)
    model = bytearray(b"\x33" * size if base else bytes(size))
    with Image.open(str(img), writable=True, detect_zeroes=mode) as im:
        if not backing:
            im.write(0, b"\x07" * (2 * MiB))
            model[:2 * MiB] = b"\x07" * (2 * MiB)
        # clusters 1..8 zeroed in 4048-byte pieces; cluster 9 only in part
        start, end = CS, 9 * CS
        for off in range(start, end, 4048):
            n = min(4048, end - off)
            im.write(off, bytes(n))
        im.write(9 * CS, bytes(4048))
        model[start:end] = bytes(end - start)
        model[9 * CS:9 * CS + 4048] = bytes(4048)
        # a split zero write over clusters the mapping knows are zero allocates nothing
        for off in range(3 * MiB, 3 * MiB + 2 * CS, 4048):
            im.write(off, bytes(min(4048, 3 * MiB + 2 * CS - off)))
        model[3 * MiB:3 * MiB + 2 * CS] = bytes(2 * CS)
    qemu.assert_clean(img)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.compare_raw(img, tmp_path / "model.raw")
    if expect_zero:
        assert zero_and_not_data(img, start, end)
        if not backing:
            assert zero_and_not_data(img, 3 * MiB, 3 * MiB + 2 * CS)
    else:
        assert data(img, start, end)
    assert data(img, 9 * CS, 10 * CS)
