"""`check` finds what `qemu-img check` finds (reserved bits, alignment, subcluster
bitmaps, references past the end of the file), and `check -r all` repairs at least
as well as `qemu-img check -r all`: never leaves an image worse than it found it."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import qemu
from helpers.checking import assert_same_counts, qcowfuse_check
from helpers.procs import run_cli
from helpers.rawqcow2 import COPIED, L2_OFFSET_MASK, RawImage
from qcowfuse import Image, QcowError
from qcowfuse.qcow2.check import Checker

MiB = 1 << 20


def image(tmp_path: Path, cs: int = 65536, extended: bool = False) -> Path:
    img = qemu.create(tmp_path / "t.qcow2", 8 * MiB, cs, extra="extended_l2=on" if extended else "")
    qemu.qemu_io(img, f"write -P 1 0 {4 * cs}", f"write -z {8 * cs} {cs}")
    return img


def qemu_reads(img: Path) -> bytes | None:
    """The guest disk as QEMU reads it (None if it can't)."""
    out = img.with_suffix(".raw")
    r = subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], capture_output=True)
    data = out.read_bytes() if r.returncode == 0 else None
    out.unlink(missing_ok=True)
    return data


def repaired_by_both(img: Path) -> tuple[dict, dict]:
    """qemu-img check after our `-r all`, and after qemu-img's own, on copies."""
    ours, theirs = img.with_suffix(".ours"), img.with_suffix(".qemu")
    shutil.copy(img, ours)
    shutil.copy(img, theirs)
    qcowfuse_check(ours, "-r", "all")
    qemu.run("qemu-img", "check", "-q", "-r", "all", str(theirs), check=False)
    return qemu.check(ours), qemu.check(theirs)


def bad(info: dict) -> int:
    return info.get("corruptions", 0) + info.get("leaks", 0) + info.get("check-errors", 0)


def damage_reftable_reserved(raw: RawImage) -> None:
    raw.put(raw.reftable, raw.u64(raw.reftable) | 0x10)


def damage_l1_reserved(raw: RawImage) -> None:
    raw.put(raw.l1, raw.u64(raw.l1) | (1 << 60))


def damage_l2_reserved(raw: RawImage) -> None:
    pos = raw.l2_entry_pos(1)
    raw.put(pos, raw.u64(pos) | (1 << 57) | 4)


def damage_data_past_eof(raw: RawImage) -> None:
    raw.put(raw.l2_entry_pos(2), COPIED | (1 << 40))


def damage_prealloc_unaligned(raw: RawImage) -> None:
    """A preallocated zero cluster at an unaligned offset: qemu-img makes it a plain zero."""
    pos = raw.l2_entry_pos(3)
    if raw.extended:  # host offset, all subclusters zero
        raw.put(pos, raw.u64(pos) + 512)
        raw.put(pos + 8, 0xFFFFFFFF00000000)
    else:
        raw.put(pos, (raw.u64(pos) + 512) | 1)


def damage_subclusters_both(raw: RawImage) -> None:
    raw.put(raw.l2_entry_pos(1, 1), 0xFFFFFFFF00000001 | 0xF)


def damage_unallocated_alloc_bits(raw: RawImage) -> None:
    raw.put(raw.l2_entry_pos(20, 1), 0x3)


def damage_compressed_bitmap(raw: RawImage) -> None:
    pos = raw.l2_entry_pos(0)
    raw.put(pos, (raw.u64(pos) & L2_OFFSET_MASK) | (1 << 62))
    raw.put(pos + 8, 1)


def damage_compressed_copied(raw: RawImage) -> None:
    pos = raw.l2_entry_pos(0)
    raw.put(pos, (raw.u64(pos) & L2_OFFSET_MASK) | (1 << 62) | COPIED)


def damage_l2_past_eof(raw: RawImage) -> None:
    raw.put(raw.l1, COPIED | (1 << 40))


STANDARD = [damage_reftable_reserved, damage_l1_reserved, damage_l2_reserved, damage_data_past_eof,
            damage_prealloc_unaligned, damage_compressed_copied, damage_l2_past_eof]
EXTENDED = [damage_subclusters_both, damage_unallocated_alloc_bits, damage_compressed_bitmap,
            damage_prealloc_unaligned, damage_l2_reserved, damage_data_past_eof]
# semantics-preserving repairs qemu-img -r all does not make (bits the reader ignores;
# references past the end of the file, which read as zeros)
REPAIRED = {damage_reftable_reserved, damage_l1_reserved, damage_l2_reserved, damage_data_past_eof,
            damage_prealloc_unaligned, damage_compressed_copied, damage_l2_past_eof}


