"""The host file grows ahead of new clusters (a hole, see hostfile.PREALLOCATE_BYTES):
QEMU must find the image clean and complete with that tail (a crash leaves it), the
file must end where the image does after close, and the tail must never read as data."""

from __future__ import annotations

import random
import shutil
import struct

import pytest

from helpers import qemu
from qcowfuse import Image
from qcowfuse.errors import CorruptError

MiB = 1 << 20
CS = 65536
COPIED = 1 << 63


def test_tail_is_clean_while_open_and_trimmed_at_close(tmp_path):
    size = 64 * MiB
    img = qemu.create(tmp_path / "p.qcow2", size)
    model = bytearray(size)
    rnd = random.Random(11)
    with Image.open(str(img), writable=True) as im:
        for c in rnd.sample(range(size // CS), 200):  # allocating 4 KiB writes
            off = c * CS + rnd.randrange(16) * 4096
            data = rnd.randbytes(4096)
            im.write(off, data)
            model[off:off + 4096] = data
        im.flush()
        crash = shutil.copy(img, tmp_path / "crash.qcow2")  # the file as a crash leaves it
    (tmp_path / "model.raw").write_bytes(model)
    info = qemu.assert_clean(crash)
    assert crash.stat().st_size > info["image-end-offset"], "no tail: nothing preallocated"
    qemu.compare_raw(crash, tmp_path / "model.raw")
    info = qemu.assert_clean(img)
    assert img.stat().st_size == info["image-end-offset"], "the tail was not trimmed at close"
    qemu.compare_raw(img, tmp_path / "model.raw")


def test_tail_is_not_data(tmp_path, image_calls):
    """An L2 entry pointing just past the end of the file is refused, also once the
    file has grown a preallocated hole over that offset."""
    img = qemu.create(tmp_path / "h.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    end = img.stat().st_size
    data = bytearray(img.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2_off + 8 * 3, COPIED | (end + 4 * CS))
    img.write_bytes(data)
    with Image.open(str(img), writable=True) as im:
        read, write = image_calls(im)
        write(100 * CS, b"\x22" * 4096)  # a new cluster at the end: the file grows ahead
        assert read(100 * CS, 4096) == b"\x22" * 4096
        with pytest.raises(CorruptError):
            read(3 * CS, 4096)
        with pytest.raises(CorruptError):
            read(3 * CS - 4096, 8192)  # the general path's reads too
