#!/usr/bin/env python3
"""Benchmark qcowfuse against its peers, the ceiling of its own stack, and a raw file.

Every job runs against these targets, interleaved per job, for several rounds:

  qcowfuse     the raw view of a fresh qcow2 image, mounted with the qcowfuse CLI
  qsd          qemu-storage-daemon's FUSE export of an identical fresh qcow2 image
  nbdfuse      libnbd's nbdfuse over qemu-nbd serving an identical fresh qcow2 image
  passthrough  a bare pyfuse3 + trio passthrough of a sparse raw file
               (scripts/bench_passthrough.py: the ceiling of qcowfuse's own stack)
  raw          a sparse raw file on the same filesystem (no FUSE hop at all)
  overlay      (read jobs only) qcowfuse -o overlay over an image filled through a
               plain qcowfuse mount: reads of what lies below a throwaway overlay

Each (job, round, target) gets a freshly created image, so first-touch allocation
is measured alike.  Jobs that read (or overwrite) allocated data fill the whole
region first through the same target, then unmount and mount again so the FUSE
page cache is cold (the host page cache of the image file stays warm for all).
fio runs psync; the 4 KiB jobs open the file O_DIRECT (--direct=1) on every target,
so each request reaches the daemon (per-request cost), the sequential jobs are
buffered (what users see with the page cache) and every write job ends with an fsync.
qcowfuse and the passthrough let the kernel cache the file (keep_cache), qsd's export
opens it direct_io, so buffered re-reads hit the page cache on those two only (the
reread job shows it: read, 4 KiB write, read again).  Jobs about qcow2 itself (the
refcount-boundary stream, ext4) run on raw, qsd and qcowfuse only.

Mounts happen in a private mount namespace (unshare(1); --no-unshare to skip), so
nothing else sees them or sweeps them away mid-run; loop devices are global and are
detached in every path (try/finally, SIGINT, SIGTERM, SIGHUP, last-resort sweep).

Prints a table (best and median per target, qcowfuse/qsd and qcowfuse/passthrough
ratios of medians), daemon
peak RSS and CPU seconds per GiB moved, the per-GiB rates of the refcount-boundary
stream, the targets met or missed, and a closing line `bench: N passed, M failed`.
Exit status 0 even when targets are missed; non-zero only if the benchmark broke.

  scripts/bench.py                        # 4G, 3 rounds, 10 s per fio job (~75 min)
  scripts/bench.py --size 2G --rounds 2 --runtime 5         # ~30 min on 2 cores
  scripts/bench.py --only seq-write-1M,randwrite-4K-1j --json out.json
  scripts/bench.py --quick                # tiny: keeps the script working (tests)
  scripts/bench.py --tools ...            # check/map/info vs qemu-img: scripts/bench_tools.py

Needs root, /dev/fuse, loop devices, fio, qemu-img, qemu-storage-daemon, e2fsprogs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
# its siblings (bench_tools) and the test suite's process helpers (tests/helpers), also
# when this file is imported rather than run
for _dir in (HERE, HERE.parent / "tests"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

import bench_tools  # noqa: E402
from helpers.procs import pid_alive, unescape_mount  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parent.parent
TARGETS = ("raw", "passthrough", "qsd", "nbdfuse", "qcowfuse", "overlay")
FIO_TARGETS = TARGETS[:-1]  # the jobs' default
READ_TARGETS = TARGETS  # read jobs also through -o overlay (the image's data, read below it)
QCOW2_TARGETS = ("raw", "qsd", "qcowfuse")  # for jobs about qcow2 itself
CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_ENV = "QCOWFUSE_BENCH_PRIVATE_NS"


# The benchmark itself broke (a tool failed, a mount did not come up): one class for
# this script and bench_tools, so whichever raises it, main reports it the same way.
BenchError = bench_tools.BenchError


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind through every finally, like KeyboardInterrupt."""


# --------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class Job:
    name: str
    unit: str                       # "MB/s", "IOPS" or "files/s"
    kind: str                       # "fio", "reread", "stream" or "ext4"
    fio: tuple[str, ...] = ()       # fio arguments besides file, size, runtime
    prefill: bool = False           # fill the region, remount, then measure
    time_based: bool = False        # run for --runtime (random jobs) instead of until size
    about: str = ""
    targets: tuple[str, ...] = FIO_TARGETS


REREADS = 5              # reread job: writes and rereads after the first read
SEQ = ("--bs=1M", "--end_fsync=1")
DIRECT = ("--direct=1",)            # 4 KiB jobs: every request reaches the daemon
WRITE_END = ("--end_fsync=1",)
JOBS = (
    Job("seq-write-1M", "MB/s", "fio", ("--rw=write",) + SEQ,
        about="sequential 1 MiB writes into a fresh image (first touch), fsync at the end"),
    Job("seq-overwrite-1M", "MB/s", "fio", ("--rw=write",) + SEQ, prefill=True,
        about="the same over an allocated region (for the fresh-vs-overwrite target)"),
    Job("seq-read-1M", "MB/s", "fio", ("--rw=read", "--bs=1M"), prefill=True, targets=READ_TARGETS,
        about="sequential 1 MiB reads of allocated data"),
    Job("randread-4K-1j", "IOPS", "fio", ("--rw=randread", "--bs=4k") + DIRECT, prefill=True,
        time_based=True, targets=READ_TARGETS,
        about="4 KiB O_DIRECT random reads of allocated data, 1 job"),
    Job("randread-4K-4j", "IOPS", "fio", ("--rw=randread", "--bs=4k", "--numjobs=4") + DIRECT,
        prefill=True, time_based=True, targets=READ_TARGETS,
        about="4 KiB O_DIRECT random reads of allocated data, 4 jobs"),
    Job("randwrite-4K-1j", "IOPS", "fio", ("--rw=randwrite", "--bs=4k") + DIRECT + WRITE_END,
        time_based=True, about="4 KiB O_DIRECT random writes into a fresh image, 1 job"),
    Job("randwrite-4K-4j", "IOPS", "fio",
        ("--rw=randwrite", "--bs=4k", "--numjobs=4") + DIRECT + WRITE_END,
        time_based=True, about="4 KiB O_DIRECT random writes into a fresh image, 4 jobs"),
    Job("randwrite-64K-fsync16", "IOPS", "fio",
        ("--rw=randwrite", "--bs=64k", "--fsync=16") + WRITE_END,
        time_based=True, about="64 KiB random writes, fsync every 16 writes"),
    Job("reread", "MB/s", "reread", prefill=True,
        about=f"read it all, then {REREADS} times: write 4 KiB, read it all again (value: median reread)"),
    Job("boundary-stream", "MB/s", "stream", targets=QCOW2_TARGETS,
        about="sequential 1 MiB writes across four refcount-block boundaries, per-GiB rates"),
    Job("ext4-untar", "files/s", "ext4", targets=QCOW2_TARGETS,
        about="losetup + mkfs.ext4 over the target, untar many small files, sync"),
)
JOB_BY_NAME = {j.name: j for j in JOBS}

