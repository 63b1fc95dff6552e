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

import qemu
from qcowfuse import Image, QcowError
from qcowfuse.qcow2.check import Checker

MiB = 1 << 20


def l2_entry_offset(img: Path, guest_cluster: int) -> int:
    """File offset of the L2 entry for a guest cluster (64 KiB clusters, first L2 table)."""
    data = img.read_bytes()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    return l2_off + 8 * guest_cluster


def set_l2_entry(img: Path, guest_cluster: int, value: int) -> None:
    off = l2_entry_offset(img, guest_cluster)
    with open(img, "r+b") as fh:
        fh.seek(off)
        fh.write(struct.pack(">Q", value))


def header_flags(img: Path) -> int:
    return struct.unpack_from(">Q", img.read_bytes(), 72)[0]


COPIED = 1 << 63


@pytest.fixture
def image(tmp_path):
    img = qemu.create(tmp_path / "h.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x11 0 2M")
    return img


def test_data_cluster_past_eof_gives_eio_for_that_range_only(tmp_path, image, mount):
    set_l2_entry(image, 3, COPIED | (1 << 40))
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


def test_write_through_pointer_into_metadata_is_refused(tmp_path, image, mount):
    data = image.read_bytes()
    reftable = struct.unpack_from(">Q", data, 48)[0]
    set_l2_entry(image, 4, COPIED | reftable)  # data "cluster" aliasing the refcount table
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


def test_allocation_never_lands_on_metadata(tmp_path, image):
    """QEMU's overlap check: should a metadata cluster's refcount drop to 0 while the
    image is open (the healing before the first write is the usual guard), the next
    allocation must refuse it rather than write guest data over the table."""
    img = Image.open(str(image), writable=True)
    try:
        img.write(0, b"\x12" * 512)  # first write: checks and heals, then in place
        l2 = img.l1[0] & 0x00FFFFFFFFFFFE00
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
