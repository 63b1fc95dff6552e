"""Operations: the systemd unit, sd_notify readiness, mount(8) / fstab through
mount.fuse3, and mounting without root (fusermount3).

Everything runs the installed `qcowfuse` program next to sys.executable (the
venv scripts/test creates), never `python -m`, because that is what systemd,
mount.fuse3 and users run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from helpers import qemu
from helpers.cli import assert_one_line_error
from helpers.procs import pid_alive, scratch_dir, unescape_mount

BIN_DIR = Path(sys.executable).parent
QCOWFUSE_BIN = BIN_DIR / "qcowfuse"
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "qcowfuse@.service"
UNIT_QCOWFUSE = "/usr/local/bin/qcowfuse"  # the ExecStart= path in the shipped unit
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = 65534
TIMEOUT = 20.0


@pytest.fixture
def qcowfuse_bin() -> Path:
    if not QCOWFUSE_BIN.exists():
        pytest.skip(f"{QCOWFUSE_BIN} not installed (scripts/test installs the package into .venv)")
    return QCOWFUSE_BIN


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


# -- mounts, processes --------------------------------------------------------

def mount_entry(path: Path | str) -> tuple[str, set[str]] | None:
    """(fstype, options) of the mount at path, from /proc/self/mounts; None if not mounted."""
    found = None
    with open("/proc/self/mounts") as fh:
        for line in fh:
            f = line.split()
            if unescape_mount(f[1]) == str(path):
                found = (f[2], set(f[3].split(",")))
    return found


def force_unmount(path: Path | str) -> None:
    for _ in range(5):
        if mount_entry(path) is None:
            return
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, timeout=30)
        if mount_entry(path) is not None:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def holders(path: Path) -> list[int]:
    """Pids with an open file descriptor on path (what `fuser` reports)."""
    target = os.path.realpath(path)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    pids.append(int(entry))
                    break
            except OSError:
                pass
    return pids


def wait_until(cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def wait_exit(pids: list[int], timeout: float = TIMEOUT) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), f"daemon(s) {pids} to exit", timeout)


def kill_holders(path: Path) -> None:
    for pid in holders(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cleanup(image: Path, *mountpoints: Path) -> Iterator[None]:
    """Whatever happens: no mount left on the mount points, no daemon left on the image."""
    try:
        yield
    finally:
        for mp in mountpoints:
            force_unmount(mp)
        kill_holders(image)


# -- sd_notify -----------------------------------------------------------------

class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET, as systemd binds it."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes: keep it short, not under tmp_path.
        self.dir = tempfile.mkdtemp(prefix="qcowfuse-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_for(self, key: str, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout:.0f} s; got {self.messages}; "
                                     f"output: {log.read_text(errors='replace')}")
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.1))
            if ready:
                msg = self.sock.recv(65536).decode()
                fields = dict(line.split("=", 1) for line in msg.splitlines() if "=" in line)
                self.messages.append(fields)
                if key in fields:
                    return fields
            elif proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode} before sending {key}; got {self.messages}; "
                                     f"output: {log.read_text(errors='replace')}")


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    try:
        yield n
    finally:
        n.close()


@contextlib.contextmanager
def foreground(argv: list[str], log: Path, notify: NotifySocket, image: Path,
               mountpoint: Path) -> Iterator[subprocess.Popen]:
    """Run a foreground daemon as systemd would (NOTIFY_SOCKET set); kill and unmount in every path."""
    env = dict(os.environ, NOTIFY_SOCKET=notify.path)
    with open(log, "ab") as out, cleanup(image, mountpoint):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT)


def assert_live(mountpoint: Path, size: int, ro: bool = False) -> None:
    entry = mount_entry(mountpoint)
    assert entry is not None, f"{mountpoint} is not mounted"
    fstype, options = entry
    assert fstype == "fuse.qcowfuse", entry
    assert ("ro" in options) == ro, entry
    assert os.stat(mountpoint).st_size == size


# -- a: the unit file ----------------------------------------------------------

def parse_unit(text: str) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def unit_for_test(binary: Path, strict: bool = False) -> str:
    """The shipped unit with ExecStart= pointing at the qcowfuse under test.

    strict: also drop the "-" (ignore failure) prefixes, so that verify checks
    those commands exist too (it skips commands whose failure is ignored)."""
    text = UNIT.read_text()
    assert f"ExecStart={UNIT_QCOWFUSE} " in text
    text = text.replace(f"ExecStart={UNIT_QCOWFUSE} ", f"ExecStart={binary} ")
    if strict:
        text = re.sub(r"^(Exec\w+)=-", r"\1=", text, flags=re.M)
    return text


def test_unit_declares_the_service_contract():
    u = parse_unit(UNIT.read_text())
    svc = lambda k: u.get(("Service", k), [])  # noqa: E731
    assert svc("Type") == ["notify"]
    assert svc("NotifyAccess") == ["main"]
    assert svc("Restart") == ["on-failure"]  # an admin's umount (exit 0) must not restart
    assert len(svc("ExecStart")) == 1
    start = shlex.split(svc("ExecStart")[0])
    assert start[0] == UNIT_QCOWFUSE and "-f" in start and "%f" in start and "${MOUNTPOINT}" in start
    assert any("fusermount3 -u" in v for v in svc("ExecStop"))
    assert svc("TimeoutStopSec")
    assert "local-fs.target" in " ".join(u.get(("Unit", "After"), []))
    assert any(v.startswith("-/etc/qcowfuse/%i.env") for v in svc("EnvironmentFile"))
    assert "MOUNTPOINT=/run/qcowfuse/%i.raw" in svc("Environment")
    assert svc("RuntimeDirectory") == ["qcowfuse"]
    # a private mount namespace would hide the mount from everyone else
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts", "ReadWritePaths",
                "ReadOnlyPaths", "TemporaryFileSystem", "BindPaths", "RootDirectory"):
        assert not svc(key), key


@pytest.mark.parametrize("strict", [False, True], ids=["as-shipped", "strict"])
def test_systemd_analyze_verify(tmp_path, qcowfuse_bin, strict):
    analyze = which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    units = tmp_path / "units"
    units.mkdir()
    (units / "qcowfuse@.service").write_text(unit_for_test(qcowfuse_bin, strict))
    # The instance of /tmp/x/disk.qcow2 (systemd-escape --path), loaded from the template.
    instance = units / "qcowfuse@tmp-x-disk.qcow2.service"
    r = subprocess.run([analyze, "verify", "--man=no", str(instance)],
                       capture_output=True, text=True, timeout=60)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "qcowfuse" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_systemd_analyze_verify_would_see_mistakes(tmp_path, qcowfuse_bin):
    """The verify test is not vacuous: a typo in the unit is reported."""
    analyze = which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    units = tmp_path / "units"
    units.mkdir()
    text = unit_for_test(qcowfuse_bin).replace("Restart=on-failure", "Restart=on-failur")
    (units / "qcowfuse@.service").write_text(text)
    r = subprocess.run([analyze, "verify", "--man=no", str(units / "qcowfuse@tmp-x-disk.qcow2.service")],
                       capture_output=True, text=True, timeout=60)
    assert "on-failur" in r.stdout + r.stderr


# -- the unit's commands, run as systemd would run them --------------------------

def systemd_escape_path(path: Path) -> str:
    tool = which("systemd-escape")
    if tool is None:
        pytest.skip("systemd-escape not installed")
    return subprocess.run([tool, "--path", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def unit_specifiers(instance: str) -> dict[str, str]:
    unescaped = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)),
                       instance.replace("-", "/"))
    return {"i": instance, "f": "/" + unescaped, "%": "%"}


def unit_command(value: str, spec: dict[str, str], env: dict[str, str]) -> tuple[bool, list[str]]:
    """One Exec*= line -> (failure ignored, argv): specifiers, then quoting, then $$ / ${VAR} / $VAR."""
    ignore = value.startswith("-")
    value = re.sub(r"%(.)", lambda m: spec[m.group(1)], value.lstrip("-"))
    argv: list[str] = []
    for word in shlex.split(value):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\$|\$\{(\w+)\}",
                               lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word))
    return ignore, argv


def unit_environment(u: dict, spec: dict[str, str], env_file: Path | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in u.get(("Service", "Environment"), []):
        for word in shlex.split(re.sub(r"%(.)", lambda m: spec[m.group(1)], value)):
            k, _, v = word.partition("=")
            env[k] = v
    if env_file is not None:
        for line in env_file.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip()
    return env


def test_unit_specifiers_and_defaults():
    """systemctl enable qcowfuse@$(systemd-escape --path /srv/vm/disk.qcow2): what the instance uses."""
    instance = "srv-vm-disk.qcow2"
    if which("systemd-escape"):
        assert systemd_escape_path(Path("/srv/vm/disk.qcow2")) == instance
    u = parse_unit(UNIT.read_text())
    spec = unit_specifiers(instance)
    env = unit_environment(u, spec, None)
    assert env["MOUNTPOINT"] == "/run/qcowfuse/srv-vm-disk.qcow2.raw"
    assert env["OPTIONS"] == "rw"
    _, start = unit_command(u[("Service", "ExecStart")][0], spec, env)
    assert start == [UNIT_QCOWFUSE, "-f", "-o", "rw", "/srv/vm/disk.qcow2",
                     "/run/qcowfuse/srv-vm-disk.qcow2.raw"]
    env_file = re.sub(r"%(.)", lambda m: spec[m.group(1)], u[("Service", "EnvironmentFile")][0])
    assert env_file == "-/etc/qcowfuse/srv-vm-disk.qcow2.env"


@pytest.mark.root
@pytest.mark.parametrize("stop", ["ExecStop", "admin-umount", "crash-and-restart"])
def test_unit_lifecycle(tmp_path, qcowfuse_bin, notify, stop):
    """ExecStartPre, ExecStart (Type=notify), ExecStop of the shipped unit, run like systemd runs them.

    admin-umount: `umount` behind systemd's back ends the daemon with exit 0, so
    Restart=on-failure leaves it stopped.  crash-and-restart: a SIGKILLed daemon
    leaves a dead mount; ExecStartPre clears it and the restart mounts again."""
    size = 32 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size)
    mp = tmp_path / "raw"
    instance = systemd_escape_path(img)
    spec = unit_specifiers(instance)
    assert spec["f"] == str(img)
    u = parse_unit(UNIT.read_text())
    env_file = tmp_path / f"{instance}.env"  # stands in for /etc/qcowfuse/%i.env
    env_file.write_text(f"MOUNTPOINT={mp}\nOPTIONS=rw,noatime\n")
    env = unit_environment(u, spec, env_file)
    (pre,) = [unit_command(v, spec, env) for v in u[("Service", "ExecStartPre")]]
    _, start = unit_command(u[("Service", "ExecStart")][0], spec, env)
    assert start[0] == UNIT_QCOWFUSE
    start[0] = str(qcowfuse_bin)
    (stop_cmd,) = [unit_command(v, spec, env) for v in u[("Service", "ExecStop")]]
    log = tmp_path / "journal.log"
    run_env = dict(os.environ, **env)

    def start_service() -> subprocess.Popen:
        subprocess.run(pre[1], env=run_env, capture_output=True, timeout=30)  # failure ignored ("-")
        proc = stack.enter_context(foreground(start, log, notify, img, mp))
        ready = notify.wait_for("READY", proc, log)
        assert int(ready.get("MAINPID", proc.pid)) == proc.pid
        assert_live(mp, size)
        return proc

    with contextlib.ExitStack() as stack:
        proc = start_service()
        with open(mp, "r+b") as fh:
            fh.seek(1 << 20)
            fh.write(b"\x42" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
        if stop == "crash-and-restart":
            proc.kill()
            assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL  # systemd: failure -> restart
            assert mount_entry(mp) is not None  # the dead mount is still there
            with pytest.raises(OSError):
                os.stat(mp)  # ENOTCONN
            proc = start_service()
            with open(mp, "rb") as fh:
                fh.seek(1 << 20)
                assert fh.read(65536) == b"\x42" * 65536
        if stop == "admin-umount":
            r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=30)
        else:
            r = subprocess.run(stop_cmd[1], env=run_env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=TIMEOUT) == 0, log.read_text(errors="replace")
    assert mount_entry(mp) is None
    assert not mp.exists() or stop == "crash-and-restart"  # created by the first start: removed again
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x42 1M 64k", read_only=True)


# -- b: sd_notify readiness -----------------------------------------------------

@pytest.mark.root
def test_sd_notify_ready_then_stopping(tmp_path, qcowfuse_bin, notify):
    size = 48 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size)
    qemu.qemu_io(img, "write -P 0x5a 3M 64k")
    mp = tmp_path / "raw"  # missing: created as an empty file, removed at exit
    log = tmp_path / "daemon.log"
    with foreground([str(qcowfuse_bin), "-f", str(img), str(mp)], log, notify, img, mp) as proc:
        ready = notify.wait_for("READY", proc, log)
        # The moment READY=1 arrives, the mount is live and answers.
        assert_live(mp, size)
        with open(mp, "rb") as fh:
            fh.seek(3 << 20)
            assert fh.read(65536) == b"\x5a" * 65536
        assert ready["READY"] == "1"
        assert int(ready.get("MAINPID", proc.pid)) == proc.pid
        with open(mp, "r+b") as fh:
            fh.seek(10 << 20)
            fh.write(b"\x99" * 4096)
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", proc, log)["STOPPING"] == "1"
        assert proc.wait(timeout=TIMEOUT) == 0, log.read_text(errors="replace")
    assert mount_entry(mp) is None
    assert not mp.exists()
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x5a 3M 64k", "read -P 0x99 10M 4k", read_only=True)


@pytest.mark.root
def test_sd_notify_absent_socket_is_harmless(tmp_path, qcowfuse_bin):
    """NOTIFY_SOCKET naming nothing (systemd gone, a stale variable) must not stop the daemon."""
    img = qemu.create(tmp_path / "disk.qcow2", 8 << 20)
    mp = tmp_path / "raw"
    pidfile = tmp_path / "pid"
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "nobody-listens"))
    with cleanup(img, mp):
        r = subprocess.run([str(qcowfuse_bin), str(img), str(mp), "--pidfile", str(pidfile)],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pid = int(pidfile.read_text())
        assert_live(mp, 8 << 20)
        subprocess.run(["fusermount3", "-u", str(mp)], check=True, timeout=30)
        wait_exit([pid])
    qemu.assert_clean(img)


@pytest.mark.root
def test_relative_pidfile_lands_in_the_callers_directory(tmp_path, qcowfuse_bin):
    """`--pidfile p` names p in the caller's cwd, though the daemon runs in /."""
    img = qemu.create(tmp_path / "disk.qcow2", 8 << 20)
    mp = tmp_path / "raw"
    with cleanup(img, mp):
        r = subprocess.run([str(qcowfuse_bin), "disk.qcow2", "raw", "--pidfile", "p"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        (pid,) = holders(img)
        assert (tmp_path / "p").read_text() == f"{pid}\n"
        subprocess.run(["fusermount3", "-u", str(mp)], check=True, timeout=30)
        wait_exit([pid])
    assert not (tmp_path / "p").exists()  # removed at exit, from the same place


# -- c: mount(8), fstab, mount.fuse3 ---------------------------------------------
#
# mount(8) runs the helper /sbin/mount.fuse (-> mount.fuse3) with PATH removed
# from the environment; mount.fuse3 runs `/bin/sh -c 'qcowfuse IMAGE MP -o OPTS'`,
# so for `-t fuse.qcowfuse` the program must be in the shell's default path
# (/usr/local/bin, /usr/bin, ...).  The fstab test mounts through the
# /usr/local/bin/qcowfuse that scripts/install puts there; the others use the venv's:
#   "mount"       mount(8) -t fuse 'PROGRAM#IMAGE' (mount.fuse3's form naming the
#                 program), PROGRAM = the qcowfuse under test;
#   "mount.fuse3" the exact command mount(8) runs for -t fuse.qcowfuse, with the
#                 venv first on PATH.

def helper_mount(how: str, binary: Path, image: Path, mp: Path, options: str) -> subprocess.CompletedProcess:
    if how == "mount":
        argv = ["mount", "-t", "fuse", f"{binary}#{image}", str(mp), "-o", options]
        env = dict(os.environ)
    else:
        helper = which("mount.fuse3")
        if helper is None:
            pytest.skip("mount.fuse3 not installed")
        argv = [helper, str(image), str(mp), "-o", options, "-t", "fuse.qcowfuse"]
        env = dict(os.environ, PATH=f"{binary.parent}:{os.environ.get('PATH', SBIN_PATH)}")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def umount_and_wait(mp: Path, image: Path) -> None:
    daemons = holders(image)
    assert len(daemons) == 1, daemons
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    wait_exit(daemons)
    wait_until(lambda: not holders(image), "the image to be closed")
    assert mount_entry(mp) is None


@pytest.mark.root
@pytest.mark.parametrize("how", ["mount", "mount.fuse3"])
def test_helper_mount_ro_leaves_image_untouched(tmp_path, qcowfuse_bin, how):
    size = 32 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size)
    qemu.qemu_io(img, "write -P 0x3c 0 128k", "write -P 0xc3 20M 1M")
    expect = qemu.convert_to_raw(img, tmp_path / "expect.raw").read_bytes()
    before, mtime = img.read_bytes(), img.stat().st_mtime_ns
    mp = tmp_path / "raw"
    with cleanup(img, mp):
        r = helper_mount(how, qcowfuse_bin, img, mp, "ro")
        assert r.returncode == 0, r.stdout + r.stderr
        assert_live(mp, size, ro=True)
        assert mp.read_bytes() == expect
        with pytest.raises(OSError) as e:
            os.open(mp, os.O_WRONLY)
        assert e.value.errno in (errno.EROFS, errno.EACCES)  # ro mount / mode 0444
        umount_and_wait(mp, img)
    assert img.read_bytes() == before and img.stat().st_mtime_ns == mtime
    qemu.assert_clean(img)


@pytest.mark.root
@pytest.mark.parametrize("how", ["mount", "mount.fuse3"])
def test_helper_mount_rw_writes_reach_image(tmp_path, qcowfuse_bin, how):
    size = 32 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size, cluster_size=4096)
    mp = tmp_path / "raw"
    mp.touch()  # an existing file this time
    with cleanup(img, mp):
        r = helper_mount(how, qcowfuse_bin, img, mp, "rw")
        assert r.returncode == 0, r.stdout + r.stderr
        assert_live(mp, size)
        fd = os.open(mp, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\x6b" * (300 << 10), 5 << 20) == 300 << 10
            assert os.pwrite(fd, b"\x17" * 512, size - 512) == 512
            os.fsync(fd)
        finally:
            os.close(fd)
        umount_and_wait(mp, img)
    assert mp.exists() and mp.stat().st_size == 0  # a pre-existing mount point stays
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x6b 5M 300k", f"read -P 0x17 {size - 512} 512", "read -P 0 0 5M",
                 read_only=True)


