"""Random writes through a mounted raw file, mirrored into a bytearray model."""

from __future__ import annotations

import os
import random
from pathlib import Path

SIZES = (1, 300, 4096, 65536, 70001, 300000)


def random_writes(raw: Path, model: bytearray, seed: int, count: int = 120,
                  sizes: tuple[int, ...] = SIZES) -> None:
    rnd = random.Random(seed)
    fd = os.open(raw, os.O_RDWR)
    try:
        for _ in range(count):
            n = rnd.choice(sizes)
            off = rnd.randrange(0, len(model) - n)
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
        os.fsync(fd)
    finally:
        os.close(fd)
