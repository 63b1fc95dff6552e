"""A second independent reader: libyal's libqcow (`qcowmount`, Debian libqcow-utils)
reads what qcowfuse wrote and must see exactly the model.  QEMU judges the same
images in the other tests; this one guards against writing only what two readers
from one family (QEMU's and ours) agree on."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.procs import fuse_mounts, mounted
from helpers.qemu import assert_clean, convert_to_raw, create, qemu_io, run

MiB = 1 << 20

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("qcowmount") is None, reason="libqcow-utils missing")]


def libqcow_sha(image: Path, where: Path) -> str:
    """sha256 of the guest disk as qcowmount exposes it (always unmounted again)."""
    where.mkdir()
    r = subprocess.run(["qcowmount", str(image), str(where)], capture_output=True, text=True,
                       timeout=60)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 10
        while not (where / "qcow1").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        h = hashlib.sha256()
        with open(where / "qcow1", "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    finally:
        deadline = time.monotonic() + 10
        while str(where) in fuse_mounts() and time.monotonic() < deadline:
            if subprocess.run(["fusermount3", "-u", str(where)], capture_output=True).returncode:
                time.sleep(0.1)
        if str(where) in fuse_mounts():
            subprocess.run(["fusermount3", "-uz", str(where)], capture_output=True)


# (cluster size, compat, how to prefill)
GEOMETRIES = [
    (512, "1.1", ""), (4096, "1.1", "snapshot"), (65536, "1.1", "compressed"),
    (65536, "0.10", ""), (2 * MiB, "1.1", ""),
]


@pytest.mark.parametrize("cs,compat,prefill", GEOMETRIES,
                         ids=[f"{g[0]}-v{g[1]}-{g[2] or 'plain'}" for g in GEOMETRIES])
def test_libqcow_reads_what_we_wrote(tmp_path, cs, compat, prefill):
    size = 16 * MiB
    img = create(tmp_path / "t.qcow2", size, cluster_size=cs, compat=compat)
    if prefill == "compressed":
        src = create(tmp_path / "src.qcow2", size)
        qemu_io(src, f"write -P 0x21 0 {size // 2}")
        img.unlink()
        run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img))
    else:
        qemu_io(img, f"write -P 0x11 0 {size // 4}")
        if prefill == "snapshot":
            run("qemu-img", "snapshot", "-c", "s1", str(img))
    model = bytearray(convert_to_raw(img, tmp_path / "before.raw").read_bytes())
    rnd = random.Random(cs + len(compat) + len(prefill))
    target = tmp_path / "r.raw"
    target.touch()
    with mounted(img, target) as (raw, _):
        fd = os.open(raw, os.O_WRONLY)
        try:
            for _ in range(60):
                n = rnd.choice([rnd.randint(1, 4096), rnd.randint(1, 3 * cs + 17)])
                off = rnd.randrange(0, size - n)
                data = rnd.randbytes(n)
                os.pwrite(fd, data, off)
                model[off:off + n] = data
            os.fsync(fd)
        finally:
            os.close(fd)
    assert_clean(img)
    assert libqcow_sha(img, tmp_path / "libqcow") == hashlib.sha256(model).hexdigest()
