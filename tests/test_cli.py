"""CLI failure paths: one line, non-zero exit, nothing mounted, image unchanged."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from helpers import qemu
from helpers.cli import assert_refused
from helpers.procs import run_cli


def patch(path: Path, offset: int, fmt: str, *values) -> Path:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, *values))
    return path


@pytest.fixture
def image(tmp_path):
    return qemu.create(tmp_path / "disk.qcow2", 16 << 20)


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "-o" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("qcowfuse ")


def test_no_such_image(tmp_path):
    assert_refused([str(tmp_path / "nope.qcow2"), str(tmp_path / "mp")], "no such file",
                   mp=tmp_path / "mp")
    assert not (tmp_path / "mp").exists()


def test_not_qcow2(tmp_path):
    f = tmp_path / "plain.img"
    f.write_bytes(b"\0" * 65536)
    assert_refused([str(f), str(tmp_path / "mp")], "not a qcow2 image", f, tmp_path / "mp")


def test_truncated_image(tmp_path, image):
    data = image.read_bytes()
    t = tmp_path / "short.qcow2"
    t.write_bytes(data[:50])
    assert_refused([str(t), str(tmp_path / "mp")], "truncated", t)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.qcow2"
    f.write_bytes(b"")
    assert_refused([str(f), str(tmp_path / "mp")], "not a qcow2 image", f)


@pytest.mark.parametrize("offset,fmt,value,fragment", [
    (4, ">I", 4, "unsupported qcow2 version 4"),
    (20, ">I", 30, "invalid cluster_bits"),
    (20, ">I", 8, "invalid cluster_bits"),
    (96, ">I", 7, "invalid refcount_order"),
    (72, ">Q", 1 << 20, "unknown incompatible features"),
    (72, ">Q", 1 << 2, "external data file but does not name it"),
    (32, ">I", 1, "legacy AES encryption of qcow2 (crypt_method 1) is not supported"),
    (32, ">I", 2, "is LUKS-encrypted: give its passphrase with -o key-file=PATH"),
    (40, ">Q", 1 << 40, "beyond the end of the file"),
    (48, ">Q", 1 << 40, "beyond the end of the file"),
    (40, ">Q", 12345, "not cluster aligned"),
    (36, ">I", 0x7FFFFFFF, "L1 table too large"),
    (36, ">I", 0, "L1 table too small"),
    (24, ">Q", 1 << 50, "L1 table too small"),
    (40, ">Q", 0x10000, "overlaps"),
    (8, ">QI", (0x100, 2000), "backing file name too long"),
    (100, ">I", 50, "invalid header_length"),
    (100, ">I", 108, "invalid header_length"),  # not a multiple of 8
    (24, ">Q", 1 << 57, f"virtual size {1 << 57} is too large"),
    (56, ">I", 0, "no refcount table"),
    (56, ">I", 200, "refcount table too large"),  # 12.5 MiB > QEMU's 8 MiB
])
def test_bad_headers(tmp_path, image, offset, fmt, value, fragment):
    values = value if isinstance(value, tuple) else (value,)
    patch(image, offset, fmt, *values)
    assert_refused([str(image), str(tmp_path / "mp")], fragment, image, tmp_path / "mp")


def test_bad_backing_names(tmp_path, image):
    """A backing name must lie inside cluster 0 and hold no NUL byte."""
    patch(image, 8, ">QI", 65000, 1000)
    assert_refused([str(image), str(tmp_path / "mp")], "outside the first cluster", image)
    patch(image, 8, ">QI", 4000, 8)  # zeros there
    assert_refused([str(image), str(tmp_path / "mp")], "NUL byte", image)


def test_unknown_compression_type(tmp_path, image):
    assert struct.unpack_from(">I", image.read_bytes(), 100)[0] >= 105  # has the field
    patch(image, 104, ">B", 5)
    assert_refused([str(image), str(tmp_path / "mp")], "unknown compression type 5", image)


def test_unknown_incompatible_bit_named_from_feature_table(tmp_path, image):
    """QEMU's feature table (extension 0x6803f857, 48-byte entries) names bits; an
    unknown incompatible bit is refused by that name."""
    data = image.read_bytes()
    assert struct.unpack_from(">I", data, 112)[0] == 0x6803f857
    assert data[120:122] == b"\0\0"  # first entry: incompatible bit 0
    patch(image, 121, ">B", 20)
    patch(image, 122, "46s", b"frobnicate")
    patch(image, 72, ">Q", 1 << 20)
    assert_refused([str(image), str(tmp_path / "mp")], "unknown incompatible features: frobnicate", image)


def test_file_shorter_than_a_cluster(tmp_path, image):
    data = image.read_bytes()
    short = tmp_path / "short.qcow2"
    short.write_bytes(data[:60000])  # the header says 64 KiB clusters
    assert_refused([str(short), str(tmp_path / "mp")], "shorter than one cluster", short)


def test_extended_l2_with_small_clusters(tmp_path):
    image = qemu.create(tmp_path / "small.qcow2", 16 << 20, cluster_size=4096)
    patch(image, 72, ">Q", 1 << 4)
    assert_refused([str(image), str(tmp_path / "mp")], "extended L2 entries need clusters of at least",
                   image, tmp_path / "mp")


def test_header_extension_overrunning_the_cluster(tmp_path, image):
    # an extension right after the header that claims to run past cluster 0
    patch(image, 112, ">II", 0x12345678, 70000)  # header_length is 112 for QEMU v3 images
    assert_refused([str(image), str(tmp_path / "mp")], "overruns the first cluster", image)


@pytest.mark.root
def test_corrupt_bit_refuses_rw_allows_ro(tmp_path, image, mount):
    patch(image, 72, ">Q", 1 << 1)
    assert_refused([str(image), str(tmp_path / "mp")], "corrupt", image)
    with mount(image, tmp_path / "mp", "-o", "ro") as (raw, _):
        assert raw.stat().st_size == 16 << 20


def test_bad_mountpoint(tmp_path, image):
    assert_refused([str(image), str(tmp_path / "no" / "such" / "mp")], "parent does not exist", image)
    assert_refused([str(image), "/dev/null"], "not a regular file or directory", image)
    assert_refused([str(image), str(image)], "image itself", image)


@pytest.mark.root
def test_already_mounted(tmp_path, image, mount):
    other = qemu.create(tmp_path / "other.qcow2", 1 << 20)
    mp = tmp_path / "mp"
    with mount(image, mp):
        assert_refused([str(other), str(mp)], "already mounted", other)


def test_unknown_option(tmp_path, image):
    assert_refused(["-o", "ro,frobnicate", str(image), str(tmp_path / "mp")], "unknown mount option", image)


@pytest.mark.root
def test_generic_mount_options_are_ignored(tmp_path, image, mount):
    with mount(image, tmp_path / "mp", "-o", "defaults,noatime,nodev,nosuid,ro") as (raw, _):
        assert raw.stat().st_size == 16 << 20


@pytest.mark.root
def test_cache_size_options(tmp_path, image, mount):
    with mount(image, tmp_path / "mp", "-o", "l2-cache-size=1M,refcount-cache-size=256k") as (raw, _):
        raw.write_bytes(b"\x17" * (16 << 20))
    qemu.assert_clean(image)
    assert_refused(["-o", "l2-cache-size=lots", str(image), str(tmp_path / "mp")], "not a size", image)


@pytest.mark.parametrize("cmd", [["info", "--output=json"], ["map", "--output=json"], ["check"]])
def test_output_that_cannot_be_written(tmp_path, cmd):
    """stdout on a full disk (/dev/full) or a pipe its reader closed: one line, or
    nothing for the closed pipe, a non-zero exit, never a traceback."""
    import subprocess

    from helpers.cli import assert_one_line_error
    from helpers.procs import QCOWFUSE

    img = qemu.create(tmp_path / "o.qcow2", 64 << 20, 512)
    qemu.qemu_io(img, *[f"write -P 1 {i}k 512" for i in range(0, 2000, 2)])  # a 200 KiB map
    with open("/dev/full", "w") as full:
        r = subprocess.run(QCOWFUSE + cmd + [str(img)], stdout=full, stderr=subprocess.PIPE,
                           text=True, env={"PATH": "/usr/bin:/bin"})
    assert_one_line_error(r.returncode, r.stderr, "No space left on device")
    p = subprocess.Popen(QCOWFUSE + cmd + [str(img)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    code = p.wait()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if cmd[0] == "map":  # more than a pipe holds: the write failed
        assert code != 0 and err == ""
