"""remat under torchrun: DDP and FSDP2 on CPU with gloo give the gradients of one process.

One ``torchrun --nproc_per_node 2`` launch (tests/integration/dist_scripts/train_check.py) trains a
tiny GPT, each rank on half of one global batch, under DDP and FSDP2 with a plan solved on rank 0
and broadcast; rank 0 also trains the unplanned model on the whole batch in one process, the oracle.
The fake process group checks the FSDP2 per-rank static memory model against real ``fully_shard``
on 8 ranks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import remat
from remat.integrations.distributed import broadcast_plan, fully_shard_units
from remat.models.gpt import build
from remat.models.spec import load_model
from remat.profiling.step import make_optimizer, measure_step

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integration" / "dist_scripts" / "train_check.py"


def torchrun(script: Path, *args: str, nproc: int = 2, timeout_s: int = 240) -> str:
    """Run ``script`` under torchrun on CPU (gloo), a free port (``--standalone``); its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    torchrun(SCRIPT, "--out", str(out), "--dropout")
    return torch.load(out, weights_only=False)


def assert_matches_one_process(result: dict, reference: dict) -> None:
    # Not bitwise: each rank sums its half batch and the all-reduce (DDP) or reduce-scatter (FSDP2)
    # averages the halves, a different order of float additions than one process summing the whole
    # batch; differences are ~1e-8 here, so the tolerance stays tight.
    assert set(result["grads"]) == set(reference["grads"])
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, param in reference["params"].items():
        torch.testing.assert_close(result["params"][name], param, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(torch.stack(result["losses"]), torch.stack(reference["losses"]))


def test_every_rank_applies_the_plan_of_rank_0(runs: dict) -> None:
    plans = runs["plans_per_rank"]
    assert len(plans) == 2 and plans[0] == plans[1]


def test_ddp_gradients_equal_one_process(runs: dict) -> None:
    assert any(a != "keep" for a in runs["ddp"]["actions"].values()), runs["ddp"]["actions"]
    assert_matches_one_process(runs["ddp"], runs["reference"])


def test_ddp_with_segments_equals_one_process(runs: dict) -> None:
    assert any(a.startswith("segment") for a in runs["ddp_sqrt_n"]["actions"].values())
    assert_matches_one_process(runs["ddp_sqrt_n"], runs["reference"])


def test_fsdp2_gradients_equal_one_process(runs: dict) -> None:
    actions = runs["fsdp"]["actions"]
    assert any(a == "recompute" for a in actions.values()), actions
    assert not any(a.startswith(("segment", "nested")) for a in actions.values()), actions
    assert_matches_one_process(runs["fsdp"], runs["reference"])


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_planned_equals_unplanned_bitwise_with_dropout(runs: dict, wrapper: str) -> None:
    # The same wrapper, the same rank seeds: a recomputed unit replays the dropout masks its
    # forward drew, so the planned run's losses, gradients and weights are the unplanned run's.
    planned, plain = runs[f"{wrapper}_dropout"], runs[f"{wrapper}_dropout_plain"]
    assert any(a == "recompute" for a in planned["actions"].values()), planned["actions"]
    assert all(a == "keep" for a in plain["actions"].values()), plain["actions"]
    for name, grad in plain["grads"].items():
        assert torch.equal(planned["grads"][name], grad), name
    for name, param in plain["params"].items():
        assert torch.equal(planned["params"][name], param), name
    assert torch.equal(torch.stack(planned["losses"]), torch.stack(plain["losses"]))
    # Dropout was on: the model's loss in training mode is not its loss in evaluation mode.
    check = runs["dropout_check"]
    assert not torch.equal(check["train"], check["eval"])


def test_documented_order_remat_compile_fully_shard(runs: dict) -> None:
    # apply_, then compile_units_ (aot_eager), then fully_shard per unit and the root.
    assert runs["fsdp_compile"]["actions"] == runs["fsdp"]["actions"]
    assert_matches_one_process(runs["fsdp_compile"], runs["reference"])


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of ``world_size`` on the fake process group: collectives do nothing,
    but FSDP2 shards, gathers and reduce-scatters buffers of the real sizes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # private torch test API

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def fake_world_of_8() -> Iterator[None]:
    with fake_world(8):
        yield


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fsdp2_static_bytes_per_rank_on_8_fake_ranks(
    fake_world_of_8: object, optimizer: str
) -> None:
    # d_model 36 and vocab 100 do not divide by 8: FSDP2 pads dim 0, and so must the model.
    sizes = {"batch": 2, "seq": 8, "n_layer": 3, "d_model": 36, "n_head": 2, "vocab": 100}
    with torch.device("meta"):
        built = build(dropout=0.0, **sizes)
    one = remat.profile(
        built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer=optimizer
    )
    ranked = remat.profile(
        built.model,
        built.example_inputs,
        loss_fn=built.loss_fn,
        optimizer=optimizer,
        world_size=8,
        fsdp=True,
    )
    with remat.track_memory(built.model) as tracker:
        pass
    full_params = tracker.report().peak_by_category["parameter"]
    fully_shard_units(built.model, remat.find_units(built.model))
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in built.model.parameters())
    # What real fully_shard leaves on this rank, as the tracker counts it: the padded local shard
    # of every parameter, about an eighth (padding dim 0 to a multiple of 8 adds ~5% here).
    with remat.track_memory(built.model) as tracker:
        pass
    shards = tracker.report().peak_by_category["parameter"]
    assert full_params / 8 <= shards < 1.1 * full_params / 8
    assert shards == sum(p.to_local().untyped_storage().nbytes() for p in built.model.parameters())
    states = {"sgd": 0, "adamw": 2}[optimizer]
    inputs = sum(t.untyped_storage().nbytes() for t in built.example_inputs)
    buffers = sum(b.untyped_storage().nbytes() for b in built.model.buffers())
    # parameters, gradients (reduce-scattered: shards too) and optimizer state, per rank
    assert ranked.static_bytes == shards * (2 + states) + buffers + inputs
    assert ranked.static_bytes < one.static_bytes / 7
    assert (ranked.world_size, ranked.fsdp) == (8, True)


