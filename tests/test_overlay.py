"""-o overlay: the raw view takes writes, the image never does (QEMU judges both)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import qemu
from helpers.ext4 import fs_mounted, loop_device, sh, tree_hashes
from helpers.procs import mounted, run_cli, unmount

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """$TMPDIR for the daemons of this test: where a throwaway overlay goes."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode


def image(tmp_path: Path, size: int = 64 * MiB, mode: int = 0o444, name: str = "img.qcow2") -> Path:
    img = qemu.create(tmp_path / name, size)
    qemu.qemu_io(img, "write -P 0x41 0 1M")
    os.chmod(img, mode)
    return img


def test_ext4_in_a_throwaway_overlay_leaves_a_0444_image_alone(tmp_path, tmpdir_env):
    img = image(tmp_path, 256 * MiB)
    before = fingerprint(img)
    with mounted(img, tmp_path / "raw", "-o", "overlay") as (raw, _):
        assert os.listdir(tmpdir_env) == []  # the overlay has no name, even now
        assert raw.read_bytes()[:MiB] == b"\x41" * MiB
        with loop_device(raw) as dev:
            sh("mkfs.ext4", "-q", "-F", dev)
            with fs_mounted(dev, tmp_path / "guest") as root:
                for i in range(50):
                    (root / f"f{i}").write_bytes(os.urandom(1000 * i))
                written = tree_hashes(root)
                sh("sync")
            with fs_mounted(dev, tmp_path / "guest", read_only=True) as root:
                assert tree_hashes(root) == written
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert fingerprint(img) == before
    assert os.listdir(tmpdir_env) == []
    qemu.assert_clean(img)


def test_sigkill_leaves_nothing_behind(tmp_path, tmpdir_env):
    img = image(tmp_path)
    before = fingerprint(img)
    mp = tmp_path / "raw"
    with mounted(img, mp, "-o", "overlay") as (raw, pid):
        with open(raw, "r+b") as fh:
            fh.write(b"\x99" * MiB)
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(pid, signal.SIGKILL)
        unmount(mp, pid)
    assert fingerprint(img) == before
    assert os.listdir(tmpdir_env) == []
    qemu.assert_clean(img)


def make_dirty_ext4(tmp_path: Path) -> Path:
    """A qcow2 image of an ext4 whose journal holds a committed transaction that is not
    checkpointed (needs_recovery set): file `f` reads 'O's as the image stands and 'N's
    once the journal is replayed.  Made with debugfs's journal writer."""
    raw = tmp_path / "dirty.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", str(raw))
    (tmp_path / "old").write_bytes(b"O" * 4096)
    (tmp_path / "new").write_bytes(b"N" * 4096)
    sh("debugfs", "-w", "-R", f"write {tmp_path / 'old'} f", str(raw))
    block = int(sh("debugfs", "-R", "bmap f 0", str(raw)).split()[-1])
    cmds = tmp_path / "cmds"
    cmds.write_text(f"jo\njw -b {block} {tmp_path / 'new'}\njc\n")
    sh("debugfs", "-w", "-f", str(cmds), str(raw))
    assert "needs_recovery" in sh("dumpe2fs", "-h", str(raw))
    img = tmp_path / "dirty.qcow2"
    qemu.run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    raw.unlink()
    os.chmod(img, 0o444)
    return img


def test_journal_replays_into_the_overlay(tmp_path, tmpdir_env):
    """A read-only kernel mount of an ext4 that needs recovery writes (it replays the
    journal): through -o overlay that lands in the overlay, the image stays as it was."""
    img = make_dirty_ext4(tmp_path)
    before = fingerprint(img)
    with mounted(img, tmp_path / "raw", "-o", "overlay") as (raw, _):
        with loop_device(raw) as dev:
            with fs_mounted(dev, tmp_path / "guest", read_only=True) as root:
                assert (root / "f").read_bytes() == b"N" * 4096  # replayed
        assert "needs_recovery" not in sh("dumpe2fs", "-h", str(raw))
    assert fingerprint(img) == before
    as_qemu_reads_it = qemu.convert_to_raw(img, tmp_path / "c.raw")
    assert "needs_recovery" in sh("dumpe2fs", "-h", str(as_qemu_reads_it))
    assert sh("debugfs", "-R", "cat f", str(as_qemu_reads_it)) == "O" * 4096


