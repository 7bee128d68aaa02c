"""Feedback from the long calls: what is being measured, and how far along it is.

``auto_``, ``profile``, ``profile_step``, ``plan_step``, ``bench`` and ``fit.max_size`` take
``progress``: ``None`` (default) sends each line to the ``remat`` logger at INFO, silent until the
caller turns logging on (``logging.basicConfig(level=logging.INFO)``, or
``logging.getLogger("remat").setLevel(logging.INFO)`` with a handler); ``True`` writes to stderr
with the seconds elapsed, and on a terminal redraws one line in place with a bar for the steps that
say ``k/N``; a callable receives each line.

Consumes the lines the long calls say; produces nothing else. No torch.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "StderrProgress", "as_progress"]

Progress = Callable[[str], None]
"""Called with one line of text as each stage of a long call starts."""

logger = logging.getLogger("remat")

_COUNT = re.compile(r"\b(\d+)/(\d+)\b")


class StderrProgress:
    """``progress=True``: each line on ``stream`` (stderr) with the seconds since the first.

    On a terminal the line is redrawn in place, with a bar when it says ``k/N``; elsewhere (a log
    file, CI, a test) every line is written on its own.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> say = StderrProgress(out, clock=iter([0.0, 0.0, 1.5]).__next__)
        >>> say("profile: tracked step 1/4 (every unit kept)")
        >>> say("profile: tracked step 2/4 (every unit recomputed)")
        >>> print(out.getvalue(), end="")
        remat [   0.0 s] profile: tracked step 1/4 (every unit kept)
        remat [   1.5 s] profile: tracked step 2/4 (every unit recomputed)
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        width: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width, self.clock = width, clock
        self.started = clock()
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = 0  # characters of the line drawn in place

    def bar(self, text: str) -> str:
        """``[#####.....] `` for a line that says ``k/N``, else nothing.

        Example:
            >>> StderrProgress(width=10).bar("bench: round 3/6 (timed), 4 strategies")
            '[#####.....] '
        """
        match = _COUNT.search(text)
        if match is None or int(match.group(2)) < 1:
            return ""
        done = min(int(match.group(1)), int(match.group(2))) / int(match.group(2))
        filled = round(done * self.width)
        return "[" + "#" * filled + "." * (self.width - filled) + "] "

    def __call__(self, text: str) -> None:
        line = f"remat [{self.clock() - self.started:6.1f} s] {text}"
        if self.terminal:
            line = self.bar(text) + line
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def as_progress(progress: bool | Progress | None) -> Progress:
    """What a long call does with each line: log it (``None``, ``False``), write it to stderr
    (``True``: :class:`StderrProgress`), or pass it to the callable given.

    Raises:
        ValueError: anything else.

    Example:
        >>> lines = []
        >>> as_progress(lines.append)("profile: tracked step 1/3")
        >>> lines
        ['profile: tracked step 1/3']
        >>> as_progress(None)("to the remat logger at INFO")
        >>> as_progress("yes")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: progress: got 'yes'; expected True (lines on stderr), ...
    """
    if progress is None or progress is False:
        return _log
    if progress is True:
        return StderrProgress()
    if callable(progress) and not isinstance(progress, (str, bytes)):
        return progress
    raise ValueError(
        f"progress: got {progress!r}; expected True (lines on stderr), None or False (the"
        " 'remat' logger at INFO) or a callable taking one line of text"
    )


def _log(text: str) -> None:
    logger.info("%s", text)
