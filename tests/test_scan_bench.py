"""scripts/bench.py --tools keeps working: a --quick run builds its images, runs every
command against qemu-img and prints its table and closing line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def test_bench_tools_quick(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--tools", "--quick", "--cache", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for image in ("big", "full", "zstd", "extl2"):
        for command in ("check", "repair leaks", "map json", "info json"):
            assert re.search(rf"^{image}\s+{command}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+", out, re.M), out
    assert "exit codes differ" not in out, out
    assert re.search(r"^bench --tools: \d+ passed, \d+ failed$", out, re.M), out
