"""QEMU as the referee: thin wrappers over qemu-img and qemu-io."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Iterator


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def create(path: Path, size: int, cluster_size: int = 65536, refcount_bits: int = 16,
           compat: str = "1.1", extra: str = "") -> Path:
    opts = f"cluster_size={cluster_size},refcount_bits={refcount_bits},compat={compat}"
    if extra:
        opts += "," + extra
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(size))
    return path


# While true, check and convert_to_raw open images with LUKS secret sec0 (the power-cut
# harness judging an encrypted image): see encrypted().
_ENCRYPTED = [False]


@contextlib.contextmanager
def encrypted(on: bool = True) -> Iterator[None]:
    _ENCRYPTED[0], before = on, _ENCRYPTED[0]
    try:
        yield
    finally:
        _ENCRYPTED[0] = before


# While set, check and convert_to_raw open images with this external data file instead
# of the one their header names (the power-cut harness's crash copies): see data_file().
_DATA_FILE: list[Path | None] = [None]


@contextlib.contextmanager
def data_file(path: Path) -> Iterator[None]:
    _DATA_FILE[0], before = path, _DATA_FILE[0]
    try:
        yield
    finally:
        _DATA_FILE[0] = before


def image_args(path: Path) -> list[str]:
    """How qemu-img names an image: the path, or image options with the LUKS secret or
    the data file to use."""
    if _DATA_FILE[0] is not None:
        return ["--image-opts", f"driver=qcow2,file.filename={path},data-file.filename={_DATA_FILE[0]}"]
    if _ENCRYPTED[0]:
        return [*LUKS_SECRET, "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    return [str(path)]


def check(path: Path) -> dict:
    """qemu-img check --output=json, with its exit code under 'rc'."""
    r = run("qemu-img", "check", "--output=json", *image_args(path), check=False)
    info = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    info["rc"] = r.returncode
    info["text"] = r.stdout + r.stderr
    return info


def assert_clean(path: Path) -> dict:
    info = check(path)
    bad = {k: info.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert info["rc"] == 0 and not any(bad.values()), f"qemu-img check of {path}: {info['text']}"
    return info


def compare_raw(image: Path, raw: Path) -> None:
    r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(raw), check=False)
    assert r.returncode == 0, f"qemu-img compare: {r.stdout}{r.stderr}"


def qemu_io(path: Path, *commands: str, read_only: bool = False, fmt: str = "qcow2") -> str:
    args = ["qemu-io", "-f", fmt]
    if read_only:
        args.append("-r")
    for c in commands:
        args += ["-c", c]
    r = run(*args, str(path))
    # qemu-io reports failed commands on stdout without a failing exit code
    bad = [line for line in r.stdout.splitlines() if "failed" in line.lower() or "error" in line.lower()]
    assert not bad, f"qemu-io {commands}: {bad}"
    return r.stdout


def convert_to_raw(image: Path, raw: Path) -> Path:
    run("qemu-img", "convert", "-O", "raw", *image_args(image), str(raw))
    return raw


def dirty_ranges(image: Path, name: str) -> list[tuple[int, int]]:
    """What QEMU says bitmap `name` marks dirty: merged (start, end) ranges."""
    r = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", "--",
            "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, str(image), "]")
    out: list[tuple[int, int]] = []
    for e in json.loads(r.stdout):
        if e["type"] & 1:
            if out and out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], e["offset"] + e["length"])
            else:
                out.append((e["offset"], e["offset"] + e["length"]))
    return out


LUKS_SECRET = ["--object", "secret,id=sec0,data=123456"]


def create_luks(path: Path, size: int, cluster_size: int = 65536, options: str = "",
                backing: Path | None = None, must: bool = True) -> Path | None:
    """A LUKS-encrypted qcow2 image (key secret sec0) with a quick key derivation; extra
    `options` for -o (",encrypt.cipher-alg=..."), a qcow2 `backing` file.  LUKS creation
    times its key derivation and, on a loaded machine, may fail with "Unable to get
    accurate CPU usage": tried again then.  Any other failure raises (must=True) or
    gives None (qemu-img cannot make that kind of image)."""
    o = f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=20,cluster_size={cluster_size}"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", *LUKS_SECRET, "-o", o + options]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    for _ in range(8):
        r = run(*args, str(path), str(size), check=False)
        if r.returncode == 0:
            return path
        if "accurate CPU usage" not in r.stderr:
            break
    if must:
        raise AssertionError(f"qemu-img create of a LUKS image failed: {r.stderr}")
    return None
