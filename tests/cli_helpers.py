"""Assertions shared by the CLI failure tests."""

from __future__ import annotations

from pathlib import Path

from conftest import fuse_mounts, run_cli


def assert_refused(args: list[str], fragment: str, image: Path | None = None, mp: Path | None = None):
    before = image.read_bytes() if image is not None and image.exists() else None
    r = run_cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("qcowfuse: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    if mp is not None:
        assert str(mp) not in fuse_mounts()
    if before is not None:
        assert image.read_bytes() == before
