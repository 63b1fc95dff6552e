"""The guest disk's partitions (MBR or GPT) as windows on the raw view.

Outside the engine: it reads the disk through a `read(offset, length)` function and
knows nothing of qcow2.  Numbers are the Linux kernel's (what `losetup -P` names):
GPT partitions by their entry index + 1; MBR primaries 1-4 by slot, logical
partitions inside an extended one from 5 in chain order, and the extended container
itself as the kernel shows it: its first 1 KiB (lsblk's "1K"; nobody mkfs's over the
logicals through it).
512-byte logical sectors only.

Tables are untrusted metadata: GPT headers and entry arrays must match their CRC32
(the backup header and entries are used when the primary ones are bad, as the
kernel does); an EBR chain that loops or runs past 256 links ends there.  (UEFI
specification 2.10, section 5; the kernel's block/partitions/efi.c and msdos.c.)
Stricter than the kernel, by our own rule (a partition file must never reach
outside the disk or into another partition): an entry outside the disk, ending
before it starts, or overlapping one already taken is left out with one log line,
where the kernel would show it cut short at the disk's end, or overlapping.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("qcowfuse")

SECTOR = 512
ReadFn = Callable[[int, int], "bytes | bytearray"]

MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES = 446  # four 16-byte entries, then the signature at 510
MBR_EXTENDED = {0x05, 0x0F, 0x85}
MBR_GPT_PROTECTIVE = 0xEE
MAX_LOGICAL = 256  # EBR links followed at most

GPT_SIGNATURE = b"EFI PART"
# signature, revision, header_size, header_crc32, reserved, my_lba, alternate_lba,
# first_usable_lba, last_usable_lba, disk_guid, partition_entry_lba,
# number_of_partition_entries, size_of_partition_entry, partition_entry_array_crc32
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_MIN_ENTRY_SIZE = 128
GPT_MAX_ENTRIES_BYTES = 1 << 20  # far beyond any real table (128 x 128 bytes is usual)


@dataclass(frozen=True)
class Partition:
    number: int  # the kernel's partition number
    start: int  # byte offset on the disk
    length: int  # bytes

    @property
    def end(self) -> int:
        return self.start + self.length


def read_partitions(read: ReadFn, disk_size: int) -> list[Partition]:
    """The partitions of the disk, by number; [] if it has no table we can read."""
    if disk_size < 2 * SECTOR:
        return []
    mbr = bytes(read(0, SECTOR))
    if mbr[510:512] != MBR_SIGNATURE:
        return []
    slots = [struct.unpack_from("<B3xB3xII", mbr, MBR_ENTRIES + 16 * i) for i in range(4)]
    if any(status not in (0, 0x80) for status, _, _, _ in slots):
        return []  # not a partition table (a FAT boot sector ends in 55 aa too), as the kernel
    if any(kind == MBR_GPT_PROTECTIVE for _, kind, _, _ in slots):
        return _checked(_gpt(read, disk_size), disk_size)
    return _checked(_mbr(read, slots, disk_size), disk_size)


def _checked(found: list[Partition], disk_size: int) -> list[Partition]:
    """Leave out what lies outside the disk or over a partition already taken."""
    out: list[Partition] = []
    for p in found:
        if p.length <= 0 or p.start < 0 or p.end > disk_size:
            log.warning("partition %d (%d bytes at %d) is not inside the disk: not shown",
                        p.number, p.length, p.start)
        elif any(p.start < q.end and q.start < p.end for q in out):
            log.warning("partition %d overlaps another: not shown", p.number)
        else:
            out.append(p)
    return out


# -- MBR ----------------------------------------------------------------------------

def _mbr(read: ReadFn, slots: list[tuple[int, int, int, int]], disk_size: int) -> list[Partition]:
    out: list[Partition] = []
    logical: list[Partition] = []
    for i, (_, kind, lba, sectors) in enumerate(slots):
        if kind == 0 or sectors == 0:
            continue
        if kind in MBR_EXTENDED:
            out.append(Partition(i + 1, lba * SECTOR, min(sectors, 2) * SECTOR))  # as the kernel
            if not logical:
                logical = _logical(read, lba, sectors, disk_size)
        else:
            out.append(Partition(i + 1, lba * SECTOR, sectors * SECTOR))
    return out + logical


def _logical(read: ReadFn, ext_lba: int, ext_sectors: int, disk_size: int) -> list[Partition]:
    """Follow the EBR chain of the extended partition at ext_lba: each EBR's first entry
    is a logical partition (relative to the EBR), its second the next EBR (relative to
    the extended partition)."""
    out: list[Partition] = []
    seen: set[int] = set()
    ebr = ext_lba
    while len(out) < MAX_LOGICAL:
        if ebr in seen or (ebr + 1) * SECTOR > disk_size or not ext_lba <= ebr < ext_lba + ext_sectors:
            if ebr in seen:
                log.warning("the chain of extended boot records loops at sector %d: stopped", ebr)
            break
        seen.add(ebr)
        data = bytes(read(ebr * SECTOR, SECTOR))
        if data[510:512] != MBR_SIGNATURE:
            break
        (_, kind, lba, sectors), (_, next_kind, next_lba, _) = (
            struct.unpack_from("<B3xB3xII", data, MBR_ENTRIES + 16 * i) for i in range(2))
        if kind != 0 and sectors != 0 and kind not in MBR_EXTENDED:
            out.append(Partition(5 + len(out), (ebr + lba) * SECTOR, sectors * SECTOR))
        if next_kind not in MBR_EXTENDED or next_lba == 0:
            break
        ebr = ext_lba + next_lba
    return out


# -- GPT ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    entries_lba: int
    entries: int
    entry_size: int
    entries_crc: int


def _gpt_header(read: ReadFn, lba: int, disk_size: int) -> _GptHeader | None:
    if lba <= 0 or (lba + 1) * SECTOR > disk_size:
        return None
    data = bytes(read(lba * SECTOR, SECTOR))
    (sig, _, size, crc, _, my_lba, alternate, _, _, _, entries_lba, entries, entry_size,
     entries_crc) = _GPT_HEADER.unpack_from(data)
    if sig != GPT_SIGNATURE or not _GPT_HEADER.size <= size <= SECTOR or my_lba != lba:
        return None
    if zlib.crc32(data[:16] + b"\0\0\0\0" + data[20:size]) != crc:
        return None
    if entry_size < GPT_MIN_ENTRY_SIZE or entry_size % 8 or entries * entry_size > GPT_MAX_ENTRIES_BYTES:
        return None
    return _GptHeader(my_lba, alternate, entries_lba, entries, entry_size, entries_crc)


def _gpt_entries(read: ReadFn, h: _GptHeader, disk_size: int) -> bytes | None:
    length = h.entries * h.entry_size
    if h.entries_lba <= 0 or h.entries_lba * SECTOR + length > disk_size:
        return None
    data = bytes(read(h.entries_lba * SECTOR, length))
    return data if zlib.crc32(data) == h.entries_crc else None


def _gpt(read: ReadFn, disk_size: int) -> list[Partition]:
    last = disk_size // SECTOR - 1
    table = None
    primary = _gpt_header(read, 1, disk_size)
    if primary is not None:
        table = _gpt_entries(read, primary, disk_size)
    if table is None:
        for lba in dict.fromkeys([primary.alternate_lba if primary else last, last]):
            backup = _gpt_header(read, lba, disk_size)
            table = _gpt_entries(read, backup, disk_size) if backup is not None else None
            if backup is not None and table is not None:
                log.warning("the primary GPT is damaged: using the backup at sector %d", lba)
                primary = backup
                break
    if primary is None or table is None:
        log.warning("the disk has a protective MBR but no valid GPT: no partitions shown")
        return []
    out = []
    for i in range(primary.entries):
        entry = table[i * primary.entry_size:(i + 1) * primary.entry_size]
        if entry[:16] == bytes(16):
            continue  # unused entry
        first, last_lba = struct.unpack_from("<QQ", entry, 32)
        if last_lba < first:
            log.warning("partition %d ends before it starts: not shown", i + 1)
            continue
        out.append(Partition(i + 1, first * SECTOR, (last_lba - first + 1) * SECTOR))
    return out