FSTAB_OPTIONS = "defaults,noatime,nofail,_netdev,ro"


def daemon_options(image: Path) -> list[str]:
    """The -o arguments the running daemon got (from its command line)."""
    (pid,) = holders(image)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return [argv[i + 1].decode() for i, a in enumerate(argv[:-1]) if a == b"-o"]


SYSTEM_HOME = Path("/opt/qcowfuse")  # scripts/install's defaults
SYSTEM_MANIFEST = SYSTEM_HOME / "installed-files"


@pytest.fixture
def system_install() -> Iterator[Path]:
    """qcowfuse installed by scripts/install where fstab finds it (/usr/local/bin).
    Suites in other checkouts may do the same at once: a lock serialises them.  An
    install that was there before is updated and left; one made here is removed."""
    import fcntl
    repo = Path(__file__).resolve().parent.parent
    with open("/tmp/qcowfuse-system-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        had_install = SYSTEM_MANIFEST.exists()
        if os.path.lexists(UNIT_QCOWFUSE) and not had_install:
            pytest.skip(f"{UNIT_QCOWFUSE} exists but was not installed by scripts/install")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QCOWFUSE_")}
        r = subprocess.run([str(repo / "scripts" / "install")], env=env, capture_output=True, text=True,
                           timeout=600)
        try:
            assert r.returncode == 0, r.stdout + r.stderr
            yield Path(UNIT_QCOWFUSE)
        finally:
            if not had_install:
                subprocess.run([str(repo / "scripts" / "install"), "--uninstall"], env=env,
                               capture_output=True, timeout=120)


@pytest.mark.root
def test_fstab_line_with_generic_options(tmp_path, system_install):
    """`mount MP` with an fstab line of type fuse.qcowfuse, run with no PATH at all:
    mount.fuse3's shell must find /usr/local/bin/qcowfuse as scripts/install left it.
    mount(8) drops defaults, mount.fuse3 drops nofail and _netdev and adds dev,suid;
    qcowfuse must accept whatever is left."""
    size = 16 << 20
    img = qemu.create(tmp_path / "disk.qcow2", size)
    qemu.qemu_io(img, "write -P 0x11 0 64k")
    before = img.read_bytes()
    mp = tmp_path / "raw"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{img}  {mp}  fuse.qcowfuse  {FSTAB_OPTIONS}  0 0\n")
    mount_bin = which("mount")
    with cleanup(img, mp):
        r = subprocess.run([mount_bin, "--fstab", str(fstab), str(mp)], env={}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_live(mp, size, ro=True)
        (pid,) = holders(img)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1].decode() == str(system_install), argv  # python3 /usr/local/bin/qcowfuse ...
        passed = ",".join(daemon_options(img)).split(",")
        print("options reaching qcowfuse from fstab:", passed)
        assert "ro" in passed
        with open(mp, "rb") as fh:
            assert fh.read(65536) == b"\x11" * 65536
        umount_and_wait(mp, img)
    assert img.read_bytes() == before
    qemu.assert_clean(img)


@pytest.mark.root
@pytest.mark.parametrize("options", [
    FSTAB_OPTIONS,
    "defaults,noatime,nofail,_netdev,ro,dev,suid",
    "ro,nodev,nosuid,noexec,relatime,auto,user,users,nouser,x-systemd.automount,comment=systemd.x",
], ids=["fstab", "fstab+helper", "generic"])
def test_generic_options_accepted_directly(tmp_path, qcowfuse_bin, options):
    """The same lists, given to qcowfuse by hand (or by a helper that passes everything)."""
    img = qemu.create(tmp_path / "disk.qcow2", 8 << 20)
    before = img.read_bytes()
    mp = tmp_path / "raw"
    with cleanup(img, mp):
        r = subprocess.run([str(qcowfuse_bin), "-o", options, str(img), str(mp)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert_live(mp, 8 << 20, ro=True)
        umount_and_wait(mp, img)
    assert img.read_bytes() == before


# -- d: without root -----------------------------------------------------------

@contextlib.contextmanager
def dev_fuse_mode(mode: int) -> Iterator[None]:
    """/dev/fuse with the given mode for the duration; restored afterwards.

    udev's default rules make /dev/fuse 0666 (non-root FUSE needs to open it;
    fusermount3 only does the mount(2)); a bare devtmpfs without udev leaves it
    0600, and then libfuse fails before it even tries fusermount3."""
    old = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if old != mode:
        os.chmod("/dev/fuse", mode)
    try:
        yield
    finally:
        if old != mode:
            os.chmod("/dev/fuse", old)


@contextlib.contextmanager
def fuse_conf(user_allow_other: bool) -> Iterator[None]:
    """/etc/fuse.conf with or without `user_allow_other`; the original is restored byte for byte."""
    path = Path("/etc/fuse.conf")
    original = path.read_bytes() if path.exists() else None
    mode = stat.S_IMODE(path.stat().st_mode) if original is not None else 0o644
    lines = (original or b"").decode().splitlines()
    has = any(line.strip() == "user_allow_other" for line in lines)
    if has == user_allow_other:
        yield
        return
    lines = [line for line in lines if line.strip() != "user_allow_other"]
    if user_allow_other:
        lines.append("user_allow_other")
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, mode)
    try:
        yield
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)
            os.chmod(path, mode)


class Nobody:
    def __init__(self, root: Path, prefix: list[str]) -> None:
        self.dir = root
        self.prefix = prefix
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root), "LANG": "C.UTF-8"}

    def run(self, *argv: str | Path, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + [str(a) for a in argv], input=input, capture_output=True,
                              env=self.env, cwd=self.dir, timeout=timeout)

    def file(self, name: str, data: bytes = b"") -> Path:
        p = self.dir / name
        p.write_bytes(data)
        os.chown(p, NOBODY, NOBODY)
        return p