# Targets for qcowfuse: (job, minimum qcowfuse/qsd ratio of medians).
RATIO_TARGETS = (
    ("seq-write-1M", 1.0), ("seq-read-1M", 1.0),
    ("randread-4K-1j", 0.8), ("randread-4K-4j", 0.8),
    ("randwrite-4K-1j", 0.8), ("randwrite-4K-4j", 0.8),
)
BOUNDARY_MIN = 0.90      # rate near refcount-block boundaries / rate away from them
FRESH_MIN = 0.80         # seq-write-1M (fresh) / seq-overwrite-1M (allocated)
# Against the ceiling of the stack: qcowfuse/passthrough per fio job (4 KiB jobs:
# the bar), and >= 1.0x qsd on the jobs where the passthrough reaches qsd.
PASSTHROUGH_MIN, PASSTHROUGH_4K_MIN = 0.95, 0.90
NBDFUSE_MIN = 1.0        # qcowfuse/nbdfuse on every job
REREAD_MIN = 2.0         # second read / first read: the second comes from the page cache


# ------------------------------------------------------------------------ results

@dataclass
class Sample:
    """One job run on one target in one round."""
    value: float                    # in the job's unit
    seconds: float                  # measured time
    bytes_moved: int                # bytes read + written through the target
    cpu_s: float | None = None      # daemon utime+stime during the measurement
    rss_kib: int | None = None      # daemon VmHWM at the end
    extra: dict = field(default_factory=dict)


@dataclass
class JobResult:
    job: str
    unit: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def values(self, target: str) -> list[float]:
        return [s.value for s in self.samples.get(target, [])]

    def best(self, target: str) -> float | None:
        v = self.values(target)
        return max(v) if v else None

    def median(self, target: str) -> float | None:
        v = self.values(target)
        return statistics.median(v) if v else None

    def ratio(self, peer: str = "qsd") -> float | None:
        q, f = self.median(peer), self.median("qcowfuse")
        return f / q if q and f is not None else None


@dataclass
class Check:
    name: str
    measured: float
    minimum: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.measured >= self.minimum


# ------------------------------------------------------------------- process bits

def run(*args: str, timeout: float | None = None, finish: bool = False) -> str:
    """Run a command in its own session (Ctrl-C reaches us first); stdout, or BenchError.
    On an interruption the command is killed, or with finish=True allowed to finish
    (a mount command: its daemon must be known to be unmounted)."""
    with subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError(f"{' '.join(args[:3])}... still running after {timeout:.0f} s") from None
        except BaseException:
            if finish:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=60)
            proc.kill()
            raise
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args[:3])}... failed ({proc.returncode}): "
                         f"{(err or out).strip()[-800:]}")
    return out


def mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, innermost last."""
    with open("/proc/self/mounts") as fh:
        return [(unescape_mount(p[1]), p[2]) for p in (line.split() for line in fh)]


def is_mounted(path: Path) -> bool:
    return any(mp == str(path) for mp, _ in mounts())


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds utime+stime, VmHWM KiB) of a live process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(") ", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
    hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return cpu, hwm


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return None


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def fuse_unmount(path: Path, timeout: float = 60) -> None:
    """fusermount3 -u, retrying while busy (a loop device lets go asynchronously)."""
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        r = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, text=True)
        if r.returncode == 0:
            break
        if time.monotonic() > deadline:
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
            raise BenchError(f"{path}: still busy after {timeout:.0f} s, unmounted lazily")
        time.sleep(0.2)


def stop_pid(pid: int, timeout: float = 120) -> None:
    """Wait for a daemon to exit on its own; SIGTERM, then SIGKILL if it does not."""
    if wait_until(lambda: not pid_alive(pid), timeout):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_until(lambda: not pid_alive(pid), 10):
            break
    raise BenchError(f"daemon {pid} did not exit after unmount")


# ------------------------------------------------------------------------ targets

@dataclass
class Attached:
    path: Path                      # the raw file to run I/O against
    pids: tuple[int, ...] = ()      # the serving processes (none for the raw file)


class Target:
    name = ""

    def __init__(self, bench: "Bench") -> None:
        self.bench = bench

    def create(self, image: Path, size: int, cluster_size: int | None = None) -> None:
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        opts = [f"cluster_size={cluster_size}"] if cluster_size else []
        if self.bench.cfg.luks:
            args += LUKS_OBJECT
            opts += ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=100"]
        if opts:
            args += ["-o", ",".join(opts)]
        for attempt in range(5):  # LUKS creation times its key derivation, which may fail
            try:                  # with "Unable to get accurate CPU usage" on a busy machine
                run(*args, str(image), str(size))
                return
            except BenchError:
                if not self.bench.cfg.luks or attempt == 4:
                    raise

    @contextlib.contextmanager
    def attached(self, image: Path) -> Iterator[Attached]:
        raise NotImplementedError


class RawTarget(Target):
    name = "raw"

    def create(self, image: Path, size: int, cluster_size: int | None = None) -> None:
        with open(image, "wb") as fh:
            fh.truncate(size)

    @contextlib.contextmanager
    def attached(self, image: Path) -> Iterator[Attached]:
        yield Attached(image)


class QcowfuseTarget(Target):
    name = "qcowfuse"
    mount_options: tuple[str, ...] = ()

    @contextlib.contextmanager
    def attached(self, image: Path) -> Iterator[Attached]:
        mnt, pidfile = image.with_suffix(".mnt"), image.with_suffix(".pid")
        mnt.touch()
        pid = None
        try:
            try:
                options = [o for o in (self.bench.cfg.qcowfuse_options, *self.mount_options) if o]
                if self.bench.cfg.luks:
                    options.append(f"key-file={self.bench.key_file()}")
                opts = ["-o", ",".join(options)] if options else []
                run(self.bench.qcowfuse, *opts, str(image), str(mnt), "--pidfile", str(pidfile),
                    timeout=120, finish=True)
            finally:  # the daemon writes its pid once the mount is live
                pid = read_pid(pidfile)
                if pid:
                    self.bench.guard_pid(pid)
            yield Attached(mnt, (pid,) if pid else ())
        finally:
            fuse_unmount(mnt)
            if pid:
                stop_pid(pid)
                self.bench.release_pid(pid)
            mnt.unlink(missing_ok=True)


class OverlayTarget(QcowfuseTarget):
    """qcowfuse -o overlay: the image read-only below a throwaway overlay (filled through a
    plain qcowfuse mount, since what is written through this one vanishes)."""
    name = "overlay"
    mount_options = ("overlay",)


class ForegroundTarget(Target):
    """A FUSE server that runs in the foreground until SIGTERM, which makes it unmount
    and exit; the raw file is its mount point (an existing regular file)."""

    def command(self, image: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    @contextlib.contextmanager
    def attached(self, image: Path) -> Iterator[Attached]:
        mnt, log = image.with_suffix(".mnt"), image.with_suffix(f".{self.name}.log")
        mnt.touch()
        with open(log, "wb") as logfh:
            proc = subprocess.Popen(self.command(image, mnt), stdin=subprocess.DEVNULL,
                                    stdout=logfh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.bench.guard_pid(proc.pid)
        try:
            if not wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, 30):
                raise BenchError(f"{self.name}: not mounted after 30 s")
            if proc.poll() is not None:
                raise BenchError(f"{self.name} exited ({proc.returncode}): "
                                 f"{log.read_text(errors='replace').strip()[-800:]}")
            yield Attached(mnt, (proc.pid,))
        finally:
            stop_process(proc, mnt)
            self.bench.release_pid(proc.pid)
            mnt.unlink(missing_ok=True)
            log.unlink(missing_ok=True)


def stop_process(proc: subprocess.Popen, mnt: Path) -> None:
    """SIGTERM (qsd flushes, removes its export and exits), then make sure it is unmounted."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if is_mounted(mnt):
        fuse_unmount(mnt)


