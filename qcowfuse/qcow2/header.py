"""qcow2 image header and header extensions (docs/interop/qcow2.rst, "Header").

All fields are big-endian.  `Header.parse` validates everything that can be
checked from cluster 0 plus the file size, and refuses what qcowfuse cannot
honour; the tables it points at are checked by the image when they are read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import FormatError, NotQcow2Error, UnsupportedError

MAGIC = b"QFI\xfb"

# Fixed part common to versions 2 and 3 (72 bytes), then the version 3 part.
_V2_FMT = ">4sIQIIQIIQQIIQ"
_V3_FMT = ">QQQII"
V2_HEADER_LENGTH = struct.calcsize(_V2_FMT)  # 72
V3_HEADER_LENGTH = V2_HEADER_LENGTH + struct.calcsize(_V3_FMT)  # 104
# Offsets of fields that are rewritten in place.
OFF_REFCOUNT_TABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)
OFF_INCOMPATIBLE_FEATURES = 72
OFF_AUTOCLEAR_FEATURES = 88

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_FILE_SIZE = 1023
# QEMU's limits (block/qcow2.h): QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
# QCOW_MAX_SNAPSHOTS, and sizeof(QCowSnapshotHeader): the fixed part of a snapshot
# table entry, so nb_snapshots entries take at least this many bytes each.
MAX_SNAPSHOTS = 65536
SNAPSHOT_ENTRY_FIXED_BYTES = 40
# QEMU passes table offsets on as int64_t and refuses those whose end passes INT64_MAX.
INT64_MAX = (1 << 63) - 1
# Offsets must fit in the 56-bit host offset field of table entries.
MAX_HOST_OFFSET = 1 << 56

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES = {
    ("incompatible", 0): "dirty bit",
    ("incompatible", 1): "corrupt bit",
    ("incompatible", 2): "external data file",
    ("incompatible", 3): "compression type",
    ("incompatible", 4): "extended L2 entries",
    ("compatible", 0): "lazy refcounts",
    ("autoclear", 0): "bitmaps",
    ("autoclear", 1): "raw external data",
}
_FEATURE_KINDS = {0: "incompatible", 1: "compatible", 2: "autoclear"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
CRYPT_NAMES = {CRYPT_NONE: "none", CRYPT_AES: "AES", CRYPT_LUKS: "LUKS"}
COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    # the external data file's name (header extension 0x44415441), with incompatible bit 2
    data_file: str | None = None
    feature_names: dict[tuple[str, int], str] = field(default_factory=dict)
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    # where each extension's data starts in cluster 0 (for in-place updates)
    extension_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def has_data_file(self) -> bool:
        """Guest data lives in an external data file (incompatible bit 2), not here."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        """The data file is itself the raw guest disk (autoclear bit 1)."""
        return self.has_data_file and bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_bits(self) -> int:
        """log2 of entries per L2 table (64-bit entries, or 128-bit with extended L2)."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    def extension(self, ext_type: int) -> bytes | None:
        """The data of the first extension of this type, or None."""
        return next((data for t, data in self.extensions if t == ext_type), None)

    def feature_name(self, kind: str, bit: int) -> str:
        return self.feature_names.get((kind, bit)) or FEATURE_NAMES.get((kind, bit)) or f"bit {bit}"

    @classmethod
    def parse(cls, buf: bytes, file_size: int) -> "Header":
        """Parse and validate cluster 0 (`buf` holds at least its first bytes)."""
        if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
            if buf[:4] == MAGIC:
                raise NotQcow2Error("not a qcow2 image: file is truncated inside the header")
            raise NotQcow2Error("not a qcow2 image (bad magic)")
        (_, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snap, snap_off) = struct.unpack_from(_V2_FMT, buf, 0)
        if version not in (2, 3):
            raise UnsupportedError(f"unsupported qcow2 version {version} (only 2 and 3 exist)")
        h = cls(version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
                rt_clusters, nb_snap, snap_off)
        if version == 3:
            if len(buf) < V3_HEADER_LENGTH:
                raise NotQcow2Error("not a qcow2 image: file is truncated inside the header")
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = struct.unpack_from(_V3_FMT, buf, V2_HEADER_LENGTH)
            if h.header_length < V3_HEADER_LENGTH or h.header_length % 8:
                raise FormatError(f"invalid header_length {h.header_length}")
            if h.header_length > V3_HEADER_LENGTH:
                h.compression_type = buf[V3_HEADER_LENGTH] if len(buf) > V3_HEADER_LENGTH else 0
        h._validate_geometry(file_size)
        if len(buf) < h.cluster_size and file_size >= h.cluster_size:
            raise FormatError("internal: header buffer shorter than a cluster")
        h._parse_extensions(buf[: h.cluster_size])
        h._validate_features()
        return h

    def _validate_geometry(self, file_size: int) -> None:
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise FormatError(
                f"invalid cluster_bits {self.cluster_bits} (must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
        cs = self.cluster_size
        if self.header_length > cs:
            raise FormatError("header_length is larger than a cluster")
        if self.version == 2 and self.refcount_order != 4:
            raise FormatError("version 2 images must have 16-bit refcounts")
        if self.extended_l2 and self.cluster_bits < 14:
            raise FormatError("extended L2 entries need clusters of at least 16 KiB")
        if self.refcount_order > MAX_REFCOUNT_ORDER:
            raise FormatError(f"invalid refcount_order {self.refcount_order} (must be 0..6)")
        if self.crypt_method not in CRYPT_NAMES:
            raise UnsupportedError(f"unknown encryption method {self.crypt_method}")
        if file_size < cs:
            raise NotQcow2Error("not a qcow2 image: file is shorter than one cluster")
        if self.size >= MAX_HOST_OFFSET:
            raise FormatError(f"virtual size {self.size} is too large")
        # L1 table: entries for every L2 table the virtual size needs.
        l2_span = cs << self.l2_bits
        need_l1 = -(-self.size // l2_span)
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise FormatError(f"L1 table too large ({self.l1_size} entries)")
        if self.l1_size < need_l1:
            raise FormatError(
                f"L1 table too small for the virtual size ({self.l1_size} < {need_l1} entries)")
        self._check_table("L1 table", self.l1_table_offset, self.l1_size * 8, file_size,
                          allow_empty=self.l1_size == 0)
        if self.refcount_table_clusters == 0:
            raise FormatError("image has no refcount table")
        if self.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise FormatError(f"refcount table too large ({self.refcount_table_clusters} clusters)")
        self._check_table("refcount table", self.refcount_table_offset,
                          self.refcount_table_clusters * cs, file_size)
        # Snapshot table: QEMU checks the count and the offset whatever the count
        # (qcow2_do_open), the table's total size when it reads the entries.
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise FormatError(f"too many snapshots ({self.nb_snapshots}; at most {MAX_SNAPSHOTS})")
        snapshot_bytes = self.nb_snapshots * SNAPSHOT_ENTRY_FIXED_BYTES
        if self.snapshots_offset % cs or self.snapshots_offset > INT64_MAX - snapshot_bytes:
            raise FormatError(f"snapshot table offset {self.snapshots_offset:#x} is invalid "
                              f"(not cluster aligned or too large)")
        if self.nb_snapshots:
            self._check_table("snapshot table", self.snapshots_offset, snapshot_bytes, file_size)
        spans = [("header", 0, cs),
                 ("refcount table", self.refcount_table_offset, self.refcount_table_clusters * cs)]
        if self.l1_size:
            spans.append(("L1 table", self.l1_table_offset, self.l1_size * 8))
        for i, (na, a, al) in enumerate(spans):
            for nb, b, bl in spans[i + 1:]:
                if a < b + bl and b < a + al:
                    raise FormatError(f"{na} overlaps {nb}")

    def _check_table(self, name: str, offset: int, length: int, file_size: int,
                     allow_empty: bool = False) -> None:
        if allow_empty and length == 0:
            return
        if offset % self.cluster_size or offset == 0:
            raise FormatError(f"{name} offset {offset:#x} is not cluster aligned")
        if offset + length > file_size:
            raise FormatError(f"{name} at {offset:#x} lies beyond the end of the file")

    def _parse_extensions(self, cluster0: bytes) -> None:
        cs = self.cluster_size
        pos = self.header_length if self.version == 3 else V2_HEADER_LENGTH
        end_of_ext = cs
        if self.backing_file_offset:
            if self.backing_file_size > MAX_BACKING_FILE_SIZE:
                raise FormatError(f"backing file name too long ({self.backing_file_size} bytes)")
            if self.backing_file_offset + self.backing_file_size > cs:
                raise FormatError("backing file name lies outside the first cluster")
            end_of_ext = self.backing_file_offset
        while True:
            if pos + 8 > end_of_ext:
                break  # v2 images may end without an end-of-extensions marker
            ext_type, ext_len = struct.unpack_from(">II", cluster0, pos)
            if ext_type == EXT_END:
                break
            data_end = pos + 8 + ext_len
            if data_end > end_of_ext:
                raise FormatError(f"header extension {ext_type:#x} overruns the first cluster")
            data = bytes(cluster0[pos + 8:data_end])
            self.extensions.append((ext_type, data))
            self.extension_offsets.setdefault(ext_type, pos + 8)
            if ext_type == EXT_BACKING_FORMAT:
                self.backing_format = data.decode("utf-8", "replace")
            elif ext_type == EXT_DATA_FILE:
                self.data_file = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif ext_type == EXT_FEATURE_TABLE:
                for i in range(0, len(data) - 47, 48):
                    kind = _FEATURE_KINDS.get(data[i])
                    if kind:
                        name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                        self.feature_names[(kind, data[i + 1])] = name
            pos = data_end + (-ext_len % 8)
        if self.backing_file_offset:
            raw = cluster0[self.backing_file_offset:self.backing_file_offset + self.backing_file_size]
            if b"\0" in raw:
                raise FormatError("backing file name contains a NUL byte")
            self.backing_file = raw.decode("utf-8", "surrogateescape")

    def _validate_features(self) -> None:
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = [self.feature_name("incompatible", b) for b in range(64) if unknown >> b & 1]
            raise UnsupportedError("image uses unknown incompatible features: " + ", ".join(names))
        if self.has_data_file:
            # QEMU refuses to write snapshots, compressed clusters or extended L2 entries
            # with a data file; we refuse what we cannot account for.
            if self.nb_snapshots:
                raise UnsupportedError("internal snapshots in an image with an external data file "
                                       "are not supported (QEMU does not create them)")
            if self.extended_l2:
                raise UnsupportedError("extended L2 entries together with an external data file "
                                       "are not supported")
        if self.compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
            raise UnsupportedError(f"unknown compression type {self.compression_type}")
        if self.compression_type != COMPRESSION_DEFLATE and not (
                self.incompatible_features & INCOMPAT_COMPRESSION):
            raise FormatError("compression type set without the compression-type feature bit")

    def pack_fixed(self) -> bytes:
        """The fixed header fields (72 or 104 bytes; extensions are not rewritten)."""
        out = struct.pack(
            _V2_FMT, MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset)
        if self.version == 3:
            out += struct.pack(_V3_FMT, self.incompatible_features, self.compatible_features,
                               self.autoclear_features, self.refcount_order, self.header_length)
        return out
