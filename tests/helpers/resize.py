"""A model of the guest for resize tests, judged by QEMU (size, check, compare)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers import qemu
from qcowfuse import Image


def info(path: Path) -> dict:
    return json.loads(qemu.run("qemu-img", "info", "--output=json", "-U", str(path)).stdout)


class Model:
    """The guest as QEMU read it before (a sparse raw file), then every write made since."""

    def __init__(self, image: Path, raw: Path) -> None:
        self.raw = qemu.convert_to_raw(image, raw)

    def resize(self, size: int) -> None:
        os.truncate(self.raw, size)

    def write(self, img: Image, off: int, data: bytes) -> None:
        img.write(off, data)
        with open(self.raw, "r+b") as fh:
            fh.seek(off)
            fh.write(data)

    def judge(self, image: Path, size: int) -> None:
        assert info(image)["virtual-size"] == size
        qemu.assert_clean(image)
        qemu.compare_raw(image, self.raw)
