"""`qcowfuse check` / `info` against `qemu-img check` / `info`, and healing vmd's damage."""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from helpers import qemu
from helpers.checking import assert_same_counts, qcowfuse_check, vmd_damaged
from helpers.procs import run_cli
from helpers.rawqcow2 import RefcountView

MiB = 1 << 20


def qemu_error_clusters(img: Path) -> set[int]:
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    return {int(n) for n in re.findall(r"ERROR cluster (\d+) refcount=0 reference=1", r.stdout + r.stderr)}


def verify_patterns(path: Path, data_mib: int = 40) -> None:
    qemu.qemu_io(path, *[f"read -P {i % 200 + 1} {i * MiB} 1M" for i in range(data_mib)], read_only=True)


def test_vmd_damage_found_like_qemu_and_repaired(tmp_path):
    img = tmp_path / "vmd.qcow2"
    damaged = vmd_damaged(img)
    assert qemu_error_clusters(img) == set(damaged)
    r = run_cli("check", str(img))
    assert r.returncode == 2
    ours = {int(n) for n in re.findall(r"ERROR cluster (\d+) refcount=0 reference=1", r.stdout)}
    assert ours == set(damaged)
    assert_same_counts(img)
    rc, report = qcowfuse_check(img, "--repair", "all")
    assert rc == 0 and report.get("corruptions-fixed", 0) == len(damaged)
    qemu.assert_clean(img)
    verify_patterns(img)


@pytest.mark.root
def test_rw_mount_heals_vmd_damage_before_allocating(tmp_path, mount):
    img = tmp_path / "vmd.qcow2"
    vmd_damaged(img)
    with mount(img, tmp_path / "raw") as (raw, _):
        with open(raw, "r+b") as fh:  # new data: allocations must not land on the blocks
            fh.seek(40 * MiB)
            fh.write(b"\xab" * (20 * MiB))
    qemu.assert_clean(img)
    verify_patterns(img)
    qemu.qemu_io(img, "read -P 0xab 40M 20M", read_only=True)


def test_leaks_repaired(tmp_path):
    img = qemu.create(tmp_path / "leaky.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x12 0 4M")
    os.truncate(img, 8 * MiB)  # a killed writer leaves counted clusters that nothing uses
    view = RefcountView(img)
    for c in (100, 101):
        view.set_refcount(c, 1)
    assert qemu.check(img)["rc"] == 3
    ours = assert_same_counts(img)
    assert ours["leaks"] == 2
    rc, report = qcowfuse_check(img, "--repair", "leaks")
    assert rc == 0 and report.get("leaks-fixed") == 2
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x12 0 4M", read_only=True)


@pytest.mark.parametrize("cs,rb,compat", [(512, 1, "1.1"), (4096, 64, "1.1"), (65536, 16, "0.10"),
                                          (2 << 20, 8, "1.1")])
def test_counts_agree_with_qemu_on_clean_images(tmp_path, cs, rb, compat):
    img = qemu.create(tmp_path / "t.qcow2", 64 * MiB, cs, rb, compat)
    qemu.qemu_io(img, "write -P 1 0 3M", "write -P 2 10M 1M", "write -P 3 40M 5M")
    if rb >= 2:
        qemu.run("qemu-img", "snapshot", "-c", "s", str(img))
        qemu.qemu_io(img, "write -P 4 1M 1M")
    assert assert_same_counts(img).get("corruptions", 0) == 0


def test_counts_agree_on_compressed_image(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(bytes([i]) * 65536 for i in range(200)))
    img = tmp_path / "c.qcow2"
    qemu.run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img))
    assert assert_same_counts(img)["compressed-clusters"] > 100
    # compressed data spanning many sectors and two host clusters: each counted
    rnd = random.Random(7)
    src.write_bytes(b"".join(rnd.randbytes(20000) + bytes([i]) * 45536 for i in range(40)))
    img2 = tmp_path / "c2.qcow2"
    qemu.run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img2))
    assert assert_same_counts(img2)["compressed-clusters"] == 40


