"""Images with an external data file (incompatible bit 2; autoclear bit 1, data_file_raw),
judged by QEMU: qemu-io reads what we write, qemu-img check finds them clean, a raw data
file stays byte-equal to qemu-img convert's output, check/map/info agree with qemu-img.

The data file's name comes from the image, so a read-write mount takes it only from the
user (-o data-file=PATH); a read-only one follows the name to a regular file only."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from helpers import qemu
from helpers.cli import assert_refused
from helpers.procs import mounted, run_cli
from helpers.qemu import run
from helpers.rawqcow2 import RawImage
from qcowfuse import Image

MIB = 1 << 20
SIZE = 8 * MIB
EXT_DATA_FILE = 0x44415441


def create(tmp_path: Path, raw: bool, name: str = "vol", cluster_size: int = 65536,
           backing: Path | None = None) -> tuple[Path, Path]:
    """An image and its data file (named by absolute path, as libvirt names them)."""
    img, data = tmp_path / f"{name}.qcow2", tmp_path / f"{name}.data"
    extra = f"data_file={data},data_file_raw={'on' if raw else 'off'}"
    if backing is not None:
        extra += f",backing_file={backing},backing_fmt=qcow2"
    qemu.create(img, SIZE, cluster_size=cluster_size, extra=extra)
    return img, data


def qemu_fill(img: Path) -> None:
    """Data at guest cluster 0 (host offset 0 of the data file), unaligned writes, zero
    clusters with and without their allocation (whose guest offsets are also those of the
    image file's own clusters), a discard."""
    qemu.qemu_io(img, "write -P 0x11 0 100k", "write -z 192k 128k", "write -z -u 192k 64k",
                 "write -P 0x22 1M 64k", "write -z 2M 64k",
                 "write -P 0x33 3M 128k", "write -z -u 3M 64k", "write -z 4M 128k",
                 "write -z -u 4M 64k", "discard 5M 64k", "write -P 0x44 7M 4k")


def model_of(img: Path, tmp_path: Path) -> bytearray:
    out = tmp_path / "model.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(out))
    return bytearray(out.read_bytes())


def set_data_file_name(img: Path, name: bytes) -> None:
    """Rewrite the header's data-file name extension (the other extensions kept)."""
    buf = bytearray(img.read_bytes()[:65536])
    pos = struct.unpack_from(">I", buf, 100)[0]
    exts, p = [], pos
    while True:
        t, n = struct.unpack_from(">II", buf, p)
        if t == 0:
            break
        exts.append((t, bytes(buf[p + 8:p + 8 + n])))
        p += 8 + n + (-n % 8)
    out = b""
    for t, d in [(t, name if t == EXT_DATA_FILE else d) for t, d in exts]:
        out += struct.pack(">II", t, len(d)) + d + bytes(-len(d) % 8)
    out += bytes(8)
    with open(img, "r+b") as fh:
        fh.seek(pos)
        fh.write(out)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "not-raw"])
