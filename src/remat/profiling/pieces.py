"""A tracked step that does not fit, taken in pieces that do, and combined exactly.

The profiler measures every unit under one action (kept, or a selective option) in one tracked
step. When that step would not fit on the device (``torch.OutOfMemoryError``, real or under
:func:`~remat.profiling.tracker.simulated_capacity`), it is taken in *windows*: each run puts the
action on a window of consecutive units and recomputes the rest, which holds less. A window that
does not fit either is halved, down to single units.

Every figure the profiler takes from a run is a difference within that run: a unit's retention
is the live total at its forward's start less the one at the unit before it, its backward need is
its backward peak less the retention that outlives the forward (``persistent``). So the windows'
runs combine into the marks the whole run would have left: each window's forward marks are
shifted so that its first unit starts where the window before ended, and each backward mark keeps
its height above the persistent retention before it. The whole step's peak is then the highest of
the combined marks, a prediction of what could not be measured.

Consumes: per window, the run ``_tracked_step`` returned for it. Produces: one run of the same
form, for the profiler's arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from remat.profiling.tracker import Mark

__all__ = ["Released", "combine_windows", "halve"]


@dataclass
class Released:
    """Per unit, what a unit's backward frees of what the unit before it left alive, and what a
    unit's forward made that its own backward frees (``profiler._released``).

    Example:
        >>> Released.empty(2).held_both
        [0, 0]
    """

    released: list[int]
    """Bytes the unit made in its forward (its output) that died in the next unit's backward."""
    released_between: list[int]
    """Bytes the parent made between the unit and the next (the next one's input, a skip's sum)
    that died in the next unit's backward."""
    held_made: list[int]
    """What the unit's backward peak would add had the previous unit's ``released`` bytes lived
    through it."""
    held_between: list[int]
    """The same for the previous unit's ``released_between`` bytes."""
    held_both: list[int]
    """The same for both."""
    state: list[int]
    """Bytes the unit's forward made that died in its own backward (a checkpoint's state)."""
    rise_before: list[int]
    """How far the unit's backward rose above its start before the last tensor that the forward
    made up to the unit died in it (its saved tensors and inputs; a checkpoint's)."""
    rise_after: list[int | None]
    """The same from that death on (``None``: none died)."""

    @classmethod
    def empty(cls, n: int) -> Released:
        return cls(*([0] * n for _ in range(8)))


Run = tuple[int, list[Mark], Any, dict[int, int], list[int], list[int], Released]


def halve(window: range) -> list[range]:
    """The two halves of a window of units (a window of one is not halved).

    Example:
        >>> halve(range(0, 5)), halve(range(3, 4))
        ([range(0, 2), range(2, 5)], [range(3, 4)])
    """
    if len(window) < 2:
        return [window]
    middle = window.start + len(window) // 2
    return [range(window.start, middle), range(middle, window.stop)]


def _by_label(marks: list[Mark]) -> dict[tuple[str, int], Mark]:
    return {tuple(m.label): m for m in marks}  # type: ignore[misc]


def _starts(found: dict[tuple[str, int], Mark], n: int) -> list[int]:
    return [found[("forward", j)].start_bytes for j in range(n)] + [
        found[("after", n - 1)].start_bytes
    ]


def combine_windows(pieces: Sequence[tuple[range, Run]], n: int) -> Run:
    """One run from the runs of windows that cover units ``0..n-1`` in order (see the module's
    doc): its marks are those the run of every unit under the windows' action would have left.
    The unit hooks and freed inputs are those of the first window's run (the caller takes the
    units' inputs and outputs from a run that fits whole).

    Example:
        >>> def run(offset):  # two units; every mark `offset` higher in the second run
        ...     marks = [Mark(("start", -1), 0, 10)] + [
        ...         Mark(label, start + offset, peak + offset) for label, start, peak in [
        ...             (("forward", 0), 10, 30), (("after", 0), 25, 25),
        ...             (("forward", 1), 25, 45), (("after", 1), 40, 40), (("end", -1), 40, 60),
        ...             (("backward", 1), 50, 55), (("backward", 0), 30, 35)]]
        ...     return (0, marks, None, {}, [0, 0], [0, 0], Released.empty(2))
        >>> peak, marks, *_ = combine_windows([(range(0, 1), run(0)), (range(1, 2), run(7))], 2)
        >>> peak, [(m.label, m.start_bytes) for m in marks if m.label[1] == 1]
        (60, [(('forward', 1), 25), (('after', 1), 40), (('backward', 1), 50)])
    """
    pieces = sorted(pieces, key=lambda piece: piece[0].start)
    if len(pieces) == 1:
        return pieces[0][1]
    covered = [j for window, _ in pieces for j in window]
    if covered != list(range(n)):
        raise ValueError(f"combine_windows: windows cover units {covered}; expected 0..{n - 1}")
    found = [_by_label(run[1]) for _, run in pieces]
    starts = [_starts(f, n) for f in found]
    base = starts[0][0]
    forward_only, cache = [0] * n, [0] * n
    released = Released.empty(n)
    shift = [0] * len(pieces)
    combined_starts = [0] * (n + 1)
    for i, (window, run) in enumerate(pieces):
        if i > 0:
            shift[i] = combined_starts[window.start] - starts[i][window.start]
        for j in range(window.start, window.stop + 1):
            combined_starts[j] = starts[i][j] + shift[i]
        for j in window:
            forward_only[j], cache[j] = run[4][j], run[5][j]
            for name in Released.__dataclass_fields__:
                getattr(released, name)[j] = getattr(run[6], name)[j]

    def persistent(starts_: list[int], forward_only_: list[int], j: int) -> int:
        return starts_[j] - base - sum(forward_only_[:j])

    # marks after autocast's exit stand above what is alive into the backward: less its cache
    gone = [f + c for f, c in zip(forward_only, cache, strict=True)]

    marks: list[Mark] = []
    first_marks = pieces[0][1][1]
    marks += [m for m in first_marks if m.label[0] in ("start", "optimizer")]
    for i, (window, run) in enumerate(pieces):
        for j in window:
            for kind in ("forward", "after"):
                mark = found[i][(kind, j)]
                marks.append(
                    Mark(mark.label, mark.start_bytes + shift[i], mark.peak_bytes + shift[i])
                )
            last = [("end", -1), ("loss", -1), ("head", -1)] if j == n - 1 else []
            for label in [("backward", j), *last]:
                mark = found[i].get(label)
                if mark is None:
                    continue
                at = n if label[1] < 0 else j
                before = label[0] in ("end", "loss")
                window_gone = (
                    run[4] if before else [f + c for f, c in zip(run[4], run[5], strict=True)]
                )
                lift = persistent(combined_starts, forward_only if before else gone, at) - (
                    persistent(starts[i], window_gone, at)
                )
                marks.append(Mark(mark.label, mark.start_bytes + lift, mark.peak_bytes + lift))
    peak = max(m.peak_bytes for m in marks)
    _, _, unit_marks, freed, *_ = pieces[0][1]
    return peak, marks, unit_marks, freed, forward_only, cache, released
