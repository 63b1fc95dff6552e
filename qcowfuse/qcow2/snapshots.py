"""Internal snapshot table (docs/interop/qcow2.rst, "Snapshots").

Each entry (8-byte aligned): u64 l1_table_offset, u32 l1_size, u16 id_str_size,
u16 name_size, u32 date_sec, u32 date_nsec, u64 vm_clock_nsec, u32
vm_state_size, u32 extra_data_size, extra data, id string, name, padding.
Snapshot L1 tables hold references that refcounts account for, so the active
layer copies shared clusters on write; qcowfuse never changes a snapshot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import FormatError
from ..hostfile import HostFile
from .header import MAX_L1_BYTES, MAX_SNAPSHOTS, SNAPSHOT_ENTRY_FIXED_BYTES, Header

_ENTRY_FMT = ">QIHHIIQII"
_ENTRY_SIZE = struct.calcsize(_ENTRY_FMT)
assert _ENTRY_SIZE == SNAPSHOT_ENTRY_FIXED_BYTES
# QEMU's limit (block/qcow2.h): QCOW_MAX_SNAPSHOTS_SIZE.
MAX_SNAPSHOT_TABLE_BYTES = 1024 * MAX_SNAPSHOTS


@dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None  # from extra data; None means the image's current size


def read_snapshot_table(f: HostFile, header: Header) -> tuple[list[Snapshot], int]:
    """All snapshots, and the table's size in bytes."""
    n = header.nb_snapshots  # at most MAX_SNAPSHOTS: Header.parse checked the count and offset
    if not n:
        return [], 0
    out = []
    pos = header.snapshots_offset
    for _ in range(n):
        if pos - header.snapshots_offset + _ENTRY_SIZE > MAX_SNAPSHOT_TABLE_BYTES:
            raise FormatError("snapshot table too large")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra_len
         ) = struct.unpack(_ENTRY_FMT, f.pread(pos, _ENTRY_SIZE))
        var = f.pread(pos + _ENTRY_SIZE, extra_len + id_len + name_len)
        extra, ident, name = var[:extra_len], var[extra_len:extra_len + id_len], var[extra_len + id_len:]
        if l1_off % header.cluster_size or l1_size * 8 > MAX_L1_BYTES:
            raise FormatError(f"snapshot '{name.decode(errors='replace')}' has an invalid L1 table")
        if len(extra) >= 8:
            vmstate = struct.unpack_from(">Q", extra, 0)[0]
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if len(extra) >= 16 else None
        out.append(Snapshot(ident.decode("utf-8", "replace"), name.decode("utf-8", "replace"), l1_off,
                            l1_size, dsec, dnsec, vmclock, vmstate, disk_size))
        size = _ENTRY_SIZE + extra_len + id_len + name_len
        pos += size + (-size % 8)
    return out, pos - header.snapshots_offset


def find_snapshot(snapshots: list[Snapshot], key: str) -> Snapshot:
    """By name, else by id (QEMU's snapshot.name= / snapshot.id=)."""
    for s in snapshots:
        if s.name == key:
            return s
    for s in snapshots:
        if s.id == key:
            return s
    names = ", ".join(s.name for s in snapshots) or "none"
    raise FormatError(f"no snapshot named '{key}' (snapshots: {names})")
