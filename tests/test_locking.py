"""QEMU-compatible image locks: QEMU and qcowfuse respect each other's mounts."""

from __future__ import annotations

import subprocess
import time

import pytest

from helpers import qemu
from helpers.cli import assert_refused

pytestmark = pytest.mark.root  # every test here mounts (see the markers in pyproject.toml)


def qemu_io_rc(img, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", *args, str(img)], capture_output=True, text=True)


@pytest.fixture
def image(tmp_path):
    img = qemu.create(tmp_path / "disk.qcow2", 16 << 20)
    qemu.qemu_io(img, "write -P 0x31 0 64k")
    return img


def test_rw_mount_locks_out_qemu_writers_and_second_mount(tmp_path, image, mount):
    with mount(image, tmp_path / "raw"):
        r = qemu_io_rc(image, "-c", "write 0 4k")
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr
        r = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr
        r = subprocess.run(["qemu-img", "info", "-U", str(image)], capture_output=True, text=True)
        assert r.returncode == 0
        assert_refused([str(image), str(tmp_path / "raw2")], "in use by another process", image)
        assert_refused(["-o", "ro", str(image), str(tmp_path / "raw2")], "in use by another process", image)
    qemu_io_rc(image, "-c", "write 0 4k").check_returncode()  # released at unmount


def test_ro_mount_shares_reading_only(tmp_path, image, mount):
    with mount(image, tmp_path / "raw", "-o", "ro"):
        r = qemu_io_rc(image, "-c", "write 0 4k")
        assert r.returncode != 0 and "lock" in r.stderr
        assert qemu_io_rc(image, "-r", "-c", "read -P 0x31 0 4k").returncode == 0
        with mount(image, tmp_path / "raw2", "-o", "ro") as (raw, _):
            assert raw.read_bytes()[:4] == b"\x31" * 4


def test_qemu_writer_blocks_mount_until_force_share(tmp_path, image, mount):
    vm = subprocess.Popen(["qemu-io", "-c", "sleep 3000", str(image)])
    try:
        time.sleep(0.7)
        assert_refused([str(image), str(tmp_path / "raw")], "in use by another process", image)
        assert_refused(["-o", "ro", str(image), str(tmp_path / "raw")], "in use by another process", image)
        assert_refused(["-o", "force-share", str(image), str(tmp_path / "raw")], "needs a read-only mount", image)
        with mount(image, tmp_path / "raw", "-o", "ro,force-share") as (raw, _):
            assert raw.read_bytes()[:4] == b"\x31" * 4
    finally:
        vm.kill()
        vm.wait()
