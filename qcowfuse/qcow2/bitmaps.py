"""Persistent dirty bitmaps (docs/interop/qcow2.rst, "Bitmaps extension").

libvirt's incremental backup keeps one bitmap per checkpoint in the image: a
bit per `granularity` bytes of guest disk, set when those bytes were written.
The header extension (valid only while autoclear bit 0 is set) points at the
bitmap directory; each directory entry points at a bitmap table, whose
entries point at data clusters (or say "all zeros" / "all ones").

What this module keeps true, as QEMU does (block/qcow2-bitmap.c):
- check counts the directory, every table and every data cluster;
- before the first guest write reaches the disk, every consistent bitmap is
  flagged in_use (so a crash leaves them "inconsistent", never clean and
  wrong); enabled (auto) bitmaps then get the bits of every written range;
- at close new data clusters and tables are written and synced, then a new
  directory, then the header extension is switched to it (autoclear bit
  cleared around the switch, so a torn update loses the bitmaps rather than
  corrupting them), and only then are the old clusters freed.
Bitmaps that were already in_use at open are left exactly as they are.

Memory: only bitmap data clusters that writes touch are held (and spilled
to their new host clusters when over budget), never a whole bitmap.
"""

from __future__ import annotations

import array
import contextlib
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import FormatError
from ..hostfile import HostFile
from .header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, OFF_AUTOCLEAR_FEATURES, Header
from .format import decode_table, encode_table

# Header extension: nb_bitmaps u32, reserved u32, bitmap_directory_size u64,
# bitmap_directory_offset u64.
_EXT_FMT = ">IIQQ"
EXT_LENGTH = struct.calcsize(_EXT_FMT)  # 24
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

# Directory entry: bitmap_table_offset u64, bitmap_table_size u32, flags u32, type u8,
# granularity_bits u8, name_size u16, extra_data_size u32; then extra data, name, padding.
_ENTRY_FMT = ">QIIBBHI"
ENTRY_HEADER = struct.calcsize(_ENTRY_FMT)  # 24
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFC  # QEMU refuses bit 2 as well (it supports no extra data)
BT_DIRTY_TRACKING_BITMAP = 1
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000

# Bitmap table entry: bits 9-55 data cluster offset; offset 0 with bit 0 set reads as all
# ones, clear as all zeros; bits 1-8 and 56-63 reserved.
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

DEFAULT_CHUNK_BUDGET = 8 << 20  # touched bitmap data held in memory before spilling


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    reserved: int
    directory_size: int
    directory_offset: int

    @classmethod
    def parse(cls, data: bytes, cluster_size: int) -> "BitmapsExtension":
        if len(data) != EXT_LENGTH:
            raise FormatError(f"bitmaps extension has length {len(data)} (must be {EXT_LENGTH})")
        ext = cls(*struct.unpack(_EXT_FMT, data))
        if ext.reserved:
            raise FormatError("bitmaps extension: reserved field is not zero")
        if ext.nb_bitmaps == 0:
            raise FormatError("bitmaps extension with zero bitmaps")
        if ext.nb_bitmaps > QCOW2_MAX_BITMAPS:
            raise FormatError(f"bitmaps extension: too many bitmaps ({ext.nb_bitmaps})")
        if ext.directory_size == 0 or ext.directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise FormatError(f"bitmap directory size {ext.directory_size} is invalid")
        if ext.directory_offset % cluster_size or ext.directory_offset == 0:
            raise FormatError(f"bitmap directory offset {ext.directory_offset:#x} is not cluster aligned")
        return ext

    def pack(self) -> bytes:
        return struct.pack(_EXT_FMT, self.nb_bitmaps, self.reserved, self.directory_size,
                           self.directory_offset)


