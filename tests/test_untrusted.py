"""Images you did not make: backing files named by the image are only ever regular
files; -o backing=off shows one layer; -o backing=PATH names the file (or block
device) to use.  QEMU's own views (qemu-img convert, with backing=null where the
layer is shown alone) are the reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers.cli import assert_refused
from helpers.qemu import qemu_io, run

MiB = 1 << 20


def qemu_view(image: Path, out: Path, *, backing_null: bool = False) -> bytes:
    if backing_null:
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}, "backing": None}
        run("qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), str(out))
    else:
        run("qemu-img", "convert", "-O", "raw", str(image), str(out))
    return out.read_bytes()


def overlay(tmp_path: Path, backing: str, fmt: str = "raw", size: int = 4 * MiB) -> Path:
    """An overlay with 64 KiB of data at 1 MiB that names `backing` (written before the
    name is set: QEMU itself would open a FIFO or device named there)."""
    img = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size))
    qemu_io(img, "write -P 0x61 1M 64k")
    run("qemu-img", "rebase", "-u", "-b", backing, "-F", fmt, str(img))
    return img


@pytest.mark.root
def test_backing_off_shows_only_the_top_layer(tmp_path, mount):
    """An image naming /etc/passwd: QEMU and a default mount show it; backing=off not."""
    img = overlay(tmp_path, "/etc/passwd")
    target = tmp_path / "r.raw"
    target.touch()
    with mount(img, target, "-o", "ro") as (raw, _):
        assert raw.read_bytes() == qemu_view(img, tmp_path / "q.raw")
    with mount(img, target, "-o", "ro,backing=off") as (raw, _):
        seen = raw.read_bytes()
    assert seen == qemu_view(img, tmp_path / "n.raw", backing_null=True)
    assert b"root:" not in seen and seen[1 * MiB:1 * MiB + 65536] == b"\x61" * 65536
    before = img.read_bytes()
    assert_refused([str(img), str(target), "-o", "backing=off"], "read-only", img, target)
    assert img.read_bytes() == before


@pytest.mark.root
@pytest.mark.parametrize("kind", ["fifo", "block device", "socket"])
def test_image_naming_a_special_file_is_refused(tmp_path, kind, loop_file):
    if kind == "fifo":
        name = tmp_path / "fifo"
        os.mkfifo(name)
    elif kind == "socket":
        import socket
        name = tmp_path / "sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(name))
    else:
        name = Path(loop_file)
    img = overlay(tmp_path, str(name))
    target = tmp_path / "r.raw"
    target.touch()
    assert_refused([str(img), str(target), "-o", "ro"], "not a regular file", img, target)
    assert_refused([str(img), str(target)], "not a regular file", img, target)


@pytest.mark.root
def test_backing_path_names_a_block_device_or_a_moved_file(tmp_path, mount, loop_file):
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(4 * MiB))
    img = overlay(tmp_path, "base.raw")
    want = qemu_view(img, tmp_path / "q.raw")
    target = tmp_path / "r.raw"
    target.touch()
    # the chain moved: the header's relative name no longer resolves
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    base.rename(moved / "base.raw")
    assert_refused([str(img), str(target), "-o", "ro"], "not found", img, target)
    with mount(img, target, "-o", f"ro,backing={moved / 'base.raw'}") as (raw, _):
        assert raw.read_bytes() == want
    # the same bytes on a block device the user names
    subprocess.run(["dd", f"if={moved / 'base.raw'}", f"of={loop_file}", "bs=1M", "conv=notrunc"],
                   check=True, capture_output=True)
    with mount(img, target, "-o", f"ro,backing={loop_file}") as (raw, _):
        assert raw.read_bytes() == want


@pytest.fixture
def loop_file(tmp_path):
    """A 4 MiB loop device (its path), detached in every path."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(bytes(4 * MiB))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if dev.returncode:
        pytest.skip(f"no loop device: {dev.stderr.strip()}")
    try:
        yield dev.stdout.strip()
    finally:
        subprocess.run(["losetup", "-d", dev.stdout.strip()], capture_output=True)