class QsdTarget(ForegroundTarget):
    name = "qsd"

    def command(self, image: Path, mnt: Path) -> list[str]:
        luks = self.bench.cfg.luks
        return ["qemu-storage-daemon", *(LUKS_OBJECT if luks else []),
                "--blockdev", f"driver=file,node-name=file,filename={image}",
                "--blockdev", "driver=qcow2,node-name=qcow2,file=file"
                + (",encrypt.format=luks,encrypt.key-secret=sec0" if luks else ""),
                "--export", f"type=fuse,id=exp,node-name=qcow2,mountpoint={mnt},writable=on"]


class PassthroughTarget(ForegroundTarget):
    """scripts/bench_passthrough.py over a sparse raw file, run by the Python that has
    qcowfuse's pyfuse3 and trio."""
    name = "passthrough"

    def create(self, image: Path, size: int, cluster_size: int | None = None) -> None:
        RawTarget.create(self, image, size)

    def command(self, image: Path, mnt: Path) -> list[str]:
        return [self.bench.python, str(REPO / "scripts" / "bench_passthrough.py"), str(image), str(mnt)]


class NbdfuseTarget(Target):
    """libnbd's nbdfuse (a directory holding the file) over qemu-nbd on a Unix socket."""
    name = "nbdfuse"

    @contextlib.contextmanager
    def attached(self, image: Path) -> Iterator[Attached]:
        mnt, log = image.with_suffix(".nbdmnt"), image.with_suffix(".nbd.log")
        sockdir = Path(tempfile.mkdtemp(prefix="qcowfuse-bench-nbd."))  # socket paths are short
        sock = sockdir / "sock"
        mnt.mkdir()
        procs: list[subprocess.Popen] = []
        try:
            with open(log, "wb") as logfh:
                # without --persistent qemu-nbd exits once its one client disconnects
                procs.append(subprocess.Popen(
                    ["qemu-nbd", "-f", "qcow2", "-k", str(sock), str(image)],
                    stdin=subprocess.DEVNULL, stdout=logfh, stderr=subprocess.STDOUT,
                    start_new_session=True))
                self.bench.guard_pid(procs[0].pid)
                if not wait_until(lambda: sock.exists() or procs[0].poll() is not None, 30):
                    raise BenchError("qemu-nbd: no socket after 30 s")
                procs.append(subprocess.Popen(
                    ["nbdfuse", str(mnt / "disk.raw"), "--unix", str(sock)],
                    stdin=subprocess.DEVNULL, stdout=logfh, stderr=subprocess.STDOUT,
                    start_new_session=True))
                self.bench.guard_pid(procs[1].pid)
            if not wait_until(lambda: is_mounted(mnt) or any(p.poll() is not None for p in procs), 30):
                raise BenchError("nbdfuse: not mounted after 30 s")
            if any(p.poll() is not None for p in procs):
                raise BenchError(f"nbdfuse/qemu-nbd exited: {log.read_text(errors='replace').strip()[-800:]}")
            yield Attached(mnt / "disk.raw", tuple(p.pid for p in procs))
        finally:
            if is_mounted(mnt):
                fuse_unmount(mnt)
            for p in reversed(procs):  # nbdfuse, then qemu-nbd (it flushes and exits)
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                self.bench.release_pid(p.pid)
            mnt.rmdir()
            shutil.rmtree(sockdir, ignore_errors=True)
            log.unlink(missing_ok=True)


# ---------------------------------------------------------------------- measuring

