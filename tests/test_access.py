"""Who may open the raw view: exactly whom the image file lets in, under allow_other too.

The mounts are root's (as a systemd unit runs them); the readers are other users,
switched to with setpriv.  The kernel checks the owner and mode the view shows
(default_permissions), so these tests judge what the view shows by what the kernel
then lets another user do.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import qemu
from helpers.procs import mounted, run_cli, scratch_dir, unmount

NOBODY = 65534
GROUP = 4242  # a group nobody is otherwise in

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root and setpriv to act as other users")]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp dirs are 0700)."""
    d = scratch_dir("qcowfuse-access-", dir="/var/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_user(uid: int, gid: int, *argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           *map(str, argv)], capture_output=True, timeout=60, cwd="/")


def can_read(uid: int, gid: int, path: Path, expect: bytes) -> bool:
    r = as_user(uid, gid, "head", "-c", str(len(expect)), path)
    if r.returncode == 0:
        assert r.stdout == expect, "read through the view returned the wrong bytes"
        return True
    assert b"Permission denied" in r.stderr, r.stderr
    return False


def can_write(uid: int, gid: int, path: Path) -> bool:
    r = as_user(uid, gid, "dd", "if=/dev/zero", f"of={path}", "bs=512", "count=1", "seek=8",
                "conv=notrunc", "status=none")
    if r.returncode == 0:
        return True
    assert b"Permission denied" in r.stderr or b"Read-only" in r.stderr, r.stderr
    return False


def image(dir: Path, mode: int, gid: int = 0, name: str = "disk.qcow2") -> Path:
    img = qemu.create(dir / name, 8 << 20)
    qemu.qemu_io(img, "write -P 0x41 0 1M")
    os.chown(img, 0, gid)
    os.chmod(img, mode)
    return img


def perm(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_image_stays_private_under_allow_other(shared_dir):
    """The issue's transcript: a 0600 image mounted with allow_other is root's alone."""
    img = image(shared_dir, 0o600)
    with mounted(img, shared_dir / "raw", "-o", "allow_other") as (raw, _):
        st = raw.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
        assert raw.read_bytes()[:16] == b"A" * 16  # root, the owner
        assert not can_read(NOBODY, NOBODY, raw, b"A" * 16)
        assert not can_write(NOBODY, NOBODY, raw)
    assert perm(img) == 0o600
    qemu.assert_clean(img)


def test_owner_of_the_image_reads_and_writes(shared_dir):
    """libvirt's case: a 0600 image owned by the VM's user, mounted by root."""
    img = image(shared_dir, 0o600)
    os.chown(img, NOBODY, NOBODY)
    with mounted(img, shared_dir / "raw", "-o", "allow_other") as (raw, _):
        st = raw.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, NOBODY, NOBODY)
        assert can_read(NOBODY, NOBODY, raw, b"A" * 16)
        assert can_write(NOBODY, NOBODY, raw)
        assert not can_read(NOBODY - 1, NOBODY, raw, b"A" * 16)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0 4k 512", "read -P 0x41 5k 1019k", read_only=True)


def test_world_readable_image_is_readable_not_writable(shared_dir):
    img = image(shared_dir, 0o644)
    with mounted(img, shared_dir / "raw", "-o", "allow_other") as (raw, _):
        assert perm(raw) == 0o644
        assert can_read(NOBODY, NOBODY, raw, b"A" * 16)
        assert not can_write(NOBODY, NOBODY, raw)
    qemu.qemu_io(img, "read -P 0x41 0 1M", read_only=True)
    qemu.assert_clean(img)


def test_group_of_the_image_reads(shared_dir):
    """0640 root:GROUP, in a directory mount: the group reads (the directory lets it
    search), everybody else is turned away at the directory already."""
    img = image(shared_dir, 0o640, gid=GROUP)
    mp = shared_dir / "dir"
    mp.mkdir()
    with mounted(img, mp, "-o", "allow_other") as (raw, _):
        st = raw.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, GROUP)
        dst = mp.stat()
        assert (stat.S_IMODE(dst.st_mode), dst.st_uid, dst.st_gid) == (0o550, 0, GROUP)
        assert can_read(NOBODY, GROUP, raw, b"A" * 16)
        assert not can_write(NOBODY, GROUP, raw)
        assert not can_read(NOBODY, NOBODY, raw, b"A" * 16)
        r = as_user(NOBODY, NOBODY, "ls", mp)
        assert r.returncode != 0 and b"Permission denied" in r.stderr


