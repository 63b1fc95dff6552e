"""Exceptions raised by the engine; each carries a message a user can act on."""

from __future__ import annotations


class QcowError(Exception):
    """Base class: anything the CLI turns into one line and a non-zero exit."""


class NotQcow2Error(QcowError):
    """The file is not a qcow2 image at all (too short, wrong magic)."""


class FormatError(QcowError):
    """The header or a table violates the qcow2 specification."""


class UnsupportedError(QcowError):
    """A valid image that uses a feature qcowfuse does not implement (yet)."""


class NeedsPassphrase(UnsupportedError):
    """An encrypted image opened to read or write data without its passphrase; `path`:
    that image's file (the top image, or a backing file)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CorruptError(QcowError):
    """Metadata met at run time points somewhere it must not (EIO for that range)."""


class ReadOnlyError(QcowError):
    """A write was attempted on an image opened read-only."""


class ImageInUseError(QcowError):
    """Another process holds a conflicting lock on the image."""


class ResizeError(QcowError):
    """A resize that is refused; `errno` is what a truncate(2) caller should get."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code
