"""Backing chains (qcow2 over qcow2 over raw), judged against qemu-img convert."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from helpers import qemu
from helpers.cli import assert_refused
from qcowfuse import Image
from helpers.workload import random_writes

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_chain(tmp_path: Path) -> tuple[Path, list[Path]]:
    """raw base (32 MiB) <- mid.qcow2 (4 KiB clusters) <- top.qcow2 (64 KiB clusters, 48 MiB)."""
    d = tmp_path / "chain"
    d.mkdir()
    base = d / "base.raw"
    base.write_bytes(random.Random(1).randbytes(32 * MiB))
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
             "-b", "base.raw", "-F", "raw", str(d / "mid.qcow2"), str(40 * MiB))
    qemu.qemu_io(d / "mid.qcow2", "write -P 0x21 1M 3M", "write -z 8M 1M", "write -P 0x22 33M 2M")
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             str(d / "top.qcow2"), str(48 * MiB))
    qemu.qemu_io(d / "top.qcow2", "write -P 0x31 2M 128k", "write -P 0x32 30M 5M")
    return d / "top.qcow2", [base, d / "mid.qcow2"]


@pytest.mark.root
def test_chain_reads_like_qemu_and_writes_leave_backing_alone(tmp_path, mount):
    top, lower = make_chain(tmp_path)
    hashes = [sha(p) for p in lower]
    expect = qemu.convert_to_raw(top, tmp_path / "expect.raw").read_bytes()
    model = bytearray(expect)
    os.chdir("/")  # relative backing names must resolve against the image's directory
    with mount(top, tmp_path / "raw") as (raw, _):
        assert raw.read_bytes() == expect
        random_writes(raw, model, seed=5, count=150, sizes=(1, 700, 4096, 65536 + 3, 200000))
    assert [sha(p) for p in lower] == hashes
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(top)
    qemu.compare_raw(top, tmp_path / "model.raw")


def test_backing_smaller_than_overlay_reads_zeros_beyond(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", 1 * MiB)
    qemu.qemu_io(base, "write -P 0x55 0 1M")
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "4M")
    with Image.open(str(top), writable=True) as img:
        assert img.read(MiB - 2, 4) == b"\x55\x55\0\0"
        img.write(MiB - 100, b"\x66" * 200)  # partial cluster straddling the end of the base
    qemu.assert_clean(top)
    qemu.qemu_io(top, "read -P 0x55 0 1048476", "read -P 0x66 1048476 200", "read -P 0 1048676 3047900",
                 read_only=True)


def test_backing_format_probed_when_header_has_none(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", 2 * MiB)
    qemu.qemu_io(base, "write -P 0x44 0 2M")
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    # drop the backing-format extension: rewrite its type to an unknown (ignorable) one
    data = bytearray(top.read_bytes())
    i = data.find(bytes.fromhex("e2792aca"))
    assert i > 0
    data[i:i + 4] = bytes.fromhex("0000abcd")
    top.write_bytes(data)
    with Image.open(str(top)) as img:
        assert img.read(0, 4) == b"\x44" * 4


def test_missing_backing_file(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", MiB)
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    base.unlink()
    assert_refused([str(top), str(tmp_path / "mp")], f"backing file not found: {tmp_path / 'base.qcow2'}",
                   top, tmp_path / "mp")


@pytest.mark.parametrize("depth", [1, 3])
def test_backing_loop(tmp_path, depth):
    names = [tmp_path / f"l{i}.qcow2" for i in range(depth)]
    for p in names:
        qemu.create(p, MiB)
    for i, p in enumerate(names):  # each names the next, the last names the first
        qemu.run("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b",
                 str(names[(i + 1) % depth]), str(p))
    assert_refused([str(names[0]), str(tmp_path / "mp")], "loops", names[0], tmp_path / "mp")


@pytest.mark.root
def test_backing_files_are_opened_read_only_and_share_locked(tmp_path, mount):
    top, lower = make_chain(tmp_path)
    with mount(top, tmp_path / "raw"):
        for path, fmt in zip(lower, ("raw", "qcow2")):  # every layer below, raw and qcow2
            r = qemu.run("qemu-io", "-f", fmt, "-c", "write 0 4k", str(path), check=False)
            assert r.returncode != 0 and "lock" in r.stderr
            r = qemu.run("qemu-io", "-f", fmt, "-r", "-c", "read 0 4k", str(path), check=False)
            assert r.returncode == 0, r.stderr
