"""Through the real CLI and a real FUSE mount; QEMU judges the image afterwards."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from helpers import qemu
from helpers.procs import fuse_mounts, unmount
from helpers.workload import random_writes

pytestmark = pytest.mark.root  # every test here mounts (see the markers in pyproject.toml)


def test_reads_patterns_qemu_wrote(tmp_path, mount):
    img = qemu.create(tmp_path / "disk.qcow2", 256 << 20)
    qemu.qemu_io(img, "write -P 0xa1 0 1M", "write -P 0xb2 3M 64k", "write -P 0xc3 100M 7M",
                 f"write -P 0xd4 {(256 << 20) - 512} 512")
    expect = qemu.convert_to_raw(img, tmp_path / "expect.raw").read_bytes()
    with mount(img, tmp_path / "raw") as (raw, _):
        assert raw.stat().st_size == 256 << 20
        assert raw.read_bytes() == expect
    qemu.assert_clean(img)


def test_writes_through_mount_match_model(tmp_path, mount):
    size = 64 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size, cluster_size=4096)
    qemu.qemu_io(img, "write -P 0x77 1M 2M")
    model = bytearray(size)
    model[1 << 20:3 << 20] = b"\x77" * (2 << 20)
    with mount(img, tmp_path / "raw") as (raw, _):
        random_writes(raw, model, seed=7, count=300, sizes=(1, 511, 4096, 5000, 65536, 300000))
        assert raw.read_bytes() == bytes(model)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(img)
    qemu.compare_raw(img, tmp_path / "model.raw")


def test_directory_mountpoint_holds_one_file(tmp_path, mount):
    img = qemu.create(tmp_path / "vm1.qcow2", 8 << 20)
    mp = tmp_path / "dir"
    mp.mkdir()
    with mount(img, mp) as (raw, _):
        assert sorted(os.listdir(mp)) == ["vm1.raw"]
        assert raw == mp / "vm1.raw"
        raw.write_bytes(b"\x42" * (8 << 20))  # open(O_TRUNC) to the same size is allowed
    qemu.qemu_io(img, "read -P 0x42 0 8M", read_only=True)
    qemu.assert_clean(img)


def test_missing_mountpoint_is_created_and_removed(tmp_path, mount):
    img = qemu.create(tmp_path / "disk.qcow2", 1 << 20)
    mp = tmp_path / "new.raw"
    with mount(img, mp) as (raw, _):
        assert raw.stat().st_size == 1 << 20
    assert not mp.exists()


def test_read_only_mount_refuses_writes_and_leaves_image_alone(tmp_path, mount):
    img = qemu.create(tmp_path / "disk.qcow2", 4 << 20)
    qemu.qemu_io(img, "write -P 0x12 0 64k")
    before = img.read_bytes()
    with mount(img, tmp_path / "raw", "-o", "ro") as (raw, _):
        assert raw.read_bytes()[:65536] == b"\x12" * 65536
        with pytest.raises(OSError) as e:
            os.open(raw, os.O_RDWR)
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert img.read_bytes() == before


def test_truncate_is_refused(tmp_path, mount):
    """A shrink that would cut off guest data (growing: test_resize.py)."""
    img = qemu.create(tmp_path / "disk.qcow2", 4 << 20)
    qemu.qemu_io(img, "write -P 0x21 3M 4k")
    with mount(img, tmp_path / "raw") as (raw, _):
        with pytest.raises(OSError) as e:
            os.truncate(raw, 1 << 20)
        assert e.value.errno == errno.EPERM
        assert raw.stat().st_size == 4 << 20
        fd = os.open(raw, os.O_RDWR)
        try:  # writes stop at the end, as on a block device
            assert os.pwrite(fd, b"abcd", (4 << 20) - 2) == 2
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"ab", 4 << 20)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
    qemu.assert_clean(img)


# Runs the CLI as a child subreaper: the daemon the CLI leaves behind is reparented to
# this wrapper, so its exit status can be collected (the test process stays no subreaper).
SIGNAL_WRAPPER = r"""
import ctypes, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
image, mp, pidfile, sig = sys.argv[1:5]
r = subprocess.run([sys.executable, "-m", "qcowfuse", image, mp, "--pidfile", pidfile])
if r.returncode:
    sys.exit(f"mount failed: {r.returncode}")
pid = int(open(pidfile).read())
with open(mp, "r+b") as fh:
    fh.seek(5 << 20)
    fh.write(b"\x66" * (1 << 20))
