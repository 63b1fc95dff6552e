"""The power-cut harness: crash images of an engine run, judged by QEMU.

The engine runs over a RecordingFile that logs every pwrite, truncate and sync.
Crash images are rebuilt from the initial image and a prefix of the log: everything
before the last completed sync is on disk; the writes after it reach the disk in one
of CRASH_MODES (crash_images, judged_crash_images), or every subset of one epoch's
writes is tried (cut_every_epoch).  QEMU judges every image: `qemu-img check` must
find no corruption (leaks are fine), and guest content is read with `qemu-img
convert`, never with our reader; verify_guest says whether the guest bytes are ones
the writes before the cut allow.

Killer / after_kill / assert_killed: SIGKILL of a daemon while a client does I/O.

Used by test_crash.py, test_crash_resize.py and test_crash_bitmaps.py.  Seeds are
fixed (override with QCOWFUSE_CRASH_SEED).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import qemu
from helpers.procs import pid_alive
from qcowfuse.hostfile import HostFile

SEED = int(os.environ.get("QCOWFUSE_CRASH_SEED", "20240606"))
SECTOR = 512


# -- recording layer -------------------------------------------------------------------

@dataclass(frozen=True)
class Truncate:
    """Log entry of a HostFile.truncate: the file is cut to `size` bytes."""
    size: int


class RecordingFile:
    """HostFile substitute: forwards everything, logs each pwrite as (offset, bytes),
    each truncate as a Truncate and each sync as None, in the order the engine issued
    them.  Methods are listed one by
    one on purpose: a new HostFile method must be added here, or the engine fails with
    AttributeError, rather than change the file behind the log's back."""

    def __init__(self, inner: HostFile) -> None:
        self.inner = inner
        self.log: list[tuple[int, bytes] | Truncate | None] = []
        self.unsynced = False

    @property
    def fd(self) -> int:
        return self.inner.fd

    @property
    def path(self) -> str:
        return self.inner.path

    def size(self) -> int:
        return self.inner.size()

    def end(self) -> int:
        return self.inner.end()

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pread_upto(self, offset: int, length: int) -> bytes:
        return self.inner.pread_upto(offset, length)

    def pread_into(self, offset: int, buf: memoryview) -> None:
        self.inner.pread_into(offset, buf)

    def pwrite(self, offset: int, data) -> None:
        self.log.append((offset, bytes(data)))
        self.unsynced = True
        self.inner.pwrite(offset, data)

    def extend_to(self, size: int) -> None:
        """Logged as an empty write at the new end: replaying it only grows the file."""
        if self.inner.end() < size:
            self.log.append((size, b""))
            self.unsynced = True
        self.inner.extend_to(size)

    def truncate(self, size: int) -> None:
        self.log.append(Truncate(size))
        self.unsynced = True
        self.inner.truncate(size)

    def punch_hole(self, offset: int, length: int) -> None:
        """Logged as a write of zeros (clipped at the end of the file: the size stays)."""
        n = max(0, min(length, self.inner.size() - offset))
        if n:
            self.log.append((offset, bytes(n)))
        self.unsynced = True
        self.inner.punch_hole(offset, length)

    def sync(self) -> None:
        self.inner.sync()
        self.log.append(None)
        self.unsynced = False

    def close(self) -> None:
        self.inner.close()


def _put(buf: bytearray, off: int, data: bytes) -> None:
    end = off + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[off:end] = data


def apply_entry(buf: bytearray, e: tuple[int, bytes] | Truncate) -> None:
    """One log entry (not a sync) onto a crash image."""
    if isinstance(e, Truncate):
        del buf[e.size:]
        buf.extend(bytes(e.size - len(buf)))
    else:
        _put(buf, *e)


def check_not_corrupt(path: Path) -> dict:
    info = qemu.check(path)
    bad = info.get("corruptions", 0) or info.get("check-errors", 0) or info["rc"] not in (0, 3)
    assert not bad, f"qemu-img check of {path}: {check_summary(info)}"
    return info


