"""`qcowfuse check` against `qemu-img check`, and the damage OpenBSD vmd leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import qemu
from helpers.procs import run_cli
from helpers.rawqcow2 import RefcountView

MiB = 1 << 20


def qcowfuse_check(img: Path, *args: str) -> tuple[int, dict]:
    r = run_cli("check", "--output=json", *args, str(img))
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def assert_same_counts(img: Path) -> dict:
    ours_rc, ours = qcowfuse_check(img)
    theirs = qemu.check(img)
    keys = ("corruptions", "leaks", "check-errors", "allocated-clusters", "total-clusters",
            "fragmented-clusters", "compressed-clusters", "image-end-offset")
    assert {k: ours.get(k, 0) for k in keys} == {k: theirs.get(k, 0) for k in keys}
    assert ours_rc == theirs["rc"]
    return ours


def vmd_damaged(path: Path, data_mib: int = 40) -> list[int]:
    """An image QEMU wrote whose file crosses several refcount-block boundaries (4 KiB
    clusters: one block covers 8 MiB of file), with the refcount of every block after
    the first zeroed: what OpenBSD vmd's writer left behind.  Returns those clusters."""
    qemu.create(path, 64 * MiB, cluster_size=4096)
    cmds = [f"write -P {i % 200 + 1} {i * MiB} 1M" for i in range(data_mib)]
    qemu.qemu_io(path, *cmds)
    view = RefcountView(path)
    damaged = view.refblock_clusters()[1:]
    assert len(damaged) >= 4
    for c in damaged:
        view.set_refcount(c, 0)
    return damaged