def test_group_writable_image_is_group_writable(shared_dir):
    img = image(shared_dir, 0o660, gid=GROUP)
    with mounted(img, shared_dir / "raw", "-o", "allow_other") as (raw, _):
        assert can_write(NOBODY, GROUP, raw)
        assert not can_write(NOBODY, NOBODY, raw)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0 4k 512", read_only=True)


def test_read_only_mount_shows_no_write_bits(shared_dir):
    img = image(shared_dir, 0o666)
    mp = shared_dir / "dir"
    mp.mkdir()
    with mounted(img, mp, "-o", "ro,allow_other") as (raw, _):
        assert perm(raw) == 0o444
        assert perm(mp) == 0o555
        assert can_read(NOBODY, NOBODY, raw, b"A" * 16)
        assert not can_write(NOBODY, NOBODY, raw)


def test_chmod_and_chown_change_the_view_not_the_image(shared_dir):
    img = image(shared_dir, 0o600)
    before = img.stat()
    with mounted(img, shared_dir / "raw", "-o", "allow_other") as (raw, _):
        os.chmod(raw, 0o604)
        assert perm(raw) == 0o604 and perm(img) == 0o600
        assert can_read(NOBODY, NOBODY, raw, b"A" * 16)
        assert not can_write(NOBODY, NOBODY, raw)
        os.chown(raw, NOBODY, GROUP)
        st = raw.stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, GROUP)
        assert can_write(NOBODY, NOBODY, raw)  # the owner's rw bits are nobody's now
        # nobody owns the view now and may narrow it again
        r = as_user(NOBODY, NOBODY, "chmod", "0660", raw)
        assert r.returncode == 0, r.stderr
        assert perm(raw) == 0o660
        after = img.stat()
        assert (perm(img), after.st_uid, after.st_gid) == (0o600, before.st_uid, before.st_gid)
        # truncate still resizes the guest disk
        os.truncate(raw, 16 << 20)
        assert raw.stat().st_size == 16 << 20
    after = img.stat()
    assert (perm(img), after.st_uid, after.st_gid) == (0o600, before.st_uid, before.st_gid)
    assert json.loads(qemu.run("qemu-img", "info", "--output=json", str(img)).stdout)["virtual-size"] == 16 << 20
    qemu.assert_clean(img)


def test_pidfile_and_created_mountpoint_honour_the_umask(shared_dir):
    img = image(shared_dir, 0o600)
    mp = shared_dir / "new.raw"  # missing: created for the mount
    pidfile = shared_dir / "qcowfuse.pid"
    old = os.umask(0o077)
    try:
        r = run_cli(str(img), str(mp), "--pidfile", str(pidfile))
    finally:
        os.umask(old)
    pid = None
    try:
        assert r.returncode == 0, r.stderr
        pid = int(pidfile.read_text())
        assert perm(pidfile) == 0o600
    finally:
        unmount(mp, pid)
    from qcowfuse.daemon import prepare_mountpoint
    old = os.umask(0o077)
    try:
        target = prepare_mountpoint(str(mp), str(img))
    finally:
        os.umask(old)
    assert target.created and perm(mp) == 0o600


def test_io_uring_is_refused(shared_dir):
    img = image(shared_dir, 0o600)
    before = img.read_bytes()
    r = run_cli(str(img), str(shared_dir / "raw"), "-o", "io_uring")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("qcowfuse: ") and "io_uring" in r.stderr
    assert "thread" in r.stderr  # the reason, not "unknown option"
    assert not (shared_dir / "raw").exists() and img.read_bytes() == before


def test_no_environment_turns_io_uring_on(tmp_path, monkeypatch):
    """The variable libfuse reads is gone from the environment before the mount."""
    import pyfuse3

    from qcowfuse.daemon import MountError, MountOptions, MountTarget, serve
    from qcowfuse.image import Image

    seen: list[str | None] = []

    def init(ops, mountpoint, options):
        seen.append(os.environ.get("FUSE_URING_ENABLE"))
        raise RuntimeError("stop here")

    monkeypatch.setenv("FUSE_URING_ENABLE", "1")
    monkeypatch.setattr(pyfuse3, "init", init)
    img = qemu.create(tmp_path / "disk.qcow2", 1 << 20)
    opts = MountOptions(image=str(img), mountpoint=str(tmp_path / "raw"), foreground=True)
    with pytest.raises(MountError):
        serve(Image.open(str(img), writable=False), opts,
              MountTarget(str(tmp_path / "raw"), None, False), ready_fd=None)
    assert seen == [None]
