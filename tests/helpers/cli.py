"""Assertions shared by the CLI failure tests."""

from __future__ import annotations

from pathlib import Path

from helpers.procs import fuse_mounts, run_cli


def assert_one_line_error(returncode: int, stderr: str, *fragments: str) -> str:
    """A failure as users must see it: non-zero exit, one `qcowfuse:` line naming the
    problem, no traceback.  Returns the line."""
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qcowfuse: ") and all(f in lines[0] for f in fragments), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def assert_refused(args: list[str], fragment: str, image: Path | None = None, mp: Path | None = None):
    before = image.read_bytes() if image is not None and image.exists() else None
    r = run_cli(*args)
    assert_one_line_error(r.returncode, r.stderr, fragment)
    if mp is not None:
        assert str(mp) not in fuse_mounts()
    if before is not None:
        assert image.read_bytes() == before