def test_kept_overlay_is_an_ordinary_qcow2_over_the_image(tmp_path):
    img = image(tmp_path, mode=0o644)
    before = fingerprint(img)
    keep = tmp_path / "keep.qcow2"
    with mounted(img, tmp_path / "raw", "-o", f"overlay={keep}") as (raw, _):
        with open(raw, "r+b") as fh:
            fh.seek(3 * MiB)
            fh.write(b"\x42" * (64 << 10))
    assert fingerprint(img) == before
    qemu.assert_clean(keep)
    info = json.loads(qemu.run("qemu-img", "info", "--output=json", str(keep)).stdout)
    assert info["backing-filename"] == str(img) and info["backing-filename-format"] == "qcow2"
    assert info["cluster-size"] == 65536 and info["virtual-size"] == 64 * MiB
    qemu.qemu_io(keep, "read -P 0x42 3M 64k", "read -P 0x41 0 1M", "read -P 0 1M 2M", read_only=True)
    # mounted again, the kept overlay is taken up where it was left
    with mounted(img, tmp_path / "raw", "-o", f"overlay={keep}") as (raw, _):
        with open(raw, "rb") as fh:
            fh.seek(3 * MiB)
            assert fh.read(64 << 10) == b"\x42" * (64 << 10)
    assert fingerprint(img) == before
    r = run_cli("info", "--output=json", str(keep))
    assert r.returncode == 0 and json.loads(r.stdout)["backing-chain"][0]["filename"] == str(img)
    r = run_cli("check", str(keep))
    assert r.returncode == 0, r.stdout + r.stderr


def test_kept_overlay_must_belong_to_the_image(tmp_path):
    img = image(tmp_path, mode=0o644)
    other = image(tmp_path, mode=0o644, name="other.qcow2")
    foreign = tmp_path / "foreign.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(other), "-F", "qcow2", str(foreign))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an image" * 100)
    for path in (foreign, junk, other):
        before = {p: fingerprint(p) for p in (img, path)}
        r = run_cli(str(img), str(tmp_path / "raw"), "-o", f"overlay={path}")
        assert r.returncode != 0 and r.stderr.startswith("qcowfuse: ") and r.stderr.count("\n") == 1, r.stderr
        assert str(path) in r.stderr
        assert {p: fingerprint(p) for p in (img, path)} == before
        assert not (tmp_path / "raw").exists()


def test_snapshot_becomes_writable_through_an_overlay(tmp_path, tmpdir_env):
    img = image(tmp_path, mode=0o644)
    qemu.run("qemu-img", "snapshot", "-c", "s1", str(img))
    qemu.qemu_io(img, "write -P 0x77 0 1M")
    before = fingerprint(img)
    with mounted(img, tmp_path / "raw", "-o", "snapshot=s1,overlay") as (raw, _):
        with open(raw, "r+b") as fh:
            assert fh.read(MiB) == b"\x41" * MiB
            fh.seek(4096)
            fh.write(b"\x55" * 4096)
            fh.flush()
            fh.seek(0)
            assert fh.read(3 * 4096) == b"\x41" * 4096 + b"\x55" * 4096 + b"\x41" * 4096
    assert fingerprint(img) == before
    qemu.qemu_io(img, "read -P 0x77 0 1M", read_only=True)
    qemu.assert_clean(img)


@contextlib.contextmanager
def held_read_only_by_qemu(img: Path) -> Iterator[None]:
    """A QEMU process with the image open read-only (as a VM with a read-only disk)."""
    proc = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()  # the read's report: the image is open and locked
        yield
    finally:
        proc.kill()
        proc.wait()


def test_overlay_while_qemu_holds_the_image_read_only(tmp_path, tmpdir_env):
    img = image(tmp_path, mode=0o644)
    before = fingerprint(img)
    with held_read_only_by_qemu(img):
        r = run_cli(str(img), str(tmp_path / "raw"))
        assert r.returncode != 0, "a read-write mount must be refused while QEMU holds the image"
        with mounted(img, tmp_path / "raw", "-o", "overlay") as (raw, _):
            with open(raw, "r+b") as fh:
                fh.write(b"\x13" * 4096)
    assert fingerprint(img) == before