class Meter:
    """CPU and peak RSS of the daemon behind an attached target, over one measurement."""

    def __init__(self, a: Attached) -> None:
        self.pids = a.pids
        self.cpu0 = sum(proc_usage(p)[0] for p in self.pids)

    def finish(self, sample: Sample) -> Sample:
        """CPU summed over the serving processes; peak RSS summed too (nbdfuse + qemu-nbd)."""
        if self.pids:
            usage = [proc_usage(p) for p in self.pids]
            sample.cpu_s = sum(u[0] for u in usage) - self.cpu0
            sample.rss_kib = sum(u[1] for u in usage)
        return sample


def fio(path: Path, args: tuple[str, ...], size: int, runtime: float | None,
        time_based: bool, out: Path) -> dict:
    """Run one fio job on path; its JSON summary (group reporting)."""
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--size={size}",
           "--ioengine=psync", "--direct=0", "--invalidate=0", "--fallocate=none",
           "--allow_file_create=0", "--group_reporting", "--output-format=json",
           f"--output={out}", *args]
    if runtime:
        cmd.append(f"--runtime={int(runtime * 1000)}ms")
        if time_based:
            cmd.append("--time_based")
    run(*cmd, timeout=(runtime or 0) + 900)
    data = json.loads(out.read_text())
    out.unlink()
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio on {path}: error {job['error']}")
    return job


def fio_sample(job: Job, summary: dict) -> Sample:
    rd, wr = summary["read"], summary["write"]
    moved = rd["io_bytes"] + wr["io_bytes"]
    seconds = max(rd["runtime"], wr["runtime"]) / 1000  # job_runtime sums over numjobs
    if job.unit == "IOPS":
        value = rd["iops"] + wr["iops"]
    else:
        value = (rd["bw_bytes"] + wr["bw_bytes"]) / 1e6
    return Sample(value, seconds, moved)


def stream_write(path: Path, length: int, chunk: int) -> tuple[list[float], float]:
    """Write [0, length) sequentially in `chunk` writes, then fdatasync.
    Returns the seconds each write took and the total (with the fdatasync)."""
    buf = os.urandom(chunk)
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        start = last = time.perf_counter()
        for off in range(0, length, chunk):
            os.pwrite(fd, buf[:min(chunk, length - off)], off)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        os.fdatasync(fd)
        return times, time.perf_counter() - start
    finally:
        os.close(fd)


