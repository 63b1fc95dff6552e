"""`qcowfuse info`: what an image is, as a dict with stable keys (documented in README)."""

from __future__ import annotations

import datetime
import os
from typing import Any

from .backing import RawLayer
from .image import Image
from .progress import Progress
from .qcow2.header import CRYPT_LUKS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from .qcow2.luks import read_luks_header


def _feature_names(img: Image) -> dict[str, list[str]]:
    h = img.header
    out = {}
    for kind, bits in (("incompatible", h.incompatible_features), ("compatible", h.compatible_features),
                       ("autoclear", h.autoclear_features)):
        out[kind] = [h.feature_name(kind, b) for b in range(64) if bits >> b & 1]
    return out


def allocated_clusters(img: Image, progress: Progress | None = None) -> int:
    """Guest clusters of the active layer that own a host cluster (data, preallocated
    zeros, compressed; with extended L2 whatever its subcluster bitmap says): what
    qemu-img check counts as allocated.  Each distinct L2 table is read once, only its
    non-zero entries decoded (qcow2/scan.py)."""
    import numpy as np  # only this key needs the tables; the rest of info does not

    from .qcow2.format import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED,
                               data_at_offset_zero)
    from .qcow2.scan import TableReader, l2_entries, u64

    l1 = np.array(img.l1, dtype=np.uint64)
    offsets = l1[(l1 & u64(L1E_OFFSET_MASK)) != 0] & u64(L1E_OFFSET_MASK)
    tables, times = np.unique(offsets, return_counts=True)
    n = 0
    for at, batch in TableReader(img.f, img.cluster_size).batches(tables.tolist(), progress):
        t = l2_entries(batch, img.header.extended_l2)
        used = (t.entry & u64(L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED)) != 0
        if img.data_file:  # guest cluster 0 at offset 0 of the data file (format.offset_zero_flag)
            used |= data_at_offset_zero(t.entry)
        n += int(times[at + t.row[used]].sum())
    return n


def image_info(path: str, progress: Progress | None = None, allocated: bool = False) -> dict[str, Any]:
    """Open without locks (like qemu-img info -U): information only, never a write.
    Everything comes from the header, the snapshot table, the bitmap directory and the
    backing chain, as qemu-img info's does; only `allocated-bytes` (asked for with
    `allocated`) reads the L2 tables."""
    img = Image.open(path, writable=False, lock=False, metadata_only=True)
    try:
        h = img.header
        st = os.fstat(img.f.fd)
        chain = []
        layer = img.backing
        while layer is not None:
            if isinstance(layer, Image):
                chain.append({"filename": layer.f.path, "format": "qcow2", "virtual-size": layer.size})
                layer = layer.backing
            else:
                assert isinstance(layer, RawLayer)
                chain.append({"filename": layer.path, "format": "raw", "virtual-size": layer.size})
                layer = None
        snapshots = [{
            "id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
            "disk-size": s.disk_size if s.disk_size is not None else h.size,
            "date": datetime.datetime.fromtimestamp(s.date_sec, datetime.timezone.utc).isoformat(),
            "vm-clock-nsec": s.vm_clock_nsec,
        } for s in img.snapshots]
        info = {
            "filename": path,
            "format": "qcow2",
            "version": h.version,
            "compat": "1.1" if h.version == 3 else "0.10",
            "virtual-size": h.size,
            "cluster-size": h.cluster_size,
            "refcount-bits": h.refcount_bits,
            "compression-type": "zstd" if h.compression_type else "zlib",
            "host-file-size": st.st_size,
            "disk-usage": st.st_blocks * 512,
            "backing-file": h.backing_file,
            "backing-format": h.backing_format,
            "backing-chain": chain,
            "snapshots": snapshots,
            "features": _feature_names(img),
            "bitmaps": img.bitmaps.info() if img.bitmaps is not None else [],
            "dirty": bool(h.incompatible_features & INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "encrypted": bool(h.crypt_method),
        }
        if h.has_data_file:  # named as the image names it; the file is not opened
            info["data-file"] = h.data_file
            info["data-file-raw"] = h.data_file_raw
        if h.crypt_method == CRYPT_LUKS:  # the LUKS header is in the clear: no key needed
            info["encrypt"] = read_luks_header(img.f, h)[0].describe()
        if allocated:
            info["allocated-bytes"] = allocated_clusters(img, progress) * h.cluster_size
        return info
    finally:
        img.close()