def check_summary(info: dict) -> str:
    """qemu-img check's verdict without its (possibly thousands of) leak lines."""
    lines = [l for l in info["text"].splitlines() if not l.startswith("Leaked cluster")]
    counts = {k: info.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    return f"rc={info['rc']} {counts}; " + "; ".join(l.strip() for l in lines
                                                    if "ERROR" in l or "Warning" in l)[:2000]


def crash_verdict(info: dict, guest: bytes | None) -> str | None:
    """Why a crash image judged by judge_crash_image is bad (corrupt, uncheckable or
    unreadable to QEMU), or None: leaks are fine."""
    if info.get("corruptions", 0) or info.get("check-errors", 0) or info["rc"] not in (0, 3) \
            or guest is None:
        return f"qemu-img check: {check_summary(info)}"
    return None


def guest_raw(path: Path) -> bytes:
    raw = path.with_suffix(".raw")
    qemu.convert_to_raw(path, raw)
    data = raw.read_bytes()
    raw.unlink()
    return data


# -- crash images from a prefix of the log, judged by QEMU -----------------------------

@dataclass
class GuestWrite:
    start: int  # log length when the write call began
    off: int
    data: bytes


@dataclass
class Workload:
    initial: bytes  # host image before the workload
    guest0: bytes  # guest content before the workload
    log: list
    writes: list[GuestWrite] = field(default_factory=list)
    flushes: list[tuple[int, int]] = field(default_factory=list)  # (log length at return, writes so far)
    grew_table: int = 0
    refblocks: int = 0


def pick_cuts(log: list, rnd: random.Random, n: int) -> list[int]:
    """Cut k: log entries [0, k) happened.  Always around each header write (the
    refcount table moving) and each truncate; then favour the moments just before a sync (a whole
    epoch of writes in flight) and just after one, plus uniform picks."""
    syncs = [i for i, e in enumerate(log) if e is None]
    cuts = set()
    for i, e in enumerate(log):
        if isinstance(e, Truncate) or e is not None and e[0] < SECTOR:
            cuts.update(k for k in range(i - 2, i + 3) if 0 <= k <= len(log))
    while len(cuts) < min(n, len(log) + 1):
        r = rnd.random()
        if r < 0.4 and syncs:
            cuts.add(rnd.choice(syncs))
        elif r < 0.55 and syncs:
            cuts.add(rnd.choice(syncs) + 1)
        else:
            cuts.add(rnd.randint(0, len(log)))
    return sorted(cuts)


def verify_guest(got: bytes, flushed: bytearray, at_cut: bytearray,
                  since: list[GuestWrite]) -> str | None:
    """None if every byte equals its flushed value or a value written since; else why not."""
    if len(got) != len(flushed):
        return f"guest size {len(got)} != {len(flushed)}"

    def check(lo: int, hi: int, cands: list[GuestWrite]) -> str | None:
        g = got[lo:hi]
        if g == flushed[lo:hi] or g == at_cut[lo:hi]:
            return None
        cands = [w for w in cands if w.off < hi and w.off + len(w.data) > lo]
        if any(w.off <= lo and hi <= w.off + len(w.data) and g == w.data[lo - w.off:hi - w.off]
               for w in cands):
            return None
        if hi - lo > 64:
            step = -(-(hi - lo) // 8)
            for sub in range(lo, hi, step):
                why = check(sub, min(hi, sub + step), cands)
                if why:
                    return why
            return None
        for i in range(lo, hi):
            if got[i] == flushed[i]:
                continue
            covering = [w for w in cands if w.off <= i < w.off + len(w.data)]
            if not any(w.data[i - w.off] == got[i] for w in covering):
                return (f"guest byte {i:#x} reads {got[i]:#04x}, flushed value {flushed[i]:#04x}; "
                        + (f"{len(covering)} later write(s) cover it, none with that value"
                           if covering else "no write since the last flush covers it"))
        return None

    for pos in range(0, len(got), 1 << 16):
        why = check(pos, min(len(got), pos + (1 << 16)), since)
        if why:
            return why
    return None


def judge_crash_image(path: Path) -> tuple[dict, bytes | None]:
    """qemu-img check and qemu-img convert of one image, run side by side."""
    raw = path.with_suffix(".raw")
    conv = subprocess.Popen(["qemu-img", "convert", "-O", "raw", *qemu.image_args(path), str(raw)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    info = qemu.check(path)
    out = conv.communicate()[0]
    data = raw.read_bytes() if conv.returncode == 0 else None
    if data is None:
        info["text"] += "\nqemu-img convert: " + out.decode(errors="replace")
    raw.unlink(missing_ok=True)
    return info, data


def _sectors(off: int, data: bytes):
    """(sector number, piece offset, piece) for each 512-byte sector a write touches."""
    pos, end = off, off + len(data)
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        yield pos // SECTOR, pos, data[pos - off:nxt - off]
        pos = nxt


# How the writes issued since the last completed sync reach the disk:
#   subset: a random subset of whole pwrites, in random order (the disk may drop and
#           reorder any unsynced write: no ordering at all inside an epoch)
#   torn:   the same at 512-byte sector granularity (pwrites may be torn)
#   sector: each sector independently holds the page-cache state after a random
#           prefix of the writes that touched it (writeback at any moment, sector
#           atomic disk): the weakest assumption a real host gives
#   all / none: everything, or nothing, since the last sync
# A truncate since the last sync is kept or not, as a whole, like a pwrite of "subset"
# (at a random place among the other pieces in every mode but all / none).
CRASH_MODES = ["subset", "torn", "sector", "all", "none"]
CRASH_MODE_WEIGHTS = [4, 2, 3, 1, 1]


def disk_state(pending: list, mode: str, rnd: random.Random) -> list:
    """The pieces of `pending` (unsynced writes and truncates, in program order) that
    reached the disk, in the order to apply them."""
    if mode == "all":
        return pending
    if mode == "none":
        return []
    cuts = [e for e in pending if isinstance(e, Truncate)]
    if cuts:
        out = disk_state([e for e in pending if not isinstance(e, Truncate)], mode, rnd)
        for e in cuts:
            if rnd.random() < 0.5:
                out.insert(rnd.randint(0, len(out)), e)
        return out
    if mode == "sector":
        count: dict[int, int] = {}
        for off, data in pending:
            for s, _, _ in _sectors(off, data):
                count[s] = count.get(s, 0) + 1
        prefix = {s: rnd.choice([0, n, rnd.randint(0, n)]) for s, n in count.items()}
        seen: dict[int, int] = {}
        out = []
        for off, data in pending:
            for s, pos, piece in _sectors(off, data):
                seen[s] = seen.get(s, 0) + 1
                if seen[s] <= prefix[s]:
                    out.append((pos, piece))
        return out
    if mode == "torn":
        pending = [(pos, piece) for off, data in pending for _, pos, piece in _sectors(off, data)]
    keep = rnd.random()
    out = [e for e in pending if rnd.random() < keep]
    rnd.shuffle(out)
    return out


def crash_images(w: Workload, cuts: list[int], rnd: random.Random):
    """Yield (cut, mode, host image bytes, flushed guest, guest at cut, writes since flush)."""
    synced = bytearray(w.initial)
    applied = 0  # log entries [0, applied) are in `synced`
    flushed = bytearray(w.guest0)
    n_flushed = 0  # guest writes in `flushed`
    syncs = [i for i, e in enumerate(w.log) if e is None]
    for k in cuts:
        n_syncs = bisect.bisect_left(syncs, k)  # syncs before the cut
        last_sync = syncs[n_syncs - 1] if n_syncs else -1
        for e in w.log[applied:last_sync + 1]:
            if e is not None:
                apply_entry(synced, e)
        applied = max(applied, last_sync + 1)
        # the last Image.flush() that returned before the cut
        done = max((n for end, n in w.flushes if end <= k), default=0)
        for gw in w.writes[n_flushed:done]:
            flushed[gw.off:gw.off + len(gw.data)] = gw.data
        n_flushed = max(n_flushed, done)
        since = [gw for gw in w.writes[n_flushed:] if gw.start < k]
        at_cut = bytearray(flushed)
        for gw in since:
            at_cut[gw.off:gw.off + len(gw.data)] = gw.data
        pending = w.log[last_sync + 1:k]
        assert None not in pending
        mode = rnd.choices(CRASH_MODES, CRASH_MODE_WEIGHTS)[0]
        pending = disk_state(pending, mode, rnd)
        crash = bytearray(synced)
        for e in pending:
            apply_entry(crash, e)
        yield k, mode, crash, flushed, at_cut, since


@dataclass
class JudgedCrash:
    """One crash image of crash_images, written to a file and judged by QEMU."""
    cut: int
    mode: str
    info: dict  # qemu-img check --output=json, its exit code under "rc"
    guest: bytes | None  # qemu-img convert -O raw of it; None if that failed
    bad: str | None  # crash_verdict: corrupt, uncheckable or unreadable (leaks are fine)
    flushed: bytearray  # the guest as of the last flush before the cut
    at_cut: bytearray  # ... with every write begun before the cut
    since: list  # those writes since the flush


def judged_crash_images(w: Workload, cuts: list[int], rnd: random.Random, path: Path):
    """Each crash image of crash_images at `path`, judged (one at a time, same file)."""
    for k, mode, crash, flushed, at_cut, since in crash_images(w, cuts, rnd):
        path.write_bytes(crash)
        info, guest = judge_crash_image(path)
        yield JudgedCrash(k, mode, info, guest, crash_verdict(info, guest), flushed, at_cut, since)


# -- every subset of every epoch's writes (cut_every_epoch) ----------------------------

def _epochs(log: list) -> list[tuple[int, int]]:
    """(first, end) log index ranges of the pwrites between consecutive syncs."""
    out, start = [], 0
    for i, e in enumerate(log + [None]):
        if e is None:
            if i > start:
                out.append((start, i))
            start = i + 1
    return out


def _subsets(n: int, rnd: random.Random, limit: int = 40) -> list[tuple[int, ...]]:
    if (1 << n) - 1 <= 4 * limit:  # every subset (up to 7 writes at the default limit)
        return [tuple(i for i in range(n) if mask >> i & 1) for mask in range(1, 1 << n)]
    picks = {tuple(range(k)) for k in range(1, n + 1)}  # prefixes: a cut anywhere, in order
    picks |= {(i,) for i in range(n)}
    picks |= {tuple(j for j in range(n) if j != i) for i in range(n)}
    while len(picks) < limit + 3 * n:
        picks.add(tuple(i for i in range(n) if rnd.random() < 0.5) or (0,))
    return sorted(picks)


def cut_every_epoch(tmp: Path, initial: bytes, log: list, first: int, judge,
                     max_corruptions: int = 0, limit: int = 40) -> tuple[list[str], int, int]:
    """Build the crash images of every epoch of log[first:] and judge each.  An epoch is
    the writes between two syncs; every subset of its writes (all of them for up to 7
    writes, else singles, all-but-one, prefixes and random subsets) is put on top of
    what the earlier syncs made durable.  Each image is judged:
    qemu-img check may find leaks and at most `max_corruptions` corruptions, and
    judge(path, check info, guest bytes) returns None or why the image is bad.
    Returns (failures, distinct images, epochs)."""
    rnd = random.Random(SEED)
    synced = bytearray(initial)
    for e in log[:first]:
        if e is not None:
            apply_entry(synced, e)
    seen: set[bytes] = set()
    failures = []
    crash_path = tmp / "crash.qcow2"
    epochs = [(max(a, first), b) for a, b in _epochs(log) if b > first]
    for a, b in epochs:
        pending = log[a:b]
        for subset in _subsets(len(pending), rnd, limit):
            crash = bytearray(synced)
            for i in subset:
                apply_entry(crash, pending[i])
            digest = hashlib.sha256(crash).digest()
            if digest in seen:
                continue
            seen.add(digest)
            crash_path.write_bytes(crash)
            where = f"epoch log[{a}:{b}] kept writes {subset} of {len(pending)}"
            info, got = judge_crash_image(crash_path)
            if info.get("corruptions", 0) > max_corruptions or info.get("check-errors", 0) \
                    or info["rc"] not in (0, 2, 3) or (info["rc"] == 2 and not max_corruptions) \
                    or got is None:
                failures.append(f"{where}: qemu-img check: {check_summary(info)}")
                continue
            why = judge(crash_path, info, got)
            if why:
                failures.append(f"{where}: {why}")
        for e in pending:
            apply_entry(synced, e)
    return failures, len(seen), len(epochs)


# -- two files: an image and its external data file -----------------------------------

class TaggedLog:
    """What a RecordingFile appends to when it shares one log with another file: each
    entry goes to `shared` as (file index, entry), in the order the engine issued them."""

    def __init__(self, shared: list, index: int) -> None:
        self.shared, self.index = shared, index

    def append(self, entry) -> None:
        self.shared.append((self.index, entry))

    def __len__(self) -> int:
        return len(self.shared)


def cut_two_files(tmp: Path, initial: list[bytes], log: list, judge, limit: int = 12
                  ) -> tuple[list[str], int]:
    """Crash images of two files written through one TaggedLog (0: the image, 1: its data
    file).  A sync makes durable only its own file's earlier writes: at each cut (every
    log position), each file holds what its last sync made durable plus any subset of
    the writes of either file still pending.  Judged by QEMU with the crash copy of the
    data file (qemu.data_file); judge(path, info, guest) returns None or why it is bad.
    Returns (failures, distinct images)."""
    rnd = random.Random(SEED)
    paths = [tmp / "crash.qcow2", tmp / "crash.data"]
    seen: set[bytes] = set()
    failures: list[str] = []
    for cut in range(len(log) + 1):
        synced = [bytearray(b) for b in initial]
        pending: list[tuple[int, object]] = []
        for index, e in log[:cut]:
            if e is None:
                for i, p in [x for x in pending if x[0] == index]:
                    apply_entry(synced[i], p)
                pending = [x for x in pending if x[0] != index]
            else:
                pending.append((index, e))
        subsets = [()] + (_subsets(len(pending), rnd, limit) if pending else [])
        for subset in subsets:
            crash = [bytearray(b) for b in synced]
            for k in subset:
                i, e = pending[k]
                apply_entry(crash[i], e)
            digest = hashlib.sha256(bytes(crash[0]) + b"|" + bytes(crash[1])).digest()
            if digest in seen:
                continue
            seen.add(digest)
            for path, data in zip(paths, crash):
                path.write_bytes(data)
            where = f"cut at log[{cut}], kept pending writes {subset} of {len(pending)}"
            with qemu.data_file(paths[1]):
                info, got = judge_crash_image(paths[0])
            if crash_verdict(info, got):
                failures.append(f"{where}: {crash_verdict(info, got)}")
                continue
            why = judge(paths[0], info, got)
            if why:
                failures.append(f"{where}: {why}")
    return failures, len(seen)


# -- SIGKILL of a daemon while a client does I/O ---------------------------------------

class Killer(threading.Thread):
    def __init__(self, pid: int, delay: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.delay = pid, delay
        self.cancel = threading.Event()
        self.killed_at: float | None = None

    def run(self) -> None:
        if not self.cancel.wait(self.delay):
            os.kill(self.pid, signal.SIGKILL)
            self.killed_at = time.monotonic()


def after_kill(killer: "Killer | None", fd: int) -> None:
    """Stop the killer thread and drop the client's fd (gone either way once killed)."""
    if killer is not None:
        killer.cancel.set()
        killer.join()
    try:
        os.close(fd)  # FUSE_FLUSH fails once the daemon is killed
    except OSError:
        pass


def assert_killed(killer: "Killer", pid: int, where: str) -> None:
    """The kill happened (not an I/O failure first) and the daemon is gone."""
    assert killer.killed_at is not None, f"{where}: I/O failed before the kill"
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), f"{where}: daemon {pid} survived SIGKILL"
