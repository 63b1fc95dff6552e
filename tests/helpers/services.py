"""qcowfuse run the way systemd, mount(8) and users run it: the installed program
next to sys.executable (the venv scripts/test creates), never `python -m`; the mount
table, the processes holding an image, sd_notify's receiving end, and cleanup that
leaves no mount and no daemon behind in any path.

Used by test_systemd.py, test_fstab.py and test_nonroot.py (their fixtures
qcowfuse_bin and notify are in conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from helpers.procs import pid_alive, unescape_mount

BIN_DIR = Path(sys.executable).parent
QCOWFUSE_BIN = BIN_DIR / "qcowfuse"
UNIT_QCOWFUSE = "/usr/local/bin/qcowfuse"  # ExecStart= in the shipped unit; where scripts/install puts it
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 20.0


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
