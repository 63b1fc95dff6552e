"""The systemd unit (what it declares, systemd-analyze verify, its commands run as
systemd would run them) and sd_notify readiness.

Everything runs the installed `qcowfuse` program next to sys.executable (the
venv scripts/test creates), never `python -m`, because that is what systemd runs.
mount(8) / fstab: test_fstab.py; mounting without root: test_nonroot.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import qemu
from helpers.services import (TIMEOUT, UNIT_QCOWFUSE, assert_live, cleanup, foreground, holders,
                              mount_entry, wait_exit, which)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "qcowfuse@.service"


# -- the unit file ---------------------------------------------------------------------

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


# -- the unit's commands, run as systemd would run them --------------------------------

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


# -- sd_notify readiness ---------------------------------------------------------------

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