def test_copied_flag_errors_repaired(tmp_path):
    img = qemu.create(tmp_path / "t.qcow2", 8 * MiB)
    qemu.qemu_io(img, "write -P 5 0 1M")
    data = bytearray(img.read_bytes())
    l1_off = int.from_bytes(data[40:48], "big")
    l2_off = int.from_bytes(data[l1_off:l1_off + 8], "big") & 0x00FFFFFFFFFFFE00
    data[l2_off] &= 0x7F  # drop COPIED from the first data cluster's L2 entry
    img.write_bytes(data)
    assert qemu.check(img)["rc"] == 2
    rc, report = qcowfuse_check(img)
    assert rc == 2 and report["corruptions"] == 1
    rc, report = qcowfuse_check(img, "-r", "all")
    assert rc == 0 and report["corruptions-fixed"] == 1
    qemu.assert_clean(img)


def test_info_matches_qemu(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", 8 * MiB)
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", "base.qcow2",
             "-F", "qcow2", str(top))
    qemu.qemu_io(top, "write -P 1 0 1M")
    qemu.run("qemu-img", "snapshot", "-c", "snap1", str(top))
    r = run_cli("info", "--output=json", str(top))
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    theirs = json.loads(qemu.run("qemu-img", "info", "--output=json", str(top)).stdout)
    assert ours["virtual-size"] == theirs["virtual-size"]
    assert ours["cluster-size"] == theirs["cluster-size"]
    assert ours["backing-file"] == theirs["backing-filename"] == "base.qcow2"
    assert ours["backing-chain"][0]["filename"] == str(base)
    assert [s["name"] for s in ours["snapshots"]] == [s["name"] for s in theirs["snapshots"]]
    assert "lazy refcounts" in ours["features"]["compatible"]
    assert not ours["dirty"] and not ours["corrupt"]
    # as qemu-img info, info reads no L2 table unless the guest allocation is asked for
    assert "allocated-bytes" not in ours
    r = run_cli("info", "--allocated", "--output=json", str(top))
    assert r.returncode == 0 and json.loads(r.stdout)["allocated-bytes"] == 1 * MiB
    human = run_cli("info", str(top))
    assert human.returncode == 0 and "backing file 1:" in human.stdout and "allocated:" not in human.stdout
    human = run_cli("info", "--allocated", str(top))
    assert human.returncode == 0 and "allocated: 1 MiB" in human.stdout


def test_check_of_missing_or_bad_image_exits_1(tmp_path):
    r = run_cli("check", str(tmp_path / "nope.qcow2"))
    assert r.returncode == 1 and r.stderr.startswith("qcowfuse: ")
    f = tmp_path / "junk"
    f.write_bytes(b"junk" * 100)
    r = run_cli("check", str(f))
    assert r.returncode == 1 and "not a qcow2 image" in r.stderr


