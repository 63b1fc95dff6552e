"""No qcowfuse command ever turns an image `qemu-img check` calls clean into one it
does not: every command, on a corpus of QEMU-made images of every kind the README
names (bitmaps, snapshots, compressed, backing, extended L2, preallocated, lazy
refcounts, v2, odd refcount widths, LUKS).  Commands that only look must not change
a byte; commands that write must leave qemu-img check clean, the guest content as
expected (qemu-img compare against a model) and any bitmaps QEMU still trusts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import pytest

from helpers.procs import mounted, run_cli
from helpers.qemu import LUKS_SECRET as SECRET
from helpers.qemu import check, compare_raw, convert_to_raw, create, create_luks, qemu_io, run

pytestmark = pytest.mark.root  # every test here mounts (see the markers in pyproject.toml)

MiB = 1 << 20


def _bitmaps(img: Path) -> None:
    qemu_io(img, "write -P 1 0 2M")
    run("qemu-img", "bitmap", "--add", str(img), "on")
    run("qemu-img", "bitmap", "--add", "-g", "4096", str(img), "off")
    qemu_io(img, "write -P 2 3M 1M")
    run("qemu-img", "bitmap", "--disable", str(img), "off")


def _in_use_bitmap(img: Path) -> None:
    _bitmaps(img)
    run("qemu-io", "-c", "write -P 3 5M 64k", "-c", "abort", str(img), check=False)


def _snapshots(img: Path) -> None:
    qemu_io(img, "write -P 1 0 3M")
    run("qemu-img", "snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 2 1M 2M")
    run("qemu-img", "snapshot", "-c", "s2", str(img))
    qemu_io(img, "write -P 3 2M 64k")


def _compressed(kind: str) -> Callable[[Path], None]:
    def make(img: Path) -> None:
        src = img.with_suffix(".src")
        create(src, 8 * MiB)
        qemu_io(src, "write -P 1 0 3M", "write -P 2 5M 1M")
        os.unlink(img)
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={kind}",
            str(src), str(img))
        os.unlink(src)
    return make


def _backing(img: Path) -> None:
    base = img.with_suffix(".base")
    base.write_bytes(os.urandom(8 * MiB))
    os.unlink(img)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", str(img))
    qemu_io(img, "write -P 1 1M 100k")


def _extl2(img: Path) -> None:
    base = img.with_suffix(".base")
    create(base, 8 * MiB)
    qemu_io(base, "write -P 9 0 8M")
    os.unlink(img)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536",
        "-b", base.name, "-F", "qcow2", str(img))
    qemu_io(img, "write -P 1 4k 8k", "write -P 2 2M 3k")


def _plain(img: Path) -> None:
    qemu_io(img, "write -P 1 0 1M", "write -P 2 6M 300k", "write -z 7M 64k")


def _luks(img: Path) -> None:
    os.unlink(img)
    create_luks(img, 8 * MiB)


# name: (create options, how to fill it)
CORPUS: dict[str, tuple[dict, Callable[[Path], None]]] = {
    "plain": ({}, _plain),
    "512b-clusters": ({"cluster_size": 512}, _plain),
    "refcount-1": ({"refcount_bits": 1}, _plain),
    "refcount-64": ({"refcount_bits": 64, "cluster_size": 4096}, _plain),
    "v2": ({"compat": "0.10"}, _plain),
    "lazy-refcounts": ({"extra": "lazy_refcounts=on"}, _plain),
    "prealloc-metadata": ({"extra": "preallocation=metadata"}, _plain),
    "prealloc-falloc": ({"extra": "preallocation=falloc", "cluster_size": 4096}, _plain),
    "snapshots": ({}, _snapshots),
    "zlib": ({}, _compressed("zlib")),
    "zstd": ({}, _compressed("zstd")),
    "backing": ({}, _backing),
    "extended-l2": ({}, _extl2),
    "bitmaps": ({}, _bitmaps),
    "bitmap-in-use": ({}, _in_use_bitmap),
    "luks": ({}, _luks),
}


def _qemu_clean(img: Path) -> bool:
    if img.name.startswith("luks"):
        r = run("qemu-img", "check", *SECRET, "--image-opts",
                f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0", check=False)
        return r.returncode == 0
    info = check(img)
    return info["rc"] == 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bitmap_view(img: Path) -> dict:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(img)).stdout)
    return {b["name"]: b["flags"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])}


LOOKING = [["info"], ["info", "--output=json"], ["info", "--allocated"], ["map"], ["map", "--output=json"], ["check"],
           ["check", "--output=json"]]


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_no_command_makes_a_clean_image_worse(tmp_path, kind):
    opts, fill = CORPUS[kind]
    img = create(tmp_path / f"{kind}.qcow2", 8 * MiB, **opts)
    fill(img)
    assert _qemu_clean(img), f"corpus image {kind} is not clean to begin with"
    pristine = img.read_bytes()
    luks = kind == "luks"

    def fresh() -> Path:
        img.write_bytes(pristine)
        return img

    # commands that only look: not a byte changes (whatever they answer)
    for args in LOOKING + [["map", "--bitmap", "on"]]:
        run_cli(*args, str(fresh()))
        assert img.read_bytes() == pristine, f"{args} changed the image"
    # repairs: clean stays clean, nothing to change
    for mode in ("leaks", "all"):
        r = run_cli("check", "--repair", mode, str(fresh()))
        assert _qemu_clean(img), f"check --repair {mode}: {r.stdout}{r.stderr}"
        assert img.read_bytes() == pristine, f"check --repair {mode} changed a clean image"
    if luks:
        return  # not mounted, not resized: only checked
    bitmaps_before = _bitmap_view(fresh())
    # a read-only mount reads everything and changes nothing
    target = tmp_path / "r.raw"
    target.touch()
    want = convert_to_raw(fresh(), tmp_path / "want.raw")
    with mounted(img, target, "-o", "ro") as (raw, _):
        assert _sha(raw) == _sha(want)
    assert img.read_bytes() == pristine
    # a read-write mount that writes: clean, content as modelled, bitmaps still trusted
    model = bytearray(want.read_bytes())
    writes = [(4096 + 17, os.urandom(5000)), (3 * MiB - 100, os.urandom(200000)),
              (8 * MiB - 512, os.urandom(512))]
    with mounted(fresh(), target) as (raw, _):
        fd = os.open(raw, os.O_WRONLY)
        try:
            for off, data in writes:
                os.pwrite(fd, data, off)
                model[off:off + len(data)] = data
            os.fsync(fd)
        finally:
            os.close(fd)
    assert _qemu_clean(img), check(img)["text"]
    (tmp_path / "model.raw").write_bytes(model)
    compare_raw(img, tmp_path / "model.raw")
    assert _bitmap_view(img) == bitmaps_before
    # an offline resize (grow): clean; refused cases leave the image as it was
    fresh()
    r = run_cli("resize", str(img), "+1M")
    assert _qemu_clean(img), f"resize: {r.stderr}"
    if r.returncode:
        assert img.read_bytes() == pristine, f"a refused resize changed the image: {r.stderr}"
    else:
        assert json.loads(run("qemu-img", "info", "--output=json", str(img)).stdout)["virtual-size"] == 9 * MiB