@pytest.mark.parametrize("extended,damage", [(False, d) for d in STANDARD] + [(True, d) for d in EXTENDED],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_found_like_qemu_and_repaired_as_well(tmp_path, extended, damage):
    img = image(tmp_path, 65536, extended)
    damage(RawImage(img))
    theirs = qemu.check(img)
    assert theirs["rc"] != 0, "the damage must be something qemu-img reports"
    ours = assert_same_counts(img)
    assert ours.get("corruptions", 0) >= 1
    before = qemu_reads(img)
    after_ours, after_qemu = repaired_by_both(img)
    assert bad(after_ours) <= bad(after_qemu), (after_ours["text"], after_qemu["text"])
    if damage in REPAIRED:  # beyond qemu-img: repaired, and QEMU reads the same as before
        assert bad(after_ours) == 0, after_ours["text"]
        assert before is None or qemu_reads(img.with_suffix(".ours")) == before


def test_reftable_reserved_bits_message_and_rebuild(tmp_path):
    img = image(tmp_path)
    damage_reftable_reserved(RawImage(img))
    rc, report = qcowfuse_check(img)
    assert rc == 2 and report["corruptions"] == 1
    assert "ERROR refcount table entry 0 has reserved bits set" in run_cli("check", str(img)).stdout
    rc, report = qcowfuse_check(img, "-r", "all")
    assert rc == 0 and report["corruptions-fixed"] >= 1
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 1 0 256k", read_only=True)


def mutate(data: bytes, rnd: random.Random, metadata: list[int], cs: int) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        base = rnd.choice(metadata)
        pos = base + rnd.randrange(cs)
        if rnd.random() < 0.5:
            out[pos] ^= 1 << rnd.randrange(8)  # one bit flipped
        else:
            out[pos] = rnd.randrange(256)
    return bytes(out)


def seeds(tmp: Path) -> list[tuple[bytes, list[int], int]]:
    out = []
    for cs, rb, ext in ((512, 16, False), (4096, 1, False), (16384, 64, True), (65536, 16, False)):
        p = qemu.create(tmp / f"s{cs}.qcow2", 2 * MiB, cs, rb, extra="extended_l2=on" if ext else "")
        qemu.qemu_io(p, "write -P 1 0 64k", "write -z 128k 8k", f"write -P 2 {MiB} 12k")
        if rb > 1:
            qemu.run("qemu-img", "snapshot", "-c", "s", str(p))
            qemu.qemu_io(p, "write -P 3 4k 4k")
        data = p.read_bytes()
        raw = RawImage(p)
        meta = sorted({raw.l1 - raw.l1 % cs, raw.reftable, raw.u64(raw.reftable) & ~511,
                       raw.u64(raw.l1) & L2_OFFSET_MASK})
        out.append((data, [m for m in meta if 0 < m < len(data)], cs))
    return out


def test_repair_never_makes_an_image_worse(tmp_path):
    """Seeded mutations of the L1, L2, refcount table and block clusters, judged by
    qemu-img check: an image qemu-img calls clean stays clean after our repair, and
    our repair leaves at least as many images clean as qemu-img's own."""
    rnd = random.Random(int(os.environ.get("QCOWFUSE_FUZZ_SEED", "14")))
    cases = seeds(tmp_path)
    path, copy = tmp_path / "f.qcow2", tmp_path / "q.qcow2"
    ours_clean = qemu_clean = damaged = 0
    for case in range(60):
        data, meta, cs = cases[case % len(cases)]
        path.write_bytes(mutate(data, rnd, meta, cs))
        shutil.copy(path, copy)
        reads = qemu_reads(path)
        before = qemu.check(path)
        if "rc" in before and not before.get("total-clusters"):
            continue  # qemu-img can't open it either
        try:
            with Image.open(str(path), writable=True, repair=True) as img:
                Checker(img).run("all")
        except QcowError:
            pass
        after = qemu.check(path)
        if reads is not None and bad(after) == 0 and after["rc"] == 0:
            assert qemu_reads(path) == reads, f"case {case}: the repair changed what QEMU reads"
        if bad(before) == 0 and before["rc"] == 0:
            assert bad(after) == 0 and after["rc"] == 0, f"case {case}: clean image made unclean"
            continue
        damaged += 1
        ours_clean += bad(after) == 0 and after["rc"] == 0
        try:  # qemu-img "repairs" a refcount block far outside the file by growing it to there
            subprocess.run(["qemu-img", "check", "-q", "-r", "all", str(copy)], capture_output=True,
                           timeout=1)
        except subprocess.TimeoutExpired:
            continue
        theirs = qemu.check(copy)
        qemu_clean += bad(theirs) == 0 and theirs["rc"] == 0
    print(f"\n{damaged} damaged images: clean after our repair {ours_clean}, after qemu-img's {qemu_clean}")
    assert damaged >= 20 and ours_clean >= qemu_clean