def test_info_json_keys_against_qemu(tmp_path):
    """Every key README lists for `info --output=json`, each against qemu-img info (or
    the file itself where QEMU has no such key)."""
    base = qemu.create(tmp_path / "base.qcow2", 8 * MiB)
    top = tmp_path / "top.qcow2"
    qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
             "lazy_refcounts=on,cluster_size=4096,refcount_bits=8", "-b", "base.qcow2", "-F", "qcow2",
             str(top))
    qemu.qemu_io(top, "write -P 1 0 1M", "write -c -P 2 2M 64k")
    qemu.run("qemu-img", "snapshot", "-c", "snap1", str(top))
    with open(top, "r+b") as fh:  # the corrupt bit (incompatible bit 1)
        fh.seek(79)
        fh.write(bytes([2]))
    r = run_cli("info", "--allocated", "--output=json", str(top))
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    theirs = json.loads(qemu.run("qemu-img", "info", "-U", "--output=json", str(top)).stdout)
    spec = theirs["format-specific"]["data"]
    st = os.stat(top)
    assert ours["filename"] == str(top) and ours["format"] == "qcow2"
    assert (ours["version"], ours["compat"]) == (3, spec["compat"])
    assert ours["virtual-size"] == theirs["virtual-size"]
    assert ours["cluster-size"] == theirs["cluster-size"] == 4096
    assert ours["refcount-bits"] == spec["refcount-bits"] == 8
    assert ours["compression-type"] == spec["compression-type"]
    assert ours["host-file-size"] == st.st_size
    assert ours["disk-usage"] == st.st_blocks * 512 == theirs["actual-size"]
    assert ours["allocated-bytes"] == qemu.check(top)["allocated-clusters"] * 4096
    assert ours["backing-file"] == theirs["backing-filename"]
    assert ours["backing-format"] == theirs["backing-filename-format"]
    assert ours["backing-chain"] == [{"filename": str(base), "format": "qcow2", "virtual-size": 8 * MiB}]
    (snap,) = ours["snapshots"]
    (qsnap,) = theirs["snapshots"]
    assert (snap["id"], snap["name"], snap["vm-state-size"], snap["vm-clock-nsec"]) == \
        (qsnap["id"], qsnap["name"], qsnap["vm-state-size"], qsnap["vm-clock-nsec"])
    assert snap["disk-size"] == 8 * MiB
    assert snap["date"].startswith(
        datetime.datetime.fromtimestamp(qsnap["date-sec"], datetime.timezone.utc)
        .isoformat()[:19])
    assert ours["features"] == {"incompatible": ["corrupt bit"], "compatible": ["lazy refcounts"],
                                "autoclear": []}
    assert ours["dirty"] is theirs["dirty-flag"] is False
    assert ours["corrupt"] is spec["corrupt"] is True


def test_check_text_output_like_qemu(tmp_path):
    """The human output: the same per-cluster lines and verdict lines as qemu-img check."""
    def both(img: Path) -> tuple[list[str], list[str], int]:
        ours = run_cli("check", str(img))
        theirs = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert ours.returncode == theirs.returncode
        return ours.stdout.splitlines(), (theirs.stdout + theirs.stderr).splitlines(), ours.returncode

    clean = qemu.create(tmp_path / "clean.qcow2", 16 * MiB)
    qemu.qemu_io(clean, "write -P 1 0 3M")
    ours, theirs, rc = both(clean)
    assert rc == 0 and "No errors were found on the image." in ours
    stats = [l for l in theirs if "allocated" in l or l.startswith("Image end offset")]
    assert stats and all(l in ours for l in stats), (ours, theirs)

    leaky = qemu.create(tmp_path / "leaky.qcow2", 16 * MiB)
    qemu.qemu_io(leaky, "write -P 0x12 0 4M")
    os.truncate(leaky, 8 * MiB)
    for c in (100, 101):
        RefcountView(leaky).set_refcount(c, 1)
    ours, theirs, rc = both(leaky)
    assert rc == 3
    leaks = [l for l in theirs if l.startswith("Leaked cluster")]
    assert leaks and [l for l in ours if l.startswith("Leaked cluster")] == leaks
    assert "2 leaked clusters were found on the image." in ours

    vmd = tmp_path / "vmd.qcow2"
    vmd_damaged(vmd)
    ours, theirs, rc = both(vmd)
    assert rc == 2
    errors = sorted(l for l in theirs if l.startswith("ERROR cluster"))
    assert errors and sorted(l for l in ours if l.startswith("ERROR cluster")) == errors
    assert f"{len(errors)} errors were found on the image." in ours


@pytest.mark.root
def test_repair_all_clears_the_corrupt_bit(tmp_path, mount):
    """An image marked corrupt (by a writer that met bad metadata) whose refcounts are
    fine: `check --repair all` clears the bit, and the image mounts read-write again."""
    img = qemu.create(tmp_path / "c.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 7 0 1M")
    with open(img, "r+b") as fh:
        fh.seek(79)
        fh.write(bytes([2]))
    r = run_cli(str(img), str(tmp_path / "raw"))
    assert r.returncode != 0 and "marked corrupt" in r.stderr
    rc, report = qcowfuse_check(img, "--repair", "all")
    assert rc == 0
    assert not img.read_bytes()[79] & 2, "the corrupt bit is still set"
    qemu.assert_clean(img)
    with mount(img, tmp_path / "raw") as (raw, _):
        with open(raw, "r+b") as fh:
            fh.write(b"\x08" * 4096)
    qemu.qemu_io(img, "read -P 8 0 4k", "read -P 7 4k 1020k", read_only=True)