def test_broadcast_plan_without_process_group_returns_it() -> None:
    plan = remat.Plan(actions={"_default": "recompute"})
    assert broadcast_plan(plan) is plan
    with pytest.raises(ValueError, match=r"expected a remat\.Plan"):
        broadcast_plan(None)


def test_train_fsdp_example_runs_under_torchrun() -> None:
    out = torchrun(
        ROOT / "examples" / "train_fsdp.py",
        *("--steps", "3", "--budget", "min", "--compile", "aot_eager"),
        *("--n-layer", "2", "--d-model", "32", "--n-head", "2", "--vocab", "64"),
        *("--seq", "16", "--batch", "2"),
    )
    assert "OPTIMAL plan for 2 ranks" in out, out
    losses = [
        float(line.split("loss ")[1].split(",")[0]) for line in out.splitlines() if "loss " in line
    ]
    assert len(losses) == 3 and losses[-1] < losses[0], out  # it trains
    for rank in (0, 1):
        assert f"rank {rank}: peak " in out and "step " in out, out


def test_fully_shard_units_refuses_segments() -> None:
    torch.manual_seed(0)
    model = build(batch=1, seq=4, n_layer=4, d_model=8, n_head=2, vocab=16).model
    units = remat.find_units(model)
    remat.apply_(model, remat.baseline_plan("sqrt_n", units))
    # Checked before any process group is needed: a segment cannot replay under FSDP2.
    with pytest.raises(ValueError, match="segment"):
        fully_shard_units(model, units)


FSDP_MODELS = {
    "gpt": {"n_layer": 3, "d_model": 20, "n_head": 2, "vocab": 50, "seq": 8},
    "unet": {"image_size": 16, "base_channels": 5, "depth": 2},
}


@pytest.mark.parametrize("name", sorted(FSDP_MODELS))
def test_fsdp2_per_rank_peaks_match_measured_on_fake_ranks(name: str) -> None:
    # A real FSDP2 step on CPU as rank 0 of 3 (fake collectives, real buffers; sizes that do not
    # divide by 3 pad dim 0), measured by the tracker, against the per-rank prediction made from a
    # one-process profile. On torch 2.13 they agree to the byte; the model must never be below.
    with fake_world(3):
        sizes = dict(FSDP_MODELS[name])
        seq = sizes.pop("seq", None)
        torch.manual_seed(0)
        built = load_model(name, batch=2, seq=seq, overrides=sizes)
        ranked = remat.profile(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            optimizer="adamw",
            repeats=0,
            world_size=3,
            fsdp=True,
        )
        for strategy in ("none", "every_n:2"):  # all kept; kept and recomputed units
            plan = remat.baseline_plan(strategy, ranked.unit_fqns)
            model = copy.deepcopy(built.model)
            remat.apply_(model, plan)
            fully_shard_units(model, ranked.unit_fqns)
            opt = make_optimizer("adamw", model)
            measured = measure_step(
                model, built.example_inputs, loss_fn=built.loss_fn, optimizer=opt
            )
            predicted = remat.simulate(ranked, plan).peak_bytes
            assert measured.peak_bytes <= predicted <= 1.01 * measured.peak_bytes, (
                name,
                strategy,
                predicted,
                measured.peak_bytes,
            )