os.kill(pid, int(sig))
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_unmounts_and_exits(tmp_path, sig):
    """In daemon mode, SIGTERM and SIGINT flush, unmount and exit 0."""
    img = qemu.create(tmp_path / "disk.qcow2", 16 << 20)
    mp = tmp_path / "raw"
    try:
        r = subprocess.run([sys.executable, "-c", SIGNAL_WRAPPER, str(img), str(mp),
                            str(tmp_path / "pid"), str(int(sig))],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "0", f"daemon exit status {r.stdout.strip()}: {r.stderr}"
        assert str(mp) not in fuse_mounts()
    finally:
        unmount(mp, None)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x66 5M 1M", read_only=True)


def test_mmap_of_the_raw_file(tmp_path, mount):
    """A shared writable mapping of the raw file (the default mount) reaches the image."""
    img = qemu.create(tmp_path / "disk.qcow2", 16 << 20, cluster_size=4096)
    qemu.qemu_io(img, "write -P 0x21 0 1M")
    with mount(img, tmp_path / "raw") as (raw, _):
        fd = os.open(raw, os.O_RDWR)
        try:
            with mmap.mmap(fd, 2 << 20, mmap.MAP_SHARED, offset=0) as m:
                assert m[:4096] == b"\x21" * 4096
                m[4096 + 100:4096 + 100 + 300000] = b"\x22" * 300000
                m.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x21 0 4196", "read -P 0x22 4196 300000",
                 f"read -P 0x21 {4196 + 300000} {(1 << 20) - 4196 - 300000}",
                 "read -P 0 1M 1M", read_only=True)


def test_direct_io_bypasses_the_page_cache(tmp_path, mount):
    """-o direct_io: reads and writes go to the daemon, so the file cannot be mapped
    shared (the kernel refuses with ENODEV), and writes reach the image."""
    img = qemu.create(tmp_path / "disk.qcow2", 16 << 20)
    with mount(img, tmp_path / "raw", "-o", "direct_io") as (raw, _):
        fd = os.open(raw, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                mmap.mmap(fd, 4096, mmap.MAP_SHARED)
            assert e.value.errno == errno.ENODEV
            assert os.pwrite(fd, b"\x31" * 70000, 12345) == 70000
            assert os.pread(fd, 70000, 12345) == b"\x31" * 70000
        finally:
            os.close(fd)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0 0 12345", "read -P 0x31 12345 70000", read_only=True)


async def test_concurrent_requests_through_mount(tmp_path, mount):
    """Many trio tasks issue overlapping reads and writes at cluster and L2 boundaries."""
    cs = 4096
    size = 32 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size, cluster_size=cs)
    l2_span = cs * (cs // 8)
    with mount(img, tmp_path / "raw") as (raw, _):
        fd = os.open(raw, os.O_RDWR)
        try:
            async def writer(k: int) -> None:
                for j in range(40):
                    off = (j * 3 + 1) * l2_span // 4 - 1000 + k * 8192
                    off %= size - 70000
                    await trio.to_thread.run_sync(os.pwrite, fd, bytes([k + 1]) * 6000, off)

            async def reader() -> None:
                for j in range(60):
                    await trio.to_thread.run_sync(os.pread, fd, 200000, (j * 777777) % (size - 200000))

            async with trio.open_nursery() as n:
                for k in range(6):
                    n.start_soon(writer, k)
                for _ in range(3):
                    n.start_soon(reader)
            os.fsync(fd)
            expect = bytearray(size)
            for k in range(6):
                for j in range(40):
                    off = ((j * 3 + 1) * l2_span // 4 - 1000 + k * 8192) % (size - 70000)
                    expect[off:off + 6000] = bytes([k + 1]) * 6000
            # writers touch disjoint bytes per (k, j) only when offsets do not overlap;
            # compare against what qemu reads instead of the order-dependent model
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    qemu.assert_clean(img)
    assert qemu.convert_to_raw(img, tmp_path / "out.raw").read_bytes() == data


def test_qemu_refuses_nothing_after_unmount(tmp_path, mount):
    """The image is released once unmount returns: qemu-io can open it read-write."""
    img = qemu.create(tmp_path / "disk.qcow2", 4 << 20)
    with mount(img, tmp_path / "raw") as (raw, pid):
        raw.write_bytes(b"\x01" * (4 << 20))
    qemu.qemu_io(img, "write -P 0x02 0 4k", "read -P 0x01 4k 4092k")
    qemu.assert_clean(img)


def test_unmount_helper_cleans_up_after_failed_body(tmp_path, mount):
    img = qemu.create(tmp_path / "disk.qcow2", 1 << 20)
    mp = tmp_path / "raw"
    with pytest.raises(RuntimeError):
        with mount(img, mp):
            raise RuntimeError("test body failed")
    assert str(mp) not in fuse_mounts()


def test_debug_option_stays_in_foreground_with_fuse_debug_output(tmp_path):
    """-o debug: FUSE's request log on stderr, and -f implied (the command runs until
    the unmount, then exits 0)."""
    img = qemu.create(tmp_path / "disk.qcow2", 4 << 20)
    mp = tmp_path / "raw"
    proc = subprocess.Popen([sys.executable, "-m", "qcowfuse", str(img), str(mp), "-o", "debug"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while str(mp) not in fuse_mounts():
            assert proc.poll() is None, f"exited {proc.returncode} before mounting"
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.05)
        assert proc.poll() is None  # still in the foreground while mounted
        assert mp.read_bytes()[:4] == bytes(4)
    finally:
        unmount(mp, None)
        try:
            err = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
    assert proc.returncode == 0, err[-2000:]
    assert "opcode: INIT" in err and "opcode: READ" in err
