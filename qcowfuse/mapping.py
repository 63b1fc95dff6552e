"""`qcowfuse map`: where the guest disk's data lives, in `qemu-img map --output=json` terms.

Each extent says which layer of the backing chain answers for it (`depth`, 0 =
the image itself), whether that layer has it (`present`), whether it reads as
zeros (`zero`), whether it is data (`data`) and, for plain data clusters, the
byte offset in that layer's file (`offset`).  Adjacent extents that agree
(and whose offsets continue) are merged, as qemu-img does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .backing import Layer, RawLayer
from .errors import UnsupportedError
from .image import Image
from .qcow2.tables import L2E_OFFSET_MASK, ClusterType, classify


@dataclass
class Extent:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    def to_json(self) -> dict:
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def continues(self, prev: "Extent") -> bool:
        if (prev.depth, prev.present, prev.zero, prev.data) != (self.depth, self.present, self.zero, self.data):
            return False
        if prev.start + prev.length != self.start:
            return False
        if (prev.offset is None) != (self.offset is None):
            return False
        return prev.offset is None or prev.offset + prev.length == self.offset


def _layer_status(layer: Layer, start: int, length: int, depth: int) -> Iterator[Extent]:
    if isinstance(layer, RawLayer):
        inside = max(0, min(length, layer.size - start))
        if inside:
            yield Extent(start, inside, depth, True, False, True, start)
        if inside < length:
            yield Extent(start + inside, length - inside, depth, False, True, False)
        return
    assert isinstance(layer, Image)
    img = layer
    cs, cb = img.cluster_size, img.cluster_bits
    end = min(start + length, img.size)
    pos = start
    while pos < end:
        g = pos >> cb
        n = min(cs - (pos & (cs - 1)), end - pos)
        table = img._l2_table(g >> img.l2_bits)
        entry = table[g & (img.l2_entries - 1)] if table is not None else 0
        kind = classify(entry, img.version)
        if kind is ClusterType.NORMAL:
            yield Extent(pos, n, depth, True, False, True, (entry & L2E_OFFSET_MASK) + (pos & (cs - 1)))
        elif kind is ClusterType.COMPRESSED:
            yield Extent(pos, n, depth, True, False, True)
        elif kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            yield Extent(pos, n, depth, True, True, False)
        elif img.backing is not None and pos < img.backing.size:
            yield from _layer_status(img.backing, pos, min(n, img.backing.size - pos), depth + 1)
            if pos + n > img.backing.size:
                yield Extent(img.backing.size, pos + n - img.backing.size, depth + 1, False, True, False)
        else:
            yield Extent(pos, n, _bottom_depth(img, depth), False, True, False)
        pos += n
    if start + length > end:
        yield Extent(end, start + length - end, depth, False, True, False)


def _bottom_depth(img: Image, depth: int) -> int:
    layer: Layer | None = img.backing
    while layer is not None:
        depth += 1
        layer = layer.backing if isinstance(layer, Image) else None
    return depth


def image_map(img: Image) -> list[Extent]:
    if img.header.extended_l2:
        raise UnsupportedError("mapping images with extended L2 entries is not supported (use qemu-img map)")
    out: list[Extent] = []
    for ext in _layer_status(img, 0, img.size, 0):
        if out and ext.continues(out[-1]):
            out[-1].length += ext.length
        else:
            out.append(ext)
    return out
