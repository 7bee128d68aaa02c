"""A timeline as one self-contained HTML page: the data, downsampled with its peaks kept.

Consumes :class:`~remat.timeline.record.StepTimeline` objects (and the budget); produces the JSON
the page draws (:func:`payload`) and the page itself (:func:`render_html`), whose script and style
are inline (:mod:`remat.timeline._template`): nothing is fetched, so the file opens offline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from remat.timeline._template import PAGE
from remat.timeline.record import StepTimeline, _unit_of
from remat.units import format_bytes

__all__ = [
    "DEFAULT_MAX_POINTS",
    "downsample",
    "key_info",
    "payload",
    "render_html",
    "summary_lines",
]

DEFAULT_MAX_POINTS = 2000
"""Points kept per step in the page; longer steps are downsampled (peaks kept)."""

_PHASE_CODES = {"forward": 0, "backward": 1, "optimizer": 2}
_RECOMPUTE = 3
_COLORS = {
    "parameter": ("parameters", "#4e79a7"),
    "other": ("buffers and inputs", "#bab0ab"),
    "optimizer_state": ("optimizer state", "#9c755f"),
    "gradient": ("gradients", "#f28e2c"),
    "act:": ("activations outside units", "#76b7b2"),
    "transient": ("transients", "#edc949"),
}


def downsample(totals: Sequence[int], max_points: int, keep: Sequence[int] = ()) -> list[int]:
    """Indices of at most about ``max_points`` points of ``totals``: in each of
    ``max_points // 2`` equal buckets the lowest and the highest, plus ``keep``, the first and
    the last; so every peak (the highest of its bucket) stays exactly.

    Example:
        >>> totals = [0, 5, 1, 9, 2, 3, 8, 0]
        >>> downsample(totals, 4)  # two buckets: the lowest and the highest of each
        [0, 3, 6, 7]
        >>> downsample(totals, 100) == list(range(8))
        True
    """
    n = len(totals)
    if n <= max_points:
        return list(range(n))
    buckets = max(max_points // 2, 1)
    chosen = {i for i in keep if 0 <= i < n} | {0, n - 1}
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo >= hi:
            continue
        span = range(lo, hi)
        chosen.add(max(span, key=totals.__getitem__))
        chosen.add(min(span, key=totals.__getitem__))
    return sorted(chosen)


def key_info(keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Label and colour of each series key; a unit's activations carry ``unit``.

    Example:
        >>> info = key_info(["parameter", "act:h.0", "act:h.1", "act:"])
        >>> info["act:h.1"]["label"], info["act:h.1"]["unit"], info["parameter"]["label"]
        ('activations h.1', 'h.1', 'parameters')
    """
    units = [k[4:] for k in keys if k.startswith("act:") and k != "act:"]
    info: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key in _COLORS:
            label, color = _COLORS[key]
            info[key] = {"label": label, "color": color}
            continue
        unit = key[4:]
        position = units.index(unit) / max(len(units) - 1, 1)
        hue = 95 + 110 * position  # greens to blues, one shade per unit in execution order
        lightness = 42 + 14 * (units.index(unit) % 2)
        info[key] = {
            "label": f"activations {unit}",
            "color": f"hsl({hue:.0f}, 48%, {lightness}%)",
            "unit": unit,
        }
    return info


