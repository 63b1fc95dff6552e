"""Crash safety of resizing (issue 13): power loss at any point while the disk grows
across L1 tables that must move (512 B clusters: one L1 cluster maps 2 MiB), and
SIGKILL of the daemon while a client grows the mounted disk and writes into it.

The power-loss harness is helpers/powercut.py (recording layer, crash images from a
prefix of the log, QEMU as the judge).  On top of its rules: a crash image's virtual size is
the size of the last resize that returned, or the one in progress; the space a resize
added reads as zeros until written.  A shrink's punched clusters and its cut of the
host file (a truncate in the log) are judged at every step too.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import qemu
from helpers.powercut import (SECTOR, SEED, GuestWrite, Killer, RecordingFile, Truncate, Workload,
                              after_kill, assert_killed, check_not_corrupt, cut_every_epoch,
                              guest_raw, judged_crash_images, pick_cuts, verify_guest)
from helpers.rawqcow2 import RefcountView
from qcowfuse import Image
from qcowfuse.hostfile import HostFile

KiB, MiB = 1 << 10, 1 << 20


@dataclass
class ResizeWorkload(Workload):
    resizes: list[tuple[int, int, int]] = field(default_factory=list)  # (log at call, at return, size)
    size0: int = 0

    def sizes_at(self, cut: int) -> set[int]:
        """Virtual sizes a crash image cut here may have."""
        done = [s for _, end, s in self.resizes if end <= cut]
        sizes = {done[-1] if done else self.size0}
        sizes.update(s for start, end, s in self.resizes if start < cut < end)
        return sizes


# (cluster size, refcount bits, compat, initial size, steps, cut points, variant); a step is
# a number of random writes or ("resize", new size)
RESIZE_GEOMETRIES = [
    (512, 16, "1.1", 1 * MiB, [40, ("resize", 3 * MiB), 40, ("resize", 8 * MiB + 512), 30], 70, ""),
    (512, 64, "1.1", 1 * MiB, [30, ("resize", 5 * MiB), 40], 45, "snapshot"),  # shared L2 tables
    (512, 16, "1.1", 1 * MiB + 512, [30, ("resize", 6 * MiB), 30], 45, "backing"),  # zero clusters
    (512, 16, "0.10", 1 * MiB, [30, ("resize", 4 * MiB), 30], 40, ""),
    (512, 16, "1.1", 6 * MiB, [20, ("resize", 1 * MiB + 512), 20, ("resize", 4 * MiB), 20], 45,
     "shrink"),  # L2 tables past the new end freed, then growth again
]


def _make(tmp_path: Path, cs: int, rb: int, compat: str, size: int, variant: str) -> tuple[Path, Path | None]:
    backing = None
    extra = ""
    if variant == "backing":
        backing = qemu.create(tmp_path / "base.qcow2", 8 * MiB, 65536)
        qemu.qemu_io(backing, "write -P 0x31 0 8M")
        extra = f"backing_file={backing},backing_fmt=qcow2"
    path = qemu.create(tmp_path / "t.qcow2", size, cs, rb, compat, extra)
    qemu.qemu_io(path, f"write -P 0x11 0 {64 * cs}", f"write -P 0x12 {size // 2} {8 * cs}")
    if variant == "snapshot":
        qemu.run("qemu-img", "snapshot", "-c", "s1", str(path))
    if variant == "shrink":  # zero clusters (one preallocated) and L2 tables past the new end
        qemu.qemu_io(path, "write -P 0x13 3M 64k", "write -z 3M 64k", "write -z 5M 4k")
    # Free space inside the file that holds garbage: a table that reaches the disk after the
    # L1 entry naming it would be read as garbage, not as an empty table.
    with open(path, "ab") as fh:
        fh.write(random.Random(size).randbytes(256 * cs))
    qemu.assert_clean(path)
    return path, backing


def _run(path: Path, backing: Path | None, steps: list, rnd: random.Random) -> ResizeWorkload:
    size = json.loads(qemu.run("qemu-img", "info", "--output=json", str(path)).stdout)["virtual-size"]
    final = max([size] + [s[1] for s in steps if isinstance(s, tuple)])
    guest = bytearray(guest_raw(path).ljust(final, b"\0"))
    rec = RecordingFile(HostFile.open(str(path), True))
    base = Image.open(str(backing), lock=False) if backing else None
    img = Image.open_file(rec, writable=True, backing=base)
    w = ResizeWorkload(path.read_bytes(), bytes(guest), rec.log, size0=size)
    cs = img.cluster_size
    try:
        for i, step in enumerate(steps):
            if isinstance(step, tuple):
                start = len(rec.log)
                img.resize(step[1])
                w.resizes.append((start, len(rec.log), step[1]))
                w.flushes.append((len(rec.log), len(w.writes)))  # a resize flushes first
                if step[1] < size:
                    guest[step[1]:] = bytes(len(guest) - step[1])  # gone, and zeros if it grows back
                size = step[1]
                continue
            # before a shrink, write only below its new end (past it, it is refused)
            limit = min([size] + [s[1] for s in steps[i + 1:i + 2] if isinstance(s, tuple)])
            for _ in range(step):
                if rnd.random() < 0.1:
                    img.flush()
                    w.flushes.append((len(rec.log), len(w.writes)))
                length = rnd.choice([rnd.randint(1, 700), cs * rnd.randint(1, 4), rnd.randint(cs, 40 * cs)])
                off = rnd.choice([rnd.randrange(limit), max(0, limit - rnd.randint(1, 80 * cs))])
                length = min(length, limit - off)
                data = rnd.randbytes(length)
                w.writes.append(GuestWrite(len(rec.log), off, data))
                img.write(off, data)
                guest[off:off + length] = data
        img.flush()
        w.flushes.append((len(rec.log), len(w.writes)))
    finally:
        img.close()
    qemu.assert_clean(path)
    assert guest_raw(path) == bytes(guest[:size]), "final image differs from the model"
    return w


@pytest.mark.parametrize("cs,rb,compat,size,steps,n_cuts,variant", RESIZE_GEOMETRIES,
                         ids=[f"{g[0]}b-rc{g[1]}-v{g[2]}" + (f"-{g[6]}" if g[6] else "")
                              for g in RESIZE_GEOMETRIES])
def test_power_loss_while_resizing(tmp_path, cs, rb, compat, size, steps, n_cuts, variant):
    seed = SEED + 13 + rb + len(variant)
    rnd = random.Random(seed)
    path, backing = _make(tmp_path, cs, rb, compat, size, variant)
    w = _run(path, backing, steps, rnd)
    if variant == "shrink":  # the cut of the host file is among the steps judged
        assert any(isinstance(e, Truncate) for e in w.log)
    # every cut inside a resize, and around each header write (the L1 switch, the size)
    # and each truncate
    cuts = set(pick_cuts(w.log, rnd, n_cuts))
    for start, end, _ in w.resizes:
        cuts.update(range(start, end + 1, max(1, (end - start) // 25)))
    crash_path = tmp_path / "crash.qcow2"
    failures = []
    sizes_seen: set[int] = set()
    for c in judged_crash_images(w, sorted(cuts), rnd, crash_path):
        where = f"seed={seed} geometry=({cs}, {rb}, {compat}, {variant!r}) cut={c.cut}/{len(w.log)} mode={c.mode}"
        if c.bad:
            failures.append(f"{where}: {c.bad}")
            continue
        n = len(c.guest)
        allowed = w.sizes_at(c.cut)
        if n not in allowed:
            failures.append(f"{where}: virtual size {n}, expected one of {sorted(allowed)}")
            continue
        sizes_seen.add(n)
        why = verify_guest(c.guest, c.flushed[:n], c.at_cut[:n], c.since)
        if why:
            failures.append(f"{where}: {why}")
    print(f"\npower loss while resizing {cs}B rc{rb} v{compat} {variant or 'plain'} seed={seed}: "
          f"{len(w.writes)} writes, {len(w.resizes)} resizes, log {len(w.log)} entries, "
          f"{len(cuts)} cuts, sizes seen {sorted(sizes_seen)}, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(cuts)} crash images bad:\n" + "\n".join(failures[:8])
    assert len(sizes_seen) > 1


def test_power_cut_at_every_step_of_a_shrink_giving_space_back(tmp_path):
    """A shrink frees L2 tables and preallocated zero clusters inside the file (punched)
    and at its end (cut off, with the refcount block left counting nothing): every subset of every epoch's writes, the truncate among
    them, leaves an image QEMU finds uncorrupted, of the old size or the new, with the
    data below the new end intact."""
    cs, old, new = 512, 4 * MiB, 1 * MiB
    path = qemu.create(tmp_path / "s.qcow2", old, cs, 64)  # a refcount block per 32 KiB
    # the last refcount block comes to count only clusters past the cut, and itself
    qemu.qemu_io(path, "write -P 0x12 3M 2k", "write -P 0x11 0 20k", "write -P 0x13 2M 8k",
                 "write -z 2M 8k", "write -z 3M 2k")
    initial, ref = _with_a_copy_qemu_shrank(tmp_path, path, new)
    rec = RecordingFile(HostFile.open(str(path), True))
    img = Image.open_file(rec, writable=True)
    try:
        img.write(100, b"\x14" * 700)  # dirty tables when the shrink begins
        first = len(rec.log)
        img.resize(new)
    finally:
        img.close()
    assert any(isinstance(e, Truncate) for e in rec.log[first:]), "the shrink cut nothing off"
    qemu.assert_clean(path)
    assert path.stat().st_size <= ref.stat().st_size  # the emptied refcount block went too
    below = bytearray(b"\x11" * (20 * KiB)) + bytes(new - 20 * KiB)
    below[100:800] = b"\x14" * 700
    _cut_every_epoch_of_a_shrink(tmp_path, initial, rec.log, first, old, new, bytes(below), "shrink cut")


def _with_a_copy_qemu_shrank(tmp_path: Path, path: Path, new: int) -> tuple[bytes, Path]:
    """The image's bytes before the shrink, and a copy shrunk by qemu-img (to compare sizes)."""
    initial = path.read_bytes()
    ref = tmp_path / "qemu.qcow2"
    ref.write_bytes(initial)
    qemu.run("qemu-img", "resize", "-q", "--shrink", str(ref), str(new))
    return initial, ref


