"""`qcowfuse map`: where the guest disk's data lives, in `qemu-img map --output=json` terms.

Each extent says which layer of the backing chain answers for it (`depth`, 0 =
the image itself), whether that layer has it (`present`), whether it reads as
zeros (`zero`), whether it is data (`data`) and, where the layer has a host
cluster for it, the byte offset in that layer's file (`offset`).  Adjacent
extents that agree (and whose offsets continue) are merged, as qemu-img does.

The L2 tables are read a batch at a time (qcow2/scan.py) and turned into runs
with array operations: only non-zero entries are looked at one by one, so an
empty terabyte costs its table reads.  Extended L2 entries are mapped per
subcluster, as QEMU's block status reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .backing import Layer, RawLayer
from .errors import CorruptError
from .image import Image
from .progress import Progress
from .qcow2.format import (
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, SUBCLUSTER_ALLOC_MASK,
    SUBCLUSTER_ZERO_MASK, SUBCLUSTER_ZERO_SHIFT, SUBCLUSTERS, ClusterType, standard_kinds)
from .qcow2.scan import L2Entries, TableReader, l2_entries, u64

# What a stretch of guest bytes is, in one layer (QEMU's subcluster types).
GAP = 0             # unallocated, no host cluster: the layer below answers
DATA = 1
COMPRESSED = 2
ZERO = 3            # zero, no host cluster
ZERO_ALLOC = 4      # zero, with a host cluster (offset reported)
UNALLOC_ALLOC = 5   # extended L2: host cluster, subcluster not allocated (offset kept
                    # only where nothing lies below)
HAS_HOST = (DATA, ZERO_ALLOC, UNALLOC_ALLOC)
_HAS_HOST = np.zeros(256, bool)  # kind -> has a host offset, as a lookup table
_HAS_HOST[list(HAS_HOST)] = True


@dataclass
class Extent:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    def to_json(self) -> dict[str, Any]:
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


def _units(img: Image, l1_index: np.ndarray, t: L2Entries, ext: bool) -> tuple[np.ndarray, ...]:
    """(guest start, length, kind, host offset) of the non-gap units of a batch of tables,
    in guest order: clusters, or subclusters with extended L2."""
    cb, cs = img.cluster_bits, img.cluster_size
    guest = (l1_index[t.row].astype(np.int64) << img.l2_bits) + t.col.astype(np.int64)
    host = (t.entry & u64(L2E_OFFSET_MASK)).astype(np.int64)
    if not ext:
        std = standard_kinds(t.entry, img.version, img.data_file)
        mapped = np.zeros(len(std), np.uint8)
        for ct, m in ((ClusterType.NORMAL, DATA), (ClusterType.COMPRESSED, COMPRESSED),
                      (ClusterType.ZERO_PLAIN, ZERO), (ClusterType.ZERO_ALLOC, ZERO_ALLOC)):
            mapped[std == ct] = m
        keep = mapped != GAP
        return (guest[keep] << cb, np.full(int(keep.sum()), cs, np.int64), mapped[keep], host[keep])
    compressed = (t.entry & u64(QCOW_OFLAG_COMPRESSED)) != 0
    has_host = host != 0
    # whole clusters where the bitmap is uniform (the common case), else per subcluster
    bm = t.bitmap
    whole = compressed | (bm == u64(0)) | (bm == u64(SUBCLUSTER_ALLOC_MASK)) | \
        (bm == u64(SUBCLUSTER_ZERO_MASK))
    kind = np.where(bm == u64(SUBCLUSTER_ALLOC_MASK), DATA,
                    np.where(bm == u64(0), np.where(has_host, UNALLOC_ALLOC, GAP),
                             np.where(has_host, ZERO_ALLOC, ZERO))).astype(np.uint8)
    kind[compressed] = COMPRESSED
    split = ~whole
    if not split.any():  # whole clusters only: already in guest order
        keep = kind != GAP
        return (guest[keep] << cb), np.full(int(keep.sum()), cs, np.int64), kind[keep], host[keep]
    starts, lengths, kinds, hosts = [guest[whole] << cb], [np.full(int(whole.sum()), cs, np.int64)], \
        [kind[whole]], [host[whole]]
    # clusters with mixed subclusters: one unit per subcluster
    sc_bits = cb - 5
    sub = np.arange(SUBCLUSTERS, dtype=np.uint64)
    alloc = ((bm[split, None] >> sub) & u64(1)) != 0
    zero = ((bm[split, None] >> (sub + u64(SUBCLUSTER_ZERO_SHIFT))) & u64(1)) != 0
    hh = has_host[split, None]
    k = np.where(alloc, DATA, np.where(zero, np.where(hh, ZERO_ALLOC, ZERO),
                                       np.where(hh, UNALLOC_ALLOC, GAP))).astype(np.uint8)
    within = sub.astype(np.int64) << sc_bits
    starts.append(((guest[split, None] << cb) + within).reshape(-1))
    lengths.append(np.full(k.size, 1 << sc_bits, np.int64))
    kinds.append(k.reshape(-1))
    hosts.append((host[split, None] + within).reshape(-1))
    st, ln, kd, hs = (np.concatenate(x) for x in (starts, lengths, kinds, hosts))
    order = np.argsort(st, kind="stable")
    keep = kd[order] != GAP
    order = order[keep]
    return st[order], ln[order], kd[order], hs[order]


def _runs(starts: np.ndarray, lengths: np.ndarray, kinds: np.ndarray,
          hosts: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Merge adjacent units of the same kind whose host offsets continue."""
    if not len(starts):
        return []
    same = np.zeros(len(starts), bool)
    same[1:] = ((kinds[1:] == kinds[:-1]) & (starts[1:] == starts[:-1] + lengths[:-1]))
    with_host = _HAS_HOST[kinds]
    same[1:] &= ~with_host[1:] | (hosts[1:] == hosts[:-1] + lengths[:-1])
    heads = np.flatnonzero(~same)
    ends = np.append(heads[1:], len(starts))
    run_len = (starts[ends - 1] + lengths[ends - 1]) - starts[heads]
    return list(zip(starts[heads].tolist(), run_len.tolist(), kinds[heads].tolist(),
                    hosts[heads].tolist()))


