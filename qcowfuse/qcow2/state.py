"""The layer below an image (Layer), and the state and interface of one open image
(ImageState) that the engine's modules share.  Typing against ImageState instead of
Image keeps the imports one-way (image.py imports the modules, never the reverse)."""

from __future__ import annotations

import array
import threading
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ..hostfile import HostFile
    from .allocator import Allocator
    from .bitmaps import Bitmaps
    from .header import Header
    from .luks import LuksHeader, SectorCipher
    from .refcounts import RefcountStore
    from .snapshots import Snapshot
    from .tables import L2Cache


class Layer(Protocol):
    """What an image needs from the layer below it (a qcow2 image or a raw file)."""

    size: int

    def read(self, offset: int, length: int) -> bytes | bytearray: ...
    def unlocked_read(self) -> Callable[[int, int], bytes | bytearray]:
        """`read` for a caller that uses the layer from one thread only (may be faster)."""
        ...
    def close(self) -> None: ...


ReadFn = Callable[[int, int], "bytes | bytearray"]
WriteFn = Callable[[int, "bytes | memoryview"], int]


class FastRequests(Protocol):
    """What the paths ask of the fast path (fastpath.FastPath), declared here so that
    this module needs no import of it."""
    reads: bool

    def read(self, offset: int, length: int) -> bytes | bytearray | None: ...
    def write(self, offset: int, view: bytes | memoryview) -> bool: ...
    def unlocked(self, read: ReadFn, write: WriteFn) -> tuple[ReadFn, WriteFn]: ...


class ImageState:
    """The state of one open image, declared once, and the interface between the
    modules that work on it.

    Image (image.py) sets every attribute in its constructor.  The path mixins
    (ReadPath, WritePath, Integrity) subclass this class; the helpers that take an
    image (fastpath.py, zeroes.py, resize.py, check.py) are typed against it.  The
    methods below are what one module may call of another; names with a leading
    underscore stay inside the module that defines them."""

    f: HostFile
    # where guest data clusters live: `f`, or the external data file (incompatible bit
    # 2), whose data clusters sit at their guest offsets and have no refcounts
    data: HostFile
    data_file: bool
    header: Header
    writable: bool
    backing: Layer | None
    size: int
    version: int
    cluster_bits: int
    cluster_size: int
    l2_bits: int
    l2_entries: int
    l1: array.array[int]
    l1_dirty: set[int]
    l2: L2Cache
    rc: RefcountStore
    alloc: Allocator
    refcount_cache_bytes: int
    bitmaps: Bitmaps | None
    bitmap_error: str | None
    snapshots: list[Snapshot]
    snapshot_table_bytes: int
    detect_zeroes: str
    lock: threading.RLock
    prepared: bool  # the first write's preparation is done (WritePath.prepare_for_write)
    marked_corrupt: bool
    # integrity.py's cache of metadata_set: the key it was built for, and the set
    _meta_key: tuple[int, int] | None
    _meta: frozenset[int]
    # reading.py's last decompressed cluster: (L2 entry, data)
    _compressed_cache: tuple[int, bytes] | None
    # zeroes.py: one cluster of zeros to compare writes with (empty with detect-zeroes off)
    _zero_cluster: memoryview
    fast: FastRequests  # the common request without the image lock (fastpath.py)
    luks: LuksHeader | None  # a LUKS-encrypted image's header (luks.py)
    crypto: SectorCipher | None  # its data cipher, once unlocked; None: data in the clear

    if TYPE_CHECKING:
        # read path (reading.py)
        def read(self, offset: int, length: int) -> bytes | bytearray: ...
        def cluster_content(self, entry: int, guest_cluster: int) -> bytes | bytearray: ...
        def l2_table(self, l1_index: int) -> array.array[int] | None: ...
        def host_check(self, off: int, what: str) -> None: ...
        def data_pread(self, host: int, length: int) -> bytes: ...
        def subcluster_content(self, entry: int, bitmap: int, guest_cluster: int, start: int,
                               end: int) -> bytes: ...

        # write path (writing.py)
        def write(self, offset: int, data: bytes | bytearray | memoryview) -> int: ...
        def prepare_for_write(self) -> None: ...
        def write_locked(self, offset: int, view: memoryview) -> None: ...
        def write_checked(self, offset: int, view: bytes | memoryview) -> None: ...
        def data_pwrite(self, host: int, data: bytes | bytearray | memoryview) -> None: ...
        def commit_range(self, offset: int, length: int) -> None: ...
        def in_place(self, entry: int) -> bool: ...
        def reusable_zero_alloc(self, entry: int) -> bool: ...
        def reads_as_zeros(self, entry: int) -> bool: ...
        def write_new_in_zeros(self, host: int, total: int, in_cl: int,
                               data: bytes | memoryview) -> None: ...
        def release_entry(self, entry: int, discard: bool = False) -> None: ...
        def active_l2_offset(self, l1_index: int) -> int: ...
        def l2_for_write(self, l1_index: int) -> array.array[int]: ...
        def flush(self) -> None: ...

        # integrity (integrity.py)
        def repair_dirty(self) -> None: ...
        def check_metadata_refcounts(self) -> None: ...
        def check_fresh(self, first: int, count: int) -> None: ...
        def check_data_target(self, first: int, count: int) -> None: ...
        def data_target_ok(self, first: int, last: int) -> bool: ...
        def metadata_set(self) -> frozenset[int]: ...
        def metadata_layout_changed(self) -> None: ...
        def metadata_clusters(self) -> list[tuple[str, int]]: ...
        def mark_corrupt(self, reason: str) -> None: ...
        def mark_clean(self) -> None: ...

        # the facade (image.py)
        def replace_refcount_structures(self) -> None: ...
