"""remat.timeline and `remat timeline`: the series against hand counts and the tracker's measured
peaks, estimate mode on meta, the page's content, and the snapshot against PyTorch's own readers."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import remat
from remat.auto import measure_plan
from remat.cli.main import main
from remat.plan import Plan
from remat.profiling.step import Step
from remat.timeline.build import Timeline
from remat.timeline.record import StepTimeline

BATCH, WIDTH, HIDDEN, UNITS = 256, 64, 128, 3
FLOAT = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        *[
            nn.Sequential(
                nn.Linear(WIDTH, HIDDEN, bias=False),
                nn.Tanh(),
                nn.Linear(HIDDEN, WIDTH, bias=False),
            )
            for _ in range(UNITS)
        ]
    )


Recorded = tuple[Step, Plan, Timeline]


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    step = Step(_model(), (torch.randn(BATCH, WIDTH),), optimizer="sgd")
    plan = Plan(actions={"_default": "recompute"}, budget_bytes=200_000)
    return step, plan, remat.timeline(step, plan=plan)


def _forward_end(line: StepTimeline) -> int:
    """The last op of the first forward (before the first backward op)."""
    return line.phases.index("backward") - 1


def test_series_match_hand_counts(recorded: Recorded) -> None:
    _, _, result = recorded
    unplanned, planned = result.steps
    param_bytes = UNITS * 2 * WIDTH * HIDDEN * FLOAT
    batch_bytes = BATCH * WIDTH * FLOAT
    for line in (unplanned, planned):
        assert line.series["parameter"][0] == param_bytes  # static from the first op
        assert line.series["other"][0] == batch_bytes  # the batch
        assert line.series["gradient"][-1] == param_bytes  # SGD: every gradient, no state
        assert line.series["optimizer_state"][-1] == 0
        assert line.units == ["0", "1", "2"]
    # Unplanned, a unit leaves its tanh output (read by tanh's and the second linear's backward)
    # and its own output (the next unit's input, or the model's output) for backward.
    end = _forward_end(unplanned)
    for unit in unplanned.units:
        assert unplanned.series[f"act:{unit}"][end] == BATCH * (HIDDEN + WIDTH) * FLOAT
    # Recomputed, a unit keeps only its output; the tanh output comes back in backward.
    end = _forward_end(planned)
    for unit in planned.units:
        assert planned.series[f"act:{unit}"][end] == BATCH * WIDTH * FLOAT
    assert any(planned.recompute) and not any(unplanned.recompute)
    replayed = [s for s in planned.storages if s.recompute]
    assert {s.nbytes for s in replayed} >= {BATCH * HIDDEN * FLOAT}  # the tanh outputs again
    assert all(s.key == "transient" for s in replayed)


def test_peaks_are_the_measured_peaks(recorded: Recorded) -> None:
    step, plan, result = recorded
    assert result.unplanned.peak_bytes == measure_plan(step)
    assert result.planned.peak_bytes == measure_plan(step, plan)
    assert result.planned.peak_bytes < result.unplanned.peak_bytes
    assert result.budget_bytes == 200_000
    # Every op's categories sum to the total, and the tracker's own peak is the series' peak.
    for line in result.steps:
        assert line.tracker_peak_bytes == line.peak_bytes
        assert len(line.x) == len(line.ops) == len(line.modules) == len(line.total_bytes)
        assert line.x == sorted(line.x) and line.x_unit == "ms"


def test_page_is_self_contained_and_keeps_the_peaks(recorded: Recorded, tmp_path: Path) -> None:
    _, _, result = recorded
    path = result.save(tmp_path / "t.html", max_points=40)  # downsampled hard
    page = path.read_text()
    assert "http" not in page and "<script src" not in page and "<link" not in page
    data = json.loads(re.search(r'id="timeline-data">(.*?)</script>', page, re.S).group(1))
    assert [s["label"] for s in data["steps"]] == ["unplanned", "planned"]
    assert data["budget_bytes"] == 200_000
    for step, line in zip(data["steps"], result.steps, strict=True):
        assert len(step["x"]) <= 40 + 10  # buckets, the peak and the phase boundaries
        totals = [sum(column[i] for column in step["stack"]) for i in range(len(step["x"]))]
        assert max(totals) == line.peak_bytes == step["peak"]["bytes"]
        kept = step["i"].index(line.peak_index)
        assert step["x"][kept] == step["peak"]["x"]
        assert data["names"][step["op"][kept]] == line.ops[line.peak_index] == step["peak"]["op"]
    saved = data["steps"][0]["units"]["1"]["saved"]
    assert sum(item[2] for item in saved) == BATCH * (HIDDEN + WIDTH) * FLOAT


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def test_snapshot_is_plain_and_torch_reads_it(recorded: Recorded, tmp_path: Path) -> None:
    from torch.cuda import _memory_viz

    step, plan, result = recorded
    path = result.save_snapshot(tmp_path / "snap.pickle")
    with open(path, "rb") as file:
        assert file.read(2) == b"\x80\x04"  # pickle protocol 4
    with open(path, "rb") as file:
        snap = pickle.load(file)
    assert _plain(snap)
    assert {"segments", "device_traces"} <= set(snap)
    assert len(snap["device_traces"]) == 2 and [s["device"] for s in snap["segments"]] == [0, 1]
    for segment in snap["segments"]:
        assert {"address", "total_size", "stream", "blocks", "allocated_size"} <= set(segment)
        assert sum(b["size"] for b in segment["blocks"]) == segment["total_size"]
    for trace, oracle in zip(
        snap["device_traces"], (measure_plan(step), measure_plan(step, plan)), strict=True
    ):
        assert {e["action"] for e in trace} == {
            "segment_alloc",
            "alloc",
            "free_requested",
            "free_completed",
        }
        assert all({"action", "addr", "size", "stream", "frames"} <= set(e) for e in trace)
        live, peak, spans = 0, 0, {}
        for entry in trace:  # replayed as the viewer replays it: bytes and address overlaps
            if entry["action"] == "alloc":
                start, end = entry["addr"], entry["addr"] + entry["size"]
                assert all(end <= a or start >= b for a, b in spans.values())
                spans[entry["addr"]] = (start, end)
                live += entry["size"]
            elif entry["action"] == "free_completed":
                del spans[entry["addr"]]
                live -= entry["size"]
            peak = max(peak, live)
        assert peak == oracle
    # PyTorch's own readers of the format accept it.
    assert "segments: 2" in _memory_viz.segsum(snap)
    assert "Device 1" in _memory_viz.trace(snap)
    assert "snapshot.pickle" in _memory_viz.trace_plot(snap)
    assert "snapshot.pickle" in _memory_viz.segment_plot(snap)


def test_estimate_mode_runs_on_meta_for_the_target() -> None:
    from remat.models.spec import load_model

    built = load_model(
        "gpt",
        device="meta",
        batch=8,
        seq=64,
        overrides={"n_layer": 2, "d_model": 64, "n_head": 4, "vocab": 64},
    )
    step = Step(built.model, built.example_inputs, loss_fn=built.loss_fn, target="h100-80gb")
    result = remat.timeline(step, plan=Plan(actions={"_default": "recompute"}))
    for line in result.steps:
        assert line.x_unit == "op" and line.x == [float(i) for i in range(len(line.ops))]
        # The target's caching allocator is modelled: every storage a multiple of 512 bytes.
        assert all(s.nbytes % 512 == 0 for s in line.storages)
    oracle = remat.profile_step(step, options=(), timing=False)
    assert result.unplanned.peak_bytes == oracle.peak_bytes
    assert result.planned.peak_bytes < result.unplanned.peak_bytes
    assert "h100-80gb" in result.device
    assert next(built.model.parameters()).device.type == "meta"


def test_budget_solves_a_plan_that_fits() -> None:
    step = Step(_model(), (torch.randn(BATCH, WIDTH),), optimizer="sgd")
    result = remat.timeline(step, budget="min", actions=["keep", "recompute"])
    assert result.planned.peak_bytes <= result.budget_bytes < result.unplanned.peak_bytes
    assert result.planned.peak_bytes == measure_plan(step, result.plan)
    with pytest.raises(ValueError, match="plan, budget: got both"):
        remat.timeline(step, plan=result.plan, budget="min")


TINY_GPT = ["--set", "n_layer=2", "d_model=64", "n_head=4", "vocab=128", "--batch", "2"]


def test_cli_writes_page_and_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan_path = tmp_path / "plan.json"
    Plan(actions={"_default": "recompute"}).save(plan_path)
    out, snap = tmp_path / "t.html", tmp_path / "t.pickle"
    args = ["timeline", "gpt", *TINY_GPT, "--seq", "32", "--optimizer", "sgd"]
    code = main([*args, "--plan", str(plan_path), "--out", str(out), "--snapshot", str(snap)])
    assert code == 0
    text = capsys.readouterr().out
    assert re.search(r"unplanned: peak .* \(aten::", text) and f"written to {out}" in text
    assert "http" not in out.read_text()
    with open(snap, "rb") as file:
        assert len(pickle.load(file)["device_traces"]) == 2
    with pytest.raises(SystemExit) as usage:  # argparse: one of --plan and --budget
        main([*args, "--plan", str(plan_path), "--budget", "min"])
    assert usage.value.code == 2


def test_plan_cli_writes_a_timeline_beside_the_plan(tmp_path: Path) -> None:
    out, page = tmp_path / "plan.json", tmp_path / "plan.html"
    code = main(
        [
            "plan", "gpt", *TINY_GPT, "--seq", "32", "--optimizer", "sgd", "--strategy", "full",
            "--actions", "keep,recompute", "--no-measure", "--out", str(out),
            "--timeline", str(page),
        ]
    )  # fmt: skip
    assert code == 0 and out.exists()
    html = page.read_text()
    assert '"label":"planned"' in html and "http" not in html


def _page_data(path: Path) -> dict:
    page = path.read_text()
    found = re.search(r'id="timeline-data">(.*?)</script>', page, re.S)
    assert found, path
    return json.loads(found.group(1))


def test_bench_links_each_plans_timeline(tmp_path: Path) -> None:
    """What `remat bench --timelines` runs after its measurements, on rows as bench fills them
    (each plan's actions per unit, its budget, its peak measured apart by measure_plan)."""
    import argparse

    from remat.benchmarking.report import write_report
    from remat.benchmarking.result import BenchResult, StrategyResult
    from remat.cli.main import build_parser
    from remat.cli.timeline import write_bench_timelines
    from remat.models.spec import load_model

    assert build_parser().parse_args(["bench", "gpt", "--timelines"]).timelines
    built = load_model("gpt", batch=2, seq=32, overrides={"n_layer": 2, "d_model": 32,
                                                          "n_head": 2, "vocab": 64})  # fmt: skip
    step = Step(built.model, built.example_inputs, loss_fn=built.loss_fn)
    units = ["blocks.0", "blocks.1"]
    actions = {
        "none": {"blocks.0": "keep", "blocks.1": "keep"},
        "full": {"blocks.0": "recompute", "blocks.1": "recompute"},
        "remat:50%": {"blocks.0": "recompute", "blocks.1": "keep"},
        "remat:@full": {"blocks.0": "recompute", "blocks.1": "recompute"},
    }
    peaks = {n: measure_plan(step, Plan(actions=a)) for n, a in actions.items() if n[-4:] != "full"}
    peaks["full"] = peaks["remat:@full"] = measure_plan(step, Plan(actions=actions["full"]))
    rows = [
        StrategyResult(
            strategy=name,
            kind="remat" if name.startswith("remat") else "peer",
            plan=plan,
            peak_bytes=peaks[name],
            budget_bytes=123_456 if name == "remat:50%" else None,
            same_as="full" if name == "remat:@full" else None,
        )
        for name, plan in actions.items()
    ]
    result = BenchResult(model="gpt", results=rows)
    out = tmp_path / "bench"
    args = argparse.Namespace(out=str(out), optimizer="adamw", precision="32", model="gpt")
    write_bench_timelines(args, result, built, units)
    page = write_report(result, out, plot=False)["html"].read_text()
    for name, file in (("full", "timeline-full.html"), ("remat:50%", "timeline-remat_50_.html")):
        data = _page_data(out / file)
        unplanned, planned = data["steps"]
        assert planned["peak"]["bytes"] == rows[list(actions).index(name)].peak_bytes, name
        assert unplanned["peak"]["bytes"] == rows[0].peak_bytes
        assert f'<a href="{file}">{name}</a>' in page
    assert _page_data(out / "timeline-remat_50_.html")["budget_bytes"] == 123_456
    assert '<a href="timeline-full.html">remat:@full</a>' in page  # one plan, measured once
    assert not (out / "timeline-none.html").exists()  # the unplanned step is in every page
