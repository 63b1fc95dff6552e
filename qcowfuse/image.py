"""Image: the one API the layers above use (open / read / write / flush / resize / close).

Opening (header, backing chain, locks, snapshot views, bitmaps) is here; the paths
that work on an open image live in qcow2/: reading.py (guest range -> read plan),
writing.py (allocation, copy-on-write, flush order), integrity.py (overlap checks,
healing, corrupt bit); bitmaps.py, l1.py, refcounts.py, allocator.py and tables.py
each own one on-disk structure.
"""

from __future__ import annotations

import threading
from typing import Any

from .backing import Layer, file_identity, open_backing
from .datafile import open_data_file
from .errors import FormatError, NeedsPassphrase, QcowError, UnsupportedError
from .hostfile import HostFile, NoDataFile
from .locking import lock_image
from .qcow2.allocator import Allocator
from .qcow2.bitmaps import Bitmaps
from .qcow2.fastpath import FastPath
from .qcow2.format import decode_table
from .qcow2.header import CRYPT_AES, CRYPT_NAMES, INCOMPAT_CORRUPT, MAX_CLUSTER_BITS, Header
from .qcow2.luks import LuksHeader, SectorCipher, open_luks
from .qcow2.integrity import Integrity
from .qcow2.reading import ReadPath
from .qcow2.refcounts import RefcountStore
from .qcow2.resize import resize_image
from .qcow2.snapshots import find_snapshot, read_snapshot_table
from .qcow2.state import ReadFn, WriteFn
from .qcow2.tables import L2Cache
from .qcow2.writing import WritePath

DEFAULT_L2_CACHE_BYTES = 16 << 20  # maps 128 GiB of guest at 64 KiB clusters
# QEMU's detect-zeroes: off; on (whole zero clusters become zero clusters, keeping their
# host cluster); unmap (zero clusters, host cluster freed and its space punched out).
DETECT_ZEROES_MODES = ("off", "on", "unmap")
DEFAULT_REFCOUNT_CACHE_BYTES = 8 << 20