def test_qemu_written_data_reads_back(tmp_path, raw):
    img, _ = create(tmp_path, raw)
    qemu_fill(img)
    model = model_of(img, tmp_path)
    with Image.open(str(img)) as image:  # read-only: follows the name in the header
        assert image.read(0, SIZE) == model
        assert image.read(100 * 1024 - 7, 20) == model[100 * 1024 - 7:100 * 1024 + 13]
        read, _ = image.unlocked_io()  # the daemon's fast path, over offsets the image file has too
        for off, n in ((65536, 4096), (65536, 131072), (7 * MIB, 4096), (0, 4096)):
            assert read(off, n) == model[off:off + n], (off, n)
    with mounted(img, tmp_path / "raw", "-o", "ro") as (view, _):
        assert view.read_bytes() == model


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "not-raw"])
def test_writes_are_read_back_by_qemu(tmp_path, raw):
    img, data = create(tmp_path, raw)
    qemu_fill(img)
    model = model_of(img, tmp_path)
    # 192k + 10: a zero cluster, then (raw) a zero cluster with its allocation
    writes = [(0, b"\xa1" * 3), (5000, b"\xa2" * 70000), (192 * 1024 + 10, b"\xa9" * 70000),
              (2 * MIB + 100, b"\xa3" * 10),
              (3 * MIB - 512, b"\xa4" * (65536 * 2 + 1024)), (4 * MIB + 1000, b"\xa8" * 100000),
              (5 * MIB + 65535, b"\xa5" * 2), (6 * MIB + 10, b"\xa6" * 100), (SIZE - 1, b"\xa7")]
    if not raw:  # stale bytes where nothing is mapped: a new cluster there is zero-filled
        with open(data, "r+b") as fh:
            fh.seek(6 * MIB)
            fh.write(b"\xff" * 65536)
    with mounted(img, tmp_path / "raw", "-o", f"data-file={data}") as (view, _):
        fd = os.open(view, os.O_RDWR)
        try:
            for off, buf in writes:
                assert os.pwrite(fd, buf, off) == len(buf)
                model[off:off + len(buf)] = buf
            os.fsync(fd)
            assert os.pread(fd, SIZE, 0) == model
        finally:
            os.close(fd)
    qemu.assert_clean(img)
    (tmp_path / "expected.raw").write_bytes(model)
    qemu.compare_raw(img, tmp_path / "expected.raw")
    qemu.qemu_io(img, "read -P 0xa1 0 3", "read -P 0x11 3 4997", "read -P 0xa2 5000 70000",
                 "read -P 0xa7 8388607 1", read_only=True)
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["data-file-raw"] is raw  # autoclear bit kept
    if raw:  # the data file is still the raw guest disk itself
        assert data.read_bytes()[:SIZE].ljust(SIZE, b"\0") == bytes(model)
    assert model_of(img, tmp_path) == model


def test_read_write_needs_the_data_file_named(tmp_path):
    img, data = create(tmp_path, raw=True)
    qemu_fill(img)
    before = data.read_bytes()
    assert_refused([str(img), str(tmp_path / "mp")], "-o data-file=PATH", img, tmp_path / "mp")
    assert data.read_bytes() == before
    with pytest.raises(Exception, match="data-file=PATH"):
        Image.open(str(img), writable=True)


def test_hostile_names_are_never_opened_for_writing(tmp_path):
    """An image naming a device or somebody's file: read-write refuses without opening
    it, read-only refuses anything but a regular file."""
    img, _ = create(tmp_path, raw=False)
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:secret\n")
    set_data_file_name(img, str(secret).encode())
    assert_refused([str(img), str(tmp_path / "mp")], "-o data-file=PATH", img, tmp_path / "mp")
    assert secret.read_bytes() == b"root:secret\n"
    for device in (b"/dev/zero", b"/dev/null"):
        set_data_file_name(img, device)
        assert_refused([str(img), str(tmp_path / "mp"), "-o", "ro"], "not a regular file", img,
                       tmp_path / "mp")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    set_data_file_name(img, str(fifo).encode())
    assert_refused([str(img), str(tmp_path / "mp"), "-o", "ro"], "not a regular file", img,
                   tmp_path / "mp")


def test_relative_name_resolves_beside_the_image(tmp_path):
    here = tmp_path / "imgs"
    here.mkdir()
    img = here / "rel.qcow2"
    run("sh", "-c", f"cd {here} && qemu-img create -q -f qcow2 -o data_file=rel.data "
                    f"rel.qcow2 {SIZE} && qemu-io -c 'write -P 0x5a 64k 64k' rel.qcow2")
    with Image.open(str(img)) as image:
        assert image.read(65536, 65536) == b"\x5a" * 65536


def test_given_data_file_overrides_the_name(tmp_path):
    img, data = create(tmp_path, raw=True)
    qemu_fill(img)
    other = tmp_path / "copy.data"
    other.write_bytes(data.read_bytes())
    data.unlink()  # the name in the image now leads nowhere
    assert_refused([str(img), str(tmp_path / "mp"), "-o", "ro"], "No such file", img)
    with Image.open(str(img), data_file=str(other)) as image:
        assert image.read(0, 4) == b"\x11" * 4