@pytest.fixture
def nobody(qcowfuse_bin) -> Iterator[Nobody]:
    """A directory owned by nobody outside the 0700 pytest tmp dirs, and a way to run as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid 65534")
    if which("setpriv"):
        prefix = [which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    elif which("runuser"):
        prefix = [which("runuser"), "-u", "nobody", "--"]
    else:
        pytest.skip("neither setpriv nor runuser installed")
    fusermount = which("fusermount3")
    if fusermount is None or not os.stat(fusermount).st_mode & stat.S_ISUID:
        pytest.skip("fusermount3 missing or not setuid root")
    probe = subprocess.run(prefix + [sys.executable, "-c", "import pyfuse3, trio, qcowfuse.cli"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode:
        pytest.skip(f"the venv is not usable by uid {NOBODY}: {probe.stderr.strip()[-300:]}")
    root = scratch_dir("qcowfuse-nobody-", dir="/var/tmp")
    os.chmod(root, 0o755)
    os.chown(root, NOBODY, NOBODY)
    try:
        with dev_fuse_mode(0o666):
            yield Nobody(root, prefix)
    finally:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                mp = unescape_mount(line.split()[1])
                if mp.startswith(str(root) + "/"):
                    force_unmount(mp)
        for f in root.glob("*.qcow2"):
            kill_holders(f)
        shutil.rmtree(root, ignore_errors=True)


def nobody_image(nobody, size: int, *qemu_io_commands: str) -> Path:
    """A qcow2 image in nobody's directory, owned by nobody."""
    img = nobody.dir / "disk.qcow2"
    qemu.create(img, size)
    if qemu_io_commands:
        qemu.qemu_io(img, *qemu_io_commands)
    os.chown(img, NOBODY, NOBODY)
    return img


