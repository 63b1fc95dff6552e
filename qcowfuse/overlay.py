"""Writes that never reach the image: a qcow2 overlay over an image opened read-only.

`-o overlay`: a new overlay in $TMPDIR (default /var/tmp, as QEMU's snapshot=on),
with no name from the moment it exists (O_TMPFILE; where the filesystem lacks it,
created and unlinked at once), so nothing is left behind however the daemon ends.
Its backing layer is the already open image (or one of its internal snapshots).
`-o overlay=PATH`: the overlay is kept at PATH, an ordinary qcow2 image whose backing
file is the image by absolute name (`backing_fmt=qcow2`), for qemu-img compare or
commit later.  Either way the image file is opened read-only, under QEMU's shared
read lock, and its cluster size is the overlay's (QEMU's rule for overlays).
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

from .backing import resolve
from .errors import QcowError, UnsupportedError
from .hostfile import HostFile
from .image import Image
from .qcow2.create import create_image_file, write_new_image

DEFAULT_TMPDIR = "/var/tmp"  # QEMU's choice too: /tmp is often RAM


def overlay_directory() -> str:
    return os.environ.get("TMPDIR") or DEFAULT_TMPDIR


def _nameless_file(directory: str) -> tuple[int, str]:
    """(fd, a name for messages) of a new file in `directory` that no path leads to."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), directory
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise QcowError(f"overlay in {directory}: {e.strerror}") from None
    try:
        fd, name = tempfile.mkstemp(prefix=".qcowfuse-overlay-", suffix=".qcow2", dir=directory)
    except OSError as e:
        raise QcowError(f"overlay in {directory}: {e.strerror}") from None
    os.unlink(name)
    return fd, directory


def throwaway_overlay(base: Image, **options: Any) -> Image:
    """A new, nameless overlay over the open image `base`; closing it closes `base`."""
    fd, where = _nameless_file(overlay_directory())
    f = HostFile(fd, os.path.join(where, "(qcowfuse overlay, deleted)"))
    try:
        write_new_image(f, base.size, base.cluster_bits, base.f.path, "qcow2")
        return Image.open_file(f, writable=True, backing=base, **options)
    except OSError as e:
        f.close()
        raise QcowError(f"overlay in {where}: {e.strerror}") from None
    except BaseException:
        f.close()
        raise


def _refuse_foreign(path: str, image_path: str) -> None:
    """An existing PATH must be a qcow2 image whose backing file is this image."""
    try:
        with Image.open(path, writable=False, lock=False, backing="off") as existing:
            name = existing.header.backing_file
    except QcowError as e:
        raise QcowError(f"{path}: exists and is not an overlay of {image_path} ({e})") from None
    if name is None:
        raise QcowError(f"{path}: exists and has no backing file; not an overlay of {image_path}")
    target = resolve(name, path)
    try:
        same = os.path.samefile(target, image_path)
    except OSError:
        same = False
    if not same:
        raise QcowError(f"{path}: exists and is an overlay of {target}, not of {image_path}")


def open_overlay(image_path: str, keep: str | None, *, lock: bool = True,
                 snapshot: str | None = None, backing: str | None = None,
                 data_file: str | None = None, **options: Any) -> Image:
    """The writable overlay over `image_path` (opened read-only): throwaway when `keep`
    is None, else kept at `keep` (created if missing).  `backing` and `snapshot` say
    how to open the image, as for a read-only mount (and `data_file`, for a throwaway
    one); options go to the overlay."""
    image_path = os.path.abspath(image_path)
    base_options = {k: v for k, v in options.items() if k in ("l2_cache_bytes", "refcount_cache_bytes")}
    if keep is None:
        base = Image.open(image_path, writable=False, lock=lock, snapshot=snapshot, backing=backing,
                          data_file=data_file, **base_options)
        try:
            return throwaway_overlay(base, **options)
        except BaseException:
            base.close()
            raise
    if snapshot is not None:
        raise UnsupportedError("-o overlay=PATH cannot be over an internal snapshot (QEMU could not "
                               "open it); use -o overlay for a throwaway one")
    if backing is not None:
        raise UnsupportedError("-o overlay=PATH opens the image's own backing chain; drop -o backing")
    if data_file is not None:
        raise UnsupportedError("-o overlay=PATH opens the image as the overlay names it; drop -o data-file")
    keep = os.path.abspath(keep)
    if os.path.exists(keep):
        _refuse_foreign(keep, image_path)
    else:
        with Image.open(image_path, writable=False, lock=lock, metadata_only=True) as base:
            size, cluster_bits = base.size, base.cluster_bits
        create_image_file(keep, size, cluster_bits, image_path, "qcow2")
    return Image.open(keep, writable=True, lock=lock, **options)


def image_file_fd(overlay: Image) -> int:
    """The image's own file under an overlay (whose owner and mode the view shows)."""
    base = overlay.backing
    assert isinstance(base, Image)
    return base.f.fd