class _Names:
    """One table of the op and module names, so each point carries two small integers."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found


def _phase_runs(line: StepTimeline, xs: Sequence[float]) -> list[list[Any]]:
    """Consecutive ops of one phase (recompute apart from backward): [phase, x start, x end]."""
    runs: list[list[Any]] = []
    for i, phase in enumerate(line.phases):
        name = "recompute" if line.recompute[i] else phase
        if runs and runs[-1][0] == name:
            runs[-1][2] = xs[i]
        else:
            runs.append([name, xs[i - 1] if i else xs[i], xs[i]])
    return [[name, round(a, 3), round(b, 3)] for name, a, b in runs]


def _units(line: StepTimeline, xs: Sequence[float], names: _Names) -> dict[str, dict[str, Any]]:
    """Per unit: its saved tensors and recomputed ones ([x born, x dead, bytes, op]) and the
    x spans of its forward, recompute and backward ops."""
    n = len(line.ops)
    end = xs[-1] if xs else 0.0

    def x_at(index: int) -> float:
        return round(xs[index] if index < n else end, 3)

    out: dict[str, dict[str, Any]] = {
        unit: {"saved": [], "recompute": [], "spans": {}} for unit in line.units
    }
    for s in line.storages:
        if s.static or s.created >= n:
            continue
        item = [x_at(s.created), x_at(s.died), s.nbytes, names(line.ops[s.created])]
        if s.key.startswith("act:") and s.key[4:] in out:
            out[s.key[4:]]["saved"].append(item)
        elif s.recompute:
            unit = _unit_of(s.module, line.units)
            if unit is not None:
                out[unit]["recompute"].append(item)
    for i, fqn in enumerate(line.modules):
        unit = _unit_of(fqn, line.units)
        if unit is None or line.phases[i] == "optimizer":
            continue
        kind = "recompute" if line.recompute[i] else line.phases[i]
        spans = out[unit]["spans"]
        x = round(xs[i], 3)
        start = round(xs[i - 1], 3) if i else x
        spans[kind] = [min(spans[kind][0], start), x] if kind in spans else [start, x]
    return out


def summary_lines(
    lines: Sequence[StepTimeline], budget_bytes: int | None, device: str
) -> list[str]:
    """What the page says above the chart: each step's peak and where, what the plan changed,
    the budget and the device.

    Example:
        >>> summary_lines([], None, "cpu")
        ['device: cpu']
    """
    text = []
    for line in lines:
        i = line.peak_index
        module = (line.modules[i] or "the model") if line.ops else "-"
        what = f"{line.ops[i]}, {line.phases[i]}" if line.ops else "no ops"
        text.append(
            f"{line.label}: peak {format_bytes(line.peak_bytes)} ({line.peak_bytes:,} bytes) in"
            f" {module} ({what}), op {i} of {len(line.ops)}"
        )
    if len(lines) == 2 and lines[0].ops and lines[1].ops:
        before, after = lines
        saved = before.peak_bytes - after.peak_bytes
        text.append(
            f"the plan lowers the peak by {format_bytes(saved)}"
            f" ({saved / max(before.peak_bytes, 1):.0%}) and runs {len(after.ops):,} ops"
            f" ({len(after.ops) / len(before.ops):.2f}x)"
            + (
                f" in {after.time_ms[-1] / max(before.time_ms[-1], 1e-9):.2f}x the time under the"
                " tracker (wall time: noisy on a busy machine)"
                if after.time_ms and before.time_ms
                else ""
            )
        )
    if budget_bytes is not None:
        fits = bool(lines) and lines[-1].peak_bytes <= budget_bytes
        text.append(
            f"budget {format_bytes(budget_bytes)} ({budget_bytes:,} bytes):"
            f" {'the planned peak fits' if fits else 'the peak is over it'}"
        )
    text.append(f"device: {device}")
    return text


def _indices(line: StepTimeline) -> list[float]:
    return [float(i) for i in range(len(line.ops))]


def payload(
    lines: Sequence[StepTimeline],
    *,
    budget_bytes: int | None = None,
    title: str = "remat timeline",
    device: str = "",
    max_points: int = DEFAULT_MAX_POINTS,
    x_axis: str = "auto",
    actions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON the page draws: per step the kept points (x, op, module, phase, bytes per key),
    its peak, its phases and its units' tensor lifetimes. ``x_axis``: ``"time"`` (milliseconds,
    measured steps only), ``"op"`` (the op index) or ``"auto"`` (time when measured).
    ``actions``: the plan's action per unit, shown beside the unit.

    Example:
        >>> import torch
        >>> from remat.timeline.record import record_step
        >>> from remat.profiling.step import Step
        >>> line = record_step(Step(torch.nn.Linear(4, 4), (torch.ones(2, 4),), optimizer="sgd"))
        >>> data = payload([line], budget_bytes=1000)
        >>> data["steps"][0]["peak"]["bytes"] == line.peak_bytes, data["x_unit"]
        (True, 'ms')
    """
    if max_points < 4:
        raise ValueError(f"max_points: got {max_points}; expected at least 4 points per step")
    timed = bool(lines) and all(line.time_ms is not None for line in lines)
    if x_axis not in ("auto", "time", "op") or (x_axis == "time" and not timed):
        raise ValueError(
            f"x_axis: got {x_axis!r}; expected 'auto', 'op' or 'time' (time only for steps"
            " measured on a real device, not on meta)"
        )
    by_time = timed and x_axis != "op"
    keys = list(lines[0].series) if lines else []
    names = _Names()
    steps = []
    for line in lines:
        xs = line.time_ms if by_time and line.time_ms is not None else _indices(line)
        totals = line.total_bytes
        peak = line.peak_index
        phase_starts = [i for i in range(1, len(line.ops)) if line.phases[i] != line.phases[i - 1]]
        kept = downsample(totals, max_points, [peak, *phase_starts])
        codes = [
            _RECOMPUTE if line.recompute[i] else _PHASE_CODES.get(line.phases[i], 1) for i in kept
        ]
        steps.append(
            {
                "label": line.label,
                "n": len(line.ops),
                "i": kept,
                "x": [round(xs[i], 3) for i in kept],
                "t": None if line.time_ms is None else [round(line.time_ms[i], 2) for i in kept],
                "op": [names(line.ops[i]) for i in kept],
                "mod": [names(line.modules[i]) for i in kept],
                "ph": codes,
                "stack": [[line.series[key][i] for i in kept] for key in keys],
                "peak": {
                    "i": peak,
                    "x": round(xs[peak], 3) if line.ops else 0,
                    "bytes": line.peak_bytes,
                    "op": line.ops[peak] if line.ops else "",
                    "module": line.modules[peak] if line.ops else "",
                    "phase": (
                        "recompute"
                        if line.ops and line.recompute[peak]
                        else line.phases[peak]
                        if line.ops
                        else ""
                    ),
                },
                "phases": _phase_runs(line, xs),
                "units": _units(line, xs, names),
            }
        )
    x_unit = "ms" if by_time else "op"
    return {
        "title": title,
        "device": device,
        "x_unit": x_unit,
        "x_label": (
            "milliseconds since the step began (wall time under the tracker)"
            if x_unit == "ms"
            else "op index" + ("" if timed else " (estimated from shapes: no time)")
        ),
        "budget_bytes": budget_bytes,
        "keys": keys,
        "key_info": key_info(keys),
        "names": names.names,
        "summary": summary_lines(lines, budget_bytes, device),
        "actions": dict(actions or {}),
        "steps": steps,
    }


def render_html(data: dict[str, Any]) -> str:
    """The page for :func:`payload`'s ``data``: inline script and style, no network reference.

    Example:
        >>> page = render_html({"title": "t<1>", "x_unit": "op", "steps": []})
        >>> page.startswith("<!DOCTYPE html>"), "t&lt;1&gt;" in page, "http" in page
        (True, True, False)
    """
    # "<" only occurs inside JSON strings: escaped, no "</script>" or "<!--" can end the block.
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    x_label = "op index" if data.get("x_unit") == "op" else "elapsed time"
    return (
        PAGE.replace("__TITLE__", html.escape(str(data.get("title", "remat timeline"))))
        .replace("__XLABEL__", x_label)
        .replace("__DATA__", text)
    )