@pytest.mark.root
def test_nobody_mounts_reads_writes_unmounts(nobody, qcowfuse_bin):
    size = 16 << 20
    img = nobody_image(nobody, size, "write -P 0x2e 0 64k")
    mp = nobody.file("raw")
    pidfile = nobody.dir / "qcowfuse.pid"
    data = nobody.file("data", b"\xa5" * (256 << 10))

    r = nobody.run(qcowfuse_bin, img, mp, "--pidfile", pidfile)
    assert r.returncode == 0, r.stderr.decode()
    pid = int(pidfile.read_text())
    try:
        fstype, options = mount_entry(mp)
        assert fstype == "fuse.qcowfuse" and f"user_id={NOBODY}" in options, options
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY}\s", status, re.M), status
        # Without allow_other the mount is nobody's alone: even root is turned away.
        with pytest.raises(PermissionError):
            os.stat(mp)

        r = nobody.run("stat", "-c", "%s %U", mp)
        assert r.stdout.decode().split() == [str(size), "nobody"], r.stderr
        r = nobody.run("dd", f"if={data}", f"of={mp}", "bs=64k", "seek=16", "conv=notrunc,fsync",
                       "status=none")
        assert r.returncode == 0, r.stderr.decode()
        r = nobody.run("dd", f"if={mp}", "bs=64k", "count=20", "status=none")
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout[:65536] == b"\x2e" * 65536
        assert r.stdout[1 << 20:(1 << 20) + (256 << 10)] == data.read_bytes()

        r = nobody.run("fusermount3", "-u", mp)
        assert r.returncode == 0, r.stderr.decode()
        wait_exit([pid])
    finally:
        force_unmount(mp)
        kill_holders(img)
    assert mount_entry(mp) is None
    assert img.stat().st_uid == NOBODY
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x2e 0 64k", "read -P 0xa5 1M 256k", read_only=True)


