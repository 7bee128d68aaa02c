"""A tiny progress bar on stderr for the examples (no tqdm needed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """Wrap an iterable; redraw ``[#####.....] 5/10 <postfix>`` on stderr, at most 10 times a second.

    On a terminal the bar redraws in place; otherwise (a log file, a test) it writes a line at the
    start, every tenth of the way and at the end.
    """

    def __init__(self, items: Iterable[T], total: int, label: str = "", width: int = 30) -> None:
        self.items, self.total, self.label, self.width = items, max(total, 1), label, width
        self.postfix = ""
        self.done = 0
        self._tty = sys.stderr.isatty()
        self._last_draw = 0.0
        self._last_tenth = -1

    def __iter__(self) -> Iterator[T]:
        self._draw(force=True)
        for item in self.items:
            yield item
            self.done += 1
            self._draw(force=self.done == self.total)
        if self._tty:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        tenth = self.done * 10 // self.total
        if self._tty and not force and now - self._last_draw < 0.1:
            return
        if not self._tty and not force and tenth == self._last_tenth:
            return
        self._last_draw, self._last_tenth = now, tenth
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label}[{bar}] {self.done}/{self.total} {self.postfix}".rstrip()
        sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
        sys.stderr.flush()
