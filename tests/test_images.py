"""Real-world images: compressed, zero clusters, snapshots, compat 0.10, lazy refcounts.

For each: the raw view equals `qemu-img convert -O raw`; random writes against a
model; then `qemu-img compare` with the model and `qemu-img check` clean.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from helpers import qemu
from helpers.cli import assert_refused
from qcowfuse import Image
from helpers.workload import random_writes

MiB = 1 << 20


def roundtrip(tmp_path: Path, img: Path, mount, seed: int = 1) -> None:
    expect = qemu.convert_to_raw(img, tmp_path / "expect.raw").read_bytes()
    model = bytearray(expect)
    with mount(img, tmp_path / "raw") as (raw, _):
        assert raw.read_bytes() == expect
        random_writes(raw, model, seed)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(img)
    qemu.compare_raw(img, tmp_path / "model.raw")


def source_raw(tmp_path: Path, size: int = 24 * MiB) -> Path:
    src = tmp_path / "src.raw"
    rnd = random.Random(9)
    data = bytearray(size)
    for i in range(0, size, 256 * 1024):  # compressible and incompressible stretches
        data[i:i + 65536] = bytes([i // 65536 % 200 + 1]) * 65536
        data[i + 131072:i + 135000] = rnd.randbytes(3928)
    src.write_bytes(data)
    return src


@pytest.mark.root
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_compressed_images(tmp_path, mount, ctype, cs):
    img = tmp_path / "c.qcow2"
    qemu.run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cs}", str(source_raw(tmp_path)), str(img))
    info = qemu.check(img)
    assert info.get("compressed-clusters", 0) > 10
    roundtrip(tmp_path, img, mount)
    # rewrite everything: every compressed host cluster must be released exactly once
    with Image.open(str(img), writable=True) as im:
        data = bytes(range(256)) * (im.size // 256)
        im.write(0, data)
    info = qemu.assert_clean(img)
    assert info.get("compressed-clusters", 0) == 0


@pytest.mark.root
def test_zero_clusters_plain_and_preallocated(tmp_path, mount):
    img = qemu.create(tmp_path / "z.qcow2", 16 * MiB, cluster_size=4096)
    qemu.qemu_io(img, "write -P 0x61 0 8M", "write -z 1M 1M",  # zero flag, host clusters kept
                 "write -z -u 3M 1M",  # zero flag, unmapped
                 "write -z 10M 1M")  # zero flag on never-allocated clusters
    roundtrip(tmp_path, img, mount, seed=2)


@pytest.mark.root
def test_compat_010_image(tmp_path, mount):
    img = qemu.create(tmp_path / "v2.qcow2", 32 * MiB, compat="0.10")
    qemu.qemu_io(img, "write -P 0x71 0 3M", "write -P 0x72 20M 100k")
    roundtrip(tmp_path, img, mount, seed=3)


@pytest.mark.root
def test_lazy_refcounts_clean_image(tmp_path, mount):
    img = qemu.create(tmp_path / "lazy.qcow2", 16 * MiB, extra="lazy_refcounts=on")
    qemu.qemu_io(img, "write -P 0x73 0 2M")
    roundtrip(tmp_path, img, mount, seed=4)


@pytest.mark.root
def test_dirty_lazy_refcount_image_is_repaired_before_writing(tmp_path, mount):
    """qemu-io killed with lazy refcounts on: dirty bit set, refcounts too low."""
    img = qemu.create(tmp_path / "dirty.qcow2", 16 * MiB, cluster_size=4096, extra="lazy_refcounts=on")
    qemu.run("qemu-io", "-c", "write -P 0x44 0 1M", "-c", "write -P 0x45 5M 64k", "-c", "abort",
             str(img), check=False)
    assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 1, "expected the dirty bit"
    assert qemu.check(img)["rc"] == 2
    with mount(img, tmp_path / "ro", "-o", "ro") as (raw, _):  # reading needs no repair
        assert raw.read_bytes()[:4] == b"\x44" * 4
    roundtrip(tmp_path, img, mount, seed=6)  # rebuilds refcounts at the first write
    assert not struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 1


def snapshot_raw(img: Path, name: str, out: Path) -> bytes:
    qemu.run("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
    return out.read_bytes()


@pytest.mark.root
@pytest.mark.parametrize("cs", [512, 65536])
def test_snapshots_are_never_changed(tmp_path, mount, cs):
    img = qemu.create(tmp_path / "s.qcow2", 8 * MiB, cluster_size=cs)
    qemu.qemu_io(img, "write -P 0x81 0 3M", "write -P 0x82 5M 1M")
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(img))
    qemu.qemu_io(img, "write -P 0x83 1M 1M")
    qemu.run("qemu-img", "snapshot", "-c", "s2", str(img))
    before = {s: snapshot_raw(img, s, tmp_path / f"{s}.raw") for s in ("s1", "s2")}
    roundtrip(tmp_path, img, mount, seed=5)
    for s, data in before.items():
        assert snapshot_raw(img, s, tmp_path / f"{s}.after.raw") == data
    # each snapshot mounts read-only with its own content
    with mount(img, tmp_path / "snap", "-o", "snapshot=s1") as (raw, _):
        assert raw.read_bytes() == before["s1"]
        with pytest.raises(OSError):
            os.open(raw, os.O_RDWR)
    assert_refused(["-o", "snapshot=nope", str(img), str(tmp_path / "snap")], "no snapshot named 'nope'", img)


@pytest.mark.root
@pytest.mark.parametrize("with_backing", [False, True])
def test_extended_l2_subclusters(tmp_path, mount, with_backing):
    """Subclusters (cluster/32): allocated, zero and unallocated ones in one cluster,
    read against qemu-img convert, then written (partial subclusters, compressed and
    snapshot-shared clusters) against a model."""
    if with_backing:
        base = tmp_path / "base.raw"
        base.write_bytes(random.Random(4).randbytes(8 * MiB))
        img = tmp_path / "x.qcow2"
        qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536",
                 "-b", "base.raw", "-F", "raw", str(img), str(8 * MiB))
    else:
        img = qemu.create(tmp_path / "x.qcow2", 8 * MiB, extra="extended_l2=on")
    qemu.qemu_io(img, "write -P 0x91 2k 2k", "write -P 0x92 8k 6k", "write -z 20k 4k",
                 "write -P 0x93 1M 200k", "write -z 3M 64k", "write -c -P 0x94 4M 64k")
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(img))
    snap = snapshot_raw(img, "s1", tmp_path / "s1.raw")
    expect = qemu.convert_to_raw(img, tmp_path / "expect.raw").read_bytes()
    with mount(img, tmp_path / "ro", "-o", "ro") as (raw, _):
        assert raw.read_bytes() == expect
    model = bytearray(expect)
    with mount(img, tmp_path / "raw") as (raw, _):
        random_writes(raw, model, seed=8, count=150, sizes=(1, 100, 2048, 3000, 4096, 65536, 70001))
        assert raw.read_bytes() == bytes(model)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(img)
    qemu.compare_raw(img, tmp_path / "model.raw")
    assert snapshot_raw(img, "s1", tmp_path / "s1.after.raw") == snap


def test_write_into_preallocated_zero_cluster_reuses_it(tmp_path):
    img = qemu.create(tmp_path / "za.qcow2", 4 * MiB)
    qemu.qemu_io(img, "write -P 0x33 0 1M", "write -z 0 1M")  # zero flag, clusters kept
    size_before = img.stat().st_size
    with Image.open(str(img), writable=True) as im:
        im.write(100, b"\x44" * 1000)
        im.write(65536 * 3, b"\x45" * 65536)
    assert img.stat().st_size == size_before  # no new clusters
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0 0 100", "read -P 0x44 100 1000", "read -P 0 1100 195508",
                 "read -P 0x45 192k 64k", "read -P 0 256k 768k", read_only=True)


def test_zero_cluster_shared_with_snapshot_is_not_reused(tmp_path):
    """A zero-flagged cluster that kept its host cluster is reused in place only when
    this layer owns it alone; shared with a snapshot (refcount 2) it is copied."""
    img = qemu.create(tmp_path / "zs.qcow2", 4 * MiB)
    qemu.qemu_io(img, "write -P 0x33 0 256k", "write -z 0 256k")  # zero flag, clusters kept
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(img))
    before = snapshot_raw(img, "s1", tmp_path / "s1.raw")
    with Image.open(str(img), writable=True) as im:
        im.write(100, b"\x44" * 1000)
        im.write(65536 * 2, b"\x45" * 65536)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0 0 100", "read -P 0x44 100 1000", "read -P 0 1100 129972",
                 "read -P 0x45 128k 64k", "read -P 0 192k 64k", read_only=True)
    assert snapshot_raw(img, "s1", tmp_path / "s1.after.raw") == before
