"""Bytes and time: parsing at the edges, formatting for people.

Consumes strings such as ``"22GiB"``, ``"22GB"`` or ``"1.5e9"`` and produces integers of bytes; formats
bytes and milliseconds for tables. Binary (KiB, MiB, GiB, TiB) and decimal (kB, MB, GB, TB) units
differ: ``"1GiB"`` is 1,073,741,824 bytes, ``"1GB"`` is 1,000,000,000. Imports no torch.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "format_ms", "parse_bytes"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
ACCEPTED_FORMS = "a number of bytes (1073741824, 1.5e9) or a number with a unit: B, KiB, MiB, GiB, TiB (binary) or kB, MB, GB, TB (decimal), e.g. 22GiB"


def parse_bytes(text: str | int) -> int:
    """Parse a size into bytes.

    Args:
        text: ``"22GiB"``, ``"22 GB"``, ``"512MiB"``, ``"1.5e9"`` or an int.

    Returns:
        The number of bytes, rounded down to an integer.

    Raises:
        ValueError: for negative, empty or unknown forms; the message lists the accepted forms.

    Example:
        >>> parse_bytes("1GiB"), parse_bytes("1GB"), parse_bytes("2.5KiB")
        (1073741824, 1000000000, 2560)
    """
    if isinstance(text, bool):
        raise ValueError(f"size: got {text!r}; expected {ACCEPTED_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size: got {text}; expected a non-negative number of bytes")
        return text
    match = _PATTERN.match(str(text))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"size: got {text!r}; expected {ACCEPTED_FORMS}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"size: got {text!r}, which is too large; expected {ACCEPTED_FORMS}")
    return int(value)


def format_bytes(num_bytes: float) -> str:
    """Format bytes with a binary unit, three significant figures.

    Example:
        >>> format_bytes(0), format_bytes(1536), format_bytes(437.2 * 2**20)
        ('0 B', '1.50 KiB', '437 MiB')
    """
    sign = "-" if num_bytes < 0 else ""
    value = float(abs(num_bytes))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if unit == "B" and value < 1024:
            return f"{sign}{int(value)} B"
        digits = 2 if value < 10 else 1 if value < 100 else 0
        text = f"{value:.{digits}f}"
        if float(text) < 1024 or unit == "TiB":
            if len(text.replace(".", "").lstrip("0")) > 3 and "." in text:  # 9.999 -> "10.00"
                text = f"{value:.{digits - 1}f}"
            return f"{sign}{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ms(milliseconds: float | None) -> str:
    """Format a duration in milliseconds; ``None`` (not measured) prints as ``-``.

    Example:
        >>> format_ms(0.01234), format_ms(12.345), format_ms(None)
        ('0.012 ms', '12.3 ms', '-')
    """
    if milliseconds is None:
        return "-"
    if milliseconds < 1:
        return f"{milliseconds:.3f} ms"
    if milliseconds < 100:
        return f"{milliseconds:.1f} ms"
    return f"{milliseconds:.0f} ms"
