"""The ways users install qcowfuse, each from a clean clone (git clone of HEAD):

- root: `scripts/install` (a venv, /usr/local/bin/qcowfuse, the systemd unit, the man
  page), here into a temporary prefix: idempotent, and `--uninstall` leaves nothing;
- users: plain `pip install .` in a fresh venv, no test extras, and `pipx install .`:
  zstd images must read;
- Debian's packages (python3-pyfuse3, -trio, -zstandard, -numpy) in a venv with
  --system-site-packages plus `pip install --no-deps .`: no compiler, a smoke subset.

Plus the man page against the argument parser.  pip comes from the configured indexes
and the wheel cache (pyfuse3 is built once per machine, by scripts/test's install).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import qemu
from helpers.procs import fuse_mounts, unmount
from qcowfuse import cli, daemon

REPO = Path(__file__).resolve().parent.parent
MAN_PAGE = REPO / "man" / "qcowfuse.1"
DEBIAN_PYTHON = Path("/usr/bin/python3")
MiB = 1 << 20


def run(*args, env=None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    dest = tmp_path_factory.mktemp("clone") / "qcowfuse"
    run("git", "clone", "-q", REPO, dest)
    return dest


def new_venv(path: Path, python: Path | str = sys.executable, *flags: str) -> Path:
    run(python, "-m", "venv", *flags, path)
    return path


def pip(venv: Path, *args, env=None) -> None:
    run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", *args, env=env)


# -- a zstd image, mounted with a given qcowfuse program, read against qemu-img ---------

@pytest.fixture(scope="module")
def zstd_image(tmp_path_factory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("zstd")
    src = qemu.create(d / "src.qcow2", 8 * MiB)
    qemu.qemu_io(src, "write -P 0x5a 0 1M", "write -P 0xa5 3M 512k", "write -z 4M 1M")
    # compressible data with some structure, not only one byte
    with open(d / "pattern", "wb") as fh:
        fh.write(b"".join(b"qcowfuse %08d\n" % i for i in range(40000)))
    qemu.run("qemu-io", "-f", "qcow2", "-c", f"write -s {d / 'pattern'} 5M {(d / 'pattern').stat().st_size}",
             str(src))
    img = d / "zstd.qcow2"
    qemu.run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(src), str(img))
    assert '"compression-type": "zstd"' in qemu.run("qemu-img", "info", "--output=json", str(img)).stdout
    expect = qemu.convert_to_raw(img, d / "expect.raw").read_bytes()
    return img, expect


def mount_with(program: Path, image: Path, mountpoint: Path, *options: str):
    """Mount with the given qcowfuse program; returns the daemon pid (unmount() it)."""
    pidfile = mountpoint.parent / (mountpoint.name + ".pid")
    r = subprocess.run([str(program), str(image), str(mountpoint), "--pidfile", str(pidfile), *options],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(pidfile.read_text())


def assert_reads_as(program: Path, image: Path, expect: bytes, tmp_path: Path) -> None:
    mp = tmp_path / "zstd.raw"
    before = image.read_bytes()
    pid = None
    try:
        pid = mount_with(program, image, mp, "-o", "ro")
        assert mp.read_bytes() == expect
    finally:
        if str(mp) in fuse_mounts() or pid is not None:
            unmount(mp, pid)
    assert image.read_bytes() == before


def smoke_write(program: Path, tmp_path: Path) -> None:
    """Mount read-write, write through the raw file, unmount, let QEMU judge."""
    img = qemu.create(tmp_path / "rw.qcow2", 16 * MiB)
    mp = tmp_path / "rw.raw"
    pid = None
    try:
        pid = mount_with(program, img, mp)
        fd = os.open(mp, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\x3c" * (192 << 10), 2 * MiB + 4096) == 192 << 10
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if str(mp) in fuse_mounts() or pid is not None:
            unmount(mp, pid)
    qemu.assert_clean(img)
    qemu.qemu_io(img, f"read -P 0x3c {2 * MiB + 4096} 192k", "read -P 0 0 2M", read_only=True)


# -- users: pip install . ----------------------------------------------------------------

@pytest.mark.root
def test_plain_pip_install_reads_zstd_images(tmp_path, clone, zstd_image):
    """What `pip install .` gives (no extras, newest releases in pyproject's ranges)
    reads a zstd-compressed image equal to qemu-img convert -O raw."""
    venv = new_venv(tmp_path / "venv")
    pip(venv, clone)
    assert_reads_as(venv / "bin" / "qcowfuse", *zstd_image, tmp_path)


@pytest.mark.root
def test_pipx_install(tmp_path, clone, zstd_image):
    """README's `pipx install .`, with pipx's own directories in tmp_path."""
    pipx = shutil.which("pipx")
    if pipx is None:
        pytest.skip("pipx not installed (apt-get install pipx)")
    env = dict(os.environ, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    run(pipx, "install", clone, env=env)
    assert_reads_as(tmp_path / "bin" / "qcowfuse", *zstd_image, tmp_path)


# -- Debian's packages -----------------------------------------------------------------------

DEBIAN_PACKAGES = {"pyfuse3": "python3-pyfuse3", "trio": "python3-trio",
                   "zstandard": "python3-zstandard", "numpy": "python3-numpy"}


@pytest.fixture(scope="module")
def debian_venv(tmp_path_factory, clone) -> Path:
    probe = subprocess.run([str(DEBIAN_PYTHON), "-c", "import " + ", ".join(DEBIAN_PACKAGES)],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"Debian packages missing: apt-get install {' '.join(DEBIAN_PACKAGES.values())}")
    venv = new_venv(tmp_path_factory.mktemp("debian") / "venv", DEBIAN_PYTHON, "--system-site-packages")
    # No compiler may be needed: make any attempt to run one fail.
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", LDSHARED="/bin/false")
    pip(venv, "--no-deps", clone, env=env)
    return venv


def test_debian_packages_are_what_runs(debian_venv):
    """The venv's qcowfuse uses Debian's builds, not copies from PyPI."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(DEBIAN_PACKAGES)!r}:\n"
            "    print(name, importlib.import_module(name).__file__)\n")
    out = run(debian_venv / "bin" / "python", "-c", code).stdout
    for line in out.splitlines():
        name, path = line.split()
        assert path.startswith("/usr/lib/python3/dist-packages/"), line
    listed = run(debian_venv / "bin" / "pip", "list", "--local", "--format=freeze").stdout.lower()
    assert not any(n in listed for n in DEBIAN_PACKAGES), listed
    # pyproject's ranges admit Debian's versions (pip check also reports unrelated
    # Debian packages' metadata: only qcowfuse's lines count)
    check = subprocess.run([str(debian_venv / "bin" / "pip"), "check"], capture_output=True, text=True)
    assert not [line for line in check.stdout.splitlines() if line.startswith("qcowfuse ")], check.stdout


