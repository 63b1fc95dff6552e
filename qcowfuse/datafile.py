"""External data files (incompatible bit 2): where an image keeps its guest data when
it is not in the image file itself.

The name comes from the image (header extension 0x44415441) and a read-write open
writes into that file, so an untrusted image must not choose it: a read-only open
follows the name if it is a regular file (as backing files are followed); a
read-write open needs the path from the user (-o data-file=PATH), which may also be
a block device.  A relative name resolves against the image's directory, as QEMU's.
"""

from __future__ import annotations

import fcntl
import os
import stat

from .errors import QcowError, UnsupportedError
from .hostfile import DataFile
from .locking import lock_image


def shown(name: str) -> str:
    """A name from an image, safe to put in a one-line message."""
    return ascii(name)


def open_data_file(image_path: str, name: str | None, writable: bool, chosen: str | None,
                   lock: bool) -> DataFile:
    """Open the data file of the image at image_path, whose header names `name`; chosen:
    the path the user gave (-o data-file=PATH), which overrides the name."""
    if chosen is None:
        if name is None:
            raise QcowError(f"{image_path} has an external data file but does not name it: "
                            f"give it with -o data-file=PATH")
        if writable:
            raise UnsupportedError(
                f"{image_path} keeps its guest data in the external data file {shown(name)}; a "
                f"read-write mount writes there, so name it yourself with -o data-file=PATH "
                f"(or mount read-only with -o ro)")
        if ":" in name.split("/", 1)[0] and not os.path.isabs(name):
            raise UnsupportedError(f"data file {shown(name)} of {image_path} is not a local file")
        path = name if os.path.isabs(name) else \
            os.path.join(os.path.dirname(os.path.abspath(image_path)), name)
    else:
        path = os.path.abspath(chosen)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK  # no FIFO wait
    try:
        fd = os.open(path, flags)
    except OSError as e:
        what = "" if chosen is not None else f" (named by {image_path})"
        raise QcowError(f"data file {shown(path)}{what}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or chosen is not None and stat.S_ISBLK(mode)):
            raise QcowError(
                f"data file {shown(path)} is not a regular file" +
                ("" if chosen is None else " or a block device") +
                ("; name it with -o data-file=PATH if you mean it" if chosen is None else ""))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if lock:
            lock_image(fd, writable, path)
    except BaseException:
        os.close(fd)
        raise
    return DataFile(fd, path)
