"""A recorded step in PyTorch's memory snapshot format, for the viewer people know.

Consumes :class:`~remat.timeline.record.StepTimeline` objects; produces the dictionary that
``torch.cuda.memory._dump_snapshot`` pickles (``segments`` and ``device_traces``, as documented in
``torch.cuda.memory._snapshot``), built from plain types only, so a step measured on the CPU or
estimated on ``meta`` for a GPU one does not have opens in PyTorch's memory viewer
(``pytorch.org/memory_viz``) and in ``torch.cuda._memory_viz``.

Each step is one "device" of the snapshot (device 0 the first step, usually the unplanned one;
device 1 the planned one). remat counts storages, not allocator blocks: addresses are given by a
first-fit allocator over one segment per step (512-byte aligned, as CUDA's caching allocator
rounds), and every ``alloc`` / ``free_completed`` carries the storage's bytes, so the viewer's
active memory at each point is remat's live total. Each entry's one frame names the op (``name``),
the module (``filename``) and the op index (``line``); ``time_us`` is the time (measured steps) or
the op index (``meta``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remat.timeline.record import StepTimeline
from remat.timeline.render import key_info

__all__ = ["ALIGN_BYTES", "save_snapshot", "to_snapshot"]

ALIGN_BYTES = 512
"""Where blocks start: multiples of this (CUDA's caching allocator rounds blocks to 512 bytes)."""
_SEGMENT_ROUND = 2 << 20
_BASE = 0x7F0000000000
_STRIDE = 0x10000000000


class _FirstFit:
    """Addresses from the lowest free gap that holds a block; the segment grows when none does."""

    def __init__(self) -> None:
        self.free: list[list[int]] = []  # [start, end) offsets, sorted, merged
        self.top = 0

    def alloc(self, size: int) -> int:
        for gap in self.free:
            if gap[1] - gap[0] >= size:
                start = gap[0]
                gap[0] += size
                if gap[0] == gap[1]:
                    self.free.remove(gap)
                return start
        start, self.top = self.top, self.top + size
        return start

    def release(self, start: int, size: int) -> None:
        gaps = [*self.free, [start, start + size]]
        gaps.sort()
        merged: list[list[int]] = []
        for gap in gaps:
            if merged and merged[-1][1] == gap[0]:
                merged[-1][1] = gap[1]
            else:
                merged.append(list(gap))
        if merged and merged[-1][1] == self.top:  # the end of the segment is free again
            self.top = merged.pop()[0]
        self.free = merged


def _aligned(nbytes: int) -> int:
    return max(-(-nbytes // ALIGN_BYTES) * ALIGN_BYTES, ALIGN_BYTES)


def _device_trace(line: StepTimeline, device: int) -> tuple[list[dict], dict[str, Any]]:
    """One step's trace entries and its segment (blocks: what is alive at the end)."""
    labels = {key: info["label"] for key, info in key_info(list(line.series)).items()}
    n = len(line.ops)
    base = _BASE + device * _STRIDE
    times = line.time_ms

    def time_us(index: int) -> int:
        if index >= n:
            index = n - 1
        if index < 0 or n == 0:
            return 0
        return int(times[index] * 1000) if times is not None else index

    order = sorted(
        (i for i, s in enumerate(line.storages) if s.nbytes > 0 and s.created < s.died),
        key=lambda i: (line.storages[i].created, not line.storages[i].static, i),
    )
    deaths: dict[int, list[int]] = {}
    for i in order:
        deaths.setdefault(line.storages[i].died, []).append(i)
    arena = _FirstFit()
    at: dict[int, int] = {}
    entries: list[dict[str, Any]] = []

    def frames(i: int) -> list[dict[str, Any]]:
        s = line.storages[i]
        if s.static:
            return [{"filename": "<before the step>", "line": 0, "name": labels[s.key]}]
        return [
            {
                "filename": s.module or "<model>",
                "line": s.created,
                "name": f"{line.ops[s.created]} ({labels[s.key]}"
                + (", recompute)" if s.recompute else ")"),
            }
        ]

    def free(i: int) -> None:
        s = line.storages[i]
        arena.release(at[i], _aligned(s.nbytes))
        for action in ("free_requested", "free_completed"):
            entries.append(
                {
                    "action": action,
                    "addr": base + at[i],
                    "size": s.nbytes,
                    "stream": 0,
                    "time_us": time_us(s.died),
                    "frames": frames(i),
                }
            )

    op = -1
    for i in order:
        s = line.storages[i]
        while op < s.created:  # the deaths before this op's allocations
            op += 1
            for j in deaths.pop(op, []):
                free(j)
        at[i] = arena.alloc(_aligned(s.nbytes))
        entries.append(
            {
                "action": "alloc",
                "addr": base + at[i],
                "size": s.nbytes,
                "stream": 0,
                "time_us": time_us(s.created),
                "frames": frames(i),
            }
        )
    for index in sorted(deaths):
        if index < n:
            for j in deaths[index]:
                free(j)
    alive = sorted((at[i], i) for i in order if line.storages[i].died >= n)
    high = max([arena.top] + [offset + _aligned(line.storages[i].nbytes) for offset, i in alive])
    total = max(-(-high // _SEGMENT_ROUND) * _SEGMENT_ROUND, _SEGMENT_ROUND)
    entries.insert(
        0,
        {
            "action": "segment_alloc",
            "addr": base,
            "size": total,
            "stream": 0,
            "time_us": 0,
            "frames": [],
        },
    )
    blocks: list[dict[str, Any]] = []
    cursor = 0
    for offset, i in alive:
        if offset > cursor:
            blocks.append(_block(base + cursor, offset - cursor, 0, "inactive", []))
        size = _aligned(line.storages[i].nbytes)
        blocks.append(
            _block(base + offset, size, line.storages[i].nbytes, "active_allocated", frames(i))
        )
        cursor = offset + size
    if cursor < total:
        blocks.append(_block(base + cursor, total - cursor, 0, "inactive", []))
    allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    segment = {
        "device": device,
        "address": base,
        "total_size": total,
        "allocated_size": allocated,
        "active_size": allocated,
        "requested_size": sum(b["requested_size"] for b in blocks),
        "stream": 0,
        "segment_type": "large",
        "segment_pool_id": (0, 0),
        "is_expandable": False,
        "frames": [],
        "blocks": blocks,
    }
    return entries, segment


def _block(address: int, size: int, requested: int, state: str, frames: list) -> dict[str, Any]:
    return {
        "address": address,
        "size": size,
        "requested_size": requested,
        "state": state,
        "frames": frames,
    }


def to_snapshot(lines: Sequence[StepTimeline]) -> dict[str, Any]:
    """The snapshot dictionary of the steps (one device each, in order).

    Example:
        >>> import torch
        >>> from remat.profiling.step import Step
        >>> from remat.timeline.record import record_step
        >>> line = record_step(Step(torch.nn.Linear(4, 4), (torch.ones(2, 4),), optimizer="sgd"))
        >>> snap = to_snapshot([line])
        >>> sorted(snap)[:2], snap["device_traces"][0][1]["action"]
        (['device_traces', 'remat'], 'alloc')
    """
    traces, segments = [], []
    for device, line in enumerate(lines):
        entries, segment = _device_trace(line, device)
        traces.append(entries)
        segments.append(segment)
    return {
        "segments": segments,
        "device_traces": traces,
        "remat": {"devices": [line.label for line in lines]},
    }


def save_snapshot(lines: Sequence[StepTimeline], path: str | os.PathLike[str]) -> Path:
    """Pickle :func:`to_snapshot` to ``path`` (protocol 4), as ``_dump_snapshot`` writes.

    Example:
        >>> import pickle, tempfile, torch
        >>> from remat.profiling.step import Step
        >>> from remat.timeline.record import record_step
        >>> line = record_step(Step(torch.nn.Linear(4, 4), (torch.ones(2, 4),), optimizer="sgd"))
        >>> path = save_snapshot([line], tempfile.mkdtemp() + "/snap.pickle")
        >>> sorted(pickle.loads(path.read_bytes()))
        ['device_traces', 'remat', 'segments']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        pickle.dump(to_snapshot(lines), file, protocol=4)
    return path
