"""mount(8), fstab and mount.fuse3: qcowfuse mounted the way the system mounts
file systems, with the generic options those pass along.

Everything runs the installed `qcowfuse` program (the venv's, or the one
scripts/install puts in /usr/local/bin), never `python -m`.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import qemu
from helpers.services import (SBIN_PATH, UNIT_QCOWFUSE, assert_live, cleanup, holders, mount_entry,
                              wait_exit, wait_until, which)


# -- mount(8), fstab, mount.fuse3 ------------------------------------------------------
#
# mount(8) runs the helper /sbin/mount.fuse (-> mount.fuse3) with PATH removed
# from the environment; mount.fuse3 runs `/bin/sh -c 'qcowfuse IMAGE MP -o OPTS'`,
# so for `-t fuse.qcowfuse` the program must be in the shell's default path
# (/usr/local/bin, /usr/bin, ...).  The fstab test mounts through the
# /usr/local/bin/qcowfuse that scripts/install puts there; the others use the venv's:
#   "mount"       mount(8) -t fuse 'PROGRAM#IMAGE' (mount.fuse3's form naming the
#                 program), PROGRAM = the qcowfuse under test;
#   "mount.fuse3" the exact command mount(8) runs for -t fuse.qcowfuse, with the
#                 venv first on PATH.

def helper_mount(how: str, binary: Path, image: Path, mp: Path, options: str) -> subprocess.CompletedProcess:
    if how == "mount":
        argv = ["mount", "-t", "fuse", f"{binary}#{image}", str(mp), "-o", options]
        env = dict(os.environ)
    else:
        helper = which("mount.fuse3")
        if helper is None:
            pytest.skip("mount.fuse3 not installed")
        argv = [helper, str(image), str(mp), "-o", options, "-t", "fuse.qcowfuse"]
        env = dict(os.environ, PATH=f"{binary.parent}:{os.environ.get('PATH', SBIN_PATH)}")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def umount_and_wait(mp: Path, image: Path) -> None:
    daemons = holders(image)
    assert len(daemons) == 1, daemons
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    wait_exit(daemons)
    wait_until(lambda: not holders(image), "the image to be closed")
    assert mount_entry(mp) is None


@pytest.mark.root
@pytest.mark.parametrize("how", ["mount", "mount.fuse3"])
def test_helper_mount_ro_leaves_image_untouched(tmp_path, qcowfuse_bin, how):
    size = 32 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size)
    qemu.qemu_io(img, "write -P 0x3c 0 128k", "write -P 0xc3 20M 1M")
    expect = qemu.convert_to_raw(img, tmp_path / "expect.raw").read_bytes()
    before, mtime = img.read_bytes(), img.stat().st_mtime_ns
    mp = tmp_path / "raw"
    with cleanup(img, mp):
        r = helper_mount(how, qcowfuse_bin, img, mp, "ro")
        assert r.returncode == 0, r.stdout + r.stderr
        assert_live(mp, size, ro=True)
        assert mp.read_bytes() == expect
        with pytest.raises(OSError) as e:
            os.open(mp, os.O_WRONLY)
        assert e.value.errno in (errno.EROFS, errno.EACCES)  # ro mount / mode 0444
        umount_and_wait(mp, img)
    assert img.read_bytes() == before and img.stat().st_mtime_ns == mtime
    qemu.assert_clean(img)


@pytest.mark.root
@pytest.mark.parametrize("how", ["mount", "mount.fuse3"])
def test_helper_mount_rw_writes_reach_image(tmp_path, qcowfuse_bin, how):
    size = 32 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size, cluster_size=4096)
    mp = tmp_path / "raw"
    mp.touch()  # an existing file this time
    with cleanup(img, mp):
        r = helper_mount(how, qcowfuse_bin, img, mp, "rw")
        assert r.returncode == 0, r.stdout + r.stderr
        assert_live(mp, size)
        fd = os.open(mp, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\x6b" * (300 << 10), 5 << 20) == 300 << 10
            assert os.pwrite(fd, b"\x17" * 512, size - 512) == 512
            os.fsync(fd)
        finally:
            os.close(fd)
        umount_and_wait(mp, img)
    assert mp.exists() and mp.stat().st_size == 0  # a pre-existing mount point stays
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x6b 5M 300k", f"read -P 0x17 {size - 512} 512", "read -P 0 0 5M",
                 read_only=True)


FSTAB_OPTIONS = "defaults,noatime,nofail,_netdev,ro"


def daemon_options(image: Path) -> list[str]:
    """The -o arguments the running daemon got (from its command line)."""
    (pid,) = holders(image)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return [argv[i + 1].decode() for i, a in enumerate(argv[:-1]) if a == b"-o"]


SYSTEM_HOME = Path("/opt/qcowfuse")  # scripts/install's defaults
SYSTEM_MANIFEST = SYSTEM_HOME / "installed-files"


@pytest.fixture
def system_install() -> Iterator[Path]:
    """qcowfuse installed by scripts/install where fstab finds it (/usr/local/bin).
    Suites in other checkouts may do the same at once: a lock serialises them.  An
    install that was there before is updated and left; one made here is removed."""
    import fcntl
    repo = Path(__file__).resolve().parent.parent
    with open("/tmp/qcowfuse-system-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        had_install = SYSTEM_MANIFEST.exists()
        if os.path.lexists(UNIT_QCOWFUSE) and not had_install:
            pytest.skip(f"{UNIT_QCOWFUSE} exists but was not installed by scripts/install")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QCOWFUSE_")}
        r = subprocess.run([str(repo / "scripts" / "install")], env=env, capture_output=True, text=True,
                           timeout=600)
        try:
            assert r.returncode == 0, r.stdout + r.stderr
            yield Path(UNIT_QCOWFUSE)
        finally:
            if not had_install:
                subprocess.run([str(repo / "scripts" / "install"), "--uninstall"], env=env,
                               capture_output=True, timeout=120)


@pytest.mark.root
def test_fstab_line_with_generic_options(tmp_path, system_install):
    """`mount MP` with an fstab line of type fuse.qcowfuse, run with no PATH at all:
    mount.fuse3's shell must find /usr/local/bin/qcowfuse as scripts/install left it.
    mount(8) drops defaults, mount.fuse3 drops nofail and _netdev and adds dev,suid;
    qcowfuse must accept whatever is left."""
    size = 16 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size)
    qemu.qemu_io(img, "write -P 0x11 0 64k")
    before = img.read_bytes()
    mp = tmp_path / "raw"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{img}  {mp}  fuse.qcowfuse  {FSTAB_OPTIONS}  0 0\n")
    mount_bin = which("mount")
    with cleanup(img, mp):
        r = subprocess.run([mount_bin, "--fstab", str(fstab), str(mp)], env={}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_live(mp, size, ro=True)
        (pid,) = holders(img)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1].decode() == str(system_install), argv  # python3 /usr/local/bin/qcowfuse ...
        passed = ",".join(daemon_options(img)).split(",")
        print("options reaching qcowfuse from fstab:", passed)
        assert "ro" in passed
        with open(mp, "rb") as fh:
            assert fh.read(65536) == b"\x11" * 65536
        umount_and_wait(mp, img)
    assert img.read_bytes() == before
    qemu.assert_clean(img)


@pytest.mark.root
@pytest.mark.parametrize("options", [
    FSTAB_OPTIONS,
    "defaults,noatime,nofail,_netdev,ro,dev,suid",
    "ro,nodev,nosuid,noexec,relatime,auto,user,users,nouser,x-systemd.automount,comment=systemd.x",
], ids=["fstab", "fstab+helper", "generic"])
def test_generic_options_accepted_directly(tmp_path, qcowfuse_bin, options):
    """The same lists, given to qcowfuse by hand (or by a helper that passes everything)."""
    img = qemu.create(tmp_path / "disk.qcow2", 8 << 20)
    before = img.read_bytes()
    mp = tmp_path / "raw"
    with cleanup(img, mp):
        r = subprocess.run([str(qcowfuse_bin), "-o", options, str(img), str(mp)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert_live(mp, 8 << 20, ro=True)
        umount_and_wait(mp, img)
    assert img.read_bytes() == before
