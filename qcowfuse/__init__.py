"""qcowfuse: a qcow2 image as a plain raw file, through FUSE.

The engine is usable on its own::

    from qcowfuse import Image
    with Image.open("disk.qcow2", writable=True) as img:
        img.write(0, b"hello")
        img.read(0, 5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (CorruptError, FormatError, ImageInUseError, NotQcow2Error, QcowError,
                     ReadOnlyError, UnsupportedError)

if TYPE_CHECKING:
    from .image import Image

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The engine is imported on first use (PEP 562): `qcowfuse info` and the other
    # commands start without loading modules they never call.
    if name == "Image":
        from .image import Image
        return Image
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Image", "QcowError", "NotQcow2Error", "FormatError", "UnsupportedError",
           "CorruptError", "ReadOnlyError", "ImageInUseError", "__version__"]
