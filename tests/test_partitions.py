"""Partition files: a directory mount shows one raw file per guest partition.

The table reader is judged by sfdisk (util-linux) on many layouts and on damaged
tables; the files by sfdisk, e2fsck and QEMU's own reading of the image."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from helpers import qemu
from helpers.ext4 import sh
from helpers.procs import mounted
from qcowfuse.partitions import read_partitions

MiB = 1 << 20
SECTOR = 512


def sfdisk(path: Path, script: str) -> None:
    subprocess.run(["sfdisk", "-q", str(path)], input=script.encode(), check=True,
                   capture_output=True)


def sfdisk_json(path: Path) -> list[tuple[int, int, int]]:
    """(number, start, length) in bytes, as sfdisk reads the table."""
    out = json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                    capture_output=True).stdout)["partitiontable"]
    return [(int(p["node"][len(str(path)):]), p["start"] * SECTOR, p["size"] * SECTOR)
            for p in out["partitions"]]


def ours(path: Path) -> list[tuple[int, int, int]]:
    data = path.read_bytes()
    return [(p.number, p.start, p.length)
            for p in read_partitions(lambda o, n: data[o:o + n], len(data))]


def blank(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


LAYOUTS = {
    "gpt-one": "label: gpt\nsize=8M\n",
    "gpt-two": "label: gpt\nsize=8M, type=L, name=root\nsize=16M\n",
    "gpt-ten": "label: gpt\n" + "size=2M\n" * 10,
    "gpt-gap": "label: gpt\nstart=4096, size=2M\nstart=40960, size=4M\n",
    "gpt-sparse-numbers": "label: gpt\n3: start=4096, size=2M\n7: start=16384, size=2M\n",
    "gpt-to-the-end": "label: gpt\nsize=8M\nsize=+\n",
    "mbr-one": "label: dos\nsize=8M, type=83\n",
    "mbr-four": "label: dos\nsize=4M\nsize=4M\nsize=4M\nsize=4M\n",
    "mbr-slot-3": "label: dos\n3: start=2048, size=4M\n",
    "mbr-unaligned": "label: dos\nstart=63, size=1000\nstart=2000, size=3000\n",
}
EXTENDED = "label: dos\nsize=8M, type=83\ntype=5\nsize=10M, type=83\nsize=10M, type=83\n"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_tables_read_as_sfdisk_reads_them(tmp_path, name):
    disk = blank(tmp_path / "disk.raw")
    sfdisk(disk, LAYOUTS[name])
    assert ours(disk) == sfdisk_json(disk)


def test_extended_partition_and_logicals_numbered_as_the_kernel_does(tmp_path):
    """p1, the container p2 as the kernel shows it (its first 1 KiB, lsblk's "1K"),
    logicals p5 and p6 at sfdisk's places."""
    disk = blank(tmp_path / "disk.raw")
    sfdisk(disk, EXTENDED)
    theirs = sfdisk_json(disk)
    assert [n for n, _, _ in theirs] == [1, 2, 5, 6]
    expect = [t if t[0] != 2 else (2, t[1], 1024) for t in theirs]
    assert ours(disk) == expect


def test_no_table_no_partitions(tmp_path):
    disk = blank(tmp_path / "disk.raw", 16 * MiB)
    assert ours(disk) == []
    sh("mkfs.ext4", "-q", "-F", str(disk))  # a filesystem on the whole disk
    assert ours(disk) == []
    data = bytearray(disk.read_bytes())
    data[510:512] = b"\x55\xaa"  # a boot sector's signature over entries that are not
    data[446:462] = bytes([0x33]) + bytes(15)
    disk.write_bytes(data)
    assert ours(disk) == []


# -- damaged and hostile tables ------------------------------------------------------

def gpt_fix_crcs(data: bytearray, header_lba: int) -> None:
    """Recompute a GPT header's entry-array and header CRC32s after a change."""
    h = header_lba * SECTOR
    size, = struct.unpack_from("<I", data, h + 12)
    entries_lba, count, entry_size = struct.unpack_from("<QII", data, h + 72)
    entries = data[entries_lba * SECTOR:entries_lba * SECTOR + count * entry_size]
    struct.pack_into("<I", data, h + 88, zlib.crc32(entries))
    struct.pack_into("<I", data, h + 16, 0)
    struct.pack_into("<I", data, h + 16, zlib.crc32(bytes(data[h:h + size])))


def gpt_disk(tmp_path: Path) -> tuple[Path, bytearray, list[tuple[int, int, int]]]:
    disk = blank(tmp_path / "disk.raw")
    sfdisk(disk, LAYOUTS["gpt-two"])
    return disk, bytearray(disk.read_bytes()), sfdisk_json(disk)


def test_damaged_primary_gpt_header_falls_back_to_the_backup(tmp_path):
    disk, data, expect = gpt_disk(tmp_path)
    # a primary header that says "one entry" (with that entry's CRC) but whose own CRC
    # was not updated: the backup's two partitions count, not the damaged header's one
    struct.pack_into("<I", data, SECTOR + 80, 1)
    struct.pack_into("<I", data, SECTOR + 88, zlib.crc32(bytes(data[2 * SECTOR:2 * SECTOR + 128])))
    disk.write_bytes(data)
    assert ours(disk) == expect


def test_damaged_primary_gpt_entries_fall_back_to_the_backup(tmp_path):
    disk, data, expect = gpt_disk(tmp_path)
    data[2 * SECTOR + 40] ^= 0xFF  # inside entry 1: the array's CRC no longer matches
    disk.write_bytes(data)
    assert ours(disk) == expect


def test_both_gpts_damaged_no_partitions(tmp_path):
    disk, data, _ = gpt_disk(tmp_path)
    data[SECTOR + 40] ^= 0xFF
    data[len(data) - SECTOR + 40] ^= 0xFF
    disk.write_bytes(data)
    assert ours(disk) == []


def test_entries_outside_the_disk_or_overlapping_are_left_out(tmp_path):
    disk, data, expect = gpt_disk(tmp_path)
    entries = 2 * SECTOR
    # entry 2 over entry 1's range; a third entry past the end of the disk
    first1, _ = struct.unpack_from("<QQ", data, entries + 32)
    struct.pack_into("<QQ", data, entries + 128 + 32, first1 + 8, first1 + 100)
    data[entries + 256:entries + 256 + 16] = data[entries:entries + 16]  # a type GUID: in use
    struct.pack_into("<QQ", data, entries + 256 + 32, 100000, 10 ** 9)
    gpt_fix_crcs(data, 1)
    disk.write_bytes(data)
    assert ours(disk) == expect[:1]


def test_a_loop_in_the_ebr_chain_ends(tmp_path, caplog):
    disk = blank(tmp_path / "disk.raw")
    sfdisk(disk, EXTENDED)
    # what sfdisk reads of the intact chain (the extended partition shown as 1 KiB)
    expect = [t if t[0] != 2 else (2, t[1], 1024) for t in sfdisk_json(disk)]
    data = bytearray(disk.read_bytes())
    ext_lba = struct.unpack_from("<I", data, 446 + 16 + 8)[0]
    second = ext_lba + struct.unpack_from("<I", data, ext_lba * SECTOR + 446 + 16 + 8)[0]
    struct.pack_into("<I", data, second * SECTOR + 446 + 16 + 8, second - ext_lba)  # to itself
    data[second * SECTOR + 446 + 16 + 4] = 0x05
    disk.write_bytes(data)
    assert ours(disk) == expect
    assert "loops" in caplog.text  # found as a loop, not run to the link limit


def test_mbr_entry_past_the_end_is_left_out(tmp_path):
    disk = blank(tmp_path / "disk.raw", 16 * MiB)
    sfdisk(disk, "label: dos\nsize=4M\nsize=4M\n")
    data = bytearray(disk.read_bytes())
    struct.pack_into("<I", data, 446 + 16 + 12, 10 ** 6)  # partition 2: half a GiB long
    disk.write_bytes(data)
    assert [n for n, _, _ in ours(disk)] == [1]


# -- through a mount -------------------------------------------------------------------

pytestmark_root = pytest.mark.root


@pytest.fixture
def disk_dir(tmp_path) -> tuple[Path, Path]:
    """A new 64 MiB image and an empty directory to mount it on."""
    d = tmp_path / "d"
    d.mkdir()
    return qemu.create(tmp_path / "disk.qcow2", 64 * MiB), d


def partition_files(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(d.iterdir())}


@pytestmark_root
def test_gpt_partitions_as_files_ext4_judged_by_qemu(tmp_path, disk_dir):
    img, d = disk_dir
    with mounted(img, d) as (raw, _):
        assert partition_files(d) == {"disk.raw": 64 * MiB}
        sfdisk(raw, LAYOUTS["gpt-two"])  # sfdisk closes the disk file: the table is read again
        table = sfdisk_json(raw)
        assert partition_files(d) == {"disk.raw": 64 * MiB, "disk-p1.raw": table[0][2],
                                      "disk-p2.raw": table[1][2]}
        p1 = d / "disk-p1.raw"
        sh("mkfs.ext4", "-q", "-F", str(p1))
        (tmp_path / "hello").write_bytes(b"hello from p1\n" * 100)
        sh("debugfs", "-w", "-R", f"write {tmp_path / 'hello'} hello", str(p1))
        fsck = subprocess.run(["e2fsck", "-fn", str(p1)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    qemu.assert_clean(img)
    converted = qemu.convert_to_raw(img, tmp_path / "converted.raw")
    start, length = table[0][1], table[0][2]
    dev = sh("losetup", "-f", "--show", "-r", "-o", str(start), "--sizelimit", str(length),
             str(converted))
    try:
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert sh("debugfs", "-R", "cat hello", dev) == ("hello from p1\n" * 100).strip()
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytestmark_root
def test_a_write_past_a_partition_never_reaches_its_neighbour(tmp_path, disk_dir):
    img, d = disk_dir
    with mounted(img, d) as (raw, _):
        sfdisk(raw, "label: gpt\nsize=8M\nsize=8M\n")
        table = sfdisk_json(raw)
        p1 = d / "disk-p1.raw"
        length = p1.stat().st_size
        fd = os.open(p1, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"\xee" * SECTOR, length - SECTOR) == SECTOR  # the last block
            assert os.pwrite(fd, b"\xdd" * 1024, length - SECTOR) == SECTOR  # short, up to the end
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"\xff", length)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.path.getsize(p1) == length
    converted = qemu.convert_to_raw(img, tmp_path / "converted.raw").read_bytes()
    end1 = table[0][1] + table[0][2]
    assert converted[end1 - SECTOR:end1] == b"\xdd" * SECTOR
    start2 = table[1][1]
    assert converted[end1:start2 + SECTOR] == bytes(start2 + SECTOR - end1)  # nothing beyond
    qemu.assert_clean(img)


@pytestmark_root
def test_mbr_with_logicals_through_a_mount(tmp_path, disk_dir):
    img, d = disk_dir
    with mounted(img, d) as (raw, _):
        sfdisk(raw, EXTENDED)
        table = {n: length for n, _, length in sfdisk_json(raw)}
        assert partition_files(d) == {"disk.raw": 64 * MiB, "disk-p1.raw": table[1],
                                      "disk-p2.raw": 1024, "disk-p5.raw": table[5],
                                      "disk-p6.raw": table[6]}
        (d / "disk-p6.raw").write_bytes(b"\x66" * table[6])
    converted = qemu.convert_to_raw(img, tmp_path / "c.raw")
    (_, start6, length6), = [t for t in sfdisk_json(converted) if t[0] == 6]
    with open(converted, "rb") as fh:
        fh.seek(start6)
        assert fh.read(length6) == b"\x66" * length6


@pytestmark_root
def test_table_changed_while_mounted_and_an_open_partition_keeps_its_window(tmp_path, disk_dir):
    img, d = disk_dir
    with mounted(img, d) as (raw, _):
        sfdisk(raw, "label: gpt\nsize=8M\n")
        assert sorted(partition_files(d)) == ["disk-p1.raw", "disk.raw"]
        with open(d / "disk-p1.raw", "rb") as held:
            sfdisk(raw, "label: gpt\nsize=16M\nsize=4M\n")  # p1 grows, p2 appears
            assert os.fstat(held.fileno()).st_size == 8 * MiB
            assert sorted(partition_files(d)) == ["disk-p1.raw", "disk.raw"]  # not yet
            held.seek(8 * MiB)
            assert held.read(1) == b""  # still the old window
        assert partition_files(d) == {"disk.raw": 64 * MiB, "disk-p1.raw": 16 * MiB,
                                      "disk-p2.raw": 4 * MiB}


@pytestmark_root
def test_a_table_written_and_closed_without_fsync_is_read_again(tmp_path, disk_dir):
    """As a partitioner that closes the device without fsync: close() re-reads."""
    img, d = disk_dir
    table = blank(tmp_path / "t.raw")
    sfdisk(table, LAYOUTS["gpt-two"])
    data = table.read_bytes()
    with mounted(img, d) as (raw, _):
        with open(raw, "r+b") as fh:
            fh.write(data[:MiB])
            fh.seek(len(data) - MiB)
            fh.write(data[-MiB:])
        assert sorted(os.listdir(d)) == ["disk-p1.raw", "disk-p2.raw", "disk.raw"]


@pytestmark_root
def test_partitions_off_and_file_mounts_show_only_the_disk(tmp_path):
    img = qemu.create(tmp_path / "disk.qcow2", 64 * MiB)
    sfdisk_target = tmp_path / "t.raw"
    blank(sfdisk_target)
    sfdisk(sfdisk_target, LAYOUTS["gpt-two"])
    qemu.run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(sfdisk_target), str(img))
    d = tmp_path / "d"
    d.mkdir()
    with mounted(img, d, "-o", "partitions=off"):
        assert sorted(os.listdir(d)) == ["disk.raw"]
    with mounted(img, d):
        assert sorted(os.listdir(d)) == ["disk-p1.raw", "disk-p2.raw", "disk.raw"]
    with mounted(img, tmp_path / "file.raw") as (raw, _):
        assert raw.is_file() and raw.stat().st_size == 64 * MiB