@pytest.mark.root
@pytest.mark.parametrize("fg", [False, True], ids=["daemon", "foreground"])
def test_nobody_allow_other_without_user_allow_other(nobody, qcowfuse_bin, fg):
    """One clear line naming user_allow_other and /etc/fuse.conf, non-zero exit, nothing left."""
    img = nobody_image(nobody, 8 << 20)
    before = img.read_bytes()
    mp = nobody.dir / "raw"  # missing: must not be left behind
    with fuse_conf(user_allow_other=False):
        try:
            r = nobody.run(qcowfuse_bin, *(["-f"] if fg else []), "-o", "allow_other", img, mp,
                           timeout=30)
        finally:
            force_unmount(mp)
            kill_holders(img)
    err = r.stderr.decode()
    print(f"qcowfuse said (exit {r.returncode}): {err!r}")
    assert_one_line_error(r.returncode, err, "user_allow_other", "/etc/fuse.conf")
    assert not mp.exists()
    assert img.read_bytes() == before


@pytest.mark.root
def test_nobody_allow_other_with_user_allow_other(nobody, qcowfuse_bin):
    size = 8 << 20
    img = nobody_image(nobody, size, "write -P 0x71 0 4k")
    mp = nobody.file("raw")
    pidfile = nobody.dir / "qcowfuse.pid"
    with fuse_conf(user_allow_other=True):
        r = nobody.run(qcowfuse_bin, "-o", "allow_other", img, mp, "--pidfile", pidfile)
    assert r.returncode == 0, r.stderr.decode()
    pid = int(pidfile.read_text())
    try:
        assert "allow_other" in mount_entry(mp)[1]
        assert os.stat(mp).st_size == size  # another user (root) gets in now
        with open(mp, "rb") as fh:
            assert fh.read(4096) == b"\x71" * 4096
        r = nobody.run("fusermount3", "-u", mp)
        assert r.returncode == 0, r.stderr.decode()
        wait_exit([pid])
    finally:
        force_unmount(mp)
        kill_holders(img)
    qemu.assert_clean(img)


@pytest.mark.root
def test_nobody_without_access_to_dev_fuse(nobody, qcowfuse_bin):
    """/dev/fuse 0600 (no udev): a clear one-line reason, not "fuse_session_mount failed"."""
    img = nobody_image(nobody, 8 << 20)
    mp = nobody.dir / "raw"
    with dev_fuse_mode(0o600):
        try:
            r = nobody.run(qcowfuse_bin, img, mp, timeout=30)
        finally:
            force_unmount(mp)
            kill_holders(img)
    err = r.stderr.decode()
    print(f"qcowfuse said (exit {r.returncode}): {err!r}")
    assert_one_line_error(r.returncode, err, "/dev/fuse")
    assert not mp.exists()