@pytest.mark.root
def test_debian_packages_mount_write_check(tmp_path, debian_venv):
    smoke_write(debian_venv / "bin" / "qcowfuse", tmp_path)


@pytest.mark.root
def test_debian_packages_read_zstd(tmp_path, debian_venv, zstd_image):
    assert_reads_as(debian_venv / "bin" / "qcowfuse", *zstd_image, tmp_path)


# -- root: scripts/install --------------------------------------------------------------------

def tree(root: Path) -> dict[str, str]:
    """Every path under root (the venv's inside aside) -> link target or content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).name == "venv":
            dirnames[:] = []
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.root
def test_scripts_install_idempotent_and_uninstall(tmp_path, clone):
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "other-tool").write_text("not ours\n")  # must survive everything
    before, checkout = tree(root), tree(clone)
    env = dict(os.environ, QCOWFUSE_PREFIX=str(root / "usr"), QCOWFUSE_HOME=str(root / "opt" / "qcowfuse"),
               QCOWFUSE_UNITDIR=str(root / "etc" / "systemd" / "system"))
    run(clone / "scripts" / "install", env=env)
    first = tree(root)

    binary = root / "usr" / "bin" / "qcowfuse"
    assert os.readlink(binary) == str(root / "opt" / "qcowfuse" / "venv" / "bin" / "qcowfuse")
    version = run(binary, "--version").stdout
    assert version.strip() == f"qcowfuse {cli.__version__}"
    unit = (root / "etc" / "systemd" / "system" / "qcowfuse@.service").read_text()
    assert f"ExecStart={binary} -f " in unit
    man_dir = root / "usr" / "share" / "man"
    assert (man_dir / "man1" / "qcowfuse.1").read_bytes() == (clone / "man" / "qcowfuse.1").read_bytes()
    if shutil.which("man"):  # `man qcowfuse` finds the page in the prefix's man directory
        found = run("man", "-M", man_dir, "-w", "qcowfuse").stdout.strip()
        assert found == str(man_dir / "man1" / "qcowfuse.1")

    run(clone / "scripts" / "install", env=env)
    assert tree(root) == first, "a second install changed the installed files"

    run(clone / "scripts" / "install", "--uninstall", env=env)
    assert tree(root) == before
    assert tree(clone) == checkout, "installing left files in the checkout"


# -- the man page -------------------------------------------------------------------------

def man_text() -> str:
    if not shutil.which("man"):
        pytest.skip("man-db not installed")
    r = subprocess.run(["man", "--warnings", "-l", str(MAN_PAGE)], capture_output=True, text=True,
                       env=dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    return r.stdout


def test_man_page_renders_and_covers_the_parser():
    text = man_text()
    for section in ("SYNOPSIS", "OPTIONS", "COMMANDS", "EXIT STATUS", "FILES"):
        assert f"\n{section}\n" in text, section
    for action in cli.build_parser()._actions:
        for option in action.option_strings:
            assert option in text, f"{option} is not in the man page"
    for command in cli.SUBCOMMANDS:
        assert f"qcowfuse {command} IMAGE" in text
    # every -o option the --help text names is described, and every one described is accepted
    (o_action,) = [a for a in cli.build_parser()._actions if "-o" in a.option_strings]
    listed = re.sub(r"\([^)]*\)", "", o_action.help).split(":", 1)[1].split(";")[0]
    names = {item.strip().split("=")[0] for item in listed.split(",") if item.strip()}
    assert len(names) >= 10, names
    # the -o list in the roff source: ".TP" then ".B name", ".BI name= ARG" or ".BR name= a | b"
    o_list = MAN_PAGE.read_text().split("\n.RS\n")[1].split("\n.RE\n")[0]
    described = {m.replace("\\-", "-").rstrip("=")
                 for m in re.findall(r"^\.TP\n\.B[IR]? (\S+)", o_list, re.M)}
    assert names <= described, names - described
    for name in described:
        opts = daemon.MountOptions(image="i", mountpoint="m")
        cli.parse_mount_options([name + {"snapshot": "=s", "detect-zeroes": "=on", "backing": "=off",
                                         "l2-cache-size": "=1M", "refcount-cache-size": "=1M", "key-file": "=/k",
                                         "partitions": "=off", "data-file": "=/d"}.get(name, "")],
                                opts)
    exit_status = text.split("\nEXIT STATUS\n")[1].split("\nFILES\n")[0]
    for code in ("0", "1", "2", "3"):
        assert re.search(rf"^ {{7}}{code} ", exit_status, re.M), f"exit code {code} undocumented"
