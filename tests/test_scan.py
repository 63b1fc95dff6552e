"""The vectorized walk (qcow2/scan.py, references.py) against QEMU: `check`, `map` and
`info` on small images with many tables, every refcount width, compressed clusters,
snapshots, backing files and extended L2 entries."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import qemu
from helpers.checking import assert_same_counts
from helpers.procs import run_cli
from qcowfuse.qcow2.format import RefblockCodec, decode_refblock, encode_refblock

MiB = 1 << 20


@settings(max_examples=60, deadline=None)
@given(order=st.integers(0, 6), cluster_bits=st.sampled_from([9, 12]), seed=st.integers(0, 2**32))
def test_refblock_codec_agrees_with_the_engine(order, cluster_bits, seed):
    """numpy codec == the engine's per-cluster codec, both ways, every width."""
    cs = 1 << cluster_bits
    data = random.Random(seed).randbytes(cs)
    engine = RefblockCodec(cs, order)
    values = decode_refblock(data, order)
    assert values.tolist() == engine.decode(data).tolist()
    assert encode_refblock(values, order) == data
    assert encode_refblock(np.asarray(engine.decode(data), dtype=np.uint64), order) == data


def map_json(img: Path) -> tuple[list, list]:
    ours = run_cli("map", "--output=json", str(img))
    assert ours.returncode == 0, ours.stderr
    theirs = qemu.run("qemu-img", "map", "--output=json", str(img)).stdout
    return json.loads(ours.stdout), json.loads(theirs)


def info_allocated(img: Path) -> int:
    r = run_cli("info", "--allocated", "--output=json", str(img))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["allocated-bytes"]


def agree_with_qemu(img: Path, cluster_size: int) -> dict:
    ours = assert_same_counts(img)
    assert ours.get("corruptions", 0) == 0 and ours.get("leaks", 0) == 0
    a, b = map_json(img)
    assert a == b
    assert info_allocated(img) == ours["allocated-clusters"] * cluster_size
    return ours


# writes that cross many L2 tables at small cluster sizes, with zero clusters of both kinds
SCATTER = ["write -P 1 0 20k", "write -P 2 300k 7k", "write -z 310k 3k", "write -P 3 1M 96k",
           "write -z -u 1040k 16k", "write -P 4 2M 1536", "write -P 5 3000k 40k", "write -z 3010k 4k"]


@pytest.mark.parametrize("cs,rb,ext,snap", [
    (512, 16, False, True),    # 64 entries per L2 table: dozens of tables
    (512, 1, False, False),    # 1-bit refcounts (no sharing possible)
    (4096, 64, False, True),   # 64-bit refcounts, a snapshot: refcounts of 2
    (16384, 16, True, True),   # extended L2: 512-byte subclusters
    (65536, 2, True, False),   # extended L2, 2-bit refcounts
])
def test_check_map_info_agree_with_qemu(tmp_path, cs, rb, ext, snap):
    img = qemu.create(tmp_path / "t.qcow2", 4 * MiB, cs, rb, extra="extended_l2=on" if ext else "")
    qemu.qemu_io(img, *SCATTER)
    if snap:
        qemu.run("qemu-img", "snapshot", "-c", "s1", str(img))
        qemu.qemu_io(img, "write -P 6 4k 9k", "write -z 1M 2k", "write -P 7 3800k 100k")
    agree_with_qemu(img, cs)


@pytest.mark.parametrize("cs,ext", [(512, False), (16384, True)])
def test_fully_allocated_tables_agree_with_qemu(tmp_path, cs, ext):
    """Every entry of every L2 table in use (the walk takes whole batches without a gather
    then), written in shuffled order so host offsets jump (fragmentation), with zero
    clusters with and without a host cluster among them."""
    per_table = cs // (16 if ext else 8)
    size = 2 * per_table * cs
    img = qemu.create(tmp_path / "f.qcow2", size, cs, 16, extra="extended_l2=on" if ext else "")
    order = list(range(size // cs))
    random.Random(5).shuffle(order)
    unallocated_zero = set(order[:3])
    qemu.qemu_io(img, *[f"write -z -u {i * cs} {cs}" if i in unallocated_zero
                        else f"write -P {i % 250 + 1} {i * cs} {cs}" for i in order],
                 f"write -z {order[5] * cs} {cs}")
    ours = agree_with_qemu(img, cs)
    assert ours["fragmented-clusters"] > 0


@pytest.mark.parametrize("ext,ctype", [(False, "zlib"), (True, "zlib"), (False, "zstd")])
def test_compressed_images_agree_with_qemu(tmp_path, ext, ctype):
    raw = tmp_path / "src.raw"
    rnd = random.Random(3)
    raw.write_bytes(b"".join(bytes([rnd.randrange(4)]) * 8192 + rnd.randbytes(512)
                             for _ in range(300)))
    img = tmp_path / "c.qcow2"
    opts = f"cluster_size=16384,compression_type={ctype}" + (",extended_l2=on" if ext else "")
    qemu.run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, str(raw), str(img))
    qemu.qemu_io(img, "write -P 9 100k 20k", "write -z 200k 32k")
    ours = agree_with_qemu(img, 16384)
    assert ours["compressed-clusters"] > 50


def test_map_over_backing_file_with_extended_l2(tmp_path):
    """Unallocated subclusters of an allocated cluster read from the backing file."""
    base = qemu.create(tmp_path / "base.qcow2", 4 * MiB, 4096)
    qemu.qemu_io(base, "write -P 1 0 1M", "write -P 2 2M 64k")
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k",
             "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu.qemu_io(top, "write -P 3 4k 2k", "write -z 40k 1k", "write -P 4 2050k 3k",
                 "write -z -u 3M 64k")
    a, b = map_json(top)
    assert a == b
    assert_same_counts(top)


def test_progress_only_on_a_terminal_after_a_second(monkeypatch):
    """The bar appears after a second of work, on a terminal, for human output only."""
    import io

    from qcowfuse import cli, progress
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress.TerminalProgress(out, "checking")
    bar(0.1)
    assert out.getvalue() == ""  # under a second: nothing
    clock[0] += 1.5
    bar(0.5)
    assert "checking:  50.0%" in out.getvalue()
    bar.done()
    assert out.getvalue().endswith("\r")
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    for output, label, shown in (("json", "mapping", False), ("human", "mapping", True)):
        with cli._progress(output, label) as bar:
            assert (bar is not None) == shown
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    with cli._progress("human", "mapping") as bar:
        assert bar is None
