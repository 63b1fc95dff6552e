"""`qcowfuse info`: what an image is, as a dict with stable keys (documented in README)."""

from __future__ import annotations

import datetime
import os

from .backing import RawLayer
from .image import Image
from .qcow2.header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from .qcow2.tables import L1E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, ClusterType, classify


def _feature_names(img: Image) -> dict[str, list[str]]:
    h = img.header
    out = {}
    for kind, bits in (("incompatible", h.incompatible_features), ("compatible", h.compatible_features),
                       ("autoclear", h.autoclear_features)):
        out[kind] = [h.feature_name(kind, b) for b in range(64) if bits >> b & 1]
    return out


def allocated_clusters(img: Image) -> int:
    """Guest clusters of the active layer with data (normal, preallocated zero, compressed)."""
    n = 0
    for l1e in img.l1:
        off = l1e & L1E_OFFSET_MASK
        if not off:
            continue
        table = img.l2.get(off)
        if img.header.extended_l2:  # (entry, subcluster bitmap) pairs
            n += sum(1 for e, bm in zip(table[::2], table[1::2])
                     if e & QCOW_OFLAG_COMPRESSED or bm & 0xFFFFFFFF)
        else:
            n += sum(1 for e in table
                     if classify(e, img.version) in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC,
                                                     ClusterType.COMPRESSED))
    return n


def image_info(path: str) -> dict:
    """Open without locks (like qemu-img info -U): information only, never a write."""
    img = Image.open(path, writable=False, lock=False)
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
        return {
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
            "allocated-bytes": allocated_clusters(img) * h.cluster_size,
            "backing-file": h.backing_file,
            "backing-format": h.backing_format,
            "backing-chain": chain,
            "snapshots": snapshots,
            "features": _feature_names(img),
            "bitmaps": img.bitmaps.info() if img.bitmaps is not None else [],
            "dirty": bool(h.incompatible_features & INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
        }
    finally:
        img.close()
