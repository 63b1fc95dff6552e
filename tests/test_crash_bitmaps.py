"""Power loss with persistent bitmaps: the replay harness (helpers/powercut.py) over
a workload that ends with the bitmaps being stored at close.

Every crash image must pass `qemu-img check` without corruption and keep all
flushed guest data; each bitmap QEMU still loads must either be flagged in-use
(inconsistent: QEMU will not trust it) or hold exactly the right bits: its
content before the mount if no guest write reached the disk, else the content
after the whole workload."""

from __future__ import annotations

import json
import random

import pytest

from helpers import qemu
from helpers.powercut import (SEED, GuestWrite, RecordingFile, Workload, guest_raw, judged_crash_images,
                              pick_cuts, verify_guest)
from helpers.qemu import dirty_ranges
from qcowfuse import Image
from qcowfuse.hostfile import HostFile


def _bitmap_state(path) -> dict[str, tuple[list[str], list | None]]:
    """name -> (flags, dirty ranges if QEMU would use the bitmap)."""
    info = json.loads(qemu.run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)
    out = {}
    for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
        out[b["name"]] = (b["flags"], None if "in-use" in b["flags"] else dirty_ranges(path, b["name"]))
    return out


@pytest.mark.parametrize("cs,granularity", [(512, 512), (4096, 65536)])
def test_power_loss_while_bitmaps_are_tracked_and_stored(tmp_path, cs, granularity):
    seed = SEED + cs + granularity
    rnd = random.Random(seed)
    size = 4 << 20
    path = qemu.create(tmp_path / "b.qcow2", size, cs, 16)
    qemu.qemu_io(path, f"write -P 0x11 0 {size // 4}")
    qemu.run("qemu-img", "bitmap", "--add", "-g", str(granularity), str(path), "on")
    qemu.run("qemu-img", "bitmap", "--add", str(path), "frozen")
    qemu.qemu_io(path, f"write -P 0x12 {size // 2} {cs * 3}")
    qemu.run("qemu-img", "bitmap", "--disable", str(path), "frozen")
    before = _bitmap_state(path)

    initial = path.read_bytes()
    guest = bytearray(guest_raw(path))
    rec = RecordingFile(HostFile.open(str(path), True))
    img = Image.open_file(rec, writable=True)
    w = Workload(initial, bytes(guest), rec.log)
    try:
        for _ in range(120):
            if rnd.random() < 0.1:
                img.flush()
                w.flushes.append((len(rec.log), len(w.writes)))
                continue
            length = rnd.choice([rnd.randint(1, cs), cs * rnd.randint(1, 8), rnd.randint(1, 40 * cs)])
            off = rnd.randrange(0, size - length)
            data = rnd.randbytes(length)
            w.writes.append(GuestWrite(len(rec.log), off, data))
            img.write(off, data)
            guest[off:off + length] = data
    finally:
        img.close()  # stores the bitmaps: the cut points run through it too
    w.flushes.append((len(rec.log), len(w.writes)))
    qemu.assert_clean(path)
    after = _bitmap_state(path)
    assert after["frozen"] == before["frozen"]
    assert after["on"][0] == ["auto"] and after["on"][1] != before["on"][1]

    cuts = pick_cuts(w.log, rnd, 45)
    cuts += [k for k in range(len(w.log) - 12, len(w.log) + 1) if k not in cuts]  # the store
    crash_path = tmp_path / "crash.qcow2"
    failures, states = [], {}
    for c in judged_crash_images(w, sorted(cuts), rnd, crash_path):
        where = f"seed={seed} cs={cs} cut={c.cut}/{len(w.log)} mode={c.mode}"
        if c.bad:
            failures.append(f"{where}: {c.bad}")
            continue
        why = verify_guest(c.guest, c.flushed, c.at_cut, c.since)
        if why:
            failures.append(f"{where}: {why}")
            continue
        state = _bitmap_state(crash_path)
        for name, (flags, ranges) in state.items():
            if ranges is None:
                states["in-use"] = states.get("in-use", 0) + 1
                continue
            untouched = c.guest == w.guest0
            ok = ranges == after[name][1] or (untouched and ranges == before[name][1])
            states["valid"] = states.get("valid", 0) + 1
            if not ok:
                failures.append(f"{where}: bitmap {name} {flags} is not in use but holds wrong bits")
        if not state:
            states["dropped"] = states.get("dropped", 0) + 1
    print(f"\nbitmap power loss cs={cs} seed={seed}: {len(w.writes)} writes, log {len(w.log)}, "
          f"{len(cuts)} cuts, bitmap states {states}, {len(failures)} failed")
    assert not failures, "\n".join(failures[:8])
