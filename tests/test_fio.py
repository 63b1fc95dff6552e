"""fio with concurrent jobs whose regions share clusters, verified with crc32c."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import qemu

pytestmark = pytest.mark.root  # every test here mounts (see the markers in pyproject.toml)

MiB = 1 << 20


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_fio_concurrent_random_writes_verify(tmp_path, mount, cluster_size):
    img = qemu.create(tmp_path / "fio.qcow2", 256 * MiB, cluster_size=cluster_size)
    qemu.qemu_io(img, "write -P 0x5c 0 3M")  # some allocated, most not
    job = ["--ioengine=psync", "--rw=randwrite", "--bsrange=4k-128k", "--numjobs=4", "--size=3000k",
           "--offset_increment=3000k", "--offset=1000k", "--verify=crc32c", "--verify_fatal=1"]
    with mount(img, tmp_path / "raw") as (raw, _):
        # four jobs, regions of 3000 KiB starting 3000 KiB apart: neighbours share a
        # cluster at every boundary, and block sizes 4-128 KiB are rarely aligned
        r = subprocess.run(
            ["fio", "--name=mixed", f"--filename={raw}", *job, "--do_verify=0",
             "--group_reporting", "--output-format=terse", "--fsync_on_close=1"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    qemu.assert_clean(img)
    # verified on QEMU's reading of the image, not through qcowfuse
    converted = qemu.convert_to_raw(img, tmp_path / "converted.raw")
    r = subprocess.run(
        ["fio", "--name=mixed", f"--filename={converted}", *job, "--verify_only"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify" not in r.stderr.lower(), r.stderr
    qemu.qemu_io(img, "read -P 0x5c 0 1000k", read_only=True)  # untouched by the jobs