@dataclass
class Bitmap:
    """One bitmap directory entry, and (once loaded) its table."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = BT_DIRTY_TRACKING_BITMAP
    table: array.array[int] = field(default_factory=lambda: array.array("Q"))

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & BME_FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def entry_bytes(self) -> bytes:
        name = self.name.encode("utf-8", "surrogateescape")
        raw = struct.pack(_ENTRY_FMT, self.table_offset, self.table_size, self.flags, self.type,
                          self.granularity_bits, len(name), 0) + name
        return raw + bytes(-len(raw) % 8)


def _entry_size(name_size: int, extra_data_size: int) -> int:
    return (ENTRY_HEADER + name_size + extra_data_size + 7) & ~7


def table_size_for(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries a bitmap table needs: one per data cluster of cluster_size * 8 bits."""
    bits = -(-disk_size >> granularity_bits) if disk_size else 0
    return -(-bits // (cluster_size * 8))


def parse_directory(data: bytes, ext: BitmapsExtension, cluster_size: int,
                    disk_size: int) -> list[Bitmap]:
    """Directory entries, validated as QEMU's bitmap_list_load / check_dir_entry do."""
    out: list[Bitmap] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + ENTRY_HEADER > end:
            raise FormatError("bitmap directory is broken (entry overruns it)")
        if len(out) >= ext.nb_bitmaps:
            raise FormatError("bitmap directory holds more bitmaps than the header extension says")
        (t_off, t_size, flags, typ, gbits, name_size, extra) = struct.unpack_from(_ENTRY_FMT, data, pos)
        size = _entry_size(name_size, extra)
        if pos + size > end:
            raise FormatError("bitmap directory is broken (entry overruns it)")
        if extra:
            raise FormatError("bitmap extra data is not supported")
        raw_name = data[pos + ENTRY_HEADER:pos + ENTRY_HEADER + name_size]
        name = raw_name.decode("utf-8", "surrogateescape")
        what = f"bitmap '{name}'"
        if name_size == 0:
            raise FormatError("bitmap with an empty name")
        if name_size > BME_MAX_NAME_SIZE:
            raise FormatError(f"bitmap name of {name_size} bytes is too long")
        if typ != BT_DIRTY_TRACKING_BITMAP:
            raise FormatError(f"{what} has unknown type {typ}")
        if flags & BME_RESERVED_FLAGS:
            raise FormatError(f"{what} has reserved flags set ({flags:#x})")
        if not BME_MIN_GRANULARITY_BITS <= gbits <= BME_MAX_GRANULARITY_BITS:
            raise FormatError(f"{what} has invalid granularity_bits {gbits}")
        if t_size == 0 or t_size > BME_MAX_TABLE_SIZE or t_off == 0 or t_off % cluster_size:
            raise FormatError(f"{what} has an invalid bitmap table (offset {t_off:#x}, {t_size} entries)")
        if t_size * cluster_size > BME_MAX_PHYS_SIZE:
            raise FormatError(f"{what} is too large")
        if not flags & BME_FLAG_IN_USE and t_size < table_size_for(disk_size, gbits, cluster_size):
            raise FormatError(f"{what} is too small for the disk size")
        if any(b.name == name for b in out):
            raise FormatError(f"two bitmaps are named '{name}'")
        out.append(Bitmap(name, t_off, t_size, flags, gbits, typ))
        pos += size
    if len(out) != ext.nb_bitmaps:
        raise FormatError("bitmap directory holds fewer bitmaps than the header extension says")
    return out


def table_entry_error(entry: int, cluster_size: int) -> str | None:
    """Why a bitmap table entry is invalid (QEMU's check_table_entry), or None."""
    if entry & BME_TABLE_ENTRY_RESERVED_MASK:
        return "reserved bits set"
    off = entry & BME_TABLE_ENTRY_OFFSET_MASK
    if off and entry & BME_TABLE_ENTRY_FLAG_ALL_ONES:
        return "all-ones flag set with a data cluster"
    if off % cluster_size:
        return "data cluster not aligned"
    return None


def _read(f: HostFile, offset: int, length: int) -> bytes:
    """Bytes at offset; zeros past the end of the file (as QEMU's file driver reads)."""
    return f.pread_upto(offset, length).ljust(length, b"\0")


@dataclass
class Reference:
    what: str
    offset: int
    length: int


class Bitmaps:
    """The bitmaps of one image: read at open, tracked while writing, stored at close."""

    def __init__(self, f: HostFile, header: Header, disk_size: int,
                 chunk_budget: int = DEFAULT_CHUNK_BUDGET) -> None:
        self.f = f
        self.header = header
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.disk_size = disk_size
        data = header.extension(EXT_BITMAPS)
        assert data is not None
        self.ext = BitmapsExtension.parse(data, self.cs)
        self.ext_offset = header.extension_offsets[EXT_BITMAPS]
        raw = _read(f, self.ext.directory_offset, self.ext.directory_size)
        self.list = parse_directory(raw, self.ext, self.cs, disk_size)
        for bm in self.list:
            bm.table = decode_table(_read(f, bm.table_offset, bm.table_size * 8))
            if not bm.in_use:  # QEMU loads (and so validates) only consistent bitmaps
                for e in bm.table:
                    why = table_entry_error(e, self.cs)
                    if why:
                        raise FormatError(f"bitmap '{bm.name}' has a bad table entry {e:#x} ({why})")
        self.chunk_budget = max(chunk_budget, self.cs)
        # tracking state (read-write mounts)
        self.writing = False
        self._alloc: Callable[[int], int] = lambda n: 0
        self.tracked: list[Bitmap] = []  # consistent at open: stored again at close
        self._enabled: list[Bitmap] = []
        # touched data in memory, least recently used first; _changed: those that differ
        # from where they were read (the old cluster, a spilled one, or all ones)
        self._chunks: OrderedDict[tuple[str, int], bytearray] = OrderedDict()
        self._changed: set[tuple[str, int]] = set()
        self._spilled: dict[tuple[str, int], int] = {}  # touched data, in a new cluster
        self._touched: dict[str, set[int]] = {}
        self._disk_tables: dict[str, array.array[int]] = {}  # each tracked table as on disk
        self._orphans: list[int] = []  # spilled clusters no chunk needs any more

    @staticmethod
    def present(header: Header) -> bool:
        """The extension counts only in v3 with autoclear bit 0 set (else QEMU ignores
        it: "a program lacking bitmap support modified this file")."""
        return header.version >= 3 and bool(header.autoclear_features & AUTOCLEAR_BITMAPS) \
            and header.extension(EXT_BITMAPS) is not None

    @staticmethod
    def stale(header: Header) -> bool:
        """A bitmaps extension that no longer counts (autoclear bit cleared)."""
        return header.extension(EXT_BITMAPS) is not None and not Bitmaps.present(header)

    # -- what the image references (check, overlap checks) ----------------------------

    def references(self, errors: list[str] | None = None) -> Iterator[Reference]:
        """Every host range the bitmaps use: directory, tables, data clusters.  Invalid
        table entries are reported in `errors` (and not followed)."""
        yield Reference("bitmap directory", self.ext.directory_offset, self.ext.directory_size)
        for bm in self.list:
            yield Reference(f"bitmap table '{bm.name}'", bm.table_offset, bm.table_size * 8)
            for e in bm.table:
                why = table_entry_error(e, self.cs)
                if why:
                    if errors is not None:
                        errors.append(f"ERROR bitmap '{bm.name}' table entry {e:#x}: {why}")
                    continue
                if e & BME_TABLE_ENTRY_OFFSET_MASK:
                    yield Reference(f"bitmap data '{bm.name}'", e & BME_TABLE_ENTRY_OFFSET_MASK, self.cs)

    def clusters(self) -> Iterator[tuple[str, int]]:
        for ref in self.references():
            first = ref.offset >> self.cb
            for c in range(first, first + max(1, -(-ref.length // self.cs))):
                yield ref.what, c

    def info(self) -> list[dict[str, Any]]:
        """As `qemu-img info` lists them (format-specific data)."""
        out = []
        for bm in self.list:
            flags = (["in-use"] if bm.in_use else []) + (["auto"] if bm.enabled else [])
            out.append({"name": bm.name, "granularity": bm.granularity, "flags": flags})
        return out

    def find(self, name: str) -> Bitmap:
        for bm in self.list:
            if bm.name == name:
                return bm
        raise FormatError(f"no bitmap named '{name}' (bitmaps: "
                          f"{', '.join(b.name for b in self.list) or 'none'})")

    # -- reading a bitmap's content -------------------------------------------------

    def _chunk_bytes(self, bm: Bitmap, idx: int) -> bytes | None:
        """Data cluster `idx` of a bitmap as it stands now; None means all ones."""
        key = (bm.name, idx)
        if key in self._chunks:
            return bytes(self._chunks[key])
        if key in self._spilled:
            return self.f.pread(self._spilled[key], self.cs)
        e = bm.table[idx]
        if e & BME_TABLE_ENTRY_OFFSET_MASK:
            return _read(self.f, e & BME_TABLE_ENTRY_OFFSET_MASK, self.cs)
        return None if e & BME_TABLE_ENTRY_FLAG_ALL_ONES else bytes(self.cs)

    def extents(self, name: str) -> list[tuple[int, int, bool]]:
        """(start, length, dirty) over the whole guest disk, adjacent runs merged."""
        bm = self.find(name)
        gran, per_chunk = bm.granularity, self.cs * 8
        out: list[tuple[int, int, bool]] = []

        def add(start: int, length: int, dirty: bool) -> None:
            length = min(length, self.disk_size - start)
            if length <= 0:
                return
            if out and out[-1][2] == dirty and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length, dirty)
            else:
                out.append((start, length, dirty))

        for idx in range(table_size_for(self.disk_size, bm.granularity_bits, self.cs)):
            base = idx * per_chunk * gran
            data = self._chunk_bytes(bm, idx)
            if data is None or not data.strip(b"\0") or not data.strip(b"\xff"):
                add(base, per_chunk * gran, data is None or data[0] == 0xFF)
                continue
            # runs of whole 0x00 / 0xff bytes at once, mixed bytes bit by bit
            for m in re.finditer(rb"\x00+|\xff+|.", data, re.DOTALL):
                start = base + m.start() * 8 * gran
                run = m.group()
                if len(run) > 1 or run[0] in (0, 0xFF):
                    add(start, len(run) * 8 * gran, run[0] == 0xFF)
                    continue
                for bit in range(8):
                    add(start + bit * gran, gran, bool(run[0] >> bit & 1))
        return out

    # -- tracking writes ---------------------------------------------------------------

    def begin_writing(self, alloc: Callable[[int], int]) -> None:
        """Before the first guest write: flag every consistent bitmap in_use, with the
        directory rewritten in place while the autoclear bit is off (QEMU's
        update_ext_header_and_dir_in_place).  alloc(n) gives n new contiguous
        counted clusters (first index)."""
        if self.writing:
            return
        self._alloc = alloc
        self.tracked = [bm for bm in self.list if not bm.in_use]
        self._enabled = [bm for bm in self.tracked if bm.enabled]
        self._touched = {bm.name: set() for bm in self.tracked}
        self._disk_tables = {bm.name: array.array("Q", bm.table) for bm in self.tracked}
        if self.tracked:
            for bm in self.tracked:
                bm.flags |= BME_FLAG_IN_USE
            with self._autoclear_off():
                self.f.pwrite(self.ext.directory_offset, self._directory_bytes())
        self.writing = True

    def _directory_bytes(self) -> bytes:
        return b"".join(bm.entry_bytes() for bm in self.list)

    @contextlib.contextmanager
    def _autoclear_off(self) -> Iterator[None]:
        """Clear autoclear bit 0 (synced) for the body, set it again once the body's
        writes are synced: a crash in between leaves every bitmap invalid, not wrong."""
        self._write_autoclear(self.header.autoclear_features & ~AUTOCLEAR_BITMAPS)
        yield
        self.f.sync()
        self._write_autoclear(self.header.autoclear_features)

    def _write_autoclear(self, value: int) -> None:
        self.f.pwrite(OFF_AUTOCLEAR_FEATURES, struct.pack(">Q", value))
        self.f.sync()

    def mark(self, offset: int, length: int) -> None:
        """Guest bytes [offset, offset+length) were written: set their bits in every
        enabled bitmap."""
        if length <= 0:
            return
        per_chunk = self.cs * 8
        for bm in self._enabled:
            gb = bm.granularity_bits
            g0, g1 = offset >> gb, (offset + length - 1) >> gb
            for idx in range(g0 // per_chunk, g1 // per_chunk + 1):
                buf = self._chunk_for_write(bm, idx)
                if buf is None:
                    continue  # all ones already
                base = idx * per_chunk
                if _set_bits(buf, max(g0, base) - base, min(g1, base + per_chunk - 1) - base):
                    self._changed.add((bm.name, idx))
        if len(self._chunks) * self.cs > self.chunk_budget:
            self._spill()

    def _chunk_for_write(self, bm: Bitmap, idx: int, ones: bool = False) -> bytearray | None:
        """Data cluster idx, held in memory to be changed; None if it is all ones
        (nothing to set), unless `ones` asks for it anyway."""
        key = (bm.name, idx)
        buf = self._chunks.get(key)
        if buf is not None:
            self._chunks.move_to_end(key)
            return buf
        if idx >= len(bm.table):
            return None  # beyond the table (cannot happen for a valid bitmap)
        data = self._chunk_bytes(bm, idx)
        if data is None:
            if not ones:
                return None
            data = b"\xff" * self.cs
        buf = self._chunks[key] = bytearray(data)
        self._touched[bm.name].add(idx)
        return buf

    def _spill(self) -> None:
        """Over budget: the least recently used half of the touched data leaves memory.
        What changed goes to the cluster it will live in (new, and unreferenced until the
        directory switch, so no ordering is needed); the rest is where it was read from."""
        while len(self._chunks) * self.cs > self.chunk_budget // 2:
            key, buf = self._chunks.popitem(last=False)
            if key not in self._changed:
                continue
            self._changed.discard(key)
            if key not in self._spilled:
                self._spilled[key] = self._alloc(1) << self.cb
            self.f.pwrite(self._spilled[key], buf)

    def resize(self, new_size: int) -> None:
        """The guest disk changes size: every tracked bitmap's table follows it (QEMU
        truncates its in-memory bitmaps); bits past the new end are cleared, so growing
        again later shows that space clean."""
        assert self.writing, "resize after the first-write preparation"
        self.disk_size = new_size
        per_chunk = self.cs * 8
        for bm in self.tracked:
            want = table_size_for(new_size, bm.granularity_bits, self.cs)
            for idx in range(want, len(bm.table)):
                key = (bm.name, idx)
                self._chunks.pop(key, None)
                self._changed.discard(key)
                if key in self._spilled:
                    self._orphans.append(self._spilled.pop(key))
                self._touched[bm.name].discard(idx)
            del bm.table[want:]
            bm.table.extend([0] * (want - len(bm.table)))
            granules = -(-new_size >> bm.granularity_bits)
            base = (want - 1) * per_chunk
            if want and granules < base + per_chunk and self._chunk_bytes(bm, want - 1) != bytes(self.cs):
                buf = self._chunk_for_write(bm, want - 1, ones=True)
                assert buf is not None
                _clear_bits_from(buf, granules - base)
                self._changed.add((bm.name, want - 1))

    # -- storing at close -------------------------------------------------------------

    def store(self, free_later: Callable[[int], None], flush: Callable[[], None]) -> None:
        """Write the tracked bitmaps back with in_use cleared, crash-safely.  flush()
        must make every write and refcount so far durable."""
        if not self.writing:
            return
        self.writing = False
        if not self.tracked or self.disk_size != self.header.size:
            return  # a resize failed half-way: leave them in_use (inconsistent), as a crash would
        alloc, cs, cb = self._alloc, self.cs, self.cb
        old: list[tuple[int, int]] = [(self.ext.directory_offset, self.ext.directory_size)]
        for bm in self.tracked:
            disk = self._disk_tables[bm.name]
            table = bm.table  # resized with the disk; entries of touched chunks change below
            for idx in sorted(self._touched[bm.name]):
                data = self._chunk_bytes(bm, idx)
                key = (bm.name, idx)
                # the entry as it stands now: a shrink and a grow since open may have
                # dropped the cluster on disk, whose old bits must not count
                cur = table[idx] & BME_TABLE_ENTRY_OFFSET_MASK
                if cur and key not in self._spilled and data == _read(self.f, cur, cs):
                    continue  # only bits that were set already: keep the old cluster
                if data is None or not data.strip(b"\xff"):  # all ones: no cluster
                    table[idx] = BME_TABLE_ENTRY_FLAG_ALL_ONES
                    if key in self._spilled:
                        free_later(self._spilled.pop(key) >> cb)
                    continue
                where = self._spilled.get(key) or alloc(1) << cb
                self.f.pwrite(where, data)
                table[idx] = where
            # every data cluster on disk the new table no longer points at: replaced,
            # or cut off by a shrink (and maybe grown back as zeros)
            old += [(e & BME_TABLE_ENTRY_OFFSET_MASK, cs) for i, e in enumerate(disk)
                    if e & BME_TABLE_ENTRY_OFFSET_MASK and (i >= len(table) or table[i] != e)]
            if table == disk:
                continue
            n = -(-len(table) * 8 // cs)
            new_table = alloc(n) << cb
            self.f.pwrite(new_table, encode_table(table).ljust(n * cs, b"\0"))
            old.append((bm.table_offset, bm.table_size * 8))
            bm.table_offset, bm.table_size = new_table, len(table)
        for bm in self.tracked:
            bm.flags &= ~BME_FLAG_IN_USE
        directory = self._directory_bytes()
        n = -(-len(directory) // cs)
        new_dir = alloc(n) << cb
        self.f.pwrite(new_dir, directory.ljust(n * cs, b"\0"))
        flush()  # refcounts, then data, tables and directory: all on disk before the switch
        ext = BitmapsExtension(len(self.list), 0, len(directory), new_dir)
        with self._autoclear_off():
            self.f.pwrite(self.ext_offset, ext.pack())
        self.ext = ext
        for off, length in old:  # nothing on disk points at these any more
            last = (off + max(1, length) - 1) >> cb
            for c in range(off >> cb, last + 1):
                free_later(c)
        for where in self._orphans:
            free_later(where >> cb)
        self._orphans.clear()
        self._chunks.clear()
        self._changed.clear()
        self._spilled.clear()
        self._touched = {}
        flush()


def _clear_bits_from(buf: bytearray, lo: int) -> None:
    """Clear bit lo and every bit after it."""
    byte = lo >> 3
    if byte < len(buf):
        buf[byte] &= (1 << (lo & 7)) - 1
        buf[byte + 1:] = bytes(len(buf) - byte - 1)


def _set_bits(buf: bytearray, lo: int, hi: int) -> bool:
    """Set bits lo..hi (inclusive) of a little-endian bit array; whether any was clear."""
    first, last = lo >> 3, hi >> 3
    if first == last:
        old = buf[first]
        buf[first] = old | ((1 << (hi - lo + 1)) - 1) << (lo & 7)
        return buf[first] != old
    before = buf[first:last + 1]
    buf[first] |= (0xFF << (lo & 7)) & 0xFF
    if last > first + 1:
        buf[first + 1:last] = b"\xff" * (last - first - 1)
    buf[last] |= (1 << ((hi & 7) + 1)) - 1
    return buf[first:last + 1] != before