def test_overlay_over_an_image_on_a_read_only_filesystem(tmp_path, tmpdir_env):
    src = tmp_path / "src"
    src.mkdir()
    img = image(src, mode=0o644)
    ro = tmp_path / "ro"
    ro.mkdir()
    sh("mount", "--bind", str(src), str(ro))
    try:
        sh("mount", "-o", "remount,bind,ro", str(ro))
        before = fingerprint(ro / img.name)
        with mounted(ro / img.name, tmp_path / "raw", "-o", "overlay") as (raw, _):
            with open(raw, "r+b") as fh:
                fh.write(b"\x21" * 8192)
                fh.seek(0)
                assert fh.read(8192) == b"\x21" * 8192
        assert fingerprint(ro / img.name) == before
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_full_tmpdir_gives_enospc_and_the_mount_keeps_serving(tmp_path, monkeypatch):
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small))
    try:
        monkeypatch.setenv("TMPDIR", str(small))
        img = image(tmp_path, mode=0o644)
        before = fingerprint(img)
        with mounted(img, tmp_path / "raw", "-o", "overlay") as (raw, _):
            r = subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", "count=16",
                                "seek=8", "conv=notrunc,fsync", "status=none"],
                               capture_output=True, text=True)
            assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
            with open(raw, "rb") as fh:  # still serving: the image's data reads as before
                assert fh.read(MiB) == b"\x41" * MiB
        assert fingerprint(img) == before
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_overlay_with_ro_is_refused(tmp_path):
    img = image(tmp_path, mode=0o644)
    r = run_cli(str(img), str(tmp_path / "raw"), "-o", "ro,overlay")
    assert r.returncode != 0 and r.stderr.startswith("qcowfuse: ") and "overlay" in r.stderr
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("pair", ["locked", "unlocked"])
def test_reads_through_the_overlay_see_its_writes_and_zeros_past_the_image(tmp_path, tmpdir_env,
                                                                          pair):
    """In-process (no FUSE): a read over clusters the overlay partly holds mixes the two
    layers; past the image's end (the view grown) it reads zeros."""
    from qcowfuse.overlay import open_overlay
    img = qemu.create(tmp_path / "img.qcow2", 4 * MiB, cluster_size=4096)  # 2 MiB per L2 table
    qemu.qemu_io(img, "write -P 0x41 0 1M", "write -P 0x66 4032k 64k")
    with open_overlay(str(img), None) as ov:
        read, write = (ov.read, ov.write) if pair == "locked" else ov.unlocked_io()
        assert read(0, MiB) == b"\x41" * MiB  # nothing in the overlay yet
        write(70 << 10, b"\x55" * 4096)
        expect = bytearray(b"\x41" * MiB)
        expect[70 << 10:74 << 10] = b"\x55" * 4096
        assert read(0, MiB) == expect
        assert read(64 << 10, 64 << 10) == expect[64 << 10:128 << 10]
        assert read(4 * MiB - 4096, 4096) == b"\x66" * 4096  # no L2 table in the overlay
        ov.resize(8 * MiB)
        assert read(4 * MiB, 4096) == bytes(4096)
        assert read(4 * MiB - 4096, 8192) == b"\x66" * 4096 + bytes(4096)
        assert read(8 * MiB - 4096, 4096) == bytes(4096)
    assert os.listdir(tmpdir_env) == []
    qemu.assert_clean(img)


@pytest.mark.parametrize("cluster_bits,size", [(9, 0), (9, 16 << 30), (12, 1 << 20), (16, 64 * MiB),
                                               (16, (1 << 40) + 512), (21, 1 << 44)])
def test_new_images_are_clean_for_qemu(tmp_path, cluster_bits, size):
    """What an overlay starts as (qcow2/create.py), for QEMU: clean, the right geometry
    and backing file, reading the backing file's data; 512 B clusters at 16 GiB need
    33 refcount blocks, each counted."""
    from qcowfuse.qcow2.create import create_image_file
    base = qemu.create(tmp_path / "base.qcow2", 1 << 20)
    qemu.qemu_io(base, "write -P 0x3c 0 64k")
    new = tmp_path / "new.qcow2"
    create_image_file(str(new), size, cluster_bits, str(base), "qcow2")
    qemu.assert_clean(new)
    info = json.loads(qemu.run("qemu-img", "info", "--output=json", str(new)).stdout)
    assert (info["virtual-size"], info["cluster-size"]) == (size, 1 << cluster_bits)
    assert info["backing-filename"] == str(base) and info["format-specific"]["data"]["compat"] == "1.1"
    if size:
        qemu.qemu_io(new, "read -P 0x3c 0 64k", read_only=True)
