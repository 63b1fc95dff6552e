"""The kernel's page cache of the raw view survives our own small writes.

FUSE (auto_inval_data) drops every cached page of a file whose mtime or size it sees
change in getattr; the raw file's mtime must therefore not move with each write,
while what was written still reaches the image (judged by qemu-io after unmount).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers.qemu import create, qemu_io

pytestmark = pytest.mark.root  # every test here mounts (see the markers in pyproject.toml)

SIZE = 16 << 20


def cached_bytes(path) -> int:
    """Bytes of `path` in the page cache (fincore, util-linux)."""
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip())


@pytest.mark.skipif(not os.path.exists("/usr/bin/fincore") and not os.path.exists("/bin/fincore"),
                    reason="needs fincore (util-linux)")
def test_page_cache_survives_small_writes(tmp_path, mount):
    img = create(tmp_path / "disk.qcow2", SIZE)
    qemu_io(img, f"write -P 0x11 0 {SIZE}")
    with mount(img, tmp_path / "raw") as (raw, _):
        before = os.stat(raw)
        with open(raw, "rb") as fh:
            while fh.read(1 << 20):
                pass
        assert cached_bytes(raw) == SIZE

        # dd, as a user would
        pattern = tmp_path / "pattern"
        pattern.write_bytes(b"\x22" * 4096)
        subprocess.run(["dd", f"if={pattern}", f"of={raw}", "bs=4k", "count=1", "seek=10",
                        "conv=notrunc", "status=none"], check=True)
        st = os.stat(raw)
        assert cached_bytes(raw) == SIZE, "a 4 KiB dd dropped the page cache"

        # plain open + pwrite + close
        fd = os.open(raw, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x33" * 4096, 5 << 20)
        finally:
            os.close(fd)
        st = os.stat(raw)
        assert cached_bytes(raw) == SIZE, "a 4 KiB pwrite dropped the page cache"
        assert st.st_size == SIZE and st.st_mtime_ns == before.st_mtime_ns
        assert st.st_ctime_ns >= before.st_ctime_ns  # ctime tells that the data changed
        with open(raw, "rb") as fh:  # the cache holds what was written
            fh.seek(10 * 4096)
            assert fh.read(4096) == b"\x22" * 4096
            fh.seek(5 << 20)
            assert fh.read(4096) == b"\x33" * 4096
    qemu_io(img, "read -P 0x11 0 40960", "read -P 0x22 40960 4096", f"read -P 0x11 45056 {(5 << 20) - 45056}",
            f"read -P 0x33 {5 << 20} 4096", f"read -P 0x11 {(5 << 20) + 4096} {SIZE - (5 << 20) - 4096}",
            read_only=True)
