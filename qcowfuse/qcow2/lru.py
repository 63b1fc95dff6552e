"""Eviction shared by the metadata caches (L2 tables, refcount blocks)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


def evict_clean(entries: OrderedDict[Any, Any], dirty: set[Any], limit: int) -> None:
    """Drop least recently used entries that are not dirty until at most `limit`
    remain; dirty ones stay until written, and the most recent entry always stays."""
    if len(entries) <= limit:
        return
    key: Hashable
    for key in list(entries)[:-1]:
        if len(entries) <= limit:
            break
        if key not in dirty:
            del entries[key]