def test_check_reports_unaligned_tables_like_qemu(tmp_path):
    img = qemu.create(tmp_path / "u.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 1 0 1M")
    data = bytearray(img.read_bytes())
    l1_off = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1_off:l1_off + 8], "big")
    data[l1_off:l1_off + 8] = (l2 + 512).to_bytes(8, "big")  # L2 table off its cluster
    img.write_bytes(data)
    r = run_cli("check", str(img))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Table is not cluster aligned; L1 entry corrupted" in r.stdout
    theirs = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert theirs.returncode == 2 and "Table is not cluster aligned" in theirs.stdout + theirs.stderr


@pytest.mark.root
def test_info_takes_no_locks(tmp_path, mount):
    """info works on an image a read-write mount holds locked (like qemu-img info -U)."""
    img = qemu.create(tmp_path / "l.qcow2", 4 * MiB)
    with mount(img, tmp_path / "raw"):
        assert qemu.run("qemu-io", "-c", "read 0 4k", str(img), check=False).returncode != 0
        r = run_cli("info", "--output=json", str(img))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["virtual-size"] == 4 * MiB


def test_repair_leaks_refuses_when_only_a_rebuild_can_fix(tmp_path):
    """As `qemu-img check -r leaks`: an under-count needs the refcount structures rebuilt,
    so nothing is written (no leak lowered, no COPIED flag changed), exit 1."""
    img = qemu.create(tmp_path / "under.qcow2", 16 * MiB)
    qemu.qemu_io(img, "write -P 0x12 0 4M")
    os.truncate(img, 8 * MiB)
    view = RefcountView(img)
    for c in (100, 101):
        view.set_refcount(c, 1)
    view.set_refcount(10, 0)  # a data cluster counted too low
    before = img.read_bytes()
    r = run_cli("check", "--repair", "leaks", str(img))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1 and "need to rebuild refcount structures" in r.stdout
    assert img.read_bytes() == before
    info = qemu.check(img)
    assert info.get("leaks") == 2 and info.get("corruptions") == 2  # the count and its COPIED flag


def test_library_check_of_an_image_with_unflushed_writes(tmp_path):
    """Checker on an Image opened read-write, after writes not yet flushed (new clusters
    counted in memory, their L2 entries not on disk) and with a real leak on disk: the
    walk must not call the new clusters leaks, and repairing the leak must not lower
    them.  Judged by qemu-img check and qemu-io read -P after close."""
    from qcowfuse import Image
    from qcowfuse.qcow2.check import Checker

    path = qemu.create(tmp_path / "u.qcow2", 16 * MiB, 4096)
    qemu.qemu_io(path, "write -P 0x12 0 2M")
    extents = json.loads(qemu.run("qemu-img", "map", "--output=json", str(path)).stdout)
    host = next(e["offset"] + (1536 << 10) - e["start"] for e in extents
                if e["data"] and e["start"] <= 1536 << 10 < e["start"] + e["length"])
    qemu.qemu_io(path, "discard 1M 1M")
    RefcountView(path).set_refcount(host // 4096, 1)  # a leak inside the file
    img = Image.open(str(path), writable=True, repair=True)
    try:
        img.write(4 * MiB, b"\x34" * 65536)
        report = Checker(img).run("leaks")
        assert report.leaks_fixed == 1 and not report.corruptions, report.messages
        img.write(8 * MiB, b"\x56" * 4096)
    finally:
        img.close()
    qemu.assert_clean(path)
    qemu.qemu_io(path, "read -P 0x12 0 1M", "read -P 0 1M 1M", "read -P 0x34 4M 64k",
                 "read -P 0x56 8M 4k", read_only=True)
