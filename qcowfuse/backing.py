"""Backing files: opening the chain below an image (read-only, never modified).

A relative backing name resolves against the directory of the image that
names it (as QEMU does), not the current directory.  The format comes from
the backing-format header extension, else from probing the magic.  A chain
that reaches a file twice is a loop and is refused, as is a missing file.
"""

from __future__ import annotations

import os
import stat
from typing import Callable, Protocol

from .errors import FormatError, QcowError, UnsupportedError
from .locking import lock_image
from .qcow2.header import MAGIC
from .qcow2.state import Layer

__all__ = ["Layer", "RawLayer", "QcowOpener", "file_identity", "open_backing"]

MAX_CHAIN_DEPTH = 64


class RawLayer:
    """A raw file as a backing layer; reads past its end are zeros."""

    def __init__(self, path: str, lock: bool) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if lock:
                lock_image(self.fd, False, path)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)  # block devices too
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset) if offset < self.size else b""
        return data if len(data) == length else data.ljust(length, b"\0")

    def unlocked_read(self) -> Callable[[int, int], bytes]:
        return self.read

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def file_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def resolve(name: str, referrer: str) -> str:
    if ":" in name.split("/", 1)[0] and not os.path.exists(name):
        # protocol names such as nbd:..., json:{...}, https://...
        raise UnsupportedError(f"backing file '{name}' of {referrer} is not a local file")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(referrer)), name)


def probe_format(path: str) -> str:
    with open(path, "rb") as fh:
        return "qcow2" if fh.read(4) == MAGIC else "raw"


class QcowOpener(Protocol):
    """How a qcow2 backing file is opened: Image.open, passed in by the image, so that
    this module needs no import of it."""

    def __call__(self, path: str, *, writable: bool, lock: bool,
                 _seen: frozenset[tuple[int, int]]) -> Layer: ...


def open_backing(name: str, fmt: str | None, referrer: str, seen: frozenset[tuple[int, int]],
                 lock: bool, open_qcow2: QcowOpener, chosen: bool = False) -> Layer:
    """Open the backing file `name` that image `referrer` names, and its own chain
    (qcow2 layers with `open_qcow2`).

    A name taken from an image must be a regular file: an image that names a device,
    a FIFO or a socket is refused (a hostile image could otherwise show any device to
    whoever reads the raw view).  `chosen`: the user named this path (-o backing=PATH),
    which may also be a block device."""
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise FormatError(f"backing chain of {referrer} is deeper than {MAX_CHAIN_DEPTH}")
    if not name:
        raise FormatError(f"{referrer} names an empty backing file")
    path = os.path.abspath(name) if chosen else resolve(name, referrer)
    if not os.path.exists(path):
        raise QcowError(f"backing file not found: {path} (named by {referrer})")
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode) or not (stat.S_ISREG(st.st_mode) or chosen and stat.S_ISBLK(st.st_mode)):
        raise QcowError(f"backing file {path} (named by {referrer}) is not a regular file"
                        + ("" if chosen else "; name it with -o backing=PATH if you mean it"))
    try:
        return _open_layer(path, fmt, referrer, seen, lock, open_qcow2)
    except OSError as e:
        raise QcowError(f"backing file {path}: {e.strerror}") from None


def _open_layer(path: str, fmt: str | None, referrer: str, seen: frozenset[tuple[int, int]],
                lock: bool, open_qcow2: QcowOpener) -> Layer:
    key = file_identity(path)
    if key in seen:
        raise FormatError(f"backing chain loops: {referrer} names {path}, which is already in the chain")
    fmt = fmt or probe_format(path)
    if fmt == "qcow2":
        try:
            return open_qcow2(path, writable=False, lock=lock, _seen=seen | {key})
        except QcowError as e:
            msg = str(e)
            if path in msg or "backing" in msg:
                raise  # as it is (NeedsPassphrase keeps its path)
            raise type(e)(f"backing file {path}: {msg}") from None
    if fmt == "raw":
        return RawLayer(path, lock)
    raise UnsupportedError(f"backing file {path} has format '{fmt}'; only qcow2 and raw are supported")
