"""A one-line progress indicator for long commands (check, repair, map, info)."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Progress = Callable[[float], None]


class TerminalProgress:
    """Shown on stderr only after a second of work, and only on a terminal."""

    def __init__(self, stream: TextIO, label: str = "checking") -> None:
        self.stream = stream
        self.label = label
        self.start = time.monotonic()
        self.shown = False

    @classmethod
    def for_stderr(cls, label: str) -> "TerminalProgress | None":
        """A progress bar on stderr if it is a terminal, else None (nothing printed)."""
        return cls(sys.stderr, label) if sys.stderr.isatty() else None

    def __call__(self, fraction: float) -> None:
        if time.monotonic() - self.start < 1.0:
            return
        self.shown = True
        self.stream.write(f"\r{self.label}: {min(1.0, max(0.0, fraction)) * 100:5.1f}%")
        self.stream.flush()

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (len(self.label) + 10) + "\r")
            self.stream.flush()


def scaled(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """Report fractions of one phase as the part [lo, hi] of the whole."""
    if progress is None:
        return None
    return lambda fraction: progress(lo + (hi - lo) * fraction)
