"""LUKS-encrypted images are not mounted, but check and repair count their LUKS header
area like any metadata: the numbers are qemu-img's (given the key), a repair changes
nothing on a clean image, and a leak beside the header is the only thing repaired."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.cli import assert_refused
from helpers.procs import run_cli
from helpers.qemu import LUKS_SECRET as SECRET
from helpers.qemu import create_luks, run


def qemu_check(img: Path) -> dict:
    r = run("qemu-img", "check", "--output=json", *SECRET, "--image-opts",
            f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0", check=False)
    out = json.loads(r.stdout)
    out["rc"] = r.returncode
    return out


def luks_image(tmp_path: Path) -> Path:
    img = create_luks(tmp_path / "luks.qcow2", 16 << 20, cluster_size=4096)
    run("qemu-io", *SECRET, "--image-opts", "-c", "write -P 7 0 1M", "-c", "write -P 8 8M 64k",
        f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0")
    return img


def test_check_and_repair_count_the_luks_header(tmp_path):
    img = luks_image(tmp_path)
    theirs = qemu_check(img)
    assert theirs["rc"] == 0
    before = img.read_bytes()
    for extra in ([], ["--repair", "leaks"], ["--repair", "all"]):
        r = run_cli("check", "--output=json", *extra, str(img))
        assert r.returncode == 0, r.stdout + r.stderr
        ours = json.loads(r.stdout)
        for key in ("allocated-clusters", "total-clusters", "image-end-offset"):
            assert ours[key] == theirs[key], key
        assert "leaks" not in ours and "corruptions" not in ours
        assert img.read_bytes() == before
    assert qemu_check(img)["rc"] == 0


def test_encrypted_images_are_not_mounted(tmp_path):
    img = luks_image(tmp_path)
    assert_refused([str(img), str(tmp_path / "mp")], "encrypted images are not supported", img,
                   tmp_path / "mp")