class Image(ReadPath, WritePath, Integrity):
    """A qcow2 image seen as a flat guest disk of `size` bytes.

    The facade the FUSE layer, the CLI and library users see: open, read, write, flush,
    resize, close.  It holds the state (header, L1, L2 cache, refcounts, allocator,
    backing layer, bitmaps) and composes the paths that work on it: ReadPath
    (qcow2/reading.py), WritePath (qcow2/writing.py, flush order included), Integrity
    (qcow2/integrity.py); resizing qcow2/resize.py, table scans qcow2/check.py.
    """

    def __init__(self, f: HostFile, header: Header, writable: bool, backing: Layer | None = None,
                 snapshot: str | None = None, repair: bool = False, detect_zeroes: str = "off",
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
                 refcount_cache_bytes: int = DEFAULT_REFCOUNT_CACHE_BYTES,
                 passphrase: bytes | None = None, metadata_only: bool = False,
                 data: HostFile | None = None) -> None:
        """passphrase: of a LUKS-encrypted image (never logged, never in a message);
        metadata_only: the caller reads no guest data (info, map), so an encrypted image
        opens without it, and an image with an external data file without that file;
        data: the open external data file (datafile.py) of an image that has one."""
        self._refuse_unsupported(header, writable and not repair, for_check=repair)
        self.data_file = header.has_data_file
        if data is not None and not self.data_file:
            raise UnsupportedError("a data file was given for an image without an external data file")
        if self.data_file and data is None and not (repair or metadata_only):
            raise UnsupportedError("the image keeps its guest data in an external data file: "
                                   "open it with Image.open (data_file=PATH to choose it)")
        self.data = data if data is not None else NoDataFile() if self.data_file else f
        self.luks: LuksHeader | None = None
        self.crypto: SectorCipher | None = None
        if header.crypt_method and passphrase is not None:
            self.luks, self.crypto = open_luks(f, header, passphrase)
        elif header.crypt_method and not (repair or metadata_only):
            raise NeedsPassphrase(f"{f.path} is encrypted ({CRYPT_NAMES[header.crypt_method]}): "
                                  f"give its passphrase with -o key-file=PATH", path=f.path)
        self.f = f
        self.header = header
        self.writable = writable
        self.backing = backing
        self.size = header.size
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_bits = header.l2_bits
        self.l2_entries = 1 << self.l2_bits
        self.lock = threading.RLock()
        self.snapshots, self.snapshot_table_bytes = read_snapshot_table(f, header)
        l1_offset, l1_size = header.l1_table_offset, header.l1_size
        if snapshot is not None:
            if writable:
                raise UnsupportedError("snapshots can only be opened read-only")
            snap = find_snapshot(self.snapshots, snapshot)
            l1_offset, l1_size = snap.l1_table_offset, snap.l1_size
            self.size = snap.disk_size if snap.disk_size is not None else header.size
            if -(-self.size // (self.cluster_size << self.l2_bits)) > l1_size:
                raise FormatError(f"snapshot '{snapshot}' has an L1 table too small for its size")
        raw = f.pread(l1_offset, l1_size * 8) if l1_size else b""
        self.l1 = decode_table(raw)
        self.l1_dirty = set()
        self.l2 = L2Cache(f, self.cluster_size, l2_cache_bytes)
        self.refcount_cache_bytes = refcount_cache_bytes
        self.rc = RefcountStore(f, header, refcount_cache_bytes)
        self.alloc = Allocator(self.rc)
        # persistent dirty bitmaps; check opens (repair=True) report bad ones instead
        self.bitmaps = None
        self.bitmap_error = None
        if Bitmaps.present(header):
            try:
                self.bitmaps = Bitmaps(f, header, header.size)
            except FormatError as e:
                if not repair:
                    raise
                self.bitmap_error = str(e)
        self.prepared = False
        self.marked_corrupt = False
        self._meta_key = None
        self._meta = frozenset()
        if detect_zeroes not in DETECT_ZEROES_MODES:
            raise ValueError(f"detect_zeroes must be one of {DETECT_ZEROES_MODES}")
        self.detect_zeroes = detect_zeroes
        # With a data file, zeros are written as data: the data file stays what the
        # mapping says (a raw disk with data_file_raw), and nothing is unmapped.
        zeros = detect_zeroes != "off" and not self.data_file
        self._zero_cluster = memoryview(bytes(self.cluster_size) if zeros else b"")
        self._compressed_cache = None
        self.fast = FastPath(self)

    @classmethod
    def open(cls, path: str, writable: bool = False, lock: bool = True,
             backing: str | None = None, _seen: frozenset[tuple[int, int]] = frozenset(),
             data_file: str | None = None, **options: Any) -> "Image":
        """Open and validate, with the backing chain; nothing is written to the file
        until the first write.

        lock: take QEMU's lock bytes (see locking.py); False is QEMU's force-share.
        backing: None follows the header; "off" opens no backing file (what this layer
        lacks reads as zeros; read-only, since copy-on-write would fill from zeros);
        any other value is the path of the backing file to use instead of the header's.
        data_file: the path of the external data file, instead of the header's name
        (needed to open such an image writable; datafile.py).
        options: snapshot, repair, detect_zeroes, l2_cache_bytes, refcount_cache_bytes.
        """
        try:
            f = HostFile.open(path, writable)
        except IsADirectoryError:
            raise QcowError(f"{path}: is a directory, not an image file") from None
        except OSError as e:
            raise QcowError(f"{path}: {e.strerror}") from None
        try:
            if lock:
                lock_image(f.fd, writable, path)
            header = cls._read_header(f)
            layer: Layer | None = None
            if backing == "off":
                if writable and header.backing_file is not None:
                    raise UnsupportedError("-o backing=off needs a read-only mount (-o ro): writes "
                                           "would copy zeros where the backing file has data")
            elif backing is not None and header.backing_file is None:
                raise UnsupportedError(f"-o backing={backing}: {path} has no backing file")
            elif header.backing_file is not None:
                seen = _seen | {file_identity(path)}
                layer = open_backing(backing or header.backing_file, header.backing_format, path,
                                     seen, lock, chosen=backing is not None, open_qcow2=cls._open_layer)
            data = None
            try:
                if data_file is not None and not header.has_data_file:
                    raise UnsupportedError(f"-o data-file={data_file}: {path} has no external data file")
                if header.has_data_file and (data_file is not None or not (
                        options.get("metadata_only") or options.get("repair"))):
                    data = open_data_file(path, header.data_file, writable, data_file, lock)
                return cls(f, header, writable, backing=layer, data=data, **options)
            except BaseException:
                if data is not None:
                    data.close()
                if layer is not None:
                    layer.close()
                raise
        except BaseException:
            f.close()
            raise

    @classmethod
    def _open_layer(cls, path: str, *, writable: bool, lock: bool,
                    _seen: frozenset[tuple[int, int]]) -> Layer:
        """Image.open as backing.py's QcowOpener: a qcow2 backing layer."""
        return cls.open(path, writable=writable, lock=lock, _seen=_seen)

    @classmethod
    def open_file(cls, f: HostFile, writable: bool = False, backing: Layer | None = None,
                  **options: Any) -> "Image":
        """Open over an already open HostFile (or a substitute with the same methods,
        e.g. a recording layer in tests); an image with a backing file needs its
        `backing` layer given.  The caller keeps `f` if this raises."""
        header = cls._read_header(f)
        if header.backing_file is not None and backing is None:
            raise UnsupportedError(f"image names backing file {header.backing_file}: open it with Image.open")
        return cls(f, header, writable, backing=backing, **options)

    @classmethod
    def _read_header(cls, f: HostFile) -> Header:
        size = f.size()
        return Header.parse(f.pread(0, min(size, 1 << MAX_CLUSTER_BITS)), size)

    @staticmethod
    def _refuse_unsupported(h: Header, writable: bool, for_check: bool) -> None:
        if h.crypt_method == CRYPT_AES:
            raise UnsupportedError("the legacy AES encryption of qcow2 (crypt_method 1) is not "
                                   "supported: it is insecure, and QEMU no longer writes it")
        if writable and h.incompatible_features & INCOMPAT_CORRUPT:
            raise UnsupportedError("image is marked corrupt: mount it read-only (-o ro), or repair it "
                                   "with 'qcowfuse check --repair all' first")

    def unlocked_read(self) -> ReadFn:
        """This image as a backing layer of an overlay the daemon serves (Layer)."""
        return self.unlocked_io()[0]

    def replace_refcount_structures(self) -> None:
        """The refcount table the header names was rebuilt on disk (check's repair): read
        it afresh, with a new allocator over it."""
        self.rc = RefcountStore(self.f, self.header, self.refcount_cache_bytes)
        self.alloc = Allocator(self.rc)
        self.metadata_layout_changed()

    def unlocked_io(self) -> tuple[ReadFn, WriteFn]:
        """read and write for a caller that uses this image from one thread only (the FUSE
        daemon): the common request without the image lock (qcow2/fastpath.py)."""
        return self.fast.unlocked(self._read_general, self.write)

    def resize(self, new_size: int) -> None:
        """Grow or shrink the guest disk (resize.py); ResizeError when refused."""
        resize_image(self, new_size)

    def close(self) -> None:
        if self.f.fd < 0:
            return
        try:
            self.flush()  # guest writes first: a failing bitmap store must not lose them
            if self.bitmaps is not None and self.writable and not self.marked_corrupt:
                self.bitmaps.store(self.alloc.free_later, self.flush)
        finally:
            self.f.close()
            if self.data_file:
                self.data.close()
            if self.backing is not None:
                self.backing.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
