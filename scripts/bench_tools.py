#!/usr/bin/env python3
"""Benchmark `qcowfuse check / check -r leaks / map / info` against the qemu-img commands
of the same name (run as `scripts/bench.py --tools`).

Images, built once and kept in the cache directory (rebuilt if missing or unclean):

  big      1 TiB, a 64 KiB write into each of its 2048 L2 tables (256 MiB file)
  full     8 GiB, 4 KiB clusters, every cluster written, one snapshot (refcounts of 2)
  zstd     `full` converted with zstd compression (compressed clusters)
  extl2    `full` converted to extended L2 entries (16 KiB clusters)
  meta     1 TiB with every cluster allocated (preallocation=metadata: 16.7 million
           allocated clusters, a sparse file), for the memory budget

For each image and command, qcowfuse and qemu-img run interleaved (alternating which
goes first) for several rounds; the table shows median wall time, peak RSS of the
process (from wait4), and the ratio qcowfuse/qemu-img.  "repair" first raises the
refcount of LEAKS clusters of the image in place, then runs `check -r leaks` (each
tool repairs its own freshly damaged image; the result is the clean image again).

Targets: bar ratio <= 3.0 for every row (counted as `N passed, M failed`), goal <= 1.0.

  scripts/bench.py --tools                   # full sizes; first run builds ~20 GiB of images
  scripts/bench.py --tools --quick           # small images, 1 round (keeps the script working)
  scripts/bench.py --tools --cache DIR --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
REPO = Path(__file__).resolve().parent.parent
BAR, GOAL = 3.0, 1.0
LEAKS = 20000
BUDGET_BASE, BUDGET_PER_CLUSTER = 64 * MiB, 5


class BenchError(Exception):
    pass


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if r.returncode:
        raise BenchError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()[:300]}")
    return r


def qemu_io_script(path: Path, commands: list[str], chunk: int = 512) -> None:
    """Many qemu-io commands, a few hundred per process."""
    for i in range(0, len(commands), chunk):
        args = ["qemu-io", "-f", "qcow2"]
        for c in commands[i:i + chunk]:
            args += ["-c", c]
        run(*args, str(path))


def clean(path: Path) -> bool:
    return path.exists() and subprocess.run(["qemu-img", "check", "-q", str(path)],
                                            capture_output=True).returncode == 0


@dataclass
class Sizes:
    big: int = TiB
    big_tables: int = 2048
    full: int = 8 * GiB


def build_images(cache: Path, sizes: Sizes, say) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{sizes.big >> 30}g{sizes.big_tables}-{sizes.full >> 20}m"
    big, full = cache / f"big-{tag}.qcow2", cache / f"full-{tag}.qcow2"
    zstd, extl2 = cache / f"zstd-{tag}.qcow2", cache / f"extl2-{tag}.qcow2"
    meta = cache / f"meta-{tag}.qcow2"
    if not clean(big):
        say(f"building {big.name}: {sizes.big >> 30} GiB, one 64 KiB write per L2 table")
        big.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", str(big), str(sizes.big))
        span = sizes.big // sizes.big_tables
        qemu_io_script(big, [f"write -q -P 1 {i * span} 64k" for i in range(sizes.big_tables)])
    if not clean(full):
        say(f"building {full.name}: {sizes.full >> 20} MiB, 4 KiB clusters, all written, a snapshot")
        full.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(full),
            str(sizes.full))
        step = min(256 * MiB, sizes.full)
        qemu_io_script(full, [f"write -q -P {i % 250 + 1} {i * step} {step}"
                              for i in range(sizes.full // step)], chunk=8)
        run("qemu-img", "snapshot", "-c", "s1", str(full))
        qemu_io_script(full, [f"write -q -P 7 {i * 64 * MiB} 1M" for i in range(sizes.full // (64 * MiB))])
    if not clean(zstd):
        say(f"building {zstd.name}: zstd-compressed copy")
        zstd.unlink(missing_ok=True)
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd",
            str(full), str(zstd))
    if not clean(meta):
        say(f"building {meta.name}: {sizes.big >> 30} GiB, every cluster allocated (metadata preallocation)")
        meta.unlink(missing_ok=True)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(meta),
            str(sizes.big))
    if not clean(extl2):
        say(f"building {extl2.name}: extended L2 copy (16 KiB clusters)")
        extl2.unlink(missing_ok=True)
        run("qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=16384,extended_l2=on",
            str(full), str(extl2))
    return {"big": big, "full": full, "zstd": zstd, "extl2": extl2, "meta": meta}


def cluster_size(path: Path) -> int:
    with open(path, "rb") as fh:
        return 1 << struct.unpack_from(">I", fh.read(24), 20)[0]


def leak(path: Path, count: int) -> None:
    """Raise the stored refcount of `count` clusters by one (16-bit refcounts: the
    images above use the default), in the first refcount blocks: leaks, nothing worse."""
    with open(path, "r+b") as fh:
        head = fh.read(104)
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        order = struct.unpack_from(">I", head, 96)[0]
        if order != 4:
            raise BenchError(f"{path.name}: leak() needs 16-bit refcounts")
        rt_off = struct.unpack_from(">Q", head, 48)[0]
        per_block = (1 << cluster_bits) // 2
        fh.seek(rt_off)
        table = struct.unpack(">512Q", fh.read(8 * 512))
        left = count
        for entry in table:
            block = entry & ~511
            if not block or not left:
                continue
            fh.seek(block)
            values = list(struct.unpack(f">{per_block}H", fh.read(2 * per_block)))
            for i, v in enumerate(values):
                if v and left:
                    values[i] = v + 1
                    left -= 1
            fh.seek(block)
            fh.write(struct.pack(f">{per_block}H", *values))


@dataclass
class Sample:
    wall: float
    rss_kib: int
    code: int


@dataclass
class Row:
    image: str
    command: str
    ours: list[Sample] = field(default_factory=list)
    theirs: list[Sample] = field(default_factory=list)

    @staticmethod
    def _med(samples: list[Sample], attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples)

    @property
    def ratio(self) -> float:
        return self._med(self.ours, "wall") / max(1e-6, self._med(self.theirs, "wall"))


def measure(args: list[str]) -> Sample:
    """Wall time and peak RSS of one command (wait4's rusage of that child only)."""
    start = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    return Sample(wall, usage.ru_maxrss, p.returncode)


COMMANDS = {
    "check": (["check"], ["check"]),
    "repair leaks": (["check", "-r", "leaks"], ["check", "-r", "leaks"]),
    "map json": (["map", "--output=json"], ["map", "--output=json"]),
    "info json": (["info", "--output=json"], ["info", "--output=json"]),
}


def find_qcowfuse() -> str:
    for cand in (Path(sys.executable).parent / "qcowfuse", REPO / ".venv/bin/qcowfuse"):
        if os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("qcowfuse")
    if not found:
        raise BenchError("qcowfuse not found (next to sys.executable, in .venv/bin, or on PATH)")
    return found


def byte_compile(qcowfuse: str) -> str:
    """Compile the measured package's modules, as pip does when it installs one: with
    PYTHONDONTWRITEBYTECODE set (or a read-only tree) every run would otherwise compile
    them from source again, a cost no installed copy pays."""
    with open(qcowfuse, "rb") as fh:
        first = fh.readline().decode(errors="replace")
    python = first[2:].strip() if first.startswith("#!") else sys.executable
    r = run(*python.split(), "-c", "import compileall, os, qcowfuse; "
            "d = os.path.dirname(qcowfuse.__file__); compileall.compile_dir(d, quiet=1); print(d)",
            cwd="/")  # not the caller's directory: the package that command imports
    return r.stdout.strip()


def bench(images: dict[str, Path], rounds: int, qcowfuse: str, say) -> list[Row]:
    rows = [Row(name, cmd) for name in images for cmd in COMMANDS]
    for r in range(rounds):
        for row in rows:
            path = str(images[row.image])
            ours_args, qemu_args = COMMANDS[row.command]
            order = [("ours", [qcowfuse, *ours_args, path]), ("theirs", ["qemu-img", *qemu_args, path])]
            if r % 2:
                order.reverse()
            for who, argv in order:
                if row.command.startswith("repair"):
                    leak(images[row.image], LEAKS)
                s = measure(argv)
                getattr(row, who).append(s)
                if row.command.startswith("repair") and not clean(images[row.image]):
                    raise BenchError(f"{who} left {row.image} unclean after repairing leaks")
        say(f"  round {r + 1}/{rounds} done")
    return rows


def table(rows: list[Row]) -> list[str]:
    out = [f"{'image':<7}{'command':<14}{'qcowfuse s':>11}{'qemu-img s':>11}{'ratio':>8}"
           f"{'qcowfuse MiB':>14}{'qemu-img MiB':>14}  bar"]
    for row in rows:
        codes = {s.code for s in row.ours} | {s.code for s in row.theirs}
        if len(codes) > 1:
            out.append(f"  note: exit codes differ for {row.image} {row.command}: "
                       f"qcowfuse {[s.code for s in row.ours]}, qemu-img {[s.code for s in row.theirs]}")
        med = Row._med
        out.append(f"{row.image:<7}{row.command:<14}{med(row.ours, 'wall'):>11.3f}"
                   f"{med(row.theirs, 'wall'):>11.3f}{row.ratio:>8.2f}"
                   f"{max(s.rss_kib for s in row.ours) / 1024:>14.1f}"
                   f"{max(s.rss_kib for s in row.theirs) / 1024:>14.1f}  "
                   f"{'PASS' if row.ratio <= BAR else 'MISS'}{' (goal)' if row.ratio <= GOAL else ''}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench.py --tools", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qcowfuse-bench-tools",
                   help="where the images are built once and kept (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per command (default 3)")
    p.add_argument("--quick", action="store_true", help="small images (16 GiB / 32 tables, 64 MiB), "
                                                        "one round")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    sizes = Sizes(16 * GiB, 32, 64 * MiB) if args.quick else Sizes()
    rounds = 1 if args.quick else args.rounds
    try:
        if not shutil.which("qemu-img"):
            raise BenchError("qemu-img not found")
        qcowfuse = find_qcowfuse()
        say(f"  byte-compiled {byte_compile(qcowfuse)} (as an install does)")
        images = build_images(args.cache, sizes, say)
        say(f"bench --tools: {qcowfuse} vs {run('qemu-img', '--version').stdout.splitlines()[0]}; "
            f"{rounds} round(s); load average {os.getloadavg()[0]:.2f}")
        for name, path in images.items():
            say(f"  {name}: {path} ({path.stat().st_size / MiB:.0f} MiB file)")
        rows = bench(images, rounds, qcowfuse, say)
    except BenchError as e:
        say(f"bench --tools: broken: {e}")
        return 2
    for line in ["", *table(rows), ""]:
        say(line)
    say(f"memory budget (qcowfuse check): {BUDGET_BASE >> 20} MiB (interpreter, numpy, a 1 MiB batch "
        f"of tables decoded) + {BUDGET_PER_CLUSTER} bytes per host cluster of the image file "
        f"(reference counts and COPIED notes); map and info: {BUDGET_BASE >> 20} MiB + the extents")
    for name, path in images.items():
        clusters = -(-path.stat().st_size // cluster_size(path))
        budget = BUDGET_BASE + BUDGET_PER_CLUSTER * clusters
        peak = max(s.rss_kib for r in rows if r.image == name and r.command == "check" for s in r.ours)
        say(f"  {name}: {clusters} host clusters: budget {budget / MiB:.0f} MiB, check peak "
            f"{peak / 1024:.0f} MiB {'within' if peak * 1024 <= budget else 'OVER'}")
    say(f"load average {os.getloadavg()[0]:.2f} at end")
    passed = sum(r.ratio <= BAR for r in rows)
    goal = sum(r.ratio <= GOAL for r in rows)
    say(f"goal (ratio <= {GOAL}): {goal} of {len(rows)}")
    say(f"bench --tools: {passed} passed, {len(rows) - passed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
