"""LUKS-encrypted images (QEMU's encrypt.format=luks), judged by QEMU given the key.

check and repair need no key and count the LUKS header area like any metadata; reads
and writes with the key agree with qemu-io for every cipher, mode, IV generator and
hash qemu-img creates; plaintext never reaches the image file; a wrong key or none is
one line and nothing mounted."""

from __future__ import annotations

import json
import struct
from pathlib import Path


import pytest

from helpers import qemu
from helpers.cli import assert_refused
from helpers.procs import mounted, run_cli
from helpers.qemu import LUKS_SECRET as SECRET
from helpers.qemu import create_luks, run
from qcowfuse import Image
from qcowfuse.errors import QcowError

PASSPHRASE = b"123456"  # helpers.qemu's secret sec0


def opts(img: Path) -> str:
    return f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"


def qemu_io(img: Path, *commands: str, read_only: bool = False) -> str:
    r = run("qemu-io", *SECRET, "--image-opts", *(["-r"] if read_only else []),
            *[a for c in commands for a in ("-c", c)], opts(img))
    assert "fail" not in r.stdout.lower() and "error" not in r.stdout.lower(), r.stdout
    return r.stdout


def create(path: Path, size: int = 16 << 20, cluster_size: int = 4096, extra: str = "",
           backing: Path | None = None) -> Path | None:
    """A LUKS image with a quick key derivation; None if this qemu-img cannot make it."""
    return create_luks(path, size, cluster_size, extra, backing, must=False)


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


COMBINATIONS = [(alg, mode, ivgen, "sha256") for alg in ("aes-128", "aes-192", "aes-256")
                for mode in ("xts", "cbc") for ivgen in ("plain", "plain64", "essiv")] + \
    [("aes-256", "xts", "plain64", h) for h in ("sha1", "sha512")] + \
    [("aes-128", "cbc", "essiv", h) for h in ("sha1", "sha512")]


@pytest.mark.parametrize("alg,mode,ivgen,hash_alg", COMBINATIONS,
                         ids=["-".join(c) for c in COMBINATIONS])
def test_every_cipher_reads_and_writes_as_qemu_does(tmp_path, alg, mode, ivgen, hash_alg):
    """QEMU writes, we read; we write (unaligned, partial sectors, across clusters, over
    QEMU's data and into new clusters), qemu-io reads it back; qemu-img check clean."""
    extra = (f",encrypt.cipher-alg={alg},encrypt.cipher-mode={mode},encrypt.ivgen-alg={ivgen},"
             f"encrypt.hash-alg={hash_alg}" + (",encrypt.ivgen-hash-alg=sha256" if ivgen == "essiv" else ""))
    img = create(tmp_path / "v.qcow2", extra=extra)
    if img is None:
        pytest.skip(f"qemu-img does not create {alg}-{mode}-{ivgen} with {hash_alg}")
    qemu_io(img, "write -P 0x5a 4096 8k", "write -P 0x33 1000 100")
    with Image.open(str(img), writable=True, passphrase=PASSPHRASE) as im:
        assert im.read(0, 16384) == bytes(1000) + b"\x33" * 100 + bytes(2996) + b"\x5a" * 8192 + bytes(4096)
        im.write(1003, b"\x44" * 7)  # inside a sector QEMU wrote
        im.write(4396, b"\x55" * 1000)  # three sectors QEMU wrote, partial at both ends
        im.write(8000, b"\x66" * 10000)  # over QEMU's data, into new clusters, partial sectors
        im.write(1 << 20, b"\x77" * 513)
    qemu_io(img, "read -P 0x33 1000 3", "read -P 0x44 1003 7", "read -P 0x33 1010 90",
            "read -P 0x5a 4096 300", "read -P 0x55 4396 1000", "read -P 0x5a 5396 2604",
            "read -P 0x66 8000 10000", "read -P 0 18000 1000",
            "read -P 0x77 1M 513", "read -P 0 1049089 1023", read_only=True)
    assert qemu_check(img)["rc"] == 0
    data = img.read_bytes()
    for pattern in (b"\x66" * 64, b"\x77" * 64, b"\x44" * 7 + b"\x33" * 16):
        assert pattern not in data, "plaintext reached the image file"


