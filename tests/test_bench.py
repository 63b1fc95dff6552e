"""scripts/bench.py keeps working: a --quick run completes, prints its table and closing
line, and leaves no mount, loop device or work file behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]  # mounts; ~55 s (a whole --quick bench run)

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
TOOLS = ("fio", "qemu-img", "qemu-storage-daemon", "qemu-nbd", "nbdfuse", "fusermount3", "losetup",
         "mkfs.ext4")


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        return [line.split()[1] for line in fh if line.split()[1].startswith(str(root))]


def loops_under(root: Path) -> list[str]:
    r = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True)
    devices = json.loads(r.stdout).get("loopdevices", []) if r.stdout.strip() else []
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(str(root))]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse")
                    or not all(shutil.which(t) for t in TOOLS),
                    reason="needs root, /dev/fuse, fio, QEMU and e2fsprogs")
def test_bench_quick_runs_and_cleans_up(tmp_path):
    # --no-unshare: mount where this test can see it, so the leftover check means something.
    # --runtime 0.5: half of --quick's 1 s per fio job keeps this well under a minute.
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--runtime", "0.5", "--no-unshare",
                        "--dir", str(tmp_path), "--json", str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=170)  # a hang bound only
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert re.search(r"^job\s+unit\s+raw best/med\s+passthrough best/med\s+qsd best/med\s+nbdfuse best/med"
                     r"\s+qcowfuse best/med\s+overlay best/med\s+qcowfuse/qsd\s+qcowfuse/passthrough"
                     r"\s+qcowfuse/nbdfuse\s+qcowfuse/overlay$",
                     r.stdout, re.M), out
    assert re.search(r"^bench: \d+ passed, \d+ failed$", r.stdout, re.M), out
    assert not mounts_under(tmp_path), f"bench left mounts behind: {mounts_under(tmp_path)}"
    assert not loops_under(tmp_path), f"bench left loop devices behind: {loops_under(tmp_path)}"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "bench left files behind"
    results = json.loads((tmp_path / "out.json").read_text())
    assert set(results["jobs"]) >= {"seq-write-1M", "randread-4K-1j", "reread", "boundary-stream", "ext4-untar"}
    peers = {"raw", "passthrough", "qsd", "nbdfuse", "qcowfuse"}
    for job in ("randwrite-4K-1j", "reread"):
        assert set(results["jobs"][job]["samples"]) == peers
    for job in ("seq-read-1M", "randread-4K-1j"):  # reads below an overlay too
        assert set(results["jobs"][job]["samples"]) == peers | {"overlay"}
