"""Hostile and broken images: refused at open, or EIO for the bad range at run time."""

from __future__ import annotations

import errno
import os
import random
import signal
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import qemu
from helpers.cli import assert_refused
from helpers.procs import fuse_mounts, unmount
from helpers.rawqcow2 import COPIED, L2_OFFSET_MASK, RawImage
from qcowfuse import Image, QcowError
from qcowfuse.qcow2.check import Checker

MiB = 1 << 20


def header_flags(img: Path) -> int:
    return struct.unpack_from(">Q", img.read_bytes(), 72)[0]


@pytest.fixture
def image(tmp_path):
    img = qemu.create(tmp_path / "h.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    return img


@pytest.mark.root
def test_data_cluster_past_eof_gives_eio_for_that_range_only(tmp_path, image, mount):
    RawImage(image).set_l2_entry(3, COPIED | (1 << 40))
    with mount(image, tmp_path / "raw") as (raw, pid):
        fd = os.open(raw, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 3 * 65536)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == b"\x11" * 4096  # the rest is served
            assert os.pread(fd, 4096, 5 * 65536) == b"\x11" * 4096
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 4096, 3 * 65536)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == b"\x11" * 4096  # still serving reads
        finally:
            os.close(fd)
    assert header_flags(image) & 2, "the corrupt bit must be set after a write hit bad metadata"


@pytest.mark.root
def test_write_through_pointer_into_metadata_is_refused(tmp_path, image, mount):
    data = image.read_bytes()
    reftable = struct.unpack_from(">Q", data, 48)[0]
    RawImage(image).set_l2_entry(4, COPIED | reftable)  # data "cluster" aliasing the refcount table
    before = image.read_bytes()[reftable:reftable + 65536]
    with mount(image, tmp_path / "raw") as (raw, _):
        fd = os.open(raw, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"\xff" * 65536, 4 * 65536)
            assert e.value.errno == errno.EIO
            with pytest.raises(OSError):  # further writes refused too: the image is corrupt
                os.pwrite(fd, b"\xff" * 512, 0)
        finally:
            os.close(fd)
    assert image.read_bytes()[reftable:reftable + 65536] == before
    assert header_flags(image) & 2


def test_unaligned_l2_table_gives_eio(tmp_path, image):
    data = bytearray(image.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_off)[0]
    struct.pack_into(">Q", data, l1_off, l2 + 4096)
    image.write_bytes(data)
    with Image.open(str(image)) as img:
        with pytest.raises(QcowError):
            img.read(0, 4096)


def mutated(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


@pytest.fixture(scope="module")
def seed_images(tmp_path_factory) -> list[bytes]:
    d = tmp_path_factory.mktemp("seeds")
    out = []
    for cs, rb, compat in ((512, 16, "1.1"), (4096, 1, "1.1"), (65536, 16, "0.10")):
        p = qemu.create(d / f"s{cs}.qcow2", 4 * MiB, cs, rb, compat)
        qemu.qemu_io(p, "write -P 0x21 0 64k", f"write -P 0x22 {2 * MiB} 8k")
        out.append(p.read_bytes())
    return out


# Byte positions: the header, the rest of cluster 0 (extensions, backing name), and
# anywhere (tables, refcount blocks, data); hypothesis prints the edits on failure.
POSITIONS = st.one_of(st.integers(0, 111), st.integers(0, 4095), st.integers(0, 1 << 22))


@settings(max_examples=400)
@given(which=st.integers(0, 2), edits=st.lists(st.tuples(POSITIONS, st.integers(0, 255)),
                                               min_size=1, max_size=12))
def test_fuzz_open_read_write(tmp_path_factory, seed_images, which, edits):
    """Mutated real images: every failure is a QcowError, never another exception,
    and nothing hangs or allocates without bound."""
    data = mutated(seed_images[which], edits)
    path = tmp_path_factory.mktemp("fuzz") / "f.qcow2"
    path.write_bytes(data)
    try:
        img = Image.open(str(path), writable=True)
    except QcowError:
        assert path.read_bytes() == data, "a refused image must be left unchanged"
        return
    try:
        try:
            Checker(img).run()
        except QcowError:
            pass
        for off in (0, 65536, 2 * MiB, img.size - 4096):
            try:
                img.read(max(0, off), 4096)
            except QcowError:
                pass
        for off in (0, 3 * MiB):
            n = min(4096, img.size)
            try:
                img.write(max(0, min(off, img.size - n)), b"\x5a" * n)
            except QcowError:
                pass
    finally:
        try:
            img.close()
        except QcowError:
            pass


def test_random_mutations_with_time_limit(seed_images, tmp_path):
    """A fixed budget of seeded random mutations; each case must finish in 5 s (no
    endless scans), and the failure message is the input that reproduces it."""
    rnd = random.Random(int(os.environ.get("QCOWFUSE_FUZZ_SEED", "2")))

    def timeout(*_):
        raise TimeoutError("case took more than 5 s")

    old = signal.signal(signal.SIGALRM, timeout)
    try:
        for case in range(800):
            which = rnd.randrange(len(seed_images))
            edits = [(rnd.choice([rnd.randrange(112), rnd.randrange(4096), rnd.randrange(1 << 22)]),
                      rnd.randrange(256)) for _ in range(rnd.randint(1, 12))]
            signal.alarm(5)
            try:
                test_fuzz_open_read_write.hypothesis.inner_test(
                    _Factory(tmp_path), seed_images, which, edits)
            except Exception as e:
                raise AssertionError(f"case {case}: which={which} edits={edits}: {e!r}") from e
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)


