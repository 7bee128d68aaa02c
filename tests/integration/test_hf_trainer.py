"""remat.integrations.hf.RematCallback in a Hugging Face Trainer (issue 16): a tiny Llama trains
a few steps with the callback and a tight budget. Oracles: the same run without the callback (same
seed: the losses and the final weights equal bitwise; its steady-state step, optimizer state
alive, measured by remat.track_memory, peaks higher), the modules whose forward the plan replaced,
the plan file on disk, and a resumed run that must not profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import remat
from remat.integrations import hf
from remat.integrations.trainer_plan import PLAN_FILE

ROOT = Path(__file__).resolve().parents[2]

transformers.logging.set_verbosity_error()

STEPS = 4
MEASURED_STEP = 2  # the third step: the optimizer's state exists since the first


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, seq: int = 64, vocab: int = 128) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (count, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Recorder(TrainerCallback):
    """Each forward's loss, exactly; the peak of one steady-state step (on_step_begin to
    on_step_end: forward, backward, optimizer step, zero_grad)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.peak_bytes: int | None = None
        self._tracker: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        # added after RematCallback: planning's own forwards are not recorded
        model.register_forward_hook(lambda m, i, out: self.losses.append(out.loss.detach().clone()))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == MEASURED_STEP and self.peak_bytes is None:
            optimizer = getattr(kw["optimizer"], "optimizer", kw["optimizer"])
            self._tracker = remat.track_memory(kw["model"], optimizer)
            self._tracker.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self.peak_bytes, self._tracker = self._tracker.peak_bytes, None


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def train(
    output_dir: Path,
    callback: Any = None,
    *,
    model: Any = None,
    resume: str | None = None,
    **arguments: Any,
) -> tuple[Trainer, Recorder]:
    recorder = Recorder()
    settings = {"save_strategy": "no", "max_steps": STEPS, **arguments}
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **settings,
    )
    callbacks = [c for c in (callback, recorder) if c is not None]
    trainer = Trainer(
        model=model or tiny_llama(), args=args, train_dataset=Tokens(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def remat_logs(trainer: Trainer) -> list[dict[str, Any]]:
    return [entry for entry in trainer.state.log_history if "remat/strategy" in entry]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def check_planned_run(plain: tuple[Trainer, Recorder], planned: tuple[Trainer, Recorder], cb: Any):
    (plain_trainer, plain_rec), (trainer, rec) = plain, planned
    # the plan is on: its units run a forward that remat installed on the module
    assert cb.handle is not None and cb.handle.active and cb.handle.checkpointed
    for fqn in cb.handle.checkpointed:
        assert "forward" in trainer.model.get_submodule(fqn).__dict__, fqn
    # the same training, bitwise: every loss, every final weight
    assert len(rec.losses) == STEPS
    assert same(rec.losses, plain_rec.losses)
    assert same(
        list(trainer.model.state_dict().values()), list(plain_trainer.model.state_dict().values())
    )
    # a steady-state step peaks lower with the plan
    assert plain_rec.peak_bytes is not None and rec.peak_bytes is not None
    assert rec.peak_bytes < plain_rec.peak_bytes


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerator_state() -> Any:
    """The Trainer's accelerate state is one per process: start and leave it unset, so that
    use_cpu=True here and another test's devices do not clash."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf_trainer")
    callback = hf.RematCallback(budget="min", actions=["keep", "recompute"])
    return {
        "plain": train(root / "plain"),
        "planned": train(root / "planned", callback, save_strategy="steps", save_steps=2),
        "callback": callback,
        "dir": root / "planned",
    }


def test_the_plan_trains_the_same_steps_below_the_unplanned_peak(runs: dict[str, Any]) -> None:
    check_planned_run(runs["plain"], runs["planned"], runs["callback"])
    trainer, _ = runs["planned"]
    (logged,) = remat_logs(trainer)
    assert logged["remat/checkpointed_units"] == len(runs["callback"].handle.checkpointed) > 0
    assert logged["remat/predicted_peak_bytes"] > 0 and logged["remat/plan_reused"] is False
    saved = json.loads((runs["dir"] / PLAN_FILE).read_text())
    assert saved["predicted_peak_bytes"] == logged["remat/predicted_peak_bytes"]
    assert saved["metadata"]["trainer"]["optimizer"] == "AdamW"  # the Trainer's own


def test_resume_reuses_the_saved_plan_without_profiling(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_profile(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("profiled again on resume")

    monkeypatch.setattr(remat, "auto_", no_profile)
    monkeypatch.setattr(remat, "profile", no_profile)
    callback = hf.RematCallback(budget="min", actions=["keep", "recompute"])
    trainer, recorder = train(runs["dir"], callback, resume=str(runs["dir"] / "checkpoint-2"))
    logged = remat_logs(trainer)[-1]
    assert logged["remat/plan_reused"] is True and callback.handle.result is None
    assert callback.handle.checkpointed == runs["callback"].handle.checkpointed
    # steps 3 and 4 again, from the checkpoint: the uninterrupted run's losses
    assert same(recorder.losses, runs["planned"][1].losses[2:])


@pytest.mark.slow
def test_torch_compile_trains_with_the_plan(runs: dict[str, Any], tmp_path: Path) -> None:
    callback = hf.RematCallback(budget="min", actions=["keep", "recompute"])
    # dynamo traces the planned model (the eager backend: the same kernels, no inductor build);
    # two steps: the second runs the compiled code with the optimizer's state alive
    trainer, recorder = train(
        tmp_path, callback, max_steps=2, torch_compile=True, torch_compile_backend="eager"
    )
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert callback.handle.active and callback.handle.checkpointed
    for fqn in callback.handle.checkpointed:
        assert "forward" in trainer.model.get_submodule(fqn).__dict__, fqn
    assert same(recorder.losses, runs["plain"][1].losses[:2])


def test_refuses_the_trainers_own_gradient_checkpointing(tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_checkpointing=True, use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match=r"gradient_checkpointing=True.*Fix: "):
        Trainer(model=tiny_llama(), args=args, callbacks=[hf.RematCallback(budget="min")])


def test_fsdp_without_a_batch_is_refused_naming_the_fix(tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path), fsdp="full_shard", use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match=r"fsdp=True\) and no batch.*batch=one_batch"):
        hf.refuse_trainer_args(args)


def test_under_fsdp_the_callback_plans_before_sharding_and_trains_the_same(
    tmp_path: Path,
) -> None:
    # Two ranks, CPU and gloo: the Trainer shards the model with FSDP; given a batch, the callback
    # planned (per FSDP rank) when the Trainer was made, and the sharded run replays the
    # recomputed layers (more layer calls) and trains exactly as without the callback.
    out = tmp_path / "results.pt"
    script = Path(__file__).parent / "dist_scripts" / "hf_trainer_fsdp.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), "--out", str(out), "--tmp", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    planned, plain = result["planned"], result["plain"]
    recomputed = [fqn for fqn, action in result["actions"].items() if action == "recompute"]
    assert recomputed, result["actions"]
    assert planned["losses"] == plain["losses"] and len(plain["losses"]) == 3
    steps, layers = 3, len(result["actions"])
    assert plain["layer_calls"] == steps * layers
    assert planned["layer_calls"] == steps * (layers + len(recomputed))  # the replays
    (summary,) = planned["remat_log"]
    assert summary["remat/checkpointed_units"] == len(recomputed)


def test_without_transformers_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(vars(hf), "_REMAT_CALLBACK", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'remat\[hf\]'"):
        hf.RematCallback  # noqa: B018