def test_check_map_info_agree_with_qemu_img(tmp_path):
    for raw in (True, False):
        img, _ = create(tmp_path, raw, name=f"v{int(raw)}")
        qemu.qemu_io(img, "write -P 0x11 0 128k", "write -z 2M 64k", "write -P 0x33 3M 128k",
                     "write -z -u 3M 64k", "write -P 0x44 7M 64k")
        theirs = qemu.check(img)
        ours = json.loads(run_cli("check", "--output=json", str(img)).stdout)
        for key in ("allocated-clusters", "total-clusters", "image-end-offset", "fragmented-clusters"):
            assert ours.get(key) == theirs.get(key), (raw, key, ours, theirs)
        assert theirs["rc"] == 0 and "corruptions" not in ours and "leaks" not in ours
        before = img.read_bytes()
        assert run_cli("check", "--repair", "all", str(img)).returncode == 0
        assert img.read_bytes() == before
        theirs_map = json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout)
        ours_map = json.loads(run_cli("map", "--output=json", str(img)).stdout)
        assert ours_map == theirs_map, raw
        human = run_cli("map", str(img)).stdout
        assert human == run("qemu-img", "map", str(img)).stdout
        info = json.loads(run_cli("info", "--output=json", str(img)).stdout)
        assert info["data-file"] == str(tmp_path / f"v{int(raw)}.data")
        assert info["data-file-raw"] is raw