def _cut_every_epoch_of_a_shrink(tmp_path: Path, initial: bytes, log: list, first: int, old: int,
                                 new: int, below: bytes, what: str) -> None:
    """Every crash image of the shrink's epochs: the old size or the new one, the guest
    `below` the new end unchanged, zeros past it."""
    def judge(crash_path: Path, info: dict, got: bytes) -> str | None:
        if len(got) not in (old, new):
            return f"virtual size {len(got)}"
        if got[:new] != below or any(got[new:]):
            return "guest content changed"
        return None

    failures, n_images, epochs = cut_every_epoch(tmp_path, initial, log, first, judge)
    print(f"\n{what}: log {len(log) - first} entries, {epochs} epochs, {n_images} crash images")
    assert not failures, "\n".join(failures[:8])


def test_power_cut_in_a_shrink_dropping_a_refcount_block_counted_by_another(tmp_path):
    """The shrink empties a refcount block that lives in the range of another block (a
    run that crossed into a new block's range put the block at the run's start): its
    table entry is synced zero, then its refcount in the other block drops (QEMU's
    qcow2_shrink_reftable order).  Cut at every subset of every epoch: QEMU finds no
    corruption, the size is the old or the new one, the data below the cut intact."""
    cs, old, new = 512, 4 * MiB, 1 * MiB
    path = qemu.create(tmp_path / "d.qcow2", old, cs, 64)  # 64 clusters per refcount block
    with Image.open(str(path), writable=True) as img:
        img.write(0, b"\x11" * (20 * KiB))
        img.write(3 * MiB, b"\x12" * (16 * KiB))  # crosses into block 1's range: block 1 at its start
    qemu.qemu_io(path, "write -z 3M 16k")  # zero clusters keeping their host clusters
    view = RefcountView(path)
    assert view.table[1] and view.table[1] // cs // view.per_block == 0, \
        f"refcount block 1 is not in block 0's range: {view.table[:2]}"
    initial, ref = _with_a_copy_qemu_shrank(tmp_path, path, new)
    rec = RecordingFile(HostFile.open(str(path), True))
    img = Image.open_file(rec, writable=True)
    try:
        first = len(rec.log)
        img.resize(new)
        assert len(img.rc.table) < 2 or not img.rc.table[1], "refcount block 1 was not dropped"
    finally:
        img.close()
    qemu.assert_clean(path)
    assert path.stat().st_size <= ref.stat().st_size
    below = b"\x11" * (20 * KiB) + bytes(new - 20 * KiB)
    _cut_every_epoch_of_a_shrink(tmp_path, initial, rec.log, first, old, new, below,
                                 "shrink dropping a block counted elsewhere")