class _Factory:
    """Stands in for tmp_path_factory: the same directory every time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mktemp(self, name: str) -> Path:
        return self.path


# -- QEMU iotest 080 (qcow2 format input validation): the same header and snapshot
# table values poked into the same kind of image (64 MiB, 64 KiB clusters, compat
# 1.1).  QEMU is the referee: `qemu-img info` refuses every image but the last three,
# which it opens and `qemu-img check` calls corrupt (the two snapshot L1 values are
# refused by QEMU only when that snapshot is used; the snapshot table past EOF reads
# as zeros there).  qcowfuse refuses all of them at open, in one `qcowfuse:` line.

HDR = 104  # iotest 080's header_size: where it pokes its "extension"
SNAP1 = 0x70000  # the first snapshot table entry once `qemu-img snapshot -c` ran
IOTEST_080 = [
    # id, [(file offset, bytes)], setup before poking, qcowfuse's words, QEMU's verdict
    ("huge-header-size", [(100, "ffffffff")], None, "invalid header_length", "info"),
    ("huge-header-size-7f", [(100, "7fffffff")], None, "invalid header_length", "info"),
    ("huge-ext-backing-offset", [(8, "ffffffffffffffff"), (HDR, "12345678"), (HDR + 4, "7fffffff")],
     None, "backing file name lies outside", "info"),
    ("huge-ext-backing-at-ext", [(8, "000000000000006c"), (HDR, "12345678"), (HDR + 4, "7fffffff")],
     None, "unknown compression type", "info"),
    ("huge-ext", [(HDR, "12345678"), (HDR + 4, "7fffffff")], None, "unknown compression type", "info"),
    ("huge-reftable-size", [(56, "ffffffff")], None, "refcount table too large", "info"),
    ("huge-reftable-size-20001", [(56, "00020001")], None, "refcount table too large", "info"),
    ("misaligned-reftable", [(48, "1234567890abcdef")], None, "refcount table offset", "info"),
    ("huge-reftable-offset", [(48, "ffffffffffff0000"), (56, "0000007f")], None,
     "refcount table at 0xffffffffffff0000 lies beyond", "info"),
    ("nb-snapshots-ffffffff", [(60, "ffffffff")], None, "too many snapshots", "info"),
    ("nb-snapshots-7fffffff", [(60, "7fffffff")], None, "too many snapshots", "info"),
    ("huge-snapshot-offset", [(64, "ffffffffffff0000"), (60, "0000ffff")], None,
     "snapshot table offset 0xffffffffffff0000 is invalid", "info"),
    ("misaligned-snapshot-offset-nb0", [(64, "1234567890abcdef"), (60, "00000000")], None,
     "snapshot table offset 0x1234567890abcdef is invalid", "info"),
    ("l1-size-ffffffff", [(36, "ffffffff")], None, "L1 table too large", "info"),
    ("l1-size-7fffffff", [(36, "7fffffff")], None, "L1 table too large", "info"),
    ("huge-l1-offset", [(40, "7fffffffffff0000"), (36, "0000ffff")], None,
     "L1 table at 0x7fffffffffff0000 lies beyond", "info"),
    ("misaligned-l1-offset", [(40, "1234567890abcdef"), (36, "00000001")], None,
     "L1 table offset 0x1234567890abcdef is not cluster aligned", "info"),
    ("l1-size-0-with-snapshot", [(36, "00000000")], "snapshot", "L1 table too small", "info"),
    ("huge-backing-name", [(8, "0000000000001000"), (16, "ffffffff")], None,
     "backing file name too long", "info"),
    ("snapshot-l1-offset", [(SNAP1, "0000000000400200")], "write+snapshot",
     "snapshot 'test' has an invalid L1 table", "check"),
    ("snapshot-l1-size", [(SNAP1 + 8, "10000000")], "write+snapshot",
     "snapshot 'test' has an invalid L1 table", "check"),
    ("snapshot-table-past-eof", [(64, "0000000001000000"), (60, "00010000")], None,
     "snapshot table at 0x1000000 lies beyond the end of the file", "check"),
]


@pytest.mark.parametrize("pokes,setup,fragment,verdict", [c[1:] for c in IOTEST_080],
                         ids=[c[0] for c in IOTEST_080])
def test_iotest_080_values_refused(tmp_path, pokes, setup, fragment, verdict):
    img = qemu.create(tmp_path / "t.qcow2", 64 * MiB)
    if setup == "write+snapshot":
        qemu.qemu_io(img, "write 0 512")
    if setup:
        qemu.run("qemu-img", "snapshot", "-c", "test", str(img))
    with open(img, "r+b") as fh:
        for off, value in pokes:
            fh.seek(off)
            fh.write(bytes.fromhex(value))
    info = qemu.run("qemu-img", "info", str(img), check=False)
    if verdict == "info":
        assert info.returncode != 0, "QEMU opens this image: the case is not what iotest 080 says"
    else:
        assert info.returncode == 0, info.stderr
        assert qemu.check(img)["rc"] == 2, "qemu-img check must call this image corrupt"
    mp = tmp_path / "mp"
    try:
        assert_refused([str(img), str(mp), "-o", "ro"], fragment, img, mp)
    finally:
        if str(mp) in fuse_mounts():
            unmount(mp, None)


def test_allocation_never_lands_on_metadata(tmp_path, image):
    """QEMU's overlap check: should a metadata cluster's refcount drop to 0 while the
    image is open (the healing before the first write is the usual guard), the next
    allocation must refuse it rather than write guest data over the table."""
    img = Image.open(str(image), writable=True)
    try:
        img.write(0, b"\x12" * 512)  # first write: checks and heals, then in place
        l2 = img.l1[0] & L2_OFFSET_MASK
        c = l2 >> img.cluster_bits
        img.rc.add(c, -1)  # the L2 table now looks free: the lowest free cluster
        assert img.rc.next_free(0) == c
        before = image.read_bytes()[l2:l2 + 65536]
        with pytest.raises(QcowError):
            img.write(40 * 65536, b"\x13" * 65536)  # needs a new cluster, same L2 table
    finally:
        img.close()
    assert image.read_bytes()[l2:l2 + 65536] == before
    assert header_flags(image) & 2, "the corrupt bit must be set"


@pytest.mark.root
def test_corrupt_table_through_mount_gives_eio_for_its_range_only(tmp_path, mount):
    """An L1 entry pointing at an unaligned L2 table: reads of the guest range that
    table maps get EIO through the mount; the rest is still served."""
    l2_span = 65536 * 8192  # guest bytes one L2 table maps (64 KiB clusters)
    img2 = qemu.create(tmp_path / "big.qcow2", 2 * l2_span)
    qemu.qemu_io(img2, "write -P 0x11 0 1M", f"write -P 0x14 {l2_span} 1M")
    data = bytearray(img2.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_off + 8)[0]
    struct.pack_into(">Q", data, l1_off + 8, l2 + 4096)  # unaligned L2 table
    img2.write_bytes(data)
    with mount(img2, tmp_path / "raw", "-o", "ro") as (raw, pid):
        fd = os.open(raw, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, l2_span)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == b"\x11" * 4096  # the first table's range is served
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, l2_span + 65536)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 4096, 4096) == b"\x11" * 4096
        finally:
            os.close(fd)
