"""Mounting without root: an unprivileged user (nobody) mounts through fusermount3,
with and without allow_other / user_allow_other, and without access to /dev/fuse.

Everything runs the installed `qcowfuse` program next to sys.executable, never
`python -m`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import qemu
from helpers.cli import assert_one_line_error
from helpers.procs import scratch_dir, unescape_mount
from helpers.services import force_unmount, kill_holders, mount_entry, wait_exit, which

NOBODY = 65534


# -- without root ----------------------------------------------------------------------

@contextlib.contextmanager
def dev_fuse_mode(mode: int) -> Iterator[None]:
    """/dev/fuse with the given mode for the duration; restored afterwards.

    udev's default rules make /dev/fuse 0666 (non-root FUSE needs to open it;
    fusermount3 only does the mount(2)); a bare devtmpfs without udev leaves it
    0600, and then libfuse fails before it even tries fusermount3."""
    old = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if old != mode:
        os.chmod("/dev/fuse", mode)
    try:
        yield
    finally:
        if old != mode:
            os.chmod("/dev/fuse", old)


@contextlib.contextmanager
def fuse_conf(user_allow_other: bool) -> Iterator[None]:
    """/etc/fuse.conf with or without `user_allow_other`; the original is restored byte for byte."""
    path = Path("/etc/fuse.conf")
    original = path.read_bytes() if path.exists() else None
    mode = stat.S_IMODE(path.stat().st_mode) if original is not None else 0o644
    lines = (original or b"").decode().splitlines()
    has = any(line.strip() == "user_allow_other" for line in lines)
    if has == user_allow_other:
        yield
        return
    lines = [line for line in lines if line.strip() != "user_allow_other"]
    if user_allow_other:
        lines.append("user_allow_other")
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, mode)
    try:
        yield
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)
            os.chmod(path, mode)


class Nobody:
    def __init__(self, root: Path, prefix: list[str]) -> None:
        self.dir = root
        self.prefix = prefix
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root), "LANG": "C.UTF-8"}

    def run(self, *argv: str | Path, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + [str(a) for a in argv], input=input, capture_output=True,
                              env=self.env, cwd=self.dir, timeout=timeout)

    def file(self, name: str, data: bytes = b"") -> Path:
        p = self.dir / name
        p.write_bytes(data)
        os.chown(p, NOBODY, NOBODY)
        return p


@pytest.fixture
def nobody(qcowfuse_bin) -> Iterator[Nobody]:
    """A directory owned by nobody outside the 0700 pytest tmp dirs, and a way to run as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid 65534")
    if which("setpriv"):
        prefix = [which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    elif which("runuser"):
        prefix = [which("runuser"), "-u", "nobody", "--"]
    else:
        pytest.skip("neither setpriv nor runuser installed")
    fusermount = which("fusermount3")
    if fusermount is None or not os.stat(fusermount).st_mode & stat.S_ISUID:
        pytest.skip("fusermount3 missing or not setuid root")
    probe = subprocess.run(prefix + [sys.executable, "-c", "import pyfuse3, trio, qcowfuse.cli"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode:
        pytest.skip(f"the venv is not usable by uid {NOBODY}: {probe.stderr.strip()[-300:]}")
    root = scratch_dir("qcowfuse-nobody-", dir="/var/tmp")
    os.chmod(root, 0o755)
    os.chown(root, NOBODY, NOBODY)
    try:
        with dev_fuse_mode(0o666):
            yield Nobody(root, prefix)
    finally:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                mp = unescape_mount(line.split()[1])
                if mp.startswith(str(root) + "/"):
                    force_unmount(mp)
        for f in root.glob("*.qcow2"):
            kill_holders(f)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def nobody_mounted(nobody: Nobody, qcowfuse_bin: Path, img: Path, mp: Path,
                   *options: str) -> Iterator[int]:
    """nobody mounts img on mp (yields the daemon's pid) and, at the end, unmounts it
    with fusermount3 -u and the daemon exits; whatever is left is torn down."""
    pidfile = nobody.dir / "qcowfuse.pid"
    r = nobody.run(qcowfuse_bin, *options, img, mp, "--pidfile", pidfile)
    assert r.returncode == 0, r.stderr.decode()
    pid = int(pidfile.read_text())
    try:
        yield pid
        r = nobody.run("fusermount3", "-u", mp)
        assert r.returncode == 0, r.stderr.decode()
        wait_exit([pid])
    finally:
        force_unmount(mp)
        kill_holders(img)


def nobody_image(nobody, size: int, *qemu_io_commands: str) -> Path:
    """A qcow2 image in nobody's directory, owned by nobody."""
    img = nobody.dir / "disk.qcow2"
    qemu.create(img, size)
    if qemu_io_commands:
        qemu.qemu_io(img, *qemu_io_commands)
    os.chown(img, NOBODY, NOBODY)
    return img


@pytest.mark.root
def test_nobody_mounts_reads_writes_unmounts(nobody, qcowfuse_bin):
    size = 16 << 20
    img = nobody_image(nobody, size, "write -P 0x2e 0 64k")
    mp = nobody.file("raw")
    data = nobody.file("data", b"\xa5" * (256 << 10))

    with nobody_mounted(nobody, qcowfuse_bin, img, mp) as pid:
        fstype, options = mount_entry(mp)
        assert fstype == "fuse.qcowfuse" and f"user_id={NOBODY}" in options, options
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY}\s", status, re.M), status
        # Without allow_other the mount is nobody's alone: even root is turned away.
        with pytest.raises(PermissionError):
            os.stat(mp)

        r = nobody.run("stat", "-c", "%s %U", mp)
        assert r.stdout.decode().split() == [str(size), "nobody"], r.stderr
        r = nobody.run("dd", f"if={data}", f"of={mp}", "bs=64k", "seek=16", "conv=notrunc,fsync",
                       "status=none")
        assert r.returncode == 0, r.stderr.decode()
        r = nobody.run("dd", f"if={mp}", "bs=64k", "count=20", "status=none")
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout[:65536] == b"\x2e" * 65536
        assert r.stdout[1 << 20:(1 << 20) + (256 << 10)] == data.read_bytes()
    assert mount_entry(mp) is None
    assert img.stat().st_uid == NOBODY
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x2e 0 64k", "read -P 0xa5 1M 256k", read_only=True)


@pytest.mark.root
@pytest.mark.parametrize("fg", [False, True], ids=["daemon", "foreground"])
def test_nobody_allow_other_without_user_allow_other(nobody, qcowfuse_bin, fg):
    """One clear line naming user_allow_other and /etc/fuse.conf, non-zero exit, nothing left."""
    img = nobody_image(nobody, 8 << 20)
    before = img.read_bytes()
    mp = nobody.dir / "raw"  # missing: must not be left behind
    with fuse_conf(user_allow_other=False):
        try:
            r = nobody.run(qcowfuse_bin, *(["-f"] if fg else []), "-o", "allow_other", img, mp,
                           timeout=30)
        finally:
            force_unmount(mp)
            kill_holders(img)
    err = r.stderr.decode()
    print(f"qcowfuse said (exit {r.returncode}): {err!r}")
    assert_one_line_error(r.returncode, err, "user_allow_other", "/etc/fuse.conf")
    assert not mp.exists()
    assert img.read_bytes() == before


@pytest.mark.root
def test_nobody_allow_other_with_user_allow_other(nobody, qcowfuse_bin):
    size = 8 << 20
    img = nobody_image(nobody, size, "write -P 0x71 0 4k")
    mp = nobody.file("raw")
    with fuse_conf(user_allow_other=True), \
            nobody_mounted(nobody, qcowfuse_bin, img, mp, "-o", "allow_other"):
        assert "allow_other" in mount_entry(mp)[1]
        assert os.stat(mp).st_size == size  # another user (root) gets in now
        with open(mp, "rb") as fh:
            assert fh.read(4096) == b"\x71" * 4096
    qemu.assert_clean(img)


@pytest.mark.root
def test_nobody_without_access_to_dev_fuse(nobody, qcowfuse_bin):
    """/dev/fuse 0600 (no udev): a clear one-line reason, not "fuse_session_mount failed"."""
    img = nobody_image(nobody, 8 << 20)
    mp = nobody.dir / "raw"
    with dev_fuse_mode(0o600):
        try:
            r = nobody.run(qcowfuse_bin, img, mp, timeout=30)
        finally:
            force_unmount(mp)
            kill_holders(img)
    err = r.stderr.decode()
    print(f"qcowfuse said (exit {r.returncode}): {err!r}")
    assert_one_line_error(r.returncode, err, "/dev/fuse")
    assert not mp.exists()


@pytest.mark.root
def test_nobody_checks_a_partition_without_root(nobody, qcowfuse_bin, tmp_path):
    """Partition files need no losetup: nobody mounts a partitioned disk in a directory
    of its own and runs e2fsck -fn on a partition file; no root anywhere."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(raw)], input=b"label: gpt\nsize=16M\nsize=16M\n",
                   check=True, capture_output=True)
    part = tmp_path / "p1.raw"
    with open(part, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(part)], check=True, capture_output=True)
    data = bytearray(raw.read_bytes())
    data[1 << 20:17 << 20] = part.read_bytes()
    raw.write_bytes(data)
    img = nobody.dir / "disk.qcow2"
    qemu.run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    os.chown(img, NOBODY, NOBODY)
    mp = nobody.dir / "d"
    mp.mkdir()
    os.chown(mp, NOBODY, NOBODY)
    with nobody_mounted(nobody, qcowfuse_bin, img, mp):
        r = nobody.run("ls", mp)
        assert r.stdout.decode().split() == ["disk-p1.raw", "disk-p2.raw", "disk.raw"], r.stderr
        r = nobody.run("e2fsck", "-fn", mp / "disk-p1.raw")
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
    qemu.assert_clean(img)
