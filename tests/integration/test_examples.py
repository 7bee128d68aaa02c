"""The examples run, at small sizes: examples/train_gpt.py and examples/hf_finetune.py train with a
plan whose measured peak is within the budget (and, for the GPT, below training without a plan),
the loss falls, and the progress bar goes to stderr."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import remat
from memory_oracle import StorageOracle

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GPT_SIZES = [
    *("--batch", "4", "--seq", "64", "--vocab", "64"),
    *("--n-layer", "4", "--d-model", "64", "--n-head", "4"),
]


@dataclass
class Done:
    stdout: str
    stderr: str


def _oracle_tracker(*roots: object, **_: object) -> StorageOracle:
    """``remat.track_memory``'s place in the examples: only ``peak_bytes`` is read there."""
    return StorageOracle(roots)


def run_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, script: str, *args: str
) -> Done:
    """Run the script's main(argv) in this process (what `python examples/<script>` runs), with
    the examples directory importable as it is for the script. The peaks the scripts print
    ("measured peak", a steady-state step under ``remat.track_memory``) are counted by the
    independent oracle (tests/memory_oracle.py) instead: remat plans and measures its plan
    through the library's own tracker, so a printed peak within the budget would otherwise be
    the closed loop's own number."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(remat, "track_memory", _oracle_tracker)
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    code = module.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    return Done(captured.out, captured.err)


def field_bytes(stdout: str, name: str) -> int:
    match = re.search(rf"^{name}:.*\(([0-9,]+) bytes\)", stdout, re.MULTILINE)
    assert match, f"no {name!r} line in:\n{stdout}"
    return int(match.group(1).replace(",", ""))


def losses(stdout: str) -> tuple[float, float]:
    match = re.search(r"^loss: +([0-9.]+) -> ([0-9.]+)", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1)), float(match.group(2))


def check_trained_within_budget(done: Done, steps: int) -> int:
    out = done.stdout
    assert re.search(r"^plan: +OPTIMAL, recompute \S+\.[0-9]", out, re.MULTILINE), out
    peak = field_bytes(out, "measured peak")
    assert 0 < peak <= field_bytes(out, "budget")
    assert re.search(r"^step time: +[0-9.]+ ms", out, re.MULTILINE), out
    first, last = losses(out)
    assert last < first
    assert f"] {steps}/{steps}" in done.stderr and "[#" in done.stderr  # the progress bar
    return peak


def test_train_gpt_with_a_budget_and_without(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*args: str) -> Done:
        with one_thread():
            return run_example(capsys, monkeypatch, "train_gpt.py", *args)

    planned = run("--budget", "50%", "--steps", "20", *GPT_SIZES)
    peak = check_trained_within_budget(planned, steps=20)
    first, last = losses(planned.stdout)
    assert last < 0.5 * first  # counting up is learnt quickly
    plain = run("--budget", "none", "--steps", "2", *GPT_SIZES)
    assert "plan:" not in plain.stdout
    assert peak < field_bytes(plain.stdout, "measured peak")
    # steady-state steps (the optimizer's state alive): the planned run's step without its plan
    # is the plain run's step to the byte, and min recomputes more than 50%
    assert field_bytes(planned.stdout, "unplanned peak") == field_bytes(
        plain.stdout, "measured peak"
    )
    least = run("--budget", "min", "--steps", "2", *GPT_SIZES)
    assert field_bytes(least.stdout, "measured peak") < peak


def test_hf_finetune(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    done = run_example(
        capsys,
        monkeypatch,
        "hf_finetune.py",
        "--model",
        "gpt2",
        "--budget",
        "50%",
        "--steps",
        "6",
        "--batch",
        "8",
        "--seq",
        "64",
        "--set",
        "n_layer=3",
        "n_embd=64",
        "vocab_size=128",
    )
    check_trained_within_budget(done, steps=6)
    assert "hf:gpt2" in done.stdout


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for tiny models: two spin against each other on a loaded CPU (the
    trainer examples ran 5x slower under a load of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_accelerate_train(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state
    try:
        with one_thread():
            done = run_example(
                capsys, monkeypatch, "accelerate_train.py", "--steps", "3", "--cpu",
                *("--budget", "min", "--n-layer", "3", "--d-model", "32"),
            )  # fmt: skip
    finally:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    out = done.stdout
    assert re.search(r"^plan: .*recompute blocks\.[0-9]", out, re.MULTILINE), out
    peak = field_bytes(out, "measured peak")  # steady state, planned before prepare
    assert 0 < peak <= field_bytes(out, "budget") < field_bytes(out, "unplanned peak")


def test_hf_trainer(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    state = pytest.importorskip("accelerate.state")  # the Trainer's accelerator: one per process
    state.AcceleratorState._reset_state(reset_partial_state=True)
    try:
        done = run_example(capsys, monkeypatch, "hf_trainer.py", "--steps", "3")
    finally:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    out = done.stdout
    assert re.search(r"^plan: .*recompute model\.layers\.[0-9]", out, re.MULTILINE), out
    without = re.search(r"^losses without: +(.+)$", out, re.MULTILINE)
    with_plan = re.search(r"^losses with: +(.+)$", out, re.MULTILINE)
    assert without and with_plan and without.group(1) == with_plan.group(1), out
    assert len(without.group(1).split()) == 3
    planned = field_bytes(out, "steady-state peak with the plan")
    assert 0 < planned < field_bytes(out, "steady-state peak without the plan")


def test_lightning_train(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("lightning.pytorch")
    args = ["--steps", "3", "--accelerator", "cpu", "--root", str(tmp_path)]
    args += ["--budget", "min", "--n-layer", "3", "--d-model", "32"]
    with one_thread():
        done = run_example(capsys, monkeypatch, "lightning_train.py", *args)
    out = done.stdout
    assert re.search(r"^plan: .*recompute model\.blocks\.[0-9]", out, re.MULTILINE), out
    assert (tmp_path / "remat_plan.json").is_file()
    peak = field_bytes(out, "measured peak")  # steady state, from a callback around the step
    assert 0 < peak <= field_bytes(out, "predicted peak") < field_bytes(out, "unplanned peak")