# -- SIGKILL while growing through the mount ---------------------------------------------

BLOCK = 4096


@pytest.mark.root
def test_sigkill_while_growing_through_mount(tmp_path, mount):
    """A client grows the disk step by step (every step moves the L1 table) and writes
    into each new range, fsyncing now and then; the daemon is killed at a random moment.
    The image is never corrupt, its size is the last one truncate returned for (or the
    one in flight), fsynced blocks read back and the rest holds old or new data."""
    rnd = random.Random(SEED + 13)
    rounds = 4
    verified = truncates = inside = 0
    for rnd_no in range(rounds):
        cs = [512, 1024, 512, 4096][rnd_no]
        # small steps (an L1 move per step), or big ones at 512 B clusters: an L1 table of
        # up to 32 MiB takes long to write, so the kill likely lands inside a resize
        big = rnd_no == 2
        size = 1 * MiB
        img = qemu.create(tmp_path / f"k{rnd_no}.qcow2", size, cs)
        qemu.qemu_io(img, "write -P 0x5a 0 512k")
        durable: dict[int, bytes] = {}
        since: dict[int, list[bytes]] = {}
        sizes = [size]  # truncates that returned, then the one in flight
        where = f"seed={SEED + 13} round={rnd_no} cluster_size={cs}"
        killer = None
        with mount(img, tmp_path / f"raw{rnd_no}") as (raw, pid):
            fd = os.open(raw, os.O_RDWR)
            try:
                killer = Killer(pid, rnd.uniform(0.3, 2.5) if big else rnd.uniform(0.05, 1.5))
                killer.start()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if big:
                        new = min(size + rnd.randint(8, 40) * (1 << 30), 127 << 30)
                    else:
                        new = size + rnd.choice([1, 2, 3]) * 512 * KiB
                    try:
                        sizes.append(new)
                        os.ftruncate(fd, new)
                    except OSError:
                        break
                    size = new
                    sizes = [size]
                    truncates += 1
                    for _ in range(rnd.randint(1, 6)):
                        b = rnd.randrange(size // BLOCK - 1)
                        data = rnd.randbytes(BLOCK)
                        since.setdefault(b, []).append(data)
                        try:
                            os.pwrite(fd, data, b * BLOCK)
                        except OSError:
                            break
                    if rnd.random() < 0.4:
                        try:
                            os.fsync(fd)
                        except OSError:
                            break
                        for b, vals in since.items():
                            durable[b] = vals[-1]
                        since.clear()
                else:
                    raise AssertionError(f"{where}: the daemon was never killed")
            finally:
                after_kill(killer, fd)
            assert_killed(killer, pid, where)
        inside += len(sizes) > 1
        check_not_corrupt(img)
        raw_out = qemu.convert_to_raw(img, tmp_path / f"k{rnd_no}.raw")  # sparse
        got_size = raw_out.stat().st_size
        assert got_size in sizes, f"{where}: virtual size {got_size}, expected one of {sizes}"
        initial = b"\x5a" * (512 * KiB)
        nblocks = got_size // BLOCK
        check = set(durable) | set(since) | set(range(len(initial) // BLOCK + 1))
        check |= {rnd.randrange(nblocks) for _ in range(500)}
        with open(raw_out, "rb") as fh:
            for b in sorted(c for c in check if c < nblocks):
                blk = os.pread(fh.fileno(), BLOCK, b * BLOCK)
                old = initial[b * BLOCK:(b + 1) * BLOCK].ljust(BLOCK, b"\0")
                if b in durable and b not in since:
                    assert blk == durable[b], f"{where}: fsynced block {b} lost"
                    verified += 1
                elif blk != durable.get(b, old):
                    cands = [durable.get(b, old)] + since.get(b, [])
                    for sec in range(0, BLOCK, SECTOR):
                        assert any(blk[sec:sec + SECTOR] == c[sec:sec + SECTOR] for c in cands), \
                            f"{where}: block {b} sector {sec // SECTOR} holds data never written there"
        raw_out.unlink()
        img.unlink()
    print(f"\nSIGKILL while growing: {rounds} rounds ({inside} killed inside a truncate), "
          f"{truncates} truncates, "
          f"{verified} fsynced blocks verified")
    assert verified


class _SyncFailsAfterL1Switch(RecordingFile):
    """EIO from the first sync after the header's L1 fields (l1_size at 36) are written:
    the switch may or may not be on disk, and stays in the page cache either way."""

    def __init__(self, inner: HostFile) -> None:
        super().__init__(inner)
        self.armed, self.failed = True, False

    def pwrite(self, offset: int, data) -> None:
        super().pwrite(offset, data)
        if offset == 36 and self.armed:
            self.armed, self.failed = False, True

    def sync(self) -> None:
        if self.failed and not getattr(self, "_raised", False):
            self._raised = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().sync()


def test_eio_on_the_sync_after_the_l1_switch_loses_no_later_write(tmp_path):
    """The L1 table moves (512 B clusters: one L1 cluster maps 2 MiB) and the sync after
    the header switch fails.  The file names the new table from then on, so writes after
    it must land in the new table, and the old table stays counted (the header on disk
    may still name it: leaked, never reused).  Judged by qemu-io read -P and qemu-img
    check (no corruption, the one leaked cluster)."""
    path = qemu.create(tmp_path / "g.qcow2", 1 * MiB, 512, 16)
    f = _SyncFailsAfterL1Switch(HostFile.open(str(path), True))
    img = Image.open_file(f, writable=True)
    try:
        img.write(0, b"\x11" * 4096)
        img.flush()
        with pytest.raises(OSError):
            img.resize(8 * MiB)
        assert f.failed, "the resize did not move the L1 table"
        img.write(512 * KiB, b"\x22" * 4096)  # a new L2 table: an L1 update
        img.resize(8 * MiB)  # again: the table is big enough now
        img.write(6 * MiB, b"\x33" * 4096)
        img.flush()
    finally:
        img.close()
    # the old table stays counted (the header on disk might have named it): leaked only
    info = qemu.check(path)
    assert info["rc"] in (0, 3) and not info.get("corruptions") and not info.get("check-errors"), \
        info["text"]
    assert info.get("leaks", 0) == 1, info["text"]  # the old table's one cluster
    qemu.qemu_io(path, "read -P 0x11 0 4k", "read -P 0x22 512k 4k", "read -P 0x33 6M 4k",
                 "read -P 0 1M 1M")
