"""detect-zeroes shrinks images; `qcowfuse map` agrees with `qemu-img map`."""

from __future__ import annotations

import json
import mmap
import os
import random

import pytest

from helpers import qemu
from helpers.procs import run_cli
from qcowfuse import Image

MiB = 1 << 20


def pwrite_aligned(path, data: bytes, offset: int) -> None:
    """Write from a page-aligned buffer, as dd, fio and the loop driver do: the kernel
    splits FUSE write requests at the user buffer's page boundaries otherwise."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def disk_usage(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.root
@pytest.mark.parametrize("mode", ["on", "unmap"])
def test_detect_zeroes_through_mount(tmp_path, mount, mode):
    img = qemu.create(tmp_path / "z.qcow2", 64 * MiB)
    data = random.Random(1).randbytes(16 * MiB)
    with mount(img, tmp_path / "raw") as (raw, _):
        with open(raw, "r+b") as fh:
            fh.write(data)
    full = disk_usage(img)
    allocated_before = qemu.check(img)["allocated-clusters"]
    with mount(img, tmp_path / "raw", "-o", f"detect-zeroes={mode}") as (raw, _):
        pwrite_aligned(raw, bytes(8 * MiB), 4 * MiB)  # zerofree-style: zeros over "deleted" space
        pwrite_aligned(raw, bytes(4 * MiB), 20 * MiB)  # zeros over never-written space: nothing
    qemu.assert_clean(img)
    model = bytearray(64 * MiB)
    model[:16 * MiB] = data
    model[4 * MiB:12 * MiB] = bytes(8 * MiB)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.compare_raw(img, tmp_path / "model.raw")
    zero_extents = [e for e in json.loads(qemu.run("qemu-img", "map", "--output=json", str(img)).stdout)
                    if e["start"] >= 4 * MiB and e["start"] < 12 * MiB]
    assert zero_extents and all(e["zero"] and not e["data"] for e in zero_extents)
    after = disk_usage(img)
    allocated_after = qemu.check(img)["allocated-clusters"]
    print(f"\ndetect-zeroes={mode}: disk usage {full} -> {after} bytes, "
          f"allocated clusters {allocated_before} -> {allocated_after}")
    if mode == "unmap":
        assert full - after >= 7 * MiB  # the space went back to the host filesystem
        assert allocated_after == allocated_before - 8 * MiB // 65536
    else:
        assert after >= full - MiB  # 'on' keeps the host clusters


def test_detect_zeroes_partial_and_v2(tmp_path):
    img = qemu.create(tmp_path / "v2.qcow2", 8 * MiB, compat="0.10")
    with Image.open(str(img), writable=True, detect_zeroes="unmap") as im:
        im.write(0, b"\x01" * (2 * MiB))
        im.write(100, bytes(65536 * 3))  # partial first and last cluster: data; middle: unmapped
        assert im.read(0, 200) == b"\x01" * 100 + bytes(100)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 1 0 100", "read -P 0 100 196608", "read -P 1 196708 1900444",
                 read_only=True)


def test_map_matches_qemu_img_map(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", 16 * MiB, cluster_size=4096)
    qemu.qemu_io(base, "write -P 1 0 64k", "write -P 2 1M 8k", "write -P 3 5M 2M")
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu.qemu_io(top, "write -P 4 32k 64k", "write -z 2M 64k", "write -z -u 3M 64k", "write -P 5 6M 64k")
    for img in (base, top):
        ours = run_cli("map", "--output=json", str(img))
        assert ours.returncode == 0, ours.stderr
        theirs = qemu.run("qemu-img", "map", "--output=json", str(img)).stdout
        assert json.loads(ours.stdout) == json.loads(theirs)
    human = run_cli("map", str(top))
    assert human.returncode == 0 and "Mapped to" in human.stdout


def qemu_map(img) -> list[dict]:
    return json.loads(qemu.run("qemu-img", "map", "--output=json", str(img)).stdout)


def extents_in(extents: list[dict], lo: int, hi: int) -> list[dict]:
    return [e for e in extents if e["start"] < hi and e["start"] + e["length"] > lo]


@pytest.mark.parametrize("compat,mode", [("0.10", "unmap"), ("1.1", "on"), ("1.1", "unmap")],
                         ids=["v2-unmap", "v3-on", "v3-unmap"])
def test_detect_zeroes_allocation(tmp_path, compat, mode):
    """Whole zero clusters written with detect-zeroes, judged by qemu-img map: v2 can
    only say "zeros" by leaving the cluster unallocated; v3 sets the zero flag, keeping
    the host cluster with 'on' (map shows its offset) and freeing it with 'unmap'."""
    cs = 65536
    img = qemu.create(tmp_path / "z.qcow2", 4 * MiB, compat=compat)
    with Image.open(str(img), writable=True) as im:
        im.write(0, b"\x01" * (4 * cs))
    allocated = qemu.check(img)["allocated-clusters"]
    with Image.open(str(img), writable=True, detect_zeroes=mode) as im:
        im.write(cs, bytes(2 * cs))  # over data
        im.write(MiB, bytes(cs))  # over nothing
    qemu.assert_clean(img)
    qemu.qemu_io(img, f"read -P 1 0 {cs}", f"read -P 0 {cs} {2 * cs}", f"read -P 1 {3 * cs} {cs}",
                 read_only=True)
    extents = qemu_map(img)
    zeroed = extents_in(extents, cs, 3 * cs)
    assert zeroed and all(e["zero"] and not e["data"] for e in zeroed), zeroed
    assert not any(e["data"] for e in extents_in(extents, MiB, MiB + cs))
    after = qemu.check(img)["allocated-clusters"]
    if compat == "0.10":
        assert all(not e["present"] for e in zeroed), zeroed  # unallocated
    if mode == "on":
        assert all("offset" in e for e in zeroed), zeroed  # host clusters kept
        assert after == allocated
    else:
        assert all("offset" not in e for e in zeroed), zeroed
        assert after == allocated - 2


def test_extended_l2_write_allocates_only_written_subclusters(tmp_path):
    """With extended L2 entries (64 KiB clusters: 2 KiB subclusters), qemu-img map must
    show as data exactly the subclusters written, not whole clusters; a write over a
    zero subcluster clears its zero bit."""
    sc = 2048
    img = qemu.create(tmp_path / "x.qcow2", 8 * MiB, extra="extended_l2=on")
    qemu.qemu_io(img, "write -P 0x11 192k 64k", f"write -z {192 * 1024 + 4 * sc} {sc}")
    with Image.open(str(img), writable=True) as im:
        im.write(65536 + 2 * sc, b"\x21" * sc)  # one whole subcluster of a new cluster
        im.write(65536 + 5 * sc + 100, b"\x22" * 300)  # part of another, same cluster
        im.write(131072 + 2 * sc + 904, b"\x23" * 100)  # part of one in a second new cluster
        im.write(196608 + 4 * sc + 10, b"\x24" * 20)  # inside the zero subcluster
    qemu.assert_clean(img)
    data = [(e["start"], e["length"]) for e in qemu_map(img) if e["data"]]
    assert data == [(65536 + 2 * sc, sc), (65536 + 5 * sc, sc), (131072 + 2 * sc, sc),
                    (196608, 65536)], data
    base = 196608 + 4 * sc
    qemu.qemu_io(img, f"read -P 0x21 {65536 + 2 * sc} {sc}", f"read -P 0 {65536 + 5 * sc} 100",
                 f"read -P 0x22 {65536 + 5 * sc + 100} 300", f"read -P 0 {131072 + 2 * sc} 904",
                 f"read -P 0x23 {131072 + 2 * sc + 904} 100", f"read -P 0 {base} 10",
                 f"read -P 0x24 {base + 10} 20", f"read -P 0 {base + 30} {sc - 30}",
                 f"read -P 0x11 {196608} {4 * sc}", read_only=True)
