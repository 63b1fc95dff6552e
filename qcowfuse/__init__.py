"""qcowfuse: a qcow2 image as a plain raw file, through FUSE.

The engine is usable on its own::

    from qcowfuse import Image
    with Image.open("disk.qcow2", writable=True) as img:
        img.write(0, b"hello")
        img.read(0, 5)
"""

from .errors import (CorruptError, FormatError, ImageInUseError, NotQcow2Error, QcowError,
                     ReadOnlyError, UnsupportedError)
from .image import Image

__version__ = "0.1.0"

__all__ = ["Image", "QcowError", "NotQcow2Error", "FormatError", "UnsupportedError",
           "CorruptError", "ReadOnlyError", "ImageInUseError", "__version__"]