def test_copy_on_write_from_a_clear_backing_file_is_encrypted(tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", 16 << 20, cluster_size=4096)
    qemu.qemu_io(base, "write -P 0x21 0 16M")
    img = create(tmp_path / "v.qcow2", backing=base)
    assert img is not None
    with Image.open(str(img), writable=True, passphrase=PASSPHRASE) as im:
        im.write(4096 + 100, b"\x99" * 50)  # head and tail of the cluster from the backing file
        assert im.read(4096, 4096) == b"\x21" * 100 + b"\x99" * 50 + b"\x21" * 3946
    qemu_io(img, "read -P 0x21 4096 100", "read -P 0x99 4196 50", "read -P 0x21 4246 3946",
            read_only=True)
    assert b"\x21" * 512 not in img.read_bytes()  # the copied head is encrypted too
    assert qemu_check(img)["rc"] == 0


def test_wrong_or_missing_passphrase(tmp_path):
    img = luks_image(tmp_path)
    with pytest.raises(QcowError) as e:
        Image.open(str(img), passphrase=b"654321")
    assert str(e.value) == "no key slot matches the passphrase"
    key = tmp_path / "key"
    key.write_bytes(b"nope")
    r = run_cli(str(img), str(tmp_path / "mp"), "-o", f"key-file={key}")
    assert "nope" not in r.stdout + r.stderr  # never the passphrase in a message
    assert_refused([str(img), str(tmp_path / "mp"), "-o", f"key-file={key}"],
                   "no key slot matches the passphrase", img, tmp_path / "mp")
    assert_refused([str(img), str(tmp_path / "mp")], "key-file", img, tmp_path / "mp")


@pytest.mark.root
def test_mount_with_a_key_file(tmp_path):
    img = luks_image(tmp_path)
    key = tmp_path / "key"
    key.write_bytes(PASSPHRASE)
    with mounted(img, tmp_path / "raw", "-o", f"key-file={key}") as (raw, pid):
        with open(raw, "r+b") as fh:
            assert fh.read(4096) == b"\x07" * 4096
            fh.seek(12345)
            fh.write(b"\xab" * 70000)
    qemu_io(img, "read -P 7 0 12345", "read -P 0xab 12345 70000", "read -P 8 8M 64k", read_only=True)
    assert qemu_check(img)["rc"] == 0


@pytest.mark.parametrize("extra", ["", ",encrypt.cipher-mode=ctr"], ids=["xts", "ctr"])
def test_info_describes_luks_as_qemu_img_does(tmp_path, extra):
    """No key needed, and also for a mode qcowfuse cannot decrypt (ctr)."""
    img = create(tmp_path / "v.qcow2", extra=extra)
    assert img is not None
    r = run_cli("info", "--output=json", str(img))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", str(img)).stdout)
    assert info["encrypted"] is True
    assert info["encrypt"] == theirs["format-specific"]["data"]["encrypt"]


def test_a_slot_with_a_bad_stripe_count_is_refused_before_any_derivation(tmp_path):
    """stripes and the key size decide how much key material is read and merged: a
    crafted header must not make the unlock read or hash more than LUKS1's 4000 stripes."""
    img = luks_image(tmp_path)
    data = bytearray(img.read_bytes())
    at = data.index(b"LUKS\xba\xbe") + 208 + 44  # slot 0's stripes (LUKS1 on-disk format)
    assert struct.unpack_from(">I", data, at)[0] == 4000
    struct.pack_into(">I", data, at, 1 << 30)
    img.write_bytes(data)
    with pytest.raises(QcowError, match="stripes"):
        Image.open(str(img), passphrase=PASSPHRASE)


def test_every_active_key_slot_is_tried(tmp_path):
    """A second passphrase in slot 3 (qemu-img amend) opens the image as the first does."""
    img = create(tmp_path / "v.qcow2")
    assert img is not None
    run("qemu-img", "amend", *SECRET, "--object", "secret,id=sec1,data=other", "--image-opts",
        opts(img), "-o", "encrypt.new-secret=sec1,encrypt.state=active,encrypt.keyslot=3,"
        "encrypt.iter-time=20")
    qemu_io(img, "write -P 0x3e 0 4k")
    for passphrase in (PASSPHRASE, b"other"):
        with Image.open(str(img), passphrase=passphrase) as im:
            assert im.read(0, 4096) == b"\x3e" * 4096


def test_resize_needs_no_key_and_keeps_the_data(tmp_path):
    img = luks_image(tmp_path)
    r = run_cli("resize", str(img), "32M")
    assert r.returncode == 0, r.stderr
    qemu_io(img, "read -P 7 0 1M", "read -P 8 8M 64k", "read -P 0 16M 16M", read_only=True)
    assert qemu_check(img)["rc"] == 0


def test_overlay_and_encrypted_backing_files_are_refused_as_such(tmp_path):
    """An overlay over an encrypted image is refused as that, before any passphrase is
    asked for; an encrypted backing file is named as the file that needs a key."""
    img = luks_image(tmp_path)
    assert_refused([str(img), str(tmp_path / "mp"), "-o", "overlay"],
                   "-o overlay over an encrypted image", img, tmp_path / "mp")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(img), "-F", "qcow2", str(top), "16M")
    key = tmp_path / "key"
    key.write_bytes(PASSPHRASE)
    assert_refused([str(top), str(tmp_path / "mp"), "-o", f"key-file={key}"],
                   f"backing file {img} is encrypted", top, tmp_path / "mp")
