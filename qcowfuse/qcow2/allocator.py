"""Where new host clusters come from, and when old ones may be given back.

Allocation takes the lowest free clusters (refcount 0), reusing holes before
growing the file, and raises their refcounts at once (in memory; the refcount
store reaches disk before any table that points at them).

Freeing is deferred: a cluster's refcount drops only after the reference that
was removed is on disk (`release_pending`, called by the image after its tables
are synced), so a crash can leak a cluster but never leave a live reference
to a cluster with refcount 0.

A free may ask for the host space back (QEMU's QCOW2_DISCARD_ALWAYS, as a shrink's
frees do): the image punches those clusters out once their refcount 0 is on disk.
"""

from __future__ import annotations

from .refcounts import RefcountStore


def alloc_contiguous(rc: RefcountStore, count: int) -> int:
    """First cluster index of `count` consecutive newly counted clusters (a table
    must be contiguous, unlike data runs).  Refcount blocks created to describe the
    run may land inside it: then look again."""
    epb = rc.entries_per_block
    while True:
        start = rc.free_run(count)
        generation = rc.generation
        for b in range(start // epb, (start + count - 1) // epb + 1):
            rc.ensure_block(b)
        if rc.generation != generation:
            continue  # a new refcount block may have taken part of the run
        for c in range(start, start + count):
            rc.add(c, 1)
        return start


def cluster_runs(clusters: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive cluster indexes, in order: one punch
    per run instead of one per cluster (as QEMU merges adjacent discards)."""
    runs: list[tuple[int, int]] = []
    for c in sorted(set(clusters)):
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


class Allocator:
    def __init__(self, refcounts: RefcountStore) -> None:
        self.rc = refcounts
        self.pending_free: list[int] = []  # cluster indexes, one entry per reference dropped
        self.pending_discard: set[int] = set()  # of those, the ones to punch out once free

    def alloc_run(self, want: int) -> tuple[int, int]:
        """Allocate up to `want` contiguous clusters: (first cluster index, count >= 1)."""
        rc = self.rc
        epb = rc.entries_per_block
        while True:
            start = rc.next_free(rc.free_hint)
            count = rc.free_count(start, want)
            generation = rc.generation
            for b in range(start // epb, (start + count - 1) // epb + 1):
                rc.ensure_block(b)
            if rc.generation != generation:
                continue  # new refcount blocks may sit inside the candidate run
            rc.count_new(start, count)
            # start was the first free cluster at or after the hint: all below is used now
            rc.free_hint = start + count
            return start, count

    def alloc_quick(self) -> int:
        """One cluster when the next one is plainly free (see RefcountStore.take_free_hint),
        the same one alloc() would give; -1 otherwise (then use alloc_run)."""
        return self.rc.take_free_hint()

    def alloc_contiguous(self, count: int) -> int:
        """Exactly `count` contiguous clusters (for tables that must not be split);
        returns the first index."""
        return alloc_contiguous(self.rc, count)

    def alloc(self) -> int:
        """One cluster (for an L2 table); returns its cluster index."""
        return self.alloc_run(1)[0]

    def free_later(self, cluster: int, discard: bool = False) -> None:
        self.pending_free.append(cluster)
        if discard:
            self.pending_discard.add(cluster)

    def release_pending(self, discard_all: bool = False) -> list[int]:
        """Drop the refcounts of references that are gone from disk; returns the
        clusters that became free and are to be punched out: those freed with
        discard=True, or all of them with discard_all (detect-zeroes=unmap)."""
        pending, self.pending_free = self.pending_free, []
        discard, self.pending_discard = self.pending_discard, set()
        return [c for c in pending if self.rc.add(c, -1) == 0 and (discard_all or c in discard)]