def test_resize_resizes_the_data_file_too(tmp_path):
    """As qemu-img resize: the data file grows and shrinks with the disk (named by the
    user: resizing writes to it); a raw one stays the guest disk."""
    img, data = create(tmp_path, raw=True)
    qemu.qemu_io(img, "write -P 0x51 0 64k", "write -P 0x52 8128k 64k")
    before = img.read_bytes()
    r = run_cli("resize", str(img), "16M")
    assert r.returncode != 0 and "--data-file PATH" in r.stderr
    assert img.read_bytes() == before
    r = run_cli("resize", "--data-file", str(data), str(img), "16M")
    assert r.returncode == 0, r.stderr
    assert data.stat().st_size == 16 * MIB
    with mounted(img, tmp_path / "raw", "-o", f"data-file={data}") as (view, _):
        os.truncate(view, 24 * MIB)  # through the mount
        with open(view, "r+b") as fh:
            fh.seek(20 * MIB)
            fh.write(b"\x53" * 4096)
    assert data.stat().st_size == 24 * MIB
    info = json.loads(run("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["virtual-size"] == 24 * MIB
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x51 0 64k", "read -P 0x52 8128k 64k", "read -P 0 8M 12M",
                 "read -P 0x53 20M 4k", "read -P 0 20484k 4092k", read_only=True)
    assert data.read_bytes() == bytes(model_of(img, tmp_path))  # still the raw disk


def test_shrink_cuts_the_data_file(tmp_path):
    img, data = create(tmp_path, raw=False)
    qemu.qemu_io(img, "write -P 0x51 0 64k", "write -z 6M 64k")
    r = run_cli("resize", "--shrink", "--data-file", str(data), str(img), "4M")
    assert r.returncode == 0, r.stderr
    assert data.stat().st_size == 4 * MIB
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x51 0 64k", "read -P 0 64k 4032k", read_only=True)


def test_backing_file_below_a_data_file_image(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", SIZE)
    qemu.qemu_io(base, "write -P 0x61 0 1M")
    img, data = create(tmp_path, raw=False, backing=base)
    qemu.qemu_io(img, "write -P 0x62 64k 4k")
    with mounted(img, tmp_path / "raw", "-o", f"data-file={data}") as (view, _):
        with open(view, "r+b") as fh:
            fh.seek(200 * 1024)
            fh.write(b"\x63" * 100)  # copy-on-write from the backing file, into the data file
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x61 0 64k", "read -P 0x62 64k 4k", "read -P 0x61 68k 124k",
                 "read -P 0x61 192k 8k", "read -P 0x63 200k 100", "read -P 0x61 204900 61340",
                 read_only=True)


def test_overlay_takes_the_writes(tmp_path):
    img, data = create(tmp_path, raw=True)
    qemu_fill(img)
    before = (img.read_bytes(), data.read_bytes())
    with mounted(img, tmp_path / "raw", "-o", "overlay") as (view, _):
        with open(view, "r+b") as fh:
            fh.write(b"\xee" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            assert fh.read(4096) == b"\xee" * 4096
    assert (img.read_bytes(), data.read_bytes()) == before


def test_power_cut_orders_the_data_file_before_the_tables(tmp_path):
    """Writes into new clusters of a data file, cut at every point of the two files' log:
    the data file's data must be durable before the L2 entry that maps it (a crash may
    lose a write that was not flushed, never show other bytes in its place)."""
    from helpers.powercut import GuestWrite, RecordingFile, TaggedLog, cut_two_files, verify_guest
    from qcowfuse.datafile import DataFile
    from qcowfuse.hostfile import HostFile

    img, data = create(tmp_path, raw=False, cluster_size=4096)
    qemu.qemu_io(img, "write -P 0x31 0 8k")
    with open(data, "r+b") as fh:  # stale bytes where nothing is mapped yet
        fh.seek(8192)
        fh.write(b"\xff" * (2 * MIB))
    initial = [img.read_bytes(), data.read_bytes()]
    guest0 = model_of(img, tmp_path)
    shared: list = []
    rec = RecordingFile(HostFile.open(str(img), True))
    rec.log = TaggedLog(shared, 0)  # type: ignore[assignment]
    rec_data = RecordingFile(DataFile.open(str(data), True))
    rec_data.log = TaggedLog(shared, 1)  # type: ignore[assignment]
    image = Image.open_file(rec, writable=True, data=rec_data)
    model = bytearray(guest0)
    writes = []
    try:
        for off, buf in [(100, b"\x32" * 50), (5000, b"\x33" * 10000), (MIB + 7, b"\x34" * 700)]:
            writes.append(GuestWrite(len(shared), off, buf))
            image.write(off, buf)
            model[off:off + len(buf)] = buf
        image.flush()
    finally:
        image.close()
    qemu.assert_clean(img)
    assert model_of(img, tmp_path) == model
    assert any(i == 1 and e is None for i, e in shared), "the data file was never synced"

    def judge(path: Path, info: dict, got: bytes) -> str | None:
        return verify_guest(got, bytearray(guest0), model, writes)

    failures, n_images = cut_two_files(tmp_path, initial, shared, judge)
    print(f"\ndata file power cuts: log {len(shared)} entries, {n_images} crash images")
    assert n_images > 10 and not failures, "\n".join(failures[:6])


def test_close_releases_the_data_file(tmp_path):
    img, data = create(tmp_path, raw=True)

    def open_fds() -> set[str]:
        return {os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{n}")}
    for writable in (False, True):
        with Image.open(str(img), writable=writable, data_file=str(data)) as image:
            assert str(data) in open_fds()
            if writable:
                image.write(0, b"x")
        assert str(data) not in open_fds()


def test_replacing_clusters_frees_nothing_in_the_image_file(tmp_path):
    """One write over a zero cluster and a preallocated zero cluster (guest cluster 4,
    whose index is also the image file's L2 table): the data file's clusters have no
    refcounts, so replacing them must not drop one in the image file."""
    img, data = create(tmp_path, raw=True)
    qemu.qemu_io(img, "write -P 0x11 0 100k", "write -z 192k 128k", "write -z -u 192k 64k")
    with Image.open(str(img), writable=True, data_file=str(data)) as image:
        image.write(192 * 1024 + 10, b"\xa9" * 70000)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0 192k 10", "read -P 0xa9 196618 70000", "read -P 0 266618 61062",
                 read_only=True)


def test_encrypted_image_with_a_data_file(tmp_path):
    """LUKS over a data file: the LUKS header stays in the image file, the data file holds
    ciphertext, the IV is the sector in the data file; QEMU reads what we write."""
    img, data = tmp_path / "enc.qcow2", tmp_path / "enc.data"
    qemu.create_luks(img, SIZE, 65536, f",data_file={data}")
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"
    run("qemu-io", *qemu.LUKS_SECRET, "--image-opts", "-c", "write -P 0x5c 0 100k", opts)
    key = tmp_path / "key"
    key.write_bytes(b"123456")
    with mounted(img, tmp_path / "raw", "-o", f"key-file={key},data-file={data}") as (view, _):
        with open(view, "r+b") as fh:
            assert fh.read(100 * 1024) == b"\x5c" * (100 * 1024)
            fh.seek(70000)
            fh.write(b"\x5d" * 100000)
    r = run("qemu-io", *qemu.LUKS_SECRET, "--image-opts", "-r", "-c", "read -P 0x5c 0 70000",
            "-c", "read -P 0x5d 70000 100000", "-c", "read -P 0 170000 1000", opts)
    assert "fail" not in r.stdout.lower(), r.stdout
    assert b"\x5d" * 64 not in data.read_bytes() and b"\x5d" * 64 not in img.read_bytes()
    with qemu.encrypted():
        qemu.assert_clean(img)


@pytest.mark.root
def test_block_device_data_file(tmp_path):
    """-o data-file may name a block device (LVM, a disk); a name in the image may not."""
    from helpers.ext4 import loop_device

    img, data = create(tmp_path, raw=True)
    qemu.qemu_io(img, "write -P 0x71 0 64k")
    with loop_device(data) as dev:
        with mounted(img, tmp_path / "raw", "-o", f"data-file={dev}") as (view, _):
            with open(view, "r+b") as fh:
                assert fh.read(65536) == b"\x71" * 65536
                fh.seek(MIB + 5)
                fh.write(b"\x72" * 70000)
        set_data_file_name(img, dev.encode())
        assert_refused([str(img), str(tmp_path / "mp"), "-o", "ro"], "not a regular file", img)
        set_data_file_name(img, str(data).encode())
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x71 0 64k", "read -P 0 1M 5", "read -P 0x72 1048581 70000",
                 read_only=True)
    assert data.read_bytes()[MIB + 5:MIB + 70005] == b"\x72" * 70000


def test_a_short_data_file_reads_zeros_past_its_end(tmp_path):
    img, data = create(tmp_path, raw=True)
    qemu.qemu_io(img, "write -P 0x41 0 8M")
    os.truncate(data, 4 * MIB + 4096)
    model = model_of(img, tmp_path)  # what QEMU reads: zeros past the end
    assert model[4 * MIB + 4096:] == bytes(SIZE - 4 * MIB - 4096)
    with Image.open(str(img)) as image:
        assert image.read(0, SIZE) == model
        assert image.read(4 * MIB + 4000, 200) == model[4 * MIB + 4000:4 * MIB + 4200]


def test_bitmaps_record_writes_into_a_data_file(tmp_path):
    """Raw storage with qcow2's metadata for incremental backup: the bitmap in the image
    file marks what a mount wrote into the data file (read by qemu-nbd + nbdinfo)."""
    img, data = create(tmp_path, raw=True)
    run("qemu-img", "bitmap", "--add", str(img), "b0")
    with mounted(img, tmp_path / "raw", "-o", f"data-file={data}") as (view, _):
        with open(view, "r+b") as fh:
            fh.seek(3 * MIB + 100)
            fh.write(b"\x99" * 1000)
    assert qemu.dirty_ranges(img, "b0") == [(3 * MIB, 3 * MIB + 65536)]
    qemu.assert_clean(img)


def test_metadata_commands_never_open_the_data_file(tmp_path):
    """info, check and map read no guest data: a missing (or hostile) data file does not
    matter to them; -o data-file on an image without one is refused."""
    img, data = create(tmp_path, raw=True)
    qemu.qemu_io(img, "write -P 0x51 0 64k")
    data.unlink()
    for args in (["info"], ["check"], ["map"], ["check", "--repair", "all"]):
        r = run_cli(*args, str(img))
        assert r.returncode == 0, (args, r.stderr)
    plain = qemu.create(tmp_path / "plain.qcow2", SIZE)
    assert_refused([str(plain), str(tmp_path / "mp"), "-o", f"data-file={tmp_path / 'x'}"],
                   "has no external data file", plain, tmp_path / "mp")


def test_a_compressed_cluster_with_a_data_file_is_corruption(tmp_path):
    """QEMU never writes one (compression needs data in the image file): check reports it
    as qemu-img check does, and a read of it fails while the rest is served."""
    img, data = create(tmp_path, raw=False)
    qemu.qemu_io(img, "write -P 0x21 0 256k")
    RawImage(img).set_l2_entry(2, (1 << 62) | 0x30000)  # guest cluster 2: compressed
    theirs = qemu.check(img)
    r = run_cli("check", "--output=json", str(img))
    ours = json.loads(r.stdout)
    assert r.returncode == theirs["rc"] == 2
    for key in ("corruptions", "allocated-clusters", "fragmented-clusters", "image-end-offset"):
        assert ours.get(key) == theirs.get(key), key
    human = run_cli("check", str(img))
    assert "ERROR compressed cluster 2 with data file" in human.stdout + human.stderr
    with Image.open(str(img)) as image:
        assert image.read(0, 65536) == b"\x21" * 65536
        with pytest.raises(Exception, match="compressed cluster"):
            image.read(2 * 65536, 4096)
        assert image.read(3 * 65536, 4096) == b"\x21" * 4096