def _qcow2_runs(img: Image, start: int, end: int, progress: Progress | None
                ) -> Iterator[tuple[int, int, int, int]]:
    """Runs (start, length, kind, host) covering [start, end) of one qcow2 layer."""
    cs = img.cluster_size
    span = cs << img.l2_bits
    ext = img.header.extended_l2
    first, last = start // span, (end - 1) // span
    l1 = np.array(img.l1[first:last + 1], dtype=np.uint64)
    present = np.flatnonzero(l1 & u64(L1E_OFFSET_MASK))
    offsets = (l1[present] & u64(L1E_OFFSET_MASK)).astype(np.int64)
    bad = offsets[(offsets & (cs - 1)) != 0]
    if len(bad):
        raise CorruptError(f"L2 table at unaligned offset {int(bad[0]):#x}")
    reader = TableReader(img.f, cs, (256 << 10) if ext else (1 << 20))
    cursor = start  # everything before it has been yielded or is pending
    pending: list[int] | None = None
    for at, batch in reader.batches(offsets.tolist(), progress):
        n = batch.shape[0]
        out: list[tuple[int, int, int, int]] = []
        for rs, rl, rk, rh in _runs(*_units(img, present[at:at + n] + first, l2_entries(batch, ext), ext)):
            if rs < start:  # clip to the range asked for
                rh += start - rs if rk in HAS_HOST else 0
                rl -= start - rs
                rs = start
            rl = min(rl, end - rs)
            if rl <= 0:
                continue
            for run in ([cursor, rs - cursor, GAP, 0], [rs, rl, rk, rh]) if rs > cursor else ([rs, rl, rk, rh],):
                if pending is not None and pending[2] == run[2] and \
                        (run[2] not in HAS_HOST or pending[3] + pending[1] == run[3]):
                    pending[1] += run[1]
                    continue
                if pending is not None:
                    out.append((pending[0], pending[1], pending[2], pending[3]))
                pending = run
            cursor = rs + rl
        yield from out
    if pending is not None:
        yield pending[0], pending[1], pending[2], pending[3]
    if cursor < end:
        yield (cursor, end - cursor, GAP, 0)


def _layer_status(layer: Layer, start: int, length: int, depth: int,
                  progress: Progress | None = None) -> Iterator[Extent]:
    if isinstance(layer, RawLayer):
        inside = max(0, min(length, layer.size - start))
        if inside:
            yield Extent(start, inside, depth, True, False, True, start)
        if inside < length:
            yield Extent(start + inside, length - inside, depth, False, True, False)
        return
    assert isinstance(layer, Image)
    img = layer
    end = min(start + length, img.size)
    if end > start:
        for pos, n, kind, host in _qcow2_runs(img, start, end, progress):
            if kind == DATA:
                yield Extent(pos, n, depth, True, False, True, host)
            elif kind == COMPRESSED:
                yield Extent(pos, n, depth, True, False, True)
            elif kind == ZERO:
                yield Extent(pos, n, depth, True, True, False)
            elif kind == ZERO_ALLOC:
                yield Extent(pos, n, depth, True, True, False, host)
            elif img.backing is not None and pos < img.backing.size:
                below = min(n, img.backing.size - pos)
                yield from _layer_status(img.backing, pos, below, depth + 1)
                if n > below:
                    yield Extent(pos + below, n - below, depth + 1, False, True, False)
            elif kind == UNALLOC_ALLOC and img.backing is None:
                yield Extent(pos, n, depth, False, True, False, host)
            else:
                yield Extent(pos, n, _bottom_depth(img, depth), False, True, False)
    if start + length > max(end, start):
        yield Extent(max(end, start), start + length - max(end, start), depth, False, True, False)


def _bottom_depth(img: Image, depth: int) -> int:
    layer: Layer | None = img.backing
    while layer is not None:
        depth += 1
        layer = layer.backing if isinstance(layer, Image) else None
    return depth


def image_map(img: Image, progress: Progress | None = None) -> list[Extent]:
    out: list[Extent] = []
    for ext in _layer_status(img, 0, img.size, 0, progress):
        if out and ext.continues(out[-1]):
            out[-1].length += ext.length
        else:
            out.append(ext)
    return out
