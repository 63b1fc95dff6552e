"""The layer below an image, and what the helpers of one open image (fast path, zero detection, resizing) may use
of it: the Image's state and the path methods they call.  Typing against this
Protocol instead of Image keeps the imports one-way (image.py imports them)."""

from __future__ import annotations

import array
import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..hostfile import HostFile
    from .allocator import Allocator
    from .bitmaps import Bitmaps
    from .header import Header
    from .refcounts import RefcountStore
    from .snapshots import Snapshot
    from .tables import L2Cache


class Layer(Protocol):
    """What an image needs from the layer below it (a qcow2 image or a raw file)."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...


class ImageState(Protocol):
    f: HostFile
    header: Header
    writable: bool
    backing: Layer | None
    size: int
    version: int
    cluster_bits: int
    cluster_size: int
    l2_bits: int
    l2_entries: int
    l1: array.array
    l1_dirty: set[int]
    l2: L2Cache
    rc: RefcountStore
    alloc: Allocator
    bitmaps: Bitmaps | None
    snapshots: list[Snapshot]
    detect_zeroes: str
    _lock: threading.RLock
    _corrupt: bool

    # read path
    def cluster_content(self, entry: int, guest_cluster: int) -> bytes: ...
    def _l2_table(self, l1_index: int) -> array.array | None: ...
    def _subcluster_content(self, entry: int, bitmap: int, guest_cluster: int, start: int,
                            end: int) -> bytes: ...

    # write path
    def _prepare_for_write(self) -> None: ...
    def _write_locked(self, offset: int, view: memoryview) -> None: ...
    def _in_place(self, entry: int) -> bool: ...
    def _reusable_zero_alloc(self, entry: int) -> bool: ...
    def _reads_as_zeros(self, entry: int) -> bool: ...
    def _write_new_in_zeros(self, host: int, total: int, in_cl: int, data: memoryview) -> None: ...
    def _release(self, entry: int, discard: bool = False) -> None: ...
    def _l2_offset(self, l1_index: int) -> int: ...
    def _l2_for_write(self, l1_index: int) -> array.array: ...
    def flush(self) -> None: ...

    # integrity
    def _check_fresh(self, first: int, count: int) -> None: ...
    def _check_data_target(self, first: int, count: int) -> None: ...
    def _data_target_ok(self, first: int, last: int) -> bool: ...
    def _metadata_set(self) -> frozenset[int]: ...
    def mark_corrupt(self, reason: str) -> None: ...