def read_all(path: Path, length: int, chunk: int = MiB) -> float:
    """Seconds to read [0, length) sequentially through the page cache."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        start = time.perf_counter()
        done = 0
        while done < length:
            n = fh.readinto(view)
            if not n:
                break
            done += n
        return time.perf_counter() - start


def rate_per_bin(times: list[float], chunk: int, bin_size: int) -> list[float]:
    """MB/s over consecutive bins of bin_size bytes (the last may be shorter)."""
    per = bin_size // chunk
    return [len(ts) * chunk / sum(ts) / 1e6 for ts in (times[i:i + per] for i in range(0, len(times), per))]


def boundary_rates(times: list[float], chunk: int, spacing: int) -> tuple[float, float]:
    """(MB/s near, MB/s away from) refcount-block boundaries, by guest offset.

    "Near k" is the spacing/8 centred on the boundary k*spacing (k >= 1), "away j"
    the spacing/4 centred between boundaries j and j+1.  Each near window is compared
    with the mean of its neighbouring away windows, so a slow drift over the whole
    stream (host dirty-page throttling) does not pass for a boundary effect; the
    result is the mean near rate and the mean of those local references.  Host offsets
    run a few clusters (header, tables) ahead of guest offsets: negligible here."""
    acc: dict[tuple[str, int], list[float]] = {}  # window -> [seconds, bytes]
    for i, t in enumerate(times):
        mid = i * chunk + chunk / 2
        k = round(mid / spacing)
        if k >= 1 and abs(mid - k * spacing) < spacing / 16:
            key = ("near", k)
        elif abs(mid - k * spacing) >= 3 * spacing / 8:
            key = ("away", int(mid // spacing))
        else:
            continue
        acc.setdefault(key, [0.0, 0])
        acc[key][0] += t
        acc[key][1] += chunk
    rate = {key: nbytes / t / 1e6 for key, (t, nbytes) in acc.items()}
    pairs = []
    for (kind, k), r in rate.items():
        refs = [rate[("away", j)] for j in (k - 1, k) if ("away", j) in rate]
        if kind == "near" and refs:
            pairs.append((r, statistics.mean(refs)))
    if not pairs:
        return 0.0, 0.0
    return statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)


# ------------------------------------------------------------------------- bench

@dataclass
class Config:
    size: int
    rounds: int
    runtime: float
    quick: bool
    stream_size: int
    stream_cluster: int
    tar_max_files: int
    tar_max_bytes: int
    qcowfuse_options: str = ""  # -o list for the qcowfuse mount, e.g. "direct_io"
    cold: bool = False  # drop the host page cache after each prefill (images bigger than RAM)
    luks: bool = False  # qcow2 targets use LUKS-encrypted images (aes-256-xts, QEMU's default)

    @property
    def refcount_spacing(self) -> int:
        """Host bytes covered by one refcount block (16-bit refcounts, qemu-img's default)."""
        return (self.stream_cluster // 2) * self.stream_cluster


def drop_host_page_cache() -> None:
    """What users with images bigger than RAM meet: nothing of the image cached."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


LUKS_PASSPHRASE = "bench-secret"
LUKS_OBJECT = ["--object", f"secret,id=sec0,data={LUKS_PASSPHRASE}"]


class Bench:
    def key_file(self) -> Path:
        """The LUKS passphrase for qcowfuse's -o key-file= (--luks)."""
        path = self.workdir / "luks.key"
        if not path.exists():
            path.write_text(LUKS_PASSPHRASE)
        return path

    def __init__(self, cfg: Config, workdir: Path, qcowfuse: str) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.qcowfuse = qcowfuse
        py = Path(qcowfuse).parent / "python"  # the one with qcowfuse's pyfuse3 and trio
        self.python = str(py) if os.access(py, os.X_OK) else sys.executable
        self.targets = {t.name: t for t in (RawTarget(self), PassthroughTarget(self), QsdTarget(self),
                                            NbdfuseTarget(self), QcowfuseTarget(self), OverlayTarget(self))}
        self.pids: set[int] = set()      # daemons alive, for the last-resort sweep
        self.tarball: Path | None = None
        self.tar_files = 0

    # bookkeeping for cleanup ---------------------------------------------------
    def guard_pid(self, pid: int) -> None:
        self.pids.add(pid)

    def release_pid(self, pid: int) -> None:
        self.pids.discard(pid)

    # running -------------------------------------------------------------------
    def run_job(self, job: Job, progress: Callable[[str], None]) -> JobResult:
        result = JobResult(job.name, job.unit)
        names = job.targets
        for rnd in range(self.cfg.rounds):
            k = rnd % len(names)
            order = names[k:] + names[:k]  # rotate who goes first
            for name in order:
                t0 = time.monotonic()
                sample = self.run_once(job, self.targets[name], rnd)
                result.samples.setdefault(name, []).append(sample)
                progress(f"  {job.name:22} round {rnd + 1} {name:9} {fmt(sample.value, job.unit):>9}"
                         f" {job.unit:7} ({time.monotonic() - t0:.1f} s)")
        return result

    def run_once(self, job: Job, target: Target, rnd: int) -> Sample:
        image = self.workdir / f"{job.name}.{target.name}.r{rnd}.img"
        try:
            if job.kind == "stream":
                target.create(image, self.cfg.stream_size, self.cfg.stream_cluster)
                return self.measure_stream(target, image)
            target.create(image, self.cfg.size)
            if job.prefill:
                self.prefill(target, image)
                if self.cfg.cold:
                    drop_host_page_cache()
            if job.kind == "ext4":
                return self.measure_ext4(target, image)
            if job.kind == "reread":
                return self.measure_reread(target, image)
            return self.measure_fio(job, target, image)
        finally:
            image.unlink(missing_ok=True)

    def prefill(self, target: Target, image: Path) -> None:
        """Allocate the whole region through the target; unmounting drops the FUSE cache."""
        if isinstance(target, OverlayTarget):
            target = self.targets["qcowfuse"]  # fill the image itself
        with target.attached(image) as a:
            fio(a.path, ("--rw=write", "--bs=1M", "--end_fsync=1"), self.cfg.size, None, False,
                self.workdir / "prefill.json")

    def measure_fio(self, job: Job, target: Target, image: Path) -> Sample:
        with target.attached(image) as a:
            meter = Meter(a)
            summary = fio(a.path, job.fio, self.cfg.size, self.cfg.runtime, job.time_based,
                          self.workdir / "fio.json")
            return meter.finish(fio_sample(job, summary))

    def measure_reread(self, target: Target, image: Path) -> Sample:
        """Read the region, then REREADS times: write 4 KiB in its middle and read it all
        again.  With a page cache that survives the write, the rereads come from the
        cache; the value is their median (one reread is ~0.1 s: too short alone)."""
        size = self.cfg.size
        with target.attached(image) as a:
            meter = Meter(a)
            first = read_all(a.path, size)
            rereads = []
            for k in range(REREADS):
                fd = os.open(a.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.pwrite(fd, os.urandom(4 * KiB), size // 2 + k * 4 * KiB)
                finally:
                    os.close(fd)
                os.stat(a.path)
                rereads.append(read_all(a.path, size))
            second = statistics.median(rereads)
            sample = meter.finish(Sample(size / second / 1e6, second,
                                         size + REREADS * (size + 4 * KiB)))
        sample.extra = {"first_mb_s": size / first / 1e6, "second_mb_s": size / second / 1e6}
        return sample

    def measure_stream(self, target: Target, image: Path) -> Sample:
        """Per-GiB rates (half the refcount-block spacing) and near/away-from-boundary rates."""
        cfg = self.cfg
        spacing = cfg.refcount_spacing
        chunk, bin_size = min(MiB, spacing // 32), spacing // 2
        with target.attached(image) as a:
            meter = Meter(a)
            times, total = stream_write(a.path, cfg.stream_size, chunk)
            sample = meter.finish(Sample(cfg.stream_size / total / 1e6, total, cfg.stream_size))
        near, away = boundary_rates(times, chunk, spacing)
        sample.extra = {"bin_bytes": bin_size, "bin_mb_s": rate_per_bin(times, chunk, bin_size),
                        "near_mb_s": near, "away_mb_s": away}
        return sample

    def measure_ext4(self, target: Target, image: Path) -> Sample:
        tarball = self.ensure_tarball()
        guest = self.workdir / f"{image.name}.guest"
        with target.attached(image) as a, self.loop_device(a.path) as dev:
            meter = Meter(a)
            io0 = loop_bytes(dev)
            t0 = time.perf_counter()
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                dev)
            t_mkfs = time.perf_counter() - t0
            with self.fs_mounted(dev, guest):
                t1 = time.perf_counter()
                run("tar", "-xf", str(tarball), "-C", str(guest))
                run("sync", "-f", str(guest))
                t_untar = time.perf_counter() - t1
            moved = loop_bytes(dev) - io0
            sample = Sample(self.tar_files / t_untar, t_untar, moved,
                            extra={"mkfs_s": t_mkfs, "untar_sync_s": t_untar,
                                   "files": self.tar_files,
                                   "tar_bytes": tarball.stat().st_size})
            return meter.finish(sample)

    @contextlib.contextmanager
    def loop_device(self, path: Path) -> Iterator[str]:
        dev = run("losetup", "-f", "--show", str(path)).strip()
        try:
            yield dev
        finally:
            run("losetup", "-d", dev)

    @contextlib.contextmanager
    def fs_mounted(self, dev: str, where: Path) -> Iterator[Path]:
        where.mkdir(exist_ok=True)
        run("mount", "-t", "ext4", dev, str(where))
        try:
            yield where
        finally:
            run("umount", str(where))
            where.rmdir()

    def ensure_tarball(self) -> Path:
        """Many small files from /usr/share/doc and /usr/lib/python3*, built once."""
        if self.tarball is None:
            self.tarball = self.workdir / "files.tar"
            self.tar_files = make_tarball(self.tarball, self.cfg.tar_max_files,
                                          self.cfg.tar_max_bytes)
        return self.tarball

    # cleanup -------------------------------------------------------------------
    def sweep(self) -> list[str]:
        """Last resort after any failure: nothing of ours stays mounted, attached or running."""
        problems = []
        root = str(self.workdir) + "/"
        for pidfile in self.workdir.glob("*.pid"):  # qcowfuse daemons remove theirs at exit
            pid = read_pid(pidfile)
            if pid:
                self.pids.add(pid)
        for mp, fstype in reversed(mounts()):
            if mp.startswith(root) and not fstype.startswith("fuse"):
                problems.append(f"unmounted leftover {mp}")
                if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", mp], capture_output=True)
        for dev, backing in loop_devices():
            if backing.startswith(root):
                problems.append(f"detached leftover {dev}")
                subprocess.run(["losetup", "-d", dev], capture_output=True)
        for mp, fstype in reversed(mounts()):
            if mp.startswith(root) and fstype.startswith("fuse"):
                problems.append(f"unmounted leftover {mp}")
                try:
                    fuse_unmount(Path(mp), timeout=20)
                except BenchError:
                    pass
        for pid in sorted(self.pids):
            if pid_alive(pid):
                problems.append(f"stopped leftover daemon {pid}")
                with contextlib.suppress(BenchError):
                    stop_pid(pid, timeout=5)
        return problems


def loop_devices() -> list[tuple[str, str]]:
    r = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [(d["name"], (d.get("back-file") or "").removesuffix(" (deleted)"))
            for d in json.loads(r.stdout).get("loopdevices", [])]


def loop_bytes(dev: str) -> int:
    """Bytes read + written by a block device so far (sectors of 512 bytes)."""
    fields = Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()
    return (int(fields[2]) + int(fields[6])) * 512


def make_tarball(out: Path, max_files: int, max_bytes: int) -> int:
    """An uncompressed tar of regular files (no symlinks); returns the number of files."""
    sources = [Path("/usr/share/doc"), *sorted(Path("/usr/lib").glob("python3*"))]
    count = total = 0
    with tarfile.open(out, "w") as tar:
        for src in sources:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                for name in sorted(filenames):
                    p = Path(dirpath, name)
                    if p.is_symlink() or not p.is_file():
                        continue
                    size = p.stat().st_size
                    if count >= max_files or total + size > max_bytes:
                        return count
                    tar.add(p, arcname=str(p.relative_to("/")), recursive=False)
                    count += 1
                    total += size
    if count == 0:
        raise BenchError("no files found for the ext4 job's tarball")
    return count


# ------------------------------------------------------------------------ report

def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "IOPS" and v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


RATIO_COLUMNS = (("qsd", "qcowfuse/qsd"), ("passthrough", "qcowfuse/passthrough"),
                 ("nbdfuse", "qcowfuse/nbdfuse"), ("overlay", "qcowfuse/overlay"))


def table(results: list[JobResult]) -> list[str]:
    lines = [f"{'job':22} {'unit':7} " + " ".join(f"{t + ' best/med':>{max(17, len(t) + 9)}}" for t in TARGETS)
             + "".join(f" {title:>{len(title)}}" for _, title in RATIO_COLUMNS)]
    for r in results:
        cells = [f"{fmt(r.best(t), r.unit) + ' / ' + fmt(r.median(t), r.unit):>{max(17, len(t) + 9)}}"
                 for t in TARGETS]
        ratios = []
        for peer, title in RATIO_COLUMNS:
            ratio = r.ratio(peer)
            ratios.append(f" {(f'{ratio:.2f}x' if ratio is not None else '-'):>{len(title)}}")
        lines.append(f"{r.job:22} {r.unit:7} " + " ".join(cells) + "".join(ratios))
    return lines


DAEMONS = ("passthrough", "qsd", "nbdfuse", "qcowfuse", "overlay")


def resources(results: list[JobResult]) -> list[str]:
    lines = [f"{'daemon peak RSS, CPU s/GiB':27} "
             + " ".join(f"{t + ' RSS':>16} {'CPU':>5}" for t in DAEMONS)]
    for r in results:
        cells = []
        for t in DAEMONS:
            w = 16
            ss = r.samples.get(t, [])
            rss = max((s.rss_kib or 0) for s in ss) if ss else 0
            gib = sum(s.bytes_moved for s in ss) / GiB
            cpu = sum(s.cpu_s or 0 for s in ss)
            cells.append(f"{(f'{rss / 1024:.0f} MiB' if ss else '-'):>{w}} "
                         f"{(f'{cpu / gib:.2f}' if gib else '-'):>5}")
        lines.append(f"{r.job:27} " + " ".join(cells))
    return lines


def stream_lines(r: JobResult) -> list[str]:
    lines = []
    for t in TARGETS:
        ss = r.samples.get(t, [])
        if not ss:
            continue
        bin_bytes = ss[0].extra["bin_bytes"]
        per_bin = [statistics.median(col) for col in zip(*(s.extra["bin_mb_s"] for s in ss))]
        near = statistics.median(s.extra["near_mb_s"] for s in ss)
        away = statistics.median(s.extra["away_mb_s"] for s in ss)
        unit = "GiB" if bin_bytes == GiB else f"{bin_bytes // MiB} MiB"
        lines.append(f"boundary-stream {t:9} MB/s per {unit}: " + " ".join(f"{x:.0f}" for x in per_bin)
                     + f"  | near {near:.0f}, away {away:.0f}; last/first {per_bin[-1] / per_bin[0]:.2f}")
    return lines


def ext4_lines(r: JobResult) -> list[str]:
    lines = []
    for t in TARGETS:
        ss = r.samples.get(t, [])
        if ss:
            e = ss[0].extra
            lines.append(f"ext4-untar {t:9} {e['files']} files, {e['tar_bytes'] / MiB:.0f} MiB: "
                         f"untar+sync s " + " ".join(f"{s.extra['untar_sync_s']:.2f}" for s in ss)
                         + ", mkfs s " + " ".join(f"{s.extra['mkfs_s']:.2f}" for s in ss))
    return lines


def checks(results: dict[str, JobResult]) -> list[Check]:
    out = []
    for name, minimum in RATIO_TARGETS:
        r = results.get(name)
        if r and r.ratio() is not None:
            out.append(Check(f"{name} qcowfuse/qsd", r.ratio(), minimum,
                             f"{fmt(r.median('qcowfuse'), r.unit)} vs {fmt(r.median('qsd'), r.unit)} "
                             f"{r.unit}"))
    r = results.get("boundary-stream")
    if r and r.samples.get("qcowfuse"):
        near = statistics.median(s.extra["near_mb_s"] for s in r.samples["qcowfuse"])
        away = statistics.median(s.extra["away_mb_s"] for s in r.samples["qcowfuse"])
        if near and away:
            out.append(Check("boundary-stream qcowfuse near/away refcount-block boundaries",
                             near / away, BOUNDARY_MIN, f"{near:.0f} vs {away:.0f} MB/s"))
    for name, r in results.items():
        if JOB_BY_NAME[name].kind not in ("fio", "reread"):
            continue
        four_k = "-4K-" in name
        minimum = PASSTHROUGH_4K_MIN if four_k else PASSTHROUGH_MIN
        pt, qsd, nbd = r.ratio("passthrough"), r.ratio("qsd"), r.ratio("nbdfuse")
        unit = r.unit
        if pt is not None:
            out.append(Check(f"{name} qcowfuse/passthrough", pt, minimum,
                             f"{fmt(r.median('qcowfuse'), unit)} vs {fmt(r.median('passthrough'), unit)} {unit}"))
        if qsd is not None and (r.median("passthrough") or 0) >= (r.median("qsd") or 0) > 0:
            out.append(Check(f"{name} qcowfuse/qsd where the passthrough reaches qsd", qsd, 1.0,
                             f"{fmt(r.median('qcowfuse'), unit)} vs {fmt(r.median('qsd'), unit)} {unit}"))
        if nbd is not None:
            out.append(Check(f"{name} qcowfuse/nbdfuse", nbd, NBDFUSE_MIN,
                             f"{fmt(r.median('qcowfuse'), unit)} vs {fmt(r.median('nbdfuse'), unit)} {unit}"))
    r = results.get("reread")
    if r and r.samples.get("qcowfuse"):
        first = statistics.median(s.extra["first_mb_s"] for s in r.samples["qcowfuse"])
        second = statistics.median(s.extra["second_mb_s"] for s in r.samples["qcowfuse"])
        out.append(Check("reread qcowfuse second read / first read (page cache kept)",
                         second / first, REREAD_MIN, f"{second:.0f} vs {first:.0f} MB/s"))
    fresh, over = results.get("seq-write-1M"), results.get("seq-overwrite-1M")
    if fresh and over and fresh.median("qcowfuse") and over.median("qcowfuse"):
        f, o = fresh.median("qcowfuse"), over.median("qcowfuse")
        out.append(Check("qcowfuse fresh allocation / overwrite (seq 1M)", f / o, FRESH_MIN,
                         f"{f:.0f} vs {o:.0f} MB/s"))
    return out


def source_version() -> str:
    """Commit of the qcowfuse source tree this repo holds, '-dirty' if qcowfuse/ has edits
    (the editable install runs whatever is on disk when a daemon starts)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "qcowfuse"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def machine_facts() -> dict:
    qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True)
    fio_v = subprocess.run(["fio", "--version"], capture_output=True, text=True)
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "python": platform.python_version(),
            "qsd": qsd.stdout.splitlines()[0] if qsd.stdout else "?",
            "fio": fio_v.stdout.strip()}


# ---------------------------------------------------------------------- main

def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size '{text}' (e.g. 512M, 4G)")
    return int(float(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench.py", description=__doc__.split("\n\n")[0],
        epilog="jobs: " + ", ".join(j.name for j in JOBS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, help="image size for the main jobs (default 4G; "
                   "the boundary stream writes max(size, 9G))")
    p.add_argument("--rounds", type=int, help="rounds per job (default 3)")
    p.add_argument("--runtime", type=float, help="seconds per fio job (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (64M), 1 s runtime, 1 round: keeps the script working")
    p.add_argument("--dir", type=Path, help="where to work: a fresh subdirectory is made here and "
                   "removed at the end (default /var/tmp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write machine-readable results here")
    p.add_argument("--only", metavar="JOB[,JOB...]", help="run only these jobs")
    p.add_argument("--targets", metavar="T[,T...]",
                   help=f"run only these targets (default all: {','.join(TARGETS)})")
    p.add_argument("--qcowfuse", metavar="CMD", help="the qcowfuse command to measure (default: next "
                   "to this Python, else the repo's .venv, else PATH), e.g. another build's")
    p.add_argument("--qcowfuse-options", default="", metavar="OPT[,OPT...]",
                   help="mount options for qcowfuse, e.g. direct_io (default: none)")
    p.add_argument("--cold", action="store_true",
                   help="drop the host page cache (sync; echo 3 > /proc/sys/vm/drop_caches) "
                        "after each prefill, so reads meet the disk as with images bigger "
                        "than RAM (needs root)")
    p.add_argument("--luks", action="store_true",
                   help="the qcow2 targets (qsd, qcowfuse) use LUKS-encrypted images with the "
                        "same secret (encrypt.format=luks, QEMU's default cipher); nbdfuse and "
                        "overlay are left out")
    p.add_argument("--no-unshare", action="store_true",
                   help="mount in the caller's mount namespace (default: a private one, so "
                        "other processes neither see nor unmount the benchmark's mounts)")
    return p


def make_config(args: argparse.Namespace) -> Config:
    q = args.quick
    size = args.size or (64 * MiB if q else 4 * GiB)
    cluster = 4 * KiB if q else 64 * KiB   # 4K: a refcount block every 8 MiB, 64K: every 2 GiB
    spacing = (cluster // 2) * cluster
    stream = max(size, 9 * spacing // 2) if not q else max(size, 4 * spacing + spacing // 2)
    return Config(size=size, rounds=args.rounds or (1 if q else 3),
                  runtime=args.runtime or (1.0 if q else 10.0), quick=q,
                  stream_size=-(-stream // MiB) * MiB, stream_cluster=cluster,
                  tar_max_files=300 if q else 20000, tar_max_bytes=(4 if q else 300) * MiB,
                  qcowfuse_options=args.qcowfuse_options, cold=args.cold, luks=args.luks)


def select_jobs(only: str | None, targets: str | None = None) -> list[Job]:
    jobs = list(JOBS)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in JOB_BY_NAME]
        if unknown:
            raise SystemExit(f"bench: unknown job(s) {', '.join(unknown)}; "
                             f"jobs: {', '.join(JOB_BY_NAME)}")
        jobs = [j for j in jobs if j.name in names]
    if targets:
        keep = [t.strip() for t in targets.split(",") if t.strip()]
        unknown = [t for t in keep if t not in TARGETS]
        if unknown:
            raise SystemExit(f"bench: unknown target(s) {', '.join(unknown)}; targets: {', '.join(TARGETS)}")
        jobs = [replace(j, targets=tuple(t for t in j.targets if t in keep)) for j in jobs]
    return jobs


find_qcowfuse = bench_tools.find_qcowfuse  # next to this Python, else the repo's .venv, else PATH


def preflight() -> None:
    missing = [t for t in ("fio", "qemu-img", "qemu-storage-daemon", "qemu-nbd", "nbdfuse",
                           "fusermount3", "losetup", "mkfs.ext4", "tar") if not shutil.which(t)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise BenchError("needs root (FUSE exports, loop devices, mount)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing")


def enter_private_mount_namespace() -> None:
    """Re-exec under unshare(1) with private mount propagation: our FUSE and ext4 mounts
    are then invisible to everything else (desktop mount watchers, test suites that sweep
    FUSE mounts they did not make) and vanish with the last process of the namespace.
    Loop devices are global either way; the cleanup detaches them."""
    if os.environ.get(NS_ENV) or not shutil.which("unshare"):
        return
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        return  # not allowed here: stay in the caller's namespace
    os.environ[NS_ENV] = "1"
    sys.stdout.flush()
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private",
                          sys.executable, os.path.abspath(__file__), *sys.argv[1:]])


def load_average() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--tools" in argv:  # qcowfuse check/map/info vs qemu-img: scripts/bench_tools.py
        return bench_tools.main([a for a in argv if a != "--tools"])
    args = build_parser().parse_args(argv)
    jobs = select_jobs(args.only, args.targets)
    if args.luks:  # qemu-nbd and the overlay take no key here: compare qsd and qcowfuse
        jobs = [replace(j, targets=tuple(t for t in j.targets if t not in ("nbdfuse", "overlay")))
                for j in jobs]
    cfg = make_config(args)
    if not args.no_unshare:
        enter_private_mount_namespace()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    parent = args.dir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="qcowfuse-bench.", dir=parent)).resolve()
    bench: Bench | None = None
    code = 0
    try:
        preflight()
        bench = Bench(cfg, workdir, args.qcowfuse or find_qcowfuse())
        code = run_all(bench, jobs, args)
    except BenchError as e:
        say(f"bench: broken: {e}")
        code = 2
    except (KeyboardInterrupt, Interrupted) as e:
        say(f"bench: interrupted ({str(e) or 'SIGINT'})")
        code = 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        if bench is not None:
            for problem in bench.sweep():
                say(f"bench: cleanup: {problem}")
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def run_all(bench: Bench, jobs: list[Job], args: argparse.Namespace) -> int:
    cfg = bench.cfg
    facts = machine_facts()
    say(f"bench: nproc {facts['nproc']}, kernel {facts['kernel']}, {facts['mem_gib']} GiB RAM, "
        f"{facts['qsd']}, {facts['fio']}")
    load0 = load_average()
    facts["source_start"] = source_version()
    say(f"bench: load average {load0:.2f} at start"
        + (" - the machine is busy: expect noisy numbers" if load0 > 0.5 * facts["nproc"] else ""))
    say(f"bench: qcowfuse {bench.qcowfuse} (source {facts['source_start']}); size {cfg.size // MiB} MiB, stream "
        f"{cfg.stream_size // MiB} MiB (clusters {cfg.stream_cluster // KiB} KiB, refcount block "
        f"every {cfg.refcount_spacing // MiB} MiB), rounds {cfg.rounds}, runtime {cfg.runtime:g} s, "
        f"work dir {bench.workdir}")
    results: dict[str, JobResult] = {}
    t0 = time.monotonic()
    for job in jobs:
        say(f"{job.name}: {job.about}")
        t_job = time.monotonic()
        results[job.name] = bench.run_job(job, say)
        say(f"  ({time.monotonic() - t_job:.0f} s)")
    facts["load_start"], facts["load_end"] = load0, load_average()
    facts["source_end"] = source_version()
    ordered = [results[j.name] for j in jobs]
    lines = ["", *table(ordered), "", *resources(ordered)]
    if "boundary-stream" in results:
        lines += ["", *stream_lines(results["boundary-stream"])]
    if "ext4-untar" in results:
        lines += ["", *ext4_lines(results["ext4-untar"])]
    found = checks(results)
    lines += ["", "targets (qcowfuse):"]
    lines += [f"  {'PASS' if c.ok else 'MISS'} {c.name}: {c.measured:.2f}x "
              f"(target >= {c.minimum:.2f}x; {c.detail})" for c in found]
    lines += ["", f"bench: {time.monotonic() - t0:.0f} s; load average {load0:.2f} at start, "
                  f"{facts['load_end']:.2f} at end; "
                  + ("private mount namespace" if os.environ.get(NS_ENV) else "caller's mount namespace")]
    if facts["source_end"] != facts["source_start"] or facts["source_end"].endswith("-dirty"):
        lines.append(f"bench: warning: qcowfuse source {facts['source_start']} at start, "
                     f"{facts['source_end']} at end: results may mix versions")
    for line in lines:
        say(line)
    passed = sum(c.ok for c in found)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": facts, "config": asdict(cfg), "elapsed_s": time.monotonic() - t0,
            "jobs": {name: {"unit": r.unit, "ratio_qcowfuse_qsd": r.ratio(),
                            "ratio_qcowfuse_passthrough": r.ratio("passthrough"),
                            "ratio_qcowfuse_nbdfuse": r.ratio("nbdfuse"),
                            "best": {t: r.best(t) for t in TARGETS},
                            "median": {t: r.median(t) for t in TARGETS},
                            "samples": {t: [asdict(s) for s in ss] for t, ss in r.samples.items()}}
                     for name, r in results.items()},
            "checks": [dict(asdict(c), ok=c.ok) for c in found],
        }, indent=2))
    say(f"bench: {passed} passed, {len(found) - passed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
